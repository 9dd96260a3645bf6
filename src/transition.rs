//! Every state change, recorded: a bounded ring in shared data
//! (`max_transitions` records, oldest overwritten), read by the admin API.
//! Transitions are rare next to requests, so one ring serves all workers: a
//! shared counter hands out slots.

use crate::shared_data::increment;
use crate::store::Store;
use serde::{Deserialize, Serialize};

use crate::shared_data::{transition_slot as slot, TRANSITIONS_HEAD as HEAD};

/// One change of a key's or a budget's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub time_ms: u64,
    /// `key`, `budget` or `registry`.
    pub kind: String,
    /// The key or budget id.
    pub id: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    /// Position in the ring's history (1-based), assigned on write.
    #[serde(default)]
    pub seq: u64,
}

/// Appends `t` to the ring of size `max` (no-op when `max` is 0).
pub fn record(store: &dyn Store, max: usize, mut t: Transition) {
    if max == 0 {
        return;
    }
    let Some(n) = increment(store, HEAD).0 else { return };
    t.seq = n;
    if let Ok(b) = serde_json::to_vec(&t) {
        let _ = store.set(&slot((n - 1) % max as u64), &b, None);
    }
}

/// The newest `limit` transitions, newest first.
pub fn recent(store: &dyn Store, max: usize, limit: usize) -> Vec<Transition> {
    if max == 0 {
        return Vec::new();
    }
    let head = store.value(HEAD).and_then(|b| b.as_slice().try_into().ok()).map(u64::from_le_bytes).unwrap_or(0);
    let mut out = Vec::new();
    let mut n = head;
    while n > 0 && out.len() < limit && head - n < max as u64 {
        if let Some(t) =
            store.value(&slot((n - 1) % max as u64)).and_then(|b| serde_json::from_slice::<Transition>(&b).ok())
        {
            if t.seq == n {
                out.push(t);
            }
        }
        n -= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FakeStore;

    fn t(id: &str) -> Transition {
        Transition {
            time_ms: 1,
            kind: "key".into(),
            id: id.into(),
            from: "available".into(),
            to: "throttled".into(),
            reason: "429".into(),
            seq: 0,
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_max_transitions_newest_first() {
        let s = FakeStore::new();
        for i in 0..7 {
            record(&s, 5, t(&format!("k{i}")));
        }
        let ids: Vec<String> = recent(&s, 5, 100).into_iter().map(|t| t.id).collect();
        assert_eq!(ids, vec!["k6", "k5", "k4", "k3", "k2"]);
        assert_eq!(recent(&s, 5, 2).len(), 2);
        assert!(recent(&s, 0, 10).is_empty());
    }
}
