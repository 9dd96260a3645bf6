//! Key-state changes: what a response does to its key (cooldown, disable,
//! exhaustion, counters), fleet merges and admin changes, each one
//! compare-and-swap on the key's record.

use super::read_record;
use crate::config::{Config, StatusAction};
use crate::key_record::{Capacity, DecodeError, Effective, KeyRecord, KeyState, Outcome, Reason};
use crate::quota::headroom;
use crate::store::{update, Store, UpdateError, UpdateStats};
use crate::window::Window;

/// What a response did to a key, beyond the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction {
    Nothing,
    CoolUntil(u64),
    Disable(Reason),
    Exhaust(Reason),
}

impl KeyAction {
    /// The concrete action for a configured one; `cooldown_until_ms` is
    /// used by `cooldown`.
    pub fn from_config(a: StatusAction, reason: Reason, cooldown_until_ms: u64) -> KeyAction {
        match a {
            StatusAction::Cooldown => KeyAction::CoolUntil(cooldown_until_ms),
            StatusAction::Disable => KeyAction::Disable(reason),
            StatusAction::Exhaust => KeyAction::Exhaust(reason),
            StatusAction::Nothing => KeyAction::Nothing,
        }
    }
}

/// When an exhausted key comes back: the next reset of its longest
/// configured token quota window, or the next UTC midnight.
pub fn exhausted_until(cfg: &Config, k: usize, now_ms: u64) -> u64 {
    match cfg.keys.get(k).map(|key| key.limits) {
        Some(l) if l.monthly_tokens.is_some() => Window::Month.next_start(now_ms),
        _ => Window::Day.next_start(now_ms),
    }
}

/// The result of recording an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub record: KeyRecord,
    /// The key's state and capacity before this attempt was recorded.
    pub before: (Effective, Capacity),
    /// The key's eligibility or capacity class changed: other workers were
    /// told through the generation counter.
    pub changed: bool,
}

/// Records a finished attempt and applies `action`, then tells every worker
/// when the key's eligibility or capacity class changed.
pub fn record_attempt(
    store: &dyn Store,
    cfg: &Config,
    k: usize,
    outcome: &Outcome,
    signals: Option<&crate::ratelimit::Signals<'_>>,
    action: KeyAction,
    now_ms: u64,
) -> (Result<Recorded, UpdateError<DecodeError>>, UpdateStats) {
    let Some(key) = cfg.keys.get(k) else {
        return (Err(UpdateError::Host), UpdateStats::default());
    };
    let (r, mut stats) = update(store, &key.record_name, |cur| {
        let mut rec = match cur {
            None => KeyRecord::default(),
            Some(b) => KeyRecord::decode(b)?,
        };
        let before = (rec.effective(now_ms), rec.capacity);
        rec.record(outcome, now_ms, cfg.routing.reliability_window_ms);
        if let Some(s) = signals {
            rec.learn_limits(s, now_ms);
        }
        let mut changed = false;
        match action {
            KeyAction::Nothing => {}
            KeyAction::CoolUntil(until) => changed |= rec.cool_until(until),
            KeyAction::Disable(reason) => {
                if rec.state != KeyState::Disabled {
                    rec.state_at_ms = now_ms.max(rec.state_at_ms.saturating_add(1));
                    changed = true;
                }
                rec.state = KeyState::Disabled;
                rec.reason = reason;
            }
            KeyAction::Exhaust(reason) => {
                if rec.state == KeyState::Available {
                    rec.state = KeyState::Exhausted;
                    rec.reason = reason;
                    rec.exhausted_until_ms = exhausted_until(cfg, k, now_ms);
                    rec.state_at_ms = now_ms.max(rec.state_at_ms.saturating_add(1));
                    changed = true;
                }
            }
        }
        rec.capacity = headroom(&rec, &key.limits, &cfg.routing.thresholds, now_ms).capacity;
        changed |= before != (rec.effective(now_ms), rec.capacity);
        Ok((Recorded { record: rec, before, changed }, rec.encode()))
    });
    if let Ok(Recorded { changed: true, .. }) = r {
        stats.conflicts += crate::shared_data::bump_generation(store).conflicts;
    }
    (r, stats)
}

