//! The per-VM snapshot of every key's record and each key's evaluation:
//! whether it can serve now, until when, and with how much room.

use super::read_record;
use crate::config::Config;
use crate::decision::{Decision, Exclusion};
use crate::key_record::{Capacity, Effective, KeyRecord};
use crate::quota::headroom;
use crate::store::Store;
use crate::window::Window;

/// Per-VM copy of every key's record, with each key's evaluation cached
/// until the next instant it can change (a cooldown's end, a quota window's
/// roll-over, a provider reset, or the next statistics refresh). Choosing
/// then costs a few comparisons per key.
#[derive(Debug, Default)]
pub struct Snapshot {
    gen: Option<u64>,
    /// When the generation was last read, and this VM's bumps then.
    gen_read_ms: u64,
    local_bumps: u64,
    loaded_ms: u64,
    pub records: Vec<KeyRecord>,
    pub(super) evals: Vec<Eval>,
    /// Per provider: which keys can serve, which are Critical, which are
    /// left out and why. Rebuilt only when some key's standing changes or an
    /// evaluation expires, so choosing does not scan every key.
    pub(super) views: Vec<View>,
    views_until_ms: u64,
    views_dirty: bool,
}

pub use crate::decision::MAX_LISTED;

/// A provider's keys sorted by standing, at an instant.
#[derive(Debug, Clone, Default)]
pub(super) struct View {
    /// Not excluded and not Critical, in configuration order.
    pub(super) eligible: Vec<usize>,
    pub(super) critical: Vec<usize>,
    /// The first [`MAX_LISTED`] exclusions, and how many there are.
    pub(super) excluded: Vec<(usize, Exclusion, u64)>,
    pub(super) excluded_total: usize,
    /// Counts and earliest recovery, for a refusal.
    pub(super) none: NoKey,
    /// Every serving key has the same weight (round-robin suffices).
    pub(super) equal_weights: bool,
}

/// What a key's record means for choosing, at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Eval {
    /// Why the key cannot serve, and until when (0: open-ended).
    pub excluded: Option<(Exclusion, u64)>,
    pub capacity: Capacity,
    pub headroom: f64,
    pub reliability: f64,
    pub latency_us: Option<u64>,
    /// The evaluation holds before this instant.
    pub valid_until_ms: u64,
}

/// Evaluates key `k`'s record at `now_ms`.
pub fn evaluate(cfg: &Config, k: usize, r: &KeyRecord, now_ms: u64) -> Eval {
    let mut until = now_ms.saturating_add(cfg.routing.stats_refresh_ms.max(1));
    let mut soon = |t: u64| {
        if t > now_ms {
            until = until.min(t);
        }
    };
    soon(r.cooldown_until_ms);
    soon(r.exhausted_until_ms);
    soon(r.provider.reset_requests_ms);
    soon(r.provider.reset_tokens_ms);
    let limits = cfg.keys.get(k).map(|key| key.limits).unwrap_or_default();
    if limits.rpm.is_some() || limits.tpm.is_some() {
        soon(Window::Minute.next_start(now_ms));
    }
    if limits.daily_tokens.is_some() {
        soon(Window::Day.next_start(now_ms));
    }
    if limits.monthly_tokens.is_some() {
        soon(Window::Month.next_start(now_ms));
    }
    let h = headroom(r, &limits, &cfg.routing.thresholds, now_ms);
    let excluded = match r.effective(now_ms) {
        Effective::Available if h.capacity == Capacity::Exhausted => Some((Exclusion::QuotaExhausted, h.resets_at_ms)),
        Effective::Available => None,
        Effective::Throttled { until_ms } => Some((Exclusion::Throttled, until_ms)),
        Effective::Disabled => Some((Exclusion::Disabled, 0)),
        Effective::Exhausted { until_ms } => Some((Exclusion::Exhausted, until_ms)),
    };
    Eval {
        excluded,
        capacity: h.capacity,
        headroom: h.fraction,
        reliability: r.reliability(now_ms, cfg.routing.reliability_window_ms),
        latency_us: (r.latency_samples > 0).then_some(r.latency_us),
        valid_until_ms: until,
    }
}

