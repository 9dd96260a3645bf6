//! Shared data: the name of every record the filter keeps there, and the
//! `u64` counters several modules share. Every name starts with `akr.v1.`;
//! records are scoped by Envoy to one `vm_id` in one process.
//!
//! | name | holds | written by |
//! |---|---|---|
//! | `akr.v1.gen` | the key-state generation | every key-state change |
//! | `akr.v1.key.<provider>.<key>` | a key's [`KeyRecord`](crate::key_record::KeyRecord) | attempts, admin, fleet |
//! | `akr.v1.budget.<id>` | a budget's [`BudgetRecord`](crate::budget::BudgetRecord) | admission, settlement |
//! | `akr.v1.client.<id>` | a client's per-minute usage | ingress, attempts |
//! | `akr.v1.runtime_keys`, `.changes` | keys registered at runtime, and its change counter | admin |
//! | `akr.v1.dec.workers`, `akr.v1.dec.<worker>.<slot>` | decision ring owners and slots | attempt stage's tick |
//! | `akr.v1.tr.head`, `akr.v1.tr.<n>` | the transition ring | state changes |
//! | `akr.v1.fleet.*` | fleet mode's lease, status, counter bases, life and epoch; `.limits.<budget>`: a limit override and its time | the fleet sync; `.limits`: admin, fleet sync |

use crate::store::{update, Store, UpdateStats};

/// The state generation: moves whenever a key's eligibility changes.
pub const GENERATION: &str = "akr.v1.gen";
/// Keys registered at runtime (one JSON record).
pub const RUNTIME_KEYS: &str = "akr.v1.runtime_keys";
/// Counts changes to [`RUNTIME_KEYS`].
pub const RUNTIME_KEYS_CHANGES: &str = "akr.v1.runtime_keys.changes";
/// Hands out decision rings, one per attempt-stage VM.
pub const DECISION_WORKERS: &str = "akr.v1.dec.workers";
/// The transition ring's next slot.
pub const TRANSITIONS_HEAD: &str = "akr.v1.tr.head";
pub const FLEET_LEASE: &str = "akr.v1.fleet.lease";
pub const FLEET_STATUS: &str = "akr.v1.fleet.status";
/// Prefix of each instance's counter bases (`.<instance>` follows).
pub const FLEET_BASES: &str = "akr.v1.fleet.bases";
/// This process's life nonce: written once per process.
pub const FLEET_LIFE: &str = "akr.v1.fleet.life";
/// Root contexts started in this process: the lease epoch.
pub const FLEET_EPOCH: &str = "akr.v1.fleet.epoch";
/// Prefix of each budget's limit override set on this process, with its
/// time (`.<budget>` follows): what the fleet sync keeps in etcd.
pub const FLEET_LIMITS: &str = "akr.v1.fleet.limits";
/// Records read from etcd that were refused and reported (a ring of tags).
pub const FLEET_REPORTED: &str = "akr.v1.fleet.reported";

pub fn key_record(provider: &str, key: &str) -> String {
    format!("akr.v1.key.{provider}.{key}")
}

pub fn budget_record(id: &str) -> String {
    format!("akr.v1.budget.{id}")
}

pub fn client_record(id: &str) -> String {
    format!("akr.v1.client.{id}")
}

pub fn decision_slot(worker: u64, slot: usize) -> String {
    format!("akr.v1.dec.{worker}.{slot}")
}

pub fn transition_slot(i: u64) -> String {
    format!("akr.v1.tr.{i}")
}

/// A shared `u64` counter's value (0 when absent or unreadable).
pub fn read_u64(store: &dyn Store, name: &str) -> u64 {
    store.value(name).and_then(|b| b.as_slice().try_into().ok()).map(u64::from_le_bytes).unwrap_or(0)
}

/// Adds one to a shared `u64` counter; returns the new value.
pub fn increment(store: &dyn Store, name: &str) -> (Option<u64>, UpdateStats) {
    let (r, stats) = update(store, name, |cur| {
        let v = cur.and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(0).wrapping_add(1);
        Ok::<_, ()>((v, v.to_le_bytes().to_vec()))
    });
    (r.ok(), stats)
}

thread_local! {
    /// Generation bumps made from this VM (this worker thread).
    static LOCAL_BUMPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Announces a key-state change to every worker.
pub fn bump_generation(store: &dyn Store) -> UpdateStats {
    LOCAL_BUMPS.with(|b| b.set(b.get().wrapping_add(1)));
    increment(store, GENERATION).1
}

/// How many times this VM has bumped the generation: a snapshot that read
/// the generation in this millisecond needs no second read unless this
/// changed (another worker's change may then wait up to a millisecond).
pub fn local_bumps() -> u64 {
    LOCAL_BUMPS.with(|b| b.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FakeStore;

    #[test]
    fn counters_start_at_zero_and_count_up() {
        let s = FakeStore::new();
        assert_eq!(read_u64(&s, GENERATION), 0);
        assert_eq!(increment(&s, GENERATION).0, Some(1));
        bump_generation(&s);
        assert_eq!(read_u64(&s, GENERATION), 2);
    }

    #[test]
    fn every_name_is_under_the_versioned_prefix() {
        for n in [key_record("p", "k"), budget_record("b"), client_record("c"), decision_slot(1, 2), transition_slot(3)]
        {
            assert!(n.starts_with("akr.v1."), "{n}");
        }
    }
}
