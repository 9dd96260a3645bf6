//! Alert events: a budget crossing one of its thresholds, a key disabled or
//! exhausted. Each is claimed once, across workers, by the compare-and-swap
//! that made the change (the budget's settlement, the key's record), queued
//! in the VM that claimed it, and posted as JSON to the `alerts` webhook
//! cluster through `dispatch_http_call` on the root context's tick: one call
//! at a time, retried with backoff until it is answered 2xx or has used
//! `max_attempts`. The queue is bounded by `max_queue`. Events never hold key
//! material: ids, amounts and reasons only.
//!
//! In fleet mode every instance crosses a fleet-wide budget's thresholds on
//! its own, so a budget event is first claimed in etcd ([`claim_key`],
//! created only if absent): the instance that creates the key posts it, the
//! others drop it. An unanswered claim is retried like a post; an unclaimed
//! event is never posted. Key events stay per instance: each is the state
//! change made by this instance's swap.

use crate::config::{Alerts, Fleet};
use crate::stages::flight::JsonObject;
use crate::stages::host::{Buffer, Host, Map};
use rust_decimal::Decimal;
use std::collections::VecDeque;

/// Events queued to be posted (each claimed once, by one worker).
pub const QUEUED: &str = "apikeyrouter.alerts.queued";
/// Events posted (answered 2xx).
pub const SENT: &str = "apikeyrouter.alerts.sent";
/// Calls that failed (no answer, or not 2xx): each is retried.
pub const FAILED: &str = "apikeyrouter.alerts.failed";
/// Events given up on: the queue was full, or every attempt failed.
pub const DROPPED: &str = "apikeyrouter.alerts.dropped";
/// Budget events another instance claimed first (fleet mode): not posted here.
pub const CLAIMED_ELSEWHERE: &str = "apikeyrouter.alerts.claimed_elsewhere";

/// The first retry waits this long; each next one twice as long.
const BACKOFF_MS: u64 = 1000;
const MAX_BACKOFF_MS: u64 = 60_000;

/// An event being written: its fields so far (the instance is added when it
/// is queued).
pub type Event = JsonObject;

/// A budget's spend reached `threshold` of its limit.
pub fn budget_threshold(
    budget: &crate::budget::Budget,
    threshold: rust_decimal::Decimal,
    s: &crate::budget::Settled,
    now_ms: u64,
) -> Event {
    let mut e = Event::default();
    e.text("type", "budget_threshold");
    e.text("budget", &budget.id);
    e.raw("threshold", &threshold.to_string());
    e.text("spend", &crate::budget::show(s.total));
    e.text("limit", &crate::budget::show(s.limit));
    match budget.window {
        Some(w) => {
            e.text("window", w.as_str());
            e.text("window_start", &crate::window::rfc3339(s.window_start_ms));
        }
        None => e.text("window", "total"),
    }
    e.number("timestamp_ms", now_ms);
    e
}

/// A budget threshold's claim in etcd (fleet mode), for one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// `<prefix>/~a/<budget>/<window start ms, 20 digits>/<threshold>/<limit>`:
    /// outside the sync's range read, which ends before `<prefix>/~`. The
    /// limit is in it because a raised limit gives the thresholds back
    /// (posted again when the spend reaches them at the new limit).
    pub key: String,
    /// The budget's claims: `<prefix>/~a/<budget>/`.
    head: String,
    /// The head and this window: every earlier window's claims sort before
    /// it (the start is zero-padded), and are deleted with the claim.
    window: String,
}

/// The claim of `threshold` of `budget` as settled in `s`.
pub fn claim(prefix: &str, budget: &str, threshold: Decimal, s: &crate::budget::Settled) -> Claim {
    let head = format!("{prefix}/~a/{budget}/");
    let window = format!("{head}{:020}", s.window_start_ms);
    Claim { key: format!("{window}/{}/{}", threshold.normalize(), s.limit.normalize()), head, window }
}

/// A key became disabled (`key_disabled`) or exhausted (`key_exhausted`,
/// by the provider's answer or by its token quota).
pub fn key_event(kind: &str, provider: &str, key: &str, reason: &str, until_ms: Option<u64>, now_ms: u64) -> Event {
    let mut e = Event::default();
    e.text("type", kind);
    e.text("provider", provider);
    e.text("key", key);
    e.text("reason", reason);
    if let Some(until) = until_ms {
        e.text("until", &crate::window::rfc3339(until));
    }
    e.number("timestamp_ms", now_ms);
    e
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Queued {
    body: Vec<u8>,
    /// The claim to make in etcd before it is posted (fleet mode's budget
    /// events): its key, and the head of its budget's claims. `None` once
    /// claimed, or when none is needed.
    claim: Option<Claim>,
    /// Calls made for it so far.
    attempts: u32,
    /// Not sent again before this.
    due_ms: u64,
}

/// What a call in flight is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Post,
    /// The oldest event's claim in etcd.
    Claim,
    /// etcd's token for the claims (`fleet.username`).
    Authenticate,
}

