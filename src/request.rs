//! The client's request body: what the router needs from it (model,
//! stream, the output cap and the number of choices, prompt size) and the
//! rewrites it makes: asking a stream to report usage
//! (`stream_options.include_usage`), the model name, and a policy's output
//! cap.
//!
//! A body is read as JSON when its content type says JSON (or says
//! nothing), as a form when it is `multipart/form-data` (see
//! [`crate::multipart`]), and otherwise as JSON when it parses as JSON.

use crate::multipart;
use serde::Deserialize;
use serde_json::Value;
use std::fmt;

/// Why a request body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Not JSON at all, or truncated.
    Malformed(String),
    /// JSON, but not an object.
    NotAnObject,
    /// A known field with the wrong type, e.g. `"stream": "yes"`.
    BadField(String),
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::Malformed(e) => {
                write!(f, "We could not parse the JSON body of your request: {e}")
            }
            BodyError::NotAnObject => f.write_str("The request body must be a JSON object."),
            BodyError::BadField(e) => write!(f, "Invalid request body: {e}"),
        }
    }
}

#[derive(Deserialize)]
struct StreamOptionsPeek {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The top-level fields the router reads; the index of each is its slot
/// in [`Peek`]. Gemini's JSON takes both spellings of its config.
const FIELDS: [&str; 10] = [
    "model",
    "stream",
    "stream_options",
    // Output caps: chat and legacy completions, OpenAI chat, Responses.
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    // Choices: `best_of` are candidates made server-side, each billed.
    "n",
    "best_of",
    "generationConfig",
    "generation_config",
];
const FIRST_COUNT: usize = 3;
const FIRST_GEMINI: usize = 8;

/// The fields of a request body the router reads, each at most once.
#[derive(Default)]
struct Peek {
    model: Option<String>,
    stream: Option<bool>,
    /// `Some(inner)` when present at all, even as `null`.
    stream_options: Option<Option<StreamOptionsPeek>>,
    /// The counts of `FIELDS[FIRST_COUNT..FIRST_GEMINI]`.
    counts: [Option<u64>; 5],
    /// Gemini's generation config, in either spelling.
    generation: [Option<Value>; 2],
}

/// A top-level key, as its index in [`FIELDS`] (`FIELDS.len()`: another).
struct Key(usize);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        d.deserialize_identifier(KeyVisitor)
    }
}

struct KeyVisitor;

impl serde::de::Visitor<'_> for KeyVisitor {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(Key(FIELDS.iter().position(|f| *f == v).unwrap_or(FIELDS.len())))
    }
}

impl<'de> Deserialize<'de> for Peek {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Peek, D::Error> {
        d.deserialize_map(PeekVisitor)
    }
}

struct PeekVisitor;

impl<'de> serde::de::Visitor<'de> for PeekVisitor {
    type Value = Peek;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Peek, A::Error> {
        let mut p = Peek::default();
        let mut seen = 0u32;
        while let Some(Key(i)) = m.next_key()? {
            // A duplicate is refused: a provider might act on the other copy.
            if i < FIELDS.len() && seen & (1 << i) != 0 {
                let name = FIELDS.get(i).copied().unwrap_or_default();
                return Err(serde::de::Error::custom(format_args!("duplicate field `{name}`")));
            }
            seen |= 1 << i.min(31);
            match i {
                0 => p.model = m.next_value()?,
                1 => p.stream = m.next_value()?,
                2 => p.stream_options = Some(m.next_value()?),
                FIRST_COUNT..FIRST_GEMINI => {
                    if let Some(slot) = p.counts.get_mut(i - FIRST_COUNT) {
                        *slot = m.next_value()?;
                    }
                }
                FIRST_GEMINI..=9 => {
                    if let Some(slot) = p.generation.get_mut(i - FIRST_GEMINI) {
                        *slot = m.next_value()?;
                    }
                }
                _ => {
                    m.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(p)
    }
}

/// What the router learned from a request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    /// The largest output cap the body sets in any dialect's field
    /// (`max_tokens`, `max_completion_tokens`, `max_output_tokens`,
    /// `generationConfig.maxOutputTokens`); `None` when it sets none.
    pub max_tokens: Option<u64>,
    /// Completions the provider makes (and bills) per request: the largest
    /// of `n`, `best_of` and `generationConfig.candidateCount`, at least 1.
    pub choices: u64,
    /// The body size in bytes, a cheap upper bound of the prompt.
    pub body_len: usize,
    /// `stream_options` present at all.
    pub has_stream_options: bool,
    /// `stream_options.include_usage == true`.
    pub include_usage: bool,
    /// A form's text fields that are object ids (a JSON body's references
    /// are read by [`crate::objects::body_refs`]).
    pub refs: Vec<String>,
}

/// Validates and inspects a JSON request body.
pub fn inspect(body: &[u8]) -> Result<RequestInfo, BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => return Err(BodyError::Malformed("the body is empty".into())),
        Some(b'{') => {}
        Some(_) => {
            // Distinguish "valid JSON but not an object" from garbage.
            return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => Err(BodyError::NotAnObject),
                Err(e) => Err(BodyError::Malformed(e.to_string())),
            };
        }
    }
    let peek: Peek = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            BodyError::BadField(e.to_string())
        } else {
            BodyError::Malformed(e.to_string())
        }
    })?;
    let generation = [&peek.generation[0], &peek.generation[1]];
    let [max_tokens, max_completion_tokens, max_output_tokens, n, best_of] = peek.counts;
    let caps = [
        max_tokens,
        max_completion_tokens,
        max_output_tokens,
        gemini_count(generation, ["maxOutputTokens", "max_output_tokens"])?,
    ];
    let choices = [n, best_of, gemini_count(generation, ["candidateCount", "candidate_count"])?];
    Ok(RequestInfo {
        model: peek.model,
        stream: peek.stream.unwrap_or(false),
        max_tokens: caps.into_iter().flatten().max(),
        choices: choices.into_iter().flatten().max().unwrap_or(1).max(1),
        body_len: body.len(),
        has_stream_options: peek.stream_options.is_some(),
        include_usage: peek.stream_options.flatten().and_then(|s| s.include_usage).unwrap_or(false),
        refs: Vec::new(),
    })
}

