//! Requests in flight on this VM, shared by the two stages.
//!
//! Both stages run in the same VM on the same worker thread (one `vm_id`),
//! so the ingress stage leaves what it decided here and each upstream
//! attempt reads it. A flight is keyed by a nonce no caller sees or sends:
//! a keyed hash (SipHash under this VM's random keys) of a counter, drawn
//! again until no live flight has it. The ingress stage hands it to the
//! attempts through filter state ([`FLIGHT_PROPERTY`]), which callers
//! cannot write; the caller's `x-request-id` is only a label
//! ([`Admission::request_id`]). The hand-offs are
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
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::rc::Rc;

/// The property (Envoy filter state `wasm.apikeyrouter_flight`) through
/// which the ingress stage tells each attempt its flight. Envoy gives a
/// router upstream filter the downstream stream's filter state.
pub const FLIGHT_PROPERTY: &str = "apikeyrouter_flight";

/// The response header on an answer the attempt stage turned into an
/// internal redirect to the next provider: the status it had.
pub const FALLOVER_HEADER: &str = "x-apikeyrouter-fallover";

/// The longest request-id label kept (a decision record keeps 255 bytes).
const MAX_LABEL: usize = 255;

/// What the ingress stage decided for a request; written once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Admission {
    /// The request's `x-request-id` (the caller's, or one the ingress
    /// stage made): a label for decision records and logs, never a key.
    pub request_id: String,
    pub provider: usize,
    /// The objective from the request header, route metadata or policy;
    /// `None` means the configured default.
    pub objective: Option<Objective>,
    /// The authenticated client, by index into `Config::clients`.
    pub client: Option<usize>,
    /// The model's price, when the table has it.
    pub price: Option<Price>,
    /// The model's metric label ([`crate::budget::PriceTable::label`]).
    pub model_label: String,
    /// The model as policy and prices know it, for access logs (kept only
    /// when they are written).
    pub model: Option<String>,
    pub prompt_tokens_est: u64,
    pub output_tokens_est: u64,
    /// The cost upper bound reserved at admission.
    pub estimate: Decimal,
    /// Soft budgets this request went over.
    pub soft_over: Vec<usize>,
    /// A `GET`, `HEAD` or `DELETE`: it reads or removes what an earlier
    /// request made (a background response's poll), so it is never charged.
    pub read_only: bool,
    /// What the request does with objects the provider keeps.
    pub objects: ObjectPlan,
}

/// A request's part in object affinity (see [`crate::objects`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectPlan {
    /// Only keys of the request's provider in this group may serve it.
    pub group: Option<String>,
    /// A 2xx answer creates an object of this kind: it is recorded.
    pub creates: Option<crate::objects::Kind>,
    /// A list answer: filtered to the caller's objects.
    pub filter_list: bool,
    /// A 2xx answer to this `DELETE` removes the object: its record goes.
    pub forget: Option<String>,
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

/// Where a request has been on its way along its `models` entry, and what
/// it needs to move on to the next provider (see [`crate::providers`]:
/// fall-over). The ingress stage keeps the request as the caller sent it;
/// the attempts add what each key answered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fallover {
    /// The request's path as the caller sent it (credentials removed):
    /// the next hop adapts it to its provider again.
    pub path: String,
    /// The request's `:authority`: the redirect keeps it.
    pub authority: String,
    /// The model as policy, prices and budgets know it; `renamed` when a
    /// policy alias named it.
    pub model: Option<String>,
    pub renamed: bool,
    /// The providers tried, in order, each with what its attempts got
    /// (`"key status"`).
    pub chain: Vec<(usize, Vec<String>)>,
    /// Hops the ingress stage has claimed (0: the request's first pass).
    pub hop: u32,
    /// An attempt turned its answer into an internal redirect to the next
    /// provider, which no hop has claimed yet.
    pub pending: bool,
    /// The ingress stage was logged (the caller gone) while a redirect was
    /// pending: unless a hop claims it, the flight is abandoned.
    pub logged_while_pending: bool,
    /// The soonest a key of a provider passed in the chain frees up (ms).
    pub soonest_free_ms: Option<u64>,
}

impl Fallover {
    /// The chain as a decision header shows it:
    /// `openai: openai-1 429, openai-2 429 -> azure: azure-1 200`.
    pub fn text(&self, cfg: &crate::config::Config) -> String {
        let mut out = String::new();
        for (i, (p, tries)) in self.chain.iter().enumerate() {
            if i > 0 {
                out.push_str(" -> ");
            }
            out.push_str(cfg.providers.get(*p).map_or("?", |p| p.id.as_str()));
            out.push(':');
            for (j, t) in tries.iter().enumerate() {
                out.push_str(if j == 0 { " " } else { ", " });
                out.push_str(t);
            }
        }
        out
    }

