//! Per-key state as a fixed-width, versioned record in shared data.
//!
//! Layout (little-endian), version 4, [`KeyRecord::LEN`] bytes:
//! `version:u8 state:u8 reason:u8 capacity:u8`, then [`N_WORDS`] `u64`
//! words in the order of [`KeyRecord::words`]; words 38 and 39 hold
//! `spent`, a `Decimal` in its 16-byte serialization, and the last three the
//! burn rate's window. Version 3 records (the first 38 words) and version 2
//! records (the first 34) are read with the later words at zero; records of
//! another version are refused by [`KeyRecord::decode`]; callers treat them
//! as fresh.

use crate::codec::{Reader, Writer};
use crate::ratelimit::{parse_duration, Signals};
use crate::usage::Usage;
use crate::window::{self, Window};
use rust_decimal::Decimal;
use std::fmt;

/// The administrative state of a key. "Throttled" is not stored: it is
/// `Available` with a cooldown that has not yet expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyState {
    #[default]
    Available = 0,
    Disabled = 1,
    Exhausted = 2,
}

/// Why a key is disabled or exhausted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reason {
    #[default]
    None = 0,
    Unauthorized = 1,
    Forbidden = 2,
    PaymentRequired = 3,
    InsufficientQuota = 4,
    Admin = 5,
    Status = 6,
    /// Re-enabled: a half-open probe of the disabled key succeeded.
    Probe = 7,
}

impl Reason {
    pub fn from_u8(b: u8) -> Reason {
        match b {
            1 => Reason::Unauthorized,
            2 => Reason::Forbidden,
            3 => Reason::PaymentRequired,
            4 => Reason::InsufficientQuota,
            5 => Reason::Admin,
            6 => Reason::Status,
            7 => Reason::Probe,
            _ => Reason::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::None => "",
            Reason::Unauthorized => "provider answered 401",
            Reason::Forbidden => "provider answered 403",
            Reason::PaymentRequired => "provider answered 402",
            Reason::InsufficientQuota => "provider reported insufficient_quota",
            Reason::Admin => "set through the admin API",
            Reason::Status => "provider status action",
            Reason::Probe => "a probe request succeeded",
        }
    }
}

/// How much room a key has left, from the tighter of its configured quotas
/// and what the provider reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Capacity {
    #[default]
    Abundant = 0,
    Constrained = 1,
    Critical = 2,
    Exhausted = 3,
}

impl Capacity {
    fn from_u8(b: u8) -> Capacity {
        match b {
            1 => Capacity::Constrained,
            2 => Capacity::Critical,
            3 => Capacity::Exhausted,
            _ => Capacity::Abundant,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Capacity::Abundant => "abundant",
            Capacity::Constrained => "constrained",
            Capacity::Critical => "critical",
            Capacity::Exhausted => "exhausted",
        }
    }
}

impl KeyState {
    fn from_u8(b: u8) -> Option<KeyState> {
        match b {
            0 => Some(KeyState::Available),
            1 => Some(KeyState::Disabled),
            2 => Some(KeyState::Exhausted),
            _ => None,
        }
    }
}

/// What a key looks like at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effective {
    Available,
    Throttled {
        until_ms: u64,
    },
    Disabled,
    /// `until_ms == 0`: until re-enabled.
    Exhausted {
        until_ms: u64,
    },
}

impl Effective {
    pub fn as_str(self) -> &'static str {
        match self {
            Effective::Available => "available",
            Effective::Throttled { .. } => "throttled",
            Effective::Disabled => "disabled",
            Effective::Exhausted { .. } => "exhausted",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    TooShort,
    UnknownVersion(u8),
    BadState(u8),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooShort => f.write_str("record too short"),
            DecodeError::UnknownVersion(v) => write!(f, "unknown record version {v}"),
            DecodeError::BadState(s) => write!(f, "unknown key state {s}"),
        }
    }
}

