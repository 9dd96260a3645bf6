//! Choosing a key and changing key state.
//!
//! Each VM keeps a [`Snapshot`] of every key's record. A request reads one
//! small generation record from shared data; the snapshot reloads the key
//! records only when some worker changed a key's eligibility (cooldown,
//! disable, exhaustion, a capacity-state change) or when its statistics are
//! older than `routing.stats_refresh_ms`. So the common path costs one
//! shared-data read however many keys there are.

use crate::config::{Config, StatusAction};
use crate::decision::{Decision, Exclusion};
use crate::objective::{Goal, Objective};
use crate::quota::headroom;
use crate::state::{Capacity, DecodeError, Effective, KeyRecord, KeyState, Outcome, Reason};
use crate::store::{update, Store, UpdateError, UpdateStats};
use crate::window::Window;

/// Reads a key record; absent records read as fresh.
pub fn read_record(store: &dyn Store, name: &str) -> Result<KeyRecord, DecodeError> {
    match store.value(name) {
        None => Ok(KeyRecord::default()),
        Some(b) => KeyRecord::decode(&b),
    }
}

/// Per-VM copy of every key's record, with each key's evaluation cached
/// until the next instant it can change (a cooldown's end, a quota window's
/// roll-over, a provider reset, or the next statistics refresh). Choosing
/// then costs a few comparisons per key.
#[derive(Debug, Default)]
pub struct Snapshot {
    gen: Option<u64>,
    loaded_ms: u64,
    pub records: Vec<KeyRecord>,
    evals: Vec<Eval>,
    /// Per provider: which keys can serve, which are Critical, which are
    /// left out and why. Rebuilt only when some key's standing changes or an
    /// evaluation expires, so choosing does not scan every key.
    views: Vec<View>,
    views_until_ms: u64,
    views_dirty: bool,
}

pub use crate::decision::MAX_LISTED;

