//! Choosing a key for an objective among a provider's eligible keys, with
//! fairness among equals.

use super::snapshot::{NoKey, Snapshot, MAX_LISTED};
use crate::config::Config;
use crate::decision::{Decision, Exclusion};
use crate::objective::{Goal, Objective};

#[derive(Debug, Clone, Copy)]
struct Candidate {
    key: usize,
    price: Option<f64>,
    reliability: f64,
    latency_us: Option<u64>,
    headroom: f64,
    runway: f64,
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
        self.choose_within(cfg, provider, snap, now_ms, tried, &[], &[], objective)
    }

    /// As [`Chooser::choose`], never choosing a key in `banned` (keys whose
    /// budget has no room for this request), nor considering one in
    /// `outside` (keys outside the group of an object the request refers
    /// to: they are not candidates, nor counted as excluded).
    #[allow(clippy::too_many_arguments)]
    pub fn choose_within(
        &mut self,
        cfg: &Config,
        provider: usize,
        snap: &mut Snapshot,
        now_ms: u64,
        tried: &[usize],
        banned: &[usize],
        outside: &[usize],
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
                excluded.push((k, why, 0));
            }
        };
        let mut none = view.none.clone();
        for &k in banned {
            if view.eligible.contains(&k) || view.critical.contains(&k) {
                none.exhausted += 1;
                note(k, Exclusion::BudgetExhausted);
            }
        }
        let usable = |k: &usize| !banned.contains(k) && !outside.contains(k);
        let untried = |k: &usize| usable(k) && !tried.contains(k);
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
            let gone = out(banned) + out(outside) + if reuse { 0 } else { out(tried) };
            let candidates = pool.len() - gone.min(pool.len());
            return match chosen {
                Some(k) => Ok(Decision {
                    objective: objective.label.clone(),
                    chosen: Some(k),
                    score: 1.0,
                    margin: (candidates > 1).then_some(0.0),
                    candidates,
                    excluded,
                    excluded_total,
                    basis: None,
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
                // Worked out only for an objective that weighs it.
                runway: match (objective.weight(Goal::Runway) > 0.0, cfg.keys.get(k), snap.records.get(k)) {
                    (true, Some(key), Some(r)) => crate::forecast::runway_score(r, &key.limits, now_ms),
                    _ => 1.0,
                },
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
        let c = cands[best];
        let basis = match objective.primary {
            Goal::Fairness => None,
            Goal::Cost => c.price,
            Goal::Reliability => Some(c.reliability),
            Goal::Latency => c.latency_us.map(|l| l as f64 / 1000.0),
            Goal::Headroom => Some(c.headroom),
            Goal::Runway => Some(c.runway),
        };
        // Under fairness alone keys are interchangeable: the spread, not a
        // score, decides, so no key wins by a margin.
        let margin =
            if pure_fairness { runner_up.map(|_| 0.0) } else { runner_up.map(|r| (scores[best] - r).max(0.0)) };
        let decision = Decision {
            objective: objective.label.clone(),
            chosen: Some(chosen),
            score: scores[best],
            margin,
            candidates: cands.len(),
            excluded,
            excluded_total,
            basis,
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
            if w(Goal::Runway) > 0.0 {
                s += w(Goal::Runway) * c.runway;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_record::*;
    use crate::keys::test_support::*;
    use crate::keys::*;
    use crate::objective::*;
    use crate::ratelimit::Signals;
    use crate::usage::Usage;

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
        assert_eq!(d.excluded, vec![(0, Exclusion::Disabled, 0), (1, Exclusion::Exhausted, 0)]);
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
        assert_eq!(d.map(|d| (d.chosen, d.excluded)), Ok((Some(1), vec![(0, Exclusion::MinReliability, 0)])));
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
    fn runway_prefers_the_key_whose_quota_lasts_at_its_burn_rate() {
        let limits = r#","limits":{"daily_tokens":10000}"#;
        let c = cfg_with(&[limits, limits], "");
        let day = 20_000 * 86_400_000;
        let used = |r: &mut KeyRecord, at: u64| {
            let u = Usage { input: 100, total: 100, ..Usage::default() };
            r.record(&Outcome { status: 200, usage: Some(u), ..Outcome::default() }, at, 300_000);
        };
        // Both have used 2,000 of 10,000 tokens today: key 0 in the last
        // 20 s, key 1 an hour ago.
        let mut recs = vec![KeyRecord::default(); 2];
        for i in 0..20 {
            used(&mut recs[0], day + 3_600_000 + i * 1_000);
            used(&mut recs[1], day + i * 1_000);
        }
        let now = day + 3_620_000;
        let headroom = counts_at(&c, &recs, &obj("headroom"), 10, now);
        assert_eq!(headroom, vec![5, 5], "headroom alone cannot tell them apart");
        let lasting = obj(r#"{"primary":"headroom","weights":{"headroom":0.5,"runway":0.5}}"#);
        assert_eq!(counts_at(&c, &recs, &lasting, 10, now), vec![0, 10]);
        let d = Chooser::default().choose(&c, 0, &mut Snapshot::of(recs.clone()), now, &[], &lasting);
        assert!(d.is_ok_and(|d| d.margin.is_some_and(|m| m > 0.4)));
    }

    fn counts_at(c: &Config, recs: &[KeyRecord], o: &Objective, n: usize, now: u64) -> Vec<usize> {
        let mut ch = Chooser::default();
        let mut out = vec![0; c.keys.slots()];
        for _ in 0..n {
            if let Some(k) = pick(&mut ch, c, recs, now, o) {
                out[k] += 1;
            }
        }
        out
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
}
