//! Reading a provider's rate-limit signals: `retry-after` (seconds or
//! HTTP-date), `retry-after-ms`, and OpenAI's `x-ratelimit-reset-*` durations
//! (`6m0s`, `1s`, `20ms`). Everything here is pure; time is passed in as Unix
//! milliseconds.

/// Why a header value could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    BadNumber,
    BadUnit,
    BadDate,
    TooLarge,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ParseError::Empty => "empty value",
            ParseError::BadNumber => "not a number",
            ParseError::BadUnit => "unknown duration unit",
            ParseError::BadDate => "not an HTTP-date",
            ParseError::TooLarge => "value out of range",
        };
        f.write_str(s)
    }
}

/// Ten years: anything longer is nonsense and is refused.
const MAX_MS: u64 = 10 * 365 * 86_400_000;

/// Parses a non-negative decimal number of `unit_ms` units into milliseconds,
/// rounding fractions up so that a cooldown is never shorter than asked.
fn decimal_ms(s: &str, unit_ns: u64) -> Result<u64, ParseError> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(ParseError::BadNumber);
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadNumber);
    }
    if int.len() > 15 {
        return Err(ParseError::TooLarge);
    }
    let int_v: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| ParseError::BadNumber)? };
    // Nanoseconds from the fraction, using at most 9 digits.
    let mut frac_ns: u128 = 0;
    let mut scale: u128 = unit_ns as u128;
    for b in frac.bytes().take(9) {
        scale /= 10;
        frac_ns += (b - b'0') as u128 * scale;
    }
    let total_ns = int_v as u128 * unit_ns as u128 + frac_ns;
    let ms = total_ns.div_ceil(1_000_000);
    if ms > MAX_MS as u128 {
        return Err(ParseError::TooLarge);
    }
    Ok(ms as u64)
}

/// `retry-after-ms: 1500` (also Azure's `x-ms-retry-after-ms`).
pub fn parse_retry_after_ms(v: &str) -> Result<u64, ParseError> {
    let v = v.trim();
    if v.is_empty() {
        return Err(ParseError::Empty);
    }
    decimal_ms(v, 1_000_000)
}

/// `retry-after: 30` or `retry-after: Wed, 21 Oct 2015 07:28:00 GMT`, as a
/// wait in milliseconds from `now_ms` (a date in the past gives 0).
pub fn parse_retry_after(v: &str, now_ms: u64) -> Result<u64, ParseError> {
    let v = v.trim();
    if v.is_empty() {
        return Err(ParseError::Empty);
    }
    if v.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
        return decimal_ms(v, 1_000_000_000);
    }
    let at = parse_http_date(v)?;
    Ok(at.saturating_sub(now_ms))
}

/// A Go-style duration as OpenAI sends in `x-ratelimit-reset-*`: `6m0s`,
/// `1s`, `20ms`, `1h2m3.5s`, `0.5s`. A bare number is taken as seconds.
pub fn parse_duration(v: &str) -> Result<u64, ParseError> {
    let v = v.trim();
    if v.is_empty() {
        return Err(ParseError::Empty);
    }
    if v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return decimal_ms(v, 1_000_000_000);
    }
    let bytes = v.as_bytes();
    let mut i = 0;
    let mut total: u64 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        if start == i {
            return Err(ParseError::BadNumber);
        }
        let num = &v[start..i];
        let ustart = i;
        while i < bytes.len() && !(bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let unit_ns: u64 = match &v[ustart..i] {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ns" => 1,
            _ => return Err(ParseError::BadUnit),
        };
        total = total.saturating_add(decimal_ms(num, unit_ns)?);
    }
    if total > MAX_MS {
        return Err(ParseError::TooLarge);
    }
    Ok(total)
}