/// How a request body was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Form {
    Json,
    /// `multipart/form-data`, with its `model` field, if any.
    Multipart(Option<multipart::Field>),
    /// Neither JSON nor a form the router can read: why.
    Unreadable(String),
}

/// Whether a content type declares JSON (or nothing at all).
fn declares_json(content_type: &str) -> bool {
    let ct = content_type.trim().to_ascii_lowercase();
    ct.is_empty() || ct.starts_with("application/json") || ct.contains("+json")
}

/// Reads a request body by its content type. A body declared JSON (or
/// undeclared) must be a JSON object: anything else is refused. A
/// `multipart/form-data` body is read as a form; a form the router cannot
/// read is [`Form::Unreadable`], as is a body of any other content type
/// that is not JSON. Any other body that parses as JSON is read as JSON.
pub fn read(content_type: &str, body: &[u8]) -> Result<(RequestInfo, Form), BodyError> {
    let unread = RequestInfo { body_len: body.len(), choices: 1, ..RequestInfo::default() };
    if let Some(boundary) = multipart::boundary(content_type) {
        return Ok(match boundary.and_then(|b| multipart::parse(body, b)) {
            Ok(mut f) => {
                let info = RequestInfo {
                    refs: std::mem::take(&mut f.refs),
                    model: f.model.as_ref().map(|m| m.value.clone()),
                    stream: f.stream,
                    choices: f.n.unwrap_or(1).max(1),
                    ..unread
                };
                (info, Form::Multipart(f.model))
            }
            Err(e) => (unread, Form::Unreadable(format!("its multipart body could not be read: {e}"))),
        });
    }
    match inspect(body) {
        Ok(info) => Ok((info, Form::Json)),
        Err(BodyError::Malformed(_)) if !declares_json(content_type) => {
            Ok((unread, Form::Unreadable("its body is neither JSON nor a multipart form".into())))
        }
        Err(e) => Err(e),
    }
}

/// The field a dialect takes its output cap in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapField {
    /// Legacy completions, Anthropic, OpenAI-compatible services.
    MaxTokens,
    /// OpenAI and Azure chat completions.
    MaxCompletionTokens,
    /// The Responses API.
    MaxOutputTokens,
    /// Gemini's native API: `generationConfig.maxOutputTokens`.
    GenerationConfig,
}

impl CapField {
    pub fn as_str(self) -> &'static str {
        match self {
            CapField::MaxTokens => "max_tokens",
            CapField::MaxCompletionTokens => "max_completion_tokens",
            CapField::MaxOutputTokens => "max_output_tokens",
            CapField::GenerationConfig => "generationConfig.maxOutputTokens",
        }
    }
}

/// A JSON object body after `edit`, or `None` when it is not one.
fn edited(body: &[u8], edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    edit(v.as_object_mut()?);
    serde_json::to_vec(&v).ok()
}

