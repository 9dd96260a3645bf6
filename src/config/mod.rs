//! Plugin configuration: the JSON an operator writes inside Envoy YAML, and
//! the validated runtime form it is compiled into once per VM.
//!
//! Parsing walks a `serde_json::Value` by hand so that every error names the
//! exact field (`providers[0].keys[1].weight: ...`). Key material is resolved
//! through a caller-supplied environment lookup, so the compiler stays pure.
//!
//! ```
//! use apikeyrouter::config::compile;
//! let json = br#"{"providers":[{"id":"openai","kind":"openai",
//!     "keys":[{"id":"k1","secret_env":"K1"}]}]}"#;
//! let cfg = compile(json, &|name| (name == "K1").then(|| "sk-test".to_string())).unwrap();
//! assert_eq!(cfg.keys.get(cfg.providers[0].keys[0]).map(|k| k.id.as_str()), Some("k1"));
//! ```
//!
//! The files: `model` holds the compiled runtime types, `walk` the JSON
//! walker that names each refused field, and `compiler` the compiler, one
//! function per configuration section.

mod compiler;
#[cfg(test)]
mod fixture;
mod model;
mod walk;

pub use compiler::{compile, ENCRYPTION_KEY_ENV};
pub use model::{
    fingerprint, Admin, Alerts, ApiShape, Config, Cooldown, Decisions, Estimate, EtcdAuth, Fleet, Key, KeyTable,
    Objects, Provider, ProviderKind, Routing, RoutingHeaders, SecretSource, StatusAction, UnknownModel, MAX_KEYS,
    MAX_WEIGHT,
};
pub use walk::{check_id, ConfigError};
