//! Charging whole requests through both stages against the fake host: what
//! the budget is charged, what the access-log outcome and the decision
//! record say, and what the client's `tpm` counts, for each rule of
//! [`crate::charge`], including a reset after every callback of a stream.

use super::fake::{Exchange, FakeHost};
use super::host::{Map, Next};
use super::lifecycle_tests::{sha_hex, Gateway};
use crate::budget::show;
use crate::store::Store;
use rust_decimal::Decimal;
use serde_json::Value;

/// An OpenAI and an Anthropic provider; 0.001 an input and 0.002 an output
/// token (1000 and 2000 per million), dall-e-3 at 0.04 a request; unpriced
/// models refused; one roomy budget; client `alice` with a `tpm`.
fn config() -> String {
    format!(
        r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}}]}},
                          {{"id":"claude","kind":"anthropic","keys":[{{"id":"a1","secret":"sk-ant"}}]}}],
            "prices":{{"gpt-4o-mini":{{"input":"1000","output":"2000"}},"claude*":{{"input":"1000","output":"2000"}},
                       "tts-1":{{"input":"1000","output":"2000"}},"dall-e-3":{{"per_request":"0.04"}}}},
            "unknown_model":"refuse","estimate":{{"default_max_tokens":100}},"access_log_state":true,
            "budgets":[{{"id":"daily","limit":"100"}}],
            "clients":[{{"id":"alice","key_sha256":"{}","tpm":1000000,"allowed_endpoints":["*"]}}]}}"#,
        sha_hex("vk-alice")
    )
}

/// The cost of `input` and `output` tokens at the prices above.
fn cost(input: usize, output: u64) -> Decimal {
    Decimal::from(input as u64 * 1000 + output * 2000) / Decimal::from(1_000_000)
}

const STREAM: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
const SSE: (&str, &str) = ("content-type", "text/event-stream");
const JSON: (&str, &str) = ("content-type", "application/json");
type Header = (&'static str, &'static str);

/// The events of an OpenAI chat stream: 0, 10 and 5 characters of text, then
/// its usage (10 in, 20 out) and `[DONE]`.
const EVENTS: [&str; 5] = [
    "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
    "data: {\"choices\":[{\"delta\":{\"content\":\"Hello, wor\"}}]}\n\n",
    "data: {\"choices\":[{\"delta\":{\"content\":\"ld! \u{2713}\"}}]}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20,\"total_tokens\":30}}\n\n",
    "data: [DONE]\n\n",
];

/// Admitted and sent to the first attempt.
fn started(gw: &Gateway, method: &str, path: &str, body: &str) -> Exchange {
    let mut x = gw.request(method, path, body);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue, "{:?}", x.replied());
    assert_eq!(x.attempt(&gw.attempt), Next::Continue);
    x
}

/// The caller (or the provider) cuts the request: the attempt ends, then
/// the request is logged, with no end of response in between.
fn cut(x: &mut Exchange) {
    x.attempt_done();
    x.ingress.on_log(&x.downstream);
}

/// The access-log outcome the ingress stage left in filter state.
fn outcome(x: &Exchange) -> Value {
    let raw = x.downstream.filter_state.borrow().get("apikeyrouter").cloned().unwrap_or_default();
    serde_json::from_slice(&raw).unwrap_or_default()
}

fn client_tokens(gw: &Gateway) -> u64 {
    let cfg = gw.attempt.routing.borrow().config.clone();
    crate::identity::usage(&gw.world.store, &cfg.clients[0], gw.world.now_ms.get()).tokens
}

