//! Metric names and values: the stats the filter writes, by name.
//!
//! Names embed the provider, key, status class and budget ids between dots;
//! the shipped Envoy configs carry `stats_tags` that turn them into
//! Prometheus labels. Every VM defines the same names, which Envoy
//! aggregates into one stat.

use crate::key_record::{Capacity, Effective};
use crate::keys::Eval;
use std::cell::RefCell;

/// Refused admin authentications (no token, or one that matches none).
pub const ADMIN_AUTH_FAILURES: &str = "apikeyrouter.admin.auth_failures";
/// Admin requests refused with a 429 while a worker's failure budget is spent.
pub const ADMIN_AUTH_THROTTLED: &str = "apikeyrouter.admin.auth_throttled";
/// Values read from etcd outside their bounds, dropped (and the range
/// answers refused for their size).
pub const FLEET_VALUES_DROPPED: &str = "apikeyrouter.fleet.values_dropped";

/// Requests that referred to an object the gateway knows, sent to its group.
pub const OBJECTS_HITS: &str = "apikeyrouter.objects.affinity_hits";
/// Requests that referred to an object the gateway does not know.
pub const OBJECTS_MISSES: &str = "apikeyrouter.objects.affinity_misses";
/// Requests answered 404 for another client's (or an unknown, denied) object.
pub const OBJECTS_REFUSED: &str = "apikeyrouter.objects.refused";
/// Objects recorded from providers' answers, and records dropped for room.
pub const OBJECTS_RECORDED: &str = "apikeyrouter.objects.recorded";
pub const OBJECTS_EVICTED: &str = "apikeyrouter.objects.evicted";