    /// Notes what an attempt of `provider` got.
    pub fn note(&mut self, provider: usize, what: String) {
        match self.chain.last_mut() {
            Some((p, tries)) if *p == provider => tries.push(what),
            _ => self.chain.push((provider, vec![what])),
        }
    }

    /// The providers tried so far.
    pub fn tried(&self) -> impl Iterator<Item = usize> + '_ {
        self.chain.iter().map(|(p, _)| *p)
    }

    /// Keeps the sooner of `at_ms` and what the chain had.
    pub fn frees_at(&mut self, at_ms: u64) {
        self.soonest_free_ms = Some(self.soonest_free_ms.map_or(at_ms, |s| s.min(at_ms)));
    }
}

/// What the stages share about one request.
#[derive(Debug, Default)]
pub struct Flight {
    pub started_ms: u64,
    pub admission: Admission,
    pub attempts: Attempts,
    pub served: Served,
    pub fallover: Fallover,
    /// Held at admission until the served attempt settles it or the last
    /// holder releases it.
    reservation: Option<Reservation>,
    /// The ingress stage has finished with the request.
    ingress_done: bool,
}

/// A JSON object written field by field (access-log outcomes, alert events).
#[derive(Default)]
pub struct JsonObject(String);

impl JsonObject {
    fn name(&mut self, name: &str) {
        self.0.push(if self.0.is_empty() { '{' } else { ',' });
        self.0.push('"');
        self.0.push_str(name);
        self.0.push_str("\":");
    }

