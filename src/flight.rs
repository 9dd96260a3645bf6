//! Requests in flight on this VM, shared by the two stages.
//!
//! Both stages run in the same VM on the same worker thread (one `vm_id`),
//! so the ingress stage leaves what it learned here, keyed by the request's
//! `x-request-id`, and each upstream attempt reads it: which provider, which
//! keys this request has already tried. The header map carries over between
//! attempts, so the key itself stays visible to every attempt.

use crate::budget::{Held, Price};
use crate::objective::Objective;
use crate::usage::Usage;
use hashbrown::HashMap;
use rust_decimal::Decimal;

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
    pub model: Option<String>,
    /// The model's price, when the table has it.
    pub price: Option<Price>,
    pub prompt_tokens_est: u64,
    pub output_tokens_est: u64,
    /// Amounts reserved at admission, until settled or released.
    pub held: Vec<Held>,
    /// Soft budgets this request went over.
    pub soft_over: Vec<usize>,
    /// The reservation was replaced by the actual cost.
    pub settled: bool,
    /// Upstream attempts started and not yet finished.
    pub in_flight: u32,
    /// The ingress stage has finished with the request.
    pub ingress_done: bool,
    /// The served attempt: its key, usage and cost.
    pub key: Option<usize>,
    pub usage: Option<Usage>,
    pub cost: Option<Decimal>,
    /// The served attempt's decision summary.
    pub decision: Option<String>,
    /// The authenticated client, by index into `Config::clients`.
    pub client: Option<usize>,
}

/// A JSON object written field by field.
#[derive(Default)]
struct JsonObject(String);

impl JsonObject {
    fn name(&mut self, name: &str) {
        self.0.push(if self.0.is_empty() { '{' } else { ',' });
        self.0.push('"');
        self.0.push_str(name);
        self.0.push_str("\":");
    }

    fn text(&mut self, name: &str, value: &str) {
        self.name(name);
        self.0.push('"');
        for c in value.chars() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                c if (c as u32) < 0x20 => self.0.push_str(&format!("\\u{:04x}", c as u32)),
                c => self.0.push(c),
            }
        }
        self.0.push('"');
    }

    fn number(&mut self, name: &str, value: u64) {
        self.name(name);
        self.0.push_str(&value.to_string());
    }

    fn finish(mut self) -> String {
        if self.0.is_empty() {
            self.0.push('{');
        }
        self.0.push('}');
        self.0
    }
}

/// What must happen to a request's reservation when a stage lets go of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Letting {
    /// Someone else still holds the request.
    Keep,
    /// The last holder: give back what is still reserved, then forget it.
    Release(Vec<Held>),
}

impl Flight {
    /// The request's outcome as one JSON object for access logs
    /// (`%FILTER_STATE(wasm.apikeyrouter:PLAIN)%`): key, provider, attempts,
    /// client and team, tokens, cost and the decision summary. Written by
    /// hand: it is built for every request.
    pub fn outcome_json(&self, cfg: &crate::config::Config) -> String {
        let mut o = JsonObject::default();
        if let Some(k) = self.key.and_then(|k| cfg.keys.get(k)) {
            o.text("key_id", &k.id);
        }
        if let Some(p) = cfg.providers.get(self.provider) {
            o.text("provider", &p.id);
        }
        o.number("attempts", u64::from(self.attempts));
        if let Some(c) = self.client.and_then(|c| cfg.clients.get(c)) {
            o.text("client", &c.id);
            if let Some(t) = &c.team {
                o.text("team", t);
            }
        }
        if let Some(u) = self.usage {
            o.number("input_tokens", u.input);
            o.number("output_tokens", u.output);
            o.number("total_tokens", u.total);
        }
        if let Some(c) = self.cost {
            o.text("cost", &crate::budget::show(c));
        }
        if let Some(d) = &self.decision {
            o.text("decision", d);
        }
        o.finish()
    }

    /// The ingress stage is done (its `on_log`).
    pub fn ingress_finished(&mut self) -> Letting {
        self.ingress_done = true;
        self.last_one()
    }

    /// An upstream attempt is done (its `on_done`).
    pub fn attempt_finished(&mut self) -> Letting {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.ingress_done {
            self.last_one()
        } else {
            Letting::Keep
        }
    }

    fn last_one(&mut self) -> Letting {
        if self.in_flight > 0 {
            return Letting::Keep;
        }
        if self.settled {
            Letting::Release(Vec::new())
        } else {
            self.settled = true;
            Letting::Release(std::mem::take(&mut self.held))
        }
    }

    /// Takes the reservation for a true-up, once.
    pub fn take_for_settlement(&mut self) -> Option<Vec<Held>> {
        if self.settled {
            return None;
        }
        self.settled = true;
        Some(std::mem::take(&mut self.held))
    }
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
    fn outcome_json_is_valid_json_with_every_field_escaped() {
        let json = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"s"}]}]}"#;
        let cfg = match crate::config::compile(json.as_bytes(), &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let f = Flight {
            key: Some(0),
            attempts: 2,
            usage: Some(Usage { input: 3, output: 4, total: 7, ..Usage::default() }),
            cost: Some(Decimal::new(15, 4)),
            decision: Some("objective=cost; key=k1 \"\\\n\u{1}é".into()),
            ..Flight::default()
        };
        let parsed: serde_json::Value = match serde_json::from_str(&f.outcome_json(&cfg)) {
            Ok(v) => v,
            Err(e) => panic!("{e}: {}", f.outcome_json(&cfg)),
        };
        assert_eq!(
            parsed,
            serde_json::json!({"key_id": "k1", "provider": "openai", "attempts": 2, "input_tokens": 3,
                "output_tokens": 4, "total_tokens": 7, "cost": "0.0015",
                "decision": "objective=cost; key=k1 \"\\\n\u{1}é"})
        );
        assert_eq!(Flight::default().outcome_json(&cfg), r#"{"provider":"openai","attempts":0}"#);
    }

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

    fn held() -> Vec<Held> {
        vec![Held { budget: 0, window_start_ms: 0, amount: Decimal::ONE }]
    }

    #[test]
    fn the_reservation_is_settled_once_or_released_by_the_last_holder() {
        // Normal: the attempt settles, then both let go; nothing to release.
        let mut f = Flight { held: held(), in_flight: 1, ..Flight::default() };
        assert_eq!(f.take_for_settlement(), Some(held()));
        assert_eq!(f.take_for_settlement(), None);
        assert_eq!(f.attempt_finished(), Letting::Keep);
        assert_eq!(f.ingress_finished(), Letting::Release(vec![]));

        // The client left first: the attempt still running releases.
        let mut f = Flight { held: held(), in_flight: 1, ..Flight::default() };
        assert_eq!(f.ingress_finished(), Letting::Keep);
        assert_eq!(f.attempt_finished(), Letting::Release(held()));

        // Every attempt failed: the ingress stage releases.
        let mut f = Flight { held: held(), in_flight: 2, ..Flight::default() };
        assert_eq!(f.attempt_finished(), Letting::Keep);
        assert_eq!(f.attempt_finished(), Letting::Keep);
        assert_eq!(f.ingress_finished(), Letting::Release(held()));
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
