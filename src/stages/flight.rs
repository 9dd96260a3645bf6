//! Requests in flight on this VM, shared by the two stages.
//!
//! Both stages run in the same VM on the same worker thread (one `vm_id`),
//! so the ingress stage leaves what it decided here, keyed by the request's
//! `x-request-id`, and each upstream attempt reads it. The hand-offs are
//! typed: the ingress stage writes an [`Admission`] once, when it lets the
//! request go; each attempt adds to [`Attempts`] and the served one leaves
//! its [`Served`]. The request's budget [`Reservation`] is owned by its
//! flight: the served attempt takes it to settle it, and whichever stage
//! lets go of the flight last gets what is left to release.

use crate::budget::{Price, Reservation};
use crate::charge::{self, Answer, Basis};
use crate::objective::Objective;
use crate::usage::Usage;
use hashbrown::HashMap;
use rust_decimal::Decimal;
use std::cell::Cell;
use std::rc::Rc;

/// What the ingress stage decided for a request; written once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Admission {
    pub provider: usize,
    /// The objective from the request header, route metadata or policy;
    /// `None` means the configured default.
    pub objective: Option<Objective>,
    /// The authenticated client, by index into `Config::clients`.
    pub client: Option<usize>,
    /// The model's price, when the table has it.
    pub price: Option<Price>,
    pub prompt_tokens_est: u64,
    pub output_tokens_est: u64,
    /// Soft budgets this request went over.
    pub soft_over: Vec<usize>,
    /// A `GET`, `HEAD` or `DELETE`: it reads or removes what an earlier
    /// request made (a background response's poll), so it is never charged.
    pub read_only: bool,
}

/// The attempts of a request so far (written by the attempt stage).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attempts {
    /// Attempts started.
    pub count: u32,
    /// Keys already used by earlier attempts.
    pub tried: Vec<usize>,
    /// Attempts started and not yet finished.
    pub in_flight: u32,
}

/// The served attempt: its key, the tokens and cost it was charged (or the
/// usage it reported, when it was not charged), how the charge was worked
/// out, and its decision summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Served {
    pub key: Option<usize>,
    pub usage: Option<Usage>,
    pub cost: Option<Decimal>,
    pub charged: Option<Basis>,
    pub decision: Option<String>,
    /// While a 2xx answer passes, before it is charged: what has passed,
    /// updated by its attempt. When the caller hangs up, Envoy logs the
    /// request before the attempt ends; the outcome then shows the charge
    /// the attempt is about to make for it.
    pub live: Option<Rc<Cell<Answer>>>,
}

/// What the stages share about one request.
#[derive(Debug, Default)]
pub struct Flight {
    pub started_ms: u64,
    pub admission: Admission,
    pub attempts: Attempts,
    pub served: Served,
    /// Held at admission until the served attempt settles it or the last
    /// holder releases it.
    reservation: Option<Reservation>,
    /// The ingress stage has finished with the request.
    ingress_done: bool,
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

impl Flight {
    /// A request the ingress stage has just seen.
    pub fn new(started_ms: u64) -> Flight {
        Flight { started_ms, ..Flight::default() }
    }

    /// The request's outcome as one JSON object for access logs
    /// (`%FILTER_STATE(wasm.apikeyrouter:PLAIN)%`): key, provider, attempts,
    /// client and team, tokens, cost, how it was charged and the decision
    /// summary. Written by hand: it is built for every request.
    pub fn outcome_json(&self, cfg: &crate::config::Config) -> String {
        let mut o = JsonObject::default();
        let served = &self.served;
        if let Some(k) = served.key.and_then(|k| cfg.keys.get(k)) {
            o.text("key_id", &k.id);
        }
        if let Some(p) = cfg.providers.get(self.admission.provider) {
            o.text("provider", &p.id);
        }
        o.number("attempts", u64::from(self.attempts.count));
        if let Some(c) = self.admission.client.and_then(|c| cfg.clients.get(c)) {
            o.text("client", &c.id);
            if let Some(t) = &c.team {
                o.text("team", t);
            }
        }
        let a = &self.admission;
        let cut = served.live.as_ref().zip(served.key.and_then(|k| cfg.keys.get(k))).map(|(live, key)| {
            charge::charge(&live.get(), (a.prompt_tokens_est, a.output_tokens_est), a.price.as_ref(), &key.pricing)
        });
        let (usage, cost, charged) = match cut {
            Some(c) => (Some(c.tokens), c.cost, Some(c.basis)),
            None => (served.usage, served.cost, served.charged),
        };
        if let Some(u) = usage {
            o.number("input_tokens", u.input);
            o.number("output_tokens", u.output);
            o.number("total_tokens", u.total);
        }
        if let Some(c) = cost {
            o.text("cost", &crate::budget::show(c));
        }
        if let Some(b) = charged {
            o.text("charged", b.as_str());
        }
        if let Some(d) = &served.decision {
            o.text("decision", d);
        }
        o.finish()
    }

    /// The ingress stage's decision, with the reservation it made; once.
    pub fn admit(&mut self, admission: Admission, reservation: Reservation) -> Result<(), Reservation> {
        if self.reservation.is_some() {
            return Err(reservation);
        }
        self.admission = admission;
        self.reservation = Some(reservation);
        Ok(())
    }