#[test]
fn a_stream_the_caller_leaves_is_charged_its_prompt_and_the_text_that_passed() {
    let mut gw = Gateway::new(&config());
    let mut x = started(&gw, "POST", "/v1/chat/completions", STREAM);
    x.upstream_headers(200, &[SSE], false);
    x.upstream_body(&[EVENTS[0].as_bytes(), EVENTS[1].as_bytes(), EVENTS[2].as_bytes()], false);
    cut(&mut x);
    // The prompt estimate (its bytes) and 15 characters: 4 output tokens.
    let charged = cost(STREAM.len(), 4);
    let b = gw.budget();
    assert_eq!((b.spent, b.reserved, b.requests), (charged, Decimal::ZERO, 1));
    assert!(charged < cost(STREAM.len(), 50), "below the reservation");
    let o = outcome(&x);
    assert_eq!((o["charged"].as_str(), o["cost"].as_str()), (Some("partial"), Some(&*show(charged))));
    assert_eq!((o["input_tokens"].as_u64(), o["output_tokens"].as_u64()), (Some(STREAM.len() as u64), Some(4)));
    assert_eq!(client_tokens(&gw), STREAM.len() as u64 + 4, "the client's tpm counts them");
    assert_eq!(gw.in_flight(), 0);
    gw.attempt.tick(&FakeHost::new(&gw.world));
    let slot = crate::shared_data::decision_slot(0, 0);
    let rec = gw.world.store.value(&slot).and_then(|b| crate::decision::Stored::decode(&b));
    assert_eq!(rec.and_then(|r| r.charged), Some(crate::charge::Basis::Partial));
}

/// Where Envoy may stop a stream: after each callback, it resets it: the
/// attempt's `on_done` and the request's `on_log`, in either order (a
/// caller's hang-up logs the request first). Every stop leaves nothing
/// reserved, charges exactly what the rules say for what passed, and the
/// access-log outcome says the same.
#[test]
fn a_reset_after_every_callback_of_a_stream_charges_exactly_the_documented_amount() {
    let prompt = STREAM.len();
    // (what has passed, its charge, how it was worked out)
    let expected: [(Decimal, Option<&str>); 11] = [
        (Decimal::ZERO, None),              // nothing yet
        (Decimal::ZERO, None),              // request headers
        (Decimal::ZERO, None),              // request body: reserved, then released
        (Decimal::ZERO, None),              // attempt chose a key
        (cost(prompt, 0), Some("partial")), // 200 headers passed: the prompt
        (cost(prompt, 0), Some("partial")), // no text yet
        (cost(prompt, 3), Some("partial")), // 10 characters
        (cost(prompt, 4), Some("partial")), // 15 characters
        (cost(10, 20), Some("partial")),    // the provider's usage, before the end
        (cost(10, 20), Some("usage")),      // the end: its usage
        (cost(10, 20), Some("usage")),      // the attempt ended
    ];
    for (stop, log_first) in (0..expected.len()).flat_map(|stop| [(stop, false), (stop, true)]) {
        let (charged, basis) = expected[stop];
        let at = format!("reset after step {stop}, logged {}", if log_first { "first" } else { "last" });
        let gw = Gateway::new(&config());
        let mut x = gw.request("POST", "/v1/chat/completions", STREAM);
        let mut running = false;
        for step in 1..=stop {
            match step {
                1 => drop(x.request_headers(false)),
                2 => drop(x.request_body()),
                3 => {
                    x.attempt(&gw.attempt);
                    running = true;
                }
                4 => drop(x.upstream_headers(200, &[SSE], false)),
                5..=8 => drop(x.upstream_body(&[EVENTS[step - 5].as_bytes()], false)),
                9 => drop(x.upstream_body(&[EVENTS[4].as_bytes()], true)),
                _ => {
                    x.attempt_done();
                    running = false;
                }
            }
        }
        if log_first {
            x.ingress.on_log(&x.downstream);
        }
        if running {
            x.attempt_done();
        }
        if !log_first {
            x.ingress.on_log(&x.downstream);
        }
        let b = gw.budget();
        assert_eq!((b.spent, b.reserved), (charged, Decimal::ZERO), "{at}");
        let o = outcome(&x);
        assert_eq!(o["charged"].as_str(), basis, "{at}");
        assert_eq!(o["cost"].as_str().map(String::from), basis.map(|_| show(charged)), "{at}");
        assert_eq!(gw.in_flight(), 0, "{at}");
    }
}

#[test]
fn an_anthropic_stream_cut_short_takes_its_input_from_message_start() {
    let gw = Gateway::new(&config());
    let body =
        r#"{"model":"claude-3-haiku","max_tokens":50,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut x = started(&gw, "POST", "/v1/messages", body);
    x.upstream_headers(200, &[SSE], false);
    x.upstream_body(
        &[
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi there\"}}\n\n",
        ],
        false,
    );
    cut(&mut x);
    // 25 input tokens from the provider; 8 characters: 2 output tokens.
    assert_eq!(gw.budget().spent, cost(25, 2));
}

