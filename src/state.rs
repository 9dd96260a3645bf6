//! Per-key state as a fixed-width, versioned record in shared data.
//!
//! Layout (little-endian), version 1, [`KeyRecord::LEN`] bytes:
//! `version:u8 state:u8 reserved:u16 cooldown_until_ms:u64` then the
//! counters in the order of [`KeyRecord::counters`].

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
    Throttled { until_ms: u64 },
    Disabled,
    Exhausted,
}

impl Effective {
    pub fn as_str(self) -> &'static str {
        match self {
            Effective::Available => "available",
            Effective::Throttled { .. } => "throttled",
            Effective::Disabled => "disabled",
            Effective::Exhausted => "exhausted",
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

/// One key's shared state and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyRecord {
    pub state: KeyState,
    pub cooldown_until_ms: u64,
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
}

const VERSION: u8 = 1;
const N_COUNTERS: usize = 10;

impl KeyRecord {
    pub const LEN: usize = 12 + 8 * N_COUNTERS;

    fn counters(&self) -> [u64; N_COUNTERS] {
        [
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
        ]
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.push(VERSION);
        out.push(self.state as u8);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.cooldown_until_ms.to_le_bytes());
        for c in self.counters() {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<KeyRecord, DecodeError> {
        let version = *b.first().ok_or(DecodeError::TooShort)?;
        if version != VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        if b.len() < Self::LEN {
            return Err(DecodeError::TooShort);
        }
        let state = KeyState::from_u8(b[1]).ok_or(DecodeError::BadState(b[1]))?;
        let u = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let c = |n: usize| u(12 + 8 * n);
        Ok(KeyRecord {
            state,
            cooldown_until_ms: u(4),
            requests: c(0),
            successes: c(1),
            client_errors: c(2),
            server_errors: c(3),
            rate_limited: c(4),
            cooldowns: c(5),
            input_tokens: c(6),
            output_tokens: c(7),
            total_tokens: c(8),
            streams: c(9),
        })
    }

    pub fn effective(&self, now_ms: u64) -> Effective {
        match self.state {
            KeyState::Disabled => Effective::Disabled,
            KeyState::Exhausted => Effective::Exhausted,
            KeyState::Available if self.cooldown_until_ms > now_ms => Effective::Throttled {
                until_ms: self.cooldown_until_ms,
            },
            KeyState::Available => Effective::Available,
        }
    }

    /// Extends the cooldown to `until_ms`; a shorter one never shortens it.
    /// Returns whether the deadline moved.
    pub fn cool_until(&mut self, until_ms: u64) -> bool {
        if until_ms > self.cooldown_until_ms {
            self.cooldown_until_ms = until_ms;
            true
        } else {
            false
        }
    }
}

/// How one upstream attempt ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    /// HTTP status, or 0 when no response arrived (reset, timeout, abort).
    pub status: u32,
    pub usage: Option<crate::usage::Usage>,
    pub stream: bool,
}

impl KeyRecord {
    /// Adds one finished attempt to the counters.
    pub fn record(&mut self, o: &Outcome) {
        self.requests += 1;
        match o.status {
            200..=399 => self.successes += 1,
            429 => self.rate_limited += 1,
            400..=499 => self.client_errors += 1,
            _ => self.server_errors += 1,
        }
        if let Some(u) = o.usage {
            self.input_tokens = self.input_tokens.saturating_add(u.input);
            self.output_tokens = self.output_tokens.saturating_add(u.output);
            self.total_tokens = self.total_tokens.saturating_add(u.total);
        }
        if o.stream {
            self.streams += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Usage;

    #[test]
    fn record_round_trips_through_bytes() {
        let r = KeyRecord {
            state: KeyState::Exhausted,
            cooldown_until_ms: 1_700_000_000_123,
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
        };
        let b = r.encode();
        assert_eq!(b.len(), KeyRecord::LEN);
        assert_eq!(KeyRecord::decode(&b), Ok(r));
    }

    #[test]
    fn damaged_records_are_errors_not_panics() {
        assert_eq!(KeyRecord::decode(&[]), Err(DecodeError::TooShort));
        assert_eq!(KeyRecord::decode(&[1, 0, 0]), Err(DecodeError::TooShort));
        assert_eq!(
            KeyRecord::decode(&[9; KeyRecord::LEN]),
            Err(DecodeError::UnknownVersion(9))
        );
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
        assert_eq!(r.cooldown_until_ms, 9_000);
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
    fn outcomes_land_in_their_status_class() {
        let mut r = KeyRecord::default();
        let u = Some(Usage {
            input: 3,
            output: 4,
            total: 7,
        });
        r.record(&Outcome {
            status: 200,
            usage: u,
            stream: true,
        });
        r.record(&Outcome {
            status: 429,
            usage: None,
            stream: false,
        });
        r.record(&Outcome {
            status: 404,
            usage: None,
            stream: false,
        });
        r.record(&Outcome {
            status: 503,
            usage: None,
            stream: false,
        });
        r.record(&Outcome {
            status: 0,
            usage: None,
            stream: false,
        });
        assert_eq!(
            (
                r.requests,
                r.successes,
                r.rate_limited,
                r.client_errors,
                r.server_errors
            ),
            (5, 1, 1, 1, 2)
        );
        assert_eq!(
            (r.input_tokens, r.output_tokens, r.total_tokens, r.streams),
            (3, 4, 7, 1)
        );
    }
}
