//! The proxy-wasm header-map wire format: `header_wire::decode` on whatever bytes
//! the host hands over, and `encode`.
//!
//! Properties checked, beyond "never panics":
//! - a decoded map never claims more pairs than the bytes could hold, and
//!   re-encodes to bytes that decode to the same pairs;
//! - a map whose names and values are UTF-8 re-encodes to the bytes it came
//!   from (terminators aside, which the decoder does not check);
//! - pairs built from the input (arbitrary strings, NULs and empty ones
//!   included) survive `decode(encode(p)) == p`, and any cut of their
//!   encoding short of the last terminator is refused.
#![no_main]

use apikeyrouter::header_wire::{decode, encode};
use libfuzzer_sys::fuzz_target;

fn as_refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, s)| (k.as_str(), s.as_str())).collect()
}

fuzz_target!(|data: &[u8]| {
    // 1. Raw bytes from the host.
    if let Ok(pairs) = decode(data) {
        assert!(data.is_empty() || pairs.len() <= (data.len() - 4) / 8);
        let again = encode(&as_refs(&pairs));
        assert_eq!(decode(&again), Ok(pairs.clone()), "re-encoding changed the pairs");
        if !data.is_empty() && !pairs.iter().any(|(k, v)| k.contains('\u{fffd}') || v.contains('\u{fffd}')) {
            // Lossless: the bytes must be the encoding, except for the NUL
            // terminators, which the decoder does not check.
            let mut terminator = vec![false; again.len()];
            let mut p = 4 + 8 * pairs.len();
            for (k, v) in &pairs {
                p += k.len();
                terminator[p] = true;
                p += 1 + v.len();
                terminator[p] = true;
                p += 1;
            }
            for (i, (a, b)) in data.iter().zip(&again).enumerate() {
                assert!(terminator[i] || a == b, "byte {i} of a well-formed map re-encoded differently");
            }
            assert!(data.len() + 1 >= again.len(), "decoded more than the bytes hold");
        }
    }

    // 2. Pairs built from the input: the text split at '\n' into names and
    //    values, alternately.
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let mut built = Vec::new();
    while let Some(k) = parts.next() {
        built.push((k.to_string(), parts.next().unwrap_or("").to_string()));
    }
    let bytes = encode(&as_refs(&built));
    assert_eq!(decode(&bytes), Ok(built), "decode(encode(p)) != p");
    for cut in [1, 3, 4, bytes.len().saturating_sub(2)] {
        if cut >= 1 && cut + 1 < bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "a map cut at {cut} of {} was accepted", bytes.len());
        }
    }
});