/// A provider's keys sorted by standing, at an instant.
#[derive(Debug, Clone, Default)]
struct View {
    /// Not excluded and not Critical, in configuration order.
    eligible: Vec<usize>,
    critical: Vec<usize>,
    /// The first [`MAX_LISTED`] exclusions, and how many there are.
    excluded: Vec<(usize, Exclusion)>,
    excluded_total: usize,
    /// Counts and earliest recovery, for a refusal.
    none: NoKey,
    /// Every serving key has the same weight (round-robin suffices).
    equal_weights: bool,
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
    pub fn refresh(&mut self, store: &dyn Store, cfg: &Config, now_ms: u64) -> bool {
        let gen = crate::shared_data::read_u64(store, crate::shared_data::GENERATION);
        let fresh = now_ms.saturating_sub(self.loaded_ms) < cfg.routing.stats_refresh_ms;
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
    fn ensure_views(&mut self, cfg: &Config, now_ms: u64) {
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
                            v.excluded.push((k, why));
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

/// `Ok` when some key of `provider` can serve at `now_ms`, otherwise why not.
/// Used to refuse a request before any upstream attempt.
pub fn check(cfg: &Config, provider: usize, snap: &mut Snapshot, now_ms: u64) -> Result<(), NoKey> {
    snap.ensure_views(cfg, now_ms);
    match snap.views.get(provider) {
        Some(v) if v.eligible.is_empty() && v.critical.is_empty() => Err(v.none.clone()),
        Some(_) => Ok(()),
        None => Err(NoKey::default()),
    }
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    key: usize,
    price: Option<f64>,
    reliability: f64,
    latency_us: Option<u64>,
    headroom: f64,
}

/// Chooses keys for one VM: objectives over the eligible keys, with smooth
/// weighted round-robin (as in nginx) for fairness and for breaking ties.
#[derive(Debug, Default)]
pub struct Chooser {
    current: Vec<f64>,
    /// Round-robin position per provider.
    cursor: Vec<usize>,
    // Buffers reused across requests, so choosing does not allocate.
    cands: Vec<Candidate>,
    scores: Vec<f64>,
}

/// Ties closer than this are broken by fairness.
const TIE: f64 = 1e-9;

impl Chooser {
    /// Chooses a key of `provider` at `now_ms` for `objective`, preferring
    /// keys not in `tried` (keys this request already used).
    pub fn choose(
        &mut self,
        cfg: &Config,
        provider: usize,
        snap: &mut Snapshot,
        now_ms: u64,
        tried: &[usize],
        objective: &Objective,
    ) -> Result<Decision, NoKey> {
        self.choose_excluding(cfg, provider, snap, now_ms, tried, &[], objective)
    }

    /// As [`Chooser::choose`], never choosing a key in `banned` (keys whose
    /// budget has no room for this request).
    #[allow(clippy::too_many_arguments)]
    pub fn choose_excluding(
        &mut self,
        cfg: &Config,
        provider: usize,
        snap: &mut Snapshot,
        now_ms: u64,
        tried: &[usize],
        banned: &[usize],
        objective: &Objective,
    ) -> Result<Decision, NoKey> {
        if self.current.len() != cfg.keys.slots() {
            self.current = vec![0.0; cfg.keys.slots()];
        }
        if self.cursor.len() != cfg.providers.len() {
            self.cursor = vec![0; cfg.providers.len()];
        }
        snap.ensure_views(cfg, now_ms);
        let Some(view) = snap.views.get(provider) else {
            return Err(NoKey::default());
        };
        let mut excluded = view.excluded.clone();
        let mut excluded_total = view.excluded_total;
        let mut note = |k: usize, why: Exclusion| {
            excluded_total += 1;
            if excluded.len() < MAX_LISTED {
                excluded.push((k, why));
            }
        };
        let mut none = view.none.clone();
        for &k in banned {
            if view.eligible.contains(&k) || view.critical.contains(&k) {
                none.exhausted += 1;
                note(k, Exclusion::BudgetExhausted);
            }
        }
        let usable = |k: &usize| !banned.contains(k);
        let untried = |k: &usize| !banned.contains(k) && !tried.contains(k);
        // A retry prefers keys this request has not tried; a Critical key is
        // used only when nothing better is left.
        let (pool, critical_left_out, reuse): (&[usize], bool, bool) = if view.eligible.iter().any(untried) {
            (&view.eligible, true, false)
        } else if view.critical.iter().any(untried) {
            (&view.critical, false, false)
        } else if view.eligible.iter().any(usable) {
            (&view.eligible, true, true)
        } else {
            (&view.critical, false, true)
        };
        let keep = |k: &usize| if reuse { usable(k) } else { untried(k) };
        if critical_left_out {
            for &k in &view.critical {
                note(k, Exclusion::Critical);
            }
        }
        if !reuse {
            for &k in tried {
                if pool.contains(&k) {
                    note(k, Exclusion::Tried);
                }
            }
        }
        let pure_fairness = objective.weight(Goal::Fairness) >= 1.0
            && objective.min_reliability.is_none()
            && objective.max_cost_per_1k.is_none();

        if pure_fairness && view.equal_weights {
            // Round-robin: the even spread, without scanning every key.
            let n = pool.len();
            let start = self.cursor[provider] % n.max(1);
            let mut chosen = None;
            for i in 0..n {
                let k = pool[(start + i) % n];
                if keep(&k) {
                    chosen = Some(k);
                    self.cursor[provider] = start + i + 1;
                    break;
                }
            }
            // tried and banned are a request's few keys: count them out.
            let out = |list: &[usize]| list.iter().filter(|k| pool.contains(k)).count();
            let candidates = pool.len() - if reuse { out(banned) } else { out(banned) + out(tried) }.min(pool.len());
            return match chosen {
                Some(k) => Ok(Decision {
                    objective: objective.label.clone(),
                    chosen: Some(k),
                    score: 1.0,
                    margin: (candidates > 1).then_some(0.0),
                    candidates,
                    excluded,
                    excluded_total,
                }),
                None => {
                    none.decision = Some(Box::new(Decision::none(objective, excluded, excluded_total)));
                    Err(none)
                }
            };
        }

        let mut cands = std::mem::take(&mut self.cands);
        cands.clear();
        for &k in pool.iter().filter(|k| keep(k)) {
            let Some(e) = snap.evals.get(k).copied() else { continue };
            let price = cfg.keys.get(k).and_then(|key| key.cost_score_price);
            if objective.min_reliability.is_some_and(|min| e.reliability < min) {
                none.constrained_out += 1;
                note(k, Exclusion::MinReliability);
                continue;
            }
            if objective.max_cost_per_1k.is_some_and(|max| price.is_none_or(|p| p > max)) {
                none.constrained_out += 1;
                note(k, Exclusion::MaxCost);
                continue;
            }
            cands.push(Candidate {
                key: k,
                price,
                reliability: e.reliability,
                latency_us: e.latency_us,
                headroom: e.headroom,
            });
        }
        if cands.is_empty() {
            self.cands = cands;
            none.decision = Some(Box::new(Decision::none(objective, excluded, excluded_total)));
            return Err(none);
        }

        let mut scores = std::mem::take(&mut self.scores);
        self.score(cfg, &cands, objective, &mut scores);
        let mut best = 0;
        for i in 1..cands.len() {
            let better = scores[i] > scores[best] + TIE;
            let tie_but_fairer =
                (scores[i] - scores[best]).abs() <= TIE && self.current[cands[i].key] > self.current[cands[best].key];
            if better || tie_but_fairer {
                best = i;
            }
        }
        let mut runner_up: Option<f64> = None;
        for (i, s) in scores.iter().enumerate() {
            if i != best {
                runner_up = Some(runner_up.map_or(*s, |r| r.max(*s)));
            }
        }
        let total: f64 = cands.iter().map(|c| weight(cfg, c.key)).sum();
        let chosen = cands[best].key;
        self.current[chosen] -= total;
        let decision = Decision {
            objective: objective.label.clone(),
            chosen: Some(chosen),
            score: scores[best],
            margin: runner_up.map(|r| (scores[best] - r).max(0.0)),
            candidates: cands.len(),
            excluded,
            excluded_total,
        };
        self.cands = cands;
        self.scores = scores;
        Ok(decision)
    }

    /// Combined scores in `[0, 1]` into `out`; also advances the round-robin
    /// state of every candidate (the chosen one is charged by the caller).
    fn score(&mut self, cfg: &Config, cands: &[Candidate], o: &Objective, out: &mut Vec<f64>) {
        out.clear();
        let w = |g: Goal| o.weight(g);
        let (mut fmin, mut fmax) = (f64::MAX, f64::MIN);
        for c in cands {
            let cur = &mut self.current[c.key];
            *cur += weight(cfg, c.key);
            fmin = fmin.min(*cur);
            fmax = fmax.max(*cur);
        }
        let (mut pmin, mut pmax, mut priced) = (f64::MAX, f64::MIN, false);
        let mut lmin = u64::MAX;
        for c in cands {
            if let Some(p) = c.price {
                pmin = pmin.min(p);
                pmax = pmax.max(p);
                priced = true;
            }
            if let Some(l) = c.latency_us {
                lmin = lmin.min(l);
            }
        }
        let lmin = if lmin == u64::MAX { 1.0 } else { lmin.max(1) as f64 };
        for c in cands {
            let mut s = 0.0;
            if w(Goal::Cost) > 0.0 {
                // Known prices score from 0.1 (dearest) to 1 (cheapest); a
                // key without a price ranks below every priced key.
                let cost = match c.price {
                    _ if !priced => 1.0,
                    None => 0.0,
                    Some(_) if pmax <= pmin => 1.0,
                    Some(p) => 0.1 + 0.9 * (pmax - p) / (pmax - pmin),
                };
                s += w(Goal::Cost) * cost;
            }
            if w(Goal::Reliability) > 0.0 {
                s += w(Goal::Reliability) * c.reliability;
            }
            if w(Goal::Latency) > 0.0 {
                // No samples yet: assume the best, so new keys get tried.
                let l = c.latency_us.map_or(lmin, |l| l.max(1) as f64);
                s += w(Goal::Latency) * (lmin / l);
            }
            if w(Goal::Headroom) > 0.0 {
                s += w(Goal::Headroom) * c.headroom;
            }
            if w(Goal::Fairness) > 0.0 {
                let f = if fmax > fmin { (self.current[c.key] - fmin) / (fmax - fmin) } else { 1.0 };
                s += w(Goal::Fairness) * f;
            }
            out.push(s);
        }
    }
}

fn weight(cfg: &Config, k: usize) -> f64 {
    cfg.keys.get(k).map_or(1.0, |key| key.weight as f64)
}

/// What a response did to a key, beyond the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    CoolUntil(u64),
    Disable(Reason),
    Exhaust(Reason),
}

impl Action {
    /// The concrete action for a configured one; `cooldown_until_ms` is
    /// used by `cooldown`.
    pub fn from_config(a: StatusAction, reason: Reason, cooldown_until_ms: u64) -> Action {
        match a {
            StatusAction::Cooldown => Action::CoolUntil(cooldown_until_ms),
            StatusAction::Disable => Action::Disable(reason),
            StatusAction::Exhaust => Action::Exhaust(reason),
            StatusAction::Nothing => Action::Nothing,
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
    action: Action,
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
            Action::Nothing => {}
            Action::CoolUntil(until) => changed |= rec.cool_until(until),
            Action::Disable(reason) => {
                if rec.state != KeyState::Disabled {
                    rec.state_at_ms = now_ms.max(rec.state_at_ms.saturating_add(1));
                    changed = true;
                }
                rec.state = KeyState::Disabled;
                rec.reason = reason;
            }
            Action::Exhaust(reason) => {
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
    use crate::config::compile;
    use crate::ratelimit::Signals;
    use crate::store::FakeStore;
    use crate::usage::Usage;

    fn cfg_with(keys: &[&str], extra: &str) -> Config {
        let keys: Vec<String> =
            keys.iter().enumerate().map(|(i, k)| format!(r#"{{"id":"k{i}","secret":"s{i}"{k}}}"#)).collect();
        let json = format!(r#"{{"providers":[{{"id":"p","keys":[{}]}}]{extra}}}"#, keys.join(","));
        match compile(json.as_bytes(), &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("{e}: {json}"),
        }
    }

    fn cfg(weights: &[u32]) -> Config {
        let ks: Vec<String> = weights.iter().map(|w| format!(r#","weight":{w}"#)).collect();
        let refs: Vec<&str> = ks.iter().map(String::as_str).collect();
        cfg_with(&refs, "")
    }

    fn obj(s: &str) -> Objective {
        match Objective::parse_str(s) {
            Ok(o) => o,
            Err(e) => panic!("{e}"),
        }
    }

    fn pick(c: &mut Chooser, cfg: &Config, recs: &[KeyRecord], now: u64, o: &Objective) -> Option<usize> {
        c.choose(cfg, 0, &mut Snapshot::of(recs.to_vec()), now, &[], o).ok().and_then(|d| d.chosen)
    }

    fn counts(cfg: &Config, recs: &[KeyRecord], o: &Objective, n: usize) -> Vec<usize> {
        let mut c = Chooser::default();
        let mut out = vec![0; cfg.keys.slots()];
        for _ in 0..n {
            if let Some(k) = pick(&mut c, cfg, recs, 0, o) {
                out[k] += 1;
            }
        }
        out
    }

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
    fn fairness_spreads_equal_keys_evenly() {
        let c = cfg(&[1, 1, 1, 1]);
        let recs = vec![KeyRecord::default(); 4];
        assert_eq!(counts(&c, &recs, &Objective::default(), 10_000), vec![2_500; 4]);
    }

    #[test]
    fn fairness_follows_weights() {
        let c = cfg(&[1, 3]);
        let recs = vec![KeyRecord::default(); 2];
        assert_eq!(counts(&c, &recs, &Objective::default(), 400), vec![100, 300]);
    }

    #[test]
    fn cooled_down_key_is_not_selected_until_its_deadline() {
        let c = cfg(&[1, 1]);
        let recs = vec![KeyRecord { cooldown_until_ms: 5_000, ..KeyRecord::default() }, KeyRecord::default()];
        let mut ch = Chooser::default();
        for now in [0, 1_000, 4_999] {
            assert_eq!(pick(&mut ch, &c, &recs, now, &Objective::default()), Some(1));
        }
        let later: Vec<Option<usize>> =
            (0..4).map(|_| pick(&mut ch, &c, &recs, 5_000, &Objective::default())).collect();
        assert!(later.contains(&Some(0)), "{later:?}");
    }

    #[test]
    fn disabled_and_exhausted_keys_are_never_chosen_and_say_why() {
        let c = cfg(&[1, 1, 1]);
        let recs = vec![
            KeyRecord { state: KeyState::Disabled, ..KeyRecord::default() },
            KeyRecord { state: KeyState::Exhausted, ..KeyRecord::default() },
            KeyRecord::default(),
        ];
        let d = Chooser::default().choose(&c, 0, &mut Snapshot::of(recs.clone()), 0, &[], &Objective::default());
        let Ok(d) = d else { panic!("no key") };
        assert_eq!(d.chosen, Some(2));
        assert_eq!(d.excluded, vec![(0, Exclusion::Disabled), (1, Exclusion::Exhausted)]);
        assert_eq!(d.candidates, 1);
        assert_eq!(d.margin, None);
    }

    #[test]
    fn a_retry_prefers_a_key_this_request_has_not_tried() {
        let c = cfg(&[1, 1, 1]);
        let recs = vec![KeyRecord::default(); 3];
        let mut ch = Chooser::default();
        for _ in 0..20 {
            let d = ch.choose(&c, 0, &mut Snapshot::of(recs.clone()), 0, &[0, 1], &Objective::default());
            assert_eq!(d.map(|d| d.chosen), Ok(Some(2)));
        }
        assert!(
            ch.choose(&c, 0, &mut Snapshot::of(recs.clone()), 0, &[0, 1, 2], &Objective::default()).is_ok(),
            "reuse rather than fail"
        );
    }

    #[test]
    fn no_eligible_key_reports_why_and_the_earliest_recovery() {
        let c = cfg(&[1, 1, 1]);
        let recs = vec![
            KeyRecord { cooldown_until_ms: 9_000, ..KeyRecord::default() },
            KeyRecord { cooldown_until_ms: 4_500, ..KeyRecord::default() },
            KeyRecord { state: KeyState::Disabled, ..KeyRecord::default() },
        ];
        let Err(e) =
            Chooser::default().choose(&c, 0, &mut Snapshot::of(recs.clone()), 1_000, &[], &Objective::default())
        else {
            panic!("a key was chosen")
        };
        assert_eq!((e.throttled, e.disabled, e.exhausted), (2, 1, 0));
        assert_eq!(e.earliest_recovery_ms, Some(4_500));
        assert_eq!(e.retry_after_secs(1_000), 4);
        assert!(e.explain("p").contains("2 cooling down"));
        assert_eq!(
            check(&c, 0, &mut Snapshot::of(recs.clone()), 1_000).err().map(|e| e.earliest_recovery_ms),
            Some(Some(4_500))
        );
    }

    #[test]
    fn cost_chooses_the_cheapest_key_and_spreads_among_equals() {
        let c = cfg_with(
            &[r#","cost_per_1k":"0.03""#, r#","cost_per_1k":"0.01""#, r#","metadata":{"cost_per_1k":"0.01"}"#, ""],
            "",
        );
        let recs = vec![KeyRecord::default(); 4];
        assert_eq!(counts(&c, &recs, &obj("cost"), 100), vec![0, 50, 50, 0]);
        let d = Chooser::default().choose(&c, 0, &mut Snapshot::of(recs.clone()), 0, &[], &obj("cost"));
        assert_eq!(d.map(|d| (d.score, d.margin)), Ok((1.0, Some(0.0))));
    }

    #[test]
    fn a_single_priced_key_beats_every_unpriced_one() {
        let c = cfg_with(&["", r#","cost_per_1k":"0.5""#, ""], "");
        assert_eq!(counts(&c, &[KeyRecord::default(); 3], &obj("cost"), 10), vec![0, 10, 0]);
    }

    #[test]
    fn max_cost_constraint_excludes_dear_and_unpriced_keys() {
        let c = cfg_with(&[r#","cost_per_1k":"0.03""#, r#","cost_per_1k":"0.01""#, ""], "");
        let recs = vec![KeyRecord::default(); 3];
        let o = obj(r#"{"primary":"fairness","constraints":{"max_cost_per_1k":0.02}}"#);
        assert_eq!(counts(&c, &recs, &o, 10), vec![0, 10, 0]);
        let o = obj(r#"{"primary":"fairness","constraints":{"max_cost_per_1k":0.001}}"#);
        let e = Chooser::default().choose(&c, 0, &mut Snapshot::of(recs.clone()), 0, &[], &o);
        assert_eq!(e.err().map(|e| e.constrained_out), Some(3));
    }

    fn with_outcomes(ok: u64, fail: u64) -> KeyRecord {
        let mut r = KeyRecord::default();
        for i in 0..ok + fail {
            let status = if i < ok { 200 } else { 500 };
            r.record(&Outcome { status, ..Outcome::default() }, 1_000, 300_000);
        }
        r
    }

    #[test]
    fn reliability_prefers_the_key_that_fails_least() {
        let c = cfg(&[1, 1]);
        let recs = vec![with_outcomes(90, 10), with_outcomes(99, 1)];
        let mut ch = Chooser::default();
        assert_eq!(pick(&mut ch, &c, &recs, 1_000, &obj("reliability")), Some(1));
        let o = obj(r#"{"primary":"fairness","constraints":{"min_reliability":0.95}}"#);
        let d = ch.choose(&c, 0, &mut Snapshot::of(recs.clone()), 1_000, &[], &o);
        assert_eq!(d.map(|d| (d.chosen, d.excluded)), Ok((Some(1), vec![(0, Exclusion::MinReliability)])));
    }

    #[test]
    fn latency_prefers_the_fastest_key_and_tries_unmeasured_ones() {
        let c = cfg(&[1, 1, 1]);
        let mut recs = vec![KeyRecord::default(); 3];
        for (r, l) in recs.iter_mut().zip([30_000u64, 10_000, 0]) {
            if l > 0 {
                r.record(&Outcome { status: 200, latency_us: Some(l), ..Outcome::default() }, 0, 1);
            }
        }
        let mut ch = Chooser::default();
        // Key 2 has no samples yet: it scores as well as the best.
        let first: Vec<Option<usize>> = (0..2).map(|_| pick(&mut ch, &c, &recs, 0, &obj("latency"))).collect();
        assert!(first.contains(&Some(1)) && first.contains(&Some(2)), "{first:?}");
        recs[2].record(&Outcome { status: 200, latency_us: Some(50_000), ..Outcome::default() }, 0, 1);
        assert_eq!(pick(&mut ch, &c, &recs, 0, &obj("latency")), Some(1));
    }

    #[test]
    fn headroom_prefers_the_key_with_most_room() {
        let c = cfg(&[1, 1]);
        let mut recs = vec![KeyRecord::default(); 2];
        let s = Signals {
            remaining_requests: Some("40"),
            limit_requests: Some("100"),
            reset_requests: Some("1m"),
            ..Signals::default()
        };
        recs[0].learn_limits(&s, 0);
        let s = Signals {
            remaining_requests: Some("90"),
            limit_requests: Some("100"),
            reset_requests: Some("1m"),
            ..Signals::default()
        };
        recs[1].learn_limits(&s, 0);
        assert_eq!(pick(&mut Chooser::default(), &c, &recs, 1, &obj("headroom")), Some(1));
    }

    #[test]
    fn critical_keys_are_used_only_when_nothing_better_is_left() {
        let c = cfg(&[1, 1]);
        let mut recs = vec![KeyRecord::default(); 2];
        let s = Signals {
            remaining_requests: Some("5"),
            limit_requests: Some("100"),
            reset_requests: Some("1m"),
            ..Signals::default()
        };
        recs[0].learn_limits(&s, 0);
        assert_eq!(counts(&c, &recs, &Objective::default(), 10), vec![0, 10]);
        recs[1].state = KeyState::Disabled;
        assert_eq!(counts(&c, &recs, &Objective::default(), 3), vec![3, 0]);
    }

    #[test]
    fn weighted_combination_trades_cost_against_reliability() {
        let c = cfg_with(&[r#","cost_per_1k":"0.01""#, r#","cost_per_1k":"0.02""#], "");
        // The cheap key fails half the time.
        let recs = vec![with_outcomes(50, 50), with_outcomes(100, 0)];
        let cheap_first = obj(r#"{"primary":"cost","weights":{"cost":0.9,"reliability":0.1}}"#);
        assert_eq!(pick(&mut Chooser::default(), &c, &recs, 1_000, &cheap_first), Some(0));
        let reliable_first = obj(r#"{"primary":"cost","weights":{"cost":0.3,"reliability":0.7}}"#);
        assert_eq!(pick(&mut Chooser::default(), &c, &recs, 1_000, &reliable_first), Some(1));
    }

    #[test]
    fn weighted_fairness_still_spreads_equal_keys() {
        let c = cfg(&[1, 1, 1]);
        let recs = vec![KeyRecord::default(); 3];
        let o = obj(r#"{"primary":"cost","weights":{"cost":0.5,"reliability":0.3,"fairness":0.2}}"#);
        let n = counts(&c, &recs, &o, 3_000);
        assert!(n.iter().all(|x| (950..=1050).contains(x)), "{n:?}");
    }

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
        let _ = record_attempt(&store, &c, 0, &ok, None, Action::Nothing, 20);
        assert!(!snap.refresh(&store, &c, 30), "counters alone do not bump the generation");
        assert!(snap.refresh(&store, &c, 1_000), "but stale statistics reload");
        let limited = Outcome { status: 429, ..Outcome::default() };
        let _ = record_attempt(&store, &c, 0, &limited, None, Action::CoolUntil(7_000), 1_010);
        assert!(snap.refresh(&store, &c, 1_020));
        assert_eq!(snap.records[0].cooldown_until_ms, 7_000);
    }

    #[test]
    fn a_shorter_cooldown_keeps_the_longer_one_and_does_not_bump() {
        let c = cfg(&[1]);
        let store = FakeStore::new();
        let limited = Outcome { status: 429, ..Outcome::default() };
        let (r, _) = record_attempt(&store, &c, 0, &limited, None, Action::CoolUntil(10_000), 0);
        assert_eq!(r.map(|r| (r.record.cooldown_until_ms, r.changed)), Ok((10_000, true)));
        let gen = crate::shared_data::read_u64(&store, crate::shared_data::GENERATION);
        let (r, _) = record_attempt(&store, &c, 0, &limited, None, Action::CoolUntil(6_000), 0);
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
        let (r, _) = record_attempt(&store, &c, 0, &o, None, Action::Disable(Reason::Unauthorized), 0);
        assert_eq!(r.map(|r| (r.record.effective(u64::MAX), r.changed)), Ok((Effective::Disabled, true)));
        let day = 86_400_000;
        let o = Outcome { status: 402, ..Outcome::default() };
        let (r, _) = record_attempt(&store, &c, 1, &o, None, Action::Exhaust(Reason::PaymentRequired), 3 * day);
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
            let (r, _) = record_attempt(&store, &c, 0, &ok, None, Action::Nothing, 1_000);
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
            &mut Snapshot::of(vec![read_record(&store, &c.keys[0].record_name).unwrap_or_default()]),
            1_000
        )
        .is_err());
        assert!(check(
            &c,
            0,
            &mut Snapshot::of(vec![read_record(&store, &c.keys[0].record_name).unwrap_or_default()]),
            60_000
        )
        .is_ok());
    }
}
