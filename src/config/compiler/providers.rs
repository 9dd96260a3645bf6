//! The `providers` section: each provider with its dialect and its keys, and
//! each key's weight, pricing, headers, limits and material. Material comes
//! from an environment variable or inline, is decrypted when it is a
//! `fernet:` token, and is checked without ever being echoed in a refusal.

use super::Env;
use crate::budget::KeyPricing;
use crate::config::model::{fingerprint, Key, Provider, ProviderKind, SecretSource, MAX_KEYS, MAX_WEIGHT};
use crate::config::walk::{check_id, decimal, err, ConfigError, Obj};
use crate::quota::Limits;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde_json::{Map, Value};

/// Decrypts `fernet:` key material (the original design's variable).
pub const ENCRYPTION_KEY_ENV: &str = "APIKEYROUTER_ENCRYPTION_KEY";

/// `providers`: required, at least one; key indexes run across providers.
pub(super) fn providers(root: &mut Obj, env: Env<'_>) -> Result<(Vec<Provider>, Vec<Key>), ConfigError> {
    let mut providers = Vec::new();
    let mut keys: Vec<Key> = Vec::new();
    let provider_values = root.req_array("providers")?;
    if provider_values.is_empty() {
        return Err(err("providers", "at least one provider is required"));
    }
    for (pi, pv) in provider_values.into_iter().enumerate() {
        let provider = provider(pv, &format!("providers[{pi}]"), &providers, &mut keys, env)?;
        providers.push(provider);
    }
    Ok((providers, keys))
}

/// The provider a key is compiled for.
struct Owner<'a> {
    /// Its index in [`Config::providers`](crate::config::Config::providers).
    index: usize,
    id: &'a str,
    kind: ProviderKind,
}

/// `providers[i]`: its keys are appended to `keys`.
fn provider(
    pv: Value,
    path: &str,
    providers: &[Provider],
    keys: &mut Vec<Key>,
    env: Env<'_>,
) -> Result<Provider, ConfigError> {
    let mut p = Obj::new(pv, path)?;
    let id = p.req_id("id")?;
    if providers.iter().any(|q: &Provider| q.id == id) {
        return Err(err(&p.field("id"), format!("duplicate provider id {id:?}")));
    }
    let kind = provider_kind(&mut p)?;
    let anthropic_version = p.opt_str("anthropic_version")?.unwrap_or_else(|| "2023-06-01".to_string());
    let api_version = p.opt_str("api_version")?.unwrap_or_else(|| "2024-10-21".to_string());
    let deployments = deployments(&mut p, kind)?;
    let owner = Owner { index: providers.len(), id: &id, kind };
    let indexes = provider_keys(&mut p, path, &owner, keys, env)?;
    p.finish()?;
    let mut pricings: Vec<KeyPricing> = Vec::new();
    for key in indexes.iter().filter_map(|&k| keys.get(k)) {
        if !pricings.contains(&key.pricing) {
            pricings.push(key.pricing);
        }
    }
    Ok(Provider { id, kind, anthropic_version, api_version, deployments, keys: indexes, pricings })
}

/// `providers[i].deployments` (azure only): deployment name -> the model it
/// serves, for policy, prices and budgets of requests to deployment paths.
fn deployments(p: &mut Obj, kind: ProviderKind) -> Result<Vec<(String, String)>, ConfigError> {
    let field = p.field("deployments");
    let Some(map) = p.opt_obj_raw("deployments")? else {
        return Ok(Vec::new());
    };
    if kind != ProviderKind::Azure {
        return Err(err(&field, "only a provider of kind azure has deployments"));
    }
    let mut out = Vec::new();
    for (name, v) in &map {
        let valid = |n: &str| n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        match v {
            Value::String(model) if !model.is_empty() && !name.is_empty() && valid(name) => {
                out.push((name.clone(), model.clone()))
            }
            _ => {
                return Err(err(
                    &format!("{field}.{name}"),
                    "expected a deployment name of 1-64 A-Za-z0-9, '-' or '_' and the model it serves, e.g. \"gpt-4o\"",
                ))
            }
        }
    }
    Ok(out)
}