    /// The request's reservation, while it is held (for a stream's running
    /// cost check).
    pub fn reservation(&self) -> Option<&Reservation> {
        self.reservation.as_ref()
    }

    /// Takes the reservation for the served attempt to settle, once.
    pub fn take_for_settlement(&mut self) -> Option<Reservation> {
        self.reservation.take()
    }

    fn done(&self) -> bool {
        self.ingress_done && self.attempts.in_flight == 0
    }
}

/// Which stage lets go of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The ingress stage (its `on_log`).
    Ingress,
    /// One upstream attempt (its `on_done`).
    Attempt,
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

    pub fn get(&self, id: &str) -> Option<&Flight> {
        self.map.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Flight> {
        self.map.get_mut(id)
    }

    /// A stage lets go of the request. The last one (the ingress stage
    /// done and no attempt in flight) removes the flight and gets the
    /// reservation still held, to release: the one release path.
    pub fn let_go(&mut self, id: &str, who: Holder) -> Option<Reservation> {
        let f = self.map.get_mut(id)?;
        match who {
            Holder::Ingress => f.ingress_done = true,
            Holder::Attempt => f.attempts.in_flight = f.attempts.in_flight.saturating_sub(1),
        }
        if !f.done() {
            return None;
        }
        self.map.remove(id).and_then(|mut f| f.reservation.take())
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
    use crate::budget::Held;

    #[test]
    fn outcome_json_is_valid_json_with_every_field_escaped() {
        let json = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"s"}]}]}"#;
        let cfg = match crate::config::compile(json.as_bytes(), &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let f = Flight {
            attempts: Attempts { count: 2, ..Attempts::default() },
            served: Served {
                key: Some(0),
                usage: Some(Usage { input: 3, output: 4, total: 7, ..Usage::default() }),
                cost: Some(Decimal::new(15, 4)),
                charged: Some(Basis::Partial),
                live: None,
                decision: Some("objective=cost; key=k1 \"\\\n\u{1}é".into()),
            },
            ..Flight::default()
        };
        let parsed: serde_json::Value = match serde_json::from_str(&f.outcome_json(&cfg)) {
            Ok(v) => v,
            Err(e) => panic!("{e}: {}", f.outcome_json(&cfg)),
        };
        assert_eq!(
            parsed,
            serde_json::json!({"key_id": "k1", "provider": "openai", "attempts": 2, "input_tokens": 3,
                "output_tokens": 4, "total_tokens": 7, "cost": "0.0015", "charged": "partial",
                "decision": "objective=cost; key=k1 \"\\\n\u{1}é"})
        );
        assert_eq!(Flight::default().outcome_json(&cfg), r#"{"provider":"openai","attempts":0}"#);
    }

    fn held() -> Vec<Held> {
        vec![Held { budget: 0, window_start_ms: 0, bucket: 1, amount: Decimal::ONE }]
    }

    /// A flight admitted with `held()` and `attempts` attempts running.
    fn admitted(attempts: u32) -> Flights {
        let mut f = Flights::default();
        f.insert("r".into(), Flight::default(), 0);
        if let Some(fl) = f.get_mut("r") {
            assert!(fl.admit(Admission::default(), Reservation::of(held())).is_ok());
            fl.attempts.in_flight = attempts;
        }
        f
    }

    #[test]
    fn the_admission_is_written_once() {
        let mut f = admitted(0);
        let again = f
            .get_mut("r")
            .map(|fl| fl.admit(Admission { provider: 3, ..Admission::default() }, Reservation::of(held())));
        assert_eq!(again, Some(Err(Reservation::of(held()))), "the second reservation comes back to be released");
        assert_eq!(f.get_mut("r").map(|fl| fl.admission.provider), Some(0));
    }

    #[test]
    fn the_reservation_is_settled_once_or_released_by_the_last_holder() {
        // Normal: the attempt settles, then both let go; nothing to release.
        let mut f = admitted(1);
        assert_eq!(f.get_mut("r").and_then(|fl| fl.take_for_settlement()), Some(Reservation::of(held())));
        assert_eq!(f.get_mut("r").and_then(|fl| fl.take_for_settlement()), None);
        assert_eq!(f.let_go("r", Holder::Attempt), None);
        assert_eq!(f.let_go("r", Holder::Ingress), None);
        assert!(!f.contains("r"), "the last holder removed it");

        // The client left first: the attempt still running releases.
        let mut f = admitted(1);
        assert_eq!(f.let_go("r", Holder::Ingress), None);
        assert!(f.contains("r"));
        assert_eq!(f.let_go("r", Holder::Attempt), Some(Reservation::of(held())));

        // Every attempt failed: the ingress stage releases.
        let mut f = admitted(2);
        assert_eq!(f.let_go("r", Holder::Attempt), None);
        assert_eq!(f.let_go("r", Holder::Attempt), None);
        assert_eq!(f.let_go("r", Holder::Ingress), Some(Reservation::of(held())));
        assert_eq!(f.let_go("r", Holder::Ingress), None, "gone: nothing is released twice");
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
