//! Rate-limit header parsing: `retry-after` (seconds or HTTP-date),
//! `retry-after-ms`, OpenAI's `x-ratelimit-reset-*` durations, and the
//! cooldown chosen from a whole header set.
//!
//! The input is text, one header per line (`name: value`); every line is also
//! tried as a bare value with each parser. Properties checked, beyond "never
//! panics":
//! - decimal values round up to the exact millisecond (never shorter than
//!   asked, never a whole millisecond longer) and stay within ten years;
//! - a numeric `retry-after` does not depend on the clock, agrees with
//!   `retry-after-ms` on whole numbers and with a bare-number duration; a
//!   date `retry-after` is the date minus now;
//! - a Go duration is the sum of its parts; a trailing `s` on a bare number
//!   changes nothing;
//! - an HTTP-date is a whole second that formats back to the same instant,
//!   and a well-formed date (derived from the input) parses to the instant an
//!   independent day count gives;
//! - the cooldown lies in `[1, max]` and follows the documented precedence:
//!   `retry-after-ms`, then `retry-after`, then a reset, else the default.
#![no_main]

use apikeyrouter::ratelimit::{
    cooldown_ms, parse_duration, parse_http_date, parse_retry_after, parse_retry_after_ms, Signals,
};
use libfuzzer_sys::fuzz_target;

/// Ten years, the documented ceiling.
const MAX_MS: u64 = 10 * 365 * 86_400_000;
const NOWS: [u64; 3] = [0, 1_700_000_000_000, u64::MAX];
const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const WDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]; // 1970-01-01 was a Thursday

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn month_days(y: u64, m: usize) -> u64 {
    match m {
        2 if leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 by plain counting (independent of the parser's
/// closed form).
fn days_since_epoch(y: u64, m: usize, d: u64) -> u64 {
    let mut days = 0;
    // Whole 400-year cycles first (146,097 days each) to keep this cheap.
    let mut year = 1970;
    while year + 400 <= y {
        days += 146_097;
        year += 400;
    }
    while year < y {
        days += if leap(year) { 366 } else { 365 };
        year += 1;
    }
    for mm in 1..m {
        days += month_days(y, mm);
    }
    days + d - 1
}

/// Unix milliseconds (a whole second) as an IMF-fixdate.
fn format_http_date(ms: u64) -> String {
    let secs = ms / 1000;
    let mut days = secs / 86_400;
    let rem = secs % 86_400;
    let wday = WDAYS[(days % 7) as usize];
    let mut y = 1970;
    loop {
        let len = if leap(y) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        y += 1;
    }
    let mut m = 1;
    while days >= month_days(y, m) {
        days -= month_days(y, m);
        m += 1;
    }
    format!("{wday}, {:02} {} {y} {:02}:{:02}:{:02} GMT", days + 1, MONTHS[m - 1], rem / 3600, rem / 60 % 60, rem % 60)
}

/// For `I.F` (digits only, at most one dot), the exact value in units of
/// `unit_ns` nanoseconds, rounded up to whole milliseconds; `None` when it is
/// not such a number or is too long to compute exactly here.
fn exact_ceil_ms(v: &str, unit_ns: u128) -> Option<u128> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || int.len() > 15
        || 10u128.pow(frac.len().min(38) as u32) > unit_ns
    {
        return None;
    }
    let scale = 10u128.pow(frac.len() as u32);
    let i: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let f: u128 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    // value = (i + f/scale) units = (i*scale + f) * unit_ns / scale ns
    let ns_num = (i * scale + f) * unit_ns;
    Some(ns_num.div_ceil(scale * 1_000_000))
}

fn check_value(v: &str) {
    let t = v.trim();

    // retry-after-ms
    let ram = parse_retry_after_ms(v);
    if let Ok(n) = ram {
        assert!(n <= MAX_MS, "retry-after-ms {v:?} gave {n}");
        assert!(!t.is_empty());
    }
    if let Some(want) = exact_ceil_ms(t, 1_000_000) {
        if want <= u128::from(MAX_MS) {
            assert_eq!(ram.clone().map(u128::from), Ok(want), "retry-after-ms {v:?}");
        }
    }

    // retry-after
    let ra = parse_retry_after(v, NOWS[0]);
    for now in NOWS {
        let r = parse_retry_after(v, now);
        if t.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
            assert_eq!(r, ra, "numeric retry-after {v:?} depends on the clock");
            if let Ok(n) = r {
                assert!(n <= MAX_MS, "retry-after {v:?} gave {n}");
            }
        } else if !t.is_empty() {
            assert_eq!(
                r.ok(),
                parse_http_date(t).ok().map(|at| at.saturating_sub(now)),
                "date retry-after {v:?} at {now}"
            );
        }
    }
    if let Some(want) = exact_ceil_ms(t, 1_000_000_000) {
        if want <= u128::from(MAX_MS) && t.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
            assert_eq!(ra.clone().map(u128::from), Ok(want), "retry-after {v:?}");
        }
    }
    if let (Ok(s), Ok(ms)) = (&ra, &ram) {
        if t.bytes().all(|b| b.is_ascii_digit()) {
            assert_eq!(*s, ms * 1000, "retry-after {v:?} seconds vs milliseconds");
        }
    }

    // x-ratelimit-reset-* durations
    let d = parse_duration(v);
    if let Ok(n) = d {
        assert!(n <= MAX_MS, "duration {v:?} gave {n}");
    }
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        if t.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
            assert_eq!(d, ra, "bare-number duration {v:?} vs retry-after");
        }
        assert_eq!(d, parse_duration(&format!("{t}s")), "{t:?} vs {t:?}s");
    }

    // HTTP-date
    if let Ok(at) = parse_http_date(v) {
        assert_eq!(at % 1000, 0, "{v:?} is not a whole second");
        // (A leap second on 9999-12-31 rolls into year 10000, which no
        // HTTP-date can name.)
        let back = format_http_date(at);
        if !back.contains(" 10000 ") {
            assert_eq!(parse_http_date(&back), Ok(at), "{v:?} -> {at} -> {back:?}");
        }
    }
}

