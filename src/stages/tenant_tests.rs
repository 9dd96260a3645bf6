//! What one tenant can do to the others through the request path (issue
//! 17): a key's own headers stay with that key, model names cannot steer
//! a path, and only allowed headers and endpoints reach the provider.

use super::fake::Exchange;
use super::host::{Map, Next};
use super::lifecycle_tests::Gateway;

const BODY: &str = r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;

/// Two OpenAI keys, k1 with its own organization header.
fn two_orgs() -> String {
    r#"{"providers":[{"id":"openai","keys":[
        {"id":"k1","secret":"sk-one","headers":{"OpenAI-Organization":"org-one","X-Only-One":"1"}},
        {"id":"k2","secret":"sk-two"}]}]}"#
        .to_string()
}

fn chat(gw: &Gateway, extra: &[(&str, &str)], body: &str) -> Exchange {
    let mut headers = vec![
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("x-request-id", "req-1"),
    ];
    headers.extend_from_slice(extra);
    Exchange::new(&gw.world, &gw.ingress, &headers, body.as_bytes())
}

#[test]
fn a_retry_on_another_key_drops_the_previous_keys_own_headers() {
    let gw = Gateway::new(&two_orgs());
    let mut x = chat(&gw, &[], BODY);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(x.attempt(&gw.attempt), Next::Continue);
    let up = &x.attempts[0].1;
    assert_eq!(up.get(Map::RequestHeaders, "openai-organization").as_deref(), Some("org-one"));
    x.upstream_headers(429, &[("retry-after", "20")], false);
    x.upstream_body(&[b"slow down"], true);
    x.attempt_done();
    assert_eq!(x.attempt(&gw.attempt), Next::Continue);
    let up = &x.attempts[1].1;
    assert_eq!(up.get(Map::RequestHeaders, "authorization").as_deref(), Some("Bearer sk-two"));
    assert_eq!(up.get(Map::RequestHeaders, "openai-organization"), None);
    assert_eq!(up.get(Map::RequestHeaders, "x-only-one"), None);
}

#[test]
fn a_model_name_that_would_steer_the_azure_path_gets_400_and_nothing_is_sent() {
    let gw = Gateway::new(
        r#"{"providers":[{"id":"az","kind":"azure","deployments":{"gpt-4o":"gpt-4o"},"keys":[{"id":"z1","secret":"az-one"}]}]}"#,
    );
    let body = r#"{"model":"gpt-4o/../../other-deployment/chat/completions?","messages":[]}"#;
    let mut x = chat(&gw, &[], body);
    x.send_request(usize::MAX, false);
    let sent = x.replied().unwrap_or_else(|| panic!("no local reply"));
    assert_eq!(sent.status, 400);
    assert!(String::from_utf8_lossy(&sent.body).contains("invalid_model"));
    assert!(x.attempts.is_empty());
    // A legitimate name still goes to its deployment.
    let mut x = chat(&gw, &[("x-request-id", "req-2")], r#"{"model":"gpt-4o","messages":[]}"#);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(x.replied(), None);
    let path = x.downstream.get(Map::RequestHeaders, ":path").unwrap_or_default();
    assert!(path.starts_with("/openai/deployments/gpt-4o/chat/completions?"), "{path}");
}

#[test]
fn only_allowlisted_caller_headers_reach_the_provider_and_organization_comes_from_the_key() {
    let config = two_orgs().replacen(r#"{"providers""#, r#"{"forward_headers":["x-team-*"],"providers""#, 1);
    let gw = Gateway::new(&config);
    let caller = [
        ("openai-organization", "org-bogus"),
        ("openai-project", "proj-bogus"),
        ("cookie", "c=1"),
        ("x-stainless-lang", "python"),
        ("anthropic-beta", "b1"),
        ("user-agent", "sdk/1"),
        ("x-team-trace", "t1"),
    ];
    let mut x = chat(&gw, &caller, BODY);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(x.replied(), None);
    let down = &x.downstream;
    for gone in ["openai-organization", "openai-project", "cookie"] {
        assert_eq!(down.get(Map::RequestHeaders, gone), None, "{gone}");
    }
    for kept in
        ["x-stainless-lang", "anthropic-beta", "user-agent", "x-team-trace", "content-type", "x-request-id", ":path"]
    {
        assert!(down.get(Map::RequestHeaders, kept).is_some(), "{kept}");
    }
    assert_eq!(x.attempt(&gw.attempt), Next::Continue);
    let up = &x.attempts[0].1;
    // k1 is chosen first: its own organization, never the caller's.
    assert_eq!(up.get(Map::RequestHeaders, "openai-organization").as_deref(), Some("org-one"));
    assert_eq!(up.get(Map::RequestHeaders, "openai-project"), None);
}

/// `alice` with the default endpoints, `bob` allowed files too.
fn two_clients() -> String {
    format!(
        r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}}]}}],
            "clients":[{{"id":"alice","key_sha256":"{}"}},
                       {{"id":"bob","key_sha256":"{}","allowed_endpoints":["chat/completions","files","files/*"]}}]}}"#,
        super::lifecycle_tests::sha_hex("vk-alice"),
        super::lifecycle_tests::sha_hex("vk-bob")
    )
}

fn call(gw: &Gateway, method: &str, path: &str, key: &str, body: &str) -> Exchange {
    let auth = format!("Bearer {key}");
    let headers =
        [(":method", method), (":path", path), ("content-type", "application/json"), ("authorization", auth.as_str())];
    Exchange::new(&gw.world, &gw.ingress, &headers, body.as_bytes())
}

#[test]
fn a_client_calls_only_its_endpoints_by_default_the_inference_ones() {
    let gw = Gateway::new(&two_clients());
    for (method, path) in [
        ("GET", "/v1/files"),
        ("DELETE", "/v1/files/file-1"),
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/responses/resp_1"),
        ("POST", "/v1/batches"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/chat/../files"),
        ("DELETE", "/v1/models/ft-1"),
    ] {
        let mut x = call(&gw, method, path, "vk-alice", "");
        x.send_request(usize::MAX, false);
        let sent = x.replied().unwrap_or_else(|| panic!("{method} {path} went on"));
        assert_eq!(sent.status, 403, "{method} {path}");
        assert!(String::from_utf8_lossy(&sent.body).contains("endpoint_not_allowed"));
        assert!(x.attempts.is_empty());
    }
    let mut x = call(&gw, "POST", "/v1/chat/completions", "vk-alice", BODY);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(x.replied(), None);
    let mut x = call(&gw, "GET", "/v1/models", "vk-alice", "");
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(x.replied(), None);
    // bob's own list replaces the default, for every method.
    let mut x = call(&gw, "GET", "/v1/files/file-1", "vk-bob", "");
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(x.replied(), None);
    let mut x = call(&gw, "POST", "/v1/embeddings", "vk-bob", r#"{"model":"e","input":"x"}"#);
    x.send_request(usize::MAX, false);
    assert_eq!(x.replied().map(|s| s.status), Some(403));
}

#[test]
fn the_open_gateway_forwards_every_endpoint_as_before() {
    let gw = Gateway::new(&two_orgs());
    let headers = [(":method", "GET"), (":path", "/v1/files")];
    let mut x = Exchange::new(&gw.world, &gw.ingress, &headers, b"");
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(x.replied(), None);
}
