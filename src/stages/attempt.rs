//! The attempt stage (router upstream filter, once per upstream attempt):
//! chooses a key for the request's objective, writes the provider's auth
//! header, applies the per-status action (cooldown, disable, exhaust) before
//! Envoy's retry picks the next key, reads usage from JSON or SSE as it
//! passes, records the attempt, and charges its answer by the rules of
//! [`crate::charge`].

use super::flight::{Flights, Holder, ObjectPlan, Served, FALLOVER_HEADER, FLIGHT_PROPERTY};
use super::host::{Buffer, Host, Map, Next};
use super::worker_state::WorkerState;
use crate::budget::{self, Price, Reservation};
use crate::charge::{self, Answer, Charge};
use crate::config::{Config, RoutingHeaders, StatusAction};
use crate::decision::{Decision, Stored};
use crate::identity;
use crate::key_record::{Capacity, Effective, KeyRecord, Outcome, Reason};
use crate::keys::{read_record, record_attempt, stale_choice, KeyAction};
use crate::metrics;
use crate::objective::Objective;
use crate::objects;
use crate::provider_error::{self, RETRY_HEADER, RETRY_VALUE};
use crate::ratelimit::{cooldown_ms, Signals};
use crate::reply;
use crate::usage::{self, SseUsage};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Non-streaming bodies larger than this are not held whole (Envoy's buffer
/// limit in the shipped configs is 16 MiB or more): they pass on as they
/// come, and usage is read from their tail. The size is known up front from
/// `content-length`; a body without one is let go once it passes
/// [`MAX_UNSIZED_JSON`], leaving room for Envoy's large reads below its limit.
const MAX_JSON_BODY: usize = 12 << 20;
const MAX_UNSIZED_JSON: usize = 4 << 20;
/// How much of a large body's end is kept to find its usage.
const TAIL: usize = 64 << 10;
/// Error bodies larger than this are not inspected for an error code.
const MAX_PROBE_BODY: usize = 64 << 10;

enum Body {
    Ignore,
    /// A JSON response read whole for its usage; `hold` keeps the headers
    /// back until the cost is known, for `x-apikeyrouter-cost`.
    Json {
        hold: bool,
        /// Stop holding past this many bytes.
        cap: usize,
    },
    /// A JSON body too large to hold: the last bytes seen, for its usage.
    JsonTail(Vec<u8>),
    Sse(Box<SseUsage>),
    /// A 4xx whose `error.code` may carry an action: held until read.
    Probe,
}

pub struct Attempt {
    id: u32,
    cfg: Rc<Config>,
    routing: Rc<RefCell<WorkerState>>,
    flights: Rc<RefCell<Flights>>,
    key: Option<usize>,
    attempt: u32,
    started_ns: u64,
    latency_us: Option<u64>,
    status: u32,
    /// Rate-limit headers of the response, kept for the final record.
    signals: Vec<(String, String)>,
    decision: Option<String>,
    body: Body,
    usage: Option<usage::Usage>,
    recorded: bool,
    /// The request's flight (its nonce), when the ingress stage opened one.
    flight: Option<String>,
    /// The request's `x-request-id`, for the decision record.
    label: String,
    /// The model's price and the request's token estimates, from admission.
    price: Option<Price>,
    estimate_tokens: (u64, u64),
    /// Held against budgets scoped to the chosen key; this attempt owns it.
    key_held: Option<Reservation>,
    /// The request only reads or removes (`GET`, `HEAD`, `DELETE`): its
    /// answer is never charged.
    read_only: bool,
    /// The routing decision, recorded with its charge when the attempt ends.
    decided: Option<Stored>,
    /// What has passed of a 2xx answer, shared with the flight (see
    /// [`Served::live`]).
    live: Option<Rc<Cell<Answer>>>,
    /// The stream was ended early because a hard budget was crossed.
    cut: bool,
    /// The request's client, from the ingress stage.
    client: Option<usize>,
    /// The response arrived whole (its end of stream was seen).
    complete: bool,
    next_cutoff_check: u64,
    /// This attempt is the half-open probe of a disabled key.
    probe: bool,
    /// The provider the ingress stage chose for this hop.
    provider: usize,
    /// The request's part in object affinity, from the ingress stage.
    objects: ObjectPlan,
    /// A streamed answer's last bytes, for an object id split across
    /// chunks; `None` once the created object is recorded (or none is).
    sse_carry: Option<Vec<u8>>,
    /// The model's metric label, from admission (empty: `other`).
    model: String,
}

impl Attempt {
    pub fn new(id: u32, cfg: Rc<Config>, routing: Rc<RefCell<WorkerState>>, flights: Rc<RefCell<Flights>>) -> Attempt {
        Attempt {
            id,
            cfg,
            routing,
            flights,
            key: None,
            attempt: 0,
            started_ns: 0,
            latency_us: None,
            status: 0,
            signals: Vec::new(),
            decision: None,
            body: Body::Ignore,
            usage: None,
            recorded: false,
            flight: None,
            label: String::new(),
            price: None,
            model: String::new(),
            estimate_tokens: (0, 0),
            key_held: None,
            read_only: false,
            decided: None,
            live: None,
            cut: false,
            next_cutoff_check: 0,
            client: None,
            complete: false,
            probe: false,
            provider: 0,
            objects: ObjectPlan::default(),
            sse_carry: None,
        }
    }

    /// With `stream_cutoff`: once a stream's running cost (its prompt plus
    /// one token per event) passes what was reserved for it, checks whether
    /// the excess crosses a hard budget; if so returns the final SSE events
    /// that end the stream for the client.
    fn cutoff_event(&self, h: &dyn Host, events: u64) -> Option<String> {
        let key = self.cfg.keys.get(self.key?)?;
        let running = budget::estimate(self.estimate_tokens.0, events, self.price.as_ref(), &key.pricing);
        let rid = self.flight.as_deref()?;
        let mut held = self
            .flights
            .try_borrow()
            .ok()
            .and_then(|fl| fl.get(rid).and_then(|f| f.reservation()).map(|r| r.held().to_vec()))
            .unwrap_or_default();
        held.extend(self.key_held.iter().flat_map(|r| r.held().iter().copied()));
        let reserved = held.iter().map(|h| h.amount).max().unwrap_or_default();
        let excess = running - reserved;
        if excess <= rust_decimal::Decimal::ZERO {
            return None;
        }
        let i = budget::crossed(h.store(), &self.cfg.budgets, &held, excess, h.now_ms())?;
        let id = self.cfg.budgets.get(i).map_or("?", |b| b.id.as_str());
        log::info!("[{}] stream cut off: budget {id} reached", self.id);
        let err = serde_json::json!({"error": {
            "message": format!("Budget '{id}' was reached during this stream; the response is incomplete."),
            "type": "insufficient_quota", "param": null, "code": "budget_exceeded"}});
        Some(format!("data: {err}\n\ndata: [DONE]\n\n"))
    }

    /// What this attempt's answer is charged: only a 2xx that reached the
    /// caller, whole or cut short after its headers passed (a held JSON
    /// answer cut short reached no one: Envoy retries it), and never a
    /// read-only request.
    fn charge(&self) -> Option<Charge> {
        if self.read_only || !(200..300).contains(&self.status) {
            return None;
        }
        if !self.complete && matches!(self.body, Body::Json { hold: true, .. }) {
            return None;
        }
        let key = self.cfg.keys.get(self.key?)?;
        let answer = match &self.body {
            Body::Sse(p) => Answer {
                usage: self.usage.or(p.usage),
                complete: self.complete,
                stream: true,
                output_chars: p.output_chars,
            },
            _ => Answer { usage: self.usage, complete: self.complete, ..Answer::default() },
        };
        Some(charge::charge(&answer, self.estimate_tokens, self.price.as_ref(), &key.pricing))
    }

    /// A 2xx answer's headers pass to the caller: from now on a cut is
    /// charged. Leaves a live view of what passes for the access log, which
    /// Envoy writes before this attempt ends when the caller hangs up.
    fn passing(&mut self) {
        if self.read_only || !(200..300).contains(&self.status) {
            return;
        }
        let live = Rc::new(Cell::new(Answer { stream: matches!(self.body, Body::Sse(_)), ..Answer::default() }));
        if let Some(rid) = self.flight.as_deref() {
            if let Some(f) = self.flights.try_borrow_mut().ok().as_deref_mut().and_then(|fl| fl.get_mut(rid)) {
                let key = self.key;
                f.served =
                    Served { key, decision: self.decision.clone(), live: Some(live.clone()), ..Served::default() };
            }
        }
        self.live = Some(live);
    }

    /// Leaves what the attempt served, and its charge, for the ingress
    /// stage (access logs); returns the charge.
    fn served(&self) -> Option<Charge> {
        let charge = self.charge();
        if let Some(rid) = self.flight.as_deref() {
            let served = Served {
                key: self.key,
                usage: charge.map_or(self.usage, |c| Some(c.tokens)),
                cost: charge.and_then(|c| c.cost),
                charged: charge.map(|c| c.basis),
                decision: self.decision.clone(),
                live: None,
            };
            if let Some(f) = self.flights.try_borrow_mut().ok().as_deref_mut().and_then(|fl| fl.get_mut(rid)) {
                f.served = served;
            }
        }
        charge
    }

    /// Charges or releases reservations when the attempt ends, records the
    /// routing decision with its charge, and lets go of the request.
    fn close_books(&mut self, h: &dyn Host) {
        let now = h.now_ms();
        let store = h.store();
        let budgets = &self.cfg.budgets;
        let charge = self.served();
        let actual = charge.map(|c| c.cost.unwrap_or_default());
        let mut spent = Vec::new();
        if let Some(key_held) = self.key_held.take() {
            match actual {
                Some(a) => spent = key_held.settle(store, budgets, a, now),
                None => key_held.release(store, budgets, now),
            }
        }
        if let (Some(a), Some(key)) = (actual, self.key.and_then(|k| self.cfg.keys.get(k))) {
            let pid = self.cfg.providers.get(key.provider).map_or("", |p| p.id.as_str());
            h.count(&metrics::key_metric(pid, &key.id, "spend_micros"), metrics::micros(a));
            h.count(&metrics::model_metric(&self.model, "spend_micros"), metrics::micros(a));
        }
        if let Some(c) = self.client.and_then(|c| self.cfg.clients.get(c)) {
            let tokens = charge.map_or(0, |c| c.tokens.total);
            identity::record_tokens(store, c, tokens, now);
            h.count(&format!("apikeyrouter.client.{}.requests", c.id), 1);
            h.count(&format!("apikeyrouter.client.{}.tokens", c.id), tokens);
            if let Some(a) = actual {
                h.count(&format!("apikeyrouter.client.{}.spend_micros", c.id), metrics::micros(a));
            }
        }
        let chain = self.chain().unwrap_or_default();
        if let (Some(mut d), Ok(mut routing)) = (self.decided.take(), self.routing.try_borrow_mut()) {
            d.seq = routing.ring_next;
            d.charged = charge.map(|c| c.basis);
            d.chain = chain;
            routing.queue_decision(d.encode());
        }
        let Some(rid) = self.flight.take() else { return };
        let (to_settle, leftover) = match self.flights.try_borrow_mut() {
            Ok(mut fl) => {
                let to_settle =
                    if actual.is_some() { fl.get_mut(&rid).and_then(|f| f.take_for_settlement()) } else { None };
                (to_settle, fl.let_go(&rid, Holder::Attempt))
            }
            Err(_) => (None, None),
        };
        if let Some(held) = to_settle {
            // `to_settle` is only taken when `actual` is known.
            spent.extend(held.settle(store, budgets, actual.unwrap_or_default(), now));
        }
        for s in spent {
            if let Some(b) = budgets.get(s.budget) {
                h.gauge(&metrics::budget_metric(&b.id, "spent_micros"), metrics::micros(s.spent));
                if s.crossed != 0 {
                    self.budget_alerts(h, b, &s, now);
                }
            }
        }
        if let Some(r) = leftover {
            r.release(store, budgets, now);
        }
    }

    /// Queues an alert for each threshold of `b` this settlement crossed
    /// (it alone crossed them: claimed in the charging swap).
    fn budget_alerts(&self, h: &dyn Host, b: &crate::budget::Budget, s: &crate::budget::Settled, now: u64) {
        let (Some(cfg), Ok(mut routing)) = (self.cfg.alerts.as_ref(), self.routing.try_borrow_mut()) else { return };
        for (_, t) in b.alerts.iter().enumerate().filter(|(i, _)| s.crossed & (1 << i) != 0) {
            log::warn!("[{}] budget {}: spend {} reached {} of its limit {}", self.id, b.id, s.total, t, s.limit);
            // In fleet mode, claimed in etcd first: posted by one instance.
            let claim = self.cfg.fleet.as_ref().map(|f| crate::alerts::claim(&f.prefix, &b.id, *t, s));
            routing.alerts.push(h, cfg, crate::alerts::budget_threshold(b, *t, s, now), claim, now);
        }
    }

    /// Records the attempt once, with the usage seen so far, and closes
    /// its budget books.
    fn finish(&mut self, h: &dyn Host) {
        if self.recorded {
            return;
        }
        if let Body::Sse(parser) = &mut self.body {
            if self.usage.is_none() {
                parser.finish();
                self.usage = parser.usage;
            }
        }
        self.record(h, KeyAction::Nothing);
        self.close_books(h);
    }

    fn record(&mut self, h: &dyn Host, action: KeyAction) {
        let Some(k) = self.key else { return };
        self.recorded = true;
        let now = h.now_ms();
        // A success cut off before its end (a reset, a timeout) is a
        // failure. An error status stands on its own: Envoy may reset the
        // attempt to retry as soon as it sees it, before its body ends.
        let cut_short = !self.complete && (200..300).contains(&self.status) && action == KeyAction::Nothing;
        let status = if cut_short { 0 } else { self.status };
        let outcome = Outcome {
            status,
            usage: self.usage,
            stream: matches!(self.body, Body::Sse(_)),
            latency_us: self.latency_us,
            // What close_books charges to budgets: the same exact amount.
            cost: self.charge().and_then(|c| c.cost),
        };
        let signals = Signals::from_headers(&self.signals);
        let (r, stats) = record_attempt(h.store(), &self.cfg, k, &outcome, Some(&signals), action, now);
        let kid = self.cfg.keys.get(k).map_or("?", |k| k.id.as_str());
        if stats.conflicts > 0 {
            log::debug!("[{}] key {kid}: {} cas conflicts", self.id, stats.conflicts);
        }
        let pid =
            self.cfg.providers.get(self.cfg.keys.get(k).map_or(0, |key| key.provider)).map_or("", |p| p.id.as_str());
        h.count("apikeyrouter.cas_conflicts", stats.conflicts as u64);
        h.count(&metrics::key_metric(pid, kid, &format!("requests.{}", metrics::status_class(status))), 1);
        if self.status == 429 {
            h.count(&metrics::key_metric(pid, kid, "rate_limited"), 1);
        }
        h.count(&metrics::model_metric(&self.model, "requests"), 1);
        if let Some(u) = self.usage {
            h.count(&metrics::key_metric(pid, kid, "input_tokens"), u.input);
            h.count(&metrics::key_metric(pid, kid, "output_tokens"), u.output);
            h.count(&metrics::model_metric(&self.model, "input_tokens"), u.input);
            h.count(&metrics::model_metric(&self.model, "output_tokens"), u.output);
        }
        match r {
            Ok(rec) => {
                if let Ok(mut routing) = self.routing.try_borrow_mut() {
                    routing.snapshot.observe(&self.cfg, k, rec.record, now);
                }
                if rec.changed || self.probe {
                    self.key_changed(h, k, rec.before, &rec.record, now);
                    if matches!(action, KeyAction::CoolUntil(_)) {
                        h.count(&metrics::key_metric(pid, kid, "cooldowns"), 1);
                    }
                }
                match action {
                    KeyAction::CoolUntil(until) => log::info!(
                        "[{}] key {kid} answered {}: cooling until {until} ({} ms){}",
                        self.id,
                        self.status,
                        until.saturating_sub(now),
                        if rec.record.cooldown_until_ms > until { ", kept the longer cooldown" } else { "" }
                    ),
                    KeyAction::Disable(why) => {
                        log::warn!("[{}] key {kid} disabled: {}", self.id, why.as_str())
                    }
                    KeyAction::Exhaust(why) => log::warn!(
                        "[{}] key {kid} exhausted until {}: {}",
                        self.id,
                        rec.record.exhausted_until_ms,
                        why.as_str()
                    ),
                    KeyAction::Nothing => {}
                }
            }
            Err(e) => log::warn!("[{}] key {kid}: attempt not recorded: {e:?}", self.id),
        }
    }

    /// The action the response status (and, for a probed 4xx, the codes of
    /// its error body, read per dialect) calls for.
    fn action_for(&self, now: u64, codes: &[String]) -> KeyAction {
        if self.too_large_for_key() {
            return KeyAction::Nothing;
        }
        let by_status = match self.status {
            401 => Reason::Unauthorized,
            403 => Reason::Forbidden,
            402 => Reason::PaymentRequired,
            _ => Reason::Status,
        };
        let key = self.key.and_then(|k| self.cfg.keys.get(k));
        let (configured, reason) = match key.and_then(|key| self.cfg.action_for_codes(key, codes)) {
            Some((a, "insufficient_quota")) => (a, Reason::InsufficientQuota),
            Some((a, _)) => (a, by_status),
            None => (self.cfg.status_action(self.status), by_status),
        };
        let cool_until = if configured == StatusAction::Cooldown {
            let s = Signals::from_headers(&self.signals);
            now.saturating_add(cooldown_ms(&s, now, self.cfg.cooldown.default_ms, self.cfg.cooldown.max_ms))
        } else {
            0
        };
        KeyAction::from_config(configured, reason, cool_until)
    }

    /// Acts on the key as the answer calls for and gives Envoy's router the
    /// filter's verdict: another key may serve the request when this key
    /// was the trouble (a cooldown, a disable, an exhaustion) or the
    /// provider failed; any other answer (a 401 or 403 that does not blame
    /// the key included) goes back to the caller as it is.
    ///
    /// A half-open probe answered by the provider with anything but a
    /// verdict on the key or a failure of its own (a 2xx, or the caller's
    /// own 4xx, which the provider gives only to a key it accepted) brings
    /// the key back at once.
    fn judge(&mut self, h: &dyn Host, action: KeyAction) {
        let failed = provider_error::server_failed(self.status);
        if action != KeyAction::Nothing {
            self.record(h, action);
        } else if self.probe && !failed && (200..500).contains(&self.status) {
            self.probe_passed(h);
        }
        if action != KeyAction::Nothing || failed || self.too_large_for_key() {
            // Envoy retries on the header while it has retries left; past
            // them, the answer becomes a redirect to the next provider. With
            // no key of this provider left for the request, there is no
            // retry: an upstream filter's local reply (the "no key" 429)
            // goes straight to the caller, past the router's redirect.
            let now = h.now_ms();
            let location = self.fallover_location(now);
            if location.is_none() || self.untried_key_left(now) {
                let _ = h.set_header(Map::ResponseHeaders, RETRY_HEADER, RETRY_VALUE);
            }
            if let Some(location) = location {
                let _ = h.set_header(Map::ResponseHeaders, FALLOVER_HEADER, &self.status.to_string());
                let _ = h.set_header(Map::ResponseHeaders, "location", &location);
                let _ = h.set_header(Map::ResponseHeaders, ":status", "307");
            }
        }
    }

    /// Where the request goes on when this provider cannot serve it: an
    /// internal redirect (307) that Envoy follows through the filter chain
    /// again, where the ingress stage takes it over as the next hop of the
    /// same request. `None` when fall-over is off or spent, or no provider
    /// the caller may use is left in the request's `models` entry. Marks
    /// the flight as waiting for its next hop.
    fn fallover_location(&self, now: u64) -> Option<String> {
        let rid = self.flight.as_deref()?;
        let mut fl = self.flights.try_borrow_mut().ok()?;
        if !fl.hops {
            return None;
        }
        let f = fl.get_mut(rid)?;
        let fo = &f.fallover;
        if fo.path.is_empty() || fo.hop >= self.cfg.routing.max_fallovers {
            return None;
        }
        let client = f.admission.client.and_then(|c| self.cfg.clients.get(c));
        let mut routing = self.routing.try_borrow_mut().ok()?;
        // Only to a provider the caller may use that has a key free now.
        let next = crate::providers::candidates(&self.cfg, &fo.path, fo.model.as_deref()).into_iter().any(|c| {
            c.provider != self.provider
                && !fo.tried().any(|p| p == c.provider)
                && client.is_none_or(|cl| {
                    self.cfg.providers.get(c.provider).is_some_and(|p| identity::check_provider(cl, &p.id).is_ok())
                })
                && crate::keys::check(&self.cfg, c.provider, &mut routing.snapshot, now).is_ok()
        });
        if !next {
            return None;
        }
        let location = format!("http://{}{}", fo.authority, fo.path);
        // While this provider still has a key, Envoy retries it rather than
        // follow the redirect: only a provider out of keys says when it frees.
        if let Err(why) = crate::keys::check(&self.cfg, self.provider, &mut routing.snapshot, now) {
            f.fallover.frees_at(now.saturating_add(why.retry_after_secs(now).saturating_mul(1000)));
        }
        f.fallover.pending = true;
        Some(location)
    }

    /// The soonest a provider the request fell over from frees up (ms).
    fn chain_frees_at(&self) -> Option<u64> {
        let rid = self.flight.as_deref()?;
        let fl = self.flights.try_borrow().ok()?;
        fl.get(rid).filter(|f| f.fallover.hop > 0)?.fallover.soonest_free_ms
    }

    /// Whether a key of this attempt's provider that the request has not
    /// tried may still serve it.
    fn untried_key_left(&self, now: u64) -> bool {
        let tried = self
            .flight
            .as_deref()
            .and_then(|rid| self.flights.try_borrow().ok()?.get(rid).map(|f| f.attempts.tried.clone()))
            .unwrap_or_default();
        let Ok(mut routing) = self.routing.try_borrow_mut() else { return true };
        crate::keys::untried_left(&self.cfg, self.provider, &mut routing.snapshot, now, &tried)
    }

    /// Notes what this attempt got in the request's chain.
    fn note(&self, what: String) {
        let Some(rid) = self.flight.as_deref() else { return };
        if let Some(f) = self.flights.try_borrow_mut().ok().as_deref_mut().and_then(|fl| fl.get_mut(rid)) {
            f.fallover.note(self.provider, what);
        }
    }

    /// The request's chain of providers, once it has fallen over.
    fn chain(&self) -> Option<String> {
        let rid = self.flight.as_deref()?;
        let fl = self.flights.try_borrow().ok()?;
        let f = fl.get(rid).filter(|f| f.fallover.hop > 0)?;
        Some(f.fallover.text(&self.cfg))
    }

    /// A 429 for a request that alone needs more tokens (its prompt
    /// estimate plus its output allowance) than the key's per-minute token
    /// limit: the caller's request, not the key, is the trouble. The key is
    /// not cooled; a key with a larger limit may still serve it.
    fn too_large_for_key(&self) -> bool {
        if self.status != 429 {
            return false;
        }
        let wanted = self.estimate_tokens.0.saturating_add(self.estimate_tokens.1);
        let told = Signals::from_headers(&self.signals).limit_tokens.and_then(|v| v.trim().parse::<u64>().ok());
        let known = || {
            let k = self.key?;
            let routing = self.routing.try_borrow().ok()?;
            let limit = routing.snapshot.records.get(k)?.provider.limit_tokens;
            (limit != crate::key_record::UNKNOWN).then_some(limit)
        };
        told.or_else(known).is_some_and(|limit| wanted > limit)
    }

    /// Re-enables the probed key and records the transition.
    fn probe_passed(&mut self, h: &dyn Host) {
        let Some((k, key)) = self.key.and_then(|k| self.cfg.keys.get(k).map(|key| (k, key))) else { return };
        let now = h.now_ms();
        let Some((before, after)) = crate::keys::reenable(h.store(), &key.record_name) else { return };
        log::warn!("[{}] key {} re-enabled: its probe was answered {}", self.id, key.id, self.status);
        if let Ok(mut routing) = self.routing.try_borrow_mut() {
            routing.snapshot.observe(&self.cfg, k, after, now);
        }
        let cap = crate::keys::evaluate(&self.cfg, k, &before, now).capacity;
        self.key_changed(h, k, (before.effective(now), cap), &after, now);
        // Recorded: the attempt's own record at its end adds no transition.
        self.probe = false;
    }

    /// A change of key `k` (now `after`, before `from`): the transition ring,
    /// with a probe named as such, and the key's gauges.
    fn key_changed(&self, h: &dyn Host, k: usize, before: (Effective, Capacity), after: &KeyRecord, now: u64) {
        let Some(key) = self.cfg.keys.get(k) else { return };
        let e = crate::keys::evaluate(&self.cfg, k, after, now);
        let by = if self.probe { "half-open probe: provider answered" } else { "provider answered" };
        let t = crate::transition::Transition {
            time_ms: now,
            kind: "key".into(),
            id: key.id.clone(),
            from: format!("{}/{}", before.0.as_str(), before.1.as_str()),
            to: format!("{}/{}", after.effective(now).as_str(), e.capacity.as_str()),
            reason: format!("{by} {}", self.status),
            seq: 0,
        };
        crate::transition::record(h.store(), self.cfg.max_transitions, t);
        let pid = self.cfg.providers.get(key.provider).map_or("", |p| p.id.as_str());
        for (name, value) in metrics::key_gauges(pid, &key.id, &e, after.effective(now)) {
            h.gauge(&name, value);
        }
        if let Some(event) = key_alert(&self.cfg, k, pid, before, after, now) {
            if let (Some(cfg), Ok(mut routing)) = (self.cfg.alerts.as_ref(), self.routing.try_borrow_mut()) {
                // Per instance: the state change this instance's swap made.
                routing.alerts.push(h, cfg, event, None, now);
            }
        }
    }

    /// Records the objects a 2xx answer created: where they live (this
    /// key's provider and group) and who owns them (the caller); in fleet
    /// mode they are queued for etcd too.
    fn remember_created(&self, h: &dyn Host, ids: Vec<String>) {
        let key = self.key.and_then(|k| self.cfg.keys.get(k));
        let (Some(kind), Some(key), true) = (self.objects.creates, key, (200..300).contains(&self.status)) else {
            return;
        };
        let now = h.now_ms();
        let owner = self.client.and_then(|c| self.cfg.clients.get(c)).map_or("", |c| c.id.as_str());
        for id in ids {
            let rec = objects::Record {
                id,
                kind,
                provider: self.cfg.providers.get(key.provider).map_or("", |p| p.id.as_str()).to_string(),
                group: key.group_name().to_string(),
                owner: owner.to_string(),
                created_ms: now,
                expires_ms: now.saturating_add(self.cfg.objects.ttl_ms),
                from_fleet: false,
            };
            let r = objects::remember(h.store(), self.cfg.objects.layout, &rec, now);
            if !r.stored {
                log::warn!("[{}] object {} could not be recorded", self.id, rec.id);
                continue;
            }
            h.count(metrics::OBJECTS_RECORDED, 1);
            if r.evicted > 0 {
                h.count(metrics::OBJECTS_EVICTED, u64::from(r.evicted));
            }
            if self.cfg.fleet.is_some() {
                objects::queue_for_fleet(h.store(), &rec);
            }
        }
    }

    /// Leaves in a list answer only the caller's objects (and, under
    /// `unknown_objects: "allow"`, those the gateway does not know); an
    /// answer that is not a list becomes an empty one.
    fn filter_list(&self, h: &dyn Host, body: &[u8], size: usize) {
        let owner = self.client.and_then(|c| self.cfg.clients.get(c)).map_or("", |c| c.id.as_str());
        let (layout, deny, now) = (self.cfg.objects.layout, self.cfg.objects.deny_unknown, h.now_ms());
        let kept = objects::filter_list(body, |id| match objects::lookup(h.store(), layout, id, now) {
            Some(r) => r.owner == owner,
            None => !deny,
        });
        let out = kept.unwrap_or_else(|| br#"{"object":"list","data":[],"has_more":false}"#.to_vec());
        if h.set_buffer(Buffer::ResponseBody, 0, size, &out).is_err()
            || h.set_header(Map::ResponseHeaders, "content-length", &out.len().to_string()).is_err()
        {
            log::warn!("[{}] could not filter the list answer", self.id);
        }
    }

    /// The provider of the chosen key.
    fn kind(&self) -> crate::config::ProviderKind {
        let p = self.key.and_then(|k| self.cfg.keys.get(k)).map_or(0, |key| key.provider);
        self.cfg.providers.get(p).map_or(crate::config::ProviderKind::OpenAi, |p| p.kind)
    }

    /// A disabled key of `provider` due for its half-open probe, claimed
    /// for this attempt (at most one request per `probe_disabled_after`,
    /// across workers). The snapshot learns the key's record either way.
    fn claim_probe(
        &self,
        h: &dyn Host,
        routing: &mut WorkerState,
        provider: usize,
        tried: &[usize],
        now: u64,
    ) -> Option<usize> {
        let k = routing.snapshot.due_probe(&self.cfg, provider, tried, now)?;
        let key = self.cfg.keys.get(k)?;
        let (won, seen) = crate::keys::claim_probe(h.store(), &key.record_name, self.cfg.probe_disabled_after_ms, now);
        if let Some(rec) = seen {
            routing.snapshot.observe(&self.cfg, k, rec, now);
        }
        if won {
            log::info!("[{}] key {}: half-open probe with this request", self.id, key.id);
        }
        won.then_some(k)
    }

    /// The decision's ring record (its `seq` is given when it is queued).
    fn record_of(&self, d: Decision, now: u64) -> Stored {
        Stored {
            at_ms: now,
            seq: 0,
            attempt: self.attempt,
            request_id: self.label.clone(),
            client: self.client.and_then(|c| self.cfg.clients.get(c)).map(|c| c.id.clone()).unwrap_or_default(),
            decision: d,
            charged: None,
            chain: String::new(),
        }
    }
}

impl Attempt {
    /// The attempt is over (Envoy's `on_done`: Envoy does not call `on_log`
    /// for router upstream filters), whether it completed, was reset or
    /// aborted.
    pub fn on_done(&mut self, h: &dyn Host) {
        let already = self.recorded;
        self.finish(h);
        if already {
            self.close_books(h);
        }
    }

    pub fn on_request_headers(&mut self, h: &dyn Host) -> Next {
        self.started_ns = h.now_ns();
        let now = self.started_ns / 1_000_000;
        // The ingress stage names the request's flight in filter state,
        // which no caller can write (a header could come from the caller,
        // and the header map carries over between attempts).
        let nonce = match h.property(&[FLIGHT_PROPERTY]) {
            Ok(n) => n.map(|b| String::from_utf8_lossy(&b).into_owned()),
            Err(e) => {
                log::warn!("[{}] could not read the request's flight (host status {})", self.id, e.0);
                h.reply(&reply::gateway_error("The gateway could not find the request's admission."), self.id);
                return Next::Pause;
            }
        };
        // What the ingress stage left for this request: the provider, the
        // objective, its label and the keys earlier attempts used. Absent
        // when the ingress stage is not installed; then the first provider
        // serves.
        let found = nonce.as_deref().and_then(|id| {
            let mut fl = self.flights.try_borrow_mut().ok()?;
            let f = fl.get_mut(id)?;
            f.attempts.count += 1;
            f.attempts.in_flight += 1;
            // A new attempt: an earlier attempt's redirect was retried instead.
            f.fallover.pending = false;
            let a = &f.admission;
            let est = (a.prompt_tokens_est, a.output_tokens_est);
            self.client = a.client;
            self.read_only = a.read_only;
            self.label.clone_from(&a.request_id);
            self.objects.clone_from(&a.objects);
            self.model.clone_from(&a.model_label);
            Some((a.provider, f.attempts.tried.clone(), f.attempts.count, a.objective.clone(), a.price, est))
        });
        let (provider, tried, attempt, objective, price, est) = match found {
            Some(x) => {
                self.flight = nonce;
                x
            }
            None if nonce.is_some() => {
                // Admitted, but its flight is gone (a VM reload): it is not
                // sent with its reservation unaccounted for.
                log::warn!("[{}] the request's flight is gone: not sent", self.id);
                h.reply(&reply::gateway_error("The gateway lost track of this request; it was not sent."), self.id);
                return Next::Pause;
            }
            None => {
                self.label = h.header(Map::RequestHeaders, "x-request-id").ok().flatten().unwrap_or_default();
                let n = h
                    .header(Map::RequestHeaders, "x-envoy-attempt-count")
                    .ok()
                    .flatten()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                (0, Vec::new(), n, None, None, (0, 0))
            }
        };
        self.attempt = attempt;
        self.provider = provider;
        self.price = price;
        self.estimate_tokens = est;
        let routing_cell = self.routing.clone();
        let Ok(mut routing_guard) = routing_cell.try_borrow_mut() else {
            h.reply(&reply::gateway_error("The gateway is busy."), self.id);
            return Next::Pause;
        };
        let routing = &mut *routing_guard;
        self.cfg = routing.refresh(h, now);
        let objective: &Objective = objective.as_ref().unwrap_or(&self.cfg.routing.objective);
        let cfg = &self.cfg;
        // A request about an object: only keys of the object's group.
        let outside = match self.objects.group.as_deref() {
            Some(g) => crate::keys::outside_group(cfg, provider, g),
            None => Vec::new(),
        };
        let choose = |routing: &mut WorkerState, banned: &[usize]| {
            let snap = &mut routing.snapshot;
            routing.chooser.choose_within(cfg, provider, snap, now, &tried, banned, &outside, objective)
        };
        let mut banned: Vec<usize> = Vec::new();
        // One probe per request, on its first attempt: a request must not
        // spend its retries on keys that were all disabled together.
        let first_here = tried.iter().all(|&t| cfg.keys.get(t).is_none_or(|key| key.provider != provider));
        let passed_over: Vec<usize> = tried.iter().chain(&outside).copied().collect();
        let probe = if first_here { self.claim_probe(h, routing, provider, &passed_over, now) } else { None };
        let mut chosen = match probe {
            Some(k) => Ok(crate::decision::Decision::probe(k)),
            None => choose(routing, &banned),
        };
        let mut key_held = None;
        // Confirm the choice against the key's own fresh record (another
        // worker may have used up its quota or cooled it since the snapshot)
        // and against its own budgets; choose again if it cannot serve.
        for _ in 0..8 {
            let Some(k) = chosen.as_ref().ok().and_then(|d| d.chosen) else { break };
            let Some(key) = cfg.keys.get(k) else { break };
            // Other workers' cooldowns and state changes arrive through the
            // generation; only counts that are not announced (quota use,
            // shrinking provider headroom) need the key's fresh record.
            // The probe's key is disabled: only its budgets are checked.
            let counts_matter = probe != Some(k)
                && (key.limits != Default::default()
                    || routing.snapshot.eval(cfg, k, now).capacity != crate::key_record::Capacity::Abundant);
            let fresh = if counts_matter { read_record(h.store(), &key.record_name).ok() } else { None };
            let snap = routing.snapshot.records.get(k).copied().unwrap_or_default();
            if let Some(fresh) = fresh.filter(|f| stale_choice(cfg, k, &snap, f, now)) {
                routing.snapshot.observe(cfg, k, fresh, now);
            } else if key.budgets.is_empty() {
                break;
            } else {
                let estimate = budget::estimate(est.0, est.1, price.as_ref(), &key.pricing);
                match budget::reserve(h.store(), &cfg.budgets, &key.budgets, estimate, now) {
                    Ok(a) => {
                        key_held = Some(a.held);
                        break;
                    }
                    Err(refused) => {
                        if let budget::NotReserved::Over(r) = &refused {
                            let id = cfg.budgets.get(r.budget).map_or("?", |b| b.id.as_str());
                            h.count(&metrics::budget_metric(id, "refused"), 1);
                        }
                        banned.push(k);
                    }
                }
            }
            chosen = choose(routing, &banned);
        }
        self.key_held = key_held;
        h.histogram_since("apikeyrouter.selection_us", self.started_ns);
        match chosen {
            Ok(d) => {
                let Some((k, key)) = d.chosen.and_then(|k| self.cfg.keys.get(k).map(|key| (k, key))) else {
                    return Next::Continue;
                };
                // Always overwrite: the header map carries over between
                // attempts, so this replaces the previous attempt's key.
                if let Err(e) = h.set_header(Map::RequestHeaders, key.auth_header, &key.auth_value) {
                    log::warn!("[{}] could not set the auth header (host status {})", self.id, e.0);
                    h.reply(&reply::gateway_error("The gateway could not authenticate the request."), self.id);
                    return Next::Pause;
                }
                // Earlier attempts' keys' own headers go: k1's organization
                // must never travel with k2's secret.
                for prev in tried.iter().filter(|&&p| p != k).filter_map(|&p| self.cfg.keys.get(p)) {
                    for (name, _) in &prev.extra_headers {
                        if !key.extra_headers.iter().any(|(n, _)| n == name) {
                            let _ = h.remove_header(Map::RequestHeaders, name);
                        }
                    }
                }
                for (name, value) in &key.extra_headers {
                    let _ = h.set_header(Map::RequestHeaders, name, value);
                }
                if let Some(p) = self.cfg.providers.get(key.provider) {
                    if p.kind == crate::config::ProviderKind::Anthropic
                        && h.header(Map::RequestHeaders, "anthropic-version").ok().flatten().is_none()
                    {
                        let _ = h.set_header(Map::RequestHeaders, "anthropic-version", &p.anthropic_version);
                    }
                }
                self.key = Some(k);
                self.probe = probe == Some(k);
                if let Some(rid) = self.flight.as_deref() {
                    if let Some(f) = self.flights.try_borrow_mut().ok().as_deref_mut().and_then(|fl| fl.get_mut(rid)) {
                        f.attempts.tried.push(k);
                    }
                }
                if self.cfg.decisions.header {
                    self.decision = Some(d.summary(&self.cfg));
                }
                self.decided = Some(self.record_of(d, now));
                Next::Continue
            }
            Err(mut why) => {
                h.count("apikeyrouter.no_key", 1);
                if !outside.is_empty() {
                    // Why no key of the object's group can serve: only they count.
                    let decision = why.decision.take();
                    let snap = &mut routing_guard.snapshot;
                    why = crate::keys::check_within(&self.cfg, provider, &outside, snap, now).err().unwrap_or_default();
                    why.decision = decision;
                }
                let pid = self.cfg.providers.get(provider).map_or("?", |p| p.id.as_str());
                // The previous attempt's key must not go upstream either.
                let _ = h.remove_header(Map::RequestHeaders, "authorization");
                let mut retry_after = why.retry_after_secs(now);
                let explained = why.explain(pid);
                drop(routing_guard);
                // An upstream filter's local reply goes to the caller as it
                // is (Envoy's router neither retries nor redirects it): the
                // request falls over on the answer before this one instead.
                if let Some(at) = self.chain_frees_at() {
                    retry_after = retry_after.min(at.saturating_sub(now).div_ceil(1000).max(1));
                }
                let mut r = reply::no_key(retry_after, &explained);
                if let Some(chain) = self.chain().filter(|_| self.cfg.decisions.headers != RoutingHeaders::Off) {
                    r.headers.push(("x-apikeyrouter-chain", chain));
                }
                let Ok(mut routing) = routing_cell.try_borrow_mut() else {
                    h.reply(&r, self.id);
                    return Next::Pause;
                };
                if self.cfg.decisions.headers != RoutingHeaders::Off {
                    r.headers.push(("x-apikeyrouter-attempts", attempt.to_string()));
                }
                if let Some(d) = why.decision {
                    if self.cfg.decisions.header {
                        r.headers.push(("x-apikeyrouter-decision", d.summary(&self.cfg)));
                    }
                    let mut stored = self.record_of(*d, now);
                    stored.seq = routing.ring_next;
                    routing.queue_decision(stored.encode());
                }
                h.reply(&r, self.id);
                Next::Pause
            }
        }
    }

    pub fn on_response_headers(&mut self, h: &dyn Host, end_of_stream: bool) -> Next {
        let Some(k) = self.key else {
            return Next::Continue;
        };
        let now_ns = h.now_ns();
        let now = now_ns / 1_000_000;
        self.latency_us = Some(now_ns.saturating_sub(self.started_ns) / 1000);
        let headers = h.headers(Map::ResponseHeaders).unwrap_or_default();
        let mut content_type = String::new();
        let mut content_length: Option<usize> = None;
        for (name, v) in headers {
            match name.as_str() {
                // Only this filter speaks for the gateway: an upstream's own
                // `x-apikeyrouter-retry` must not steer Envoy's retries.
                n if n.starts_with("x-apikeyrouter-") => {
                    let _ = h.remove_header(Map::ResponseHeaders, n);
                }
                ":status" => self.status = v.parse().unwrap_or(0),
                "content-type" => content_type = v.to_ascii_lowercase(),
                "content-length" => content_length = v.trim().parse().ok(),
                n if n.starts_with("x-ratelimit-")
                    || n.starts_with("anthropic-ratelimit-")
                    || n.contains("retry-after") =>
                {
                    self.signals.push((name, v))
                }
                _ => {}
            }
        }
        if self.status == 307 {
            // Only this filter's 307 moves a request on (the routes follow
            // 307s internally): a provider's own goes to the caller as it is.
            let _ = h.remove_header(Map::ResponseHeaders, "location");
        }
        if let Some(key) = self.cfg.keys.get(k) {
            self.note(format!("{} {}", key.id, self.status));
        }
        if let Some(chain) = self.chain().filter(|_| self.cfg.decisions.headers != RoutingHeaders::Off) {
            let _ = h.set_header(Map::ResponseHeaders, "x-apikeyrouter-chain", &chain);
        }
        match self.cfg.decisions.headers {
            RoutingHeaders::Separate => {
                if let Some(key) = self.cfg.keys.get(k) {
                    let _ = h.set_header(Map::ResponseHeaders, "x-apikeyrouter-key-id", &key.id);
                    let _ = h.set_header(Map::ResponseHeaders, "x-apikeyrouter-attempts", &self.attempt.to_string());
                }
                if let Some(d) = &self.decision {
                    let _ = h.set_header(Map::ResponseHeaders, "x-apikeyrouter-decision", d);
                }
            }
            // One host call: the summary names the key; the attempt leads.
            RoutingHeaders::Combined => {
                if let Some(d) = &self.decision {
                    let v = format!("attempt={}; {d}", self.attempt);
                    let _ = h.set_header(Map::ResponseHeaders, "x-apikeyrouter-decision", &v);
                }
            }
            RoutingHeaders::Off => {}
        }
        self.complete = end_of_stream;
        if self.cfg.probes_body(self.status) && !end_of_stream && content_type.contains("json") {
            // Hold the error until its code is read, so that the key's
            // state changes before Envoy's retry chooses the next key.
            self.body = Body::Probe;
            return Next::Pause;
        }
        let action = self.action_for(now, &[]);
        self.judge(h, action);
        if action != KeyAction::Nothing {
            return Next::Continue;
        }
        if end_of_stream {
            self.served();
            return Next::Continue;
        }
        let ok = (200..300).contains(&self.status);
        if ok {
            if let Some(id) = self.objects.forget.as_deref() {
                objects::forget(h.store(), self.cfg.objects.layout, id);
            }
        }
        if content_type.starts_with("text/event-stream") {
            self.body = Body::Sse(Box::default());
            if ok && self.objects.creates.is_some() {
                self.sse_carry = Some(Vec::new());
            }
        } else if ok && (content_type.contains("json") || self.objects.filter_list) {
            if content_length.is_some_and(|n| n > MAX_JSON_BODY) {
                // Too large to hold: let it flow and keep its tail.
                self.body = Body::JsonTail(Vec::new());
            } else {
                // Hold the headers while the body is read, so the cost can
                // be added to them; the body is buffered whole anyway.
                // A list to filter is held too: its length changes.
                let priced = self.price.is_some()
                    || self.cfg.keys.get(k).is_some_and(|key| key.pricing.cost_per_1k.is_some())
                    || self.objects.filter_list;
                let cap = if content_length.is_some() { MAX_JSON_BODY } else { MAX_UNSIZED_JSON };
                self.body = Body::Json { hold: priced, cap };
                if priced {
                    return Next::Pause;
                }
            }
        }
        self.passing();
        Next::Continue
    }

    pub fn on_response_body(&mut self, h: &dyn Host, size: usize, end_of_stream: bool) -> Next {
        if end_of_stream {
            self.complete = true;
        }
        match &mut self.body {
            Body::Ignore => {
                if end_of_stream {
                    self.served();
                }
                Next::Continue
            }
            Body::JsonTail(tail) => {
                if size > 0 {
                    if let Ok(Some(chunk)) = h.buffer(Buffer::ResponseBody, 0, size) {
                        tail.extend_from_slice(&chunk);
                        if tail.len() > TAIL {
                            tail.drain(..tail.len() - TAIL);
                        }
                    }
                }
                if end_of_stream {
                    self.usage = usage::from_json_tail(tail);
                    self.served();
                }
                Next::Continue
            }
            Body::Sse(parser) => {
                // Read each chunk as it passes; never hold the stream back.
                let chunk = if size > 0 { h.buffer(Buffer::ResponseBody, 0, size).ok().flatten() } else { None };
                if let Some(chunk) = &chunk {
                    parser.feed(chunk);
                }
                if self.cut && size > 0 {
                    // After a budget cut-off the client has its final event;
                    // the rest of the provider's stream is counted, not sent.
                    let _ = h.set_buffer(Buffer::ResponseBody, 0, size, b"");
                }
                let mut created = None;
                if let (Some(carry), Some(chunk)) = (self.sse_carry.as_mut(), &chunk) {
                    carry.extend_from_slice(chunk);
                    created = self.objects.creates.and_then(|k| objects::streamed_id(k, carry));
                    let keep = carry.len().saturating_sub(256);
                    carry.drain(..keep);
                }
                if let Some(live) = &self.live {
                    let output_chars = parser.output_chars;
                    live.set(Answer { usage: parser.usage, stream: true, output_chars, complete: false });
                }
                let events = parser.events;
                if end_of_stream {
                    parser.finish();
                    self.usage = parser.usage;
                    self.served();
                } else if self.cfg.stream_cutoff && !self.cut && events >= self.next_cutoff_check {
                    self.next_cutoff_check = events + 8;
                    if let Some(event) = self.cutoff_event(h, events) {
                        self.cut = true;
                        let _ = h.set_buffer(Buffer::ResponseBody, 0, size, event.as_bytes());
                    }
                }
                if let Some(id) = created {
                    self.sse_carry = None;
                    self.remember_created(h, vec![id]);
                }
                Next::Continue
            }
            Body::Json { hold, cap } => {
                let hold = *hold;
                if !end_of_stream {
                    // A list to filter never flows unfiltered: past Envoy's
                    // buffer limit the caller gets Envoy's error instead.
                    if size > *cap && !self.objects.filter_list {
                        // Too large to hold: let it flow, keep its tail.
                        let start = size.saturating_sub(TAIL);
                        let tail =
                            h.buffer(Buffer::ResponseBody, start, size - start).ok().flatten().unwrap_or_default();
                        self.body = Body::JsonTail(tail);
                        self.passing();
                        return Next::Continue;
                    }
                    return Next::Pause;
                }
                if let Ok(Some(body)) = h.buffer(Buffer::ResponseBody, 0, size) {
                    self.usage = usage::from_json_body(&body);
                    if let Some(kind) = self.objects.creates {
                        self.remember_created(h, objects::created_ids(kind, &body));
                    }
                    if self.objects.filter_list {
                        self.filter_list(h, &body, size);
                    }
                }
                let cost = self.served().and_then(|c| c.cost);
                if hold {
                    if let Some(c) = cost {
                        let _ = h.set_header(Map::ResponseHeaders, "x-apikeyrouter-cost", &budget::show(c));
                    }
                }
                Next::Continue
            }
            Body::Probe => {
                if !end_of_stream && size <= MAX_PROBE_BODY {
                    return Next::Pause;
                }
                let body =
                    h.buffer(Buffer::ResponseBody, 0, size.min(MAX_PROBE_BODY)).ok().flatten().unwrap_or_default();
                let codes = provider_error::codes(&body, self.kind());
                self.body = Body::Ignore;
                let action = self.action_for(h.now_ms(), &codes);
                self.judge(h, action);
                Next::Continue
            }
        }
    }
}

/// The alert a key's change from `before` to `after` raises, if any: it
/// became disabled, or exhausted (by the provider's answer, or by a daily or
/// monthly token quota: a per-minute limit running out is throttling, not
/// an alert). The caller's swap made the change, so it is raised once.
fn key_alert(
    cfg: &crate::config::Config,
    k: usize,
    pid: &str,
    before: (Effective, Capacity),
    after: &KeyRecord,
    now: u64,
) -> Option<crate::alerts::Event> {
    let key = cfg.keys.get(k)?;
    let event = |kind, reason: &str, until| Some(crate::alerts::key_event(kind, pid, &key.id, reason, until, now));
    match after.effective(now) {
        Effective::Disabled if before.0 != Effective::Disabled => event("key_disabled", after.reason.as_str(), None),
        Effective::Exhausted { until_ms } if !matches!(before.0, Effective::Exhausted { .. }) => {
            event("key_exhausted", after.reason.as_str(), Some(until_ms).filter(|u| *u > 0))
        }
        Effective::Available | Effective::Throttled { .. } if before.1 != Capacity::Exhausted => {
            let room = crate::quota::headroom(after, &key.limits, &cfg.routing.thresholds, now);
            let quota = matches!(room.tightest, "daily_tokens" | "monthly_tokens");
            (room.capacity == Capacity::Exhausted && quota)
                .then(|| event("key_exhausted", room.tightest, Some(room.resets_at_ms)))?
        }
        _ => None,
    }
}
