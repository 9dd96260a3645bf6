//! Config parsing and compilation: `config::compile` on arbitrary bytes.
//!
//! Properties checked, beyond "never panics":
//! - compiling is deterministic;
//! - key material never reaches the `Debug` output of a compiled config, nor
//!   a refusal: the same document compiled with different key material (every
//!   inline `secret` rewritten character by character, every environment
//!   variable and the admin token given other values of the same length and
//!   validity) gives the same `Debug` output once fingerprints are set aside,
//!   or the very same error;
//! - a config that compiles keeps its documented invariants (ids, weights,
//!   index links, cooldown bounds, admin token and prefix, auth header).
#![no_main]

use apikeyrouter::config::{compile, Config};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// 64-bit FNV-1a: a stable, dependency-free hash of an env var name.
fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The environment seen by the compiler. `variant` changes every value's
/// content but never its length or validity, so a config must compile (or
/// fail) the same way under both variants.
///
/// - `UNSET*` and the empty name are not set;
/// - `BLANK*` holds only spaces;
/// - `SHORT*` holds 8 characters (too short for an admin token);
/// - `PAD*` holds a secret surrounded by spaces (trimmed by the compiler);
/// - any other name holds a 23-character secret.
fn env(name: &str, variant: u8) -> Option<String> {
    let h = fnv(name) ^ u64::from(variant).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let tag = if variant == 0 { 'A' } else { 'B' };
    if name.is_empty() || name.starts_with("UNSET") {
        None
    } else if name.starts_with("BLANK") {
        Some("   ".to_string())
    } else if name.starts_with("SHORT") {
        Some(format!("s{tag}{:06x}", h & 0xff_ffff))
    } else if name.starts_with("PAD") {
        Some(format!("  sk-{tag}{:016x}  ", h))
    } else {
        Some(format!("sk-{tag}-{:016x}", h))
    }
}

/// Rewrites key material: every printable, non-space ASCII byte becomes
/// another one (rotated by half the range), anything else is left alone, so
/// the validity of the material is unchanged while its content differs.
fn rotate(s: &str) -> String {
    s.chars()
        .map(|c| {
            let b = c as u32;
            if (0x21..0x7f).contains(&b) {
                char::from_u32(0x21 + (b - 0x21 + 47) % 94).unwrap_or(c)
            } else {
                c
            }
        })
        .collect()
}

/// Applies `rotate` to every `providers[].keys[].secret` string.
fn rotate_inline_secrets(v: &mut Value) {
    let Some(providers) = v.get_mut("providers").and_then(Value::as_array_mut) else {
        return;
    };
    for p in providers {
        let Some(keys) = p.get_mut("keys").and_then(Value::as_array_mut) else {
            continue;
        };
        for k in keys {
            if let Some(Value::String(s)) = k.get_mut("secret") {
                *s = rotate(s);
            }
        }
    }
}

/// `Debug` output with each key's fingerprint replaced by a placeholder.
fn shown(c: &Config) -> String {
    let mut s = format!("{c:?}");
    for (_, k) in c.keys.live() {
        s = s.replace(&k.fingerprint, "sha256:<fingerprint>");
    }
    s
}

fn invariants(c: &Config) {
    assert!(!c.providers.is_empty());
    assert!(c.keys.count() > 0);
    assert_eq!(c.keys.count(), c.keys.slots(), "a compiled config has no empty slot");
    assert!(c.keys.slots() <= apikeyrouter::config::MAX_KEYS);
    let valid_id =
        |s: &str| (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let mut seen = std::collections::HashSet::new();
    let mut linked = 0;
    for (pi, p) in c.providers.iter().enumerate() {
        assert!(valid_id(&p.id), "provider id {:?}", p.id);
        assert!(seen.insert(p.id.clone()), "duplicate provider id {:?}", p.id);
        assert!(!p.keys.is_empty());
        for &ki in &p.keys {
            let Some(k) = c.keys.get(ki) else { panic!("provider {} links to no key {ki}", p.id) };
            assert_eq!(k.provider, pi, "key {} links to the wrong provider", k.id);
            linked += 1;
        }
    }
    assert_eq!(linked, c.keys.count(), "every key belongs to exactly one provider");
    let mut seen = std::collections::HashSet::new();
    for (_, k) in c.keys.live() {
        assert!(valid_id(&k.id), "key id {:?}", k.id);
        assert!(seen.insert(k.id.clone()), "duplicate key id {:?}", k.id);
        assert!((1..=apikeyrouter::config::MAX_WEIGHT).contains(&u64::from(k.weight)));
        // Bearer for the OpenAI-style kinds; the bare key for api-key,
        // x-api-key and x-goog-api-key.
        let secret = if k.auth_header == "authorization" {
            k.auth_value.strip_prefix("Bearer ").unwrap_or_default()
        } else {
            k.auth_value.as_str()
        };
        assert!(!secret.is_empty(), "auth header of {:?} holds no key", k.id);
        assert!(
            secret.bytes().all(|b| (0x21..0x7f).contains(&b)),
            "key {} has material that cannot go in a header",
            k.id
        );
        assert_eq!(k.fingerprint, apikeyrouter::config::fingerprint(secret));
    }
    // Two keys sharing a shared-data record would share cooldowns and counters.
    let records: std::collections::HashSet<&str> = c.keys.live().map(|(_, k)| k.record_name.as_str()).collect();
    assert_eq!(records.len(), c.keys.count(), "two keys share a state record");
    assert!(c.cooldown.default_ms >= 1000);
    assert!(c.cooldown.default_ms <= c.cooldown.max_ms);
    let prefix = &c.admin.prefix;
    assert!(prefix.len() >= 2 && prefix.starts_with('/') && prefix.ends_with('/'));
    assert!(!prefix.starts_with("/v1/"));
    assert_eq!(c.admin.enabled, c.admin.token_sha256.is_some());
    assert!(c.admin.read_token_sha256.is_none() || c.admin.read_token_sha256 != c.admin.token_sha256);
}

fuzz_target!(|data: &[u8]| {
    let a = compile(data, &|n| env(n, 0));
    assert_eq!(a, compile(data, &|n| env(n, 0)), "compile is not deterministic");
    if let Ok(c) = &a {
        invariants(c);
    }

    // The same document with other key material. It is compared through its
    // re-serialized form so that both sides went through the same bytes.
    let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(plain) = serde_json::to_vec(&v) else {
        return;
    };
    rotate_inline_secrets(&mut v);
    let Ok(rotated) = serde_json::to_vec(&v) else {
        return;
    };
    let a = compile(&plain, &|n| env(n, 0));
    let b = compile(&rotated, &|n| env(n, 1));
    match (&a, &b) {
        (Ok(a), Ok(b)) => assert_eq!(shown(a), shown(b), "key material shows in the Debug output"),
        (Err(a), Err(b)) => assert_eq!(a, b, "a refusal depends on the key material"),
        _ => panic!("key material of the same validity changed the outcome: {a:?} vs {b:?}"),
    }
});
