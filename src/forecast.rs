//! Forecasts: how fast a key's quotas or a budget are being used (the burn
//! rate over a recent window) and when they run out at that rate (the
//! runway).
//!
//! A rate comes from two aligned buckets of a fixed width (the current one
//! and the one before it) and the instant counting began (`since_ms`, reset
//! after a bucket with nothing in it): what was counted in both, over the time
//! from the later of the previous bucket's start and `since_ms` to now. Under
//! a steady load that is the load's rate, from its first request on; an idle
//! key's rate decays to 0 within two buckets. The counts ride on the writes
//! each request already makes (a key's record, a budget's true-up): a
//! forecast costs no shared-data write of its own.

use crate::key_record::KeyRecord;
use crate::quota::Limits;
use crate::window::{self, Window, MINUTE_MS};
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// A rate needs this much observed time; before that it is unknown.
pub const MIN_SPAN_MS: u64 = 5_000;

/// A budget's spend is counted in buckets of ten minutes (its rate is over
/// the last 10 to 20 minutes); a key's in its UTC minutes (the last 1 to 2).
pub const BUDGET_BUCKET_MS: u64 = 600_000;

/// Where `now_ms` falls relative to a bucket that started at `start_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The same bucket.
    Same,
    /// The next one: the bucket becomes the previous one.
    Next,
    /// Later (or never counted): both buckets are empty.
    Gap,
}

pub fn step(width_ms: u64, start_ms: u64, now_ms: u64) -> Step {
    let width_ms = width_ms.max(1);
    let b = now_ms - now_ms % width_ms;
    if start_ms == b {
        Step::Same
    } else if start_ms.checked_add(width_ms) == Some(b) {
        Step::Next
    } else {
        Step::Gap
    }
}

/// The rate per millisecond of what was counted in the current bucket
/// (`cur`, starting at `start_ms`) and the one before it (`prev`), counting
/// since `since_ms`; `None` while less than [`MIN_SPAN_MS`] was observed.
pub fn rate_per_ms(width_ms: u64, start_ms: u64, cur: f64, prev: f64, since_ms: u64, now_ms: u64) -> Option<f64> {
    let width_ms = width_ms.max(1);
    let b = now_ms - now_ms % width_ms;
    let count = match step(width_ms, start_ms, now_ms) {
        Step::Same => cur + prev,
        Step::Next => cur,
        Step::Gap if since_ms == 0 => return None,
        Step::Gap => return Some(0.0),
    };
    let from = b.saturating_sub(width_ms).max(since_ms);
    let span = now_ms.checked_sub(from).filter(|s| *s >= MIN_SPAN_MS)?;
    Some(count.max(0.0) / span as f64)
}

/// Milliseconds until `remaining` is used up at `per_ms`; `None` at a rate
/// of 0 (it lasts).
pub fn runway_ms(remaining: f64, per_ms: f64) -> Option<u64> {
    if per_ms.is_nan() || per_ms <= 0.0 || per_ms.is_infinite() {
        return None;
    }
    Some((remaining.max(0.0) / per_ms).min(u64::MAX as f64 / 2.0) as u64)
}

/// One quota's outlook.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuotaOutlook {
    /// `rpm`, `tpm`, `daily_tokens` or `monthly_tokens`.
    pub limit: &'static str,
    pub remaining: u64,
    /// Until it is used up at the current rate (`None`: idle, or unknown).
    pub runway_ms: Option<u64>,
    /// When its window resets.
    pub resets_at_ms: u64,
}

impl QuotaOutlook {
    /// Runs out before its window resets.
    pub fn runs_out(&self, now_ms: u64) -> bool {
        self.runway_ms.is_some_and(|r| now_ms.saturating_add(r) < self.resets_at_ms)
    }
}

/// A key's burn rates and, per configured quota, its runway (held without
/// allocating: choosing a key evaluates it).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeyForecast {
    pub requests_per_minute: Option<f64>,
    pub tokens_per_minute: Option<f64>,
    /// `rpm`, `tpm`, `daily_tokens`, `monthly_tokens`, when configured.
    quotas: [Option<QuotaOutlook>; 4],
}

impl KeyForecast {
    /// The configured quotas' outlooks.
    pub fn quotas(&self) -> impl Iterator<Item = &QuotaOutlook> {
        self.quotas.iter().flatten()
    }

