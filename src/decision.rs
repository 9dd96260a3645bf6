//! Explainable routing decisions: what was chosen, with what score, margin
//! and confidence, among how many candidates, and why every other key was
//! left out.
//!
//! A decision is summarised in the `x-apikeyrouter-decision` response header
//! and kept in a bounded ring in shared data for the admin API. Ring records
//! are a compact binary form (cheap on the request path); the admin API turns
//! them into JSON, with a one-line explanation written only then.

use crate::charge::Basis;
use crate::codec::{Reader, Writer};
use crate::config::Config;
use serde_json::{json, Value};

/// Why a key was not chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclusion {
    Throttled = 1,
    Disabled = 2,
    Exhausted = 3,
    QuotaExhausted = 4,
    /// Critical capacity while better keys were available.
    Critical = 5,
    MinReliability = 6,
    MaxCost = 7,
    /// This request already tried the key.
    Tried = 8,
    /// A hard budget scoped to the key has no room for this request.
    BudgetExhausted = 9,
}

impl Exclusion {
    pub fn as_str(self) -> &'static str {
        match self {
            Exclusion::Throttled => "throttled",
            Exclusion::Disabled => "disabled",
            Exclusion::Exhausted => "exhausted",
            Exclusion::QuotaExhausted => "quota_exhausted",
            Exclusion::Critical => "critical",
            Exclusion::MinReliability => "below_min_reliability",
            Exclusion::MaxCost => "above_max_cost",
            Exclusion::Tried => "already_tried",
            Exclusion::BudgetExhausted => "budget_exhausted",
        }
    }

    fn from_u8(b: u8) -> Option<Exclusion> {
        Some(match b {
            1 => Exclusion::Throttled,
            2 => Exclusion::Disabled,
            3 => Exclusion::Exhausted,
            4 => Exclusion::QuotaExhausted,
            5 => Exclusion::Critical,
            6 => Exclusion::MinReliability,
            7 => Exclusion::MaxCost,
            8 => Exclusion::Tried,
            9 => Exclusion::BudgetExhausted,
            _ => return None,
        })
    }
}

/// One routing decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub objective: String,
    pub chosen: Option<usize>,
    pub score: f64,
    /// Score margin over the runner-up; `None` with a single candidate, 0
    /// under `fairness` (its keys are interchangeable: their turn decides).
    pub margin: Option<f64>,
    pub candidates: usize,
    /// The first excluded keys, why, and when each can serve again (0:
    /// not known, or not by itself); at most [`MAX_LISTED`].
    pub excluded: Vec<(usize, Exclusion, u64)>,
    /// How many keys were excluded in all.
    pub excluded_total: usize,
    /// The chosen key's own figure on the objective's primary goal, for the
    /// explanation: its price per 1,000 tokens (`cost`), success rate
    /// (`reliability`), milliseconds to first byte (`latency`), remaining
    /// fraction (`headroom`) or runway score (`runway`).
    pub basis: Option<f64>,
}

/// Exclusions listed in full in the header and in ring records.
pub const MAX_LISTED: usize = 16;

impl Decision {
    /// A decision that found no key.
    pub fn none(
        objective: &crate::objective::Objective,
        excluded: Vec<(usize, Exclusion, u64)>,
        excluded_total: usize,
    ) -> Decision {
        Decision {
            objective: objective.label.clone(),
            chosen: None,
            score: 0.0,
            margin: None,
            candidates: 0,
            excluded,
            excluded_total,
            basis: None,
        }
    }

    /// The half-open probe of disabled key `k`: one real request decides
    /// whether it serves again.
    pub fn probe(k: usize) -> Decision {
        Decision {
            objective: "probe".into(),
            chosen: Some(k),
            score: 0.0,
            margin: None,
            candidates: 1,
            excluded: Vec::new(),
            excluded_total: 0,
            basis: None,
        }
    }

