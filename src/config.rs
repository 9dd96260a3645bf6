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
//! assert_eq!(cfg.keys[cfg.providers[0].keys[0]].id, "k1");
//! ```

use crate::budget::{Budget, Enforcement, KeyPricing, Price, PriceTable, Scope};
use crate::crypto;
use crate::identity::{Client, Policy};
use crate::objective::Objective;
use crate::quota::{Limits, Thresholds};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use std::fmt;
use std::str::FromStr;

/// Where a configuration error was found and why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `providers[0].keys[1].weight`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid apikeyrouter config: {}: {}", self.field, self.reason)
    }
}

fn err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError { field: field.to_string(), reason: reason.into() }
}

/// The provider dialect: how the key is sent and how responses are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI: `Authorization: Bearer`.
    OpenAi,
    /// OpenAI-compatible services (Groq, Mistral, DeepSeek, Together,
    /// OpenRouter, vLLM, ...): `Authorization: Bearer`.
    OpenAiCompatible,
    /// Azure OpenAI: `api-key`; deployment paths and `api-version` untouched.
    Azure,
    /// Anthropic: `x-api-key` plus a default `anthropic-version`.
    Anthropic,
    /// Gemini's native API: `x-goog-api-key`.
    Gemini,
    /// Gemini's OpenAI-compatible endpoint: `Authorization: Bearer`.
    GeminiOpenAi,
}

/// The request and response format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiShape {
    OpenAi,
    Anthropic,
    Gemini,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::OpenAiCompatible => "openai_compatible",
            ProviderKind::Azure => "azure",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::GeminiOpenAi => "gemini_openai",
        }
    }

    fn parse(s: &str) -> Option<ProviderKind> {
        [
            ProviderKind::OpenAi,
            ProviderKind::OpenAiCompatible,
            ProviderKind::Azure,
            ProviderKind::Anthropic,
            ProviderKind::Gemini,
            ProviderKind::GeminiOpenAi,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// The header that carries the key, and its value for `secret`.
    pub fn auth(self, secret: &str) -> (&'static str, String) {
        match self {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible | ProviderKind::GeminiOpenAi => {
                ("authorization", format!("Bearer {secret}"))
            }
            ProviderKind::Azure => ("api-key", secret.to_string()),
            ProviderKind::Anthropic => ("x-api-key", secret.to_string()),
            ProviderKind::Gemini => ("x-goog-api-key", secret.to_string()),
        }
    }

    pub fn shape(self) -> ApiShape {
        match self {
            ProviderKind::Anthropic => ApiShape::Anthropic,
            ProviderKind::Gemini => ApiShape::Gemini,
            _ => ApiShape::OpenAi,
        }
    }
}

impl ApiShape {
    /// The API shape a request path belongs to.
    pub fn of_path(path: &str) -> ApiShape {
        let path = path.split('?').next().unwrap_or(path);
        if path.ends_with("/v1/messages") || path.contains("/v1/messages/") {
            ApiShape::Anthropic
        } else if path.contains(":generateContent")
            || path.contains(":streamGenerateContent")
            || path.contains(":embedContent")
            || path.contains(":countTokens")
        {
            ApiShape::Gemini
        } else {
            ApiShape::OpenAi
        }
    }
}

/// Where a key's material came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource {
    Env,
    Inline,
    /// Registered through the admin API; held only in shared data.
    Runtime,
}

/// A provider key, compiled. `secret` is the material: it must never be
/// logged, counted in a metric name or returned by the admin API.
#[derive(Clone, PartialEq)]
pub struct Key {
    pub id: String,
    pub provider: usize,
    pub weight: u32,
    pub metadata: Map<String, Value>,
    pub source: SecretSource,
    /// `sha256:` plus the first 12 hex digits of SHA-256 of the material.
    pub fingerprint: String,
    /// The header that carries the key (`authorization`, `api-key`,
    /// `x-api-key`, `x-goog-api-key`) and its pre-rendered value.
    pub auth_header: &'static str,
    pub auth_value: String,
    /// Headers of the key's own, e.g. `OpenAI-Organization`.
    pub extra_headers: Vec<(String, String)>,
    /// Shared-data record name for this key.
    pub record_name: String,
    /// Price per 1,000 tokens, from `cost_per_1k` or `metadata.cost_per_1k`.
    pub cost_per_1k: Option<Decimal>,
    /// The same as a float, for scoring.
    pub cost_score_price: Option<f64>,
    pub limits: Limits,
    /// How this key's cost differs from the price table.
    pub pricing: KeyPricing,
    /// Budgets scoped to this key (indexes into [`Config::budgets`]).
    pub budgets: Vec<usize>,
    /// A runtime key that was deleted: kept so indexes never shift.
    pub deleted: bool,
}

impl fmt::Debug for Key {
    // Hand-written so that `{:?}` can never print the material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("provider", &self.provider)
            .field("weight", &self.weight)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    pub id: String,
    pub kind: ProviderKind,
    /// Sent as `anthropic-version` when the request has none (Anthropic).
    pub anthropic_version: String,
    /// `api-version` for deployment paths made from OpenAI paths (Azure).
    pub api_version: String,
    /// Indexes into [`Config::keys`].
    pub keys: Vec<usize>,
    /// The distinct key pricings among its keys, for upper-bound estimates
    /// made before a key is chosen.
    pub pricings: Vec<KeyPricing>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cooldown {
    pub default_ms: u64,
    pub max_ms: u64,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Admin {
    pub enabled: bool,
    /// Always starts and ends with `/`.
    pub prefix: String,
    /// The token callers must present; `None` when admin is disabled.
    pub token: Option<String>,
}

/// What a provider response does to the key that got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusAction {
    /// Rest until the provider's retry-after (or the default cooldown).
    Cooldown,
    /// Out of service until re-enabled through the admin API.
    Disable,
    /// Out of quota until its quota window resets.
    Exhaust,
    /// Nothing beyond the counters.
    Nothing,
}

impl StatusAction {
    fn parse(s: &str) -> Option<StatusAction> {
        match s {
            "cooldown" => Some(StatusAction::Cooldown),
            "disable" => Some(StatusAction::Disable),
            "exhaust" => Some(StatusAction::Exhaust),
            "none" => Some(StatusAction::Nothing),
            _ => None,
        }
    }
}

/// How keys are chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub objective: Objective,
    pub allow_objective_header: bool,
    pub reliability_window_ms: u64,
    /// How stale a worker's view of other keys' statistics may get.
    pub stats_refresh_ms: u64,
    pub thresholds: Thresholds,
}