/// "Not reported" in the provider-limit fields.
pub const UNKNOWN: u64 = u64::MAX;

/// What the provider last said about a key's rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderLimits {
    pub remaining_requests: u64,
    pub limit_requests: u64,
    pub reset_requests_ms: u64,
    pub remaining_tokens: u64,
    pub limit_tokens: u64,
    pub reset_tokens_ms: u64,
}

impl Default for ProviderLimits {
    fn default() -> ProviderLimits {
        ProviderLimits {
            remaining_requests: UNKNOWN,
            limit_requests: UNKNOWN,
            reset_requests_ms: 0,
            remaining_tokens: UNKNOWN,
            limit_tokens: UNKNOWN,
            reset_tokens_ms: 0,
        }
    }
}

/// One key's shared state and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyRecord {
    pub state: KeyState,
    pub reason: Reason,
    /// Capacity as last computed at a write; a change bumps the generation.
    pub capacity: Capacity,
    pub cooldown_until_ms: u64,
    /// For `Exhausted`: when it ends by itself (0: until re-enabled).
    pub exhausted_until_ms: u64,
    /// Upstream attempts completed with this key.
    pub requests: u64,
    pub successes: u64,
    /// 4xx other than 429.
    pub client_errors: u64,
    /// 5xx, resets and responses that never arrived.
    pub server_errors: u64,
    pub rate_limited: u64,
    /// Times the key was put into cooldown.
    pub cooldowns: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    /// Streaming responses served.
    pub streams: u64,
    /// Reliability: two aligned buckets of successes and failures.
    pub rel_start_ms: u64,
    pub rel_ok: u64,
    pub rel_fail: u64,
    pub rel_prev_ok: u64,
    pub rel_prev_fail: u64,
    /// Time to first byte, exponential moving average, microseconds.
    pub latency_us: u64,
    pub latency_samples: u64,
    pub provider: ProviderLimits,
    /// Configured quotas: UTC minute, day and month windows.
    pub minute_start_ms: u64,
    pub minute_requests: u64,
    pub minute_tokens: u64,
    pub day_start_ms: u64,
    pub day_tokens: u64,
    pub month_start_ms: u64,
    pub month_tokens: u64,
    /// Output tokens spent on reasoning (part of `output_tokens`).
    pub reasoning_tokens: u64,
    /// When `state` last changed (a disable, an exhaustion, an admin
    /// change); fleet mode lets the newest change win across instances.
    pub state_at_ms: u64,
    /// Fleet mode: tokens the other instances spent with this key in the
    /// UTC day and month starting at these times, as of the last sync.
    pub fleet_day_start_ms: u64,
    pub fleet_day_tokens: u64,
    pub fleet_month_start_ms: u64,
    pub fleet_month_tokens: u64,
    /// What this key's answers cost in this process, exactly (the price
    /// table or the key's own price; unpriced answers add nothing).
    pub spent: Decimal,
    /// The minute before `minute_start_ms` (0 unless it was the one just
    /// before), and when counting began: the burn rate's window
    /// ([`crate::forecast`]).
    pub prev_minute_requests: u64,
    pub prev_minute_tokens: u64,
    pub burn_since_ms: u64,
}

const VERSION: u8 = 4;
/// Version 2 records: the words before `fleet_day_start_ms`.
const V2_WORDS: usize = 34;
/// Version 3 records: the words before `spent`.
const V3_WORDS: usize = 38;
pub const N_WORDS: usize = 43;

impl KeyRecord {
    pub const LEN: usize = 4 + 8 * N_WORDS;