    /// How strongly the objective singled out the chosen key, in `[0, 1]`:
    /// `1 - (1 - m) / n`, with `n` the eligible candidates and `m` the margin
    /// over the runner-up as a share of the chosen key's score. One
    /// candidate gives 0 (nothing was compared: no alternative was left);
    /// `n` interchangeable keys (`fairness`, or a tie) give `1 - 1/n`, which
    /// drops as keys drop out; a clear winner approaches 1. `None` when no
    /// key was chosen.
    pub fn confidence(&self) -> Option<f64> {
        self.chosen?;
        let n = self.candidates.max(1) as f64;
        let m = match self.margin {
            Some(m) if self.score > 0.0 && m.is_finite() => (m / self.score).clamp(0.0, 1.0),
            _ => 0.0,
        };
        Some(1.0 - (1.0 - m) / n)
    }

    /// The `x-apikeyrouter-decision` header value, e.g.
    /// `objective=cost; key=k2; score=0.950; margin=0.120; confidence=0.959; candidates=3; excluded=k1:throttled`.
    pub fn summary(&self, cfg: &Config) -> String {
        let key = self.chosen.and_then(|k| cfg.keys.get(k)).map_or("-", |k| k.id.as_str());
        let mut s = format!(
            "objective={}; key={}; score={:.3}; margin={}; confidence={}; candidates={}",
            self.objective,
            key,
            self.score,
            self.margin.map_or("-".to_string(), |m| format!("{m:.3}")),
            self.confidence().map_or("-".to_string(), |c| format!("{c:.3}")),
            self.candidates
        );
        if !self.excluded.is_empty() {
            s.push_str("; excluded=");
            let listed: Vec<String> = self
                .excluded
                .iter()
                .take(MAX_LISTED)
                .map(|(k, why, _)| format!("{}:{}", cfg.keys.get(*k).map_or("?", |k| k.id.as_str()), why.as_str()))
                .collect();
            s.push_str(&listed.join(","));
            let listed = self.excluded.len().min(MAX_LISTED);
            if self.excluded_total > listed {
                s.push_str(&format!(",+{} more", self.excluded_total - listed));
            }
        }
        s
    }
}

/// A decision as stored in the ring.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub at_ms: u64,
    pub seq: u64,
    pub attempt: u32,
    pub request_id: String,
    /// The caller's client id, when clients are configured.
    pub client: String,
    pub decision: Decision,
    /// How the attempt was charged; `None` when it was not.
    pub charged: Option<Basis>,
    /// After a fall-over, the providers the request went through and what
    /// their keys answered (`openai: k1 429, k2 429 -> azure: a1 200`);
    /// empty otherwise.
    pub chain: String,
}

/// Ring records are written in version 4 (with the basis and the
/// exclusions' recovery times); versions 1 (without `charged`), 2 (without
/// `chain`) and 3 are still read.
const VERSION: u8 = 4;

impl Stored {
    pub fn encode(&self) -> Vec<u8> {
        let d = &self.decision;
        let mut out = Writer::with_capacity(64 + d.objective.len() + self.request_id.len());
        out.u8(VERSION).u64(self.at_ms).u64(self.seq).u32(self.attempt);
        out.u32(d.chosen.map_or(u32::MAX, |k| k as u32));
        out.f64(d.score).f64(d.margin.unwrap_or(f64::NAN));
        out.u32(d.candidates as u32).u32(d.excluded_total.max(d.excluded.len()) as u32);
        out.short_str(&self.request_id).short_str(&self.client).short_str(&d.objective);
        let listed = d.excluded.len().min(MAX_LISTED);
        out.u8(listed as u8);
        for (k, why, _) in d.excluded.iter().take(listed) {
            out.u32(*k as u32).u8(*why as u8);
        }
        out.u8(self.charged.map_or(0, |b| b as u8));
        out.short_str(&self.chain);
        out.f64(d.basis.unwrap_or(f64::NAN));
        // Recovery times, in ms after the decision (0: none).
        for (_, _, until) in d.excluded.iter().take(listed) {
            let after = if *until == 0 { 0 } else { until.saturating_sub(self.at_ms).clamp(1, u32::MAX as u64) };
            out.u32(after as u32);
        }
        out.finish()
    }