/// What to do with a model missing from the price table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownModel {
    /// Count it at price zero and warn once.
    Zero,
    /// Refuse the request with a 400.
    Refuse,
}

/// How a request's cost is estimated before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Prompt tokens are estimated as body bytes divided by this (1 is an
    /// upper bound: no token is shorter than a byte).
    pub prompt_bytes_per_token: u64,
    /// Output tokens when the request sets no `max_tokens`.
    pub default_max_tokens: u64,
}

/// Fleet mode: budgets, token quotas and key states shared with the other
/// Envoy instances through etcd's JSON gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// The Envoy cluster that reaches etcd's client port.
    pub cluster: String,
    /// `:authority` of the calls to etcd.
    pub authority: String,
    /// Key prefix in etcd, without a trailing `/`.
    pub prefix: String,
    /// This instance's id; `None`: Envoy's `node.id`.
    pub instance: Option<String>,
    pub sync_interval_ms: u64,
    pub timeout_ms: u64,
    /// The fraction of each budget an instance may spend on its own while
    /// etcd cannot be reached.
    pub local_share: Decimal,
    /// etcd unreachable for this long makes the instance degraded.
    pub degraded_after_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decisions {
    /// Records kept per worker; 0 keeps none.
    pub ring_size: usize,
    /// Send `x-apikeyrouter-decision` on responses.
    pub header: bool,
}

impl fmt::Debug for Admin {
    // Hand-written so that `{:?}` can never print the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("enabled", &self.enabled)
            .field("prefix", &self.prefix)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The compiled configuration, shared by both stages.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub providers: Vec<Provider>,
    pub keys: Vec<Key>,
    pub cooldown: Cooldown,
    pub inject_stream_usage: bool,
    pub admin: Admin,
    /// Most state transitions kept for the admin API.
    pub max_transitions: usize,
    pub routing: Routing,
    /// Per-status actions, defaults merged with the configured ones.
    pub status_actions: Vec<(u32, StatusAction)>,
    /// Actions for an `error.code` (or `error.type`) in a 4xx body.
    pub error_code_actions: Vec<(String, StatusAction)>,
    pub decisions: Decisions,
    pub prices: PriceTable,
    pub unknown_model: UnknownModel,
    pub estimate: Estimate,
    pub max_cost_per_request: Option<Decimal>,
    pub budgets: Vec<Budget>,
    /// End a stream with an SSE error event once a hard budget is crossed.
    pub stream_cutoff: bool,
    /// Callers with virtual keys; empty means an open gateway.
    pub clients: Vec<Client>,
    /// Model name -> the providers that serve it, in order of preference,
    /// each with its own name for the model.
    pub models: Vec<(String, Vec<(usize, String)>)>,
    pub fleet: Option<Fleet>,
}

impl Config {
    pub fn key_by_id(&self, id: &str) -> Option<(usize, &Key)> {
        self.keys.iter().enumerate().find(|(_, k)| k.id == id && !k.deleted)
    }

    pub fn provider_by_id(&self, id: &str) -> Option<usize> {
        self.providers.iter().position(|p| p.id == id)
    }

    pub fn status_action(&self, status: u32) -> StatusAction {
        self.status_actions.iter().find(|(s, _)| *s == status).map_or(StatusAction::Nothing, |(_, a)| *a)
    }

    /// Whether a response with this status must be read before acting on it
    /// (its body may carry an error code with an action of its own).
    pub fn probes_body(&self, status: u32) -> bool {
        (400..500).contains(&status) && !self.error_code_actions.is_empty()
    }

    pub fn error_code_action(&self, code: &str) -> Option<StatusAction> {
        self.error_code_actions.iter().find(|(c, _)| c == code).map(|(_, a)| *a)
    }
}

pub const MAX_KEYS: usize = 10_000;
/// Decrypts `fernet:` key material (the original design's variable).
pub const ENCRYPTION_KEY_ENV: &str = "APIKEYROUTER_ENCRYPTION_KEY";
pub const MAX_WEIGHT: u64 = 10_000;
const DEFAULT_ADMIN_PREFIX: &str = "/apikeyrouter/v1/";