/// The JSON body with its `model` set to `model`.
pub fn with_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    edited(body, |o| {
        o.insert("model".into(), Value::String(model.to_string()));
    })
}

/// The JSON body with the output cap `cap` in `field` (replacing a `null`
/// there, which providers read as no cap).
pub fn with_cap(body: &[u8], field: CapField, cap: u64) -> Option<Vec<u8>> {
    edited(body, |o| match field {
        CapField::GenerationConfig => {
            // Into the spelling the caller used, so no second config wins.
            let key = if o.contains_key("generation_config") { "generation_config" } else { "generationConfig" };
            let slot = o.entry(key).or_insert(Value::Null);
            if !slot.is_object() {
                *slot = Value::Object(serde_json::Map::new());
            }
            if let Some(g) = slot.as_object_mut() {
                let name = if key == "generationConfig" { "maxOutputTokens" } else { "max_output_tokens" };
                g.insert(name.into(), Value::from(cap));
            }
        }
        f => {
            o.insert(f.as_str().into(), Value::from(cap));
        }
    })
}

/// The largest count under either name in either spelling of Gemini's
/// generation config; a value that is not a count is refused.
fn gemini_count(configs: [&Option<Value>; 2], names: [&str; 2]) -> Result<Option<u64>, BodyError> {
    let mut out = None;
    for config in configs.into_iter().flatten() {
        let o = config.as_object().ok_or_else(|| BodyError::BadField("generationConfig must be an object".into()))?;
        for v in names.iter().filter_map(|n| o.get(*n)).filter(|v| !v.is_null()) {
            let n =
                v.as_u64().ok_or_else(|| BodyError::BadField(format!("generationConfig: {v} is not a token count")))?;
            out = out.max(Some(n));
        }
    }
    Ok(out)
}

/// Paths whose streams report usage only when asked with `stream_options`.
pub fn path_takes_stream_options(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    path.ends_with("/chat/completions") || path.ends_with("/v1/completions")
}

/// Returns the body rewritten to carry `stream_options.include_usage: true`,
/// or `None` when it already does or is not a stream.
///
/// The common case (no `stream_options` at all) is a splice after the
/// opening brace, leaving the client's bytes otherwise untouched.
pub fn with_include_usage(body: &[u8], info: &RequestInfo) -> Option<Vec<u8>> {
    if !info.stream || info.include_usage {
        return None;
    }
    if !info.has_stream_options {
        let open = body.iter().position(|&b| b == b'{')?;
        let insert: &[u8] = b"\"stream_options\":{\"include_usage\":true},";
        let mut out = Vec::with_capacity(body.len() + insert.len());
        out.extend_from_slice(&body[..=open]);
        out.extend_from_slice(insert);
        out.extend_from_slice(&body[open + 1..]);
        return Some(out);
    }
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let slot = v.as_object_mut()?.entry("stream_options").or_insert(Value::Null);
    match slot.as_object_mut() {
        Some(so) => {
            so.insert("include_usage".into(), Value::Bool(true));
        }
        // `null` (or any non-object): replace it.
        None => *slot = serde_json::json!({"include_usage": true}),
    }
    serde_json::to_vec(&v).ok()
}

/// Query parameters by which a provider would take a key from the URL
/// (Gemini's `key` and `access_token`, an API gateway's `api-key` or
/// `subscription-key`): only the gateway's own keys authenticate.
const CREDENTIAL_PARAMS: &[&str] = &["key", "access_token", "api-key", "api_key", "subscription-key"];