/// One VM's queue of events for one stage, and the call in flight.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Stamped into every event (the fleet instance, else Envoy's node id).
    pub instance: String,
    queue: VecDeque<Queued>,
    /// The call in flight: its token, when it was made, and what for.
    in_flight: Option<(u32, u64, Kind)>,
    /// etcd's token for the claims (VM memory only, never logged).
    etcd_token: Option<String>,
}

impl Outbox {
    pub fn new(instance: String) -> Outbox {
        Outbox { instance, ..Outbox::default() }
    }

    /// Queues an event (stamped with the instance), or drops it when the
    /// queue is full. No host call: it leaves on the tick, after its claim
    /// in etcd when `claim` (fleet mode's budget events) is given.
    pub fn push(&mut self, h: &dyn Host, cfg: &Alerts, mut event: Event, claim: Option<Claim>, now_ms: u64) {
        event.text("instance", &self.instance);
        let body = event.finish();
        if self.queue.len() >= cfg.max_queue {
            log::warn!("alerts: queue full ({} events): dropped {body}", cfg.max_queue);
            h.count(DROPPED, 1);
            return;
        }
        self.queue.push_back(Queued { body: body.into_bytes(), claim, attempts: 0, due_ms: now_ms });
        h.count(QUEUED, 1);
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// On the tick: sends the oldest event (or first its claim to etcd,
    /// through `fleet`) when it is due and no call is in flight.
    pub fn pump(&mut self, h: &dyn Host, cfg: &Alerts, fleet: Option<&Fleet>, now_ms: u64) {
        if let Some((_, started, _)) = self.in_flight {
            // Envoy answers every call, at worst with its timeout; this
            // only guards against a lost callback.
            let timeout = fleet.map_or(cfg.timeout_ms, |f| f.timeout_ms.max(cfg.timeout_ms));
            if now_ms.saturating_sub(started) < 2 * timeout + 1000 {
                return;
            }
            self.in_flight = None;
            self.failed(h, cfg, now_ms);
        }
        let Some(q) = self.queue.front_mut() else { return };
        if q.due_ms > now_ms {
            return;
        }
        q.attempts += 1;
        if let (Some(c), Some(f)) = (q.claim.as_ref(), fleet) {
            let (kind, path, body) = match &f.auth {
                Some(a) if self.etcd_token.is_none() => {
                    (Kind::Authenticate, "/v3/auth/authenticate", crate::fleet::auth_body(&a.username, &a.password))
                }
                _ => {
                    let value = serde_json::json!({"instance": self.instance, "at_ms": now_ms}).to_string();
                    let body = crate::fleet::claim_body(&c.key, &value, &c.head, &c.window);
                    (Kind::Claim, "/v3/kv/txn", body)
                }
            };
            let token = self.etcd_token.as_deref().filter(|_| kind == Kind::Claim);
            match crate::stages::fleet_sync::etcd_call(h, f, token, path, body.as_bytes()) {
                Ok(t) => self.in_flight = Some((t, now_ms, kind)),
                Err(why) => {
                    log::warn!("alerts: claim in etcd: {why}");
                    self.failed(h, cfg, now_ms);
                }
            }
            return;
        }
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "POST"),
            (":path", &cfg.path),
            (":authority", &cfg.authority),
            ("content-type", "application/json"),
        ];
        headers.extend(cfg.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        match h.dispatch_http_call(&cfg.cluster, &headers, &q.body, cfg.timeout_ms) {
            Ok(token) => self.in_flight = Some((token, now_ms, Kind::Post)),
            Err(e) => {
                log::warn!("alerts: could not call cluster {:?} (host status {})", cfg.cluster, e.0);
                self.failed(h, cfg, now_ms);
            }
        }
    }

    /// The answer to a call; false when `token` is not this outbox's.
    pub fn on_response(
        &mut self,
        h: &dyn Host,
        cfg: &Alerts,
        fleet: Option<&Fleet>,
        token: u32,
        n: (usize, usize),
    ) -> bool {
        let Some((_, _, kind)) = self.in_flight.filter(|(t, _, _)| *t == token) else { return false };
        self.in_flight = None;
        let now = h.now_ms();
        let n_headers = n.0;
        if kind != Kind::Post {
            self.on_etcd_answer(h, cfg, fleet, kind, n, now);
            return true;
        }
        let status = if n_headers == 0 { None } else { h.header(Map::CallResponseHeaders, ":status").ok().flatten() };
        match status.as_deref().and_then(|s| s.parse::<u32>().ok()) {
            Some(200..=299) => {
                self.queue.pop_front();
                h.count(SENT, 1);
                // The next one need not wait for a tick.
                self.pump(h, cfg, fleet, now);
            }
            other => {
                log::warn!(
                    "alerts: webhook {} answered {}",
                    cfg.cluster,
                    other.map_or("nothing (timeout or connection failure)".to_string(), |s| s.to_string())
                );
                self.failed(h, cfg, now);
            }
        }
        true
    }

