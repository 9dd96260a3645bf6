//! Local replies in the OpenAI error shape, so that OpenAI SDKs surface them
//! as ordinary API errors:
//! `{"error":{"message":..,"type":..,"param":null,"code":..}}`.

use serde_json::json;

/// A reply the filter sends itself instead of contacting the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// An OpenAI-style error reply.
pub fn error(status: u32, kind: &str, code: &str, message: &str) -> Reply {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    Reply {
        status,
        headers: vec![("content-type", "application/json".to_string())],
        body: body.to_string().into_bytes(),
    }
}

/// A JSON reply (admin API).
pub fn json(status: u32, body: &serde_json::Value) -> Reply {
    Reply {
        status,
        headers: vec![("content-type", "application/json".to_string())],
        body: body.to_string().into_bytes(),
    }
}

/// 400 for a body the filter could not read.
pub fn bad_request(message: &str) -> Reply {
    error(400, "invalid_request_error", "invalid_json", message)
}

/// 500 when the host refused an operation the filter cannot do without.
pub fn gateway_error(message: &str) -> Reply {
    error(500, "api_error", "gateway_error", message)
}

/// 429 when no key can serve the request, with `retry-after`.
pub fn no_key(retry_after_secs: u64, message: &str) -> Reply {
    let mut r = error(429, "rate_limit_error", "no_available_key", message);
    r.headers.push(("retry-after", retry_after_secs.to_string()));
    r
}

/// 429 when a hard budget would be exceeded. OpenAI itself answers an
/// exhausted quota with 429 `insufficient_quota`; OpenAI SDKs surface it as a
/// `RateLimitError` whose message names the budget.
pub fn budget_exceeded(budget: &str, message: &str, retry_after_secs: Option<u64>) -> Reply {
    let mut r = error(429, "insufficient_quota", "insufficient_quota", message);
    r.headers.push(("x-apikeyrouter-budget", budget.to_string()));
    if let Some(s) = retry_after_secs {
        r.headers.push(("retry-after", s.to_string()));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn errors_have_the_openai_shape() {
        let r = error(400, "invalid_request_error", "invalid_json", "bad \"body\"");
        let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v["error"]["message"], "bad \"body\"");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_json");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn no_key_reply_carries_retry_after() {
        let r = no_key(7, "all cooling");
        assert_eq!(r.status, 429);
        assert!(r.headers.contains(&("retry-after", "7".to_string())));
    }
}
