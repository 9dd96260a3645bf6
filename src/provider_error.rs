//! What a provider's error answer says, read per dialect, and the verdict
//! the attempt stage draws from it: whether the key itself is at fault, and
//! whether another key may serve the request.
//!
//! Only a key's own failure changes the key. An error disables a key when
//! its body names a bad key in the provider's own dialect
//! ([`blames_key`]); any other 401 or 403 (an organization header, a model
//! the project may not use, a region) is the caller's answer: it goes back
//! to the caller, the key stays available, and no other key is tried.

use crate::config::ProviderKind;
use serde_json::Value;

/// The identifiers an error body carries, most specific first:
/// - OpenAI, OpenAI-compatible and Azure: `error.code`, then `error.type`
///   (a numeric code only from Azure: other services put the HTTP status
///   there, which says nothing about the key);
/// - Anthropic: `error.type` (`{"type":"error","error":{"type":...}}`);
/// - Gemini: each `error.details[].reason` (`API_KEY_INVALID`), then
///   `error.status` (`PERMISSION_DENIED`).
///
/// Empty when the body is not JSON or carries none of them.
pub fn codes(body: &[u8], kind: ProviderKind) -> Vec<String> {
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    // Gemini's OpenAI endpoint wraps some errors in a one-element array.
    if let Value::Array(a) = &mut v {
        let first = a.drain(..).next().unwrap_or(Value::Null);
        v = first;
    }
    let Some(e) = v.get("error") else {
        return Vec::new();
    };
    let text = |v: Option<&Value>| match v {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let mut out = Vec::new();
    match kind {
        ProviderKind::Anthropic => out.extend(text(e.get("type"))),
        ProviderKind::Gemini => {
            let details = e.get("details").and_then(Value::as_array).into_iter().flatten();
            out.extend(details.filter_map(|d| text(d.get("reason"))));
            out.extend(text(e.get("status")));
        }
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible | ProviderKind::Azure | ProviderKind::GeminiOpenAi => {
            match e.get("code") {
                Some(Value::Number(_)) if kind != ProviderKind::Azure => {}
                c => out.extend(text(c)),
            }
            out.extend(text(e.get("type")));
            // Gemini's OpenAI endpoint answers some errors in Gemini's form.
            if kind == ProviderKind::GeminiOpenAi {
                let details = e.get("details").and_then(Value::as_array).into_iter().flatten();
                out.extend(details.filter_map(|d| text(d.get("reason"))));
            }
        }
    }
    out.truncate(8);
    out
}

/// Whether `code` says, in `kind`'s dialect, that the key itself is bad
/// (invalid, revoked, deactivated, blocked): the key is disabled and the
/// request may go to another key. Codes a caller can provoke are not here.
pub fn blames_key(kind: ProviderKind, code: &str) -> bool {
    const OPENAI: &[&str] = &["invalid_api_key", "account_deactivated", "no_organization"];
    // `error.details[].reason`: a key that is invalid, or blocked for this
    // API, or whose project has the API off or is suspended.
    const GEMINI: &[&str] = &[
        "API_KEY_INVALID",
        "API_KEY_SERVICE_BLOCKED",
        "SERVICE_DISABLED",
        "CONSUMER_SUSPENDED",
        "API_KEY_IP_ADDRESS_BLOCKED",
    ];
    match kind {
        ProviderKind::OpenAi => OPENAI.contains(&code),
        ProviderKind::OpenAiCompatible => ["invalid_api_key", "account_deactivated"].contains(&code),
        // "Access denied due to invalid subscription key", and key
        // authentication switched off on the resource.
        ProviderKind::Azure => ["401", "AuthenticationTypeDisabled"].contains(&code),
        ProviderKind::Anthropic => code == "authentication_error",
        ProviderKind::Gemini | ProviderKind::GeminiOpenAi => GEMINI.contains(&code),
    }
}

/// Error codes that blame the key only when the key itself sent the header
/// they are about: a caller's `OpenAI-Organization` (forwarded only if the
/// operator allows it) must not get the key disabled, but a key configured
/// with the wrong organization is broken.
pub fn about_own_header(code: &str) -> Option<&'static str> {
    match code {
        "mismatched_organization" | "invalid_organization" => Some("openai-organization"),
        "mismatched_project" | "invalid_project" => Some("openai-project"),
        _ => None,
    }
}

/// Statuses worth another attempt whatever the key's state: the provider
/// failed (500, 502, 503, and Anthropic's 529 "overloaded"). A 504 is not:
/// the provider may have served (and billed) the request.
pub fn server_failed(status: u32) -> bool {
    matches!(status, 500 | 502 | 503 | 529)
}