    /// The quota that runs out first, before its window resets, if any.
    pub fn first_out(&self, now_ms: u64) -> Option<&QuotaOutlook> {
        self.quotas().filter(|q| q.runs_out(now_ms)).min_by_key(|q| q.runway_ms)
    }
}

/// A key's burn rates per millisecond: (requests, tokens).
fn key_rates(r: &KeyRecord, now_ms: u64) -> (Option<f64>, Option<f64>) {
    let rate = |cur: u64, prev: u64| {
        rate_per_ms(MINUTE_MS, r.minute_start_ms, cur as f64, prev as f64, r.burn_since_ms, now_ms)
    };
    (rate(r.minute_requests, r.prev_minute_requests), rate(r.minute_tokens, r.prev_minute_tokens))
}

/// The forecast of key record `r` under `limits` at `now_ms`. Tokens other
/// instances spent (fleet mode) count in what remains, not in the rate.
pub fn key(r: &KeyRecord, limits: &Limits, now_ms: u64) -> KeyForecast {
    let (req, tok) = key_rates(r, now_ms);
    let mut quotas = [None; 4];
    let mut slots = quotas.iter_mut();
    let mut add = |limit: &'static str, cap: Option<u64>, used: u64, rate: Option<f64>, resets_at_ms: u64| {
        if let (Some(cap), Some(slot)) = (cap, slots.next()) {
            let remaining = cap.saturating_sub(used);
            let runway_ms = rate.and_then(|x| runway_ms(remaining as f64, x));
            *slot = Some(QuotaOutlook { limit, remaining, runway_ms, resets_at_ms });
        }
    };
    let minute_req = window::current(Window::Minute, r.minute_start_ms, r.minute_requests, now_ms);
    let minute_tok = window::current(Window::Minute, r.minute_start_ms, r.minute_tokens, now_ms);
    let minute_end = Window::Minute.next_start(now_ms);
    add("rpm", limits.rpm, minute_req, req, minute_end);
    add("tpm", limits.tpm, minute_tok, tok, minute_end);
    let day = window::current(Window::Day, r.day_start_ms, r.day_tokens, now_ms).saturating_add(window::current(
        Window::Day,
        r.fleet_day_start_ms,
        r.fleet_day_tokens,
        now_ms,
    ));
    add("daily_tokens", limits.daily_tokens, day, tok, Window::Day.next_start(now_ms));
    let month = window::current(Window::Month, r.month_start_ms, r.month_tokens, now_ms)
        .saturating_add(window::current(Window::Month, r.fleet_month_start_ms, r.fleet_month_tokens, now_ms));
    add("monthly_tokens", limits.monthly_tokens, month, tok, Window::Month.next_start(now_ms));
    KeyForecast {
        requests_per_minute: req.map(|x| x * MINUTE_MS as f64),
        tokens_per_minute: tok.map(|x| x * MINUTE_MS as f64),
        quotas,
    }
}

/// The runway score of a key in `[0, 1]`, for the `runway` objective: the
/// share of the time until its quota's window resets that the quota lasts
/// at the current rate (the lowest over its quotas), 1 for a key that lasts
/// until every reset (idle, unlimited, or burning slowly enough).
pub fn runway_score(r: &KeyRecord, limits: &Limits, now_ms: u64) -> f64 {
    if *limits == Limits::default() {
        return 1.0;
    }
    key(r, limits, now_ms)
        .quotas()
        .filter(|q| q.runs_out(now_ms))
        .map(|q| {
            let left = q.resets_at_ms.saturating_sub(now_ms).max(1) as f64;
            (q.runway_ms.unwrap_or(0) as f64 / left).clamp(0.0, 1.0)
        })
        .fold(1.0, f64::min)
}

/// Counts `amount` at `now_ms` into buckets of `width_ms`: rolls the current
/// bucket into the previous one, or restarts both (and `since_ms`) after a
/// gap.
pub fn count<T: Copy + Default + std::ops::Add<Output = T>>(
    width_ms: u64,
    start_ms: &mut u64,
    cur: &mut T,
    prev: &mut T,
    since_ms: &mut u64,
    amount: T,
    now_ms: u64,
) {
    let width_ms = width_ms.max(1);
    match step(width_ms, *start_ms, now_ms) {
        Step::Same => {}
        Step::Next => {
            *prev = *cur;
            *cur = T::default();
        }
        Step::Gap => {
            *prev = T::default();
            *cur = T::default();
            *since_ms = now_ms;
        }
    }
    if *since_ms == 0 {
        *since_ms = now_ms;
    }
    *start_ms = now_ms - now_ms % width_ms;
    *cur = *cur + amount;
}

