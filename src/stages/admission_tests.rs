//! Every request is admitted (issue 16): whole requests through the fake
//! host for each way a request names its model (a JSON body under any
//! content type, a multipart form, an Azure deployment path, a Gemini
//! model path) and for the estimate's upper bound (`n`, every dialect's
//! output cap, a policy's cap written into the body). Each checks what the
//! caller got, what the provider would receive and what the budget holds.

use super::fake::Exchange;
use super::host::{Map, Next};
use super::lifecycle_tests::{sha_hex, Gateway};
use crate::budget;
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// OpenAI, an Azure provider with two deployments and native Gemini; prices
/// per million tokens; a hard daily budget of `limit`; output estimated at
/// 100 tokens when nothing caps it; client `alice` (key `vk-alice`) allowed
/// gpt-4o-mini, gemini-2.0-flash and whisper-1, with `max_tokens` 64 and
/// the alias `mini` for gpt-4o-mini.
fn config(limit: &str, extra: &str) -> String {
    format!(
        r#"{{"providers":[
              {{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}}]}},
              {{"id":"az","kind":"azure","deployments":{{"mini-prod":"gpt-4o-mini","big-prod":"gpt-4o"}},
                "keys":[{{"id":"z1","secret":"az-one"}}]}},
              {{"id":"gem","kind":"gemini","keys":[{{"id":"g1","secret":"gm-one"}}]}}],
            "prices":{{"gpt-4o-mini":{{"input":"1000","output":"2000"}},"gpt-4o":{{"input":"2.50","output":"10"}},
                       "gemini-2.0-flash":{{"input":"100","output":"400"}},"whisper-1":{{"input":"10","output":"20"}}}},
            "estimate":{{"default_max_tokens":100}},
            "budgets":[{{"id":"daily","limit":"{limit}"}}],
            "clients":[{{"id":"alice","key_sha256":"{}","allowed_models":["gpt-4o-mini","gemini-2.0-flash","whisper-1"],
                         "max_tokens":64,"model_aliases":{{"mini":"gpt-4o-mini"}}}}]{extra}}}"#,
        sha_hex("vk-alice")
    )
}

impl Gateway {
    /// A request from alice to `path` with `content_type` (none when empty).
    fn typed_request(&self, path: &str, content_type: &str, body: &[u8]) -> Exchange {
        let mut headers =
            vec![(":method", "POST"), (":path", path), ("authorization", "Bearer vk-alice"), ("x-request-id", "req-1")];
        if !content_type.is_empty() {
            headers.push(("content-type", content_type));
        }
        Exchange::new(&self.world, &self.ingress, &headers, body)
    }
}

/// What the provider receives: the request headers and body after the
/// ingress stage and the first attempt.
fn sent(x: &mut Exchange, gw: &Gateway) -> (Vec<(String, String)>, Vec<u8>) {
    assert_eq!(x.attempt(&gw.attempt), Next::Continue);
    let up = &x.attempts[0].1;
    let headers = up.request_headers.borrow().clone();
    let body = up.request_body.borrow().clone();
    (headers, body)
}

fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// Cost per million tokens, exactly.
fn cost(prompt: usize, output: u64, input_price: i64, output_price: i64) -> Decimal {
    (Decimal::from(prompt as u64) * Decimal::from(input_price) + Decimal::from(output) * Decimal::from(output_price))
        / Decimal::from(1_000_000)
}

fn form(boundary: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        let disposition = match *name {
            "file" => "name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav".to_string(),
            n => format!("name=\"{n}\""),
        };
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n").as_bytes(),
        );
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

fn code(x: &Exchange) -> (u32, String) {
    let r = x.replied().unwrap_or_else(|| panic!("not refused"));
    (r.status, r.json()["error"]["code"].as_str().unwrap_or_default().to_string())
}

#[test]
fn a_multipart_form_is_policed_by_its_model_field_and_reserved_at_its_price() {
    let gw = Gateway::new(&config("1.00", ""));
    let ct = "multipart/form-data; boundary=XyZ";
    let forbidden = form("XyZ", &[("file", "RIFF....WAVE"), ("model", "gpt-4o-transcribe")]);
    let mut x = gw.typed_request("/v1/audio/transcriptions", ct, &forbidden);
    assert_eq!(x.send_request(7, false), Next::Pause);
    assert_eq!(code(&x), (403, "model_not_allowed".into()));
    x.finish();

    let body = form("XyZ", &[("file", "RIFF....WAVE"), ("model", "whisper-1"), ("language", "en")]);
    let mut x = gw.typed_request("/v1/audio/transcriptions", ct, &body);
    assert_eq!(x.send_request(7, false), Next::Continue);
    // Every byte is a possible prompt token; no cap field: the default 100.
    let want = cost(body.len(), 100, 10, 20);
    assert_eq!(gw.budget().reserved, want);
    let (_, upstream) = sent(&mut x, &gw);
    assert_eq!(upstream, body, "forwarded untouched");
}

