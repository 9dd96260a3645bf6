//! Request-body parsing: `request::inspect` and the
//! `stream_options.include_usage` rewrite, on arbitrary bytes.
//!
//! Properties checked, beyond "never panics":
//! - `inspect` never refuses as malformed what a plain JSON parser accepts,
//!   never accepts a non-object, and reports the body length;
//! - for a body that is strict JSON, `with_include_usage` keeps its
//!   contract: `Some` exactly for a stream that does not already ask for
//!   usage;
//! - its output is valid JSON whose last word on `stream_options` (the one
//!   providers act on) has `include_usage: true`, which `inspect` reads back
//!   the same way, with every other top-level field unchanged, and which
//!   needs no second rewrite.
#![no_main]

use apikeyrouter::request::{inspect, with_include_usage, BodyError};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    let res = inspect(body);
    assert_eq!(res, inspect(body), "inspect is not deterministic");

    let plain = serde_json::from_slice::<Value>(body);
    match (&res, &plain) {
        (Ok(_), Ok(v)) => assert!(v.is_object()),
        (Err(BodyError::NotAnObject), Ok(v)) => assert!(!v.is_object()),
        (Err(BodyError::Malformed(m)), Ok(_)) => panic!("valid JSON refused as malformed: {m}"),
        (Err(BodyError::BadField(_)), Ok(v)) => assert!(v.is_object()),
        (Ok(_), Err(_)) | (Err(_), Err(_)) => {}
    }
    let Ok(info) = res else {
        return;
    };
    assert_eq!(info.body_len, body.len());

    // `inspect` skips unknown fields without validating them (serde's
    // `IgnoredAny`), so it accepts some bodies a strict parser refuses, e.g.
    // invalid UTF-8 inside an unknown string field. Such a body is forwarded
    // as is and the provider refuses it; the rewrite promises nothing for it.
    if plain.is_err() {
        let _ = with_include_usage(body, &info);
        return;
    }
    let out = with_include_usage(body, &info);
    let wanted = info.stream && !info.include_usage;
    assert_eq!(
        out.is_some(),
        wanted,
        "with_include_usage broke its contract for stream={} include_usage={}",
        info.stream,
        info.include_usage
    );
    let Some(out) = out else {
        return;
    };

    // What a provider sees: a JSON parser where the last duplicate key wins.
    let v: Value = match serde_json::from_slice(&out) {
        Ok(v) => v,
        Err(e) => panic!("rewritten body is not JSON: {e}: {}", String::from_utf8_lossy(&out)),
    };
    assert_eq!(
        v.pointer("/stream_options/include_usage"),
        Some(&Value::Bool(true)),
        "rewritten body does not ask for usage: {}",
        String::from_utf8_lossy(&out)
    );

    let again = match inspect(&out) {
        Ok(i) => i,
        Err(e) => panic!("rewritten body is refused: {e}: {}", String::from_utf8_lossy(&out)),
    };
    assert!(again.stream && again.include_usage && again.has_stream_options);
    assert_eq!(again.model, info.model);
    assert_eq!(again.max_tokens, info.max_tokens);
    assert_eq!(with_include_usage(&out, &again), None, "a second rewrite was needed");

    // Nothing else changed.
    if let (Ok(Value::Object(mut before)), Value::Object(mut after)) = (plain, v) {
        let so_before = before.remove("stream_options");
        let so_after = after.remove("stream_options");
        assert_eq!(before, after, "the rewrite changed other fields");
        if let (Some(Value::Object(mut b)), Some(Value::Object(mut a))) = (so_before, so_after) {
            b.remove("include_usage");
            a.remove("include_usage");
            assert_eq!(b, a, "the rewrite changed other stream options");
        }
    }
});
