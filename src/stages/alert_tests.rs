//! Alert events through both stages against the fake host: a budget's
//! thresholds each posted once, on the attempt root's tick, to the webhook
//! cluster; a failing webhook retried with backoff; key disable and
//! exhaustion events; never key material.

use super::fake::{Call, FakeHost};
use super::host::Next;
use super::lifecycle_tests::{sha_hex, Gateway};
use crate::alerts;
use serde_json::Value;

const BODY: &str = r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
/// (10 * 2.50 + 20 * 10) / 1e6 = 0.000225 per request.
const ANSWER: &str =
    r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;

/// A soft daily budget of five requests' cost with alerts at 50, 80 and
/// 100%, a webhook cluster `hooks`, and key k1 disabled by a 401.
fn config(max_attempts: u32) -> String {
    format!(
        r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}},{{"id":"k2","secret":"sk-two"}}]}}],
            "prices":{{"gpt-4o*":{{"input":"2.50","output":"10"}}}},
            "budgets":[{{"id":"daily","limit":"0.001125","enforcement":"soft","alerts":[1.0, 0.5, "0.8", 0.5]}}],
            "status_actions":{{"401":"disable"}},
            "alerts":{{"cluster":"hooks","path":"/events","headers":{{"X-Hook-Token":"hook-secret"}},"max_attempts":{max_attempts}}},
            "clients":[{{"id":"alice","key_sha256":"{}"}}]}}"#,
        sha_hex("vk-alice")
    )
}

/// One request answered `status` with `body`; returns its host calls.
fn request(gw: &Gateway, status: u32, body: &str) -> usize {
    let mut x = gw.chat(BODY);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    x.attempt(&gw.attempt);
    x.upstream_headers(status, &[("content-type", "application/json")], false);
    x.upstream_body(&[body.as_bytes()], true);
    x.attempt_done();
    x.finish();
    x.host_calls()
}

fn tick(gw: &mut Gateway) {
    gw.attempt.tick(&FakeHost::new(&gw.world));
}

/// The webhook answers call `token` with `status` (0: no answer at all).
fn answer(gw: &mut Gateway, token: usize, status: u32) {
    let h = FakeHost::new(&gw.world);
    let n_headers = if status == 0 { 0 } else { 1 };
    *h.response_headers.borrow_mut() = vec![(":status".into(), status.to_string())];
    gw.attempt.on_call_response(&h, token as u32, n_headers, 0);
}

fn calls(gw: &Gateway) -> Vec<Call> {
    gw.world.calls.borrow().clone()
}

fn event(c: &Call) -> Value {
    serde_json::from_slice(&c.2).unwrap_or_else(|e| panic!("{e}"))
}

/// After a tick, the one call made so far: its event.
fn only_event(gw: &mut Gateway) -> Value {
    tick(gw);
    let all = calls(gw);
    assert_eq!(all.len(), 1, "{all:?}");
    event(&all[0])
}

#[test]
fn each_budget_threshold_is_posted_once_on_the_tick_not_on_the_request_path() {
    let mut gw = Gateway::new(&config(10));
    let mut thresholds = Vec::new();
    for i in 1..=7 {
        request(&gw, 200, ANSWER);
        let before = calls(&gw).len();
        tick(&mut gw);
        for token in before + 1..=calls(&gw).len() {
            thresholds.push((i, event(&calls(&gw)[token - 1])["threshold"].clone()));
            answer(&mut gw, token, 200);
        }
        gw.world.advance(10);
    }
    // Five requests' cost: the 3rd passes 50%, the 4th 80%, the 5th 100%.
    assert_eq!(thresholds, vec![(3, 0.5.into()), (4, 0.8.into()), (5, 1.into())]);
    let all = calls(&gw);
    let (cluster, headers, _) = &all[0];
    assert_eq!(cluster, "hooks");
    for (k, v) in [(":method", "POST"), (":path", "/events"), (":authority", "hooks"), ("x-hook-token", "hook-secret")]
    {
        assert!(headers.contains(&(k.to_string(), v.to_string())), "{k}: {headers:?}");
    }
    let first = event(&all[0]);
    assert_eq!(first["type"], "budget_threshold");
    assert_eq!(first["budget"], "daily");
    assert_eq!(first["spend"], "0.000675");
    assert_eq!(first["limit"], "0.001125");
    assert_eq!(first["window"], "day");
    assert_eq!(first["window_start"], "2026-01-01T00:00:00Z");
    assert!(first["timestamp_ms"].as_u64().is_some() && first.get("instance").is_some(), "{first}");
    assert_eq!((gw.world.counter(alerts::QUEUED), gw.world.counter(alerts::SENT)), (3, 3));
    assert_eq!(gw.world.counter(alerts::FAILED), 0);
}