#[test]
fn an_alias_in_a_form_is_rewritten_in_place_with_its_content_length() {
    let gw = Gateway::new(&config("1.00", ""));
    let body = form("b", &[("model", "mini"), ("prompt", "a cat")]);
    let mut x = gw.typed_request("/v1/images/edits", "multipart/form-data; boundary=b", &body);
    x.downstream.request_headers.borrow_mut().push(("content-length".into(), body.len().to_string()));
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    let (headers, upstream) = sent(&mut x, &gw);
    assert_eq!(upstream, form("b", &[("model", "gpt-4o-mini"), ("prompt", "a cat")]));
    assert_eq!(header(&headers, "content-length"), Some(upstream.len().to_string()));
    assert_eq!(gw.budget().reserved, cost(body.len(), 100, 1000, 2000), "priced as gpt-4o-mini");
}

#[test]
fn a_form_the_gateway_cannot_read_is_refused_when_a_budget_depends_on_it() {
    let gw = Gateway::new(&config("1.00", ""));
    let twice = form("b", &[("model", "whisper-1"), ("file", "x"), ("model", "gpt-4o")]);
    let cases: [(&str, Vec<u8>); 3] = [
        ("multipart/form-data; boundary=b", twice),
        ("multipart/form-data", form("b", &[("model", "whisper-1")])),
        ("multipart/form-data; boundary=b", form("b", &[("file", "x")])),
    ];
    for (ct, body) in cases {
        let mut x = gw.typed_request("/v1/audio/transcriptions", ct, &body);
        x.send_request(usize::MAX, false);
        assert_eq!(code(&x), (400, "model_required".into()), "{ct}: {}", String::from_utf8_lossy(&body));
        x.finish();
    }
    assert_eq!(gw.budget().reserved, Decimal::ZERO);
}

#[test]
fn json_sent_as_text_plain_or_without_a_type_is_admitted_and_priced_as_json() {
    let gw = Gateway::new(&config("1.00", ""));
    let body = br#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    for ct in ["text/plain", "", "application/octet-stream"] {
        let mut x = gw.typed_request("/v1/chat/completions", ct, body);
        assert_eq!(x.send_request(5, false), Next::Continue, "{ct}");
        assert_eq!(gw.budget().reserved, cost(body.len(), 10, 1000, 2000), "{ct}");
        x.finish();
    }
    let forbidden = br#"{"model":"gpt-4o","max_tokens":10,"messages":[]}"#;
    let mut x = gw.typed_request("/v1/chat/completions", "text/plain", forbidden);
    x.send_request(usize::MAX, false);
    assert_eq!(code(&x), (403, "model_not_allowed".into()));
    let mut x = gw.typed_request("/v1/chat/completions", "text/plain", b"model=gpt-4o");
    x.send_request(usize::MAX, false);
    assert_eq!(code(&x), (400, "model_required".into()));
    assert!(x.replied().is_some_and(|r| r.json()["error"]["message"].as_str().unwrap_or("").contains("neither JSON")));
}

#[test]
fn an_unreadable_body_passes_where_nothing_depends_on_its_model() {
    let open = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"sk-one"}]}]}"#;
    let gw = Gateway::new(open);
    let mut x = gw.typed_request("/v1/files", "text/csv", b"a,b\n1,2\n");
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    let (_, upstream) = sent(&mut x, &gw);
    assert_eq!(upstream, b"a,b\n1,2\n");
}

