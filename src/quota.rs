//! Quota awareness: how much room a key has left, from the tighter of its
//! configured quotas (rpm, tpm, daily and monthly tokens, in UTC windows) and
//! what the provider reports in `x-ratelimit-remaining-*`.

use crate::key_record::{Capacity, KeyRecord, UNKNOWN};
use crate::window::{self, Window};

/// Per-key configured quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub daily_tokens: Option<u64>,
    pub monthly_tokens: Option<u64>,
}

/// Remaining fraction at or below which a key is Constrained / Critical.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub constrained: f64,
    pub critical: f64,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds { constrained: 0.5, critical: 0.15 }
    }
}

/// A key's room at an instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Headroom {
    /// Remaining fraction of the tightest dimension, in `[0, 1]`.
    pub fraction: f64,
    pub capacity: Capacity,
    /// The tightest dimension, e.g. `rpm` or `provider_requests`.
    pub tightest: &'static str,
    /// When exhausted: the instant the tightest dimension resets.
    pub resets_at_ms: u64,
}

fn fraction(used: u64, limit: u64) -> f64 {
    if limit == 0 {
        0.0
    } else {
        (1.0 - used as f64 / limit as f64).clamp(0.0, 1.0)
    }
}

/// The remaining fraction the provider reported, while its window lasts.
/// Without a limit only "none left" is known.
fn reported(remaining: u64, limit: u64, reset_ms: u64, now_ms: u64) -> Option<f64> {
    if remaining == UNKNOWN || reset_ms <= now_ms {
        return None;
    }
    Some(if limit != UNKNOWN && limit > 0 {
        (remaining as f64 / limit as f64).clamp(0.0, 1.0)
    } else if remaining == 0 {
        0.0
    } else {
        1.0
    })
}

