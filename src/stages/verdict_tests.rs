//! Only a key's own failure changes the key (issue 17): what a provider's
//! 401 or 403 does to the key, the verdict the attempt stage gives Envoy's
//! router (`x-apikeyrouter-retry`), and the half-open probe that brings a
//! disabled key back.

use super::fake::Exchange;
use super::host::{Map, Next};
use super::lifecycle_tests::Gateway;
use crate::key_record::Effective;
use crate::keys::{set_state, SetState};

const BODY: &str = r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
const ANSWER: &str =
    r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;
const INVALID_KEY: &str = r#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
const WRONG_ORG: &str = r#"{"error":{"message":"OpenAI-Organization header should match organization for API key","type":"invalid_request_error","param":null,"code":"mismatched_organization"}}"#;
const NO_MODEL_ACCESS: &str = r#"{"error":{"message":"Project does not have access to model o1","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;

/// Two OpenAI keys (k2 with its own organization), probes after 60 s.
fn config() -> String {
    r#"{"providers":[{"id":"openai","keys":[
        {"id":"k1","secret":"sk-one"},
        {"id":"k2","secret":"sk-two","headers":{"OpenAI-Organization":"org-two"}}]}],
        "probe_disabled_after_seconds":60}"#
        .to_string()
}

fn chat(gw: &Gateway) -> Exchange {
    let headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("x-request-id", "req-1"),
    ];
    let mut x = Exchange::new(&gw.world, &gw.ingress, &headers, BODY.as_bytes());
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    x
}

/// The current attempt answers `status` with a JSON `body`; returns the
/// attempt's verdict header and what passed to the caller.
fn answer(x: &mut Exchange, status: u32, body: &str) -> (Option<String>, Vec<u8>) {
    answer_with(x, status, &[], body)
}

/// As [`answer`], with `headers` besides the JSON content type.
fn answer_with(x: &mut Exchange, status: u32, headers: &[(&str, &str)], body: &str) -> (Option<String>, Vec<u8>) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    x.upstream_headers(status, &all, false);
    let passed = x.upstream_body(&[body.as_bytes()], true);
    let verdict = x.attempts.last().and_then(|(_, up)| up.get(Map::ResponseHeaders, "x-apikeyrouter-retry"));
    (verdict, passed)
}

/// A request whose one attempt is answered 200: the key it went out with.
fn serve_one(gw: &Gateway) -> Option<String> {
    let mut x = chat(gw);
    x.attempt(&gw.attempt);
    let key = key_of(&x);
    answer(&mut x, 200, ANSWER);
    x.attempt_done();
    x.finish();
    key
}

/// A request on k1 that the provider answers with a bad-key 401 (the
/// request itself is left unserved).
fn bad_key_answer(gw: &Gateway) {
    let mut x = chat(gw);
    x.attempt(&gw.attempt);
    assert_eq!(key_of(&x).as_deref(), Some("Bearer sk-one"));
    answer(&mut x, 401, INVALID_KEY);
    x.attempt_done();
    x.finish();
}

/// k1 answers a bad-key 401; past the probe time, the next request's first
/// attempt probes it.
fn probe_of_a_bad_key(gw: &Gateway) -> Exchange {
    bad_key_answer(gw);
    gw.world.advance(61_000);
    let mut probe = chat(gw);
    probe.attempt(&gw.attempt);
    assert_eq!(key_of(&probe).as_deref(), Some("Bearer sk-one"));
    probe
}

fn key_of(x: &Exchange) -> Option<String> {
    let (_, up) = x.attempts.last()?;
    up.get(Map::RequestHeaders, "authorization")
}

fn transitions(gw: &Gateway) -> Vec<(String, String, String, String)> {
    crate::transition::recent(&gw.world.store, 1000, 100).into_iter().map(|t| (t.id, t.from, t.to, t.reason)).collect()
}

fn admin_disable(gw: &Gateway, k: usize) {
    let cfg = gw.attempt.routing.borrow().config.clone();
    let now = gw.world.now_ms.get();
    if let Err(e) = set_state(&gw.world.store, &cfg.keys[k].record_name, SetState::Disabled, now) {
        panic!("{e:?}");
    }
}

