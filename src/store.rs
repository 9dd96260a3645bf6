//! The shared store seen by every worker (proxy-wasm shared data), as a small
//! trait, plus the one compare-and-swap helper every state change goes
//! through.
//!
//! Host semantics, mirrored by [`FakeStore`]: a missing key has no cas; a
//! write with no cas is unconditional; a write to a missing key succeeds
//! whatever the cas; otherwise a stale cas gives [`SetError::CasMismatch`].

use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    CasMismatch,
    /// Any other host status; the write did not happen.
    Host,
}

/// The host refused a read (any status other than Ok or NotFound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadError;

pub trait Store {
    /// The value and its cas, `Ok((None, None))` when absent, or an error
    /// when the host could not say (never taken for "absent").
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), ReadError>;
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;

    /// The value, for reads where absent and unreadable mean the same
    /// (showing state, best-effort bookkeeping). Money and key-state
    /// changes go through [`update`], which tells them apart.
    fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.get(key).ok().and_then(|(v, _)| v)
    }
}

/// How many times an update re-decides on a fresh value before giving up.
pub const MAX_CAS_ATTEMPTS: u32 = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateError<E> {
    /// The closure refused the change.
    Rejected(E),
    /// Too many concurrent writers; nothing was written.
    Contended,
    /// The host refused the write.
    Host,
}

/// Statistics of one update, for the CAS-retry metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpdateStats {
    pub conflicts: u32,
}

/// Governor-style read-decide-swap: `f` gets the current bytes (or `None`)
/// and returns a result plus the new bytes, or `Err` to leave the value
/// alone. On a cas conflict it is called again with the fresh value.
pub fn update<T, E>(
    store: &dyn Store,
    key: &str,
    mut f: impl FnMut(Option<&[u8]>) -> Result<(T, Vec<u8>), E>,
) -> (Result<T, UpdateError<E>>, UpdateStats) {
    let mut stats = UpdateStats::default();
    for _ in 0..MAX_CAS_ATTEMPTS {
        let Ok((current, cas)) = store.get(key) else {
            return (Err(UpdateError::Host), stats);
        };
        let (out, new) = match f(current.as_deref()) {
            Ok(v) => v,
            Err(e) => return (Err(UpdateError::Rejected(e)), stats),
        };
        if current.is_none() {
            // Absent: the host inserts whatever the cas, so this first write
            // is unconditional. Records are seeded at configure time (see
            // [`seed`]) so that this only happens for a brand-new name.
            return match store.set(key, &new, None) {
                Ok(()) => (Ok(out), stats),
                Err(_) => (Err(UpdateError::Host), stats),
            };
        }
        match store.set(key, &new, cas) {
            Ok(()) => return (Ok(out), stats),
            Err(SetError::CasMismatch) => stats.conflicts += 1,
            Err(SetError::Host) => return (Err(UpdateError::Host), stats),
        }
    }
    (Err(UpdateError::Contended), stats)
}

/// Writes `value` only when `key` is absent (seeding at configure time).
pub fn seed(store: &dyn Store, key: &str, value: &[u8]) -> Result<(), SetError> {
    match store.get(key) {
        Ok((Some(_), _)) => Ok(()),
        Ok((None, _)) => store.set(key, value, None),
        Err(ReadError) => Err(SetError::Host),
    }
}

/// An in-memory store with the host's cas semantics, for tests.
#[derive(Default)]
pub struct FakeStore {
    inner: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: RefCell<u32>,
}

impl FakeStore {
    pub fn new() -> FakeStore {
        FakeStore::default()
    }
}

impl Store for FakeStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), ReadError> {
        Ok(match self.inner.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        let mut inner = self.inner.borrow_mut();
        if let (Some(want), Some((_, have))) = (cas, inner.get(key)) {
            if want != *have {
                return Err(SetError::CasMismatch);
            }
        }
        let mut next = self.next_cas.borrow_mut();
        *next = next.wrapping_add(1).max(1);
        inner.insert(key.to_string(), (value.to_vec(), *next));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_one(cur: Option<&[u8]>) -> Result<(u64, Vec<u8>), ()> {
        let v = cur.map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_else(|e| panic!("{e}: {b:?}")))) + 1;
        Ok((v, v.to_le_bytes().to_vec()))
    }

    #[test]
    fn fake_store_behaves_like_envoy_shared_data() {
        let s = FakeStore::new();
        assert_eq!(s.get("k"), Ok((None, None)));
        assert_eq!(s.set("k", b"a", Some(999)), Ok(()), "first insert ignores cas");
        let (_, cas) = s.get("k").unwrap_or_else(|e| panic!("{e:?}"));
        let cas = cas.unwrap_or_else(|| panic!("no cas for a stored value"));
        assert_eq!(s.set("k", b"b", Some(cas + 1)), Err(SetError::CasMismatch));
        assert_eq!(s.set("k", b"c", Some(cas)), Ok(()));
        assert_eq!(s.set("k", b"d", None), Ok(()), "no cas is unconditional");
        assert_eq!(s.value("k").as_deref(), Some(&b"d"[..]));
    }

    #[test]
    fn update_applies_the_change_exactly_once_on_absent_and_present_keys() {
        let s = FakeStore::new();
        for want in 1..=5u64 {
            let (r, _) = update(&s, "ctr", add_one);
            assert_eq!(r, Ok(want));
        }
    }

    /// A store that lets another writer sneak in between a get and a set.
    struct Racy<'a> {
        inner: &'a FakeStore,
        interleave: RefCell<u32>,
    }

    impl Store for Racy<'_> {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), ReadError> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            if *self.interleave.borrow() > 0 {
                *self.interleave.borrow_mut() -= 1;
                // The other updater commits first.
                let (r, _) = update(self.inner, key, add_one);
                assert!(r.is_ok());
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn interleaved_updaters_conflict_and_lose_no_increment() {
        let s = FakeStore::new();
        let _ = update(&s, "ctr", add_one);
        let racy = Racy { inner: &s, interleave: RefCell::new(3) };
        let (r, stats) = update(&racy, "ctr", add_one);
        assert_eq!(stats.conflicts, 3);
        assert_eq!(r, Ok(5), "1 + 3 interleaved + this one");
        let v = s.value("ctr").and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        assert_eq!(v, Some(5));
    }

    #[test]
    fn endless_contention_gives_up_without_writing() {
        let s = FakeStore::new();
        let _ = update(&s, "ctr", add_one);
        let racy = Racy { inner: &s, interleave: RefCell::new(u32::MAX) };
        let (r, stats) = update(&racy, "ctr", add_one);
        assert_eq!(r, Err(UpdateError::Contended));
        assert_eq!(stats.conflicts, MAX_CAS_ATTEMPTS);
    }

    #[test]
    fn a_rejecting_closure_writes_nothing() {
        let s = FakeStore::new();
        let (r, _) = update(&s, "k", |_| Err::<((), Vec<u8>), _>("no"));
        assert_eq!(r, Err(UpdateError::Rejected("no")));
        assert_eq!(s.get("k"), Ok((None, None)));
    }

    #[test]
    fn seed_never_overwrites() {
        let s = FakeStore::new();
        assert_eq!(seed(&s, "k", b"zero"), Ok(()));
        let _ = s.set("k", b"live", None);
        assert_eq!(seed(&s, "k", b"zero"), Ok(()));
        assert_eq!(s.value("k").as_deref(), Some(&b"live"[..]));
    }
}