#[test]
fn a_request_that_crosses_a_threshold_costs_no_more_host_calls_than_one_that_does_not() {
    let gw = Gateway::new(&config(10));
    request(&gw, 200, ANSWER);
    request(&gw, 200, ANSWER);
    gw.world.advance(5);
    let quiet = request(&gw, 200, ANSWER);
    assert!(calls(&gw).is_empty(), "nothing is dispatched from a request");
    gw.world.advance(5);
    // The 4th request crosses 80%.
    let crossing = request(&gw, 200, ANSWER);
    assert_eq!(crossing, quiet, "the alert is claimed in the settlement's own swap and queued in memory");
    assert!(calls(&gw).is_empty());
}

/// Three requests (50% crossed) and a tick: the event's first call.
fn fifty_percent_called(max_attempts: u32) -> Gateway {
    let mut gw = Gateway::new(&config(max_attempts));
    for _ in 0..3 {
        request(&gw, 200, ANSWER);
    }
    tick(&mut gw);
    assert_eq!(calls(&gw).len(), 1);
    gw
}

#[test]
fn a_webhook_that_fails_gets_the_event_again_after_a_backoff_and_once_delivered_never_again() {
    let mut gw = fifty_percent_called(10);
    answer(&mut gw, 1, 503);
    tick(&mut gw);
    assert_eq!(calls(&gw).len(), 1, "not before the backoff");
    gw.world.advance(999);
    tick(&mut gw);
    assert_eq!(calls(&gw).len(), 1);
    gw.world.advance(1);
    tick(&mut gw);
    assert_eq!(calls(&gw).len(), 2, "retried after 1 s");
    answer(&mut gw, 2, 0);
    gw.world.advance(1_999);
    tick(&mut gw);
    assert_eq!(calls(&gw).len(), 2, "the second retry waits 2 s");
    gw.world.advance(1);
    tick(&mut gw);
    assert_eq!(calls(&gw).len(), 3);
    answer(&mut gw, 3, 204);
    gw.world.advance(60_000);
    tick(&mut gw);
    assert_eq!(calls(&gw).len(), 3, "delivered once");
    let bodies: Vec<Value> = calls(&gw).iter().map(event).collect();
    assert!(bodies.iter().all(|b| *b == bodies[0]), "the same event each time");
    assert_eq!((gw.world.counter(alerts::FAILED), gw.world.counter(alerts::SENT)), (2, 1));
    // An answer to a call that is no longer in flight changes nothing.
    answer(&mut gw, 3, 200);
    assert_eq!(gw.world.counter(alerts::SENT), 1);
}

#[test]
fn an_event_is_dropped_and_counted_after_max_attempts() {
    let mut gw = fifty_percent_called(2);
    answer(&mut gw, 1, 500);
    gw.world.advance(1_000);
    tick(&mut gw);
    answer(&mut gw, 2, 500);
    gw.world.advance(60_000);
    tick(&mut gw);
    assert_eq!(calls(&gw).len(), 2);
    assert_eq!(gw.world.counter(alerts::DROPPED), 1);
}

#[test]
fn a_key_disabled_by_the_provider_raises_one_event_without_its_secret() {
    let mut gw = Gateway::new(&config(10));
    let invalid =
        r#"{"error":{"message":"Incorrect API key","type":"invalid_request_error","code":"invalid_api_key"}}"#;
    request(&gw, 401, invalid);
    let e = only_event(&mut gw);
    assert_eq!(
        (e["type"].as_str(), e["provider"].as_str(), e["key"].as_str()),
        (Some("key_disabled"), Some("openai"), Some("k1"))
    );
    let text = String::from_utf8_lossy(&calls(&gw)[0].2).to_string();
    assert!(!text.contains("sk-one") && !text.contains("sk-two"), "{text}");
    answer(&mut gw, 1, 200);
    tick(&mut gw);
    assert_eq!(calls(&gw).len(), 1, "one event per transition");
}