#[test]
fn a_401_naming_a_bad_key_disables_it_and_asks_for_another_key() {
    let gw = Gateway::new(&config());
    let mut x = chat(&gw);
    x.attempt(&gw.attempt);
    assert_eq!(key_of(&x).as_deref(), Some("Bearer sk-one"));
    let (verdict, _) = answer(&mut x, 401, INVALID_KEY);
    assert_eq!(verdict.as_deref(), Some("another-key"));
    x.attempt_done();
    assert_eq!(gw.key_state(0), Effective::Disabled);
    x.attempt(&gw.attempt);
    assert_eq!(key_of(&x).as_deref(), Some("Bearer sk-two"));
    let (verdict, _) = answer(&mut x, 200, ANSWER);
    assert_eq!(verdict, None);
    x.attempt_done();
    x.finish();
}

#[test]
fn a_401_that_does_not_blame_the_key_goes_back_to_the_caller_and_changes_nothing() {
    let gw = Gateway::new(&config());
    let mut x = chat(&gw);
    x.attempt(&gw.attempt);
    // k1 sends no organization of its own: the mismatch is not its fault.
    let (verdict, passed) = answer(&mut x, 401, WRONG_ORG);
    assert_eq!(verdict, None, "no other key is tried");
    assert_eq!(passed, WRONG_ORG.as_bytes(), "the caller gets the provider's answer");
    x.attempt_done();
    x.finish();
    assert_eq!((gw.key_state(0), gw.key_state(1)), (Effective::Available, Effective::Available));
    assert!(transitions(&gw).is_empty());
}

#[test]
fn a_mismatched_organization_disables_a_key_that_sends_its_own_organization() {
    let gw = Gateway::new(&config());
    admin_disable(&gw, 0);
    let mut x = chat(&gw);
    x.attempt(&gw.attempt);
    assert_eq!(key_of(&x).as_deref(), Some("Bearer sk-two"));
    let (verdict, _) = answer(&mut x, 401, WRONG_ORG);
    assert_eq!(verdict.as_deref(), Some("another-key"));
    x.attempt_done();
    assert_eq!(gw.key_state(1), Effective::Disabled, "its configured organization is wrong");
}

#[test]
fn a_403_for_a_model_the_key_may_not_use_leaves_the_key_available() {
    let gw = Gateway::new(&config());
    for status in [403, 404] {
        let mut x = chat(&gw);
        x.attempt(&gw.attempt);
        let (verdict, passed) = answer(&mut x, status, NO_MODEL_ACCESS);
        assert_eq!((verdict, passed), (None, NO_MODEL_ACCESS.as_bytes().to_vec()), "{status}");
        x.attempt_done();
        x.finish();
    }
    assert_eq!((gw.key_state(0), gw.key_state(1)), (Effective::Available, Effective::Available));
}

#[test]
fn a_401_without_an_error_body_changes_nothing() {
    let gw = Gateway::new(&config());
    let mut x = chat(&gw);
    x.attempt(&gw.attempt);
    x.upstream_headers(401, &[("content-type", "text/html")], false);
    x.upstream_body(&[b"<html>401 Authorization Required</html>"], true);
    let verdict = x.attempts[0].1.get(Map::ResponseHeaders, "x-apikeyrouter-retry");
    assert_eq!(verdict, None);
    x.attempt_done();
    assert_eq!(gw.key_state(0), Effective::Available);
}

