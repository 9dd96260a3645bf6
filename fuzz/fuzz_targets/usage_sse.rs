//! Usage from an SSE stream fed in chunks: `usage::SseUsage`.
//!
//! The input is the stream. Properties checked, beyond "never panics":
//! - chunk boundaries do not matter: the stream fed whole, split at one or
//!   two points, in fixed-size chunks, or one byte at a time, gives the same
//!   usage and `[DONE]` flag, both before and after `finish`;
//! - the result is the one a plain line-by-line reading finds (split at CR or
//!   LF, `data:` lines, the last usage wins), when no `\u` escape could hide a
//!   `"usage"` key from the pre-filter.
#![no_main]

use apikeyrouter::usage::{from_json_body, SseUsage, Usage};
use libfuzzer_sys::fuzz_target;

type Seen = (Option<Usage>, bool);

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Feeds `chunks` in order; returns what was seen before and after `finish`.
fn run<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Seen, Seen) {
    let mut p = SseUsage::new();
    for c in chunks {
        p.feed(c);
    }
    let before = (p.usage, p.saw_done);
    p.finish();
    (before, (p.usage, p.saw_done))
}

/// A plain reading: every complete line, then (on finish) the unterminated
/// tail.
fn reference(stream: &[u8]) -> (Seen, Seen) {
    let mut seen: Seen = (None, false);
    let line = |l: &[u8], seen: &mut Seen| {
        let Some(rest) = l.strip_prefix(b"data:") else {
            return;
        };
        let payload = rest.strip_prefix(b" ").unwrap_or(rest);
        if payload == b"[DONE]" {
            seen.1 = true;
        } else if let Some(u) = from_json_body(payload) {
            seen.0 = Some(u);
        }
    };
    let mut parts: Vec<&[u8]> = stream.split(|&b| b == b'\n' || b == b'\r').collect();
    let tail = parts.pop().unwrap_or_default();
    for l in parts {
        line(l, &mut seen);
    }
    let before = seen;
    line(tail, &mut seen);
    (before, seen)
}

fuzz_target!(|s: &[u8]| {
    let whole = run([s]);

    let h = fnv(s);
    let n = s.len();
    let a = (h as usize) % (n + 1);
    let b = a + ((h >> 32) as usize) % (n - a + 1);
    assert_eq!(run([&s[..a], &s[a..]]), whole, "split at {a} changed the result");
    assert_eq!(run([&s[..a], &s[a..b], &s[b..]]), whole, "split at {a},{b} changed the result");
    let size = 1 + ((h >> 16) as usize) % 17;
    assert_eq!(run(s.chunks(size)), whole, "{size}-byte chunks changed the result");
    assert_eq!(run(s.chunks(1)), whole, "one-byte chunks changed the result");
    assert_eq!(run([&s[..0], s, &s[..0]]), whole, "empty chunks changed the result");

    if !s.windows(2).any(|w| w == b"\\u") {
        assert_eq!(whole, reference(s), "differs from a plain line-by-line reading");
    }
});
