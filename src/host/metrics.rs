//! Envoy stats through proxy-wasm `define_metric` (the names are in
//! [`crate::metrics`]). Counter increments are summed in VM memory and
//! written on the root context's tick (every 500 ms), so the request path
//! makes no metric hostcalls; gauges are written only when they change; the
//! selection-time histogram records one request in eight.

use super::abi;
use crate::metrics::Kind;
use hashbrown::HashMap;
use std::cell::RefCell;

const COUNTER: u32 = 0;
const GAUGE: u32 = 1;
const HISTOGRAM: u32 = 2;

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
            let _ = abi::increment_metric(id, delta.min(i64::MAX as u64) as i64);
        }
    });
}

fn id(kind: u32, name: &str) -> Option<u32> {
    IDS.with(|ids| {
        let mut ids = ids.try_borrow_mut().ok()?;
        if let Some(id) = ids.get(name) {
            return Some(*id);
        }
        let out = abi::define_metric(kind, name).ok()?;
        ids.insert(name.to_string(), out);
        Some(out)
    })
}

/// Defines a stat so that it shows (at zero) before anything happens.
pub fn define(kind: Kind, name: &str) {
    let k = match kind {
        Kind::Counter => COUNTER,
        Kind::Gauge => GAUGE,
        Kind::Histogram => HISTOGRAM,
    };
    let _ = id(k, name);
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
        let _ = abi::record_metric(id, value);
    }
}

/// Whether this histogram value is one of the one in eight recorded.
pub fn histogram_due() -> bool {
    let n = SAMPLE.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n
    });
    n.is_multiple_of(8)
}

/// Records one value in eight.
pub fn histogram(name: &str, value: u64) {
    if histogram_due() {
        record_histogram(name, value);
    }
}

/// Records a histogram value (already sampled).
pub fn record_histogram(name: &str, value: u64) {
    if let Some(id) = id(HISTOGRAM, name) {
        let _ = abi::record_metric(id, value);
    }
}
