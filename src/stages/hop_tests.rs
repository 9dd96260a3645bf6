//! A request's hops to the next provider (issue 20), with Envoy's internal
//! redirect simulated on the fake host (a new ingress context over the
//! header map the attempts left, `:path`/`:authority` from `location`,
//! `x-envoy-original-url`, the same request-span filter state, the buffered
//! body): money moves and ends once on every path, a caller that leaves
//! mid-redirect holds nothing, probes, forms and caps follow the hop. Written
//! by an attacker-minded review; each guarded a bug found there.

use super::fake::{Exchange, FakeHost};
use super::host::{Map, Next};
use super::lifecycle_tests::{sha_hex, Gateway};
use super::Request;
use crate::budget;
use rust_decimal::Decimal;

fn cfg(extra: &str) -> String {
    format!(
        r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one","headers":{{"anthropic-beta":"org-secret-beta"}}}},{{"id":"k2","secret":"sk-two"}}]}},
              {{"id":"az","kind":"azure","keys":[{{"id":"z1","secret":"az-one"}}]}}],
            "models":{{"gpt-4o":[{{"provider":"openai"}},{{"provider":"az","model":"gpt4o-prod"}}]}},
            "prices":{{"gpt-4o":{{"input":"2.50","output":"10"}}}},
            "budgets":[{{"id":"daily","limit":"1.00"}}],
            "clients":[{{"id":"alice","key_sha256":"{}"}}]{extra}}}"#,
        sha_hex("vk-alice")
    )
}

const BODY: &str = r#"{"model":"gpt-4o","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
const ANSWER: &str =
    r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;

fn first_pass(gw: &Gateway) -> Exchange {
    let mut x = Exchange::new(
        &gw.world,
        &gw.ingress,
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":authority", "gw.example"),
            ("content-type", "application/json"),
            ("authorization", "Bearer vk-alice"),
            ("x-request-id", "req-1"),
        ],
        BODY.as_bytes(),
    );
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue, "{:?}", x.replied());
    x
}

/// Envoy follows the last attempt's 307: the first pass is logged, the
/// stream recreated with the headers as the filters left them.
fn follow(gw: &Gateway, x: &mut Exchange) -> Exchange {
    let (_, up) = x.attempts.last().unwrap_or_else(|| panic!("no attempt"));
    assert_eq!(up.get(Map::ResponseHeaders, ":status").as_deref(), Some("307"));
    let location = up.get(Map::ResponseHeaders, "location").unwrap_or_else(|| panic!("no location"));
    let rest = location.strip_prefix("http://").unwrap_or_else(|| panic!("{location}"));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut headers = up.request_headers.borrow().clone();
    let old_path = headers.iter().find(|(k, _)| k == ":path").map(|(_, v)| v.clone()).unwrap_or_default();
    headers.retain(|(k, _)| k != ":path" && k != ":authority");
    headers.push((":path".into(), path.into()));
    headers.push((":authority".into(), authority.into()));
    headers.push(("x-envoy-original-url".into(), format!("http://api.openai.com{old_path}")));
    let body = up.request_body.borrow().clone();
    // recreateStream: doEndStream logs the first pass first.
    x.ingress.on_log(x.downstream.callback());
    let Some(Request::Ingress(i)) = gw.ingress.request(2) else { panic!() };
    let mut down = FakeHost::new(&gw.world);
    down.filter_state = x.downstream.filter_state.clone();
    *down.request_headers.borrow_mut() = headers;
    *down.request_body.borrow_mut() = body;
    Exchange { world: gw.world.clone(), ingress: i, downstream: down, attempts: Vec::new() }
}

fn reserved(gw: &Gateway) -> Decimal {
    let cfg = gw.attempt.routing.borrow().config.clone();
    budget::load(&gw.world.store, &cfg.budgets[0], gw.world.now_ms.get()).reserved
}

#[test]
fn baseline_a_fall_over_moves_the_reservation_and_charges_once() {
    let gw = Gateway::new(&cfg(""));
    let mut x = first_pass(&gw);
    for _ in 0..2 {
        x.attempt(&gw.attempt);
        x.upstream_headers(429, &[("retry-after", "60")], true);
        x.attempt_done();
    }
    let mut hop = follow(&gw, &mut x);
    assert_eq!(hop.send_request(usize::MAX, false), Next::Continue, "{:?}", hop.replied());
    assert!(reserved(&gw) > Decimal::ZERO);
    hop.attempt(&gw.attempt);
    let up = &hop.attempts[0].1;
    assert_eq!(up.get(Map::RequestHeaders, "api-key").as_deref(), Some("az-one"));
    assert_eq!(up.get(Map::RequestHeaders, "authorization"), None);
    assert_eq!(up.get(Map::RequestHeaders, "anthropic-beta"), None, "k1's own header");
    hop.upstream_headers(200, &[("content-type", "application/json")], false);
    hop.upstream_body(&[ANSWER.as_bytes()], true);
    hop.attempt_done();
    hop.finish();
    let b = gw.budget();
    assert_eq!((b.spent, b.reserved), (Decimal::new(225, 6), Decimal::ZERO));
    assert_eq!(gw.in_flight(), 0);
}