#[test]
fn a_key_exhausted_by_the_provider_raises_a_key_exhausted_event() {
    let mut gw = Gateway::new(&config(10));
    let quota = r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
    request(&gw, 429, quota);
    let e = only_event(&mut gw);
    assert_eq!((e["type"].as_str(), e["key"].as_str()), (Some("key_exhausted"), Some("k1")));
    assert_eq!(e["until"], "2026-01-02T00:00:00Z");
}

#[test]
fn a_key_whose_daily_token_quota_runs_out_raises_a_key_exhausted_event_once() {
    let cfg = config(10).replace(r#""secret":"sk-one"}"#, r#""secret":"sk-one","limits":{"daily_tokens":45}}"#);
    let mut gw = Gateway::new(&cfg.replace(r#",{"id":"k2","secret":"sk-two"}"#, ""));
    request(&gw, 200, ANSWER);
    tick(&mut gw);
    assert!(calls(&gw).is_empty(), "30 of 45 tokens");
    request(&gw, 200, ANSWER);
    let e = only_event(&mut gw);
    assert_eq!(
        (e["type"].as_str(), e["key"].as_str(), e["reason"].as_str()),
        (Some("key_exhausted"), Some("k1"), Some("daily_tokens"))
    );
    assert_eq!(e["until"], "2026-01-02T00:00:00Z");
}

// Fleet mode: a budget event is claimed in etcd before it is posted.

fn fleet_config() -> String {
    config(10).replace(r#""clients""#, r#""fleet":{"etcd_cluster":"etcd","prefix":"/p","instance":"gw-1"},"clients""#)
}

fn path(c: &Call) -> String {
    c.1.iter().find(|(k, _)| k == ":path").map(|(_, v)| v.clone()).unwrap_or_default()
}

/// The calls made so far to `at` (a path), with their tokens.
fn calls_to(gw: &Gateway, at: &str) -> Vec<(usize, Call)> {
    calls(gw).into_iter().enumerate().filter(|(_, c)| path(c) == at).map(|(i, c)| (i + 1, c)).collect()
}

/// etcd (or the webhook) answers call `token` with `status` and `body`.
fn answer_with(gw: &mut Gateway, token: usize, status: u32, body: &str) {
    let h = FakeHost::new(&gw.world);
    *h.response_headers.borrow_mut() = vec![(":status".into(), status.to_string())];
    *h.response_body.borrow_mut() = body.as_bytes().to_vec();
    gw.attempt.on_call_response(&h, token as u32, 1, body.len());
}

const CLAIMED: &str = r#"{"header":{"revision":"7"},"succeeded":true,"responses":[{"response_put":{}}]}"#;
/// A failed compare (proto3 JSON leaves `succeeded` out), with the claim
/// read in the same transaction: made by `instance`.
fn taken_by(instance: &str) -> String {
    let value = crate::encoding::base64_encode(format!(r#"{{"instance":"{instance}","at_ms":1}}"#).as_bytes());
    format!(
        r#"{{"header":{{"revision":"7"}},"responses":[{{"response_range":{{"kvs":[{{"key":"","value":"{value}"}}],"count":"1"}}}}]}}"#
    )
}

/// Three requests (50% crossed) and a tick: the claim in etcd is the call.
fn fifty_percent_claimed() -> Gateway {
    let mut gw = Gateway::new(&fleet_config());
    for _ in 0..3 {
        request(&gw, 200, ANSWER);
    }
    tick(&mut gw);
    gw
}

fn txn(c: &Call) -> Value {
    assert_eq!(c.0, "etcd");
    event(c)
}

fn b64(v: &Value) -> String {
    String::from_utf8(crate::encoding::base64_decode(v.as_str().unwrap_or_default()).unwrap_or_default())
        .unwrap_or_default()
}

#[test]
fn in_fleet_mode_a_budget_threshold_is_claimed_in_etcd_then_posted_once() {
    let mut gw = fifty_percent_claimed();
    assert!(calls_to(&gw, "/events").is_empty(), "not posted before it is claimed");
    let claims = calls_to(&gw, "/v3/kv/txn");
    assert_eq!(claims.len(), 1, "{:?}", calls(&gw));
    let t = txn(&claims[0].1);
    let key = "/p/~a/daily/00000001767225600000/0.5/0.001125";
    assert_eq!((b64(&t["compare"][0]["key"]), &t["compare"][0]["target"]), (key.to_string(), &Value::from("CREATE")));
    assert_eq!(t["compare"][0]["create_revision"], "0");
    let value: Value = serde_json::from_str(&b64(&t["success"][0]["requestPut"]["value"])).unwrap_or_default();
    assert_eq!(value["instance"], "gw-1");
    answer_with(&mut gw, claims[0].0, 200, CLAIMED);
    let posts = calls_to(&gw, "/events");
    assert_eq!(posts.len(), 1, "posted at once");
    assert_eq!((posts[0].1 .0.as_str(), &event(&posts[0].1)["threshold"]), ("hooks", &Value::from(0.5)));
    answer(&mut gw, posts[0].0, 200);
    gw.world.advance(60_000);
    tick(&mut gw);
    assert_eq!((calls_to(&gw, "/events").len(), calls_to(&gw, "/v3/kv/txn").len()), (1, 1));
    assert_eq!((gw.world.counter(alerts::SENT), gw.world.counter(alerts::CLAIMED_ELSEWHERE)), (1, 0));
}

#[test]
fn in_fleet_mode_a_threshold_another_instance_claimed_is_not_posted_and_counted() {
    let mut gw = fifty_percent_claimed();
    let claims = calls_to(&gw, "/v3/kv/txn");
    answer_with(&mut gw, claims[0].0, 200, &taken_by("gw-2"));
    gw.world.advance(60_000);
    tick(&mut gw);
    assert!(calls_to(&gw, "/events").is_empty());
    assert_eq!(calls_to(&gw, "/v3/kv/txn").len(), 1, "not claimed again");
    assert_eq!((gw.world.counter(alerts::CLAIMED_ELSEWHERE), gw.world.counter(alerts::SENT)), (1, 0));
    assert_eq!(gw.attempt.routing.borrow().alerts.len(), 0);
}

#[test]
fn in_fleet_mode_an_unreachable_etcd_delays_the_event_with_backoff_and_never_posts_it_unclaimed() {
    let mut gw = fifty_percent_claimed();
    let first = calls_to(&gw, "/v3/kv/txn");
    answer(&mut gw, first[0].0, 0);
    tick(&mut gw);
    assert_eq!(calls_to(&gw, "/v3/kv/txn").len(), 1, "not before the backoff");
    gw.world.advance(1_000);
    tick(&mut gw);
    let again = calls_to(&gw, "/v3/kv/txn");
    assert_eq!(again.len(), 2, "claimed again after 1 s");
    assert_eq!(txn(&again[1].1)["compare"], txn(&first[0].1)["compare"], "the same claim");
    answer_with(&mut gw, again[1].0, 503, "unavailable");
    gw.world.advance(2_000);
    tick(&mut gw);
    let third = calls_to(&gw, "/v3/kv/txn");
    assert_eq!(third.len(), 3);
    assert!(calls_to(&gw, "/events").is_empty(), "never posted unclaimed");
    assert_eq!(gw.world.counter(alerts::FAILED), 2);
    answer_with(&mut gw, third[2].0, 200, CLAIMED);
    assert_eq!(calls_to(&gw, "/events").len(), 1, "posted once etcd answers");
}

#[test]
fn in_fleet_mode_an_unclaimed_event_is_dropped_after_max_attempts() {
    let cfg = fleet_config().replace(r#""max_attempts":10"#, r#""max_attempts":2"#);
    let mut gw = Gateway::new(&cfg);
    for _ in 0..3 {
        request(&gw, 200, ANSWER);
    }
    tick(&mut gw);
    let t = calls_to(&gw, "/v3/kv/txn")[0].0;
    answer(&mut gw, t, 0);
    gw.world.advance(1_000);
    tick(&mut gw);
    let t = calls_to(&gw, "/v3/kv/txn")[1].0;
    answer(&mut gw, t, 0);
    gw.world.advance(60_000);
    tick(&mut gw);
    assert_eq!((calls_to(&gw, "/v3/kv/txn").len(), calls_to(&gw, "/events").len()), (2, 0));
    assert_eq!(gw.world.counter(alerts::DROPPED), 1);
}

#[test]
fn in_fleet_mode_a_claim_deletes_the_budgets_claims_of_earlier_windows_only() {
    let gw = fifty_percent_claimed();
    let t = txn(&calls_to(&gw, "/v3/kv/txn")[0].1);
    let delete = &t["success"][1]["requestDeleteRange"];
    let (from, to) = (b64(&delete["key"]), b64(&delete["range_end"]));
    assert_eq!((from.as_str(), to.as_str()), ("/p/~a/daily/", "/p/~a/daily/00000001767225600000"));
    let key = b64(&t["compare"][0]["key"]);
    let yesterday = "/p/~a/daily/00000001767139200000/1";
    assert!(from.as_str() <= yesterday && yesterday < to.as_str(), "an earlier window's claim is deleted");
    assert!(key.as_str() >= to.as_str(), "this window's are kept");
    assert!(!"/p/~a/dailyx/0".starts_with(&from), "another budget's are kept");
    // The sync's range read ends before `/p/~`: claims are not in it.
    let range: Value = serde_json::from_str(&crate::fleet::range_body("/p")).unwrap_or_default();
    assert!(key >= b64(&range["range_end"]));
}

#[test]
fn in_fleet_mode_a_claim_etcd_made_for_this_instance_before_its_answer_was_lost_is_posted() {
    let mut gw = fifty_percent_claimed();
    let first = calls_to(&gw, "/v3/kv/txn");
    // etcd created the key, but the answer never came.
    answer(&mut gw, first[0].0, 0);
    gw.world.advance(1_000);
    tick(&mut gw);
    let again = calls_to(&gw, "/v3/kv/txn");
    assert_eq!(txn(&again[1].1)["failure"][0]["requestRange"]["key"], txn(&first[0].1)["compare"][0]["key"]);
    answer_with(&mut gw, again[1].0, 200, &taken_by("gw-1"));
    assert_eq!(calls_to(&gw, "/events").len(), 1, "its own claim: posted");
    assert_eq!(gw.world.counter(alerts::CLAIMED_ELSEWHERE), 0);
}

#[test]
fn in_fleet_mode_with_etcd_auth_a_claim_carries_a_token_fetched_first_and_fetched_again_when_refused() {
    let cfg =
        fleet_config().replace(r#""instance":"gw-1""#, r#""instance":"gw-1","username":"gw","password_env":"PW""#);
    let world = super::fake::World::new(super::lifecycle_tests::NOW);
    let env = |n: &str| (n == "PW").then(|| "etcd-secret-pw".to_string());
    let root = |id: &str| {
        let h = FakeHost::new(&world);
        *h.plugin_config.borrow_mut() = cfg.as_bytes().to_vec();
        super::Root::configure(&h, id, &env, world.flights.clone(), 7).unwrap_or_else(|e| panic!("{e}"))
    };
    let (ingress, attempt) = (root("apikeyrouter_ingress"), root("apikeyrouter_attempt"));
    let mut gw = Gateway { world: world.clone(), ingress, attempt };
    for _ in 0..3 {
        request(&gw, 200, ANSWER);
    }
    tick(&mut gw);
    // The outbox's authentication is the tick's first call (the sync's follows).
    let (token, first) = calls_to(&gw, "/v3/auth/authenticate").remove(0);
    assert_eq!(
        (event(&first)["name"].as_str(), event(&first)["password"].as_str()),
        (Some("gw"), Some("etcd-secret-pw"))
    );
    answer_with(&mut gw, token, 200, r#"{"header":{"revision":"1"},"token":"tok.1"}"#);
    let claims = calls_to(&gw, "/v3/kv/txn");
    assert_eq!(claims.len(), 1, "the claim follows at once");
    assert!(claims[0].1 .1.contains(&("authorization".to_string(), "tok.1".to_string())));
    answer_with(&mut gw, claims[0].0, 401, r#"{"error":"etcdserver: invalid auth token","code":16}"#);
    let before = calls_to(&gw, "/v3/auth/authenticate").len();
    // Its second try (the authentication was the first): 2 s later.
    gw.world.advance(2_000);
    tick(&mut gw);
    let auths = calls_to(&gw, "/v3/auth/authenticate");
    assert_eq!(auths.len(), before + 1, "a refused token is fetched again");
    assert!(calls_to(&gw, "/events").is_empty());
    answer_with(&mut gw, auths[before].0, 200, r#"{"header":{"revision":"2"},"token":"tok.2"}"#);
    let claims = calls_to(&gw, "/v3/kv/txn");
    assert_eq!(claims.len(), 2);
    assert!(claims[1].1 .1.contains(&("authorization".to_string(), "tok.2".to_string())));
    answer_with(&mut gw, claims[1].0, 200, CLAIMED);
    assert_eq!(calls_to(&gw, "/events").len(), 1);
}