/// `providers[i].keys`: appended to `keys`; their indexes there.
fn provider_keys(
    p: &mut Obj,
    path: &str,
    owner: &Owner<'_>,
    keys: &mut Vec<Key>,
    env: Env<'_>,
) -> Result<Vec<usize>, ConfigError> {
    let key_values = p.req_array("keys")?;
    if key_values.is_empty() {
        return Err(err(&p.field("keys"), "a provider needs at least one key"));
    }
    let mut indexes = Vec::new();
    for (ki, kv) in key_values.into_iter().enumerate() {
        let kpath = format!("{path}.keys[{ki}]");
        let key = key(kv, &kpath, owner, env)?;
        if keys.iter().any(|k| k.id == key.id) {
            return Err(err(&format!("{kpath}.id"), format!("duplicate key id {:?}", key.id)));
        }
        if keys.len() >= MAX_KEYS {
            return Err(err(&kpath, format!("more than {MAX_KEYS} keys in total")));
        }
        indexes.push(keys.len());
        keys.push(key);
    }
    Ok(indexes)
}

/// `providers[i].kind`: `openai` when absent.
fn provider_kind(p: &mut Obj) -> Result<ProviderKind, ConfigError> {
    match p.opt_str("kind")?.as_deref() {
        None => Ok(ProviderKind::OpenAi),
        Some(k) => ProviderKind::parse(k).ok_or_else(|| {
            err(
                &p.field("kind"),
                format!("unknown provider kind {k:?} (expected openai, openai_compatible, azure, anthropic, gemini or gemini_openai)"),
            )
        }),
    }
}

/// `providers[i].keys[j]`.
fn key(v: Value, path: &str, owner: &Owner<'_>, env: Env<'_>) -> Result<Key, ConfigError> {
    let kind = owner.kind;
    let mut k = Obj::new(v, path)?;
    let id = k.req_id("id")?;
    let weight = k.opt_u64_in("weight", 1, MAX_WEIGHT)?.unwrap_or(1) as u32;
    let metadata = k.opt_obj_raw("metadata")?.unwrap_or_default();
    let cost_per_1k = cost_per_1k(&mut k, &metadata)?;
    let multiplier = price_multiplier(&mut k)?;
    let extra_headers = headers(&mut k, kind)?;
    let limits = limits(&mut k)?;
    let group = match k.opt_str("group")? {
        Some(g) => Some(check_id(&k.field("group"), g)?),
        None => None,
    };
    let (secret, source) = material(&mut k, path, &id, env)?;
    k.finish()?;
    let fingerprint = fingerprint(&secret);
    Ok(Key {
        record_name: crate::shared_data::key_record(owner.id, &id),
        id,
        provider: owner.index,
        weight,
        metadata,
        source,
        fingerprint,
        auth_header: kind.auth("").0,
        auth_value: kind.auth(&secret).1,
        extra_headers,
        cost_score_price: cost_per_1k.and_then(|d| d.to_f64()),
        pricing: KeyPricing { cost_per_1k, multiplier },
        cost_per_1k,
        limits,
        budgets: Vec::new(),
        group,
    })
}

/// `cost_per_1k`, or else `metadata.cost_per_1k`.
fn cost_per_1k(k: &mut Obj, metadata: &Map<String, Value>) -> Result<Option<Decimal>, ConfigError> {
    let (field, v) = match k.take("cost_per_1k") {
        Some(v) => ("cost_per_1k", v),
        None => match metadata.get("cost_per_1k") {
            Some(v) => ("metadata.cost_per_1k", v.clone()),
            None => return Ok(None),
        },
    };
    decimal(&v).map(Some).ok_or_else(|| err(&k.field(field), "expected a non-negative decimal, e.g. \"0.0025\""))
}

/// `price_multiplier`: how this key's price differs from the price table.
fn price_multiplier(k: &mut Obj) -> Result<Option<Decimal>, ConfigError> {
    k.take("price_multiplier")
        .map(|v| {
            decimal(&v)
                .ok_or_else(|| err(&k.field("price_multiplier"), "expected a non-negative decimal, e.g. \"0.8\""))
        })
        .transpose()
}

/// `headers`: the key's own headers, names lowercased; never the auth
/// header, `host` or a pseudo-header.
fn headers(k: &mut Obj, kind: ProviderKind) -> Result<Vec<(String, String)>, ConfigError> {
    let mut extra_headers = Vec::new();
    if let Some(h) = k.opt_obj("headers")? {
        for (name, v) in h.entries() {
            let field = h.field(name);
            let value = v.as_str().ok_or_else(|| err(&field, "expected a string"))?;
            let lname = name.to_ascii_lowercase();
            let valid_name = !lname.is_empty() && lname.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !valid_name || lname.starts_with(':') || lname == "host" || lname == kind.auth("").0 {
                return Err(err(&field, "not a header a key may set"));
            }
            if value.bytes().any(|b| b < 0x20 || b == 0x7f) {
                return Err(err(&field, "header values must not contain control characters"));
            }
            extra_headers.push((lname, value.to_string()));
        }
    }
    Ok(extra_headers)
}

