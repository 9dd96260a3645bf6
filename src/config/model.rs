//! The compiled configuration: the validated runtime types that requests
//! read ([`Config`], [`Provider`], [`Key`], [`StatusAction`], ...), built once
//! per VM by the compiler and never checked again.
//!
//! Key material lives only in [`Key::auth_value`]; the hand-written `Debug`
//! of [`Key`] and [`Admin`] never prints it, and [`fingerprint`] is the name
//! that logs and the admin API use instead.

use crate::budget::{Budget, KeyPricing, PriceTable};
use crate::crypto;
use crate::identity::Clients;
use crate::objective::Objective;
use crate::quota::{Limits, Thresholds};
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use std::fmt;

/// The most keys a configuration may hold, over all providers.
pub const MAX_KEYS: usize = 10_000;
/// The largest key weight.
pub const MAX_WEIGHT: u64 = 10_000;

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

    pub(super) fn parse(s: &str) -> Option<ProviderKind> {
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
    /// `group`: the organization/project whose objects this key reaches;
    /// `None` is the provider's default group (every key without one).
    pub group: Option<String>,
}

impl Key {
    /// The key's group as records name it (empty: the default group).
    pub fn group_name(&self) -> &str {
        self.group.as_deref().unwrap_or("")
    }
}

/// `objects`: what the gateway remembers of the objects providers keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Objects {
    pub enabled: bool,
    pub ttl_ms: u64,
    pub layout: crate::objects::Layout,
    /// `unknown_objects: "deny"`: an id without a record is not found.
    pub deny_unknown: bool,
    /// `list_endpoints: "filter"` (true) or `"deny"`.
    pub filter_lists: bool,
}

/// Every key requests can use, by index: the configured keys, then those
/// registered at runtime. A deleted runtime key leaves an empty slot, so
/// indexes never shift under a request in flight and no reader can reach a
/// deleted key.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeyTable(Vec<Option<Key>>);

impl KeyTable {
    /// The key at index `k`, unless there is none or it was deleted.
    pub fn get(&self, k: usize) -> Option<&Key> {
        self.0.get(k).and_then(Option::as_ref)
    }

    /// Slots, deleted ones included: the bound of every key index.
    pub fn slots(&self) -> usize {
        self.0.len()
    }

    /// The keys that exist, with their indexes.
    pub fn live(&self) -> impl Iterator<Item = (usize, &Key)> {
        self.0.iter().enumerate().filter_map(|(i, k)| k.as_ref().map(|k| (i, k)))
    }

    /// How many keys exist.
    pub fn count(&self) -> usize {
        self.0.iter().filter(|k| k.is_some()).count()
    }

    /// Appends a key (or the empty slot of a deleted one); its index.
    pub fn push(&mut self, key: Option<Key>) -> usize {
        self.0.push(key);
        self.0.len() - 1
    }

    /// Drops every slot from `n` on.
    pub fn truncate(&mut self, n: usize) {
        self.0.truncate(n);
    }
}

impl From<Vec<Key>> for KeyTable {
    fn from(keys: Vec<Key>) -> KeyTable {
        KeyTable(keys.into_iter().map(Some).collect())
    }
}

#[cfg(test)]
impl std::ops::Index<usize> for KeyTable {
    type Output = Key;
    fn index(&self, k: usize) -> &Key {
        self.get(k).unwrap_or_else(|| panic!("no key {k}"))
    }
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
    /// Deployment name -> the model it serves (Azure).
    pub deployments: Vec<(String, String)>,
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

/// The management API. Its tokens are kept only as SHA-256 digests: a
/// presented token is hashed and the digests compared in constant time, so
/// neither the comparison nor the config holds the token or its length.
#[derive(Clone, PartialEq, Eq)]
pub struct Admin {
    pub enabled: bool,
    /// Always starts and ends with `/`.
    pub prefix: String,
    /// SHA-256 of the token that may do everything; `None` when admin is
    /// disabled.
    pub token_sha256: Option<[u8; 32]>,
    /// SHA-256 of the read-only token (`GET`s only), if one is configured.
    pub read_token_sha256: Option<[u8; 32]>,
    /// The unauthenticated health probe's exact path (`admin.probe_path`),
    /// served even when the management API itself is off.
    pub probe_path: Option<String>,
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
    pub(super) fn parse(s: &str) -> Option<StatusAction> {
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
    /// Read `metadata.filter_metadata.apikeyrouter.objective` of the route.
    pub route_objectives: bool,
    pub reliability_window_ms: u64,
    /// How stale a worker's view of other keys' statistics may get.
    pub stats_refresh_ms: u64,
    pub thresholds: Thresholds,
    /// How many times one request may move on to the next provider of its
    /// `models` entry (an internal redirect each); 0 turns fall-over off.
    pub max_fallovers: u32,
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
    /// etcd's user and password, when etcd has authentication enabled.
    pub auth: Option<EtcdAuth>,
    /// A range answer larger than this is refused (the sync fails).
    pub max_range_bytes: usize,
    /// `APIKEYROUTER_ENCRYPTION_KEY`: runtime keys and budget limits are
    /// kept in etcd as Fernet tokens under it.
    pub encryption_key: Option<crate::fernet::FernetKey>,
    /// `fleet.plaintext_runtime_keys`: without an encryption key, runtime
    /// keys' material may be kept in etcd in plain text (otherwise `POST
    /// keys` is refused in fleet mode).
    pub plaintext_runtime_keys: bool,
}

/// `alerts`: the webhook that budget thresholds and key events are posted
/// to, through an Envoy cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alerts {
    pub cluster: String,
    pub path: String,
    /// `:authority` of the calls (the cluster's name when not set).
    pub authority: String,
    pub timeout_ms: u64,
    /// Extra request headers (e.g. the webhook's own token), lowercase names.
    pub headers: Vec<(String, String)>,
    /// Events waiting per worker; past it the newest is dropped (counted).
    pub max_queue: usize,
    /// Tries per event before it is dropped (counted).
    pub max_attempts: u32,
}

/// etcd's own authentication: a user and its password (from the environment),
/// traded for a token through `/v3/auth/authenticate`.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for EtcdAuth {
    // Hand-written so that `{:?}` can never print the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdAuth").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decisions {
    /// Records kept per worker; 0 keeps none.
    pub ring_size: usize,
    /// Send `x-apikeyrouter-decision` on responses.
    pub header: bool,
    /// Which routing headers answers carry (`decisions.header`).
    pub headers: RoutingHeaders,
}