#[test]
fn a_429_or_a_provider_failure_asks_for_another_key() {
    let gw = Gateway::new(&config());
    for (status, retried) in
        [(429, true), (500, true), (502, true), (503, true), (529, true), (504, false), (400, false)]
    {
        let mut x = chat(&gw);
        x.attempt(&gw.attempt);
        x.upstream_headers(status, &[("content-type", "application/json"), ("retry-after", "1")], false);
        x.upstream_body(&[br#"{"error":{"message":"x","type":"server_error"}}"#], true);
        let verdict = x.attempts[0].1.get(Map::ResponseHeaders, "x-apikeyrouter-retry");
        assert_eq!(verdict.is_some(), retried, "{status}");
        x.attempt_done();
        x.finish();
        gw.world.advance(2_000);
    }
}

#[test]
fn an_upstream_cannot_ask_for_a_retry_or_speak_for_the_gateway() {
    let gw = Gateway::new(&config());
    let mut x = chat(&gw);
    x.attempt(&gw.attempt);
    let headers = [("x-apikeyrouter-retry", "another-key"), ("x-apikeyrouter-cost", "0")];
    answer_with(&mut x, 400, &headers, r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#);
    let up = &x.attempts[0].1;
    assert_eq!(up.get(Map::ResponseHeaders, "x-apikeyrouter-retry"), None);
    assert_eq!(up.get(Map::ResponseHeaders, "x-apikeyrouter-cost"), None);
    assert_eq!(up.get(Map::ResponseHeaders, "x-apikeyrouter-key-id").as_deref(), Some("k1"));
}

#[test]
fn a_disabled_key_gets_one_probe_after_the_probe_time_and_serves_again_on_success() {
    let gw = Gateway::new(&config());
    bad_key_answer(&gw);
    assert_eq!(gw.key_state(0), Effective::Disabled);

    // Before the probe time every request goes to k2.
    gw.world.advance(59_000);
    assert_eq!(serve_one(&gw).as_deref(), Some("Bearer sk-two"));

    // Then one request probes k1; a second one meanwhile does not.
    gw.world.advance(2_000);
    let mut probe = chat(&gw);
    probe.attempt(&gw.attempt);
    assert_eq!(key_of(&probe).as_deref(), Some("Bearer sk-one"));
    let mut other = chat(&gw);
    other.attempt(&gw.attempt);
    assert_eq!(key_of(&other).as_deref(), Some("Bearer sk-two"), "one probe at a time");
    answer(&mut probe, 200, ANSWER);
    let up = &probe.attempts[0].1;
    assert!(up.get(Map::ResponseHeaders, "x-apikeyrouter-decision").is_some_and(|d| d.contains("objective=probe")));
    probe.attempt_done();
    probe.finish();
    assert_eq!(gw.key_state(0), Effective::Available);
    let t = transitions(&gw);
    assert!(
        t.iter().any(|(id, from, to, why)| id == "k1"
            && from.starts_with("disabled")
            && to.starts_with("available")
            && why.contains("probe")),
        "{t:?}"
    );
}

#[test]
fn a_failed_probe_keeps_the_key_disabled_until_the_next_probe_time() {
    let gw = Gateway::new(&config());
    let mut probe = probe_of_a_bad_key(&gw);
    let (verdict, _) = answer(&mut probe, 401, INVALID_KEY);
    assert_eq!(verdict.as_deref(), Some("another-key"), "the caller is served by another key");
    probe.attempt_done();
    probe.attempt(&gw.attempt);
    assert_eq!(key_of(&probe).as_deref(), Some("Bearer sk-two"));
    probe.finish();
    assert_eq!(gw.key_state(0), Effective::Disabled);
    let t = transitions(&gw);
    assert!(
        t.iter().any(|(id, _, to, why)| id == "k1" && to.starts_with("disabled") && why.contains("probe")),
        "{t:?}"
    );
    gw.world.advance(30_000);
    assert_eq!(serve_one(&gw).as_deref(), Some("Bearer sk-two"), "the next probe waits its time again");
}

#[test]
fn a_key_an_admin_disabled_is_never_probed() {
    let gw = Gateway::new(&config());
    admin_disable(&gw, 0);
    gw.world.advance(3_600_000);
    for _ in 0..3 {
        assert_eq!(serve_one(&gw).as_deref(), Some("Bearer sk-two"));
    }
    assert_eq!(gw.key_state(0), Effective::Disabled);
}

#[test]
fn a_gateway_whose_only_key_is_disabled_lets_the_probe_through_at_its_time() {
    let gw = Gateway::new(
        r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"sk-one"}]}],"probe_disabled_after_seconds":60}"#,
    );
    bad_key_answer(&gw);
    let refused = chat_refused(&gw);
    assert_eq!(refused, Some(429), "no key before the probe time");
    gw.world.advance(60_000);
    assert_eq!(serve_one(&gw).as_deref(), Some("Bearer sk-one"));
    assert_eq!(gw.key_state(0), Effective::Available);
}

