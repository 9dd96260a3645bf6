//! What one tenant can do to the others through the request path (issue
//! 17): a key's own headers stay with that key, model names cannot steer
//! a path, only allowed headers and endpoints reach the provider, and a
//! request id of the caller's choosing cannot join another request's books.

use super::fake::{Exchange, FakeHost};
use super::flight::FLIGHT_PROPERTY;
use super::host::{Map, Next};
use super::lifecycle_tests::Gateway;
use crate::decision::Stored;
use crate::store::Store;
use rust_decimal::Decimal;

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

/// Two keys, gpt-4o-mini at 1000 an input and 2000 an output token per
/// million (0.001 and 0.002 a token), one roomy daily budget.
fn priced() -> String {
    r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"sk-one"},{"id":"k2","secret":"sk-two"}]}],
        "prices":{"gpt-4o-mini":{"input":"1000","output":"2000"}},
        "budgets":[{"id":"daily","limit":"100"}],"access_log_state":true}"#
        .to_string()
}

/// A JSON answer reporting `input` and `output` tokens.
fn answer(input: u64, output: u64) -> String {
    format!(
        r#"{{"choices":[],"usage":{{"prompt_tokens":{input},"completion_tokens":{output},"total_tokens":{}}}}}"#,
        input + output
    )
}

/// The cost of `input` and `output` tokens at `priced()`'s prices.
fn cost(input: u64, output: u64) -> Decimal {
    Decimal::from(input + 2 * output) / Decimal::from(1000)
}

/// The current attempt answers 200 with `answer(input, output)` and ends;
/// returns its `x-apikeyrouter-cost`.
fn answers(x: &mut Exchange, input: u64, output: u64) -> Option<String> {
    x.upstream_headers(200, &[("content-type", "application/json")], false);
    x.upstream_body(&[answer(input, output).as_bytes()], true);
    let cost = x.attempts.last().and_then(|(_, up)| up.get(Map::ResponseHeaders, "x-apikeyrouter-cost"));
    x.attempt_done();
    x.finish();
    cost
}

/// The access-log outcome one request's ingress stage left.
fn outcome(x: &Exchange) -> serde_json::Value {
    let raw = x.downstream.filter_state.borrow().get("apikeyrouter").cloned().unwrap_or_default();
    serde_json::from_slice(&raw).unwrap_or_default()
}

/// The flight nonce the ingress stage handed to the attempts.
fn flight_of(x: &Exchange) -> String {
    let raw = x.downstream.filter_state.borrow().get(FLIGHT_PROPERTY).cloned();
    String::from_utf8(raw.unwrap_or_else(|| panic!("no flight handed over"))).unwrap_or_default()
}

/// The decision records this VM's attempts wrote, after a tick.
fn decisions(gw: &mut Gateway) -> Vec<Stored> {
    gw.attempt.tick(&FakeHost::new(&gw.world));
    (0..8)
        .filter_map(|i| gw.world.store.value(&crate::shared_data::decision_slot(0, i)))
        .filter_map(|b| Stored::decode(&b))
        .collect()
}

#[test]
fn two_requests_with_the_same_request_id_interleaved_on_one_vm_are_charged_and_recorded_apart() {
    let mut gw = Gateway::new(&priced());
    let mut a = chat(&gw, &[], BODY);
    assert_eq!(a.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(a.attempt(&gw.attempt), Next::Continue);
    // While the first is with the provider, the same caller-chosen id again.
    let mut b = chat(&gw, &[], BODY);
    assert_eq!(b.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(b.attempt(&gw.attempt), Next::Continue);
    assert_ne!(flight_of(&a), flight_of(&b));
    assert_eq!(answers(&mut b, 100, 10), Some("0.12".into()));
    assert_eq!(answers(&mut a, 300, 50), Some("0.4".into()));

    let budget = gw.budget();
    assert_eq!((budget.spent, budget.reserved, budget.requests), (cost(300, 50) + cost(100, 10), Decimal::ZERO, 2));
    assert_eq!(gw.in_flight(), 0);
    assert_eq!((outcome(&a)["cost"].clone(), outcome(&b)["cost"].clone()), ("0.4".into(), "0.12".into()));
    // The caller's id is a label: sent on as it came, and in both records.
    for x in [&a, &b] {
        assert_eq!(x.attempts[0].1.get(Map::RequestHeaders, "x-request-id").as_deref(), Some("req-1"));
    }
    let records = decisions(&mut gw);
    assert_eq!(records.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), ["req-1", "req-1"]);
    assert!(records.iter().all(|r| r.charged.is_some()), "{records:?}");
}

#[test]
fn a_callers_flight_header_is_stripped_and_ignored() {
    let gw = Gateway::new(&priced());
    let mut a = chat(&gw, &[], BODY);
    assert_eq!(a.send_request(usize::MAX, false), Next::Continue);
    let victim = flight_of(&a);
    // The caller somehow learnt the victim's flight and names it every way.
    let hostile = [("x-apikeyrouter-flight", victim.as_str()), (FLIGHT_PROPERTY, victim.as_str())];
    let mut b = chat(&gw, &hostile, BODY);
    assert_eq!(b.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(b.attempt(&gw.attempt), Next::Continue);
    assert_ne!(flight_of(&b), victim);
    let sent = b.attempts[0].1.request_headers.borrow().clone();
    assert!(!sent.iter().any(|(_, v)| v == &victim), "{sent:?}");
    let victim_attempts = gw.world.flights.borrow().get(&victim).map(|f| f.attempts.count);
    assert_eq!(victim_attempts, Some(0), "the victim's flight saw no attempt");
    assert_eq!(answers(&mut b, 100, 10), Some("0.12".into()));
    assert_eq!(gw.budget().spent, cost(100, 10));
    assert_eq!(a.attempt(&gw.attempt), Next::Continue);
    assert_eq!(answers(&mut a, 300, 50), Some("0.4".into()));
    let budget = gw.budget();
    assert_eq!((budget.spent, budget.reserved), (cost(300, 50) + cost(100, 10), Decimal::ZERO));
}

#[test]
fn a_request_without_a_request_id_gets_a_random_one_as_its_label() {
    let mut gw = Gateway::new(&priced());
    let headers = [(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json")];
    let mut ids = Vec::new();
    for _ in 0..2 {
        let mut x = Exchange::new(&gw.world, &gw.ingress, &headers, BODY.as_bytes());
        assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
        let id = x.downstream.get(Map::RequestHeaders, "x-request-id").unwrap_or_default();
        assert_eq!(id.len(), 36, "{id}");
        assert_ne!(id, flight_of(&x), "the label is not the flight");
        x.attempt(&gw.attempt);
        answers(&mut x, 1, 1);
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    let recorded: Vec<String> = decisions(&mut gw).into_iter().map(|r| r.request_id).collect();
    assert_eq!(recorded, ids);
}