/// k1 answers 429 while k2 is still untried: the answer carries both the
/// retry header and the 307 (pending). Envoy schedules a retry (back-off);
/// the caller hangs up before it starts. Envoy ends the attempt and logs
/// the request: nothing may stay reserved.
#[test]
fn caller_hangs_up_during_the_retry_back_off_of_a_redirect_marked_answer() {
    let mut gw = Gateway::new(&cfg(""));
    let mut x = first_pass(&gw);
    x.attempt(&gw.attempt);
    x.upstream_headers(429, &[("retry-after", "60")], true);
    let up = &x.attempts[0].1;
    assert_eq!(up.get(Map::ResponseHeaders, "x-apikeyrouter-retry").as_deref(), Some("another-key"));
    assert_eq!(up.get(Map::ResponseHeaders, ":status").as_deref(), Some("307"));
    x.attempt_done();
    // Downstream reset: only on_log.
    x.ingress.on_log(x.downstream.callback());
    // Released on the ingress stage's next tick.
    gw.ingress_tick();
    assert_eq!(gw.in_flight(), 0, "flight leaked");
    assert_eq!(reserved(&gw), Decimal::ZERO, "reservation held until its TTL");
}

/// The first key answers a bad-key 401 (disabled); past its probe time, a
/// new request (not yet sent) without a client.
fn after_the_probe_time_of_a_bad_key(gw: &Gateway) -> Exchange {
    let headers = [(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json")];
    let mut x = Exchange::new(&gw.world, &gw.ingress, &headers, BODY.as_bytes());
    x.send_request(usize::MAX, false);
    x.attempt(&gw.attempt);
    x.upstream_headers(401, &[("content-type", "application/json")], false);
    x.upstream_body(&[br#"{"error":{"message":"Incorrect API key provided.","code":"invalid_api_key"}}"#], true);
    x.attempt_done();
    x.finish();
    gw.world.advance(601_000);
    Exchange::new(&gw.world, &gw.ingress, &headers, BODY.as_bytes())
}

/// A provider whose only key was disabled (bad key) and is now due for its
/// half-open probe: without a budget of its own the next request probes it;
/// with one (plenty of room) the ingress stage must not pass it over.
#[test]
fn a_key_due_for_its_probe_with_a_budget_of_its_own_is_not_passed_over() {
    for with_budget in [false, true] {
        let budgets =
            if with_budget { r#","budgets":[{"id":"k1-cap","limit":"100","scope":{"key":"k1"}}]"# } else { "" };
        let conf = format!(
            r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}}]}},
                  {{"id":"az","kind":"azure","keys":[{{"id":"z1","secret":"az-one"}}]}}],
                "models":{{"gpt-4o":[{{"provider":"openai"}},{{"provider":"az","model":"gpt4o-prod"}}]}},
                "prices":{{"gpt-4o":{{"input":"2.50","output":"10"}}}}{budgets}}}"#
        );
        let gw = Gateway::new(&conf);
        let mut y = after_the_probe_time_of_a_bad_key(&gw);
        assert_eq!(y.send_request(usize::MAX, false), Next::Continue, "{:?}", y.replied());
        assert_eq!(
            y.downstream.get(Map::RequestHeaders, "x-apikeyrouter-provider").as_deref(),
            Some("openai"),
            "with a key budget: {with_budget}"
        );
    }
}

/// Same, single provider: the request goes on to probe the key (it was
/// refused for an hour, "at its own budget's limit", with the budget empty).
#[test]
fn a_single_provider_key_due_for_its_probe_with_a_budget_is_refused_for_an_hour() {
    let conf = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"sk-one"}]}],
        "prices":{"gpt-4o":{"input":"2.50","output":"10"}},
        "budgets":[{"id":"k1-cap","limit":"100","scope":{"key":"k1"}}]}"#;
    let gw = Gateway::new(conf);
    let mut y = after_the_probe_time_of_a_bad_key(&gw);
    y.send_request(usize::MAX, false);
    assert_eq!(y.replied().map(|r| (r.status, r.headers)), None);
}