/// Compile plugin configuration bytes into a [`Config`].
///
/// `env` resolves environment variables (inside Envoy: those listed in
/// `vm_config.environment_variables.host_env_keys`).
pub fn compile(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let root: Value = serde_json::from_slice(bytes).map_err(|e| err("(root)", format!("not valid JSON: {e}")))?;
    let mut root = Obj::new(root, "")?;

    let mut providers = Vec::new();
    let mut keys: Vec<Key> = Vec::new();
    let provider_values = root.req_array("providers")?;
    if provider_values.is_empty() {
        return Err(err("providers", "at least one provider is required"));
    }
    for (pi, pv) in provider_values.into_iter().enumerate() {
        let path = format!("providers[{pi}]");
        let mut p = Obj::new(pv, &path)?;
        let id = p.req_id("id")?;
        if providers.iter().any(|q: &Provider| q.id == id) {
            return Err(err(&p.field("id"), format!("duplicate provider id {id:?}")));
        }
        let kind = match p.opt_str("kind")?.as_deref() {
            None => ProviderKind::OpenAi,
            Some(k) => ProviderKind::parse(k).ok_or_else(|| {
                err(
                    &p.field("kind"),
                    format!("unknown provider kind {k:?} (expected openai, openai_compatible, azure, anthropic, gemini or gemini_openai)"),
                )
            })?,
        };
        let anthropic_version = p.opt_str("anthropic_version")?.unwrap_or_else(|| "2023-06-01".to_string());
        let api_version = p.opt_str("api_version")?.unwrap_or_else(|| "2024-10-21".to_string());
        let key_values = p.req_array("keys")?;
        if key_values.is_empty() {
            return Err(err(&p.field("keys"), "a provider needs at least one key"));
        }
        let mut indexes = Vec::new();
        for (ki, kv) in key_values.into_iter().enumerate() {
            let kpath = format!("{path}.keys[{ki}]");
            let key = compile_key(kv, &kpath, providers.len(), &id, kind, env)?;
            if keys.iter().any(|k| k.id == key.id) {
                return Err(err(&format!("{kpath}.id"), format!("duplicate key id {:?}", key.id)));
            }
            if keys.len() >= MAX_KEYS {
                return Err(err(&kpath, format!("more than {MAX_KEYS} keys in total")));
            }
            indexes.push(keys.len());
            keys.push(key);
        }
        p.finish()?;
        let mut pricings: Vec<KeyPricing> = Vec::new();
        for &k in &indexes {
            if let Some(key) = keys.get(k) {
                if !pricings.contains(&key.pricing) {
                    pricings.push(key.pricing);
                }
            }
        }
        providers.push(Provider { id, kind, anthropic_version, api_version, keys: indexes, pricings });
    }

    let cooldown = match root.opt_obj("cooldown")? {
        None => Cooldown { default_ms: 60_000, max_ms: 3_600_000 },
        Some(mut c) => {
            let default_s = c.opt_u64_in("default_seconds", 1, 86_400)?.unwrap_or(60);
            let max_s = c.opt_u64_in("max_seconds", 1, 7 * 86_400)?.unwrap_or(3600);
            if default_s > max_s {
                return Err(err(&c.field("default_seconds"), "must not exceed cooldown.max_seconds"));
            }
            c.finish()?;
            Cooldown { default_ms: default_s * 1000, max_ms: max_s * 1000 }
        }
    };

    let inject_stream_usage = root.opt_bool("inject_stream_usage")?.unwrap_or(true);

    let admin = match root.opt_obj("admin")? {
        None => Admin { enabled: false, prefix: DEFAULT_ADMIN_PREFIX.to_string(), token: None },
        Some(mut a) => {
            let enabled = a.opt_bool("enabled")?.unwrap_or(true);
            let prefix = a.opt_str("prefix")?.unwrap_or_else(|| DEFAULT_ADMIN_PREFIX.to_string());
            if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 2 {
                return Err(err(&a.field("prefix"), "must start and end with '/', e.g. \"/apikeyrouter/v1/\""));
            }
            if prefix.starts_with("/v1/") {
                return Err(err(&a.field("prefix"), "must not overlap the OpenAI API paths under /v1/"));
            }
            let token_env = a.opt_str("token_env")?;
            let token = match (enabled, token_env) {
                (false, _) => None,
                (true, None) => {
                    return Err(err(&a.field("token_env"), "required when the admin API is enabled"))
                }
                (true, Some(name)) => match env(&name) {
                    Some(v) if v.len() >= 16 => Some(v),
                    Some(_) => {
                        return Err(err(
                            &a.field("token_env"),
                            format!("environment variable {name} must hold at least 16 characters"),
                        ))
                    }
                    None => {
                        return Err(err(
                            &a.field("token_env"),
                            format!("environment variable {name} is not set (list it in vm_config.environment_variables.host_env_keys)"),
                        ))
                    }
                },
            };
            a.finish()?;
            Admin { enabled, prefix, token }
        }
    };

    let routing = match root.opt_obj("routing")? {
        None => Routing {
            objective: Objective::default(),
            allow_objective_header: true,
            reliability_window_ms: 300_000,
            stats_refresh_ms: 1000,
            thresholds: Thresholds::default(),
        },
        Some(mut r) => {
            let objective = match r.take("objective") {
                None => Objective::default(),
                Some(v) => Objective::from_value(&v).map_err(|e| err(&r.field("objective"), e.0))?,
            };
            let allow_objective_header = r.opt_bool("allow_objective_header")?.unwrap_or(true);
            let reliability_window_ms = r.opt_u64_in("reliability_window_seconds", 1, 86_400)?.unwrap_or(300) * 1000;
            let stats_refresh_ms = r.opt_u64_in("stats_refresh_ms", 10, 60_000)?.unwrap_or(1000);
            let thresholds = match r.opt_obj("capacity")? {
                None => Thresholds::default(),
                Some(mut c) => {
                    let d = Thresholds::default();
                    let constrained = c.opt_f64_in("constrained_below", 0.0, 1.0)?.unwrap_or(d.constrained);
                    let critical = c.opt_f64_in("critical_below", 0.0, 1.0)?.unwrap_or(d.critical);
                    if critical > constrained {
                        return Err(err(&c.field("critical_below"), "must not exceed constrained_below"));
                    }
                    c.finish()?;
                    Thresholds { constrained, critical }
                }
            };
            r.finish()?;
            Routing { objective, allow_objective_header, reliability_window_ms, stats_refresh_ms, thresholds }
        }
    };

    let mut status_actions: Vec<(u32, StatusAction)> = vec![
        (429, StatusAction::Cooldown),
        (401, StatusAction::Disable),
        (403, StatusAction::Disable),
        (402, StatusAction::Exhaust),
    ];
    if let Some(a) = root.opt_obj("status_actions")? {
        for (k, v) in a.map.iter() {
            let field = a.field(k);
            let status: u32 = k
                .parse()
                .ok()
                .filter(|s| (400..600).contains(s))
                .ok_or_else(|| err(&field, "expected an HTTP status from 400 to 599 as the key"))?;
            let action = v
                .as_str()
                .and_then(StatusAction::parse)
                .ok_or_else(|| err(&field, "expected \"cooldown\", \"disable\", \"exhaust\" or \"none\""))?;
            status_actions.retain(|(s, _)| *s != status);
            status_actions.push((status, action));
        }
    }
    let mut error_code_actions = vec![("insufficient_quota".to_string(), StatusAction::Exhaust)];
    if let Some(a) = root.opt_obj("error_code_actions")? {
        for (k, v) in a.map.iter() {
            let action = v
                .as_str()
                .and_then(StatusAction::parse)
                .ok_or_else(|| err(&a.field(k), "expected \"cooldown\", \"disable\", \"exhaust\" or \"none\""))?;
            error_code_actions.retain(|(c, _)| c != k);
            error_code_actions.push((k.clone(), action));
        }
    }
    error_code_actions.retain(|(_, a)| *a != StatusAction::Nothing);

    let decisions = match root.opt_obj("decisions")? {
        None => Decisions { ring_size: 1000, header: true },
        Some(mut d) => {
            let ring_size = d.opt_u64_in("ring_size", 0, 100_000)?.unwrap_or(1000) as usize;
            let header = d.opt_bool("header")?.unwrap_or(true);
            d.finish()?;
            Decisions { ring_size, header }
        }
    };

    let mut prices = PriceTable::default();
    if let Some(table) = root.opt_obj("prices")? {
        for (model, v) in table.map.iter() {
            let path = table.field(model);
            let mut p = Obj::new(v.clone(), &path)?;
            let mut dec_field = |name: &str, required: bool| -> Result<Option<Decimal>, ConfigError> {
                match p.take(name) {
                    None if required => Err(err(&p.field(name), "required (price per 1M tokens)")),
                    None => Ok(None),
                    Some(v) => decimal(&v)
                        .map(Some)
                        .ok_or_else(|| err(&p.field(name), "expected a non-negative decimal string, e.g. \"2.50\"")),
                }
            };
            let input = dec_field("input", true)?.unwrap_or_default();
            let output = dec_field("output", true)?.unwrap_or_default();
            let cached_input = dec_field("cached_input", false)?.unwrap_or(input);
            p.finish()?;
            if model.is_empty() || model == "*" {
                return Err(err(&path, "a model name or prefix* is required"));
            }
            prices.insert(model, Price { input, output, cached_input });
        }
    }
    let unknown_model = match root.opt_str("unknown_model")?.as_deref() {
        None | Some("zero") => UnknownModel::Zero,
        Some("refuse") => UnknownModel::Refuse,
        Some(other) => return Err(err("unknown_model", format!("expected \"zero\" or \"refuse\", found {other:?}"))),
    };
    let estimate = match root.opt_obj("estimate")? {
        None => Estimate { prompt_bytes_per_token: 1, default_max_tokens: 4096 },
        Some(mut e) => {
            let est = Estimate {
                prompt_bytes_per_token: e.opt_u64_in("prompt_bytes_per_token", 1, 16)?.unwrap_or(1),
                default_max_tokens: e.opt_u64_in("default_max_tokens", 0, 10_000_000)?.unwrap_or(4096),
            };
            e.finish()?;
            est
        }
    };
    let max_cost_per_request = match root.take("max_cost_per_request") {
        None => None,
        Some(v) => Some(
            decimal(&v)
                .filter(|d| *d > Decimal::ZERO)
                .ok_or_else(|| err("max_cost_per_request", "expected a positive decimal string, e.g. \"0.50\""))?,
        ),
    };
    let mut budgets: Vec<Budget> = Vec::new();
    if let Some(list) = root.opt_array("budgets")? {
        for (bi, bv) in list.into_iter().enumerate() {
            let path = format!("budgets[{bi}]");
            let mut b = Obj::new(bv, &path)?;
            let id = b.req_id("id")?;
            if budgets.iter().any(|x| x.id == id) {
                return Err(err(&b.field("id"), format!("duplicate budget id {id:?}")));
            }
            let scope = compile_scope(b.take("scope"), &b.field("scope"), &providers, &keys)?;
            let window = match b.opt_str("window")?.as_deref() {
                Some("minute") => Some(crate::window::Window::Minute),
                Some("hour") => Some(crate::window::Window::Hour),
                None | Some("day") => Some(crate::window::Window::Day),
                Some("month") => Some(crate::window::Window::Month),
                Some("total") => None,
                Some(other) => {
                    return Err(err(
                        &b.field("window"),
                        format!("expected minute, hour, day, month or total, found {other:?}"),
                    ))
                }
            };
            let limit = match b.take("limit") {
                None => return Err(err(&b.field("limit"), "required")),
                Some(v) => decimal(&v)
                    .filter(|d| *d > Decimal::ZERO)
                    .ok_or_else(|| err(&b.field("limit"), "expected a positive decimal string, e.g. \"100.00\""))?,
            };
            let enforcement = match b.opt_str("enforcement")?.as_deref() {
                None | Some("hard") => Enforcement::Hard,
                Some("soft") => Enforcement::Soft,
                Some(other) => {
                    return Err(err(&b.field("enforcement"), format!("expected \"hard\" or \"soft\", found {other:?}")))
                }
            };
            b.finish()?;
            if let Scope::Key(k) = scope {
                if let Some(key) = keys.get_mut(k) {
                    key.budgets.push(budgets.len());
                }
            }
            budgets.push(Budget { record_name: format!("akr.v1.budget.{id}"), id, scope, window, limit, enforcement });
        }
    }
    let stream_cutoff = root.opt_bool("stream_cutoff")?.unwrap_or(false);
    let fleet = match root.opt_obj("fleet")? {
        None => None,
        Some(f) => Some(compile_fleet(f)?),
    };
    let mut models = Vec::new();
    if let Some(m) = root.opt_obj("models")? {
        for (name, v) in m.map.iter() {
            let field = m.field(name);
            let Value::Array(entries) = v else {
                return Err(err(&field, "expected an array of {\"provider\": id, \"model\": name}"));
            };
            let mut served = Vec::new();
            for (i, e) in entries.iter().enumerate() {
                let mut o = Obj::new(e.clone(), &format!("{field}[{i}]"))?;
                let pid = o.opt_str("provider")?.ok_or_else(|| err(&o.field("provider"), "required"))?;
                let p = providers
                    .iter()
                    .position(|x| x.id == pid)
                    .ok_or_else(|| err(&o.field("provider"), format!("no provider with id {pid:?}")))?;
                let model = o.opt_str("model")?.unwrap_or_else(|| name.clone());
                o.finish()?;
                served.push((p, model));
            }
            if served.is_empty() {
                return Err(err(&field, "at least one provider is required"));
            }
            models.push((name.clone(), served));
        }
    }
    let max_transitions = root.opt_u64_in("max_transitions", 0, 100_000)?.unwrap_or(1000) as usize;
    let mut teams: Vec<(String, Policy)> = Vec::new();
    if let Some(list) = root.opt_array("teams")? {
        for (i, v) in list.into_iter().enumerate() {
            let mut t = Obj::new(v, &format!("teams[{i}]"))?;
            let id = t.req_id("id")?;
            if teams.iter().any(|(x, _)| *x == id) {
                return Err(err(&t.field("id"), format!("duplicate team id {id:?}")));
            }
            let policy = compile_policy(&mut t, &providers)?;
            t.finish()?;
            teams.push((id, policy));
        }
    }
    let mut clients: Vec<Client> = Vec::new();
    if let Some(list) = root.opt_array("clients")? {
        for (i, v) in list.into_iter().enumerate() {
            let mut c = Obj::new(v, &format!("clients[{i}]"))?;
            let id = c.req_id("id")?;
            if clients.iter().any(|x| x.id == id) {
                return Err(err(&c.field("id"), format!("duplicate client id {id:?}")));
            }
            let team = c.opt_str("team")?;
            let team_policy = match &team {
                None => Policy::default(),
                Some(t) => teams
                    .iter()
                    .find(|(x, _)| x == t)
                    .map(|(_, p)| p.clone())
                    .ok_or_else(|| err(&c.field("team"), format!("no team with id {t:?} in teams")))?,
            };
            let hex = c.opt_str("key_sha256")?.ok_or_else(|| {
                err(&c.field("key_sha256"), "required: the SHA-256 of the client's key, 64 hex digits")
            })?;
            let key_sha256 = parse_sha256(&hex).ok_or_else(|| {
                err(&c.field("key_sha256"), "expected 64 hex digits (the SHA-256 of the key, never the key)")
            })?;
            if clients.iter().any(|x| x.key_sha256 == key_sha256) {
                return Err(err(&c.field("key_sha256"), "another client has the same key"));
            }
            let expires_ms = match c.opt_str("expires_at")? {
                None => None,
                Some(t) => Some(crate::window::parse_rfc3339(&t).ok_or_else(|| {
                    err(
                        &c.field("expires_at"),
                        format!("{t:?} is not an RFC 3339 time such as \"2027-01-01T00:00:00Z\""),
                    )
                })?),
            };
            let own = compile_policy(&mut c, &providers)?;
            c.finish()?;
            clients.push(Client {
                record_name: format!("akr.v1.client.{id}"),
                id,
                team,
                key_sha256,
                expires_ms,
                policy: team_policy.overridden_by(&own),
            });
        }
    }
    if unknown_model == UnknownModel::Refuse && prices.is_empty() {
        return Err(err("unknown_model", "\"refuse\" needs a price table in prices"));
    }

    root.finish()?;
    Ok(Config {
        providers,
        keys,
        cooldown,
        inject_stream_usage,
        admin,
        max_transitions,
        routing,
        status_actions,
        error_code_actions,
        decisions,
        prices,
        unknown_model,
        estimate,
        max_cost_per_request,
        budgets,
        stream_cutoff,
        clients,
        models,
        fleet,
    })
}