#[test]
fn a_json_answer_cut_after_its_headers_passed_is_charged_its_reservation() {
    let gw = Gateway::new(&config());
    let body = r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[]}"#;
    let mut x = started(&gw, "POST", "/v1/chat/completions", body);
    // Too large to hold: its headers and first bytes reach the caller.
    x.upstream_headers(200, &[JSON, ("content-length", "20000000")], false);
    x.upstream_body(&[br#"{"id":"c1","choices":[{"message":{"content":"xxxx"#], false);
    cut(&mut x);
    assert_eq!(gw.budget().spent, cost(body.len(), 50));
    assert_eq!(outcome(&x)["charged"], "partial");
}

#[test]
fn a_held_json_answer_cut_short_reached_no_one_and_only_its_retry_is_charged() {
    let gw = Gateway::new(&config());
    let body = r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[]}"#;
    let mut x = started(&gw, "POST", "/v1/chat/completions", body);
    // A priced JSON answer's headers wait for its usage; the reset comes first.
    assert_eq!(x.upstream_headers(200, &[JSON], false), Next::Pause);
    x.upstream_body(&[br#"{"id":"c1","choi"#], false);
    x.attempt_done();
    assert_eq!(gw.budget().spent, Decimal::ZERO);
    x.attempt(&gw.attempt);
    x.upstream_headers(200, &[JSON], false);
    x.upstream_body(&[br#"{"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#], true);
    x.attempt_done();
    x.finish();
    assert_eq!(gw.budget().spent, cost(10, 20));
}

#[test]
fn a_whole_answer_without_usage_is_charged_its_reservation() {
    let gw = Gateway::new(&config());
    // (path, request body, the answer's content type, the answer)
    let cases: [(&str, &str, Header, &[u8]); 3] = [
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[]}"#,
            JSON,
            br#"{"id":"c1","choices":[{"message":{"content":"no usage here"}}]}"#,
        ),
        (
            "/v1/audio/speech",
            r#"{"model":"tts-1","input":"Hello","voice":"alloy"}"#,
            ("content-type", "audio/mpeg"),
            b"ID3\x04\0\0",
        ),
        (
            "/v1/chat/completions",
            STREAM,
            SSE,
            b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n",
        ),
    ];
    let mut total = Decimal::ZERO;
    for (path, body, content_type, answer) in cases {
        let mut x = started(&gw, "POST", path, body);
        x.upstream_headers(200, &[content_type], false);
        x.upstream_body(&[answer], true);
        x.attempt_done();
        x.finish();
        let output = if body.contains("max_tokens") { 50 } else { 100 };
        let reservation = cost(body.len(), output);
        total += reservation;
        assert_eq!(gw.budget().spent, total, "{path}");
        let o = outcome(&x);
        assert_eq!((o["charged"].as_str(), o["cost"].as_str()), (Some("reservation"), Some(&*show(reservation))));
        if content_type == JSON {
            let cost_header = x.attempts[0].1.get(Map::ResponseHeaders, "x-apikeyrouter-cost");
            assert_eq!(cost_header, Some(show(reservation)));
        }
    }
    assert_eq!(gw.budget().reserved, Decimal::ZERO);
}

#[test]
fn a_model_priced_per_request_is_admitted_and_charged_exactly_its_price() {
    let gw = Gateway::new(&config());
    for n in 1..=3 {
        let mut x = started(&gw, "POST", "/v1/images/generations", r#"{"model":"dall-e-3","prompt":"a cat"}"#);
        x.upstream_headers(200, &[JSON], false);
        x.upstream_body(&[br#"{"created":1,"data":[{"url":"https://example.com/cat.png"}]}"#], true);
        x.attempt_done();
        x.finish();
        assert_eq!(gw.budget().spent, Decimal::new(4 * n, 2));
        let o = outcome(&x);
        assert_eq!((o["charged"].as_str(), o["cost"].as_str()), (Some("per_request"), Some("0.04")));
    }
    // Even a 2xx cut short costs one request.
    let mut x = started(&gw, "POST", "/v1/images/generations", r#"{"model":"dall-e-3","prompt":"a dog"}"#);
    x.upstream_headers(200, &[JSON, ("content-length", "20000000")], false);
    cut(&mut x);
    assert_eq!(gw.budget().spent, Decimal::new(16, 2));
}

#[test]
fn a_background_response_is_charged_at_creation_and_its_polls_are_not() {
    let gw = Gateway::new(&config());
    let create = r#"{"model":"gpt-4o-mini","background":true,"input":"Write a poem."}"#;
    let mut x = started(&gw, "POST", "/v1/responses", create);
    x.upstream_headers(200, &[JSON], false);
    x.upstream_body(&[br#"{"id":"resp_1","object":"response","status":"queued","usage":null}"#], true);
    x.attempt_done();
    x.finish();
    let reservation = cost(create.len(), 100);
    assert_eq!(gw.budget().spent, reservation);
    assert_eq!(outcome(&x)["charged"], "reservation");
    let tokens = client_tokens(&gw);
    for status in ["in_progress", "completed"] {
        let mut poll = gw.request("GET", "/v1/responses/resp_1", "");
        assert_eq!(poll.send_request(usize::MAX, false), Next::Continue);
        poll.attempt(&gw.attempt);
        poll.upstream_headers(200, &[JSON], false);
        let answer = format!(
            r#"{{"id":"resp_1","status":"{status}","usage":{{"input_tokens":9,"output_tokens":70,"total_tokens":79}}}}"#
        );
        poll.upstream_body(&[answer.as_bytes()], true);
        poll.attempt_done();
        poll.finish();
        let o = outcome(&poll);
        assert_eq!((o["charged"].as_str(), o["cost"].as_str()), (None, None), "{o}");
    }
    let b = gw.budget();
    assert_eq!((b.spent, b.requests, b.reserved), (reservation, 1, Decimal::ZERO), "polls are not charged again");
    assert_eq!(client_tokens(&gw), tokens);
}

#[test]
fn usage_is_counted_by_the_price_table_entry_of_its_model_and_unpriced_models_as_other() {
    let gw = Gateway::new(&config().replace(r#""unknown_model":"refuse""#, r#""unknown_model":"zero""#));
    let answer = r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30,
        "prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":6}}}"#;
    let serve = |model: &str| {
        let body = format!(r#"{{"model":"{model}","max_tokens":50,"messages":[{{"role":"user","content":"hi"}}]}}"#);
        let mut x = started(&gw, "POST", "/v1/chat/completions", &body);
        x.upstream_headers(200, &[JSON], false);
        x.upstream_body(&[answer.as_bytes()], true);
        x.attempt_done();
        x.finish();
        (outcome(&x), body.len() as u64)
    };
    let (o, prompt) = serve("gpt-4o-mini");
    serve("gpt-4o-mini");
    serve("o9-unpriced");
    let c = |name: &str| gw.world.counter(&format!("apikeyrouter.model.{name}"));
    assert_eq!((c("gpt-4o-mini.requests"), c("gpt-4o-mini.input_tokens"), c("gpt-4o-mini.output_tokens")), (2, 20, 40));
    assert_eq!(c("gpt-4o-mini.spend_micros"), 2 * crate::metrics::micros(cost(10, 20)));
    assert_eq!((c("other.requests"), c("other.input_tokens"), c("other.spend_micros")), (1, 10, 0));
    assert!(
        gw.world.counters.borrow().keys().filter(|k| k.starts_with("apikeyrouter.model.")).all(|k| !k.contains("o9")),
        "an unpriced model's name never makes a metric"
    );
    // The access-log outcome: the model, the tokens of each kind and the
    // admission's estimate (the prompt's bytes and max_tokens, priced).
    assert_eq!(o["model"], "gpt-4o-mini");
    assert_eq!((o["cached_input_tokens"].as_u64(), o["reasoning_tokens"].as_u64()), (Some(4), Some(6)));
    assert_eq!((o["estimated_input_tokens"].as_u64(), o["estimated_output_tokens"].as_u64()), (Some(prompt), Some(50)));
    assert_eq!(o["estimate"].as_str(), Some(&*show(cost(prompt as usize, 50))));
}