    /// Decodes a ring record; `None` for anything malformed.
    pub fn decode(b: &[u8]) -> Option<Stored> {
        let mut r = Reader::new(b);
        let version = r.u8().filter(|v| (1..=VERSION).contains(v))?;
        let at_ms = r.u64()?;
        let seq = r.u64()?;
        let attempt = r.u32()?;
        let chosen = r.u32()?;
        let score = r.f64()?;
        let margin = r.f64()?;
        let candidates = r.u32()? as usize;
        let n_excluded = r.u32()? as usize;
        let request_id = r.short_str()?;
        let client = r.short_str()?;
        let objective = r.short_str()?;
        let listed = r.u8()? as usize;
        let mut excluded = Vec::with_capacity(listed);
        for _ in 0..listed {
            let k = r.u32()? as usize;
            excluded.push((k, Exclusion::from_u8(r.u8()?)?, 0));
        }
        let charged = if version >= 2 { r.u8().map(Basis::from_u8)? } else { None };
        let chain = if version >= 3 { r.short_str()? } else { String::new() };
        let mut basis = None;
        if version >= 4 {
            basis = Some(r.f64()?).filter(|b| !b.is_nan());
            for e in excluded.iter_mut() {
                let after = u64::from(r.u32()?);
                e.2 = if after == 0 { 0 } else { at_ms.saturating_add(after) };
            }
        }

        Some(Stored {
            at_ms,
            seq,
            attempt,
            request_id,
            client,
            decision: Decision {
                objective,
                chosen: (chosen != u32::MAX).then_some(chosen as usize),
                score,
                margin: (!margin.is_nan()).then_some(margin),
                candidates,
                excluded,
                excluded_total: n_excluded,
                basis,
            },
            charged,
            chain,
        })
    }

    /// One line for people, e.g. `chose k2: lowest cost 0.00015/1k tokens
    /// among 3 available; k1 cooling 12 s, k3 quota critical`. Key ids only.
    /// Written when the record is read, never on the request path.
    pub fn explain(&self, cfg: &Config) -> String {
        let d = &self.decision;
        let id = |k: usize| cfg.keys.get(k).map_or("(removed key)", |k| k.id.as_str());
        let mut s = match d.chosen {
            None => "no key could serve".to_string(),
            Some(k) if d.objective == "probe" => {
                format!("probed {}: disabled by its provider, given one request to see whether it serves again", id(k))
            }
            Some(k) => {
                let n = d.candidates;
                let mut s = format!("chose {}: {}", id(k), why_chosen(d));
                if n > 1 && d.margin == Some(0.0) && !d.objective.starts_with("fairness") {
                    s.push_str(", tied: taking turns");
                }
                if n <= 1 {
                    s.push_str(", the only key available");
                } else {
                    s.push_str(&format!(" among {n} available"));
                }
                s
            }
        };
        for (i, (k, why, until)) in d.excluded.iter().enumerate() {
            s.push_str(if i == 0 { "; " } else { ", " });
            s.push_str(id(*k));
            s.push_str(match why {
                Exclusion::Throttled => " cooling",
                Exclusion::Exhausted => " exhausted",
                Exclusion::QuotaExhausted => " quota used up",
                Exclusion::Critical => " quota critical",
                Exclusion::MinReliability => " below min_reliability",
                Exclusion::MaxCost => " above max_cost_per_1k",
                Exclusion::Tried => " already tried",
                Exclusion::BudgetExhausted => " its budget has no room",
                Exclusion::Disabled => " disabled",
            });
            if *until > self.at_ms {
                s.push_str(match why {
                    Exclusion::Exhausted => " for ",
                    Exclusion::QuotaExhausted => ", resets in ",
                    _ => " ",
                });
                s.push_str(&duration(until - self.at_ms));
            }
        }
        let more = d.excluded_total.saturating_sub(d.excluded.len());
        if more > 0 {
            s.push_str(&format!("{}+{more} more excluded", if d.excluded.is_empty() { "; " } else { ", " }));
        }
        s
    }