/// Fleet mode: merges the fleet's state of a key and the tokens the other
/// instances spent with it (`(window start, tokens)` for the UTC day and
/// month) into its record. Returns the record before and after; tells every
/// worker when the key's state changed.
pub fn apply_fleet(
    store: &dyn Store,
    name: &str,
    shared: Option<&crate::fleet::SharedState>,
    day: Option<(u64, u64)>,
    month: Option<(u64, u64)>,
    now_ms: u64,
) -> Result<(KeyRecord, KeyRecord), UpdateError<DecodeError>> {
    let merge = |before: KeyRecord| {
        let mut rec = before;
        if let Some(s) = shared {
            crate::fleet::merge_state(&mut rec, s);
        }
        if let Some((start, tokens)) = day {
            (rec.fleet_day_start_ms, rec.fleet_day_tokens) = (start, tokens);
        }
        if let Some((start, tokens)) = month {
            (rec.fleet_month_start_ms, rec.fleet_month_tokens) = (start, tokens);
        }
        rec
    };
    // Most syncs change nothing: no write (and no CAS against requests).
    let now = read_record(store, name).map_err(UpdateError::Rejected)?;
    if merge(now) == now {
        return Ok((now, now));
    }
    let (r, _) = update(store, name, |cur| {
        let before = match cur {
            None => KeyRecord::default(),
            Some(b) => KeyRecord::decode(b)?,
        };
        let rec = merge(before);
        Ok(((before, rec), rec.encode()))
    });
    if let Ok((before, after)) = &r {
        // Token counts need no announcement: a key with quotas is checked
        // against its fresh record when chosen.
        if before.effective(now_ms) != after.effective(now_ms) {
            crate::shared_data::bump_generation(store);
        }
    }
    r
}

/// Claims the half-open probe of a disabled key: when it is due (see
/// [`KeyRecord::probe_due`]), restarts its clock so that no other request,
/// on any worker, probes it before `after_ms` have passed again. True when
/// this request is the probe, with the record as it now stands (to
/// refresh the caller's snapshot either way).
pub fn claim_probe(store: &dyn Store, name: &str, after_ms: u64, now_ms: u64) -> (bool, Option<KeyRecord>) {
    let mut seen = None;
    let (r, _) = update(store, name, |cur| {
        let Some(Ok(mut rec)) = cur.map(KeyRecord::decode) else {
            return Err(());
        };
        seen = Some(rec);
        if !rec.probe_due(now_ms, after_ms) {
            return Err(());
        }
        rec.state_at_ms = now_ms.max(rec.state_at_ms.saturating_add(1));
        seen = Some(rec);
        Ok(((), rec.encode()))
    });
    (r.is_ok(), seen)
}

/// A half-open probe's answer showed the key works: it serves again. Never
/// over an admin's disable; stamped just after the probe's claim (which set
/// `state_at_ms`), so that in fleet mode an admin's change made elsewhere
/// after the probe began still wins. The record before and after, when it
/// changed.
pub fn reenable(store: &dyn Store, name: &str) -> Option<(KeyRecord, KeyRecord)> {
    let (r, _) = update(store, name, |cur| {
        let Some(Ok(before)) = cur.map(KeyRecord::decode) else {
            return Err(());
        };
        if before.state != KeyState::Disabled || matches!(before.reason, Reason::Admin | Reason::None) {
            return Err(());
        }
        let mut rec = before;
        rec.state = KeyState::Available;
        rec.reason = Reason::Probe;
        rec.state_at_ms = rec.state_at_ms.saturating_add(1);
        Ok(((before, rec), rec.encode()))
    });
    let changed = r.ok()?;
    crate::shared_data::bump_generation(store);
    Some(changed)
}

/// A state change requested through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetState {
    Available,
    Disabled,
    Throttled { until_ms: u64 },
}