    fn words(&self) -> [u64; N_WORDS] {
        let p = &self.provider;
        let (spent_lo, spent_hi) = decimal_words(self.spent);
        [
            self.cooldown_until_ms,
            self.exhausted_until_ms,
            self.requests,
            self.successes,
            self.client_errors,
            self.server_errors,
            self.rate_limited,
            self.cooldowns,
            self.input_tokens,
            self.output_tokens,
            self.total_tokens,
            self.streams,
            self.rel_start_ms,
            self.rel_ok,
            self.rel_fail,
            self.rel_prev_ok,
            self.rel_prev_fail,
            self.latency_us,
            self.latency_samples,
            p.remaining_requests,
            p.limit_requests,
            p.reset_requests_ms,
            p.remaining_tokens,
            p.limit_tokens,
            p.reset_tokens_ms,
            self.minute_start_ms,
            self.minute_requests,
            self.minute_tokens,
            self.day_start_ms,
            self.day_tokens,
            self.month_start_ms,
            self.month_tokens,
            self.reasoning_tokens,
            self.state_at_ms,
            self.fleet_day_start_ms,
            self.fleet_day_tokens,
            self.fleet_month_start_ms,
            self.fleet_month_tokens,
            spent_lo,
            spent_hi,
            self.prev_minute_requests,
            self.prev_minute_tokens,
            self.burn_since_ms,
        ]
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Writer::with_capacity(Self::LEN);
        out.u8(VERSION).u8(self.state as u8).u8(self.reason as u8).u8(self.capacity as u8);
        for w in self.words() {
            out.u64(w);
        }
        out.finish()
    }

    pub fn decode(b: &[u8]) -> Result<KeyRecord, DecodeError> {
        let mut r = Reader::new(b);
        let version = r.u8().ok_or(DecodeError::TooShort)?;
        let n_words = match version {
            VERSION => N_WORDS,
            3 => V3_WORDS,
            2 => V2_WORDS,
            _ => return Err(DecodeError::UnknownVersion(version)),
        };
        let state = r.u8().ok_or(DecodeError::TooShort)?;
        let reason = r.u8().ok_or(DecodeError::TooShort)?;
        let capacity = r.u8().ok_or(DecodeError::TooShort)?;
        let mut w = [0u64; N_WORDS];
        for slot in w.iter_mut().take(n_words) {
            *slot = r.u64().ok_or(DecodeError::TooShort)?;
        }
        // A short record is TooShort whatever its state byte says.
        Ok(KeyRecord {
            state: KeyState::from_u8(state).ok_or(DecodeError::BadState(state))?,
            reason: Reason::from_u8(reason),
            capacity: Capacity::from_u8(capacity),
            cooldown_until_ms: w[0],
            exhausted_until_ms: w[1],
            requests: w[2],
            successes: w[3],
            client_errors: w[4],
            server_errors: w[5],
            rate_limited: w[6],
            cooldowns: w[7],
            input_tokens: w[8],
            output_tokens: w[9],
            total_tokens: w[10],
            streams: w[11],
            rel_start_ms: w[12],
            rel_ok: w[13],
            rel_fail: w[14],
            rel_prev_ok: w[15],
            rel_prev_fail: w[16],
            latency_us: w[17],
            latency_samples: w[18],
            provider: ProviderLimits {
                remaining_requests: w[19],
                limit_requests: w[20],
                reset_requests_ms: w[21],
                remaining_tokens: w[22],
                limit_tokens: w[23],
                reset_tokens_ms: w[24],
            },
            minute_start_ms: w[25],
            minute_requests: w[26],
            minute_tokens: w[27],
            day_start_ms: w[28],
            day_tokens: w[29],
            month_start_ms: w[30],
            month_tokens: w[31],
            reasoning_tokens: w[32],
            state_at_ms: w[33],
            fleet_day_start_ms: w[34],
            fleet_day_tokens: w[35],
            fleet_month_start_ms: w[36],
            fleet_month_tokens: w[37],
            spent: words_decimal(w[38], w[39]),
            prev_minute_requests: w[40],
            prev_minute_tokens: w[41],
            burn_since_ms: w[42],
        })
    }

    /// Disabled by a provider's answer (not by an admin), and so worth a
    /// half-open probe once `after_ms` have passed since.
    pub fn probe_due(&self, now_ms: u64, after_ms: u64) -> bool {
        after_ms > 0
            && self.state == KeyState::Disabled
            && !matches!(self.reason, Reason::Admin | Reason::None)
            && now_ms >= self.state_at_ms.saturating_add(after_ms)
    }