    pub fn text(&mut self, name: &str, value: &str) {
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

    pub fn number(&mut self, name: &str, value: u64) {
        self.name(name);
        self.0.push_str(&value.to_string());
    }

    /// A value already in JSON form (a decimal number).
    pub fn raw(&mut self, name: &str, value: &str) {
        self.name(name);
        self.0.push_str(value);
    }

    pub fn finish(mut self) -> String {
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
        if let Some(m) = &self.admission.model {
            o.text("model", m);
        }
        if let Some(u) = usage {
            o.number("input_tokens", u.input);
            o.number("output_tokens", u.output);
            o.number("total_tokens", u.total);
            o.number("cached_input_tokens", u.cached_input);
            o.number("reasoning_tokens", u.reasoning);
        }
        if a.prompt_tokens_est > 0 || a.output_tokens_est > 0 {
            o.number("estimated_input_tokens", a.prompt_tokens_est);
            o.number("estimated_output_tokens", a.output_tokens_est);
            o.text("estimate", &crate::budget::show(a.estimate));
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
        if self.fallover.hop > 0 {
            o.text("chain", &self.fallover.text(cfg));
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

    /// Takes the reservation to re-price it at the provider the request
    /// falls over to: the caller releases it and admits the request again.
    pub fn take_to_reprice(&mut self) -> Option<Reservation> {
        self.reservation.take()
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
    /// The ingress stage of one hop (its `on_log`): only the hop that
    /// holds the request lets go of it; an earlier hop's log (Envoy may
    /// write it after an internal redirect) changes nothing.
    Ingress(u32),
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
    /// Draws so far: the input of the keyed hash.
    seq: u64,
    /// This VM's SipHash keys (from the host's random source: WASI
    /// `random_get` on wasm32-wasip1).
    keys: RandomState,
    /// The ingress stage declared [`FLIGHT_PROPERTY`] with the downstream
    /// request's life span, so a request may move on to the next provider
    /// by an internal redirect: the next hop finds its flight.
    pub hops: bool,
}

impl Flights {
    /// The next keyed-hash output, `domain`-separated so that the request
    /// ids a caller sees reveal nothing of the flight nonces.
    fn draw(&mut self, domain: u8) -> u64 {
        self.seq = self.seq.wrapping_add(1);
        self.keys.hash_one((domain, self.seq))
    }

    /// Opens a flight under a fresh nonce, unique among the live flights,
    /// and returns the nonce. Stale flights are swept first when the table
    /// is large.
    pub fn open(&mut self, flight: Flight, now_ms: u64) -> String {
        if self.map.len() >= SWEEP_AT {
            self.map.retain(|_, f| now_ms.saturating_sub(f.started_ms) < STALE_MS);
        }
        let id = loop {
            let id = format!("{:016x}", self.draw(0));
            if !self.map.contains_key(&id) {
                break id;
            }
        };
        self.map.insert(id.clone(), flight);
        id
    }

    /// An unpredictable request id for a request that came without one,
    /// in UUID version 4 form (as Envoy's own): the caller sees it, but it
    /// is a label only.
    pub fn fresh_request_id(&mut self) -> String {
        let (a, b) = (self.draw(1), self.draw(1));
        let (a, b) = ((a & !0xf000) | 0x4000, (b & !(0xc << 60)) | (0x8 << 60));
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
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
            Holder::Ingress(hop) if hop != f.fallover.hop => return None,
            Holder::Ingress(_) if f.fallover.pending => {
                // Envoy logs the first pass as it follows the redirect (the
                // hop then claims the flight), or the caller left while a
                // retry was waiting: the tick tells them apart.
                f.fallover.logged_while_pending = true;
                return None;
            }
            Holder::Ingress(_) => f.ingress_done = true,
            Holder::Attempt => f.attempts.in_flight = f.attempts.in_flight.saturating_sub(1),
        }
        if !f.done() {
            return None;
        }
        self.map.remove(id).and_then(|mut f| f.reservation.take())
    }

    /// Flights whose caller left while a redirect to the next provider was
    /// pending and no attempt runs, removed with what they still hold, to
    /// release. Envoy follows a redirect and runs the hop's first callback
    /// in one event, where the hop claims the flight, so a flight still in
    /// this state at a tick was never followed.
    pub fn abandoned(&mut self) -> Vec<Reservation> {
        let ids: Vec<String> = self
            .map
            .iter()
            .filter(|(_, f)| f.fallover.pending && f.fallover.logged_while_pending && f.attempts.in_flight == 0)
            .map(|(id, _)| id.clone())
            .collect();
        ids.iter().filter_map(|id| self.map.remove(id)).filter_map(|mut f| f.reservation.take()).collect()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.map.contains_key(id)
    }
}

/// A request's label from its `x-request-id`: at most [`MAX_LABEL`] bytes,
/// cut at a character boundary.
pub fn label(request_id: &str) -> String {
    let mut end = request_id.len().min(MAX_LABEL);
    while !request_id.is_char_boundary(end) {
        end -= 1;
    }
    request_id[..end].to_string()
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
            admission: Admission {
                model: Some("gpt-4o-mini".into()),
                prompt_tokens_est: 5,
                output_tokens_est: 50,
                estimate: Decimal::new(5125, 7),
                ..Admission::default()
            },
            served: Served {
                key: Some(0),
                usage: Some(Usage { input: 3, output: 4, total: 7, cached_input: 2, reasoning: 1 }),
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
            serde_json::json!({"key_id": "k1", "provider": "openai", "attempts": 2, "model": "gpt-4o-mini",
                "input_tokens": 3, "output_tokens": 4, "total_tokens": 7, "cached_input_tokens": 2,
                "reasoning_tokens": 1, "estimated_input_tokens": 5, "estimated_output_tokens": 50,
                "estimate": "0.0005125", "cost": "0.0015", "charged": "partial",
                "decision": "objective=cost; key=k1 \"\\\n\u{1}é"})
        );
        assert_eq!(Flight::default().outcome_json(&cfg), r#"{"provider":"openai","attempts":0}"#);
    }

    fn held() -> Vec<Held> {
        vec![Held { budget: 0, window_start_ms: 0, bucket: 1, amount: Decimal::ONE }]
    }

    /// A flight admitted with `held()` and `attempts` attempts running,
    /// and its id.
    fn admitted(attempts: u32) -> (Flights, String) {
        let mut f = Flights::default();
        let id = f.open(Flight::default(), 0);
        if let Some(fl) = f.get_mut(&id) {
            assert!(fl.admit(Admission::default(), Reservation::of(held())).is_ok());
            fl.attempts.in_flight = attempts;
        }
        (f, id)
    }

    #[test]
    fn the_admission_is_written_once() {
        let (mut f, r) = admitted(0);
        let again = f
            .get_mut(&r)
            .map(|fl| fl.admit(Admission { provider: 3, ..Admission::default() }, Reservation::of(held())));
        assert_eq!(again, Some(Err(Reservation::of(held()))), "the second reservation comes back to be released");
        assert_eq!(f.get_mut(&r).map(|fl| fl.admission.provider), Some(0));
    }

    #[test]
    fn the_reservation_is_settled_once_or_released_by_the_last_holder() {
        // Normal: the attempt settles, then both let go; nothing to release.
        let (mut f, r) = admitted(1);
        assert_eq!(f.get_mut(&r).and_then(|fl| fl.take_for_settlement()), Some(Reservation::of(held())));
        assert_eq!(f.get_mut(&r).and_then(|fl| fl.take_for_settlement()), None);
        assert_eq!(f.let_go(&r, Holder::Attempt), None);
        assert_eq!(f.let_go(&r, Holder::Ingress(0)), None);
        assert!(!f.contains(&r), "the last holder removed it");

        // The client left first: the attempt still running releases.
        let (mut f, r) = admitted(1);
        assert_eq!(f.let_go(&r, Holder::Ingress(0)), None);
        assert!(f.contains(&r));
        assert_eq!(f.let_go(&r, Holder::Attempt), Some(Reservation::of(held())));

        // Every attempt failed: the ingress stage releases.
        let (mut f, r) = admitted(2);
        assert_eq!(f.let_go(&r, Holder::Attempt), None);
        assert_eq!(f.let_go(&r, Holder::Attempt), None);
        assert_eq!(f.let_go(&r, Holder::Ingress(0)), Some(Reservation::of(held())));
        assert_eq!(f.let_go(&r, Holder::Ingress(0)), None, "gone: nothing is released twice");
    }

    #[test]
    fn only_the_hop_holding_the_request_lets_go_of_it() {
        // An attempt redirected the request to the next provider: the first
        // pass's log (Envoy writes one for it) lets go of nothing.
        let (mut f, r) = admitted(0);
        if let Some(fl) = f.get_mut(&r) {
            fl.fallover.pending = true;
        }
        assert_eq!(f.let_go(&r, Holder::Ingress(0)), None);
        assert!(f.contains(&r), "the next hop will find it");
        // The next hop claimed it: still only that hop lets go.
        if let Some(fl) = f.get_mut(&r) {
            fl.fallover.pending = false;
            fl.fallover.hop = 1;
        }
        assert_eq!(f.let_go(&r, Holder::Ingress(0)), None);
        assert_eq!(f.let_go(&r, Holder::Ingress(1)), Some(Reservation::of(held())));
        assert!(!f.contains(&r));
    }

    #[test]
    fn the_chain_shows_each_provider_with_what_its_keys_answered() {
        let json = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"s"},{"id":"k2","secret":"t"}]},
            {"id":"azure","kind":"azure","keys":[{"id":"a1","secret":"u"}]}]}"#;
        let cfg = match crate::config::compile(json.as_bytes(), &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let mut fo = Fallover::default();
        fo.note(0, "k1 429".into());
        fo.note(0, "k2 429".into());
        fo.note(1, "a1 200".into());
        assert_eq!(fo.text(&cfg), "openai: k1 429, k2 429 -> azure: a1 200");
        assert_eq!(fo.tried().collect::<Vec<_>>(), [0, 1]);
        fo.frees_at(9_000);
        fo.frees_at(5_000);
        fo.frees_at(7_000);
        assert_eq!(fo.soonest_free_ms, Some(5_000), "the soonest any provider frees up");
    }