/// Computes a key's headroom at `now_ms`.
pub fn headroom(r: &KeyRecord, limits: &Limits, t: &Thresholds, now_ms: u64) -> Headroom {
    let mut best = Headroom { fraction: 1.0, capacity: Capacity::Abundant, tightest: "", resets_at_ms: 0 };
    let mut consider = |f: f64, name: &'static str, resets_at: u64| {
        let tighter = f < best.fraction || (f == 0.0 && best.fraction == 0.0 && resets_at > best.resets_at_ms);
        if tighter {
            best.fraction = f;
            best.tightest = name;
            best.resets_at_ms = resets_at;
        }
    };
    let minute_req = window::current(Window::Minute, r.minute_start_ms, r.minute_requests, now_ms);
    let minute_tok = window::current(Window::Minute, r.minute_start_ms, r.minute_tokens, now_ms);
    if let Some(rpm) = limits.rpm {
        consider(fraction(minute_req, rpm), "rpm", Window::Minute.next_start(now_ms));
    }
    if let Some(tpm) = limits.tpm {
        consider(fraction(minute_tok, tpm), "tpm", Window::Minute.next_start(now_ms));
    }
    if let Some(d) = limits.daily_tokens {
        let used = window::current(Window::Day, r.day_start_ms, r.day_tokens, now_ms).saturating_add(window::current(
            Window::Day,
            r.fleet_day_start_ms,
            r.fleet_day_tokens,
            now_ms,
        ));
        consider(fraction(used, d), "daily_tokens", Window::Day.next_start(now_ms));
    }
    if let Some(m) = limits.monthly_tokens {
        let used = window::current(Window::Month, r.month_start_ms, r.month_tokens, now_ms)
            .saturating_add(window::current(Window::Month, r.fleet_month_start_ms, r.fleet_month_tokens, now_ms));
        consider(fraction(used, m), "monthly_tokens", Window::Month.next_start(now_ms));
    }
    let p = &r.provider;
    if let Some(f) = reported(p.remaining_requests, p.limit_requests, p.reset_requests_ms, now_ms) {
        consider(f, "provider_requests", p.reset_requests_ms);
    }
    if let Some(f) = reported(p.remaining_tokens, p.limit_tokens, p.reset_tokens_ms, now_ms) {
        consider(f, "provider_tokens", p.reset_tokens_ms);
    }
    // A hair of tolerance so that 3 of 20 left is 15% exactly.
    const EPS: f64 = 1e-9;
    best.capacity = if best.fraction <= 0.0 {
        Capacity::Exhausted
    } else if best.fraction <= t.critical + EPS {
        Capacity::Critical
    } else if best.fraction <= t.constrained + EPS {
        Capacity::Constrained
    } else {
        Capacity::Abundant
    };
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_record::Outcome;
    use crate::ratelimit::Signals;
    use crate::usage::Usage;

    const T: Thresholds = Thresholds { constrained: 0.5, critical: 0.15 };

    fn used(requests: u64, tokens_each: u64, now: u64) -> KeyRecord {
        let mut r = KeyRecord::default();
        for _ in 0..requests {
            let u = Usage { input: tokens_each, output: 0, total: tokens_each, ..Usage::default() };
            r.record(&Outcome { status: 200, usage: Some(u), ..Outcome::default() }, now, 60_000);
        }
        r
    }

    #[test]
    fn capacity_moves_from_abundant_to_exhausted_as_rpm_is_used() {
        let limits = Limits { rpm: Some(20), ..Limits::default() };
        let states: Vec<Capacity> = [0, 9, 10, 16, 17, 19, 20]
            .iter()
            .map(|n| headroom(&used(*n, 1, 1_000), &limits, &T, 1_000).capacity)
            .collect();
        use Capacity::*;
        assert_eq!(states, vec![Abundant, Abundant, Constrained, Constrained, Critical, Critical, Exhausted]);
    }

    #[test]
    fn exhausted_quota_resets_at_the_utc_window_boundary() {
        let limits = Limits { daily_tokens: Some(100), ..Limits::default() };
        let day = 86_400_000;
        let r = used(1, 100, 5 * day + 10);
        let h = headroom(&r, &limits, &T, 5 * day + 20);
        assert_eq!(h.capacity, Capacity::Exhausted);
        assert_eq!(h.tightest, "daily_tokens");
        assert_eq!(h.resets_at_ms, 6 * day);
        assert_eq!(headroom(&r, &limits, &T, 6 * day).capacity, Capacity::Abundant);
    }

    #[test]
    fn the_tighter_of_configured_and_provider_reported_wins() {
        let limits = Limits { tpm: Some(1000), ..Limits::default() };
        let mut r = used(1, 100, 0); // 90% of tpm left
        let s = Signals {
            remaining_requests: Some("3"),
            limit_requests: Some("100"),
            reset_requests: Some("10s"),
            ..Signals::default()
        };
        r.learn_limits(&s, 0);
        let h = headroom(&r, &limits, &T, 1);
        assert_eq!((h.capacity, h.tightest), (Capacity::Critical, "provider_requests"));
        // Once the provider's window has reset, its figure no longer counts.
        let h = headroom(&r, &limits, &T, 10_001);
        assert_eq!((h.capacity, h.tightest), (Capacity::Abundant, "tpm"));
    }

    #[test]
    fn provider_zero_remaining_without_limit_is_exhausted_until_reset() {
        let mut r = KeyRecord::default();
        let s = Signals { remaining_tokens: Some("0"), reset_tokens: Some("6m0s"), ..Signals::default() };
        r.learn_limits(&s, 0);
        let h = headroom(&r, &Limits::default(), &T, 1);
        assert_eq!(h.capacity, Capacity::Exhausted);
        assert_eq!(h.resets_at_ms, 360_000);
    }

    #[test]
    fn monthly_quota_counts_tokens_across_days() {
        let limits = Limits { monthly_tokens: Some(1000), ..Limits::default() };
        let day = 86_400_000;
        let mut r = used(1, 500, 2 * day);
        r.record(
            &Outcome {
                status: 200,
                usage: Some(Usage { input: 0, output: 400, total: 400, ..Usage::default() }),
                ..Outcome::default()
            },
            9 * day,
            60_000,
        );
        let h = headroom(&r, &limits, &T, 9 * day);
        assert_eq!(h.capacity, Capacity::Critical);
        // 1 Feb 1970 starts a new month.
        assert_eq!(headroom(&r, &limits, &T, 31 * day).capacity, Capacity::Abundant);
    }
}