impl Snapshot {
    /// Brings the snapshot up to date; returns whether it reloaded.
    ///
    /// The generation is read at most once a millisecond: requests that
    /// arrive together share the read, unless this VM changed a key since
    /// (other workers' changes reach it within the millisecond).
    pub fn refresh(&mut self, store: &dyn Store, cfg: &Config, now_ms: u64) -> bool {
        let fresh = now_ms.saturating_sub(self.loaded_ms) < cfg.routing.stats_refresh_ms;
        let bumps = crate::shared_data::local_bumps();
        let whole = self.records.len() == cfg.keys.slots();
        if self.gen.is_some() && self.gen_read_ms == now_ms && self.local_bumps == bumps && fresh && whole {
            return false;
        }
        let gen = crate::shared_data::read_u64(store, crate::shared_data::GENERATION);
        self.gen_read_ms = now_ms;
        self.local_bumps = bumps;
        if self.gen == Some(gen) && fresh && self.records.len() == cfg.keys.slots() {
            return false;
        }
        self.records = (0..cfg.keys.slots())
            .map(|k| match cfg.keys.get(k).map(|key| (key, read_record(store, &key.record_name))) {
                None => KeyRecord::default(),
                Some((_, Ok(r))) => r,
                Some((key, Err(e))) => {
                    log::warn!("key {}: state record unreadable ({e}); treating as fresh", key.id);
                    KeyRecord::default()
                }
            })
            .collect();
        self.evals = vec![Eval::default(); self.records.len()];
        self.views_dirty = true;
        self.gen = Some(gen);
        self.loaded_ms = now_ms;
        true
    }

    /// A snapshot of the given records (tests, and the admin API).
    pub fn of(records: Vec<KeyRecord>) -> Snapshot {
        let evals = vec![Eval::default(); records.len()];
        Snapshot { records, evals, views_dirty: true, ..Snapshot::default() }
    }

    /// Takes a record this VM just wrote, without waiting for a reload.
    pub fn observe(&mut self, cfg: &Config, key: usize, rec: KeyRecord, now_ms: u64) {
        let (Some(slot), Some(e)) = (self.records.get_mut(key), self.evals.get_mut(key)) else { return };
        *slot = rec;
        let new = evaluate(cfg, key, &rec, now_ms);
        let standing = |e: &Eval| (e.excluded.map(|x| x.0), e.capacity == Capacity::Critical);
        if standing(e) != standing(&new) {
            self.views_dirty = true;
        }
        *e = new;
        self.views_until_ms = self.views_until_ms.min(new.valid_until_ms);
    }

    /// Rebuilds the provider views when they may be out of date.
    pub(super) fn ensure_views(&mut self, cfg: &Config, now_ms: u64) {
        if !self.views_dirty && now_ms < self.views_until_ms && self.views.len() == cfg.providers.len() {
            return;
        }
        let mut until = u64::MAX;
        let mut views = Vec::with_capacity(cfg.providers.len());
        for p in &cfg.providers {
            let mut v = View { equal_weights: true, ..View::default() };
            let mut weight = None;
            for &k in &p.keys {
                let e = self.eval(cfg, k, now_ms);
                until = until.min(e.valid_until_ms);
                match e.excluded {
                    Some((why, recovers)) => {
                        v.none.count(why, recovers);
                        v.excluded_total += 1;
                        if v.excluded.len() < MAX_LISTED {
                            v.excluded.push((k, why, recovers));
                        }
                    }
                    None => {
                        let w = cfg.keys.get(k).map_or(1, |key| key.weight);
                        v.equal_weights &= weight.is_none_or(|x| x == w);
                        weight = Some(w);
                        if e.capacity == Capacity::Critical {
                            v.critical.push(k);
                        } else {
                            v.eligible.push(k);
                        }
                    }
                }
            }
            views.push(v);
        }
        self.views = views;
        self.views_until_ms = until;
        self.views_dirty = false;
    }

    /// Key `k`'s evaluation at `now_ms`, recomputed only when it expired.
    pub fn eval(&mut self, cfg: &Config, k: usize, now_ms: u64) -> Eval {
        if self.evals.len() != self.records.len() {
            self.evals = vec![Eval::default(); self.records.len()];
        }
        match (self.evals.get_mut(k), self.records.get(k)) {
            (Some(e), Some(r)) => {
                if now_ms >= e.valid_until_ms {
                    *e = evaluate(cfg, k, r, now_ms);
                }
                *e
            }
            _ => evaluate(cfg, k, &KeyRecord::default(), now_ms),
        }
    }
}