#[test]
fn an_azure_deployment_path_is_policed_and_priced_as_the_model_it_serves() {
    let gw = Gateway::new(&config("1.00", ""));
    let body = br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":20}"#;
    let mut x = gw.typed_request("/openai/deployments/big-prod/chat/completions?api-version=2024-10-21", "", body);
    x.send_request(usize::MAX, false);
    assert_eq!(code(&x), (403, "model_not_allowed".into()), "big-prod serves gpt-4o");
    assert!(x.replied().is_some_and(|r| r.json()["error"]["message"].as_str().unwrap_or("").contains("gpt-4o")));

    let path = "/openai/deployments/mini-prod/chat/completions?api-version=2024-10-21";
    let mut x = gw.typed_request(path, "application/json", body);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(gw.budget().reserved, cost(body.len(), 20, 1000, 2000), "priced as gpt-4o-mini");
    let (headers, upstream) = sent(&mut x, &gw);
    assert_eq!(header(&headers, ":path").as_deref(), Some(path), "the deployment is kept");
    assert_eq!(header(&headers, "x-apikeyrouter-provider").as_deref(), Some("az"));
    assert_eq!(header(&headers, "api-key").as_deref(), Some("az-one"));
    assert_eq!(upstream, body.to_vec(), "no model is added to the body");
    x.upstream_headers(200, &[("content-type", "application/json")], false);
    x.upstream_body(&[br#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#], true);
    x.attempt_done();
    x.finish();
    let b = gw.budget();
    assert_eq!((b.spent, b.reserved), (cost(7, 3, 1000, 2000), Decimal::ZERO));
}

#[test]
fn an_unlisted_deployment_is_its_own_model_and_unpriced_it_is_refused_under_a_budget() {
    let gw = Gateway::new(&config("1.00", r#","teams":[]"#));
    let mut x = gw.typed_request("/openai/deployments/gpt-4o-mini/embeddings?api-version=1", "", br#"{"input":"x"}"#);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue, "the name is a priced, allowed model");
    x.finish();
    let mut x =
        gw.typed_request("/openai/deployments/whisper-1/../big-prod/chat/completions", "", br#"{"messages":[]}"#);
    x.send_request(usize::MAX, false);
    assert_eq!(code(&x), (403, "endpoint_not_allowed".into()), "a path a provider might resolve differently");
}

#[test]
fn a_gemini_model_path_is_policed_priced_and_capped_in_its_generation_config() {
    let gw = Gateway::new(&config("1.00", ""));
    let body = br#"{"contents":[{"parts":[{"text":"Hi"}]}]}"#;
    let mut x = gw.typed_request("/v1beta/models/gemini-1.5-pro:generateContent", "application/json", body);
    x.send_request(usize::MAX, false);
    assert_eq!(code(&x), (403, "model_not_allowed".into()));

    let path = "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse";
    let mut x = gw.typed_request(path, "application/json", body);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    // No cap in the body: alice's 64 is written into generationConfig.
    assert_eq!(gw.budget().reserved, cost(body.len(), 64, 100, 400));
    let (headers, upstream) = sent(&mut x, &gw);
    let v: Value = serde_json::from_slice(&upstream).unwrap_or_default();
    assert_eq!(v["generationConfig"], json!({"maxOutputTokens": 64}));
    assert_eq!(header(&headers, ":path").as_deref(), Some(path));
    assert_eq!(header(&headers, "x-goog-api-key").as_deref(), Some("gm-one"));
    assert_eq!(header(&headers, "content-length"), Some(upstream.len().to_string()));
}

#[test]
fn n_choices_multiply_the_estimate_and_are_refused_past_the_remaining_budget() {
    // Room for one choice of 64 output tokens, not eight.
    let body = br#"{"model":"gpt-4o-mini","max_tokens":64,"n":8,"messages":[]}"#;
    let one = cost(body.len(), 64, 1000, 2000);
    let eight = cost(body.len(), 8 * 64, 1000, 2000);
    let limit = (one + eight) / Decimal::from(2);
    let gw = Gateway::new(&config(&limit.to_string(), ""));
    let mut x = gw.typed_request("/v1/chat/completions", "application/json", body);
    x.send_request(usize::MAX, false);
    assert_eq!(code(&x), (429, "insufficient_quota".into()));
    let msg = x.replied().map(|r| r.json()["error"]["message"].as_str().unwrap_or("").to_string());
    assert!(msg.is_some_and(|m| m.contains(&format!("estimate {}", budget::show(eight)))));
    let single = br#"{"model":"gpt-4o-mini","max_tokens":64,"n":1,"messages":[]}"#;
    let mut x = gw.typed_request("/v1/chat/completions", "application/json", single);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(gw.budget().reserved, one);
}

#[test]
fn every_dialects_output_cap_is_checked_against_the_policy() {
    let gw = Gateway::new(&config("1.00", ""));
    let cases = [
        r#"{"model":"gpt-4o-mini","max_completion_tokens":5000,"messages":[]}"#,
        r#"{"model":"gpt-4o-mini","max_output_tokens":5000,"input":"x"}"#,
        r#"{"model":"gpt-4o-mini","max_tokens":10,"max_completion_tokens":65,"messages":[]}"#,
    ];
    for body in cases {
        let mut x = gw.typed_request("/v1/chat/completions", "application/json", body.as_bytes());
        x.send_request(usize::MAX, false);
        assert_eq!(code(&x), (400, "max_tokens_too_large".into()), "{body}");
    }
    let mut x = gw.typed_request(
        "/v1beta/models/gemini-2.0-flash:generateContent",
        "application/json",
        br#"{"generation_config":{"max_output_tokens":5000}}"#,
    );
    x.send_request(usize::MAX, false);
    assert_eq!(code(&x), (400, "max_tokens_too_large".into()));
}

#[test]
fn a_policy_cap_is_injected_in_the_field_of_the_providers_dialect() {
    let gw = Gateway::new(&config("1.00", ""));
    let cases = [
        ("/v1/chat/completions", "max_completion_tokens"),
        ("/v1/responses", "max_output_tokens"),
        ("/v1/completions", "max_tokens"),
    ];
    for (path, field) in cases {
        let body = br#"{"model":"gpt-4o-mini","max_tokens":null,"messages":[{"role":"user","content":"hi"}]}"#;
        let before = gw.budget().reserved;
        let mut x = gw.typed_request(path, "application/json", body);
        assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
        assert_eq!(gw.budget().reserved - before, cost(body.len(), 64, 1000, 2000), "{path}");
        let (headers, upstream) = sent(&mut x, &gw);
        let v: Value = serde_json::from_slice(&upstream).unwrap_or_default();
        assert_eq!(v[field], 64, "{path}: {v}");
        assert_eq!(header(&headers, "content-length"), Some(upstream.len().to_string()));
    }
    // A request that sets its own cap within the policy keeps it.
    let body = br#"{"model":"gpt-4o-mini","max_tokens":9,"messages":[]}"#;
    let mut x = gw.typed_request("/v1/chat/completions", "application/json", body);
    x.send_request(usize::MAX, false);
    let (_, upstream) = sent(&mut x, &gw);
    assert_eq!(upstream, body.to_vec());
}

#[test]
fn an_unpriced_model_is_refused_by_default_when_a_budget_is_configured() {
    let open = |extra: &str| {
        format!(
            r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}}]}}],
                "prices":{{"gpt-4o-mini":{{"input":"1","output":"1"}}}},"budgets":[{{"id":"b","limit":"1"}}]{extra}}}"#
        )
    };
    let body = br#"{"model":"o9-unpriced","messages":[]}"#;
    let gw = Gateway::new(&open(""));
    let mut x = gw.typed_request("/v1/chat/completions", "application/json", body);
    x.send_request(usize::MAX, false);
    assert_eq!(code(&x), (400, "model_not_priced".into()));
    let gw = Gateway::new(&open(r#","unknown_model":"zero""#));
    let mut x = gw.typed_request("/v1/chat/completions", "application/json", body);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue, "counted at zero, as configured");
    // A body without any model is refused either way: a budget applies.
    let mut x = gw.typed_request("/v1/batches", "application/json", br#"{"input_file_id":"f"}"#);
    x.send_request(usize::MAX, false);
    assert_eq!(code(&x), (400, "model_required".into()));
}

#[test]
fn a_form_or_json_ending_in_trailers_gets_the_same_checks() {
    let gw = Gateway::new(&config("1.00", ""));
    let forbidden = form("b", &[("model", "gpt-4o")]);
    let mut x = gw.typed_request("/v1/audio/transcriptions", "multipart/form-data; boundary=b", &forbidden);
    assert_eq!(x.send_request(4, true), Next::Pause);
    assert_eq!(code(&x), (403, "model_not_allowed".into()));
    let body = br#"{"model":"gpt-4o-mini","messages":[]}"#;
    let mut x = gw.typed_request("/v1/chat/completions", "text/plain", body);
    assert_eq!(x.send_request(4, true), Next::Continue);
    assert_eq!(gw.budget().reserved, cost(body.len(), 64, 1000, 2000), "capped and reserved");
    let up = x.downstream.get(Map::RequestHeaders, "content-length");
    assert_eq!(up, Some((body.len() + r#","max_completion_tokens":64"#.len()).to_string()));
}

#[test]
fn the_health_probe_is_answered_before_any_caller_authentication_and_sends_nothing_upstream() {
    let config = format!(
        r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}}]}}],
            "clients":[{{"id":"app","key_sha256":"{}"}}],
            "admin":{{"enabled":false,"probe_path":"/healthz"}}}}"#,
        sha_hex("vk-app")
    );
    let gw = Gateway::new(&config);
    let ask = |method: &str, path: &str, body: &[u8]| {
        let mut x = Exchange::new(&gw.world, &gw.ingress, &[(":method", method), (":path", path)], body);
        x.send_request(usize::MAX, false);
        assert!(x.attempts.is_empty(), "{method} {path}");
        x.replied().map(|r| (r.status, String::from_utf8_lossy(&r.body).to_string()))
    };
    let healthy = Some((200, r#"{"status":"healthy"}"#.to_string()));
    assert_eq!(ask("GET", "/healthz", b""), healthy);
    assert_eq!(ask("GET", "/healthz?probe=kubelet", b""), healthy);
    assert_eq!(ask("POST", "/healthz", b"{}").map(|r| r.0), Some(405), "answered at the headers");
    // Any other path still needs a client key.
    let refused = ask("GET", "/healthz/", b"").unwrap_or_default();
    assert_eq!(refused.0, 401, "{}", refused.1);
}