    /// etcd's answer to a claim or to the authentication before it.
    fn on_etcd_answer(
        &mut self,
        h: &dyn Host,
        cfg: &Alerts,
        fleet: Option<&Fleet>,
        kind: Kind,
        n: (usize, usize),
        now: u64,
    ) {
        let status = crate::stages::fleet_sync::call_status(h, n.0);
        // Both answers are small: a larger one is not read.
        let body = match status {
            Some(200) if n.1 <= 4096 => h.buffer(Buffer::CallResponseBody, 0, n.1).ok().flatten().unwrap_or_default(),
            _ => Vec::new(),
        };
        if status == Some(401) {
            self.etcd_token = None;
        }
        let outcome = match (status, kind) {
            (Some(200), Kind::Authenticate) => crate::fleet::parse_auth(&body).map(|t| {
                self.etcd_token = Some(t);
                None
            }),
            (Some(200), _) => crate::fleet::parse_claim(&body).map(Some),
            _ => Err(crate::fleet::EtcdError(format!(
                "etcd answered {}",
                status.map_or("nothing".into(), |s| s.to_string())
            ))),
        };
        match outcome {
            // Authenticated: the claim itself follows at once.
            Ok(None) => {
                if let Some(q) = self.queue.front_mut() {
                    q.due_ms = now;
                }
            }
            // Created now, or by this instance's earlier try whose answer
            // was lost (no other worker here claims the same threshold).
            Ok(Some(holder)) if holder.as_ref().is_none_or(|h| *h == self.instance) => {
                if let Some(q) = self.queue.front_mut() {
                    (q.claim, q.attempts, q.due_ms) = (None, 0, now);
                }
            }
            Ok(Some(_)) => {
                self.queue.pop_front();
                h.count(CLAIMED_ELSEWHERE, 1);
            }
            Err(e) => {
                log::warn!("alerts: claim in etcd failed: {}", e.0);
                return self.failed(h, cfg, now);
            }
        }
        self.pump(h, cfg, fleet, now);
    }

    /// The oldest event's call failed: retried after a backoff, or dropped
    /// after `max_attempts`.
    fn failed(&mut self, h: &dyn Host, cfg: &Alerts, now_ms: u64) {
        h.count(FAILED, 1);
        let Some(q) = self.queue.front_mut() else { return };
        if q.attempts >= cfg.max_attempts {
            log::warn!("alerts: dropped after {} attempts: {}", q.attempts, String::from_utf8_lossy(&q.body));
            self.queue.pop_front();
            h.count(DROPPED, 1);
            return;
        }
        let backoff = BACKOFF_MS.saturating_mul(1 << q.attempts.saturating_sub(1).min(16)).min(MAX_BACKOFF_MS);
        q.due_ms = now_ms.saturating_add(backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Budget, Enforcement, Scope, Settled};
    use rust_decimal::Decimal;

    fn event_of(window: Option<crate::window::Window>) -> serde_json::Value {
        let b = Budget {
            id: "b \"1\"".into(),
            scope: Scope::Global,
            window,
            limit: Decimal::TEN,
            enforcement: Enforcement::Soft,
            record_name: String::new(),
            reservation_ttl_ms: 1,
            alerts: vec![Decimal::new(5, 1)],
        };
        let s = Settled {
            budget: 0,
            spent: Decimal::new(51, 1),
            total: Decimal::new(51, 1),
            limit: Decimal::TEN,
            window_start_ms: 1_767_225_600_000,
            crossed: 1,
        };
        let mut out = Outbox::new("gw-1".into());
        let world = crate::stages::fake::World::new(0);
        let cfg = crate::config::Alerts {
            cluster: "hooks".into(),
            path: "/".into(),
            authority: "hooks".into(),
            timeout_ms: 10,
            headers: vec![],
            max_queue: 1,
            max_attempts: 1,
        };
        let h = crate::stages::fake::FakeHost::new(&world);
        out.push(&h, &cfg, budget_threshold(&b, Decimal::new(5, 1), &s, 7), None, 7);
        out.push(&h, &cfg, budget_threshold(&b, Decimal::new(5, 1), &s, 7), None, 7);
        assert_eq!((out.len(), world.counter(DROPPED)), (1, 1), "max_queue 1: the second is dropped");
        let body = out.queue.front().map(|q| q.body.clone()).unwrap_or_default();
        serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)))
    }

    #[test]
    fn a_budget_event_is_json_with_its_window_and_no_window_start_for_a_total() {
        assert_eq!(
            event_of(Some(crate::window::Window::Day)),
            serde_json::json!({"type": "budget_threshold", "budget": "b \"1\"", "threshold": 0.5, "spend": "5.1",
                "limit": "10", "window": "day", "window_start": "2026-01-01T00:00:00Z", "timestamp_ms": 7,
                "instance": "gw-1"})
        );
        let total = event_of(None);
        assert_eq!((total["window"].as_str(), total.get("window_start")), (Some("total"), None));
    }
}