/// `limits`: the provider's quotas for this key.
fn limits(k: &mut Obj) -> Result<Limits, ConfigError> {
    let Some(mut l) = k.opt_obj("limits")? else {
        return Ok(Limits::default());
    };
    let limits = Limits {
        rpm: l.opt_u64_in("rpm", 1, u32::MAX as u64)?,
        tpm: l.opt_u64_in("tpm", 1, u64::MAX >> 1)?,
        daily_tokens: l.opt_u64_in("daily_tokens", 1, u64::MAX >> 1)?,
        monthly_tokens: l.opt_u64_in("monthly_tokens", 1, u64::MAX >> 1)?,
    };
    l.finish()?;
    Ok(limits)
}

/// The key material from exactly one of `secret_env` and `secret`,
/// decrypted and checked.
fn material(k: &mut Obj, path: &str, id: &str, env: Env<'_>) -> Result<(String, SecretSource), ConfigError> {
    let (secret, source) = source(k, path, env)?;
    let secret_field = match source {
        SecretSource::Env => k.field("secret_env"),
        SecretSource::Inline | SecretSource::Runtime => k.field("secret"),
    };
    let secret = match secret.strip_prefix("fernet:") {
        None => secret,
        Some(token) => decrypt(token, &secret_field, id, env)?,
    };
    if secret.is_empty() {
        return Err(err(&secret_field, "key material is empty"));
    }
    if !secret.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        // Never echo the material itself.
        return Err(err(
            &secret_field,
            "key material must be printable ASCII without spaces (it is sent in an HTTP header)",
        ));
    }
    Ok((secret, source))
}

/// `secret_env` (looked up and trimmed) or `secret`, exactly one of them.
fn source(k: &mut Obj, path: &str, env: Env<'_>) -> Result<(String, SecretSource), ConfigError> {
    let secret_env = k.opt_str("secret_env")?;
    let secret_inline = k.opt_str("secret")?;
    match (secret_env, secret_inline) {
        (Some(_), Some(_)) => Err(err(path, "set exactly one of secret_env and secret, not both")),
        (None, None) => Err(err(path, "one of secret_env or secret is required")),
        (Some(name), None) => match env(&name) {
            Some(v) if !v.trim().is_empty() => Ok((v.trim().to_string(), SecretSource::Env)),
            Some(_) => Err(err(&k.field("secret_env"), format!("environment variable {name} is empty"))),
            None => Err(err(
                &k.field("secret_env"),
                format!(
                    "environment variable {name} is not set (list it in vm_config.environment_variables.host_env_keys)"
                ),
            )),
        },
        (None, Some(s)) => Ok((s, SecretSource::Inline)),
    }
}

