//! Inputs that made a fuzz target in `fuzz/` fail, kept as plain tests so
//! that `cargo test` guards them without the fuzzer. Each test is named after
//! the behaviour it guards and holds the failing input inline.

use apikeyrouter::config::compile;
use apikeyrouter::key_record::KeyRecord;
use apikeyrouter::request::{inspect, with_include_usage};
use serde_json::Value;

/// Found by `fuzz/run.sh config` on its first seed with an admin section
/// (`fuzz/seeds/config/demo.json`, the README's sample config): the derived
/// `Debug` of `config::Admin` printed the admin token, so `{:?}` of a
/// compiled `Config` showed a credential, which the hand-written `Debug` of
/// `Key` is there to prevent.
#[test]
fn config_debug_output_never_shows_the_admin_token() {
    let json = br#"{"providers": [{"id": "openai", "kind": "openai", "keys": [
   {"id": "k1", "secret_env": "OPENAI_KEY_1"},
   {"id": "k2", "secret_env": "OPENAI_KEY_2"}]}],
 "admin": {"token_env": "APIKEYROUTER_ADMIN_TOKEN"}}
"#;
    let env = |name: &str| match name {
        "OPENAI_KEY_1" => Some("sk-A-4e8349d38db13f3d".to_string()),
        "OPENAI_KEY_2" => Some("sk-A-0b9e2b6c1f0a4d77".to_string()),
        "APIKEYROUTER_ADMIN_TOKEN" => Some("admin-token-5f1c9a2e7b3d".to_string()),
        _ => None,
    };
    let cfg = match compile(json, &env) {
        Ok(c) => c,
        Err(e) => panic!("the README's sample config is refused: {e}"),
    };
    let shown = format!("{cfg:?}");
    for secret in ["sk-A-4e8349d38db13f3d", "sk-A-0b9e2b6c1f0a4d77", "admin-token-5f1c9a2e7b3d"] {
        assert!(!shown.contains(secret), "Debug shows {secret}: {shown}");
    }
}

/// Why the rewrite of `body` fails to ask for usage, as a provider reads it
/// (the last duplicate key wins); `Ok` when it asks.
fn rewrite_problem(body: &[u8]) -> Result<(), String> {
    let info = inspect(body).map_err(|e| format!("refused: {e}"))?;
    if !info.stream || info.include_usage {
        return Err(format!("not a stream without usage: {info:?}"));
    }
    let out = with_include_usage(body, &info).ok_or("a stream that does not ask for usage was left alone")?;
    let shown = String::from_utf8_lossy(&out).into_owned();
    let v: Value = serde_json::from_slice(&out).map_err(|e| format!("rewritten body is not JSON: {e}: {shown}"))?;
    if v.pointer("/stream_options/include_usage") != Some(&Value::Bool(true)) {
        return Err(format!("rewritten body does not ask for usage: {shown}"));
    }
    let again = inspect(&out).map_err(|e| format!("rewritten body is refused: {e}: {shown}"))?;
    if !again.include_usage {
        return Err(format!("inspect does not read the rewrite back: {shown}"));
    }
    Ok(())
}

fn rewritten_asks_for_usage(body: &[u8]) {
    assert_eq!(rewrite_problem(body), Ok(()), "{}", String::from_utf8_lossy(body));
}

/// Found by `fuzz/run.sh request_body` (seed
/// `fuzz/seeds/request_body/stream_options_null.json`): `inspect` read
/// `"stream_options": null` as absent, so the rewrite spliced a second
/// `stream_options` key in front of the client's `null`, and the provider,
/// keeping the last one, streamed without usage (no tokens counted).
#[test]
fn stream_with_null_stream_options_still_asks_for_usage() {
    rewritten_asks_for_usage(br#"{"model":"gpt-4o","stream":true,"stream_options":null,"messages":[]}"#);
    // The same key spelled with an escape, which serde decodes alike.
    rewritten_asks_for_usage(br#"{"stream":true,"stream\u005foptions":null}"#);
}

/// The cases around it, which already work.
#[test]
fn stream_options_rewrite_keeps_asking_for_usage() {
    rewritten_asks_for_usage(br#"{"model":"gpt-4o","stream":true,"messages":[]}"#);
    rewritten_asks_for_usage(br#"{"model":"gpt-4o","stream":true,"stream_options":{},"messages":[]}"#);
    rewritten_asks_for_usage(br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#);
    rewritten_asks_for_usage(br#"{"stream":true,"stream_options":{"include_usage":null}}"#);
}

/// Found by `fuzz/run.sh state_record` (crash input `01 02 00 00` then 88
/// bytes of 0xff, laid by the target over a default record after its version
/// byte: state 1, reason 2, and every word up to `cooldowns` all ones): a
/// record read back from shared data whose `cooldowns` counter is at
/// `u64::MAX` made `cool_until` overflow (`self.cooldowns += 1`), a panic wherever
/// overflow checks are on. Shared data holds whatever any worker or plugin
/// version wrote, so counters must saturate rather than trust it.
#[test]
fn cooling_a_record_with_a_saturated_counter_does_not_overflow() {
    let mut bytes = KeyRecord::default().encode();
    bytes[1] = 1; // a valid state byte, as in the crash input
    for b in &mut bytes[4..] {
        *b = 0xff;
    }
    let mut r = match KeyRecord::decode(&bytes) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(r.cooldowns, u64::MAX);
    r.cooldown_until_ms = 0;
    assert!(r.cool_until(1_700_000_000_000));
    assert_eq!(r.cooldown_until_ms, 1_700_000_000_000);
    assert_eq!(r.cooldowns, u64::MAX);
}
