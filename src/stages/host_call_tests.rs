//! What a request costs in host calls, counted by kind (issue 18): the
//! regression guard for speed. Every host call crosses from the VM into
//! Envoy and back; a change that adds one to every request shows here, in
//! review, rather than as a slower `make bench`. Counts, never times.

use super::fake::Exchange;
use super::lifecycle_tests::{config, served, Gateway};
use std::collections::BTreeMap;

const CHAT: &str = r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
const ANSWER: &str =
    r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;

/// The default configuration: one provider, two keys, nothing else.
const DEFAULTS: &str =
    r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"sk-one"},{"id":"k2","secret":"sk-two"}]}]}"#;

/// Both stages' host calls for one request, by kind.
fn by_kind(x: &Exchange) -> BTreeMap<&'static str, usize> {
    let mut kinds = BTreeMap::new();
    let mut log = x.downstream.log.borrow().clone();
    for (_, up) in &x.attempts {
        log.extend(up.log.borrow().iter());
    }
    for c in log {
        *kinds.entry(c).or_default() += 1;
    }
    assert_eq!(kinds.values().sum::<usize>(), x.host_calls());
    kinds
}

fn json_request(gw: &Gateway) -> Exchange {
    let mut x = gw.chat(CHAT);
    x.send_request(usize::MAX, false);
    x.attempt(&gw.attempt);
    x.upstream_headers(200, &[("content-type", "application/json"), ("content-length", "95")], false);
    x.upstream_body(&[ANSWER.as_bytes()], true);
    x.attempt_done();
    x.finish();
    x
}

/// A stream of five events, each its own body callback.
fn streamed_request(gw: &Gateway) -> Exchange {
    let mut x = gw.chat(r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#);
    x.send_request(usize::MAX, false);
    x.attempt(&gw.attempt);
    x.upstream_headers(200, &[("content-type", "text/event-stream")], false);
    let events = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"!\"}}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20,\"total_tokens\":30}}\n\n",
        "data: [DONE]\n\n",
    ];
    let chunks: Vec<&[u8]> = events.iter().map(|e| e.as_bytes()).collect();
    x.upstream_body(&chunks, true);
    x.attempt_done();
    x.finish();
    x
}

/// A request a few milliseconds after a warm-up one: the snapshot is
/// loaded, but the generation must be read again.
fn measured(gw: &Gateway, request: fn(&Gateway) -> Exchange) -> Exchange {
    request(gw);
    gw.world.advance(5);
    request(gw)
}

#[test]
fn a_json_request_under_the_default_config_costs_a_known_number_of_host_calls() {
    let gw = Gateway::new(DEFAULTS);
    let x = measured(&gw, json_request);
    let kinds = by_kind(&x);
    // Ingress: read the headers, strip the credential, read the body, read
    // the generation, hand the flight over (filter state). Attempt: read
    // the flight and the generation, write the key, read the response
    // headers and body, write three routing headers, record the attempt (a
    // read and a compare-and-swap). One clock read per callback that needs
    // one (5). No route objective read and no access-log state: the
    // default config asks for neither.
    assert_eq!(x.host_calls(), 20, "{kinds:?}");
}

#[test]
fn a_streamed_request_under_the_default_config_costs_a_known_number_of_host_calls() {
    let gw = Gateway::new(DEFAULTS);
    let x = measured(&gw, streamed_request);
    let kinds = by_kind(&x);
    // As JSON, plus `stream_options` written into the body (a buffer write
    // and a header) and one read per event as it passes.
    assert_eq!(x.host_calls(), 26, "{kinds:?}");
    assert_eq!(kinds.get("buffer"), Some(&6), "the request body and five events");
}

#[test]
fn a_json_request_with_a_client_and_a_budget_costs_a_known_number_of_host_calls() {
    let gw = Gateway::new(&config("1.00"));
    let x = measured(&gw, served);
    let kinds = by_kind(&x);
    // The default's 20, plus the budget's reservation and settlement (a
    // read and a compare-and-swap each), the cost header and the outcome
    // for access logs (this config asks for it).
    assert_eq!(x.host_calls(), 26, "{kinds:?}");
}

