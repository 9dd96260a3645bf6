//! Requests in flight on this VM, shared by the two stages.
//!
//! Both stages run in the same VM on the same worker thread (one `vm_id`),
//! so the ingress stage leaves what it learned here, keyed by the request's
//! `x-request-id`, and each upstream attempt reads it: which provider, which
//! keys this request has already tried. The header map carries over between
//! attempts, so the key itself stays visible to every attempt.

use crate::objective::Objective;
use hashbrown::HashMap;

/// What the stages share about one request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Flight {
    pub provider: usize,
    /// Keys already used by earlier attempts of this request.
    pub tried: Vec<usize>,
    pub attempts: u32,
    pub stream: bool,
    pub started_ms: u64,
    /// The objective from the request header or route metadata; `None`
    /// means the configured default.
    pub objective: Option<Objective>,
}

/// Entries older than this are dropped when the table grows large (their
/// ingress `on_log` never ran, e.g. after a VM reload).
const STALE_MS: u64 = 15 * 60 * 1000;
const SWEEP_AT: usize = 50_000;

#[derive(Debug, Default)]
pub struct Flights {
    map: HashMap<String, Flight>,
    seq: u64,
}

impl Flights {
    pub fn contains(&self, id: &str) -> bool {
        self.map.contains_key(id)
    }

    pub fn insert(&mut self, id: String, flight: Flight, now_ms: u64) {
        if self.map.len() >= SWEEP_AT {
            self.map.retain(|_, f| now_ms.saturating_sub(f.started_ms) < STALE_MS);
        }
        self.map.insert(id, flight);
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Flight> {
        self.map.get_mut(id)
    }

    pub fn remove(&mut self, id: &str) -> Option<Flight> {
        self.map.remove(id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// A request id unique within this VM, for requests that came without
    /// one or with one already in flight.
    pub fn fresh_id(&mut self, now_ms: u64, vm_salt: u64) -> String {
        self.seq += 1;
        format!("akr-{now_ms:x}-{vm_salt:x}-{:x}", self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flights_are_found_by_request_id_and_removed_once() {
        let mut f = Flights::default();
        f.insert("r1".into(), Flight { provider: 2, ..Flight::default() }, 0);
        assert!(f.contains("r1"));
        if let Some(fl) = f.get_mut("r1") {
            fl.tried.push(3);
        }
        assert_eq!(f.remove("r1").map(|x| (x.provider, x.tried)), Some((2, vec![3])));
        assert_eq!(f.remove("r1"), None);
    }

    #[test]
    fn stale_entries_are_swept_when_the_table_is_large() {
        let mut f = Flights::default();
        for i in 0..SWEEP_AT {
            f.insert(format!("old{i}"), Flight::default(), 0);
        }
        f.insert("new".into(), Flight { started_ms: STALE_MS + 1, ..Flight::default() }, STALE_MS + 1);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn fresh_ids_do_not_repeat() {
        let mut f = Flights::default();
        let a = f.fresh_id(5, 9);
        let b = f.fresh_id(5, 9);
        assert_ne!(a, b);
    }
}
