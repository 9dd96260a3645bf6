//! Object affinity and ownership through both stages (issue 21): what a
//! provider's answer records, where a follow-up may go, what another
//! client gets, how a list is filtered, and what a caller cannot plant.

use super::fake::Exchange;
use super::host::{Host, Map, Next};
use super::lifecycle_tests::{sha_hex, Gateway};
use crate::objects;

/// Four keys in two groups (projects) and two clients.
fn config(objects: &str) -> String {
    format!(
        r#"{{"providers":[{{"id":"openai","keys":[
              {{"id":"a1","secret":"sk-a1","group":"proj-a"}},{{"id":"a2","secret":"sk-a2","group":"proj-a"}},
              {{"id":"b1","secret":"sk-b1","group":"proj-b"}},{{"id":"b2","secret":"sk-b2","group":"proj-b"}}]}}],
            "clients":[{{"id":"alice","key_sha256":"{}","allowed_endpoints":["*"]}},
                       {{"id":"bob","key_sha256":"{}","allowed_endpoints":["*"]}}]{objects}}}"#,
        sha_hex("vk-alice"),
        sha_hex("vk-bob")
    )
}

const JSON: (&str, &str) = ("content-type", "application/json");

fn request(gw: &Gateway, who: &str, method: &str, path: &str, body: &str) -> Exchange {
    let auth = format!("Bearer vk-{who}");
    Exchange::new(
        &gw.world,
        &gw.ingress,
        &[(":method", method), (":path", path), ("content-type", "application/json"), ("authorization", &auth)],
        body.as_bytes(),
    )
}

/// The key (its secret) the current attempt sent.
fn key_of(x: &Exchange) -> String {
    let up = &x.attempts.last().unwrap_or_else(|| panic!("no attempt")).1;
    up.get(Map::RequestHeaders, "authorization").unwrap_or_default().trim_start_matches("Bearer ").to_string()
}

/// A request answered 200 with `answer` by the first key chosen; the key.
fn served(gw: &Gateway, who: &str, method: &str, path: &str, body: &str, answer: &str) -> (String, Vec<u8>) {
    let mut x = request(gw, who, method, path, body);
    x.send_request(usize::MAX, false);
    assert_eq!(x.replied().map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned())), None);
    assert_eq!(x.attempt(&gw.attempt), Next::Continue);
    let key = key_of(&x);
    x.upstream_headers(200, &[JSON, ("content-length", &answer.len().to_string())], false);
    let out = x.upstream_body(&[answer.as_bytes()], true);
    x.attempt_done();
    x.finish();
    (key, out)
}

fn group(secret: &str) -> &'static str {
    if secret.starts_with("sk-a") {
        "proj-a"
    } else {
        "proj-b"
    }
}