/// A `fernet:` token decrypted with [`ENCRYPTION_KEY_ENV`].
fn decrypt(token: &str, secret_field: &str, id: &str, env: Env<'_>) -> Result<String, ConfigError> {
    let Some(key) = env(ENCRYPTION_KEY_ENV) else {
        return Err(err(
            secret_field,
            format!("key {id} is a fernet token but {ENCRYPTION_KEY_ENV} is not set (list it in vm_config.environment_variables.host_env_keys)"),
        ));
    };
    match crate::fernet::decrypt(&key, token) {
        Ok(plain) => String::from_utf8(plain)
            .map_err(|_| err(secret_field, format!("key {id}: its fernet token does not hold text"))),
        Err(e) => {
            Err(err(secret_field, format!("key {id}: cannot decrypt its fernet token with {ENCRYPTION_KEY_ENV}: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixture::{env, ok};
    use crate::config::{compile, ApiShape};

    #[test]
    fn each_provider_kind_sends_the_key_its_own_way() {
        let c = ok(r#"{"providers":[
            {"id":"o","kind":"openai","keys":[{"id":"a","secret":"s1","headers":{"OpenAI-Organization":"org-1"}}]},
            {"id":"z","kind":"azure","keys":[{"id":"b","secret":"s2"}]},
            {"id":"n","kind":"anthropic","keys":[{"id":"c","secret":"s3"}]},
            {"id":"g","kind":"gemini","keys":[{"id":"d","secret":"s4"}]},
            {"id":"h","kind":"gemini_openai","keys":[{"id":"e","secret":"s5"}]}]}"#);
        let auth: Vec<(&str, &str)> = c.keys.live().map(|(_, k)| (k.auth_header, k.auth_value.as_str())).collect();
        assert_eq!(
            auth,
            vec![
                ("authorization", "Bearer s1"),
                ("api-key", "s2"),
                ("x-api-key", "s3"),
                ("x-goog-api-key", "s4"),
                ("authorization", "Bearer s5")
            ]
        );
        assert_eq!(c.keys[0].extra_headers, vec![("openai-organization".to_string(), "org-1".to_string())]);
        assert_eq!(c.providers[2].anthropic_version, "2023-06-01");
        assert_eq!(ApiShape::of_path("/v1/messages"), ApiShape::Anthropic);
        assert_eq!(
            ApiShape::of_path("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"),
            ApiShape::Gemini
        );
        assert_eq!(ApiShape::of_path("/openai/deployments/d/chat/completions?api-version=1"), ApiShape::OpenAi);
    }

    #[test]
    fn azure_deployments_map_names_to_models_and_are_validated() {
        let c = ok(
            r#"{"providers":[{"id":"az","kind":"azure","deployments":{"gpt4o-prod":"gpt-4o","mini_v2":"gpt-4o-mini"},
            "keys":[{"id":"a","secret":"s"}]}]}"#,
        );
        assert_eq!(
            c.providers[0].deployments,
            vec![("gpt4o-prod".to_string(), "gpt-4o".to_string()), ("mini_v2".to_string(), "gpt-4o-mini".to_string())]
        );
        let bad = |provider: &str| format!(r#"{{"providers":[{{{provider},"keys":[{{"id":"a","secret":"s"}}]}}]}}"#);
        let cases = [
            (
                bad(r#""id":"o","deployments":{"d":"gpt-4o"}"#),
                "providers[0].deployments",
                "only a provider of kind azure",
            ),
            (bad(r#""id":"z","kind":"azure","deployments":[]"#), "providers[0].deployments", "expected an object"),
            (bad(r#""id":"z","kind":"azure","deployments":{"a/b":"m"}"#), "providers[0].deployments.a/b", "1-64"),
            (bad(r#""id":"z","kind":"azure","deployments":{"a.b":"m"}"#), "providers[0].deployments.a.b", "1-64"),
            (
                bad(r#""id":"z","kind":"azure","deployments":{"d":""}"#),
                "providers[0].deployments.d",
                "the model it serves",
            ),
            (
                bad(r#""id":"z","kind":"azure","deployments":{"d":1}"#),
                "providers[0].deployments.d",
                "the model it serves",
            ),
        ];
        for (json, field, reason) in cases {
            let e = compile(json.as_bytes(), &env).err().unwrap_or_else(|| panic!("accepted {json}"));
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.reason.contains(reason), "{json}: {e}");
        }
    }

    #[test]
    fn fernet_encrypted_material_is_decrypted_with_the_encryption_key() {
        // The Fernet specification's test vector: "hello".
        let token =
            "gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64jVmpU4IwqDA==";
        let json = format!(r#"{{"providers":[{{"id":"p","keys":[{{"id":"k1","secret":"fernet:{token}"}}]}}]}}"#);
        let good =
            |n: &str| (n == ENCRYPTION_KEY_ENV).then(|| "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=".to_string());
        let c = compile(json.as_bytes(), &good).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.keys[0].auth_value, "Bearer hello");
        let wrong =
            |n: &str| (n == ENCRYPTION_KEY_ENV).then(|| "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_string());
        let e = compile(json.as_bytes(), &wrong).err().unwrap_or_else(|| panic!("accepted"));
        assert_eq!(e.field, "providers[0].keys[0].secret");
        assert!(e.reason.contains("key k1: cannot decrypt"), "{e}");
        let e = compile(json.as_bytes(), &|_| None).err().unwrap_or_else(|| panic!("accepted"));
        assert!(e.reason.contains("APIKEYROUTER_ENCRYPTION_KEY is not set"), "{e}");
    }

    #[test]
    fn refusal_message_never_echoes_key_material() {
        let json = r#"{"providers":[{"id":"p","keys":[{"id":"k1","secret":"sk-secret value"}]}]}"#;
        let e = compile(json.as_bytes(), &env).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!e.contains("sk-secret"), "{e}");
    }
}
