//! UTC-aligned time windows (minute, day, month), on Unix milliseconds.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub const MINUTE_MS: u64 = 60_000;
pub const DAY_MS: u64 = 86_400_000;

/// A calendar window kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minute,
    Hour,
    Day,
    Month,
}

impl Window {
    /// Start of the window containing `now_ms`.
    pub fn start(self, now_ms: u64) -> u64 {
        match self {
            Window::Minute => now_ms - now_ms % MINUTE_MS,
            Window::Hour => now_ms - now_ms % 3_600_000,
            Window::Day => now_ms - now_ms % DAY_MS,
            Window::Month => {
                let (y, m, _) = civil_from_days((now_ms / DAY_MS) as i64);
                days_from_civil(y, m, 1).max(0) as u64 * DAY_MS
            }
        }
    }

    /// Start of the next window after the one containing `now_ms`.
    pub fn next_start(self, now_ms: u64) -> u64 {
        match self {
            Window::Minute => self.start(now_ms) + MINUTE_MS,
            Window::Hour => self.start(now_ms) + 3_600_000,
            Window::Day => self.start(now_ms) + DAY_MS,
            Window::Month => {
                let (y, m, _) = civil_from_days((now_ms / DAY_MS) as i64);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(ny, nm, 1).max(0) as u64 * DAY_MS
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) for days since 1970-01-01 (Howard Hinnant).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// RFC 3339 UTC time for Unix milliseconds, e.g. `2026-11-29T00:00:00Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// Parses an RFC 3339 time (`2027-01-01T00:00:00Z`, fractions and `±HH:MM`
/// offsets allowed) to Unix milliseconds, fractions cut to the millisecond;
/// `None` for anything else, a day past its month's end, or a time before
/// 1970.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let t = OffsetDateTime::parse(s.trim(), &Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

/// A counter that restarts at each window boundary: `(window_start, value)`.
/// Returns the value as of `now_ms` (0 after a roll-over).
pub fn current(window: Window, start_ms: u64, value: u64, now_ms: u64) -> u64 {
    if start_ms == window.start(now_ms) {
        value
    } else {
        0
    }
}

/// Adds `delta` to a windowed counter, rolling it over first when needed.
pub fn add(window: Window, start_ms: &mut u64, value: &mut u64, delta: u64, now_ms: u64) {
    let s = window.start(now_ms);
    if *start_ms != s {
        *start_ms = s;
        *value = 0;
    }
    *value = value.saturating_add(delta);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::parse_http_date;

    fn at(s: &str) -> u64 {
        parse_http_date(s).unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-1000i64, 0, 59, 365, 10_957, 19_782, 20_000, 60_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }

    #[test]
    fn windows_align_to_utc_boundaries() {
        let t = at("Sat, 28 Nov 2026 13:45:30 GMT") + 250;
        assert_eq!(Window::Minute.start(t), at("Sat, 28 Nov 2026 13:45:00 GMT"));
        assert_eq!(Window::Hour.start(t), at("Sat, 28 Nov 2026 13:00:00 GMT"));
        assert_eq!(Window::Day.start(t), at("Sat, 28 Nov 2026 00:00:00 GMT"));
        assert_eq!(Window::Month.start(t), at("Sun, 01 Nov 2026 00:00:00 GMT"));
        assert_eq!(Window::Month.next_start(t), at("Tue, 01 Dec 2026 00:00:00 GMT"));
        let dec = at("Thu, 31 Dec 2026 23:59:59 GMT");
        assert_eq!(Window::Month.next_start(dec), at("Fri, 01 Jan 2027 00:00:00 GMT"));
        assert_eq!(Window::Day.next_start(dec), at("Fri, 01 Jan 2027 00:00:00 GMT"));
        let feb = at("Tue, 29 Feb 2028 12:00:00 GMT");
        assert_eq!(Window::Month.start(feb), at("Tue, 01 Feb 2028 00:00:00 GMT"));
        assert_eq!(Window::Month.next_start(feb), at("Wed, 01 Mar 2028 00:00:00 GMT"));
    }

    #[test]
    fn rfc3339_parses_utc_offsets_and_fractions() {
        assert_eq!(parse_rfc3339("2026-11-28T13:45:30Z"), Some(at("Sat, 28 Nov 2026 13:45:30 GMT")));
        assert_eq!(parse_rfc3339("2026-11-28T14:45:30.5+01:00"), Some(at("Sat, 28 Nov 2026 13:45:30 GMT") + 500));
        for bad in [
            "",
            "2026-11-28",
            "2026-13-01T00:00:00Z",
            "2026-11-28T13:45:30",
            "2026-11-28T13:45:30.Z",
            "x026-11-28T13:45:30Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_refuses_days_past_the_end_of_the_month() {
        assert_eq!(parse_rfc3339("2028-02-29T00:00:00Z"), Some(at("Tue, 29 Feb 2028 00:00:00 GMT")), "a leap day");
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400_000), "400 years make a leap year");
        assert_eq!(parse_rfc3339("2026-04-30T00:00:00Z"), Some(at("Thu, 30 Apr 2026 00:00:00 GMT")));
        for bad in [
            "2027-02-31T00:00:00Z",
            "2027-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-31T12:00:00+01:00",
            "2026-12-32T00:00:00Z",
            "2026-12-00T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_renders_utc() {
        assert_eq!(rfc3339(at("Sat, 28 Nov 2026 13:45:30 GMT")), "2026-11-28T13:45:30Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn windowed_counters_roll_over_at_the_boundary() {
        let t = at("Sat, 28 Nov 2026 23:59:59 GMT");
        let (mut start, mut v) = (0, 0);
        add(Window::Day, &mut start, &mut v, 5, t);
        add(Window::Day, &mut start, &mut v, 5, t + 500);
        assert_eq!(current(Window::Day, start, v, t + 999), 10);
        assert_eq!(current(Window::Day, start, v, t + 1000), 0, "midnight UTC");
        add(Window::Day, &mut start, &mut v, 3, t + 1000);
        assert_eq!(v, 3);
    }
}
