//! Fleet mode's parsers of what etcd returns: range and txn answers, shared
//! key states, windowed counters (through the sync plan), the bases and the
//! sync status kept in shared data, and the sync lease.
//!
//! The input is one etcd answer. Properties checked, beyond "never panics":
//! - an alert claim counts as created exactly when its txn succeeded;
//! - a txn answer counts as a success only when it says `"succeeded": true`;
//! - a range answer's pairs, replayed as a snapshot, plan a sync whose
//!   counts are never negative or above the cap times the markers read, that
//!   writes at most one marker per counter, all this instance's own, removes
//!   only other instances' markers or its own dropped ones it does not
//!   rewrite, and that plans the same again on the same snapshot with the
//!   bases it left;
//! - shared states, bases and statuses that parse write back to themselves;
//! - the lease never lets two owners hold it at once.
#![no_main]

use apikeyrouter::fleet::{Holder,
    claim_lease, lease_of, parse_claim, parse_range, parse_txn, plan_counters, Bases, Counter, Marker, Op, SharedState, EtcdView, Status,
    MAX_COUNT,
};
use libfuzzer_sys::fuzz_target;
use rust_decimal::Decimal;

fuzz_target!(|data: &[u8]| {
    // An alert claim: created exactly when the txn says it succeeded.
    if let Ok(claim) = parse_claim(data) {
        assert_eq!(claim.is_none(), parse_txn(data) == Ok(true), "{claim:?}");
    }
    if let Ok(true) = parse_txn(data) {
        let v: serde_json::Value = serde_json::from_slice(data).unwrap_or_default();
        assert_eq!(v.get("succeeded").and_then(|s| s.as_bool()), Some(true));
    }
    if let Ok(kvs) = parse_range(data) {
        let counters: Vec<Counter> = kvs
            .iter()
            .filter_map(|kv| kv.key.strip_prefix("/p/m/")?.split_once('/').map(|x| x.1.to_string()))
            .map(|name| Counter {
                name,
                window: 60_000,
                until: 120_000,
                local: Decimal::new(12_345, 3),
                bound: Decimal::from(MAX_COUNT),
            })
            .collect();
        for kv in &kvs {
            if let Some(s) = SharedState::parse(&kv.value) {
                assert_eq!(SharedState::parse(s.to_json().as_bytes()), Some(s));
            }
            if let Some(m) = Marker::parse(&kv.value) {
                assert!(m.value >= Decimal::ZERO && m.value <= Decimal::from(MAX_COUNT));
                assert_eq!(Marker::parse(m.to_json().as_bytes()), Some(m));
            }
        }
        let n = kvs.len();
        let snap = EtcdView::new(kvs);
        let mut bases = Bases::default();
        let plan = plan_counters("/p", "me", 7, &counters, &snap, &mut bases, 100_000);
        let again = plan_counters("/p", "me", 7, &counters, &snap, &mut bases.clone(), 100_000);
        assert_eq!((&plan.syncs, &plan.writes, &plan.deletes), (&again.syncs, &again.writes, &again.deletes));
        let cap = Decimal::from(MAX_COUNT) * Decimal::from(n as u64 + 2);
        for s in &plan.syncs {
            assert!(s.others >= Decimal::ZERO && s.others <= cap, "{s:?}");
        }
        assert!(plan.writes.len() <= counters.len());
        let mut written = Vec::new();
        for w in &plan.writes {
            assert!(matches!(w, Op::Put { key, guard: None, .. } if key.starts_with("/p/m/me/")), "{w:?}");
            if let Op::Put { key, .. } = w {
                written.push(key.clone());
            }
        }
        // Other instances' markers, or one of this instance's own that was
        // dropped (out of bounds) and is not written anew.
        for d in &plan.deletes {
            assert!(matches!(d, Op::Delete { key, .. } if !key.starts_with("/p/m/me/") || !written.contains(key)), "{d:?}");
        }
    }
    if let Some(s) = SharedState::parse(data) {
        assert_eq!(SharedState::parse(s.to_json().as_bytes()), Some(s));
    }
    let b = Bases::decode(Some(data));
    assert_eq!(Bases::decode(Some(&b.encode())), b);
    if let Some(s) = Status::decode(Some(data)) {
        assert_eq!(Status::decode(Some(&s.encode())), Some(s));
    }
    let now = 1_000_000;
    let me = Holder { id: 1, epoch: 5 };
    match claim_lease(Some(data), me, now, 1_000) {
        // Held by another holder of an epoch at least as new, still valid.
        None => assert!(lease_of(Some(data)).is_some_and(|(o, u, e)| o != 1 && u > now && e >= 5)),
        Some(held) => {
            assert_eq!(lease_of(Some(&held)), Some((1, now + 1_000, 5)));
            assert!(claim_lease(Some(&held), Holder { id: 2, epoch: 5 }, now + 999, 1_000).is_none());
        }
    }
});
