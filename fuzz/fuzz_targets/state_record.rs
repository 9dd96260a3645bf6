//! The per-key state record read back from shared data:
//! `state::KeyRecord::decode` and `encode`.
//!
//! Shared data is written by every worker, and by other versions of the
//! plugin during a rollout, so the decoder sees whatever bytes are there. Each
//! input is decoded as it is, and also laid over a valid record (keeping its
//! version byte) so that most inputs reach the fields. Properties checked,
//! beyond "never panics":
//! - a decoded record encodes to exactly `LEN` bytes of the current version
//!   (3) that decode back to the same record, and re-encode to the same bytes;
//!   a version 2 record (34 words) reads with the fleet words at zero;
//! - trailing bytes are ignored, a record cut short or of another version is
//!   refused;
//! - `encode(decode(x))` differs from `x`, over the bytes of `x`'s version,
//!   only in bytes the decoder ignores (no field is dropped or mangled on the
//!   way through);
//! - a decoded record can be read and cooled at any instant, and a cooldown
//!   only ever moves later.
#![no_main]

use apikeyrouter::key_record::KeyRecord;
use libfuzzer_sys::fuzz_target;

/// The length of a record of version 2, the one before fleet mode.
const V2_LEN: usize = 4 + 8 * 34;

fn check(x: &[u8]) {
    let Ok(r) = KeyRecord::decode(x) else {
        return;
    };
    let len = if x[0] == 2 { V2_LEN } else { KeyRecord::LEN };
    let e = r.encode();
    assert_eq!(e.len(), KeyRecord::LEN);
    assert!(x.len() >= len, "decoded a record of {} bytes", x.len());
    assert_eq!(e[0], 3, "encoded under an old version");
    assert!(x[0] == 3 || x[0] == 2, "decoded version {}", x[0]);
    if x[0] == 2 {
        let zero = (r.fleet_day_start_ms, r.fleet_day_tokens, r.fleet_month_start_ms, r.fleet_month_tokens);
        assert_eq!(zero, (0, 0, 0, 0), "a version 2 record has no fleet words");
    }
    assert_eq!(KeyRecord::decode(&e), Ok(r), "decode(encode(r)) != r");
    assert_eq!(KeyRecord::decode(&x[..len]), Ok(r), "trailing bytes mattered");
    assert_eq!(KeyRecord::decode(&e).map(|r| r.encode()), Ok(e.clone()), "encoding is not stable");
    assert!(KeyRecord::decode(&x[..len - 1]).is_err(), "a short record was accepted");
    let mut other = x.to_vec();
    other[0] = 9;
    assert!(KeyRecord::decode(&other).is_err(), "a record of another version was accepted");

    // Every byte of x's version that encode changed must be one decode ignores.
    for i in 1..len {
        if e[i] != x[i] {
            let mut y = x[..len].to_vec();
            y[i] = e[i];
            assert_eq!(KeyRecord::decode(&y), Ok(r), "byte {i} was dropped by encode");
        }
    }

    // What the host does with a record it read.
    for now in [0, r.cooldown_until_ms, r.cooldown_until_ms.wrapping_add(1), u64::MAX] {
        let _ = r.effective(now);
    }
    for until in [0, 1, r.cooldown_until_ms, r.cooldown_until_ms.saturating_add(1), u64::MAX] {
        let mut c = r;
        let moved = c.cool_until(until);
        assert_eq!(moved, until > r.cooldown_until_ms);
        assert_eq!(c.cooldown_until_ms, r.cooldown_until_ms.max(until));
        assert_eq!(KeyRecord::decode(&c.encode()), Ok(c));
    }
}

fuzz_target!(|data: &[u8]| {
    assert!(KeyRecord::decode(&[]).is_err());
    check(data);

    // Laid over a valid record, keeping the version byte.
    let mut x = KeyRecord::default().encode();
    for (i, b) in data.iter().enumerate() {
        if i + 1 < x.len() {
            x[i + 1] = *b;
        } else {
            x.push(*b);
        }
    }
    check(&x);
});