/// Seconds for display, rounded.
pub fn secs(ms: u64) -> u64 {
    ms.saturating_add(500) / 1000
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl KeyForecast {
    /// The `forecast` object of `GET keys`.
    pub fn to_json(&self, now_ms: u64) -> Value {
        let first = self.first_out(now_ms);
        let quotas: Vec<Value> = self
            .quotas()
            .map(|q| {
                json!({
                    "limit": q.limit,
                    "remaining": q.remaining,
                    "runway_seconds": q.runway_ms.map(secs),
                    "resets_in_seconds": secs(q.resets_at_ms.saturating_sub(now_ms)),
                    "runs_out_before_reset": q.runs_out(now_ms),
                })
            })
            .collect();
        json!({
            "requests_per_minute": self.requests_per_minute.map(round3),
            "tokens_per_minute": self.tokens_per_minute.map(round3),
            "runway_seconds": first.and_then(|q| q.runway_ms).map(secs),
            "runs_out": first.map(|q| q.limit),
            "quotas": quotas,
        })
    }
}

/// A budget's outlook: spend per hour, and when `remaining` is spent at
/// that rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetForecast {
    pub spend_per_hour: Option<f64>,
    pub runway_ms: Option<u64>,
    /// When its window resets (`None`: a total).
    pub resets_at_ms: Option<u64>,
}

impl BudgetForecast {
    pub fn new(spend_per_hour: Option<f64>, remaining: Decimal, resets_at_ms: Option<u64>) -> BudgetForecast {
        let per_ms = spend_per_hour.map(|h| h / 3_600_000.0);
        let remaining = crate::metrics::micros(remaining) as f64 / 1e6;
        let runway_ms = per_ms.and_then(|r| runway_ms(remaining, r));
        BudgetForecast { spend_per_hour, runway_ms, resets_at_ms }
    }

    /// Runs out before the window resets (a total never resets).
    pub fn runs_out(&self, now_ms: u64) -> bool {
        self.runway_ms.is_some_and(|r| self.resets_at_ms.is_none_or(|at| now_ms.saturating_add(r) < at))
    }

    /// The `forecast` object of `GET budgets`.
    pub fn to_json(&self, now_ms: u64) -> Value {
        json!({
            "spend_per_hour": self.spend_per_hour.map(|x| (x * 1e6).round() / 1e6),
            "runway_seconds": self.runway_ms.map(secs),
            "runs_out_before_reset": self.runs_out(now_ms),
        })
    }

    /// The runway gauge: seconds until it runs out before the window
    /// resets, or [`LASTS`] when it does not (idle, or slow enough).
    pub fn gauge(&self, now_ms: u64) -> u64 {
        match self.runway_ms {
            Some(r) if self.runs_out(now_ms) => secs(r).min(LASTS),
            _ => LASTS,
        }
    }
}

/// The runway gauges' value for "does not run out before its window
/// resets": a year, in seconds.
pub const LASTS: u64 = 31_536_000;

