//! The client's JSON request body: what the router needs from it (model,
//! stream, max_tokens, prompt size) and the one rewrite it makes, asking a
//! stream to report usage (`stream_options.include_usage`).

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

/// `Some(inner)` when the field is present at all, even as `null`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct Peek {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptionsPeek>>,
}

/// What the router learned from a request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    /// The body size in bytes, a cheap upper bound of the prompt.
    pub body_len: usize,
    /// `stream_options` present at all.
    pub has_stream_options: bool,
    /// `stream_options.include_usage == true`.
    pub include_usage: bool,
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
    Ok(RequestInfo {
        model: peek.model,
        stream: peek.stream.unwrap_or(false),
        max_tokens: peek.max_completion_tokens.or(peek.max_tokens),
        body_len: body.len(),
        has_stream_options: peek.stream_options.is_some(),
        include_usage: peek.stream_options.flatten().and_then(|s| s.include_usage).unwrap_or(false),
    })
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
        assert_eq!(i.max_tokens, Some(9), "max_completion_tokens wins");
        let i = info(r#"{"input":"x","stream":null}"#);
        assert!(!i.stream);
        assert_eq!(i.model, None);
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
}