    pub fn effective(&self, now_ms: u64) -> Effective {
        match self.state {
            KeyState::Disabled => Effective::Disabled,
            KeyState::Exhausted if self.exhausted_until_ms == 0 || now_ms < self.exhausted_until_ms => {
                Effective::Exhausted { until_ms: self.exhausted_until_ms }
            }
            _ if self.cooldown_until_ms > now_ms => Effective::Throttled { until_ms: self.cooldown_until_ms },
            _ => Effective::Available,
        }
    }

    /// Extends the cooldown to `until_ms`; a shorter one never shortens it.
    /// Returns whether the deadline moved.
    pub fn cool_until(&mut self, until_ms: u64) -> bool {
        if until_ms > self.cooldown_until_ms {
            self.cooldown_until_ms = until_ms;
            self.cooldowns = self.cooldowns.saturating_add(1);
            true
        } else {
            false
        }
    }

    /// Success rate over the recent window (smoothed: a key with no data
    /// scores 1).
    pub fn reliability(&self, now_ms: u64, window_ms: u64) -> f64 {
        let window_ms = window_ms.max(1);
        let bucket = now_ms - now_ms % window_ms;
        let (ok, fail, pok, pfail) = if self.rel_start_ms == bucket {
            (self.rel_ok, self.rel_fail, self.rel_prev_ok, self.rel_prev_fail)
        } else if self.rel_start_ms.checked_add(window_ms) == Some(bucket) {
            (0, 0, self.rel_ok, self.rel_fail)
        } else {
            (0, 0, 0, 0)
        };
        let f = (now_ms - bucket) as f64 / window_ms as f64;
        let prev_weight = 1.0 - f;
        let ok = ok as f64 + pok as f64 * prev_weight;
        let n = ok + fail as f64 + pfail as f64 * prev_weight;
        (ok + 1.0) / (n + 1.0)
    }

    fn count_reliability(&mut self, success: bool, now_ms: u64, window_ms: u64) {
        let window_ms = window_ms.max(1);
        let bucket = now_ms - now_ms % window_ms;
        if self.rel_start_ms != bucket {
            if self.rel_start_ms.checked_add(window_ms) == Some(bucket) {
                self.rel_prev_ok = self.rel_ok;
                self.rel_prev_fail = self.rel_fail;
            } else {
                self.rel_prev_ok = 0;
                self.rel_prev_fail = 0;
            }
            self.rel_ok = 0;
            self.rel_fail = 0;
            self.rel_start_ms = bucket;
        }
        if success {
            self.rel_ok = self.rel_ok.saturating_add(1);
        } else {
            self.rel_fail = self.rel_fail.saturating_add(1);
        }
    }

    /// Takes the provider's `x-ratelimit-*` headers, if any.
    pub fn learn_limits(&mut self, s: &Signals<'_>, now_ms: u64) {
        let num = |v: Option<&str>| v.and_then(|v| v.trim().parse::<u64>().ok());
        let reset = |v: Option<&str>| v.and_then(|v| parse_duration(v).ok()).map(|d| now_ms.saturating_add(d));
        let reset_at = |v: Option<&str>| v.and_then(crate::window::parse_rfc3339);
        let p = &mut self.provider;
        if let Some(r) = num(s.remaining_requests) {
            p.remaining_requests = r;
            p.limit_requests = num(s.limit_requests).unwrap_or(p.limit_requests);
            // No reset given: trust the figure for a minute.
            p.reset_requests_ms =
                reset(s.reset_requests).or_else(|| reset_at(s.reset_requests_at)).unwrap_or(now_ms + 60_000);
        }
        if let Some(r) = num(s.remaining_tokens) {
            p.remaining_tokens = r;
            p.limit_tokens = num(s.limit_tokens).unwrap_or(p.limit_tokens);
            p.reset_tokens_ms =
                reset(s.reset_tokens).or_else(|| reset_at(s.reset_tokens_at)).unwrap_or(now_ms + 60_000);
        }
    }
}