/// The response header by which the attempt stage tells Envoy's router
/// that another key may serve this request: the shipped routes retry on it
/// (`retry_on: retriable-headers`), not on bare status codes.
pub const RETRY_HEADER: &str = "x-apikeyrouter-retry";
/// Its one value.
pub const RETRY_VALUE: &str = "another-key";

#[cfg(test)]
mod tests {
    use super::*;

    fn of(body: &str, kind: ProviderKind) -> Vec<String> {
        codes(body.as_bytes(), kind)
    }

    #[test]
    fn openai_errors_give_their_code_then_their_type() {
        let b = r#"{"error":{"message":"Incorrect API key provided: sk-****abcd.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
        assert_eq!(of(b, ProviderKind::OpenAi), ["invalid_api_key", "invalid_request_error"]);
        let b = r#"{"error":{"message":"x","type":"invalid_request_error","param":null,"code":null}}"#;
        assert_eq!(of(b, ProviderKind::OpenAiCompatible), ["invalid_request_error"]);
    }

    #[test]
    fn azure_numeric_and_string_codes_are_read() {
        let b = r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key or wrong API endpoint."}}"#;
        assert_eq!(of(b, ProviderKind::Azure), ["401"]);
        assert_eq!(of(r#"{"error":{"code":401,"message":"x"}}"#, ProviderKind::Azure), ["401"]);
    }

    #[test]
    fn a_numeric_code_from_another_openai_style_service_is_ignored() {
        let b = r#"{"error":{"code":401,"type":"auth_error","message":"model not allowed for this key"}}"#;
        assert_eq!(of(b, ProviderKind::OpenAiCompatible), ["auth_error"]);
        assert_eq!(
            of(r#"[{"error":{"code":401,"status":"UNAUTHENTICATED"}}]"#, ProviderKind::GeminiOpenAi),
            Vec::<String>::new()
        );
    }

    #[test]
    fn only_the_providers_own_bad_key_codes_blame_the_key() {
        assert!(blames_key(ProviderKind::Azure, "401"));
        // A LiteLLM proxy's "401" for a model the key may not use does not.
        assert!(!blames_key(ProviderKind::OpenAiCompatible, "401"));
        assert!(!blames_key(ProviderKind::OpenAi, "401"));
        assert!(blames_key(ProviderKind::OpenAi, "invalid_api_key"));
        assert!(!blames_key(ProviderKind::OpenAi, "model_not_found"));
        assert!(!blames_key(ProviderKind::OpenAi, "mismatched_organization"));
        assert!(blames_key(ProviderKind::Anthropic, "authentication_error"));
        assert!(!blames_key(ProviderKind::Anthropic, "permission_error"));
        assert!(blames_key(ProviderKind::GeminiOpenAi, "API_KEY_INVALID"));
        assert!(!blames_key(ProviderKind::Gemini, "PERMISSION_DENIED"));
    }

    #[test]
    fn anthropic_errors_give_their_type() {
        let b = r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#;
        assert_eq!(of(b, ProviderKind::Anthropic), ["authentication_error"]);
    }

    #[test]
    fn gemini_errors_give_their_detail_reasons_then_their_status() {
        let b = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT",
            "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#;
        assert_eq!(of(b, ProviderKind::Gemini), ["API_KEY_INVALID", "INVALID_ARGUMENT"]);
        // The numeric code is an HTTP status, not an identifier.
        assert_eq!(
            of(r#"{"error":{"code":403,"status":"PERMISSION_DENIED"}}"#, ProviderKind::Gemini),
            ["PERMISSION_DENIED"]
        );
    }

    #[test]
    fn gemini_openai_errors_in_an_array_are_read() {
        let b = r#"[{"error":{"code":400,"status":"INVALID_ARGUMENT","details":[{"reason":"API_KEY_INVALID"}]}}]"#;
        assert_eq!(of(b, ProviderKind::GeminiOpenAi), ["API_KEY_INVALID"]);
    }

    #[test]
    fn bodies_without_an_error_object_give_nothing() {
        for b in ["", "<html>401</html>", "{}", r#"{"error":"nope"}"#, r#"{"error":{"code":{},"type":[]}}"#, "null"] {
            assert!(of(b, ProviderKind::OpenAi).is_empty(), "{b}");
            assert!(of(b, ProviderKind::Gemini).is_empty(), "{b}");
        }
    }

    #[test]
    fn organization_and_project_codes_are_about_the_matching_header() {
        assert_eq!(about_own_header("mismatched_organization"), Some("openai-organization"));
        assert_eq!(about_own_header("mismatched_project"), Some("openai-project"));
        assert_eq!(about_own_header("invalid_api_key"), None);
    }
}
