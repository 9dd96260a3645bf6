//! Explainable routing decisions: what was chosen, with what score and
//! margin, among how many candidates, and why every other key was left out.
//!
//! A decision is summarised in the `x-apikeyrouter-decision` response header
//! and kept in a bounded ring in shared data for the admin API. Ring records
//! are a compact binary form (cheap on the request path); the admin API turns
//! them into JSON.

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
    /// Score margin over the runner-up; `None` with a single candidate.
    pub margin: Option<f64>,
    pub candidates: usize,
    /// The first excluded keys and why (at most [`MAX_LISTED`]).
    pub excluded: Vec<(usize, Exclusion)>,
    /// How many keys were excluded in all.
    pub excluded_total: usize,
}

/// Exclusions listed in full in the header and in ring records.
pub const MAX_LISTED: usize = 16;

impl Decision {
    /// A decision that found no key.
    pub fn none(
        objective: &crate::objective::Objective,
        excluded: Vec<(usize, Exclusion)>,
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
        }
    }

    /// The `x-apikeyrouter-decision` header value, e.g.
    /// `objective=cost; key=k2; score=0.950; margin=0.120; candidates=3; excluded=k1:throttled`.
    pub fn summary(&self, cfg: &Config) -> String {
        let key = self.chosen.and_then(|k| cfg.keys.get(k)).map_or("-", |k| k.id.as_str());
        let mut s = format!(
            "objective={}; key={}; score={:.3}; margin={}; candidates={}",
            self.objective,
            key,
            self.score,
            self.margin.map_or("-".to_string(), |m| format!("{m:.3}")),
            self.candidates
        );
        if !self.excluded.is_empty() {
            s.push_str("; excluded=");
            let listed: Vec<String> = self
                .excluded
                .iter()
                .take(MAX_LISTED)
                .map(|(k, why)| format!("{}:{}", cfg.keys.get(*k).map_or("?", |k| k.id.as_str()), why.as_str()))
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

/// Ring records are written in version 3 (with `chain`); versions 1
/// (without `charged`) and 2 (without `chain`) are still read.
const VERSION: u8 = 3;

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
        for (k, why) in d.excluded.iter().take(listed) {
            out.u32(*k as u32).u8(*why as u8);
        }
        out.u8(self.charged.map_or(0, |b| b as u8));
        out.short_str(&self.chain);
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
            excluded.push((k, Exclusion::from_u8(r.u8()?)?));
        }
        let charged = if version >= 2 { r.u8().map(Basis::from_u8)? } else { None };
        let chain = if version >= 3 { r.short_str()? } else { String::new() };

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
            },
            charged,
            chain,
        })
    }

    pub fn to_json(&self, cfg: &Config) -> Value {
        let d = &self.decision;
        let key = d.chosen.and_then(|k| cfg.keys.get(k));
        let excluded: Vec<Value> = d
            .excluded
            .iter()
            .map(|(k, why)| json!({"key": cfg.keys.get(*k).map(|k| k.id.as_str()), "reason": why.as_str()}))
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
            "confidence": d.margin,
            "candidates": d.candidates,
            "excluded": excluded,
            "excluded_total": d.excluded_total,
            "charged": self.charged.map(Basis::as_str),
            "chain": (!self.chain.is_empty()).then_some(self.chain.as_str()),
        })
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
            excluded: vec![(0, Exclusion::Throttled), (3, Exclusion::Disabled)],
            excluded_total: 2,
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
            "objective=cost; key=k2; score=0.950; margin=0.120; candidates=3; excluded=k1:throttled,k4:disabled"
        );
    }

    #[test]
    fn summary_is_bounded_however_many_keys_are_excluded() {
        let mut d = decision();
        d.excluded = (0..16).map(|k| (k, Exclusion::Throttled)).collect();
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
        assert_eq!(v["confidence"], 0.12);
        assert_eq!(v["excluded"][0]["reason"], "throttled");
        assert_eq!(v["charged"], "partial");
    }

    #[test]
    fn ring_record_bytes_are_pinned() {
        use crate::codec::pinned;
        let s = stored();
        let bytes = concat!(
            "03",               // version
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
        let bytes = concat!(
            "03",               // version
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
        );
        assert_eq!(Stored::decode(&pinned(&none.encode(), bytes)), Some(none.clone()));
        // Version 2 (before `chain`) and version 1 (before `charged`) still read.
        let v2 = crate::codec::unhex(&format!("02{}", &bytes[2..bytes.len() - 2]));
        assert_eq!(Stored::decode(&v2), Some(none.clone()));
        let v1 = crate::codec::unhex(&format!("01{}", &bytes[2..bytes.len() - 4]));
        assert_eq!(Stored::decode(&v1), Some(none));
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