fn compile_fleet(mut f: Obj) -> Result<Fleet, ConfigError> {
    let cluster = f
        .opt_str("etcd_cluster")?
        .ok_or_else(|| err(&f.field("etcd_cluster"), "required (the Envoy cluster of etcd's client port)"))?;
    if cluster.is_empty() {
        return Err(err(&f.field("etcd_cluster"), "must not be empty"));
    }
    let authority = f.opt_str("authority")?.unwrap_or_else(|| cluster.clone());
    let prefix = f.opt_str("prefix")?.unwrap_or_else(|| "/apikeyrouter".into());
    let prefix = prefix.trim_end_matches('/').to_string();
    if prefix.is_empty()
        || !prefix.starts_with('/')
        || prefix.len() > 128
        || prefix.bytes().any(|b| b.is_ascii_control() || b == b' ')
    {
        return Err(err(&f.field("prefix"), "must start with '/', be at most 128 characters and hold no spaces"));
    }
    // Checked like an id: it is part of etcd keys.
    let instance = match f.opt_str("instance")? {
        None => None,
        Some(s) => Some(check_id(&f.field("instance"), s)?),
    };
    let sync_interval_ms = f.opt_u64_in("sync_interval_ms", 50, 60_000)?.unwrap_or(500);
    let timeout_ms = f.opt_u64_in("timeout_ms", 10, 60_000)?.unwrap_or(1000);
    let local_share = match f.take("local_share") {
        None => Decimal::new(5, 1),
        Some(v) => decimal(&v)
            .filter(|d| *d > Decimal::ZERO && *d <= Decimal::ONE)
            .ok_or_else(|| err(&f.field("local_share"), "expected a fraction above 0 and at most 1, e.g. 0.5"))?,
    };
    let degraded_after_ms =
        f.opt_u64_in("degraded_after_ms", 0, 3_600_000)?.unwrap_or(3 * sync_interval_ms.max(timeout_ms));
    f.finish()?;
    Ok(Fleet { cluster, authority, prefix, instance, sync_interval_ms, timeout_ms, local_share, degraded_after_ms })
}