/// The routing headers on each answer: each one costs a host call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingHeaders {
    /// `x-apikeyrouter-key-id`, `-attempts` and, with `header`, `-decision`.
    Separate,
    /// One `x-apikeyrouter-decision` that also names the key and attempt.
    Combined,
    /// None.
    Off,
}

impl fmt::Debug for Admin {
    // Hand-written so that `{:?}` never prints a token's digest either (a
    // weak token could be found from it offline).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("enabled", &self.enabled)
            .field("prefix", &self.prefix)
            .field("token_sha256", &self.token_sha256.as_ref().map(|_| "<redacted>"))
            .field("read_token_sha256", &self.read_token_sha256.as_ref().map(|_| "<redacted>"))
            .field("probe_path", &self.probe_path)
            .finish()
    }
}

/// The compiled configuration, shared by both stages.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub providers: Vec<Provider>,
    pub keys: KeyTable,
    pub cooldown: Cooldown,
    pub inject_stream_usage: bool,
    /// Leave each request's outcome in filter state for access logs.
    pub access_log_state: bool,
    /// `forward_headers`: caller headers forwarded besides
    /// [`crate::forward::FORWARDED`] (names, or prefixes ending in `*`).
    pub forward_headers: Vec<String>,
    pub admin: Admin,
    /// Most state transitions kept for the admin API.
    pub max_transitions: usize,
    pub routing: Routing,
    /// Per-status actions, defaults merged with the configured ones.
    pub status_actions: Vec<(u32, StatusAction)>,
    /// Actions for an `error.code` (or `error.type`) in a 4xx body.
    pub error_code_actions: Vec<(String, StatusAction)>,
    /// A key disabled by a provider's answer gets one real request (a
    /// half-open probe) this long after it was disabled; 0 never.
    pub probe_disabled_after_ms: u64,
    pub decisions: Decisions,
    pub prices: PriceTable,
    pub unknown_model: UnknownModel,
    pub estimate: Estimate,
    pub max_cost_per_request: Option<Decimal>,
    pub budgets: Vec<Budget>,
    /// End a stream with an SSE error event once a hard budget is crossed.
    pub stream_cutoff: bool,
    /// Callers with virtual keys, indexed by key digest; empty means an
    /// open gateway.
    pub clients: Clients,
    /// Model name -> the providers that serve it, in order of preference,
    /// each with its own name for the model.
    pub models: Vec<(String, Vec<(usize, String)>)>,
    pub fleet: Option<Fleet>,
    pub objects: Objects,
    /// Where alert events go; `None`: nowhere (no budget has thresholds).
    pub alerts: Option<Alerts>,
}

impl Config {
    pub fn key_by_id(&self, id: &str) -> Option<(usize, &Key)> {
        self.keys.live().find(|(_, k)| k.id == id)
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
        (400..500).contains(&status)
    }

    pub fn error_code_action(&self, code: &str) -> Option<StatusAction> {
        self.error_code_actions.iter().find(|(c, _)| c == code).map(|(_, a)| *a)
    }

    /// The first of an error body's codes (most specific first) that has an
    /// action: a configured one (`error_code_actions`), or `disable` for a
    /// code by which the provider's dialect says the key itself is bad. A
    /// code about an organization or project header blames the key only
    /// when the key sent that header itself: a caller's cannot.
    pub fn action_for_codes<'a>(&self, key: &Key, codes: &'a [String]) -> Option<(StatusAction, &'a str)> {
        let kind = self.providers.get(key.provider).map_or(ProviderKind::OpenAi, |p| p.kind);
        codes.iter().find_map(|c| {
            if let Some(a) = self.error_code_action(c) {
                return Some((a, c.as_str()));
            }
            let own_header = crate::provider_error::about_own_header(c)
                .is_some_and(|h| key.extra_headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(h)));
            (own_header || crate::provider_error::blames_key(kind, c)).then_some((StatusAction::Disable, c.as_str()))
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixture::ok;

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
}
