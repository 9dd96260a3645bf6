//! Alert events: a budget crossing one of its thresholds, a key disabled or
//! exhausted. Each is claimed once, across workers, by the compare-and-swap
//! that made the change (the budget's settlement, the key's record), queued
//! in the VM that claimed it, and posted as JSON to the `alerts` webhook
//! cluster through `dispatch_http_call` on the root context's tick: one call
//! at a time, retried with backoff until it is answered 2xx or has used
//! `max_attempts`. The queue is bounded by `max_queue`. Events never hold key
//! material: ids, amounts and reasons only.

use crate::config::Alerts;
use crate::stages::flight::JsonObject;
use crate::stages::host::{Host, Map};
use std::collections::VecDeque;

/// Events queued to be posted (each claimed once, by one worker).
pub const QUEUED: &str = "apikeyrouter.alerts.queued";
/// Events posted (answered 2xx).
pub const SENT: &str = "apikeyrouter.alerts.sent";
/// Calls that failed (no answer, or not 2xx): each is retried.
pub const FAILED: &str = "apikeyrouter.alerts.failed";
/// Events given up on: the queue was full, or every attempt failed.
pub const DROPPED: &str = "apikeyrouter.alerts.dropped";

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
    /// Calls made for it so far.
    attempts: u32,
    /// Not sent again before this.
    due_ms: u64,
}

/// One VM's queue of events for one stage, and the call in flight.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Stamped into every event (the fleet instance, else Envoy's node id).
    pub instance: String,
    queue: VecDeque<Queued>,
    /// The call in flight: its token and when it was made.
    in_flight: Option<(u32, u64)>,
}

impl Outbox {
    pub fn new(instance: String) -> Outbox {
        Outbox { instance, ..Outbox::default() }
    }

    /// Queues an event (stamped with the instance), or drops it when the
    /// queue is full. No host call: it leaves on the tick.
    pub fn push(&mut self, h: &dyn Host, cfg: &Alerts, mut event: Event, now_ms: u64) {
        event.text("instance", &self.instance);
        let body = event.finish();
        if self.queue.len() >= cfg.max_queue {
            log::warn!("alerts: queue full ({} events): dropped {body}", cfg.max_queue);
            h.count(DROPPED, 1);
            return;
        }
        self.queue.push_back(Queued { body: body.into_bytes(), attempts: 0, due_ms: now_ms });
        h.count(QUEUED, 1);
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// On the tick: sends the oldest event when it is due and no call is in
    /// flight.
    pub fn pump(&mut self, h: &dyn Host, cfg: &Alerts, now_ms: u64) {
        if let Some((_, started)) = self.in_flight {
            // Envoy answers every call, at worst with its timeout; this
            // only guards against a lost callback.
            if now_ms.saturating_sub(started) < 2 * cfg.timeout_ms + 1000 {
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
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "POST"),
            (":path", &cfg.path),
            (":authority", &cfg.authority),
            ("content-type", "application/json"),
        ];
        headers.extend(cfg.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        match h.dispatch_http_call(&cfg.cluster, &headers, &q.body, cfg.timeout_ms) {
            Ok(token) => self.in_flight = Some((token, now_ms)),
            Err(e) => {
                log::warn!("alerts: could not call cluster {:?} (host status {})", cfg.cluster, e.0);
                self.failed(h, cfg, now_ms);
            }
        }
    }

    /// The answer to a call; false when `token` is not this outbox's.
    pub fn on_response(&mut self, h: &dyn Host, cfg: &Alerts, token: u32, n_headers: usize) -> bool {
        if self.in_flight.map(|(t, _)| t) != Some(token) {
            return false;
        }
        self.in_flight = None;
        let now = h.now_ms();
        let status = if n_headers == 0 { None } else { h.header(Map::CallResponseHeaders, ":status").ok().flatten() };
        match status.as_deref().and_then(|s| s.parse::<u32>().ok()) {
            Some(200..=299) => {
                self.queue.pop_front();
                h.count(SENT, 1);
                // The next one need not wait for a tick.
                self.pump(h, cfg, now);
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
        out.push(&h, &cfg, budget_threshold(&b, Decimal::new(5, 1), &s, 7), 7);
        out.push(&h, &cfg, budget_threshold(&b, Decimal::new(5, 1), &s, 7), 7);
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