    #[test]
    fn stale_entries_are_swept_when_the_table_is_large() {
        let mut f = Flights::default();
        for _ in 0..SWEEP_AT {
            f.open(Flight::default(), 0);
        }
        let new = f.open(Flight { started_ms: STALE_MS + 1, ..Flight::default() }, STALE_MS + 1);
        assert_eq!(f.len(), 1);
        assert!(f.contains(&new));
    }

    #[test]
    fn a_flight_id_is_a_keyed_hash_that_is_drawn_again_when_a_live_flight_has_it() {
        let mut f = Flights::default();
        // The id the next draw gives, already taken by a live flight.
        let next = format!("{:016x}", f.keys.hash_one((0u8, f.seq + 1)));
        f.map.insert(next.clone(), Flight { started_ms: 42, ..Flight::default() });
        let id = f.open(Flight::default(), 0);
        assert_ne!(id, next, "a live flight's id is never handed out again");
        assert_eq!(f.get(&next).map(|fl| fl.started_ms), Some(42), "the live flight is untouched");
        assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        // Another VM draws under keys of its own: its first id is another.
        let first = |keys: RandomState| Flights { keys, ..Flights::default() }.open(Flight::default(), 0);
        assert_eq!(first(f.keys.clone()), first(f.keys.clone()));
        assert_ne!(first(f.keys.clone()), first(RandomState::new()));
    }

    #[test]
    fn a_made_up_request_id_is_a_fresh_uuid_v4() {
        let mut f = Flights::default();
        let a = f.fresh_request_id();
        let b = f.fresh_request_id();
        assert_ne!(a, b);
        for id in [&a, &b] {
            let parts: Vec<&str> = id.split('-').collect();
            assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "{id}");
            assert!(parts[2].starts_with('4') && "89ab".contains(&parts[3][..1]), "{id}");
        }
    }

    #[test]
    fn a_label_is_cut_at_255_bytes_on_a_character_boundary() {
        assert_eq!(label("req-1"), "req-1");
        assert_eq!(label(&"x".repeat(300)).len(), 255);
        let cut = label(&format!("{}é", "x".repeat(254)));
        assert_eq!(cut, "x".repeat(254));
    }
}