/// A `Decimal`'s 16-byte serialization as two little-endian words.
fn decimal_words(d: Decimal) -> (u64, u64) {
    let b = d.serialize();
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&b[..8]);
    hi.copy_from_slice(&b[8..]);
    (u64::from_le_bytes(lo), u64::from_le_bytes(hi))
}

fn words_decimal(lo: u64, hi: u64) -> Decimal {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&lo.to_le_bytes());
    b[8..].copy_from_slice(&hi.to_le_bytes());
    Decimal::deserialize(b)
}

/// How one upstream attempt ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// HTTP status, or 0 when no response arrived (reset, timeout, abort).
    pub status: u32,
    pub usage: Option<Usage>,
    pub stream: bool,
    /// Time to first byte, when a response arrived.
    pub latency_us: Option<u64>,
    /// What the answer costs, when it is charged and priced.
    pub cost: Option<Decimal>,
}

impl KeyRecord {
    /// Adds one finished attempt to the counters and windows.
    pub fn record(&mut self, o: &Outcome, now_ms: u64, reliability_window_ms: u64) {
        // Counters saturate: a record from shared data may hold anything.
        self.requests = self.requests.saturating_add(1);
        match o.status {
            200..=399 => self.successes = self.successes.saturating_add(1),
            429 => self.rate_limited = self.rate_limited.saturating_add(1),
            400..=499 => self.client_errors = self.client_errors.saturating_add(1),
            _ => self.server_errors = self.server_errors.saturating_add(1),
        }
        // 5xx, resets and timeouts count against reliability; a 4xx is the
        // request's or the quota's doing, not the key's health.
        match o.status {
            200..=399 => self.count_reliability(true, now_ms, reliability_window_ms),
            // Anthropic's 529 "overloaded" is the provider's state, not the key's.
            529 => {}
            0 | 500..=u32::MAX => self.count_reliability(false, now_ms, reliability_window_ms),
            _ => {}
        }
        let tokens = o.usage.map_or(0, |u| u.total);
        if let Some(u) = o.usage {
            self.input_tokens = self.input_tokens.saturating_add(u.input);
            self.output_tokens = self.output_tokens.saturating_add(u.output);
            self.total_tokens = self.total_tokens.saturating_add(u.total);
            self.reasoning_tokens = self.reasoning_tokens.saturating_add(u.reasoning);
        }
        if o.stream {
            self.streams = self.streams.saturating_add(1);
        }
        if let Some(c) = o.cost.filter(|c| *c > Decimal::ZERO) {
            self.spent = self.spent.checked_add(c).unwrap_or(Decimal::MAX);
        }
        if let Some(l) = o.latency_us {
            self.latency_us =
                if self.latency_samples == 0 { l } else { (self.latency_us.saturating_mul(4).saturating_add(l)) / 5 };
            self.latency_samples = self.latency_samples.saturating_add(1);
        }
        // Configured quotas count every attempt the provider answered.
        if o.status != 0 {
            match crate::forecast::step(window::MINUTE_MS, self.minute_start_ms, now_ms) {
                crate::forecast::Step::Same => {}
                crate::forecast::Step::Next => {
                    self.prev_minute_requests = self.minute_requests;
                    self.prev_minute_tokens = self.minute_tokens;
                    self.minute_requests = 0;
                    self.minute_tokens = 0;
                }
                crate::forecast::Step::Gap => {
                    self.prev_minute_requests = 0;
                    self.prev_minute_tokens = 0;
                    self.minute_requests = 0;
                    self.minute_tokens = 0;
                    self.burn_since_ms = now_ms;
                }
            }
            if self.burn_since_ms == 0 {
                self.burn_since_ms = now_ms;
            }
            self.minute_start_ms = Window::Minute.start(now_ms);
            self.minute_requests = self.minute_requests.saturating_add(1);
            self.minute_tokens = self.minute_tokens.saturating_add(tokens);
            window::add(Window::Day, &mut self.day_start_ms, &mut self.day_tokens, tokens, now_ms);
            window::add(Window::Month, &mut self.month_start_ms, &mut self.month_tokens, tokens, now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> KeyRecord {
        KeyRecord {
            state: KeyState::Exhausted,
            reason: Reason::InsufficientQuota,
            capacity: Capacity::Critical,
            cooldown_until_ms: 1_700_000_000_123,
            exhausted_until_ms: 9,
            requests: 1,
            successes: 2,
            client_errors: 3,
            server_errors: 4,
            rate_limited: 5,
            cooldowns: 6,
            input_tokens: 7,
            output_tokens: 8,
            total_tokens: u64::MAX,
            streams: 10,
            rel_start_ms: 11,
            rel_ok: 12,
            rel_fail: 13,
            rel_prev_ok: 14,
            rel_prev_fail: 15,
            latency_us: 16,
            latency_samples: 17,
            provider: ProviderLimits {
                remaining_requests: 18,
                limit_requests: 19,
                reset_requests_ms: 20,
                remaining_tokens: 21,
                limit_tokens: 22,
                reset_tokens_ms: 23,
            },
            minute_start_ms: 24,
            minute_requests: 25,
            minute_tokens: 26,
            day_start_ms: 27,
            day_tokens: 28,
            month_start_ms: 29,
            month_tokens: 30,
            reasoning_tokens: 31,
            state_at_ms: 32,
            fleet_day_start_ms: 33,
            fleet_day_tokens: 34,
            fleet_month_start_ms: 35,
            fleet_month_tokens: 36,
            spent: Decimal::new(12_345, 4),
            prev_minute_requests: 37,
            prev_minute_tokens: 38,
            burn_since_ms: 39,
        }
    }

    /// `full()` as version 4 bytes: what shared data holds across reloads.
    const FULL_V4: &str = concat!(
        "04020402", // version 4, exhausted, insufficient_quota, critical
        "7b68e5cf8b010000090000000000000001000000000000000200000000000000",
        "0300000000000000040000000000000005000000000000000600000000000000",
        "07000000000000000800000000000000ffffffffffffffff0a00000000000000",
        "0b000000000000000c000000000000000d000000000000000e00000000000000",
        "0f00000000000000100000000000000011000000000000001200000000000000",
        "1300000000000000140000000000000015000000000000001600000000000000",
        "1700000000000000180000000000000019000000000000001a00000000000000",
        "1b000000000000001c000000000000001d000000000000001e00000000000000",
        "1f00000000000000200000000000000021000000000000002200000000000000",
        "23000000000000002400000000000000",
        "00000400393000000000000000000000", // spent: 1.2345 (scale 4 in the flags, 12345 in the low word)
        "250000000000000026000000000000002700000000000000",
    );

    #[test]
    fn record_bytes_are_pinned() {
        let b = crate::codec::pinned(&full().encode(), FULL_V4);
        assert_eq!(KeyRecord::decode(&b), Ok(full()));
    }

    #[test]
    fn charged_answers_add_their_exact_cost_and_others_nothing() {
        let mut r = KeyRecord::default();
        let charged = |c: &str| Outcome { status: 200, cost: c.parse().ok(), ..Outcome::default() };
        r.record(&charged("0.000150"), 0, 60_000);
        r.record(&charged("0.1"), 0, 60_000);
        r.record(&Outcome { status: 429, ..Outcome::default() }, 0, 60_000);
        r.record(&charged("-5"), 0, 60_000);
        assert_eq!(r.spent.to_string(), "0.100150");
        let back = KeyRecord::decode(&r.encode()).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(back.spent.to_string(), "0.100150");
    }

    #[test]
    fn version_3_records_read_with_nothing_spent_and_burn_words_at_zero() {
        let mut b = crate::codec::unhex(FULL_V4);
        b[0] = 3;
        b.truncate(4 + 8 * V3_WORDS);
        let old = KeyRecord {
            spent: Decimal::ZERO,
            prev_minute_requests: 0,
            prev_minute_tokens: 0,
            burn_since_ms: 0,
            ..full()
        };
        assert_eq!(KeyRecord::decode(&b), Ok(old));
    }

    #[test]
    fn version_2_records_read_with_fleet_words_at_zero() {
        let r = full();
        let mut b = crate::codec::unhex(FULL_V4);
        b[0] = 2;
        b.truncate(4 + 8 * V2_WORDS);
        // Word 33 was spare (zero) in version 2; it now holds state_at_ms.
        let old = KeyRecord {
            spent: Decimal::ZERO,
            fleet_day_start_ms: 0,
            fleet_day_tokens: 0,
            fleet_month_start_ms: 0,
            fleet_month_tokens: 0,
            prev_minute_requests: 0,
            prev_minute_tokens: 0,
            burn_since_ms: 0,
            ..r
        };
        assert_eq!(KeyRecord::decode(&b), Ok(old));
    }

    #[test]
    fn record_round_trips_through_bytes() {
        let r = full();
        let b = r.encode();
        assert_eq!(b.len(), KeyRecord::LEN);
        assert_eq!(KeyRecord::decode(&b), Ok(r));
        assert_eq!(KeyRecord::decode(&KeyRecord::default().encode()), Ok(KeyRecord::default()));
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        assert_eq!(KeyRecord::decode(&[]), Err(DecodeError::TooShort));
        assert_eq!(KeyRecord::decode(&[3, 0, 0]), Err(DecodeError::TooShort));
        assert_eq!(KeyRecord::decode(&[2, 0, 0]), Err(DecodeError::TooShort));
        assert_eq!(KeyRecord::decode(&[3, 7, 0, 0, 1]), Err(DecodeError::TooShort), "short before bad state");
        assert_eq!(KeyRecord::decode(&[9; KeyRecord::LEN]), Err(DecodeError::UnknownVersion(9)));
        assert_eq!(KeyRecord::decode(&[1; KeyRecord::LEN]), Err(DecodeError::UnknownVersion(1)));
        let mut b = KeyRecord::default().encode();
        b[1] = 7;
        assert_eq!(KeyRecord::decode(&b), Err(DecodeError::BadState(7)));
    }

    #[test]
    fn cooldown_is_extended_but_never_shortened() {
        let mut r = KeyRecord::default();
        assert!(r.cool_until(5_000));
        assert!(!r.cool_until(3_000));
        assert_eq!(r.cooldown_until_ms, 5_000);
        assert!(r.cool_until(9_000));
        assert_eq!((r.cooldown_until_ms, r.cooldowns), (9_000, 2));
    }

    #[test]
    fn cooling_key_is_throttled_until_its_deadline() {
        let mut r = KeyRecord::default();
        r.cool_until(1_000);
        assert_eq!(r.effective(999), Effective::Throttled { until_ms: 1_000 });
        assert_eq!(r.effective(1_000), Effective::Available);
        r.state = KeyState::Disabled;
        assert_eq!(r.effective(0), Effective::Disabled);
    }

    #[test]
    fn exhausted_key_recovers_when_its_window_ends_unless_open_ended() {
        let mut r = KeyRecord { state: KeyState::Exhausted, exhausted_until_ms: 5_000, ..KeyRecord::default() };
        assert_eq!(r.effective(4_999), Effective::Exhausted { until_ms: 5_000 });
        assert_eq!(r.effective(5_000), Effective::Available);
        r.exhausted_until_ms = 0;
        assert_eq!(r.effective(u64::MAX), Effective::Exhausted { until_ms: 0 });
    }

    #[test]
    fn outcomes_land_in_their_status_class() {
        let mut r = KeyRecord::default();
        let u = Some(Usage { input: 3, output: 4, total: 7, ..Usage::default() });
        r.record(&Outcome { status: 200, usage: u, stream: true, latency_us: Some(1000), cost: None }, 0, 60_000);
        r.record(&Outcome { status: 429, ..Outcome::default() }, 0, 60_000);
        r.record(&Outcome { status: 404, ..Outcome::default() }, 0, 60_000);
        r.record(&Outcome { status: 503, ..Outcome::default() }, 0, 60_000);
        r.record(&Outcome { status: 0, ..Outcome::default() }, 0, 60_000);
        assert_eq!((r.requests, r.successes, r.rate_limited, r.client_errors, r.server_errors), (5, 1, 1, 1, 2));
        assert_eq!((r.input_tokens, r.output_tokens, r.total_tokens, r.streams), (3, 4, 7, 1));
        assert_eq!((r.rel_ok, r.rel_fail), (1, 2));
        assert_eq!((r.minute_requests, r.minute_tokens, r.day_tokens, r.month_tokens), (4, 7, 7, 7));
    }

    #[test]
    fn reliability_is_the_smoothed_success_rate_of_the_recent_window() {
        let mut r = KeyRecord::default();
        assert_eq!(r.reliability(0, 60_000), 1.0, "no data: benefit of the doubt");
        for _ in 0..9 {
            r.record(&Outcome { status: 200, ..Outcome::default() }, 1_000, 60_000);
        }
        r.record(&Outcome { status: 500, ..Outcome::default() }, 1_000, 60_000);
        assert!((r.reliability(1_000, 60_000) - 10.0 / 11.0).abs() < 1e-9);
        // Halfway through the next bucket, the old one counts half.
        let half = r.reliability(90_000, 60_000);
        assert!((half - 5.5 / 6.0).abs() < 1e-9, "{half}");
        // Two windows later it is forgotten.
        assert_eq!(r.reliability(200_000, 60_000), 1.0);
    }

    #[test]
    fn a_record_full_of_maximal_values_neither_overflows_nor_panics() {
        let mut b = KeyRecord::default().encode();
        for x in b.iter_mut().skip(4) {
            *x = 0xff;
        }
        let mut r = KeyRecord::decode(&b).unwrap_or_else(|e| panic!("{e}"));
        let _ = r.reliability(1_700_000_000_000, 300_000);
        r.record(&Outcome { status: 200, ..Outcome::default() }, 1_700_000_000_000, 300_000);
        r.record(
            &Outcome { status: 500, latency_us: Some(u64::MAX), ..Outcome::default() },
            1_700_000_000_000,
            300_000,
        );
        assert!(r.cool_until(u64::MAX) || r.cooldown_until_ms == u64::MAX);
    }

    #[test]
    fn latency_is_a_moving_average() {
        let mut r = KeyRecord::default();
        r.record(&Outcome { status: 200, latency_us: Some(10_000), ..Outcome::default() }, 0, 1);
        r.record(&Outcome { status: 200, latency_us: Some(20_000), ..Outcome::default() }, 0, 1);
        assert_eq!(r.latency_us, 12_000);
    }

    #[test]
    fn provider_limits_are_learned_from_headers() {
        let mut r = KeyRecord::default();
        let s = Signals {
            remaining_requests: Some("12"),
            limit_requests: Some("100"),
            reset_requests: Some("2s"),
            remaining_tokens: Some("900"),
            ..Signals::default()
        };
        r.learn_limits(&s, 1_000);
        assert_eq!(r.provider.remaining_requests, 12);
        assert_eq!(r.provider.limit_requests, 100);
        assert_eq!(r.provider.reset_requests_ms, 3_000);
        assert_eq!(r.provider.remaining_tokens, 900);
        assert_eq!(r.provider.limit_tokens, UNKNOWN);
        assert_eq!(r.provider.reset_tokens_ms, 61_000);
    }
}