/// The status of the ingress stage's refusal, if it refused.
fn chat_refused(gw: &Gateway) -> Option<u32> {
    let headers = [(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json")];
    let mut x = Exchange::new(&gw.world, &gw.ingress, &headers, BODY.as_bytes());
    x.send_request(usize::MAX, false);
    x.replied().map(|r| r.status)
}

#[test]
fn a_request_probes_at_most_one_disabled_key_and_only_on_its_first_attempt() {
    let gw = Gateway::new(
        r#"{"providers":[{"id":"openai","keys":[
            {"id":"k1","secret":"sk-one"},{"id":"k2","secret":"sk-two"},{"id":"k3","secret":"sk-three"}]}],
            "probe_disabled_after_seconds":60}"#,
    );
    // k1 and k2 are revoked together.
    for _ in 0..6 {
        let mut x = chat(&gw);
        x.attempt(&gw.attempt);
        let revoked = key_of(&x).as_deref() != Some("Bearer sk-three");
        answer(&mut x, if revoked { 401 } else { 200 }, if revoked { INVALID_KEY } else { ANSWER });
        x.attempt_done();
        x.finish();
    }
    assert_eq!((gw.key_state(0), gw.key_state(1)), (Effective::Disabled, Effective::Disabled));
    gw.world.advance(61_000);
    let mut x = chat(&gw);
    x.attempt(&gw.attempt);
    let probed = key_of(&x);
    assert!(matches!(probed.as_deref(), Some("Bearer sk-one" | "Bearer sk-two")), "{probed:?}");
    let (verdict, _) = answer(&mut x, 401, INVALID_KEY);
    assert_eq!(verdict.as_deref(), Some("another-key"));
    x.attempt_done();
    x.attempt(&gw.attempt);
    assert_eq!(key_of(&x).as_deref(), Some("Bearer sk-three"), "the retry goes to the healthy key");
}

#[test]
fn a_probe_answered_with_the_callers_own_400_brings_the_key_back() {
    let gw = Gateway::new(&config());
    let mut probe = probe_of_a_bad_key(&gw);
    let (verdict, _) =
        answer(&mut probe, 400, r#"{"error":{"message":"bad messages","type":"invalid_request_error","code":null}}"#);
    assert_eq!(verdict, None);
    assert_eq!(gw.key_state(0), Effective::Available, "the provider accepted the key");
    probe.attempt_done();
    probe.finish();
    let t = transitions(&gw);
    assert_eq!(t.iter().filter(|(id, ..)| id == "k1").count(), 2, "disabled, then back: {t:?}");
}

#[test]
fn a_429_for_a_request_larger_than_the_keys_token_limit_does_not_cool_the_key() {
    let gw = Gateway::new(&config());
    let mut x = chat(&gw);
    x.attempt(&gw.attempt);
    // The body's max_tokens alone (50) is more than this key's 40 a minute.
    let too_large = r#"{"error":{"message":"Request too large for gpt-4o-mini on tokens per min (TPM)","type":"tokens","code":"rate_limit_exceeded"}}"#;
    let (verdict, _) =
        answer_with(&mut x, 429, &[("x-ratelimit-limit-tokens", "40"), ("retry-after", "20")], too_large);
    assert_eq!(verdict.as_deref(), Some("another-key"), "a key with a larger limit may serve it");
    x.attempt_done();
    assert_eq!(gw.key_state(0), Effective::Available);
    // A 429 for a request that fits is the key's: it cools.
    let mut x = chat(&gw);
    x.attempt(&gw.attempt);
    let limited = r#"{"error":{"message":"Rate limit reached","type":"tokens","code":"rate_limit_exceeded"}}"#;
    answer_with(&mut x, 429, &[("x-ratelimit-limit-tokens", "30000"), ("retry-after", "20")], limited);
    x.attempt_done();
    let cooling = |k| matches!(gw.key_state(k), Effective::Throttled { .. });
    assert!(cooling(0) || cooling(1));
}

#[test]
fn a_callers_credential_in_the_query_string_never_reaches_the_provider() {
    let gw = Gateway::new(&config());
    let headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions?key=AIzaJUNK&access_token=t&foo=1"),
        ("content-type", "application/json"),
    ];
    let mut x = Exchange::new(&gw.world, &gw.ingress, &headers, BODY.as_bytes());
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    x.attempt(&gw.attempt);
    let path = x.attempts[0].1.get(Map::RequestHeaders, ":path");
    assert_eq!(path.as_deref(), Some("/v1/chat/completions?foo=1"));
}
