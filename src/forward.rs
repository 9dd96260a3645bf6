//! Which of a caller's request headers go on to the provider: a fixed
//! allowlist of what providers and Envoy need, plus the config's
//! `forward_headers`. Everything else is removed by the ingress stage, so a
//! caller cannot send headers that make the provider refuse the gateway's
//! keys (a bogus `OpenAI-Organization` answers 401 and disables a key).
//! `OpenAI-Organization` and `OpenAI-Project` come only from a key's own
//! `headers`.

/// Header names forwarded as they are.
pub const FORWARDED: &[&str] = &[
    // The body and what the caller accepts back.
    "content-type",
    "content-length",
    "content-encoding",
    "accept",
    // Not `accept-encoding`: the attempt stage reads every answer (usage,
    // error codes), so the provider answers uncompressed.
    "accept-language",
    "user-agent",
    // Provider versions and betas.
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "x-goog-api-client",
    // Envoy and the hop: request id, proxying, upgrades, tracing.
    "x-request-id",
    "host",
    "te",
    "connection",
    "upgrade",
    "transfer-encoding",
    "expect",
    "traceparent",
    "tracestate",
    "b3",
];

/// Header name prefixes forwarded: the OpenAI SDK's `x-stainless-*`,
/// `x-forwarded-*` but `x-forwarded-for` (callers' addresses are not the
/// provider's business; `x-forwarded-proto`, which Envoy sets, must stay:
/// Envoy matches the route again once a filter changes the headers, and
/// fails to without it), `x-b3-*`, `sec-websocket-*`. Never a caller's
/// `x-envoy-*`: Envoy's router would take its `x-envoy-retry-on`,
/// `x-envoy-max-retries` or `x-envoy-hedge-on-per-try-timeout` as its own
/// (Envoy's connection manager drops them from external requests, but not
/// from callers an edge config trusts as internal). Envoy adds its own
/// (`x-envoy-attempt-count`) after this stage.
pub const FORWARDED_PREFIXES: &[&str] = &["x-stainless-", "x-forwarded-", "x-b3-", "sec-websocket-"];

/// Headers only a key's own `headers` may set, never the caller nor
/// `forward_headers`.
pub const KEY_ONLY: &[&str] = &["openai-organization", "openai-project"];

/// Whether a caller's header `name` (lowercase) goes on to the provider:
/// pseudo-headers, the allowlists above, and `extra` (the config's
/// `forward_headers`: exact names, or prefixes ending in `*`).
pub fn forwarded(extra: &[String], name: &str) -> bool {
    if name.starts_with(':') {
        return true;
    }
    if KEY_ONLY.contains(&name) {
        return false;
    }
    let listed = |n: &str| match n.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => n == name,
    };
    let configured = extra.iter().any(|n| listed(n));
    if name == "x-forwarded-for" {
        return configured;
    }
    FORWARDED.contains(&name) || FORWARDED_PREFIXES.iter().any(|p| name.starts_with(p)) || configured
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_headers_go_to_the_provider() {
        let extra = vec!["x-my-trace".to_string(), "x-team-*".to_string()];
        for yes in [":path", "content-type", "anthropic-beta", "x-stainless-lang", "x-my-trace", "x-team-a"] {
            assert!(forwarded(&extra, yes), "{yes}");
        }
        for no in [
            "openai-organization",
            "openai-project",
            "cookie",
            "foo",
            "x-my-trace2",
            "x-teams",
            "x-envoy-retry-on",
            "x-envoy-max-retries",
            "x-envoy-hedge-on-per-try-timeout",
        ] {
            assert!(!forwarded(&extra, no), "{no}");
        }
        assert!(!forwarded(&["openai-*".to_string()], "openai-organization"), "key-only headers never pass");
    }

    #[test]
    fn callers_addresses_stay_unless_configured_and_envoys_own_proxy_headers_pass() {
        assert!(!forwarded(&[], "x-forwarded-for"));
        assert!(!forwarded(&[], "accept-encoding"), "answers come uncompressed");
        assert!(forwarded(&["x-forwarded-for".to_string()], "x-forwarded-for"));
        assert!(forwarded(&[], "x-forwarded-proto"));
    }
}
