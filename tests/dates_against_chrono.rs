//! The date parsers against `chrono` as a reference, over generated inputs:
//! `window::parse_rfc3339` (RFC 3339 instants) and `ratelimit::parse_http_date`
//! (HTTP-dates in the three RFC 9110 forms). The inputs come from a fixed
//! pseudo-random sequence: well-formed strings whose fields range past their
//! limits (day 0-32 in every month of leap and common years, hour 24,
//! minute 60, wrong weekdays, offsets to 24:60), so that invalid dates are
//! tried as often as valid ones.
//!
//! Left out on purpose, where the parsers differ from chrono by design:
//! - leap seconds (`:60`): chrono rolls them into the next minute, `time`
//!   keeps them in the last second of the month, `httpdate` refuses them;
//! - RFC 850's year `69`: `httpdate` reads 00-69 as 20xx, chrono 00-68.

use apikeyrouter::ratelimit::parse_http_date;
use apikeyrouter::window::parse_rfc3339;
use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime};

const CASES: usize = 100_000;
const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const WDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// SplitMix64: a fixed sequence, so that a failure is reproducible.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.next() as usize % items.len()]
    }

    /// Mostly a year near now, sometimes one at an edge (epoch, leap rules,
    /// the four-digit limit).
    fn year(&mut self) -> u64 {
        if self.next().is_multiple_of(4) {
            *self.pick(&[1969, 1970, 1900, 2000, 2024, 2027, 2028, 2100, 2400, 9999])
        } else {
            self.range(1960, 2200)
        }
    }

    /// Mostly near the end of a month, where the calendar matters.
    fn day(&mut self) -> u64 {
        if self.next().is_multiple_of(2) {
            self.range(27, 32)
        } else {
            self.range(0, 32)
        }
    }
}

fn unix_ms(ms: i64) -> Option<u64> {
    u64::try_from(ms).ok()
}

#[test]
fn rfc3339_agrees_with_chrono_on_generated_instants() {
    let mut g = Gen(3339);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..CASES {
        let (y, mo, d) = (g.year(), g.range(0, 13), g.day());
        let (h, mi, s) = (g.range(0, 24), g.range(0, 60), g.range(0, 59));
        let sep = g.pick(&['T', 't', ' ']);
        let frac = match g.range(0, 3) {
            0 => String::new(),
            n => format!(
                ".{}",
                (0..g.range(0, 12) + n - 1).map(|_| char::from(b'0' + (g.next() % 10) as u8)).collect::<String>()
            ),
        };
        let offset = match g.range(0, 3) {
            0 => "Z".to_string(),
            1 => "z".to_string(),
            _ => format!("{}{:02}:{:02}", g.pick(&['+', '-']), g.range(0, 24), g.range(0, 60)),
        };
        let text = format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{frac}{offset}");
        let want = DateTime::parse_from_rfc3339(&text).ok().and_then(|t| unix_ms(t.timestamp_millis()));
        assert_eq!(parse_rfc3339(&text), want, "{text}");
        if want.is_some() {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    assert!(accepted > CASES / 10 && refused > CASES / 10, "{accepted} accepted, {refused} refused");
}

#[test]
fn rfc3339_never_accepts_a_day_past_the_month_end() {
    for y in 1970..=2404 {
        for m in 1..=12u32 {
            let last = (28..=31).rev().find(|&d| NaiveDate::from_ymd_opt(y, m, d).is_some()).unwrap_or(28);
            let at = |d: u32| parse_rfc3339(&format!("{y:04}-{m:02}-{d:02}T00:00:00Z"));
            let want = NaiveDate::from_ymd_opt(y, m, last).and_then(|d| d.and_hms_opt(0, 0, 0));
            assert_eq!(at(last), want.and_then(|t| unix_ms(t.and_utc().timestamp_millis())), "{y}-{m}-{last}");
            for d in last + 1..=31 {
                assert_eq!(at(d), None, "{y}-{m}-{d}");
            }
        }
    }
}

#[test]
fn http_dates_agree_with_chrono_in_all_three_forms() {
    let mut g = Gen(9110);
    let mut accepted = [0; 3];
    for _ in 0..CASES {
        let form = g.range(0, 2) as usize;
        let (mut y, mo, d) = (g.year(), g.range(1, 12), g.day());
        if form == 1 {
            // RFC 850 names the year in two digits: the year it is read as.
            let yy = if y % 100 == 69 { 68 } else { y % 100 };
            y = if yy < 69 { 2000 + yy } else { 1900 + yy };
        }
        let (h, mi, s) = (g.range(0, 24), g.range(0, 60), g.range(0, 59));
        // The right weekday three times in four, where the date exists.
        let real = NaiveDate::from_ymd_opt(y as i32, mo as u32, d as u32).map(|t| t.weekday().num_days_from_monday());
        let wd = match real {
            Some(w) if !g.next().is_multiple_of(4) => w as usize,
            _ => g.range(0, 6) as usize,
        };
        let month = MONTHS[mo as usize - 1];
        let (text, format) = match form {
            0 => {
                (format!("{}, {d:02} {month} {y:04} {h:02}:{mi:02}:{s:02} GMT", WDAYS[wd]), "%a, %d %b %Y %H:%M:%S GMT")
            }
            1 => {
                let text = format!("{}, {d:02}-{month}-{:02} {h:02}:{mi:02}:{s:02} GMT", WEEKDAYS[wd], y % 100);
                (text, "%A, %d-%b-%y %H:%M:%S GMT")
            }
            _ => (format!("{} {month} {d:>2} {h:02}:{mi:02}:{s:02} {y:04}", WDAYS[wd]), "%a %b %e %H:%M:%S %Y"),
        };
        let want =
            NaiveDateTime::parse_from_str(&text, format).ok().and_then(|t| unix_ms(t.and_utc().timestamp_millis()));
        assert_eq!(parse_http_date(&text).ok(), want, "{text}");
        if want.is_some() {
            accepted[form] += 1;
        }
    }
    assert!(accepted.iter().all(|&n| n > CASES / 10), "accepted per form: {accepted:?}");
}