/// A Go duration ends in a unit, so that another can follow it.
fn has_unit(t: &str) -> bool {
    t.chars().last().is_some_and(|c| !(c.is_ascii_digit() || c == '.'))
}

fn check_sum(x: &str, y: &str) {
    let (x, y) = (x.trim(), y.trim());
    if !has_unit(x) || !has_unit(y) {
        return;
    }
    if let (Ok(a), Ok(b)) = (parse_duration(x), parse_duration(y)) {
        if a + b <= MAX_MS {
            assert_eq!(parse_duration(&format!("{x}{y}")), Ok(a + b), "{x:?} + {y:?}");
        }
    }
}

/// A well-formed date from the input's hash, checked against plain counting.
fn check_generated_date(h: u64) {
    let y = 1970 + h % 8030;
    let m = 1 + (h >> 13) as usize % 12;
    let d = 1 + (h >> 17) % month_days(y, m);
    let (hh, mm, ss) = ((h >> 22) % 24, (h >> 27) % 60, (h >> 33) % 60);
    let days = days_since_epoch(y, m, d);
    let want = ((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000;
    let s = format!("{}, {d:02} {} {y} {hh:02}:{mm:02}:{ss:02} GMT", WDAYS[(days % 7) as usize], MONTHS[m - 1]);
    assert_eq!(parse_http_date(&s), Ok(want), "{s}");
    assert_eq!(format_http_date(want), s);
    assert_eq!(parse_retry_after(&s, want), Ok(0));
    if want >= 1500 {
        assert_eq!(parse_retry_after(&s, want - 1500), Ok(1500));
    }
}

fn check_cooldown(headers: &[(String, String)], now: u64, default_ms: u64, max_ms: u64) {
    let s = Signals::from_headers(headers);
    let c = cooldown_ms(&s, now, default_ms, max_ms);
    let hi = max_ms.max(1);
    assert!((1..=hi).contains(&c), "cooldown {c} outside [1, {hi}]");
    let clamp = |v: u64| v.clamp(1, hi);
    let last =
        |names: &[&str]| headers.iter().rev().find(|(n, _)| names.contains(&n.as_str())).map(|(_, v)| v.as_str());
    assert_eq!(s.retry_after, last(&["retry-after"]), "the last retry-after counts");
    assert_eq!(s.retry_after_ms, last(&["retry-after-ms", "x-ms-retry-after-ms"]));
    assert_eq!(s.reset_requests, last(&["x-ratelimit-reset-requests"]));
    assert_eq!(s.reset_tokens, last(&["x-ratelimit-reset-tokens"]));
    let ms = s.retry_after_ms.and_then(|v| parse_retry_after_ms(v).ok());
    let ra = s.retry_after.and_then(|v| parse_retry_after(v, now).ok());
    let req = s.reset_requests.and_then(|v| parse_duration(v).ok());
    let tok = s.reset_tokens.and_then(|v| parse_duration(v).ok());
    if let Some(v) = ms {
        assert_eq!(c, clamp(v), "retry-after-ms comes first");
    } else if let Some(v) = ra {
        assert_eq!(c, clamp(v), "retry-after comes second");
    } else if req.is_some() || tok.is_some() {
        assert!(
            Some(c) == req.map(clamp) || Some(c) == tok.map(clamp),
            "cooldown {c} is neither reset ({req:?}, {tok:?})"
        );
    } else {
        assert_eq!(c, clamp(default_ms), "nothing readable: the default");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.split('\n').collect();
    let mut headers = Vec::new();
    for l in &lines {
        check_value(l);
        if let Some((name, value)) = l.split_once(':') {
            check_value(value);
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    for w in lines.windows(2) {
        check_sum(w[0], w[1]);
    }
    let h = fnv(data);
    check_generated_date(h);
    for (now, default_ms, max_ms) in
        [(1_700_000_000_000, 60_000, 3_600_000), (0, 1000, 1000), (u64::MAX, 0, 0), (h, h >> 3, h >> 1)]
    {
        check_cooldown(&headers, now, default_ms, max_ms);
    }
});