/// The operator lists only OpenAI for gpt-4o; a third-party OpenAI-compatible
/// provider serves another model. A request for a model no `models` entry
/// names, or a `GET` of a stored object (no model), falls over to it anyway.
#[test]
fn a_request_outside_any_models_entry_falls_over_to_any_provider_of_its_shape() {
    let conf = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"sk-one"}]},
          {"id":"thirdparty","kind":"openai_compatible","keys":[{"id":"t1","secret":"tp-one"}]}],
        "models":{"gpt-4o":[{"provider":"openai"}],"llama-3":[{"provider":"thirdparty"}]}}"#;
    let mut fell = Vec::new();
    for (method, path, body) in [
        ("POST", "/v1/chat/completions", r#"{"model":"gpt-4o-mini","messages":[]}"#),
        ("GET", "/v1/files/file-abc123/content", ""),
        ("DELETE", "/v1/files/file-abc123", ""),
    ] {
        let gw = Gateway::new(conf);
        let headers =
            [(":method", method), (":path", path), (":authority", "gw"), ("content-type", "application/json")];
        let mut x = Exchange::new(&gw.world, &gw.ingress, &headers, body.as_bytes());
        assert_eq!(x.send_request(usize::MAX, false), Next::Continue, "{:?}", x.replied());
        x.attempt(&gw.attempt);
        x.upstream_headers(429, &[("retry-after", "60")], true);
        x.attempt_done();
        let up = &x.attempts[0].1;
        if up.get(Map::ResponseHeaders, ":status").as_deref() == Some("307") {
            let mut hop = follow(&gw, &mut x);
            hop.send_request(usize::MAX, false);
            hop.attempt(&gw.attempt);
            let up = &hop.attempts[0].1;
            fell.push(format!(
                "{method} {path} -> {:?} {:?}",
                up.get(Map::RequestHeaders, ":path"),
                up.get(Map::RequestHeaders, "authorization")
            ));
        }
    }
    assert!(fell.is_empty(), "{fell:#?}");
}

/// Three providers; Envoy follows the first redirect, refuses the second
/// (max_internal_redirects spent): the caller gets azure's 429 as it was,
/// nothing stays reserved, nothing is charged.
#[test]
fn a_redirect_envoy_does_not_follow_on_a_hop_is_restored_and_released() {
    let conf = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"sk-one"}]},
          {"id":"az","kind":"azure","keys":[{"id":"z1","secret":"az-one"}]},
          {"id":"third","kind":"openai_compatible","keys":[{"id":"t1","secret":"tp-one"}]}],
        "models":{"gpt-4o":[{"provider":"openai"},{"provider":"az","model":"gpt4o-prod"},{"provider":"third"}]},
        "prices":{"gpt-4o":{"input":"2.50","output":"10"}},
        "budgets":[{"id":"daily","limit":"1.00"}]}"#;
    let gw = Gateway::new(conf);
    let headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "gw"),
        ("content-type", "application/json"),
    ];
    let mut x = Exchange::new(&gw.world, &gw.ingress, &headers, BODY.as_bytes());
    x.send_request(usize::MAX, false);
    x.attempt(&gw.attempt);
    x.upstream_headers(429, &[("retry-after", "60")], true);
    x.attempt_done();
    let mut hop = follow(&gw, &mut x);
    assert_eq!(hop.send_request(usize::MAX, false), Next::Continue, "{:?}", hop.replied());
    hop.attempt(&gw.attempt);
    hop.upstream_headers(429, &[("retry-after", "60")], true);
    hop.attempt_done();
    assert_eq!(hop.attempts[0].1.get(Map::ResponseHeaders, ":status").as_deref(), Some("307"));
    hop.finish();
    let sent = hop.downstream.response_headers.borrow().clone();
    assert!(sent.contains(&(":status".into(), "429".into())), "{sent:?}");
    assert!(!sent.iter().any(|(k, _)| k == "location" || k == "x-apikeyrouter-fallover"), "{sent:?}");
    assert_eq!((gw.budget().reserved, gw.budget().spent), (Decimal::ZERO, Decimal::ZERO));
    assert_eq!(gw.in_flight(), 0);
}

fn hop_once(gw: &Gateway) -> (Exchange, Exchange) {
    let mut x = first_pass(gw);
    for _ in 0..2 {
        x.attempt(&gw.attempt);
        x.upstream_headers(429, &[("retry-after", "60")], true);
        x.attempt_done();
    }
    let mut hop = follow(gw, &mut x);
    hop.send_request(usize::MAX, false);
    (x, hop)
}