impl KeyForecast {
    /// The runway gauge of a key: see [`BudgetForecast::gauge`].
    pub fn gauge(&self, now_ms: u64) -> u64 {
        self.first_out(now_ms).and_then(|q| q.runway_ms).map_or(LASTS, |r| secs(r).min(LASTS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_record::Outcome;
    use crate::usage::Usage;

    const T0: u64 = 1_700_000_000_000 - 1_700_000_000_000 % 60_000;

    #[test]
    fn a_steady_rate_is_measured_from_its_first_count() {
        // 2 per second from T0 + 10 s, for 80 s (across a bucket boundary).
        let (mut start, mut cur, mut prev, mut since) = (0, 0u64, 0u64, 0);
        let mut t = T0 + 10_000;
        while t <= T0 + 90_000 {
            count(60_000, &mut start, &mut cur, &mut prev, &mut since, 1, t);
            t += 500;
        }
        assert_eq!(since, T0 + 10_000);
        let now = T0 + 90_000;
        let r = rate_per_ms(60_000, start, cur as f64, prev as f64, since, now).unwrap_or(0.0) * 1000.0;
        // 161 counts over 80 s: the first one at the span's start.
        assert!((r - 161.0 / 80.0).abs() < 1e-9, "{r}");
        // In the next minute the first one has left the window.
        let later = T0 + 125_000;
        let r = rate_per_ms(60_000, start, cur as f64, prev as f64, since, later).unwrap_or(0.0) * 1000.0;
        assert!((r - cur as f64 / 65.0).abs() < 1e-9, "{r}");
    }

    #[test]
    fn a_rate_is_unknown_until_five_seconds_were_seen_and_zero_after_a_gap() {
        let (mut start, mut cur, mut prev, mut since) = (0, 0u64, 0u64, 0);
        assert_eq!(rate_per_ms(60_000, start, 0.0, 0.0, since, T0), None, "never counted");
        count(60_000, &mut start, &mut cur, &mut prev, &mut since, 10, T0 + 1_000);
        assert_eq!(rate_per_ms(60_000, start, cur as f64, prev as f64, since, T0 + 5_999), None);
        assert_eq!(rate_per_ms(60_000, start, cur as f64, prev as f64, since, T0 + 6_000), Some(10.0 / 5_000.0));
        assert_eq!(rate_per_ms(60_000, start, cur as f64, prev as f64, since, T0 + 120_000), Some(0.0), "idle");
        // Counting again after the gap starts afresh.
        count(60_000, &mut start, &mut cur, &mut prev, &mut since, 3, T0 + 200_000);
        assert_eq!((cur, prev, since), (3, 0, T0 + 200_000));
    }

    #[test]
    fn runway_is_remaining_over_rate_and_lasts_at_rate_zero() {
        assert_eq!(runway_ms(1_000.0, 0.5), Some(2_000));
        assert_eq!(runway_ms(1_000.0, 0.0), None);
        assert_eq!(runway_ms(-5.0, 1.0), Some(0));
        assert_eq!(runway_ms(1.0, f64::NAN), None);
    }

    fn busy(tokens_each: u64, every_ms: u64, from: u64, to: u64) -> KeyRecord {
        let mut r = KeyRecord::default();
        let mut t = from;
        while t <= to {
            let u = Usage { input: tokens_each, total: tokens_each, ..Usage::default() };
            r.record(&Outcome { status: 200, usage: Some(u), ..Outcome::default() }, t, 300_000);
            t += every_ms;
        }
        r
    }

    #[test]
    fn a_daily_quota_runs_out_at_the_current_rate() {
        // 100 tokens a second for 20 s (2,100 tokens with the first) of 10,000 a day.
        let day = T0 - T0 % 86_400_000 + 3_600_000;
        let r = busy(100, 1_000, day, day + 20_000);
        let limits = Limits { daily_tokens: Some(10_000), ..Limits::default() };
        let f = key(&r, &limits, day + 20_000);
        let close = |x: Option<f64>, y: f64| x.is_some_and(|x| (x - y).abs() < 1e-9);
        assert!(close(f.tokens_per_minute, 2_100.0 * 3.0), "{f:?}");
        assert!(close(f.requests_per_minute, 21.0 * 3.0), "{f:?}");
        let q = f.first_out(day + 20_000).copied();
        assert_eq!(q.map(|q| (q.limit, q.remaining)), Some(("daily_tokens", 7_900)));
        // 7,900 tokens at 105 a second.
        assert_eq!(q.and_then(|q| q.runway_ms), Some((7_900.0 / 0.105) as u64));
        let score = runway_score(&r, &limits, day + 20_000);
        let expected = (7_900.0 / 0.105) / (86_400_000.0 - 3_620_000.0);
        assert!((score - expected).abs() < 1e-6, "{score}");
    }

    #[test]
    fn a_quota_that_lasts_until_its_reset_does_not_run_out() {
        let r = busy(10, 6_000, T0, T0 + 30_000);
        // 6 requests in 30 s of an rpm of 60: lasts the minute.
        let limits = Limits { rpm: Some(60), ..Limits::default() };
        let f = key(&r, &limits, T0 + 30_000);
        assert_eq!(f.first_out(T0 + 30_000), None);
        assert_eq!(runway_score(&r, &limits, T0 + 30_000), 1.0);
        assert_eq!(runway_score(&r, &Limits::default(), T0 + 30_000), 1.0, "no limits");
        // An rpm of 8 runs out in this minute: 2 left at 12 a minute.
        let limits = Limits { rpm: Some(8), ..Limits::default() };
        let q = key(&r, &limits, T0 + 30_000).first_out(T0 + 30_000).copied();
        assert_eq!(q.and_then(|q| q.runway_ms), Some(10_000));
        assert!((runway_score(&r, &limits, T0 + 30_000) - 10.0 / 30.0).abs() < 1e-9);
    }
}