/// An HTTP-date in any of the three forms RFC 9110 (section 5.6.7) has
/// recipients accept, to Unix milliseconds: IMF-fixdate (`Sun, 06 Nov 1994
/// 08:49:37 GMT`), RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime
/// (`Sun Nov  6 08:49:37 1994`). The weekday must match the date.
pub fn parse_http_date(v: &str) -> Result<u64, ParseError> {
    let at = httpdate::parse_http_date(v).map_err(|_| ParseError::BadDate)?;
    let secs = at.duration_since(std::time::UNIX_EPOCH).map_err(|_| ParseError::BadDate)?.as_secs();
    Ok(secs * 1000)
}

/// The rate-limit headers of one response, as raw strings.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Signals<'a> {
    pub retry_after: Option<&'a str>,
    pub retry_after_ms: Option<&'a str>,
    pub reset_requests: Option<&'a str>,
    pub reset_tokens: Option<&'a str>,
    pub remaining_requests: Option<&'a str>,
    pub remaining_tokens: Option<&'a str>,
    pub limit_requests: Option<&'a str>,
    pub limit_tokens: Option<&'a str>,
    /// Anthropic's resets: RFC 3339 instants rather than durations.
    pub reset_requests_at: Option<&'a str>,
    pub reset_tokens_at: Option<&'a str>,
}