#[test]
fn a_hop_is_charged_at_the_serving_keys_price_and_rpm_counts_once() {
    let conf = cfg("")
        .replace(r#""secret":"az-one""#, r#""secret":"az-one","price_multiplier":"2""#)
        .replace(r#""key_sha256""#, r#""rpm":1,"key_sha256""#);
    let gw = Gateway::new(&conf);
    let (_x, mut hop) = hop_once(&gw);
    assert_eq!(hop.replied(), None);
    hop.attempt(&gw.attempt);
    hop.upstream_headers(200, &[("content-type", "application/json")], false);
    hop.upstream_body(&[ANSWER.as_bytes()], true);
    hop.attempt_done();
    hop.finish();
    assert_eq!((gw.budget().spent, gw.budget().reserved), (Decimal::new(450, 6), Decimal::ZERO));
}

#[test]
fn a_hop_refused_by_a_hard_budget_at_the_new_price_leaves_nothing_reserved() {
    // Azure's provider budget has no room: the hop is refused.
    let conf = cfg(r#","unused":0"#)
        .replace(
            r#""budgets":[{"id":"daily","limit":"1.00"}]"#,
            r#""budgets":[{"id":"daily","limit":"1.00"},{"id":"az-cap","limit":"0.000001","scope":{"provider":"az"}}]"#,
        )
        .replace(r#","unused":0"#, "");
    let gw = Gateway::new(&conf);
    let (_x, mut hop) = hop_once(&gw);
    assert_eq!(hop.replied().map(|r| r.status), Some(429));
    hop.finish();
    assert_eq!((gw.budget().spent, gw.budget().reserved), (Decimal::ZERO, Decimal::ZERO));
    assert_eq!(gw.in_flight(), 0);
}

/// Azure's only key is disabled and due for its half-open probe: the attempt
/// stage marks the fall-over (keys::check counts a due probe), the hop goes to
/// Azure, and its first attempt does not probe (the request has tried keys,
/// of another provider): the caller gets the attempt's own 429.
#[test]
fn a_hop_to_a_provider_whose_key_is_due_for_its_probe_probes_it() {
    let conf = cfg("")
        .replace(r#""models":{"#, r#""models":{"az-only":[{"provider":"az","model":"gpt4o-prod"}],"#)
        .replace(r#""prices":{"#, r#""prices":{"az-only":{"input":"1","output":"1"},"#);
    let gw = Gateway::new(&conf);
    let headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("authorization", "Bearer vk-alice"),
    ];
    let mut d = Exchange::new(&gw.world, &gw.ingress, &headers, br#"{"model":"az-only","messages":[]}"#);
    assert_eq!(d.send_request(usize::MAX, false), Next::Continue, "{:?}", d.replied());
    d.attempt(&gw.attempt);
    d.upstream_headers(401, &[("content-type", "application/json")], false);
    d.upstream_body(&[br#"{"error":{"message":"Access denied due to invalid subscription key.","code":"401"}}"#], true);
    d.attempt_done();
    d.finish();
    assert_eq!(gw.key_state(2), crate::key_record::Effective::Disabled);
    gw.world.advance(601_000);
    let (_x, mut hop) = hop_once(&gw);
    assert_eq!(hop.replied(), None);
    assert_eq!(hop.attempt(&gw.attempt), Next::Continue, "{:?}", hop.attempts[0].1.sent.borrow());
}

/// Envoy destroys the first pass's upstream request after the hop began
/// (deferred delete): its on_done comes after the hop was admitted.
#[test]
fn the_first_passes_attempt_ending_after_the_hop_was_admitted_changes_nothing() {
    let gw = Gateway::new(&cfg(""));
    let mut x = first_pass(&gw);
    x.attempt(&gw.attempt);
    x.upstream_headers(429, &[("retry-after", "60")], true);
    x.attempt_done();
    x.attempt(&gw.attempt);
    x.upstream_headers(429, &[("retry-after", "60")], true);
    let mut hop = follow(&gw, &mut x);
    hop.send_request(usize::MAX, false);
    hop.attempt(&gw.attempt);
    x.attempt_done();
    x.ingress.on_log(x.downstream.callback());
    hop.upstream_headers(200, &[("content-type", "application/json")], false);
    hop.upstream_body(&[ANSWER.as_bytes()], true);
    hop.attempt_done();
    hop.finish();
    assert_eq!((gw.budget().spent, gw.budget().reserved), (Decimal::new(225, 6), Decimal::ZERO));
    assert_eq!(gw.in_flight(), 0);
}

/// The caller hangs up after the hop was admitted, while its attempt runs.
#[test]
fn the_caller_hanging_up_during_the_hops_attempt_releases_once() {
    let gw = Gateway::new(&cfg(""));
    let (_x, mut hop) = hop_once(&gw);
    hop.attempt(&gw.attempt);
    hop.ingress.on_log(hop.downstream.callback());
    hop.attempt_done();
    assert_eq!((gw.budget().spent, gw.budget().reserved), (Decimal::ZERO, Decimal::ZERO));
    assert_eq!(gw.in_flight(), 0);
}

/// Client policy max_tokens 64, the caller sets none. OpenAI gets the cap
/// as `max_completion_tokens`; after a fall-over to an OpenAI-compatible
/// provider (whose dialect field is `max_tokens`, per providers::cap_field)
/// the body must carry the cap in that provider's field.
#[test]
fn a_policy_cap_is_written_in_the_next_providers_dialect_after_a_hop() {
    let conf = format!(
        r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}}]}},
              {{"id":"third","kind":"openai_compatible","keys":[{{"id":"t1","secret":"tp-one"}}]}}],
            "models":{{"gpt-4o":[{{"provider":"openai"}},{{"provider":"third","model":"llama-3"}}]}},
            "prices":{{"gpt-4o":{{"input":"2.50","output":"10"}}}},
            "clients":[{{"id":"alice","key_sha256":"{}","max_tokens":64}}]}}"#,
        sha_hex("vk-alice")
    );
    let gw = Gateway::new(&conf);
    let mut x = Exchange::new(
        &gw.world,
        &gw.ingress,
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":authority", "gw"),
            ("content-type", "application/json"),
            ("authorization", "Bearer vk-alice"),
        ],
        br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue, "{:?}", x.replied());
    let first: serde_json::Value = serde_json::from_slice(&x.downstream.request_body.borrow()).unwrap_or_default();
    assert_eq!(first["max_completion_tokens"], 64);
    x.attempt(&gw.attempt);
    x.upstream_headers(429, &[("retry-after", "60")], true);
    x.attempt_done();
    let mut hop = follow(&gw, &mut x);
    assert_eq!(hop.send_request(usize::MAX, false), Next::Continue, "{:?}", hop.replied());
    let sent: serde_json::Value = serde_json::from_slice(&hop.downstream.request_body.borrow()).unwrap_or_default();
    assert_eq!(sent["max_tokens"], 64, "{sent}");
}

