//! Envoy stats defined through proxy-wasm `define_metric`.
//!
//! Names embed the provider, key, status class and budget ids between dots;
//! the shipped Envoy configs carry `stats_tags` that turn them into
//! Prometheus labels. Every VM defines the same names, which Envoy
//! aggregates into one stat. Counter increments are summed in VM memory and
//! written on the root context's tick (every 500 ms), so the request path
//! makes no metric hostcalls; gauges are written only when they change; the
//! selection-time histogram records one request in eight.

use crate::keys::Eval;
use crate::state::{Capacity, Effective};
use hashbrown::HashMap;
use std::cell::RefCell;

const COUNTER: u32 = 0;
const GAUGE: u32 = 1;
const HISTOGRAM: u32 = 2;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
}

thread_local! {
    static IDS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
    /// Gauge values this VM last wrote, so unchanged ones are not rewritten.
    static LAST: RefCell<HashMap<u32, u64>> = RefCell::new(HashMap::new());
    /// Counter increments not yet written.
    static PENDING: RefCell<HashMap<u32, u64>> = RefCell::new(HashMap::new());
    static SAMPLE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Writes the counter increments summed since the last flush.
pub fn flush() {
    PENDING.with(|p| {
        let Ok(mut p) = p.try_borrow_mut() else { return };
        for (id, delta) in p.drain() {
            // SAFETY: plain integers.
            unsafe { proxy_increment_metric(id, delta.min(i64::MAX as u64) as i64) };
        }
    });
}

fn id(kind: u32, name: &str) -> Option<u32> {
    IDS.with(|ids| {
        let mut ids = ids.try_borrow_mut().ok()?;
        if let Some(id) = ids.get(name) {
            return Some(*id);
        }
        let mut out: u32 = 0;
        // SAFETY: pointers into a live string and a local.
        let st = unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut out) };
        if st != 0 {
            return None;
        }
        ids.insert(name.to_string(), out);
        Some(out)
    })
}

/// Defines the stats that must show (at zero) before anything happens:
/// the global ones and each budget's.
pub fn define_static(cfg: &crate::config::Config) {
    let _ = id(COUNTER, "apikeyrouter.no_key");
    let _ = id(COUNTER, "apikeyrouter.cas_conflicts");
    let _ = id(HISTOGRAM, "apikeyrouter.selection_us");
    if cfg.fleet.is_some() {
        for c in ["syncs", "sync_failures", "pushes", "push_conflicts", "states_applied", "instance_conflicts"] {
            let _ = id(COUNTER, &format!("apikeyrouter.fleet.{c}"));
        }
        let _ = id(GAUGE, "apikeyrouter.fleet.degraded");
    }
    for b in &cfg.budgets {
        let _ = id(COUNTER, &budget_metric(&b.id, "refused"));
        let _ = id(COUNTER, &budget_metric(&b.id, "soft_over"));
        let _ = id(GAUGE, &budget_metric(&b.id, "spent_micros"));
    }
}

pub fn add(name: &str, delta: u64) {
    if delta == 0 {
        return;
    }
    if let Some(id) = id(COUNTER, name) {
        PENDING.with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                *p.entry(id).or_insert(0) += delta;
            }
        });
    }
}

pub fn gauge(name: &str, value: u64) {
    let Some(id) = id(GAUGE, name) else { return };
    let changed = LAST.with(|l| l.try_borrow_mut().map(|mut l| l.insert(id, value) != Some(value)).unwrap_or(true));
    if changed {
        // SAFETY: plain integers.
        unsafe { proxy_record_metric(id, value) };
    }
}

/// Records one value in eight.
pub fn histogram(name: &str, value: u64) {
    let n = SAMPLE.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n
    });
    if !n.is_multiple_of(8) {
        return;
    }
    if let Some(id) = id(HISTOGRAM, name) {
        // SAFETY: plain integers.
        unsafe { proxy_record_metric(id, value) };
    }
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

/// Writes a key's state and capacity gauges from its evaluation.
pub fn key_gauges(provider: &str, key: &str, e: &Eval, effective: Effective) {
    gauge(&key_metric(provider, key, "state"), state_code(effective));
    let cap = match e.capacity {
        Capacity::Abundant => 0,
        Capacity::Constrained => 1,
        Capacity::Critical => 2,
        Capacity::Exhausted => 3,
    };
    gauge(&key_metric(provider, key, "capacity"), cap);
}

/// `apikeyrouter.budget.<id>.<what>`
pub fn budget_metric(id: &str, what: &str) -> String {
    format!("apikeyrouter.budget.{id}.{what}")
}

/// An amount in millionths, for integer stats.
pub fn micros(d: rust_decimal::Decimal) -> u64 {
    use rust_decimal::prelude::ToPrimitive;
    (d * rust_decimal::Decimal::from(1_000_000)).round().to_u64().unwrap_or(0)
}