/// `path` without a caller's credential query parameters, when it had any.
pub fn without_credential_params(path: &str) -> Option<String> {
    let (base, query) = path.split_once('?')?;
    let is_credential = |p: &&str| {
        let name = p.split_once('=').map_or(*p, |(n, _)| n);
        CREDENTIAL_PARAMS.iter().any(|c| name.eq_ignore_ascii_case(c))
    };
    if !query.split('&').any(|p| is_credential(&p)) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !p.is_empty() && !is_credential(p)).collect();
    Some(if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(body: &str) -> RequestInfo {
        match inspect(body.as_bytes()) {
            Ok(i) => i,
            Err(e) => panic!("{body}: {e}"),
        }
    }

    #[test]
    fn reads_model_stream_and_max_tokens() {
        let i = info(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":50}"#);
        assert_eq!(i.model.as_deref(), Some("gpt-4o"));
        assert!(i.stream);
        assert_eq!(i.max_tokens, Some(50));
        let i = info(r#"{"model":"o1","max_completion_tokens":9,"max_tokens":50}"#);
        assert_eq!(i.max_tokens, Some(50), "the largest cap bounds the output");
        assert_eq!(i.choices, 1);
        let i = info(r#"{"input":"x","stream":null}"#);
        assert!(!i.stream);
        assert_eq!(i.model, None);
    }

    #[test]
    fn every_dialects_output_cap_and_choice_count_is_read() {
        let cases = [
            (r#"{"max_output_tokens":700}"#, Some(700), 1),
            (r#"{"generationConfig":{"maxOutputTokens":300,"candidateCount":4,"temperature":1}}"#, Some(300), 4),
            (r#"{"max_tokens":10,"n":8}"#, Some(10), 8),
            (r#"{"max_tokens":10,"n":2,"best_of":5}"#, Some(10), 5),
            (r#"{"n":0,"max_tokens":null,"generationConfig":null}"#, None, 1),
        ];
        for (body, cap, choices) in cases {
            let i = info(body);
            assert_eq!((i.max_tokens, i.choices), (cap, choices), "{body}");
        }
        assert!(matches!(inspect(br#"{"n":"8"}"#), Err(BodyError::BadField(_))));
        assert!(matches!(inspect(br#"{"generationConfig":{"maxOutputTokens":-1}}"#), Err(BodyError::BadField(_))));
        assert!(matches!(inspect(br#"{"generationConfig":{"maxOutputTokens":"9"}}"#), Err(BodyError::BadField(_))));
        assert!(matches!(inspect(br#"{"generationConfig":[]}"#), Err(BodyError::BadField(_))));
        for dup in
            [r#"{"model":"a","model":"b"}"#, r#"{"n":1,"x":1,"n":2}"#, r#"{"stream_options":null,"stream_options":{}}"#]
        {
            let e = inspect(dup.as_bytes());
            assert!(matches!(&e, Err(BodyError::BadField(m)) if m.contains("duplicate field")), "{dup}: {e:?}");
        }
        assert!(inspect(br#"{"x":1,"x":2,"messages":[{"n":"nested fields are not read"}]}"#).is_ok());
        // Gemini's JSON also takes the proto field names.
        let i = info(
            r#"{"generation_config":{"max_output_tokens":900,"candidate_count":2},"generationConfig":{"maxOutputTokens":5}}"#,
        );
        assert_eq!((i.max_tokens, i.choices), (Some(900), 2));
    }

    #[test]
    fn json_with_any_content_type_is_read_as_json_and_forms_as_forms() {
        let body = br#"{"model":"gpt-4o","max_tokens":5}"#;
        for ct in ["", "application/json", "application/vnd.api+json", "text/plain", "application/octet-stream"] {
            let (i, form) = read(ct, body).unwrap_or_else(|e| panic!("{ct}: {e}"));
            assert_eq!((i.model.as_deref(), form), (Some("gpt-4o"), Form::Json), "{ct}");
        }
        // Declared JSON must be JSON; undeclared bytes are unreadable, not refused.
        assert!(read("application/json", b"hello").is_err());
        assert!(read("", b"hello").is_err());
        let (i, form) = read("text/plain", b"hello").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(form, Form::Unreadable(_)) && i.model.is_none() && i.body_len == 5);
        assert!(read("text/plain", b"[1]").is_err(), "JSON, but not an object");

        let ct = "multipart/form-data; boundary=b";
        let form_body = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\n2\r\n--b--";
        let (i, form) = read(ct, form_body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((i.model.as_deref(), i.choices, i.body_len), (Some("whisper-1"), 2, form_body.len()));
        assert!(matches!(form, Form::Multipart(Some(_))));
        let (i, form) = read("multipart/form-data", form_body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(i.model, None);
        assert!(matches!(form, Form::Unreadable(why) if why.contains("boundary")));
    }

    #[test]
    fn caps_and_models_are_written_into_the_dialects_field() {
        let get = |b: Option<Vec<u8>>| serde_json::from_slice::<Value>(&b.unwrap_or_default()).unwrap_or(Value::Null);
        let body = br#"{"model":"a","max_tokens":null,"messages":[]}"#;
        let v = get(with_cap(body, CapField::MaxTokens, 64));
        assert_eq!((v["max_tokens"].as_u64(), v["model"].as_str()), (Some(64), Some("a")));
        let v = get(with_cap(body, CapField::MaxCompletionTokens, 64));
        assert_eq!(v["max_completion_tokens"], 64);
        let v = get(with_cap(br#"{"input":"x"}"#, CapField::MaxOutputTokens, 7));
        assert_eq!(v["max_output_tokens"], 7);
        let v = get(with_cap(br#"{"generationConfig":{"temperature":1}}"#, CapField::GenerationConfig, 9));
        assert_eq!(v["generationConfig"], serde_json::json!({"temperature": 1, "maxOutputTokens": 9}));
        let v = get(with_cap(br#"{"generation_config":{"temperature":1}}"#, CapField::GenerationConfig, 9));
        assert_eq!(v["generation_config"], serde_json::json!({"temperature": 1, "max_output_tokens": 9}));
        assert_eq!(v.get("generationConfig"), None);
        let v = get(with_cap(br#"{"generationConfig":null}"#, CapField::GenerationConfig, 9));
        assert_eq!(v["generationConfig"]["maxOutputTokens"], 9);
        let i = inspect(&serde_json::to_vec(&v).unwrap_or_default()).unwrap_or_default();
        assert_eq!(i.max_tokens, Some(9), "the injected cap reads back");
        assert_eq!(get(with_model(body, "b"))["model"], "b");
        assert_eq!(with_model(b"[1]", "b"), None);
    }

    #[test]
    fn malformed_bodies_are_refused_with_a_reason() {
        assert!(matches!(inspect(b""), Err(BodyError::Malformed(_))));
        assert!(matches!(inspect(b"{\"model\":"), Err(BodyError::Malformed(_))));
        assert!(matches!(inspect(b"{\"a\":1} trailing"), Err(BodyError::Malformed(_))));
        assert!(matches!(inspect(b"hello"), Err(BodyError::Malformed(_))));
        assert_eq!(inspect(b"[1,2]"), Err(BodyError::NotAnObject));
        assert_eq!(inspect(b"\"str\""), Err(BodyError::NotAnObject));
        assert!(matches!(inspect(b"{\"stream\":\"yes\"}"), Err(BodyError::BadField(_))));
        assert!(matches!(inspect(b"{\"max_tokens\":-1}"), Err(BodyError::BadField(_))));
    }

    #[test]
    fn include_usage_is_spliced_in_when_absent() {
        let body = r#"{"model":"m","stream":true,"messages":[]}"#;
        let out = with_include_usage(body.as_bytes(), &info(body));
        let out = out.map(String::from_utf8);
        assert_eq!(
            out,
            Some(
                Ok(r#"{"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]}"#.to_string())
            )
        );
    }

    #[test]
    fn include_usage_is_merged_into_existing_stream_options() {
        let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"x":1}}"#;
        let out = with_include_usage(body.as_bytes(), &info(body)).unwrap_or_else(|| panic!("not rewritten: {body}"));
        let v: Value =
            serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&out)));
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(v["stream_options"]["x"], Value::from(1));
        assert_eq!(v["model"], Value::from("m"));
    }

    #[test]
    fn non_streams_and_streams_already_asking_are_left_alone() {
        let body = r#"{"model":"m"}"#;
        assert_eq!(with_include_usage(body.as_bytes(), &info(body)), None);
        let body = r#"{"stream":true,"stream_options":{"include_usage":true}}"#;
        assert_eq!(with_include_usage(body.as_bytes(), &info(body)), None);
    }

    #[test]
    fn spliced_body_is_still_valid_json_with_whitespace_and_unicode() {
        let body = "  \n{ \"stream\" : true , \"m\":\"héllo ✓\" }";
        let out = with_include_usage(body.as_bytes(), &info(body)).unwrap_or_else(|| panic!("not rewritten: {body}"));
        let v: Value =
            serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&out)));
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        assert_eq!(v["m"], Value::from("héllo ✓"));
    }

    #[test]
    fn only_chat_and_completions_paths_take_stream_options() {
        assert!(path_takes_stream_options("/v1/chat/completions"));
        assert!(path_takes_stream_options("/v1/completions?x=1"));
        assert!(!path_takes_stream_options("/v1/responses"));
        assert!(!path_takes_stream_options("/v1/embeddings"));
    }

    #[test]
    fn a_callers_credential_query_parameters_are_removed() {
        let p = "/v1beta/models/gemini-2.0-flash:generateContent?alt=sse&key=AIzaJUNK&access_token=x";
        assert_eq!(
            without_credential_params(p).as_deref(),
            Some("/v1beta/models/gemini-2.0-flash:generateContent?alt=sse")
        );
        assert_eq!(without_credential_params("/v1/x?KEY=1").as_deref(), Some("/v1/x"));
        assert_eq!(without_credential_params("/v1/x?api-version=2024-10-21"), None);
        assert_eq!(without_credential_params("/v1/x?keyword=1&monkey=2"), None);
        assert_eq!(without_credential_params("/v1/x"), None);
    }
}