thread_local! {
    /// Counter increments made where no host is at hand (the admin API),
    /// until the root context's next tick writes them.
    static NOTED: RefCell<Vec<(&'static str, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Adds to a counter from code that has no host; [`take_noted`] hands the
/// sums to the tick.
pub fn note(name: &'static str, delta: u64) {
    NOTED.with(|n| {
        let Ok(mut n) = n.try_borrow_mut() else { return };
        match n.iter_mut().find(|(k, _)| *k == name) {
            Some((_, v)) => *v = v.saturating_add(delta),
            None => n.push((name, delta)),
        }
    });
}

/// The increments noted since the last call, by counter.
pub fn take_noted() -> Vec<(&'static str, u64)> {
    NOTED.with(|n| n.try_borrow_mut().map(|mut n| std::mem::take(&mut *n)).unwrap_or_default())
}

/// Counters and gauges that must show (at zero) before anything happens:
/// the global ones, the fleet's and each budget's.
pub fn static_names(cfg: &crate::config::Config) -> Vec<(Kind, String)> {
    let mut out = vec![
        (Kind::Counter, "apikeyrouter.no_key".to_string()),
        (Kind::Counter, "apikeyrouter.cas_conflicts".to_string()),
        (Kind::Histogram, "apikeyrouter.selection_us".to_string()),
    ];
    if cfg.admin.enabled {
        out.push((Kind::Counter, ADMIN_AUTH_FAILURES.to_string()));
        out.push((Kind::Counter, ADMIN_AUTH_THROTTLED.to_string()));
    }
    if cfg.objects.enabled {
        for name in [OBJECTS_HITS, OBJECTS_MISSES, OBJECTS_REFUSED, OBJECTS_RECORDED, OBJECTS_EVICTED] {
            out.push((Kind::Counter, name.to_string()));
        }
    }
    if cfg.fleet.is_some() {
        for c in [
            "syncs",
            "sync_failures",
            "pushes",
            "push_conflicts",
            "states_applied",
            "instance_conflicts",
            "objects_learned",
        ] {
            out.push((Kind::Counter, format!("apikeyrouter.fleet.{c}")));
        }
        out.push((Kind::Counter, FLEET_VALUES_DROPPED.to_string()));
        out.push((Kind::Gauge, "apikeyrouter.fleet.degraded".to_string()));
    }
    if cfg.alerts.is_some() {
        for c in [crate::alerts::QUEUED, crate::alerts::SENT, crate::alerts::FAILED, crate::alerts::DROPPED] {
            out.push((Kind::Counter, c.to_string()));
        }
        if cfg.fleet.is_some() {
            out.push((Kind::Counter, crate::alerts::CLAIMED_ELSEWHERE.to_string()));
        }
    }
    for b in &cfg.budgets {
        out.push((Kind::Counter, budget_metric(&b.id, "refused")));
        out.push((Kind::Counter, budget_metric(&b.id, "soft_over")));
        out.push((Kind::Gauge, budget_metric(&b.id, "spent_micros")));
        out.push((Kind::Gauge, budget_metric(&b.id, "reservations_expired")));
    }
    out
}

/// The kind of a stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// `apikeyrouter.key.<provider>.<key>.<what>`
pub fn key_metric(provider: &str, key: &str, what: &str) -> String {
    format!("apikeyrouter.key.{provider}.{key}.{what}")
}

/// The status class label of an attempt: `2xx`..`5xx`, or `none` when no
/// response arrived.
pub fn status_class(status: u32) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

/// Gauge value of a key state: 0 available, 1 throttled, 2 exhausted,
/// 3 disabled.
pub fn state_code(e: Effective) -> u64 {
    match e {
        Effective::Available => 0,
        Effective::Throttled { .. } => 1,
        Effective::Exhausted { .. } => 2,
        Effective::Disabled => 3,
    }
}

/// A key's state and capacity gauges, from its evaluation.
pub fn key_gauges(provider: &str, key: &str, e: &Eval, effective: Effective) -> [(String, u64); 2] {
    let cap = match e.capacity {
        Capacity::Abundant => 0,
        Capacity::Constrained => 1,
        Capacity::Critical => 2,
        Capacity::Exhausted => 3,
    };
    [(key_metric(provider, key, "state"), state_code(effective)), (key_metric(provider, key, "capacity"), cap)]
}

/// A key's forecast gauges: its runway in seconds (see
/// [`crate::forecast::LASTS`]) and its burn rates per minute, rounded.
pub fn key_forecast_gauges(
    provider: &str,
    key: &str,
    f: &crate::forecast::KeyForecast,
    now_ms: u64,
) -> [(String, u64); 3] {
    let per_minute = |x: Option<f64>| x.map_or(0, |x| x.round().max(0.0) as u64);
    [
        (key_metric(provider, key, "runway_seconds"), f.gauge(now_ms)),
        (key_metric(provider, key, "tokens_per_minute"), per_minute(f.tokens_per_minute)),
        (key_metric(provider, key, "requests_per_minute"), per_minute(f.requests_per_minute)),
    ]
}

/// A budget's forecast gauges: its runway in seconds and its spend per hour
/// in millionths.
pub fn budget_forecast_gauges(id: &str, f: &crate::forecast::BudgetForecast, now_ms: u64) -> [(String, u64); 2] {
    let per_hour = f.spend_per_hour.map_or(0, |x| (x * 1e6).round().max(0.0) as u64);
    [(budget_metric(id, "runway_seconds"), f.gauge(now_ms)), (budget_metric(id, "spend_per_hour_micros"), per_hour)]
}

/// `apikeyrouter.model.<label>.<what>`: `label` is the price table entry
/// that priced the request, or `other` ([`crate::budget::PriceTable::label`];
/// empty counts as `other`). It may hold dots: the shipped `stats_tags`
/// match `<what>` at the end.
pub fn model_metric(label: &str, what: &str) -> String {
    let label = if label.is_empty() { crate::budget::OTHER_MODEL } else { label };
    format!("apikeyrouter.model.{label}.{what}")
}

/// `apikeyrouter.budget.<id>.<what>`
/// Requests that fell over from provider `from` to provider `to`.
pub fn fallover_metric(from: &str, to: &str) -> String {
    format!("apikeyrouter.fallover.{from}.{to}")
}

pub fn budget_metric(id: &str, what: &str) -> String {
    format!("apikeyrouter.budget.{id}.{what}")
}

/// An amount in millionths, for integer stats.
pub fn micros(d: rust_decimal::Decimal) -> u64 {
    use rust_decimal::prelude::ToPrimitive;
    if d <= rust_decimal::Decimal::ZERO {
        return 0;
    }
    // Beyond u64 (or Decimal) millionths: the most there is, never a trap
    // nor a 0 (a budget's limit may be that large).
    d.checked_mul(rust_decimal::Decimal::from(1_000_000)).and_then(|m| m.round().to_u64()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noted_increments_are_summed_by_name_and_handed_over_once() {
        note(ADMIN_AUTH_FAILURES, 1);
        note(ADMIN_AUTH_THROTTLED, 2);
        note(ADMIN_AUTH_FAILURES, 3);
        assert_eq!(take_noted(), vec![(ADMIN_AUTH_FAILURES, 4), (ADMIN_AUTH_THROTTLED, 2)]);
        assert_eq!(take_noted(), vec![]);
    }
}