impl<'a> Signals<'a> {
    /// Fills the fields from `(name, value)` pairs; names must be lower-case.
    pub fn from_headers(headers: &'a [(String, String)]) -> Signals<'a> {
        let mut s = Signals::default();
        for (name, value) in headers {
            let v = Some(value.as_str());
            match name.as_str() {
                "retry-after" => s.retry_after = v,
                "retry-after-ms" | "x-ms-retry-after-ms" => s.retry_after_ms = v,
                "x-ratelimit-reset-requests" => s.reset_requests = v,
                "x-ratelimit-reset-tokens" => s.reset_tokens = v,
                "x-ratelimit-remaining-requests" => s.remaining_requests = v,
                "x-ratelimit-remaining-tokens" => s.remaining_tokens = v,
                "x-ratelimit-limit-requests" => s.limit_requests = v,
                "x-ratelimit-limit-tokens" => s.limit_tokens = v,
                "anthropic-ratelimit-requests-remaining" => s.remaining_requests = v,
                "anthropic-ratelimit-requests-limit" => s.limit_requests = v,
                "anthropic-ratelimit-requests-reset" => s.reset_requests_at = v,
                "anthropic-ratelimit-tokens-remaining" => s.remaining_tokens = v,
                "anthropic-ratelimit-tokens-limit" => s.limit_tokens = v,
                "anthropic-ratelimit-tokens-reset" => s.reset_tokens_at = v,
                // The per-direction token limits stand in when the combined
                // one is absent.
                "anthropic-ratelimit-input-tokens-remaining" | "anthropic-ratelimit-output-tokens-remaining" => {
                    s.remaining_tokens = s.remaining_tokens.or(v)
                }
                "anthropic-ratelimit-input-tokens-limit" | "anthropic-ratelimit-output-tokens-limit" => {
                    s.limit_tokens = s.limit_tokens.or(v)
                }
                "anthropic-ratelimit-input-tokens-reset" | "anthropic-ratelimit-output-tokens-reset" => {
                    s.reset_tokens_at = s.reset_tokens_at.or(v)
                }
                _ => {}
            }
        }
        s
    }
}

/// How long a key must rest after a 429, in milliseconds.
///
/// Precedence: `retry-after-ms`, then `retry-after`, then the reset of the
/// exhausted dimension (`x-ratelimit-remaining-* == 0`), or the longer reset
/// when neither says which; `default_ms` when nothing is readable. The result
/// is clamped to `[1, max_ms]`.
pub fn cooldown_ms(s: &Signals<'_>, now_ms: u64, default_ms: u64, max_ms: u64) -> u64 {
    let explicit = s
        .retry_after_ms
        .and_then(|v| parse_retry_after_ms(v).ok())
        .or_else(|| s.retry_after.and_then(|v| parse_retry_after(v, now_ms).ok()));
    let wait = explicit.or_else(|| {
        let at = |v: Option<&str>| v.and_then(crate::window::parse_rfc3339).map(|t| t.saturating_sub(now_ms));
        let req = s.reset_requests.and_then(|v| parse_duration(v).ok()).or_else(|| at(s.reset_requests_at));
        let tok = s.reset_tokens.and_then(|v| parse_duration(v).ok()).or_else(|| at(s.reset_tokens_at));
        let zero = |r: Option<&str>| r.is_some_and(|v| v.trim() == "0");
        let req_out = zero(s.remaining_requests);
        let tok_out = zero(s.remaining_tokens);
        match (req_out, tok_out) {
            (true, false) if req.is_some() => req,
            (false, true) if tok.is_some() => tok,
            _ => match (req, tok) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
        }
    });
    wait.unwrap_or(default_ms).clamp(1, max_ms.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_fractions() {
        assert_eq!(parse_retry_after("30", 0), Ok(30_000));
        assert_eq!(parse_retry_after(" 0 ", 0), Ok(0));
        assert_eq!(parse_retry_after("1.5", 0), Ok(1500));
        assert_eq!(parse_retry_after("0.0001", 0), Ok(1), "fractions round up");
    }

    #[test]
    fn retry_after_accepts_http_dates_relative_to_now() {
        let at = parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(at, Ok(1_445_412_480_000));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1_445_412_470_000), Ok(10_000));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1_445_412_490_000),
            Ok(0),
            "a date in the past means no wait"
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Ok(0));
        assert_eq!(parse_http_date("Tue, 29 Feb 2028 12:00:00 GMT"), Ok(1_835_438_400_000));
    }

    #[test]
    fn http_dates_are_read_in_all_three_rfc_9110_forms() {
        let want = Ok(784_111_777_000);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), want, "IMF-fixdate");
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), want, "RFC 850");
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), want, "asctime");
        assert_eq!(parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", 784_111_767_000), Ok(10_000));
        assert_eq!(parse_retry_after("Sun Nov  6 08:49:37 1994", 784_111_767_000), Ok(10_000));
    }

    #[test]
    fn http_dates_past_the_end_of_the_month_are_refused() {
        assert_eq!(parse_http_date("Tue, 29 Feb 2028 00:00:00 GMT"), Ok(1_835_395_200_000), "a leap day");
        for bad in [
            "Mon, 29 Feb 2027 00:00:00 GMT",
            "Wed, 31 Feb 2027 00:00:00 GMT",
            "Fri, 31 Apr 2026 00:00:00 GMT",
            "Thu, 29 Feb 2100 00:00:00 GMT",
            "Sunday, 31-Jun-26 00:00:00 GMT",
            "Sun Feb 30 00:00:00 2025",
        ] {
            assert_eq!(parse_http_date(bad), Err(ParseError::BadDate), "{bad}");
        }
    }

    #[test]
    fn malformed_retry_after_is_an_error_not_a_panic() {
        for bad in [
            "",
            "soon",
            "-5",
            "1e3",
            "Wed, 21 Foo 2015 07:28:00 GMT",
            "Wed, 21 Oct 2015 25:00:00 GMT",
            "Wed, 21 Oct 2015 07:28 GMT",
            "99999999999999999999",
            "1..2",
            ".",
        ] {
            assert!(parse_retry_after(bad, 0).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn retry_after_ms_is_milliseconds() {
        assert_eq!(parse_retry_after_ms("1500"), Ok(1500));
        assert_eq!(parse_retry_after_ms("20.2"), Ok(21));
        assert!(parse_retry_after_ms("x").is_err());
        assert!(parse_retry_after_ms("").is_err());
    }

    #[test]
    fn reset_durations_in_go_format() {
        assert_eq!(parse_duration("6m0s"), Ok(360_000));
        assert_eq!(parse_duration("1s"), Ok(1000));
        assert_eq!(parse_duration("20ms"), Ok(20));
        assert_eq!(parse_duration("1h2m3.5s"), Ok(3_723_500));
        assert_eq!(parse_duration("0.5s"), Ok(500));
        assert_eq!(parse_duration("17.28s"), Ok(17_280));
        assert_eq!(parse_duration("250us"), Ok(1), "sub-millisecond rounds up");
        assert_eq!(parse_duration("2"), Ok(2000), "a bare number is seconds");
        for bad in ["", "s", "5x", "m5", "1.2.3s", "5 s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn sig<'a>() -> Signals<'a> {
        Signals::default()
    }

    #[test]
    fn cooldown_prefers_retry_after_ms_then_retry_after() {
        let s = Signals { retry_after_ms: Some("250"), retry_after: Some("9"), ..sig() };
        assert_eq!(cooldown_ms(&s, 0, 60_000, 3_600_000), 250);
        let s = Signals { retry_after: Some("9"), reset_requests: Some("1m"), ..sig() };
        assert_eq!(cooldown_ms(&s, 0, 60_000, 3_600_000), 9000);
    }

    #[test]
    fn cooldown_uses_the_reset_of_the_exhausted_dimension() {
        let s = Signals {
            reset_requests: Some("1s"),
            reset_tokens: Some("6m0s"),
            remaining_requests: Some("0"),
            remaining_tokens: Some("1000"),
            ..sig()
        };
        assert_eq!(cooldown_ms(&s, 0, 60_000, 3_600_000), 1000);
        let s = Signals { remaining_requests: Some("5"), remaining_tokens: Some("0"), ..s };
        assert_eq!(cooldown_ms(&s, 0, 60_000, 3_600_000), 360_000);
        let s = Signals { remaining_requests: None, remaining_tokens: None, ..s };
        assert_eq!(cooldown_ms(&s, 0, 60_000, 3_600_000), 360_000, "unknown dimension: the longer");
    }

    #[test]
    fn cooldown_falls_back_to_default_and_is_clamped() {
        assert_eq!(cooldown_ms(&sig(), 0, 60_000, 3_600_000), 60_000);
        let s = Signals { retry_after: Some("garbage"), ..sig() };
        assert_eq!(cooldown_ms(&s, 0, 5000, 3_600_000), 5000);
        let s = Signals { retry_after: Some("99999"), ..sig() };
        assert_eq!(cooldown_ms(&s, 0, 5000, 3_600_000), 3_600_000);
        let s = Signals { retry_after: Some("0"), ..sig() };
        assert_eq!(cooldown_ms(&s, 0, 5000, 3_600_000), 1);
    }

    #[test]
    fn anthropic_rate_limit_headers_are_read_with_rfc3339_resets() {
        let h: Vec<(String, String)> = [
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-reset", "1970-01-01T00:00:30Z"),
            ("anthropic-ratelimit-input-tokens-remaining", "900"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let s = Signals::from_headers(&h);
        assert_eq!((s.remaining_requests, s.limit_requests, s.remaining_tokens), (Some("0"), Some("50"), Some("900")));
        assert_eq!(cooldown_ms(&s, 10_000, 60_000, 3_600_000), 20_000, "until the reset instant");
    }

    #[test]
    fn signals_are_read_from_lower_case_header_pairs() {
        let h = vec![
            ("retry-after".to_string(), "3".to_string()),
            ("x-ratelimit-reset-tokens".to_string(), "1s".to_string()),
            ("content-type".to_string(), "application/json".to_string()),
        ];
        let s = Signals::from_headers(&h);
        assert_eq!(s.retry_after, Some("3"));
        assert_eq!(s.reset_tokens, Some("1s"));
        assert_eq!(s.retry_after_ms, None);
    }
}