    pub fn to_json(&self, cfg: &Config) -> Value {
        let d = &self.decision;
        let key = d.chosen.and_then(|k| cfg.keys.get(k));
        let excluded: Vec<Value> = d
            .excluded
            .iter()
            .map(|(k, why, _)| json!({"key": cfg.keys.get(*k).map(|k| k.id.as_str()), "reason": why.as_str()}))
            .collect();
        json!({
            "time_ms": self.at_ms,
            "request_id": self.request_id,
            "client": (!self.client.is_empty()).then_some(self.client.as_str()),
            "attempt": self.attempt,
            "objective": d.objective,
            "key": key.map(|k| k.id.as_str()),
            "provider": key.and_then(|k| cfg.providers.get(k.provider)).map(|p| p.id.as_str()),
            "score": d.score,
            "margin": d.margin,
            "confidence": d.confidence().map(|c| (c * 1000.0).round() / 1000.0),
            "explanation": self.explain(cfg),
            "candidates": d.candidates,
            "excluded": excluded,
            "excluded_total": d.excluded_total,
            "charged": self.charged.map(Basis::as_str),
            "chain": (!self.chain.is_empty()).then_some(self.chain.as_str()),
        })
    }
}

/// Why the chosen key won, from the objective's primary goal and the key's
/// own figure on it.
fn why_chosen(d: &Decision) -> String {
    let primary = d.objective.split(['=', ';', ',']).next().unwrap_or("");
    let weighted = d.objective.contains('=') && !d.objective.starts_with(&format!("{primary};"));
    let figure = match (primary, d.basis) {
        ("fairness", _) => "its turn (an even spread by weight)".to_string(),
        ("cost", Some(p)) => format!("lowest cost {}/1k tokens", trim(p)),
        ("cost", None) => "lowest cost (no key is priced)".to_string(),
        ("reliability", Some(r)) => format!("most reliable, {:.1}% of recent requests succeeded", r * 100.0),
        ("latency", Some(ms)) => format!("fastest, {} ms to first byte", trim(ms)),
        ("latency", None) => "not measured yet, so tried as fastest".to_string(),
        ("headroom", Some(h)) => format!("most headroom, {:.0}% of its tightest limit left", h * 100.0),
        ("runway", Some(r)) if r >= 1.0 => {
            "lasts longest: its quotas last until they reset at its burn rate".to_string()
        }
        ("runway", Some(r)) => format!("lasts longest: {:.0}% of the time until its quota resets", r * 100.0),
        _ => format!("best score {:.3}", d.score),
    };
    if weighted {
        format!("best score {:.3} for {} (on {primary}: {figure})", d.score, d.objective)
    } else {
        figure
    }
}

/// A number without trailing zeros, at most six decimals.
fn trim(x: f64) -> String {
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() {
        "0".into()
    } else {
        s.to_string()
    }
}

