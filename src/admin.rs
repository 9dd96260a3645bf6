//! The management API, served by the ingress stage as local replies under
//! `admin.prefix` (default `/apikeyrouter/v1/`). Every response is JSON and
//! none carries key material: keys are shown by id and fingerprint.

use crate::config::{Config, Key, SecretSource};
use crate::keys::read_record;
use crate::reply::{self, Reply};
use crate::sha256::constant_time_eq;
use crate::state::{Effective, KeyRecord};
use crate::store::Store;
use serde_json::{json, Value};

/// The parts of an HTTP request the admin API looks at.
pub struct AdminRequest<'a> {
    pub method: &'a str,
    /// Path including any query string.
    pub path: &'a str,
    pub authorization: Option<&'a str>,
    pub x_api_key: Option<&'a str>,
}

/// True when `path` belongs to the admin API of `cfg`.
pub fn is_admin_path(cfg: &Config, path: &str) -> bool {
    cfg.admin.enabled && path.starts_with(&cfg.admin.prefix)
}

fn authorized(cfg: &Config, req: &AdminRequest<'_>) -> bool {
    let Some(token) = cfg.admin.token.as_deref() else {
        return false;
    };
    let bearer = req
        .authorization
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let presented = bearer.or(req.x_api_key.map(str::trim));
    presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()))
}

fn admin_error(status: u32, code: &str, message: &str) -> Reply {
    let kind = match status {
        401 => "authentication_error",
        404 => "not_found_error",
        405 => "invalid_request_error",
        _ => "api_error",
    };
    reply::error(status, kind, code, message)
}

/// Handles one admin request. `now_ms` is Unix milliseconds.
pub fn handle(cfg: &Config, store: &dyn Store, req: &AdminRequest<'_>, now_ms: u64) -> Reply {
    if !authorized(cfg, req) {
        let mut r = admin_error(
            401,
            "invalid_admin_token",
            "Missing or invalid admin token. Send it as 'Authorization: Bearer <token>' or 'X-API-Key: <token>'.",
        );
        r.headers.push(("www-authenticate", "Bearer".to_string()));
        return r;
    }
    let (path, _query) = req.path.split_once('?').unwrap_or((req.path, ""));
    let rest = path.strip_prefix(cfg.admin.prefix.as_str()).unwrap_or("");
    let rest = rest.trim_end_matches('/');
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (req.method, segments.as_slice()) {
        ("GET", ["keys"]) => {
            let keys: Vec<Value> = cfg
                .keys
                .iter()
                .map(|k| key_json(cfg, k, &read_or_default(store, k), now_ms))
                .collect();
            reply::json(200, &json!({ "keys": keys }))
        }
        ("GET", ["keys", id]) => match cfg.key_by_id(id) {
            Some((_, k)) => reply::json(200, &key_json(cfg, k, &read_or_default(store, k), now_ms)),
            None => admin_error(404, "key_not_found", &format!("No key with id '{id}'.")),
        },
        ("GET", ["providers"]) => {
            let providers: Vec<Value> = cfg
                .providers
                .iter()
                .map(|p| {
                    let ids: Vec<&str> = p
                        .keys
                        .iter()
                        .filter_map(|&i| cfg.keys.get(i))
                        .map(|k| k.id.as_str())
                        .collect();
                    json!({"id": p.id, "kind": p.kind.as_str(), "keys": ids})
                })
                .collect();
            reply::json(200, &json!({ "providers": providers }))
        }
        ("GET", ["state"]) => reply::json(200, &state_json(cfg, store, now_ms)),
        ("GET", ["health"]) => {
            let s = state_json(cfg, store, now_ms);
            let usable = s["keys"]["available"].as_u64().unwrap_or(0) > 0;
            let body = json!({
                "status": if usable { "healthy" } else { "unhealthy" },
                "version": env!("CARGO_PKG_VERSION"),
                "keys_registered": cfg.keys.len(),
                "providers_registered": cfg.providers.len(),
                "keys": s["keys"],
            });
            reply::json(if usable { 200 } else { 503 }, &body)
        }
        (_, ["keys"] | ["keys", _] | ["providers"] | ["state"] | ["health"]) => admin_error(
            405,
            "method_not_allowed",
            &format!("{} is not supported on {}.", req.method, path),
        ),
        _ => admin_error(404, "not_found", &format!("Unknown admin path '{path}'.")),
    }
}

fn read_or_default(store: &dyn Store, k: &Key) -> KeyRecord {
    read_record(store, &k.record_name).unwrap_or_default()
}

fn key_json(cfg: &Config, k: &Key, r: &KeyRecord, now_ms: u64) -> Value {
    let eff = r.effective(now_ms);
    let cooldown_until = match eff {
        Effective::Throttled { until_ms } => Some(until_ms),
        _ => None,
    };
    json!({
        "id": k.id,
        "provider": cfg.providers.get(k.provider).map(|p| p.id.as_str()),
        "state": eff.as_str(),
        "cooldown_until_ms": cooldown_until,
        "cooldown_remaining_ms": cooldown_until.map(|t| t.saturating_sub(now_ms)),
        "weight": k.weight,
        "metadata": k.metadata,
        "fingerprint": k.fingerprint,
        "source": match k.source { SecretSource::Env => "config:env", SecretSource::Inline => "config:inline" },
        "counters": {
            "requests": r.requests,
            "successes": r.successes,
            "client_errors": r.client_errors,
            "server_errors": r.server_errors,
            "rate_limited": r.rate_limited,
            "cooldowns": r.cooldowns,
            "streams": r.streams,
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "total_tokens": r.total_tokens,
        },
    })
}