/// Applies an administrative state change and tells every worker. The
/// change is stamped `now_ms`, so that in fleet mode it wins over older
/// states of other instances.
pub fn set_state(
    store: &dyn Store,
    name: &str,
    to: SetState,
    now_ms: u64,
) -> Result<KeyRecord, UpdateError<DecodeError>> {
    let (r, _) = update(store, name, |cur| {
        let mut rec = match cur {
            None => KeyRecord::default(),
            Some(b) => KeyRecord::decode(b)?,
        };
        // Later than any change this record has seen, even with skewed clocks.
        rec.state_at_ms = now_ms.max(rec.state_at_ms.saturating_add(1));
        match to {
            SetState::Available => {
                // `Admin` marks the reset that clears cooldowns fleet-wide.
                rec.state = KeyState::Available;
                rec.reason = Reason::Admin;
                rec.cooldown_until_ms = 0;
                rec.exhausted_until_ms = 0;
            }
            SetState::Disabled => {
                rec.state = KeyState::Disabled;
                rec.reason = Reason::Admin;
            }
            SetState::Throttled { until_ms } => {
                rec.cooldown_until_ms = until_ms;
                rec.cooldowns += 1;
            }
        }
        Ok((rec, rec.encode()))
    });
    if r.is_ok() {
        crate::shared_data::bump_generation(store);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_record::*;
    use crate::keys::test_support::*;
    use crate::keys::{check, Snapshot};
    use crate::store::FakeStore;

    #[test]
    fn a_fleet_sync_that_brings_nothing_new_does_not_write_the_record() {
        let store = FakeStore::new();
        let shared = crate::fleet::SharedState {
            cooldown_until_ms: 9_000,
            state: KeyState::Available,
            reason: Reason::Status,
            exhausted_until_ms: 0,
            at_ms: 0,
            by: "b".into(),
        };
        let first = apply_fleet(&store, "rec", Some(&shared), Some((5, 7)), None, 1_000);
        assert_eq!(first.map(|(_, after)| (after.cooldown_until_ms, after.fleet_day_tokens)), Ok((9_000, 7)));
        let cas = store.get("rec").map(|e| e.1);
        let gen = crate::shared_data::read_u64(&store, crate::shared_data::GENERATION);
        let again = apply_fleet(&store, "rec", Some(&shared), Some((5, 7)), None, 1_000);
        assert_eq!(again.map(|(before, after)| before == after), Ok(true));
        assert_eq!(store.get("rec").map(|e| e.1), cas, "not written again");
        assert_eq!(crate::shared_data::read_u64(&store, crate::shared_data::GENERATION), gen);
    }

    #[test]
    fn a_shorter_cooldown_keeps_the_longer_one_and_does_not_bump() {
        let c = cfg(&[1]);
        let store = FakeStore::new();
        let limited = Outcome { status: 429, ..Outcome::default() };
        let (r, _) = record_attempt(&store, &c, 0, &limited, None, KeyAction::CoolUntil(10_000), 0);
        assert_eq!(r.map(|r| (r.record.cooldown_until_ms, r.changed)), Ok((10_000, true)));
        let gen = crate::shared_data::read_u64(&store, crate::shared_data::GENERATION);
        let (r, _) = record_attempt(&store, &c, 0, &limited, None, KeyAction::CoolUntil(6_000), 0);
        assert_eq!(r.map(|r| (r.record.cooldown_until_ms, r.changed)), Ok((10_000, false)));
        assert_eq!(crate::shared_data::read_u64(&store, crate::shared_data::GENERATION), gen);
        let rec = read_record(&store, &c.keys[0].record_name);
        assert_eq!(rec.map(|r| (r.requests, r.rate_limited, r.cooldowns)), Ok((2, 2, 1)));
    }

    #[test]
    fn disable_and_exhaust_actions_change_state_until_reenabled_or_reset() {
        let c = cfg_with(&["", r#","limits":{"monthly_tokens":1000}"#], "");
        let store = FakeStore::new();
        let o = Outcome { status: 401, ..Outcome::default() };
        let (r, _) = record_attempt(&store, &c, 0, &o, None, KeyAction::Disable(Reason::Unauthorized), 0);
        assert_eq!(r.map(|r| (r.record.effective(u64::MAX), r.changed)), Ok((Effective::Disabled, true)));
        let day = 86_400_000;
        let o = Outcome { status: 402, ..Outcome::default() };
        let (r, _) = record_attempt(&store, &c, 1, &o, None, KeyAction::Exhaust(Reason::PaymentRequired), 3 * day);
        assert_eq!(r.map(|r| r.record.effective(3 * day)), Ok(Effective::Exhausted { until_ms: 31 * day }));
        assert_eq!(exhausted_until(&c, 0, 3 * day), 4 * day);
        let back = set_state(&store, &c.keys[0].record_name, SetState::Available, 5);
        assert_eq!(back.map(|r| r.effective(0)), Ok(Effective::Available));
    }

    #[test]
    fn capacity_class_change_bumps_the_generation() {
        let c = cfg_with(&[r#","limits":{"rpm":4}"#], "");
        let store = FakeStore::new();
        let ok = Outcome { status: 200, ..Outcome::default() };
        let mut changes = vec![];
        for _ in 0..4 {
            let (r, _) = record_attempt(&store, &c, 0, &ok, None, KeyAction::Nothing, 1_000);
            changes.push(r.map(|r| (r.record.capacity, r.changed)).ok());
        }
        use Capacity::*;
        assert_eq!(
            changes,
            vec![
                Some((Abundant, false)),
                Some((Constrained, true)),
                Some((Constrained, false)),
                Some((Exhausted, true))
            ]
        );
        assert!(check(
            &c,
            0,
            &mut Snapshot::of(vec![read_record(&store, &c.keys[0].record_name).unwrap_or_else(|e| panic!("{e}"))]),
            1_000
        )
        .is_err());
        assert!(check(
            &c,
            0,
            &mut Snapshot::of(vec![read_record(&store, &c.keys[0].record_name).unwrap_or_else(|e| panic!("{e}"))]),
            60_000
        )
        .is_ok());
    }
}