/// A duration for people: `12 s`, `5 min`, `3 h`, `2 d` (rounded up).
fn duration(ms: u64) -> String {
    let s = ms.div_ceil(1000);
    match s {
        0..=119 => format!("{s} s"),
        120..=7_199 => format!("{} min", s.div_ceil(60)),
        7_200..=172_799 => format!("{} h", s.div_ceil(3_600)),
        _ => format!("{} d", s.div_ceil(86_400)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile;

    fn cfg() -> Config {
        let keys: Vec<String> = (1..=20).map(|i| format!(r#"{{"id":"k{i}","secret":"s{i}"}}"#)).collect();
        let json = format!(r#"{{"providers":[{{"id":"p","keys":[{}]}}]}}"#, keys.join(","));
        match compile(json.as_bytes(), &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn decision() -> Decision {
        Decision {
            objective: "cost".into(),
            chosen: Some(1),
            score: 0.95,
            margin: Some(0.12),
            candidates: 3,
            excluded: vec![(0, Exclusion::Throttled, 12_005), (3, Exclusion::Disabled, 0)],
            excluded_total: 2,
            basis: Some(0.00015),
        }
    }

    fn stored() -> Stored {
        Stored {
            at_ms: 5,
            seq: 6,
            attempt: 2,
            request_id: "rid".into(),
            client: "app".into(),
            decision: decision(),
            charged: Some(Basis::Partial),
            chain: "openai: k1 429, k2 429 -> azure: k3 200".into(),
        }
    }

    #[test]
    fn summary_names_keys_scores_and_exclusions() {
        assert_eq!(
            decision().summary(&cfg()),
            "objective=cost; key=k2; score=0.950; margin=0.120; confidence=0.709; candidates=3; excluded=k1:throttled,k4:disabled"
        );
    }

    #[test]
    fn summary_is_bounded_however_many_keys_are_excluded() {
        let mut d = decision();
        d.excluded = (0..16).map(|k| (k, Exclusion::Throttled, 0)).collect();
        d.excluded_total = 20;
        let s = d.summary(&cfg());
        assert!(s.ends_with(",+4 more"), "{s}");
    }

    #[test]
    fn stored_decisions_round_trip() {
        let s = stored();
        assert_eq!(Stored::decode(&s.encode()), Some(s.clone()));
        let mut single = s.clone();
        single.decision.margin = None;
        single.decision.chosen = None;
        assert_eq!(Stored::decode(&single.encode()), Some(single));
        let v = s.to_json(&cfg());
        assert_eq!(v["key"], "k2");
        assert_eq!(v["margin"], 0.12);
        assert_eq!(v["confidence"], 0.709);
        assert_eq!(
            v["explanation"],
            "chose k2: lowest cost 0.00015/1k tokens among 3 available; k1 cooling 12 s, k4 disabled"
        );
        assert_eq!(v["excluded"][0]["reason"], "throttled");
        assert_eq!(v["charged"], "partial");
    }

    #[test]
    fn ring_record_bytes_are_pinned() {
        use crate::codec::pinned;
        let s = stored();
        let bytes = concat!(
            "04",               // version
            "0500000000000000", // at_ms
            "0600000000000000", // seq
            "02000000",         // attempt
            "01000000",         // chosen
            "666666666666ee3f", // score 0.95
            "b81e85eb51b8be3f", // margin 0.12
            "03000000",         // candidates
            "02000000",         // excluded_total
            "03726964",         // "rid"
            "03617070",         // "app"
            "04636f7374",       // "cost"
            "02",               // listed
            "0000000001",       // key 0: throttled
            "0300000002",       // key 3: disabled
            "02",               // charged: partial
            "27",               // chain: 39 bytes
            "6f70656e61693a206b31203432392c206b3220343239202d3e20617a7572653a206b3320323030",
            "613255302aa9233f", // basis 0.00015
            "e02e0000",         // k1 recovers 12,000 ms later
            "00000000",         // k4: open-ended
        );
        assert_eq!(Stored::decode(&pinned(&s.encode(), bytes)), Some(s.clone()));
        let mut none = s;
        none.client = String::new();
        none.decision.chosen = None;
        none.decision.margin = None;
        none.decision.excluded = vec![];
        none.decision.excluded_total = 0;
        none.charged = None;
        none.chain = String::new();
        none.decision.basis = None;
        let bytes = concat!(
            "04",               // version
            "0500000000000000", // at_ms
            "0600000000000000", // seq
            "02000000",         // attempt
            "ffffffff",         // no key chosen
            "666666666666ee3f", // score 0.95
            "000000000000f87f", // no margin: NaN
            "03000000",         // candidates
            "00000000",         // excluded_total
            "03726964",         // "rid"
            "00",               // no client
            "04636f7374",       // "cost"
            "00",               // listed
            "00",               // not charged
            "00",               // no chain
            "000000000000f87f", // no basis: NaN
        );
        assert_eq!(Stored::decode(&pinned(&none.encode(), bytes)), Some(none.clone()));
        // Version 3 (before the basis), 2 (before `chain`) and 1 (before
        // `charged`) still read.
        let v3 = &bytes[..bytes.len() - 16];
        assert_eq!(Stored::decode(&crate::codec::unhex(&format!("03{}", &v3[2..]))), Some(none.clone()));
        let v2 = crate::codec::unhex(&format!("02{}", &v3[2..v3.len() - 2]));
        assert_eq!(Stored::decode(&v2), Some(none.clone()));
        let v1 = crate::codec::unhex(&format!("01{}", &v3[2..v3.len() - 4]));
        assert_eq!(Stored::decode(&v1), Some(none));
    }

    #[test]
    fn confidence_is_zero_without_an_alternative_and_grows_with_margin_and_depth() {
        let mut d = decision();
        let at = |margin: Option<f64>, score: f64, n: usize| {
            let d = Decision { margin, score, candidates: n, ..decision() };
            d.confidence().map(|c| (c * 1000.0).round() / 1000.0)
        };
        assert_eq!(at(None, 1.0, 1), Some(0.0), "one candidate: no choice was made");
        assert_eq!(at(Some(0.0), 1.0, 2), Some(0.5), "two interchangeable keys");
        assert_eq!(at(Some(0.0), 1.0, 4), Some(0.75), "four");
        assert_eq!(at(Some(0.9), 1.0, 2), Some(0.95), "a clear winner");
        assert_eq!(at(Some(1.0), 1.0, 2), Some(1.0));
        assert_eq!(at(Some(0.5), 0.0, 2), Some(0.5), "a zero score has no margin to speak of");
        d.chosen = None;
        assert_eq!(d.confidence(), None);
    }

    #[test]
    fn explanations_name_the_goal_the_figure_and_every_listed_exclusion() {
        let c = cfg();
        let rec = |d: Decision| Stored { at_ms: 1_000, decision: d, ..stored() };
        let fair = Decision {
            objective: "fairness".into(),
            margin: Some(0.0),
            basis: None,
            excluded: vec![(2, Exclusion::QuotaExhausted, 41_000), (4, Exclusion::Critical, 0)],
            excluded_total: 5,
            ..decision()
        };
        assert_eq!(
            rec(fair).explain(&c),
            "chose k2: its turn (an even spread by weight) among 3 available; k3 quota used up, resets in 40 s, k5 quota critical, +3 more excluded"
        );
        let tie = Decision { margin: Some(0.0), excluded: vec![], excluded_total: 0, ..decision() };
        assert_eq!(
            rec(tie).explain(&c),
            "chose k2: lowest cost 0.00015/1k tokens, tied: taking turns among 3 available"
        );
        let only = Decision {
            objective: "latency".into(),
            margin: None,
            candidates: 1,
            basis: Some(230.5),
            excluded: vec![(0, Exclusion::Exhausted, 1_000 + 3 * 86_400_000)],
            excluded_total: 1,
            ..decision()
        };
        assert_eq!(
            rec(only).explain(&c),
            "chose k2: fastest, 230.5 ms to first byte, the only key available; k1 exhausted for 3 d"
        );
        let weighted = Decision {
            objective: "cost=0.5,reliability=0.5".into(),
            excluded: vec![],
            excluded_total: 0,
            ..decision()
        };
        assert_eq!(
            rec(weighted).explain(&c),
            "chose k2: best score 0.950 for cost=0.5,reliability=0.5 (on cost: lowest cost 0.00015/1k tokens) among 3 available"
        );
        let none = Decision {
            chosen: None,
            excluded: vec![(0, Exclusion::Throttled, 9_000)],
            excluded_total: 1,
            ..decision()
        };
        assert_eq!(rec(none).explain(&c), "no key could serve; k1 cooling 8 s");
        assert_eq!(rec(Decision::probe(3)).explain(&c).split(':').next(), Some("probed k4"));
    }

    #[test]
    fn malformed_ring_records_decode_to_none() {
        let b = stored().encode();
        for cut in 0..b.len() {
            assert_eq!(Stored::decode(&b[..cut]), None, "cut at {cut}");
        }
        assert_eq!(Stored::decode(&[]), None);
    }
}