/// Why no key could be chosen.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NoKey {
    pub throttled: usize,
    pub disabled: usize,
    pub exhausted: usize,
    pub constrained_out: usize,
    /// The earliest instant a key becomes available again.
    pub earliest_recovery_ms: Option<u64>,
    pub decision: Option<Box<Decision>>,
}

impl NoKey {
    /// Seconds until the earliest recovery, rounded up, at least 1.
    pub fn retry_after_secs(&self, now_ms: u64) -> u64 {
        match self.earliest_recovery_ms {
            Some(t) => t.saturating_sub(now_ms).div_ceil(1000).max(1),
            None => 60,
        }
    }

    pub fn explain(&self, provider: &str) -> String {
        let mut s = format!(
            "No API key of provider '{provider}' is available right now: {} cooling down after rate limits, {} disabled, {} exhausted",
            self.throttled, self.disabled, self.exhausted
        );
        if self.constrained_out > 0 {
            s.push_str(&format!(", {} outside the objective's constraints", self.constrained_out));
        }
        s.push('.');
        s
    }

    pub(crate) fn count(&mut self, why: Exclusion, until: u64) {
        match why {
            Exclusion::Throttled => self.throttled += 1,
            Exclusion::Disabled => self.disabled += 1,
            _ => self.exhausted += 1,
        }
        if until > 0 {
            self.earliest_recovery_ms = Some(self.earliest_recovery_ms.map_or(until, |t| t.min(until)));
        }
    }
}

/// True when a key chosen from the snapshot turns out, on its fresh record,
/// to be unavailable or to have dropped to Critical capacity: the choice must
/// be made again. This keeps quotas and states exact at the moment of
/// choosing, even though the snapshot of other keys may be up to
/// `stats_refresh_ms` old.
pub fn stale_choice(cfg: &Config, k: usize, snap: &KeyRecord, fresh: &KeyRecord, now_ms: u64) -> bool {
    let now = evaluate(cfg, k, fresh, now_ms);
    if now.excluded.is_some() {
        return true;
    }
    now.capacity == Capacity::Critical && evaluate(cfg, k, snap, now_ms).capacity != Capacity::Critical
}

impl Snapshot {
    /// A key of `provider`, not in `tried`, that a provider's answer
    /// disabled long enough ago (`probe_disabled_after_ms`) to be given one
    /// real request again, as far as this snapshot knows; the probe is only
    /// made by whoever claims it ([`super::claim_probe`]).
    pub fn due_probe(&mut self, cfg: &Config, provider: usize, tried: &[usize], now_ms: u64) -> Option<usize> {
        let after = cfg.probe_disabled_after_ms;
        if after == 0 {
            return None;
        }
        // Only a provider with a disabled key pays for the scan.
        self.ensure_views(cfg, now_ms);
        if self.views.get(provider).is_none_or(|v| v.none.disabled == 0) {
            return None;
        }
        cfg.keys.live().map(|(k, _)| k).find(|&k| {
            cfg.keys.get(k).is_some_and(|key| key.provider == provider)
                && !tried.contains(&k)
                && self.records.get(k).is_some_and(|r| r.probe_due(now_ms, after))
        })
    }
}

/// `Ok` when some key of `provider` can serve at `now_ms`, otherwise why not.
/// Used to refuse a request before any upstream attempt.
/// A key whose half-open probe is due counts: the request may be the probe.
pub fn check(cfg: &Config, provider: usize, snap: &mut Snapshot, now_ms: u64) -> Result<(), NoKey> {
    snap.ensure_views(cfg, now_ms);
    let none_left = snap.views.get(provider).map(|v| v.eligible.is_empty() && v.critical.is_empty());
    if none_left == Some(true) && snap.due_probe(cfg, provider, &[], now_ms).is_some() {
        return Ok(());
    }
    match snap.views.get(provider) {
        Some(v) if v.eligible.is_empty() && v.critical.is_empty() => Err(v.none.clone()),
        Some(_) => Ok(()),
        None => Err(NoKey::default()),
    }
}