fn compile_key(
    v: Value,
    path: &str,
    provider: usize,
    provider_id: &str,
    kind: ProviderKind,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Key, ConfigError> {
    let mut k = Obj::new(v, path)?;
    let id = k.req_id("id")?;
    let weight = k.opt_u64_in("weight", 1, MAX_WEIGHT)?.unwrap_or(1) as u32;
    let metadata = k.opt_obj_raw("metadata")?.unwrap_or_default();
    let cost_per_1k = match k.take("cost_per_1k") {
        Some(v) => Some(
            decimal(&v)
                .ok_or_else(|| err(&k.field("cost_per_1k"), "expected a non-negative decimal, e.g. \"0.0025\""))?,
        ),
        None => match metadata.get("cost_per_1k") {
            Some(v) => Some(decimal(v).ok_or_else(|| {
                err(&k.field("metadata.cost_per_1k"), "expected a non-negative decimal, e.g. \"0.0025\"")
            })?),
            None => None,
        },
    };
    let multiplier = match k.take("price_multiplier") {
        Some(v) => Some(
            decimal(&v)
                .ok_or_else(|| err(&k.field("price_multiplier"), "expected a non-negative decimal, e.g. \"0.8\""))?,
        ),
        None => None,
    };
    let mut extra_headers = Vec::new();
    if let Some(h) = k.opt_obj("headers")? {
        for (name, v) in h.map.iter() {
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
    let limits = match k.opt_obj("limits")? {
        None => Limits::default(),
        Some(mut l) => {
            let limits = Limits {
                rpm: l.opt_u64_in("rpm", 1, u32::MAX as u64)?,
                tpm: l.opt_u64_in("tpm", 1, u64::MAX >> 1)?,
                daily_tokens: l.opt_u64_in("daily_tokens", 1, u64::MAX >> 1)?,
                monthly_tokens: l.opt_u64_in("monthly_tokens", 1, u64::MAX >> 1)?,
            };
            l.finish()?;
            limits
        }
    };
    let secret_env = k.opt_str("secret_env")?;
    let secret_inline = k.opt_str("secret")?;
    let (secret, source) = match (secret_env, secret_inline) {
        (Some(_), Some(_)) => return Err(err(path, "set exactly one of secret_env and secret, not both")),
        (None, None) => return Err(err(path, "one of secret_env or secret is required")),
        (Some(name), None) => match env(&name) {
            Some(v) if !v.trim().is_empty() => (v.trim().to_string(), SecretSource::Env),
            Some(_) => return Err(err(&k.field("secret_env"), format!("environment variable {name} is empty"))),
            None => {
                return Err(err(
                    &k.field("secret_env"),
                    format!(
                    "environment variable {name} is not set (list it in vm_config.environment_variables.host_env_keys)"
                ),
                ))
            }
        },
        (None, Some(s)) => (s, SecretSource::Inline),
    };
    let secret_field = match source {
        SecretSource::Env => k.field("secret_env"),
        SecretSource::Inline | SecretSource::Runtime => k.field("secret"),
    };
    let secret = match secret.strip_prefix("fernet:") {
        None => secret,
        Some(token) => {
            let Some(key) = env(ENCRYPTION_KEY_ENV) else {
                return Err(err(
                    &secret_field,
                    format!("key {id} is a fernet token but {ENCRYPTION_KEY_ENV} is not set (list it in vm_config.environment_variables.host_env_keys)"),
                ));
            };
            match crate::fernet::decrypt(&key, token) {
                Ok(plain) => String::from_utf8(plain)
                    .map_err(|_| err(&secret_field, format!("key {id}: its fernet token does not hold text")))?,
                Err(e) => {
                    return Err(err(
                        &secret_field,
                        format!("key {id}: cannot decrypt its fernet token with {ENCRYPTION_KEY_ENV}: {e}"),
                    ))
                }
            }
        }
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
    k.finish()?;
    let fingerprint = fingerprint(&secret);
    Ok(Key {
        record_name: format!("akr.v1.key.{provider_id}.{id}"),
        id,
        provider,
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
        deleted: false,
    })
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The policy fields shared by teams and clients.
fn compile_policy(o: &mut Obj, providers: &[Provider]) -> Result<Policy, ConfigError> {
    let strings = |o: &mut Obj, name: &str| -> Result<Option<Vec<String>>, ConfigError> {
        match o.opt_array(name)? {
            None => Ok(None),
            Some(items) => items
                .into_iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| err(&o.field(name), "expected an array of strings"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
        }
    };
    let allowed_providers = strings(o, "allowed_providers")?;
    if let Some(list) = &allowed_providers {
        if let Some(bad) = list.iter().find(|p| !providers.iter().any(|q| &q.id == *p)) {
            return Err(err(&o.field("allowed_providers"), format!("no provider with id {bad:?}")));
        }
    }
    let allowed_models = strings(o, "allowed_models")?;
    let mut model_aliases = Vec::new();
    if let Some(a) = o.opt_obj("model_aliases")? {
        for (from, to) in a.map.iter() {
            let to = to.as_str().ok_or_else(|| err(&a.field(from), "expected the model name to send instead"))?;
            model_aliases.push((from.clone(), to.to_string()));
        }
    }
    let max_tokens = o.opt_u64_in("max_tokens", 1, 100_000_000)?;
    let max_cost_per_request = match o.take("max_cost_per_request") {
        None => None,
        Some(v) => Some(decimal(&v).filter(|d| *d > Decimal::ZERO).ok_or_else(|| {
            err(&o.field("max_cost_per_request"), "expected a positive decimal string, e.g. \"0.10\"")
        })?),
    };
    let objective = match o.take("objective") {
        None => None,
        Some(v) => Some(Objective::from_value(&v).map_err(|e| err(&o.field("objective"), e.0))?),
    };
    let force_objective = o.opt_bool("force_objective")?.unwrap_or(false);
    let rpm = o.opt_u64_in("rpm", 1, u32::MAX as u64)?;
    let tpm = o.opt_u64_in("tpm", 1, u64::MAX >> 1)?;
    Ok(Policy {
        allowed_providers,
        allowed_models,
        model_aliases,
        max_tokens,
        max_cost_per_request,
        objective,
        force_objective,
        rpm,
        tpm,
    })
}

fn compile_scope(v: Option<Value>, path: &str, providers: &[Provider], keys: &[Key]) -> Result<Scope, ConfigError> {
    let expected = "expected \"global\" or an object with one of provider, key, model, client, team";
    match v {
        None => Ok(Scope::Global),
        Some(Value::String(s)) if s == "global" => Ok(Scope::Global),
        Some(Value::Object(o)) if o.len() == 1 => {
            let (kind, val) = o.iter().next().ok_or_else(|| err(path, expected))?;
            let name = val.as_str().ok_or_else(|| err(&format!("{path}.{kind}"), "expected a string"))?;
            let field = format!("{path}.{kind}");
            match kind.as_str() {
                "provider" => providers
                    .iter()
                    .position(|p| p.id == name)
                    .map(Scope::Provider)
                    .ok_or_else(|| err(&field, format!("no provider with id {name:?}"))),
                "key" => keys
                    .iter()
                    .position(|k| k.id == name)
                    .map(Scope::Key)
                    .ok_or_else(|| err(&field, format!("no key with id {name:?}"))),
                "model" => Ok(Scope::Model(name.to_string())),
                "client" => Ok(Scope::Client(name.to_string())),
                "team" => Ok(Scope::Team(name.to_string())),
                _ => Err(err(path, expected)),
            }
        }
        Some(_) => Err(err(path, expected)),
    }
}

/// A non-negative decimal from a JSON string or number.
fn decimal(v: &Value) -> Option<Decimal> {
    let d = match v {
        Value::String(s) => Decimal::from_str(s.trim()).ok()?,
        Value::Number(n) => Decimal::from_str(&n.to_string()).ok()?,
        _ => return None,
    };
    (d >= Decimal::ZERO).then_some(d)
}

/// A short, non-reversible name for key material: safe to log and show.
pub fn fingerprint(secret: &str) -> String {
    let digest = crypto::sha256(secret.as_bytes());
    let mut out = String::from("sha256:");
    for b in &digest[..6] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// An id: 1-64 characters of A-Z, a-z, 0-9, '-' or '_'.
pub fn check_id(field: &str, s: String) -> Result<String, ConfigError> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(err(field, format!("{s:?} must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'")));
    }
    Ok(s)
}

/// An object being consumed field by field; `finish` rejects leftovers.
struct Obj {
    path: String,
    map: Map<String, Value>,
}

impl Obj {
    fn new(v: Value, path: &str) -> Result<Obj, ConfigError> {
        let shown = if path.is_empty() { "(root)" } else { path };
        match v {
            Value::Object(map) => Ok(Obj { path: path.to_string(), map }),
            other => Err(err(shown, format!("expected an object, found {}", kind_of(&other)))),
        }
    }

    fn field(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.path, name)
        }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        match self.map.remove(name) {
            Some(Value::Null) | None => None,
            Some(v) => Some(v),
        }
    }

    fn opt_str(&mut self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(err(&self.field(name), format!("expected a string, found {}", kind_of(&other)))),
        }
    }

    fn req_id(&mut self, name: &str) -> Result<String, ConfigError> {
        let s = self.opt_str(name)?.ok_or_else(|| err(&self.field(name), "required"))?;
        check_id(&self.field(name), s)
    }

    fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(err(&self.field(name), format!("expected true or false, found {}", kind_of(&other)))),
        }
    }

    fn opt_u64_in(&mut self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
                _ => Err(err(&self.field(name), format!("expected an integer from {min} to {max}, found {n}"))),
            },
            Some(other) => Err(err(
                &self.field(name),
                format!("expected an integer from {min} to {max}, found {}", kind_of(&other)),
            )),
        }
    }

    fn opt_f64_in(&mut self, name: &str, min: f64, max: f64) -> Result<Option<f64>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) if v >= min && v <= max => Ok(Some(v)),
                _ => Err(err(&self.field(name), format!("expected a number from {min} to {max}, found {n}"))),
            },
            Some(other) => {
                Err(err(&self.field(name), format!("expected a number from {min} to {max}, found {}", kind_of(&other))))
            }
        }
    }

    fn opt_array(&mut self, name: &str) -> Result<Option<Vec<Value>>, ConfigError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => Err(err(&self.field(name), format!("expected an array, found {}", kind_of(&other)))),
        }
    }

    fn req_array(&mut self, name: &str) -> Result<Vec<Value>, ConfigError> {
        match self.take(name) {
            None => Err(err(&self.field(name), "required")),
            Some(Value::Array(a)) => Ok(a),
            Some(other) => Err(err(&self.field(name), format!("expected an array, found {}", kind_of(&other)))),
        }
    }

    fn opt_obj(&mut self, name: &str) -> Result<Option<Obj>, ConfigError> {
        let path = self.field(name);
        match self.take(name) {
            None => Ok(None),
            Some(v) => Obj::new(v, &path).map(Some),
        }
    }

    fn opt_obj_raw(&mut self, name: &str) -> Result<Option<Map<String, Value>>, ConfigError> {
        Ok(self.opt_obj(name)?.map(|o| o.map))
    }

    fn finish(self) -> Result<(), ConfigError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(unknown) => Err(err(&self.field(unknown), "unknown field")),
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "K1" => Some("sk-one".into()),
            "K2" => Some("sk-two".into()),
            "EMPTY" => Some("  ".into()),
            "ADMIN" => Some("admin-token-0123456789".into()),
            "SHORT" => Some("short".into()),
            _ => None,
        }
    }

    fn ok(json: &str) -> Config {
        match compile(json.as_bytes(), &env) {
            Ok(c) => c,
            Err(e) => panic!("expected valid config, got {e}"),
        }
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = ok(r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret_env":"K1"}]}]}"#);
        assert_eq!(c.providers[0].kind, ProviderKind::OpenAi);
        assert_eq!(c.keys[0].weight, 1);
        assert_eq!(c.cooldown.default_ms, 60_000);
        assert_eq!(c.cooldown.max_ms, 3_600_000);
        assert!(c.inject_stream_usage);
        assert!(!c.admin.enabled);
        assert_eq!(c.keys[0].auth_value, "Bearer sk-one");
        assert_eq!(c.keys[0].record_name, "akr.v1.key.openai.k1");
    }

    #[test]
    fn full_config_compiles_every_field() {
        let c = ok(r#"{
          "providers":[{"id":"openai","kind":"openai","keys":[
             {"id":"k1","secret_env":"K1","weight":3,"metadata":{"tier":"pro"}},
             {"id":"k2","secret":"sk-inline"}]}],
          "cooldown":{"default_seconds":5,"max_seconds":600},
          "inject_stream_usage":false,
          "admin":{"prefix":"/akr/","token_env":"ADMIN"}}"#);
        assert_eq!(c.keys.len(), 2);
        assert_eq!(c.keys[0].weight, 3);
        assert_eq!(c.keys[0].metadata.get("tier"), Some(&Value::String("pro".into())));
        assert_eq!(c.keys[1].source, SecretSource::Inline);
        assert_eq!(c.cooldown.default_ms, 5000);
        assert!(!c.inject_stream_usage);
        assert!(c.admin.enabled);
        assert_eq!(c.admin.prefix, "/akr/");
        assert_eq!(c.providers[0].keys, vec![0, 1]);
    }

    #[test]
    fn each_provider_kind_sends_the_key_its_own_way() {
        let c = ok(r#"{"providers":[
            {"id":"o","kind":"openai","keys":[{"id":"a","secret":"s1","headers":{"OpenAI-Organization":"org-1"}}]},
            {"id":"z","kind":"azure","keys":[{"id":"b","secret":"s2"}]},
            {"id":"n","kind":"anthropic","keys":[{"id":"c","secret":"s3"}]},
            {"id":"g","kind":"gemini","keys":[{"id":"d","secret":"s4"}]},
            {"id":"h","kind":"gemini_openai","keys":[{"id":"e","secret":"s5"}]}]}"#);
        let auth: Vec<(&str, &str)> = c.keys.iter().map(|k| (k.auth_header, k.auth_value.as_str())).collect();
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
    fn debug_output_never_contains_key_material() {
        let c = ok(r#"{"providers":[{"id":"p","keys":[{"id":"k1","secret_env":"K1"}]}]}"#);
        let shown = format!("{c:?}");
        assert!(!shown.contains("sk-one"), "{shown}");
        assert!(shown.contains(&c.keys[0].fingerprint));
    }

    #[test]
    fn fingerprint_is_stable_and_short() {
        assert_eq!(fingerprint("sk-one"), fingerprint("sk-one"));
        assert_ne!(fingerprint("sk-one"), fingerprint("sk-two"));
        assert_eq!(fingerprint("abc").len(), "sha256:".len() + 12);
        // SHA-256("abc") begins ba7816bf8f01.
        assert_eq!(fingerprint("abc"), "sha256:ba7816bf8f01");
    }

    #[test]
    fn fleet_section_gets_documented_defaults() {
        let c = ok(r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret_env":"K1"}]}],
            "fleet":{"etcd_cluster":"etcd","prefix":"/gw/"}}"#);
        let f = match c.fleet {
            Some(f) => f,
            None => panic!("fleet missing"),
        };
        assert_eq!((f.cluster.as_str(), f.authority.as_str(), f.prefix.as_str()), ("etcd", "etcd", "/gw"));
        assert_eq!((f.instance, f.sync_interval_ms, f.timeout_ms, f.degraded_after_ms), (None, 500, 1000, 3000));
        assert_eq!(f.local_share, Decimal::new(5, 1));
        assert_eq!(ok(r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}]}"#).fleet, None);
    }

    #[test]
    fn invalid_configs_are_refused_naming_the_field() {
        let p = |keys: &str| format!(r#"{{"providers":[{{"id":"p","keys":[{keys}]}}]}}"#);
        let fleet =
            |f: &str| format!(r#"{{"providers":[{{"id":"p","keys":[{{"id":"k","secret":"s"}}]}}],"fleet":{f}}}"#);
        let cases: Vec<(String, &str, &str)> = vec![
            ("not json".into(), "(root)", "not valid JSON"),
            (fleet(r#"{}"#), "fleet.etcd_cluster", "required"),
            (fleet(r#"{"etcd_cluster":"etcd","local_share":0}"#), "fleet.local_share", "above 0"),
            (fleet(r#"{"etcd_cluster":"etcd","local_share":1.5}"#), "fleet.local_share", "at most 1"),
            (fleet(r#"{"etcd_cluster":"etcd","prefix":"no-slash"}"#), "fleet.prefix", "start with '/'"),
            (fleet(r#"{"etcd_cluster":"etcd","instance":"a/b"}"#), "fleet.instance", "must be"),
            (fleet(r#"{"etcd_cluster":"etcd","sync_interval_ms":10}"#), "fleet.sync_interval_ms", "from 50"),
            (fleet(r#"{"etcd_cluster":"etcd","leader":true}"#), "fleet.leader", "unknown field"),
            ("[]".into(), "(root)", "expected an object"),
            ("{}".into(), "providers", "required"),
            (r#"{"providers":[]}"#.into(), "providers", "at least one"),
            (r#"{"providers":{}}"#.into(), "providers", "expected an array"),
            (r#"{"providers":[1]}"#.into(), "providers[0]", "expected an object"),
            (r#"{"providers":[{"keys":[]}]}"#.into(), "providers[0].id", "required"),
            (r#"{"providers":[{"id":"a b","keys":[]}]}"#.into(), "providers[0].id", "must be"),
            (r#"{"providers":[{"id":"p","keys":[]}]}"#.into(), "providers[0].keys", "at least one key"),
            (r#"{"providers":[{"id":"p","kind":"smtp","keys":[{"id":"k","secret":"s"}]}]}"#.into(), "providers[0].kind", "unknown provider kind"),
            (p(r#"{"id":"k1","secret":"a","headers":{"authorization":"x"}}"#), "providers[0].keys[0].headers.authorization", "not a header"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]},{"id":"p","keys":[{"id":"j","secret":"s"}]}]}"#.into(), "providers[1].id", "duplicate provider id"),
            (p(r#"{"id":"k1","secret":"a"},{"id":"k1","secret":"b"}"#), "providers[0].keys[1].id", "duplicate key id"),
            (p(r#"{"id":"k1"}"#), "providers[0].keys[0]", "one of secret_env or secret"),
            (p(r#"{"id":"k1","secret":"a","secret_env":"K1"}"#), "providers[0].keys[0]", "not both"),
            (p(r#"{"id":"k1","secret_env":"MISSING"}"#), "providers[0].keys[0].secret_env", "MISSING is not set"),
            (p(r#"{"id":"k1","secret_env":"EMPTY"}"#), "providers[0].keys[0].secret_env", "is empty"),
            (p(r#"{"id":"k1","secret":"has space"}"#), "providers[0].keys[0].secret", "printable ASCII"),
            (p(r#"{"id":"k1","secret":""}"#), "providers[0].keys[0].secret", "empty"),
            (p(r#"{"id":"k1","secret":"a","weight":0}"#), "providers[0].keys[0].weight", "from 1 to 10000"),
            (p(r#"{"id":"k1","secret":"a","weight":"2"}"#), "providers[0].keys[0].weight", "found a string"),
            (p(r#"{"id":"k1","secret":"a","weight":1.5}"#), "providers[0].keys[0].weight", "from 1 to"),
            (p(r#"{"id":"k1","secret":"a","metadata":[]}"#), "providers[0].keys[0].metadata", "expected an object"),
            (p(r#"{"id":"k1","secret":"a","wieght":2}"#), "providers[0].keys[0].wieght", "unknown field"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"cooldown":{"default_seconds":0}}"#.into(), "cooldown.default_seconds", "from 1 to"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"cooldown":{"default_seconds":100,"max_seconds":10}}"#.into(), "cooldown.default_seconds", "must not exceed"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"cooldown":{"dflt":1}}"#.into(), "cooldown.dflt", "unknown field"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"inject_stream_usage":"yes"}"#.into(), "inject_stream_usage", "true or false"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{}}"#.into(), "admin.token_env", "required"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"NOPE"}}"#.into(), "admin.token_env", "NOPE is not set"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"SHORT"}}"#.into(), "admin.token_env", "at least 16"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN","prefix":"nope"}}"#.into(), "admin.prefix", "must start and end"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN","prefix":"/v1/admin/"}}"#.into(), "admin.prefix", "must not overlap"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"colldown":{}}"#.into(), "colldown", "unknown field"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"prices":{"gpt-4o":{"input":"x","output":"1"}}}"#.into(), "prices.gpt-4o.input", "decimal"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"prices":{"gpt-4o":{"input":"1"}}}"#.into(), "prices.gpt-4o.output", "required"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"unknown_model":"refuse"}"#.into(), "unknown_model", "needs a price table"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"budgets":[{"id":"b","limit":"0"}]}"#.into(), "budgets[0].limit", "positive decimal"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"budgets":[{"id":"b","limit":"1","window":"week"}]}"#.into(), "budgets[0].window", "minute, hour"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"budgets":[{"id":"b","limit":"1","scope":{"key":"zz"}}]}"#.into(), "budgets[0].scope.key", "no key with id"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"budgets":[{"id":"b","limit":"1","enforcement":"strict"}]}"#.into(), "budgets[0].enforcement", "hard"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"max_cost_per_request":"-1"}"#.into(), "max_cost_per_request", "positive decimal"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"clients":[{"id":"a"}]}"#.into(), "clients[0].key_sha256", "required"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"clients":[{"id":"a","key_sha256":"sk-plain"}]}"#.into(), "clients[0].key_sha256", "64 hex"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"clients":[{"id":"a","team":"red","key_sha256":"0000000000000000000000000000000000000000000000000000000000000000"}]}"#.into(), "clients[0].team", "no team"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"clients":[{"id":"a","expires_at":"tomorrow","key_sha256":"0000000000000000000000000000000000000000000000000000000000000000"}]}"#.into(), "clients[0].expires_at", "RFC 3339"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"teams":[{"id":"t","allowed_providers":["azure"]}]}"#.into(), "teams[0].allowed_providers", "no provider"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"teams":[{"id":"t","rpm":0}]}"#.into(), "teams[0].rpm", "from 1"),
        ];
        for (json, field, reason) in cases {
            match compile(json.as_bytes(), &env) {
                Ok(_) => panic!("config {json} was accepted"),
                Err(e) => {
                    assert_eq!(e.field, field, "config {json}: {e}");
                    assert!(e.reason.contains(reason), "config {json}: {e}");
                }
            }
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