#[test]
fn a_request_whose_charge_crosses_a_budget_alert_threshold_costs_no_extra_host_call() {
    // The budget of `config`, with an alert the second request's charge
    // crosses (0.00045 of 1.00).
    let alerting = config("1.00").replace(
        r#""budgets":[{"id":"daily","limit":"1.00"}]"#,
        r#""budgets":[{"id":"daily","limit":"1.00","alerts":[0.0003]}],"alerts":{"cluster":"hooks"}"#,
    );
    let gw = Gateway::new(&alerting);
    let x = measured(&gw, served);
    let kinds = by_kind(&x);
    // As with a budget (26): the threshold is claimed in the settlement's
    // own compare-and-swap and queued in VM memory; the webhook call is made
    // on the tick.
    assert_eq!(x.host_calls(), 26, "{kinds:?}");
    assert_eq!(gw.attempt.routing.borrow().alerts.len(), 1, "crossed by this request");
    assert!(gw.world.calls.borrow().is_empty());
}

#[test]
fn requests_in_the_same_millisecond_share_one_read_of_the_generation() {
    let gw = Gateway::new(DEFAULTS);
    json_request(&gw);
    gw.world.advance(5);
    let first = by_kind(&json_request(&gw));
    let second = by_kind(&json_request(&gw));
    assert_eq!(
        first.get("get_shared_data").copied().unwrap_or(0),
        second.get("get_shared_data").copied().unwrap_or(0) + 2,
        "{first:?} {second:?}"
    );
}

#[test]
fn combined_or_no_routing_headers_save_their_host_calls() {
    let mode = |header: &str| {
        let gw = Gateway::new(&DEFAULTS.replace("]}]}", &format!("]}}],\"decisions\":{{\"header\":{header}}}}}")));
        let x = measured(&gw, json_request);
        let up = &x.attempts[0].1;
        let names: Vec<String> = up
            .response_headers
            .borrow()
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| k.starts_with("x-apikeyrouter-"))
            .collect();
        (x.host_calls(), names, up.get(super::host::Map::ResponseHeaders, "x-apikeyrouter-decision"))
    };
    let (separate, names, _) = mode("true");
    assert_eq!(separate, 20);
    assert_eq!(names, ["x-apikeyrouter-key-id", "x-apikeyrouter-attempts", "x-apikeyrouter-decision"]);
    let (combined, names, decision) = mode("\"combined\"");
    assert_eq!((combined, names), (18, vec!["x-apikeyrouter-decision".to_string()]));
    let decision = decision.unwrap_or_default();
    assert!(decision.starts_with("attempt=1; objective=") && decision.contains("key=k"), "{decision}");
    let (off, names, _) = mode("\"none\"");
    assert_eq!((off, names), (17, Vec::<String>::new()));
}

#[test]
fn route_objectives_and_access_log_state_cost_a_host_call_each_only_when_asked_for() {
    let with = |extra: &str| {
        let gw = Gateway::new(&DEFAULTS.replace("]}]}", &format!("]}}],{extra}}}")));
        let x = measured(&gw, json_request);
        let kinds = by_kind(&x);
        (x.host_calls(), kinds.get("property").copied(), kinds.get("set_property").copied())
    };
    assert_eq!(with(r#""routing":{"route_objectives":true}"#), (21, Some(2), Some(1)));
    assert_eq!(with(r#""access_log_state":true"#), (21, Some(1), Some(2)));
}

#[test]
fn with_routing_headers_off_the_attempt_stages_own_429_carries_none_either() {
    let gw = Gateway::new(&DEFAULTS.replace("]}]}", r#"]}],"decisions":{"header":"none"}}"#));
    let mut x = gw.chat(CHAT);
    x.send_request(usize::MAX, false);
    for _ in 0..2 {
        x.attempt(&gw.attempt);
        x.upstream_headers(429, &[("retry-after", "30")], true);
        x.attempt_done();
    }
    x.attempt(&gw.attempt);
    let sent = x.attempts[2].1.sent.borrow().clone().unwrap_or_else(|| panic!("no local reply"));
    assert_eq!(sent.status, 429);
    let ours: Vec<&String> = sent.headers.iter().map(|(k, _)| k).filter(|k| k.starts_with("x-apikeyrouter-")).collect();
    assert!(ours.is_empty(), "{ours:?}");
}