/// The keys of `provider` outside `group` (empty: the default group).
pub fn outside_group(cfg: &Config, provider: usize, group: &str) -> Vec<usize> {
    let Some(p) = cfg.providers.get(provider) else { return Vec::new() };
    p.keys.iter().copied().filter(|&k| cfg.keys.get(k).is_none_or(|key| key.group_name() != group)).collect()
}

/// As [`check`], for the keys of `provider` not in `outside`: why none of
/// them can serve counts only them.
pub fn check_within(
    cfg: &Config,
    provider: usize,
    outside: &[usize],
    snap: &mut Snapshot,
    now_ms: u64,
) -> Result<(), NoKey> {
    if outside.is_empty() {
        return check(cfg, provider, snap, now_ms);
    }
    snap.ensure_views(cfg, now_ms);
    let inside = |k: &usize| !outside.contains(k);
    if snap.views.get(provider).is_some_and(|v| v.eligible.iter().any(inside) || v.critical.iter().any(inside)) {
        return Ok(());
    }
    if snap.due_probe(cfg, provider, outside, now_ms).is_some() {
        return Ok(());
    }
    let mut none = NoKey::default();
    let keys: Vec<usize> = cfg.providers.get(provider).map(|p| p.keys.clone()).unwrap_or_default();
    for k in keys.into_iter().filter(inside) {
        if let Some((why, until)) = snap.eval(cfg, k, now_ms).excluded {
            none.count(why, until);
        }
    }
    Err(none)
}

/// Whether a key of `provider` the request has not tried (`tried`) may
/// still serve it now: an available key, or a disabled one due for its
/// half-open probe. Budgets scoped to a key are not checked here.
pub fn untried_left(cfg: &Config, provider: usize, snap: &mut Snapshot, now_ms: u64, tried: &[usize]) -> bool {
    snap.ensure_views(cfg, now_ms);
    let fresh = |k: &usize| !tried.contains(k);
    let listed = snap.views.get(provider).is_some_and(|v| v.eligible.iter().any(fresh) || v.critical.iter().any(fresh));
    listed || snap.due_probe(cfg, provider, tried, now_ms).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_record::*;
    use crate::keys::test_support::*;
    use crate::keys::*;
    use crate::store::FakeStore;
    use crate::usage::Usage;

    #[test]
    fn a_choice_is_stale_when_the_fresh_record_says_unavailable_or_critical() {
        let c = cfg_with(&[r#","limits":{"rpm":10}"#], "");
        let snap = KeyRecord::default();
        assert!(!stale_choice(&c, 0, &snap, &snap, 0));
        let cooling = KeyRecord { cooldown_until_ms: 10, ..KeyRecord::default() };
        assert!(stale_choice(&c, 0, &snap, &cooling, 0));
        let mut busy = KeyRecord::default();
        for _ in 0..9 {
            busy.record(&Outcome { status: 200, ..Outcome::default() }, 0, 1);
        }
        assert!(stale_choice(&c, 0, &snap, &busy, 0), "critical now, not in the snapshot");
        assert!(!stale_choice(&c, 0, &busy, &busy, 0), "already known critical: chosen knowingly");
    }

    #[test]
    fn snapshot_reloads_on_generation_change_or_when_stale() {
        let c = cfg(&[1, 1]);
        let store = FakeStore::new();
        let mut snap = Snapshot::default();
        assert!(snap.refresh(&store, &c, 0));
        assert!(!snap.refresh(&store, &c, 10));
        let ok = Outcome {
            status: 200,
            usage: Some(Usage { input: 1, output: 1, total: 2, ..Usage::default() }),
            ..Outcome::default()
        };
        let _ = record_attempt(&store, &c, 0, &ok, None, KeyAction::Nothing, 20);
        assert!(!snap.refresh(&store, &c, 30), "counters alone do not bump the generation");
        assert!(snap.refresh(&store, &c, 1_000), "but stale statistics reload");
        let limited = Outcome { status: 429, ..Outcome::default() };
        let _ = record_attempt(&store, &c, 0, &limited, None, KeyAction::CoolUntil(7_000), 1_010);
        assert!(snap.refresh(&store, &c, 1_020));
        assert_eq!(snap.records[0].cooldown_until_ms, 7_000);
    }
}