/// An audio transcription (multipart form) falls over from OpenAI to Azure.
/// The hop never reads its content type: the form is unreadable there.
#[test]
fn a_multipart_request_falls_over_with_its_form_read() {
    let conf = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"sk-one"}]},
          {"id":"az","kind":"azure","keys":[{"id":"z1","secret":"az-one"}]}],
        "models":{"whisper-1":[{"provider":"openai"},{"provider":"az","model":"whisper-prod"}]},
        "prices":{"whisper-1":{"input":"1","output":"1"}},
        "budgets":[{"id":"daily","limit":"1.00"}]}"#;
    let gw = Gateway::new(conf);
    let b = "XyZ";
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\r\n--{b}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={b}");
    let headers = [
        (":method", "POST"),
        (":path", "/v1/audio/transcriptions"),
        (":authority", "gw"),
        ("content-type", ct.as_str()),
    ];
    let mut x = Exchange::new(&gw.world, &gw.ingress, &headers, body.as_bytes());
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue, "{:?}", x.replied());
    x.attempt(&gw.attempt);
    x.upstream_headers(429, &[("retry-after", "60")], true);
    x.attempt_done();
    let mut hop = follow(&gw, &mut x);
    hop.send_request(usize::MAX, false);
    assert_eq!(hop.replied().map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned())), None);
}

/// Both OpenAI keys cool for 60 s; Azure's key budget has no room. The
/// caller's retry-after should be the soonest the chain frees up (60 s).
#[test]
fn the_chains_retry_after_is_when_a_provider_frees_up() {
    let conf = cfg("").replace(
        r#""budgets":[{"id":"daily","limit":"1.00"}]"#,
        r#""budgets":[{"id":"daily","limit":"1.00"},{"id":"z1-cap","limit":"0.000001","scope":{"key":"z1"}}]"#,
    );
    let gw = Gateway::new(&conf);
    let (_x, mut hop) = hop_once(&gw);
    // Azure is the only provider left: its attempt answers why.
    assert_eq!(hop.replied(), None);
    hop.attempt(&gw.attempt);
    let r = hop.attempts[0].1.sent.borrow().clone().unwrap_or_else(|| panic!("not refused"));
    let ra = r.headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.clone());
    assert_eq!((r.status, ra.as_deref()), (429, Some("60")));
}