fn state_json(cfg: &Config, store: &dyn Store, now_ms: u64) -> Value {
    let (mut available, mut throttled, mut disabled, mut exhausted) = (0u64, 0u64, 0u64, 0u64);
    let (mut requests, mut input, mut output, mut total) = (0u64, 0u64, 0u64, 0u64);
    for k in &cfg.keys {
        let r = read_or_default(store, k);
        match r.effective(now_ms) {
            Effective::Available => available += 1,
            Effective::Throttled { .. } => throttled += 1,
            Effective::Disabled => disabled += 1,
            Effective::Exhausted => exhausted += 1,
        }
        requests += r.requests;
        input += r.input_tokens;
        output += r.output_tokens;
        total += r.total_tokens;
    }
    json!({
        "keys": {"total": cfg.keys.len(), "available": available, "throttled": throttled,
                 "disabled": disabled, "exhausted": exhausted},
        "requests": requests,
        "tokens": {"input": input, "output": output, "total": total},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile;
    use crate::keys::record_attempt;
    use crate::state::Outcome;
    use crate::store::FakeStore;

    const TOKEN: &str = "admin-token-0123456789";

    fn cfg() -> Config {
        let json = r#"{"providers":[{"id":"openai","keys":[
            {"id":"k1","secret":"sk-material-one","metadata":{"tier":"pro"}},
            {"id":"k2","secret_env":"K2"}]}],
            "admin":{"token_env":"ADMIN"}}"#;
        let env = |n: &str| match n {
            "ADMIN" => Some(TOKEN.to_string()),
            "K2" => Some("sk-material-two".to_string()),
            _ => None,
        };
        match compile(json.as_bytes(), &env) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn get<'a>(path: &'a str, auth: Option<&'a str>) -> AdminRequest<'a> {
        AdminRequest {
            method: "GET",
            path,
            authorization: auth,
            x_api_key: None,
        }
    }

    fn body(r: &Reply) -> Value {
        serde_json::from_slice(&r.body).unwrap_or(Value::Null)
    }

    const BEARER: &str = "Bearer admin-token-0123456789";

    #[test]
    fn requests_without_the_token_get_401() {
        let c = cfg();
        let s = FakeStore::new();
        for auth in [None, Some("Bearer wrong"), Some("admin-token-0123456789")] {
            let r = handle(&c, &s, &get("/apikeyrouter/v1/keys", auth), 0);
            assert_eq!(r.status, 401, "{auth:?}");
        }
        let r = handle(
            &c,
            &s,
            &AdminRequest {
                method: "GET",
                path: "/apikeyrouter/v1/keys",
                authorization: None,
                x_api_key: Some(TOKEN),
            },
            0,
        );
        assert_eq!(r.status, 200);
    }

    #[test]
    fn keys_are_listed_with_state_counters_and_fingerprint_but_no_material() {
        let c = cfg();
        let s = FakeStore::new();
        let _ = record_attempt(
            &s,
            &c.keys[0].record_name,
            &Outcome {
                status: 429,
                ..Outcome::default()
            },
            Some(5_000),
        );
        let r = handle(&c, &s, &get("/apikeyrouter/v1/keys", Some(BEARER)), 1_000);
        assert_eq!(r.status, 200);
        let text = String::from_utf8_lossy(&r.body).to_string();
        assert!(!text.contains("sk-material"), "{text}");
        let v = body(&r);
        assert_eq!(v["keys"][0]["state"], "throttled");
        assert_eq!(v["keys"][0]["cooldown_remaining_ms"], 4_000);
        assert_eq!(v["keys"][0]["counters"]["rate_limited"], 1);
        assert_eq!(v["keys"][0]["metadata"]["tier"], "pro");
        assert_eq!(v["keys"][1]["state"], "available");
        assert_eq!(v["keys"][1]["fingerprint"], c.keys[1].fingerprint.as_str());
    }

    #[test]
    fn one_key_unknown_key_and_unknown_path() {
        let c = cfg();
        let s = FakeStore::new();
        assert_eq!(
            body(&handle(
                &c,
                &s,
                &get("/apikeyrouter/v1/keys/k2", Some(BEARER)),
                0
            ))["id"],
            "k2"
        );
        assert_eq!(
            handle(&c, &s, &get("/apikeyrouter/v1/keys/nope", Some(BEARER)), 0).status,
            404
        );
        assert_eq!(
            handle(&c, &s, &get("/apikeyrouter/v1/whatever", Some(BEARER)), 0).status,
            404
        );
        let del = AdminRequest {
            method: "DELETE",
            path: "/apikeyrouter/v1/health",
            authorization: Some(BEARER),
            x_api_key: None,
        };
        assert_eq!(handle(&c, &s, &del, 0).status, 405);
    }

    #[test]
    fn health_is_503_when_no_key_is_usable() {
        let c = cfg();
        let s = FakeStore::new();
        assert_eq!(
            handle(&c, &s, &get("/apikeyrouter/v1/health", Some(BEARER)), 0).status,
            200
        );
        for k in &c.keys {
            let _ = record_attempt(
                &s,
                &k.record_name,
                &Outcome {
                    status: 429,
                    ..Outcome::default()
                },
                Some(9_000),
            );
        }
        let r = handle(&c, &s, &get("/apikeyrouter/v1/health", Some(BEARER)), 0);
        assert_eq!(r.status, 503);
        assert_eq!(body(&r)["status"], "unhealthy");
        assert_eq!(body(&r)["keys"]["throttled"], 2);
    }
}