#[test]
fn a_conversation_stays_in_the_group_of_the_key_that_created_its_first_response() {
    let gw = Gateway::new(&config(""));
    let (first, _) =
        served(&gw, "alice", "POST", "/v1/responses", r#"{"model":"gpt-4o","input":"hi"}"#, r#"{"id":"resp_0"}"#);
    let mut prev = "resp_0".to_string();
    for turn in 1..12 {
        let body = format!(r#"{{"model":"gpt-4o","input":"more","previous_response_id":"{prev}"}}"#);
        let answer = format!(r#"{{"id":"resp_{turn}"}}"#);
        let (key, _) = served(&gw, "alice", "POST", "/v1/responses", &body, &answer);
        assert_eq!(group(&key), group(&first), "turn {turn} went to {key}");
        prev = format!("resp_{turn}");
    }
    assert_eq!(gw.world.counter(crate::metrics::OBJECTS_HITS), 11);
    assert_eq!(gw.world.counter(crate::metrics::OBJECTS_RECORDED), 12);
}

#[test]
fn a_retry_stays_in_the_group_and_a_group_out_of_keys_gets_429_with_retry_after() {
    let gw = Gateway::new(&config(""));
    let (first, _) = served(&gw, "alice", "POST", "/v1/files", "{}", r#"{"id":"file-1","object":"file"}"#);
    let mut x = request(&gw, "alice", "GET", "/v1/files/file-1", "");
    x.send_request(usize::MAX, false);
    x.attempt(&gw.attempt);
    let k1 = key_of(&x);
    assert_eq!(group(&k1), group(&first));
    x.upstream_headers(429, &[("retry-after", "30")], true);
    x.attempt_done();
    x.attempt(&gw.attempt);
    let k2 = key_of(&x);
    assert_ne!(k1, k2);
    assert_eq!(group(&k2), group(&first), "the retry stays in the group");
    x.upstream_headers(429, &[("retry-after", "30")], true);
    x.attempt_done();
    // Both keys of the group cool down: no key of the other group serves.
    assert_eq!(x.attempt(&gw.attempt), Next::Pause);
    let sent = x.attempts.last().and_then(|(_, up)| up.sent.borrow().clone()).unwrap_or_else(|| panic!("no reply"));
    assert_eq!(sent.status, 429);
    // The next request is refused before any attempt, with retry-after.
    let mut y = request(&gw, "alice", "GET", "/v1/files/file-1", "");
    y.send_request(usize::MAX, false);
    let r = y.replied().unwrap_or_else(|| panic!("not refused"));
    assert_eq!(r.status, 429);
    let retry_after = r.headers.iter().find(|(k, _)| k == "retry-after").map(|(_, v)| v.clone());
    assert!(retry_after.is_some_and(|v| v.parse::<u64>().is_ok_and(|s| (1..=30).contains(&s))), "{r:?}");
    assert_eq!(r.json()["error"]["code"], "no_available_key");
    assert!(y.attempts.is_empty());
    // A request about nothing still uses the other group.
    let (free, _) = served(&gw, "alice", "POST", "/v1/chat/completions", r#"{"model":"gpt-4o"}"#, r#"{"id":"x"}"#);
    assert_ne!(group(&free), group(&first));
}

#[test]
fn another_clients_object_is_not_found_by_path_or_body_and_nothing_is_sent() {
    let gw = Gateway::new(&config(""));
    served(&gw, "alice", "POST", "/v1/files", "{}", r#"{"id":"file-9","object":"file"}"#);
    let tries = [
        ("GET", "/v1/files/file-9", ""),
        ("GET", "/v1/files/file-9/content", ""),
        ("DELETE", "/v1/files/file-9", ""),
        ("POST", "/v1/batches", r#"{"input_file_id":"file-9","endpoint":"/v1/chat/completions"}"#),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"content":[{"type":"file","file":{"file_id":"file-9"}}]}]}"#,
        ),
        ("POST", "/v1/batches", r#"{"input\u005ffile\u005fid":"file-9"}"#),
        // Every API root reaches the same objects (Azure, Groq, Gemini's
        // OpenAI-compatible one).
        ("GET", "/openai/files/file-9?api-version=2024-10-21", ""),
        ("GET", "/openai/v1/files/file-9/content", ""),
        ("DELETE", "/v1beta/openai/files/file-9", ""),
        // A list's page after another client's object; an eval run's file.
        ("GET", "/v1/files?limit=1&after=file-9", ""),
        (
            "POST",
            "/v1/evals/eval_1/runs",
            r#"{"data_source":{"type":"jsonl","source":{"type":"file_id","id":"file-9"}}}"#,
        ),
    ];
    for (method, path, body) in tries {
        let mut x = request(&gw, "bob", method, path, body);
        x.send_request(usize::MAX, false);
        let r = x.replied().unwrap_or_else(|| panic!("{method} {path} {body} was not refused"));
        assert_eq!(r.status, 404, "{method} {path}");
        assert_eq!(r.json()["error"]["code"], "object_not_found");
        assert!(x.attempts.is_empty());
    }
    assert_eq!(gw.world.counter(crate::metrics::OBJECTS_REFUSED), tries.len() as u64);
    // Alice still reaches it; an encoded id is refused outright.
    let (_, _) = served(&gw, "alice", "GET", "/v1/files/file-9", "", r#"{"id":"file-9"}"#);
    let mut x = request(&gw, "bob", "GET", "/v1/files/%66ile-9", "");
    x.send_request(usize::MAX, false);
    assert!(x.replied().is_some_and(|r| r.status == 403) && x.attempts.is_empty(), "a client's endpoint check");
    let open = Gateway::new(r#"{"providers":[{"id":"openai","keys":[{"id":"k","secret":"sk"}]}]}"#);
    let mut x = request(&open, "bob", "GET", "/v1/files/%66ile-9", "");
    x.send_request(usize::MAX, false);
    let r = x.replied().unwrap_or_else(|| panic!("not refused"));
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (400, Some("invalid_object_path")));
}

#[test]
fn only_a_providers_2xx_answer_to_a_creating_request_makes_a_record() {
    let gw = Gateway::new(&config(""));
    let h = crate::stages::fake::FakeHost::new(&gw.world);
    let layout = crate::objects::Layout::new(10_000);
    let known = |id: &str| objects::lookup(h.store(), layout, id, 0).is_some();
    // A body naming an id, an answer to a non-creating path, an error
    // answer, an answer with an id of another kind: none records.
    served(&gw, "bob", "POST", "/v1/chat/completions", r#"{"model":"m","id":"file-1"}"#, r#"{"id":"file-2"}"#);
    served(&gw, "bob", "POST", "/v1/embeddings", r#"{"model":"m"}"#, r#"{"id":"file-3"}"#);
    served(&gw, "bob", "POST", "/v1/files", "{}", r#"{"id":"resp_4"}"#);
    let mut x = request(&gw, "bob", "POST", "/v1/files", "{}");
    x.send_request(usize::MAX, false);
    x.attempt(&gw.attempt);
    x.upstream_headers(400, &[JSON], false);
    x.upstream_body(&[br#"{"id":"file-5","error":{"message":"no"}}"#], true);
    x.attempt_done();
    for id in ["file-1", "file-2", "file-3", "resp_4", "file-5"] {
        assert!(!known(id), "{id} was recorded");
    }
    // A stored chat completion is recorded; one not stored is not.
    served(&gw, "bob", "POST", "/v1/chat/completions", r#"{"model":"m","store":true}"#, r#"{"id":"chatcmpl-6"}"#);
    served(&gw, "bob", "POST", "/v1/chat/completions", r#"{"model":"m"}"#, r#"{"id":"chatcmpl-7"}"#);
    assert!(known("chatcmpl-6") && !known("chatcmpl-7"));
    // Unknown ids are allowed by default.
    served(&gw, "bob", "GET", "/v1/files/file-77", "", r#"{"id":"file-77"}"#);
    assert_eq!(gw.world.counter(crate::metrics::OBJECTS_MISSES), 1);
}

#[test]
fn a_streamed_response_is_recorded_from_its_created_event() {
    let gw = Gateway::new(&config(""));
    let mut x = request(&gw, "alice", "POST", "/v1/responses", r#"{"model":"gpt-4o","input":"hi","stream":true}"#);
    x.send_request(usize::MAX, false);
    x.attempt(&gw.attempt);
    let key = key_of(&x);
    x.upstream_headers(200, &[("content-type", "text/event-stream")], false);
    x.upstream_body(
        &[
            b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_s",
            b"tr1\",\"status\":\"in_progress\"}}\n\n",
        ],
        true,
    );
    x.attempt_done();
    x.finish();
    let (again, _) = served(&gw, "alice", "GET", "/v1/responses/resp_str1", "", r#"{"id":"resp_str1"}"#);
    assert_eq!(group(&again), group(&key));
    assert_eq!(gw.world.counter(crate::metrics::OBJECTS_HITS), 1);
}

#[test]
fn a_list_shows_each_client_only_its_own_objects() {
    let gw = Gateway::new(&config(""));
    served(&gw, "alice", "POST", "/v1/files", "{}", r#"{"id":"file-a"}"#);
    served(&gw, "bob", "POST", "/v1/files", "{}", r#"{"id":"file-b"}"#);
    let list = r#"{"object":"list","data":[{"id":"file-a"},{"id":"file-b"},{"id":"file-old"}],"has_more":false}"#;
    let (_, out) = served(&gw, "bob", "GET", "/v1/files", "", list);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    assert_eq!(v["data"], serde_json::json!([{"id": "file-b"}, {"id": "file-old"}]), "unknown ids are allowed");
    // With unknown_objects deny, only the caller's own.
    let gw = Gateway::new(&config(r#","objects":{"unknown_objects":"deny"}"#));
    served(&gw, "bob", "POST", "/v1/files", "{}", r#"{"id":"file-b"}"#);
    let (_, out) = served(&gw, "bob", "GET", "/v1/files?limit=3", "", list);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    assert_eq!(v["data"], serde_json::json!([{"id": "file-b"}]));
    let mut x = request(&gw, "bob", "GET", "/v1/files/file-old", "");
    x.send_request(usize::MAX, false);
    assert_eq!(x.replied().map(|r| r.status), Some(404));
    // list_endpoints deny refuses the list itself.
    let gw = Gateway::new(&config(r#","objects":{"list_endpoints":"deny"}"#));
    let mut x = request(&gw, "bob", "GET", "/v1/files", "");
    x.send_request(usize::MAX, false);
    let r = x.replied().unwrap_or_else(|| panic!("not refused"));
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (403, Some("object_list_refused")));
}

#[test]
fn a_deleted_object_is_forgotten() {
    let gw = Gateway::new(&config(""));
    served(&gw, "alice", "POST", "/v1/files", "{}", r#"{"id":"file-d"}"#);
    served(&gw, "alice", "DELETE", "/v1/files/file-d", "", r#"{"id":"file-d","deleted":true}"#);
    served(&gw, "alice", "GET", "/v1/files/file-d", "", r#"{"id":"file-d"}"#);
    assert_eq!(gw.world.counter(crate::metrics::OBJECTS_MISSES), 1, "no record after the delete");
}

#[test]
fn a_request_about_no_object_costs_no_extra_host_call() {
    let with = Gateway::new(&config(""));
    let without = Gateway::new(&config(r#","objects":{"enabled":false}"#));
    let calls = |gw: &Gateway| {
        let mut x = request(gw, "alice", "POST", "/v1/chat/completions", r#"{"model":"m","messages":[]}"#);
        x.send_request(usize::MAX, false);
        x.attempt(&gw.attempt);
        x.upstream_headers(200, &[JSON], false);
        x.upstream_body(&[br#"{"id":"chatcmpl-1"}"#], true);
        x.attempt_done();
        x.finish();
        x.host_calls()
    };
    assert_eq!(calls(&with), calls(&without));
    // One referring to an object: one read to look it up.
    let calls = |gw: &Gateway| {
        let mut x = request(gw, "alice", "GET", "/v1/files/file-1", "");
        x.send_request(usize::MAX, false);
        x.attempt(&gw.attempt);
        x.upstream_headers(200, &[JSON], true);
        x.attempt_done();
        x.finish();
        x.host_calls()
    };
    assert_eq!(calls(&with), calls(&without) + 1);
}

#[test]
fn a_body_too_deep_to_read_for_references_is_refused_not_sent_unchecked() {
    let gw = Gateway::new(&config(""));
    served(&gw, "alice", "POST", "/v1/responses", r#"{"model":"gpt-4o","input":"hi"}"#, r#"{"id":"resp_a1"}"#);
    // Valid JSON the provider reads, nested past serde_json's 128 levels
    // in a field the request check skips.
    let deep = format!(
        r#"{{"model":"gpt-4o","previous_response_id":"resp_a1","input":"x","extra":{}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let mut x = request(&gw, "bob", "POST", "/v1/responses", &deep);
    x.send_request(usize::MAX, false);
    let r = x.replied().unwrap_or_else(|| panic!("sent on unchecked"));
    assert_eq!(r.status, 400);
    assert!(x.attempts.is_empty());
}

#[test]
fn a_form_field_or_an_unreadable_body_cannot_carry_another_clients_object() {
    let gw = Gateway::new(&config(""));
    served(&gw, "alice", "POST", "/v1/files", "{}", r#"{"id":"file-a2","object":"file"}"#);
    served(&gw, "bob", "POST", "/v1/containers", "{}", r#"{"id":"cntr_b1"}"#);
    let send = |ct: &str, path: &str, body: &str| {
        let mut x = Exchange::new(
            &gw.world,
            &gw.ingress,
            &[(":method", "POST"), (":path", path), ("content-type", ct), ("authorization", "Bearer vk-bob")],
            body.as_bytes(),
        );
        x.send_request(usize::MAX, false);
        x.replied().map(|r| (r.status, r.json()["error"]["code"].as_str().map(str::to_string)))
    };
    let form = |name: &str, file: &str| {
        format!(
            "--zz\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\nfile-a2\r\n--zz\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n--zz--\r\n"
        )
    };
    let multipart = "multipart/form-data; boundary=zz";
    assert_eq!(
        send(multipart, "/v1/containers/cntr_b1/files", &form("file_id", "")),
        Some((404, Some("object_not_found".into())))
    );
    // The same bytes as a file's content are content, not a reference.
    assert_eq!(send(multipart, "/v1/files", &form("file", "; filename=\"x.txt\"")), None);
    // JSON the gateway cannot read, under a content type that is not JSON.
    let lenient = r#"{"model":"gpt-4o","previous_response_id":"resp_x","temperature":NaN}"#;
    assert_eq!(send("text/plain", "/v1/responses", lenient), Some((400, Some("invalid_json".into()))));
    assert_eq!(send("text/plain", "/v1/embeddings", "not json"), None, "no object collection");
}

#[test]
fn an_id_a_provider_hands_out_again_stays_with_its_first_owner() {
    // Some OpenAI-compatible servers make the id from what the caller
    // sends (vLLM: `chatcmpl-<x-request-id>`, a Responses `request_id`).
    let gw = Gateway::new(&config(""));
    let stored = r#"{"model":"m","store":true}"#;
    served(&gw, "alice", "POST", "/v1/chat/completions", stored, r#"{"id":"chatcmpl-same"}"#);
    served(&gw, "bob", "POST", "/v1/chat/completions", stored, r#"{"id":"chatcmpl-same"}"#);
    let mut x = request(&gw, "bob", "GET", "/v1/chat/completions/chatcmpl-same", "");
    x.send_request(usize::MAX, false);
    assert_eq!(x.replied().map(|r| r.status), Some(404), "bob took alice's record");
    served(&gw, "alice", "GET", "/v1/chat/completions/chatcmpl-same", "", "{}");
}
