//! The management API, served by the ingress stage as local replies under
//! `admin.prefix` (default `/apikeyrouter/v1/`). Every response is JSON and
//! none carries key material: keys are shown by id and fingerprint.
//!
//! # Who may call it
//!
//! The token of `admin.token_env` may do everything; the token of
//! `admin.read_token_env` only `GET`s (anything else: 403). A presented
//! token is hashed with SHA-256 and compared with the configured digests in
//! constant time, so the answer's timing depends on neither the token nor
//! its length. Every refused authentication (no token, or one that matches
//! neither) is logged once, without the token, counted in
//! `apikeyrouter.admin.auth_failures`, and charged to the worker's
//! [`FailureBudget`]: once that is spent, every admin request on the worker
//! gets a 429 with `retry-after` (counted in
//! `apikeyrouter.admin.auth_throttled`) until it refills.

use crate::budget::{self, show, Budget, Enforcement, Scope};
use crate::config::{Config, Key, SecretSource};
use crate::crypto::{constant_time_eq, sha256};
use crate::decision::{Exclusion, Stored};
use crate::key_record::{Effective, KeyRecord, UNKNOWN};
use crate::keys::{evaluate, read_record, set_state, SetState};
use crate::metrics;
use crate::quota::headroom;
use crate::reply::{self, Reply};
use crate::runtime_keys::{self, RegistryError};
use crate::store::Store;
use crate::transition::{self, Transition};
use serde_json::{json, Value};
use std::cell::Cell;

/// Failed authentications one worker takes at once before it refuses every
/// admin request with a 429.
pub const FAILURE_BURST: u64 = 10;
/// After the burst, one more failure is taken every this many milliseconds
/// (10 a minute per worker).
pub const FAILURE_REFILL_MS: u64 = 6_000;

/// The parts of an HTTP request the admin API looks at.
pub struct AdminRequest<'a> {
    pub method: &'a str,
    /// Path including any query string.
    pub path: &'a str,
    pub authorization: Option<&'a str>,
    pub x_api_key: Option<&'a str>,
    /// The request body, for PATCH and POST.
    pub body: &'a [u8],
}

/// True when `path` belongs to the admin API of `cfg`.
pub fn is_admin_path(cfg: &Config, path: &str) -> bool {
    cfg.admin.enabled && path.starts_with(&cfg.admin.prefix)
}

/// True when `path` (its query string aside) is the health probe's,
/// `admin.probe_path`.
pub fn is_probe_path(cfg: &Config, path: &str) -> bool {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    cfg.admin.probe_path.as_deref() == Some(path)
}

/// The unauthenticated health probe: `{"status": "healthy"}` (200),
/// `"degraded"` (200: fleet mode without a recent sync with etcd, serving on
/// local state) or `"unhealthy"` (503: no key can serve, quota-exhausted keys
/// included). Nothing else: no counts, ids, version or fleet details. It
/// takes no token, so it is neither charged to nor refused by the
/// failed-authentication budget. `record` gives key `i`'s record: on the
/// request path the worker's snapshot, as key choice sees it, so that an
/// unauthenticated probe costs no read per key.
pub fn probe_on(
    cfg: &Config,
    store: &dyn Store,
    method: &str,
    now_ms: u64,
    record: &dyn Fn(usize, &Key) -> KeyRecord,
) -> Reply {
    if method != "GET" && method != "HEAD" {
        let mut r = admin_error(405, "method_not_allowed", "The health probe answers GET and HEAD only.");
        r.headers.push(("allow", "GET, HEAD".to_string()));
        return r;
    }
    let serving = cfg.keys.live().any(|(i, k)| evaluate(cfg, i, &record(i, k), now_ms).excluded.is_none());
    let status = health_status(serving, fleet_degraded(cfg, store, now_ms));
    let mut r = reply::json(if serving { 200 } else { 503 }, &json!({ "status": status }));
    r.headers.push(("cache-control", "no-store".to_string()));
    r
}

/// [`probe_on`] with each key's record read from shared data.
pub fn probe(cfg: &Config, store: &dyn Store, method: &str, now_ms: u64) -> Reply {
    probe_on(cfg, store, method, now_ms, &|_, k| read_or_default(store, k))
}

fn health_status(serving: bool, degraded: bool) -> &'static str {
    match (serving, degraded) {
        (false, _) => "unhealthy",
        (true, true) => "degraded",
        (true, false) => "healthy",
    }
}

/// Fleet mode's sync status, and whether the instance is degraded: the
/// sync says so (it failed, and none succeeded for
/// `fleet.degraded_after_ms`), or its status is stale: no sync succeeded for
/// that long plus one interval and one call's timeout, whatever the status
/// says (a sync that stopped running records nothing). `None` without
/// fleet mode.
fn fleet_state(cfg: &Config, store: &dyn Store, now_ms: u64) -> Option<(crate::fleet::Status, bool)> {
    let f = cfg.fleet.as_ref()?;
    let status = crate::fleet::Status::decode(store.value(crate::fleet::STATUS_KEY).as_deref());
    let stale = status.as_ref().is_some_and(|s| {
        let since = s.last_ok_ms.max(s.started_ms);
        let grace = f.degraded_after_ms.saturating_add(f.sync_interval_ms).saturating_add(f.timeout_ms);
        since > 0 && now_ms.saturating_sub(since) > grace
    });
    let status = status.unwrap_or_default();
    let degraded = status.degraded || stale;
    Some((status, degraded))
}

fn fleet_degraded(cfg: &Config, store: &dyn Store, now_ms: u64) -> bool {
    fleet_state(cfg, store, now_ms).is_some_and(|(_, d)| d)
}

/// What a presented token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `admin.token_env`: everything.
    Full,
    /// `admin.read_token_env`: `GET`s only.
    Read,
}

/// The role of the token a request presents (`Authorization: Bearer`, else
/// `X-API-Key`), or why there is none, for the log.
fn role(cfg: &Config, req: &AdminRequest<'_>) -> Result<Role, &'static str> {
    let bearer =
        req.authorization.and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))).map(str::trim);
    let Some(presented) = bearer.or(req.x_api_key.map(str::trim)) else {
        return Err("no token");
    };
    // Digests of equal length, compared in constant time: neither the
    // token's content nor its length shows in the timing.
    let digest = sha256(presented.as_bytes());
    let full = cfg.admin.token_sha256.is_some_and(|t| constant_time_eq(&digest, &t));
    let read = cfg.admin.read_token_sha256.is_some_and(|t| constant_time_eq(&digest, &t));
    match (full, read) {
        (true, _) => Ok(Role::Full),
        (false, true) => Ok(Role::Read),
        (false, false) => Err("a token that matches no admin token"),
    }
}

/// The failed authentications a worker still takes: a GCRA over failures,
/// [`FAILURE_BURST`] at once and one more every [`FAILURE_REFILL_MS`]. Each
/// worker (VM) keeps its own, so with N workers a caller who spreads guesses
/// over connections gets at most N times as many. Time is passed in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureBudget {
    /// When the budget is whole again (the GCRA's theoretical arrival time).
    full_at_ms: u64,
    /// The current spell of refusals was logged.
    spell_logged: bool,
}

impl FailureBudget {
    const NEW: FailureBudget = FailureBudget { full_at_ms: 0, spell_logged: false };

    /// Failures still taken at `now_ms`; 0 means every request is refused.
    pub fn left(&self, now_ms: u64) -> u64 {
        let debt = self.full_at_ms.saturating_sub(now_ms);
        FAILURE_BURST.saturating_sub(debt.div_ceil(FAILURE_REFILL_MS))
    }

    /// Milliseconds until one more failure is taken (0 when it is now).
    pub fn retry_after_ms(&self, now_ms: u64) -> u64 {
        self.full_at_ms.saturating_sub(now_ms).saturating_sub((FAILURE_BURST - 1) * FAILURE_REFILL_MS)
    }

    /// Charges one failure.
    pub fn charge(&mut self, now_ms: u64) {
        self.full_at_ms = self.full_at_ms.max(now_ms).saturating_add(FAILURE_REFILL_MS);
    }
}

thread_local! {
    /// This worker's failure budget: the VM is the worker's, and runs one
    /// callback at a time.
    static FAILURES: Cell<FailureBudget> = const { Cell::new(FailureBudget::NEW) };
}

fn admin_error(status: u32, code: &str, message: &str) -> Reply {
    let kind = match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400 | 405 => "invalid_request_error",
        _ => "api_error",
    };
    reply::error(status, kind, code, message)
}

/// Handles one admin request with this worker's failure budget. `now_ms` is
/// Unix milliseconds.
pub fn handle(cfg: &Config, store: &dyn Store, req: &AdminRequest<'_>, now_ms: u64) -> Reply {
    FAILURES.with(|cell| {
        let mut failures = cell.get();
        let r = guarded(cfg, store, req, now_ms, &mut failures);
        cell.set(failures);
        r
    })
}

/// Authenticates against `failures`, then answers.
fn guarded(
    cfg: &Config,
    store: &dyn Store,
    req: &AdminRequest<'_>,
    now_ms: u64,
    failures: &mut FailureBudget,
) -> Reply {
    // What the log may show of the request: its method and path, cut short.
    let shown = || {
        let method: String = req.method.chars().take(10).collect();
        let path: String = req.path.chars().take(120).collect();
        format!("{method} {path:?}")
    };
    if failures.left(now_ms) == 0 {
        let wait_s = failures.retry_after_ms(now_ms).div_ceil(1000).max(1);
        metrics::note(metrics::ADMIN_AUTH_THROTTLED, 1);
        if !failures.spell_logged {
            failures.spell_logged = true;
            log::warn!(
                "admin: {FAILURE_BURST} failed authentications on this worker: every admin request gets 429 for {wait_s} s ({} refused first)",
                shown()
            );
        }
        let mut r = admin_error(
            429,
            "admin_auth_throttled",
            "Too many failed admin authentications; retry after the time in the retry-after header.",
        );
        r.headers.push(("retry-after", wait_s.to_string()));
        return r;
    }
    failures.spell_logged = false;
    let role = match role(cfg, req) {
        Ok(role) => role,
        Err(why) => {
            failures.charge(now_ms);
            metrics::note(metrics::ADMIN_AUTH_FAILURES, 1);
            log::warn!(
                "admin: {} refused: {why}; {} more failed authentications on this worker before it answers 429",
                shown(),
                failures.left(now_ms)
            );
            let mut r = admin_error(
                401,
                "invalid_admin_token",
                "Missing or invalid admin token. Send it as 'Authorization: Bearer <token>' or 'X-API-Key: <token>'.",
            );
            r.headers.push(("www-authenticate", "Bearer".to_string()));
            return r;
        }
    };
    if role == Role::Read && req.method != "GET" {
        return admin_error(
            403,
            "read_only_token",
            &format!("The read-only admin token may only GET; {} needs the admin token.", req.method),
        );
    }
    route(cfg, store, req, now_ms)
}

/// Answers an authenticated request.
fn route(cfg: &Config, store: &dyn Store, req: &AdminRequest<'_>, now_ms: u64) -> Reply {
    let (path, query) = req.path.split_once('?').unwrap_or((req.path, ""));
    let rest = path.strip_prefix(cfg.admin.prefix.as_str()).unwrap_or("");
    let rest = rest.trim_end_matches('/');
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (req.method, segments.as_slice()) {
        ("GET", ["keys"]) => {
            let keys: Vec<Value> =
                cfg.keys.live().map(|(_, k)| key_json(cfg, k, &read_or_default(store, k), now_ms)).collect();
            reply::json(200, &json!({ "keys": keys }))
        }
        ("GET", ["objects"]) => objects_json(cfg, store, query, now_ms),
        ("GET", ["keys", id]) => match cfg.key_by_id(id) {
            Some((_, k)) => reply::json(200, &key_json(cfg, k, &read_or_default(store, k), now_ms)),
            None => admin_error(404, "key_not_found", &format!("No key with id '{id}'.")),
        },
        ("POST", ["keys"]) => post_key(cfg, store, req.body, now_ms),
        ("DELETE", ["keys", id]) => match runtime_keys::delete(store, cfg, id, now_ms) {
            Ok(_) => {
                crate::shared_data::bump_generation(store);
                note(store, cfg, now_ms, "registry", id, "registered", "deleted", "DELETE keys");
                reply::json(200, &kept(cfg, json!({"id": id, "deleted": true})))
            }
            Err(e) => registry_error(e, id),
        },
        ("GET", ["transitions"]) => match limit_param(query, 100) {
            Ok(n) => reply::json(200, &json!({"transitions": transition::recent(store, cfg.max_transitions, n)})),
            Err(r) => r,
        },
        ("PATCH", ["keys", id]) => match cfg.key_by_id(id) {
            Some((_, k)) => patch_key(cfg, store, k, req.body, now_ms),
            None => admin_error(404, "key_not_found", &format!("No key with id '{id}'.")),
        },
        ("GET", ["decisions"]) => {
            let limit = query.split('&').find_map(|kv| kv.strip_prefix("limit=")).map(|v| v.parse::<usize>());
            match limit {
                Some(Err(_)) => admin_error(400, "invalid_limit", "limit must be a whole number."),
                Some(Ok(n)) => reply::json(200, &json!({"decisions": decisions(cfg, store, n)})),
                None => reply::json(200, &json!({"decisions": decisions(cfg, store, 100)})),
            }
        }
        ("GET", ["budgets"]) => {
            let list: Vec<Value> = cfg.budgets.iter().map(|b| budget_json(cfg, store, b, now_ms)).collect();
            reply::json(200, &json!({ "budgets": list }))
        }
        ("GET", ["budgets", id]) => match cfg.budgets.iter().find(|b| b.id == *id) {
            Some(b) => reply::json(200, &budget_json(cfg, store, b, now_ms)),
            None => admin_error(404, "budget_not_found", &format!("No budget with id '{id}'.")),
        },
        ("PATCH", ["budgets", id]) => match cfg.budgets.iter().find(|b| b.id == *id) {
            Some(b) => patch_budget(cfg, store, b, req.body, now_ms),
            None => admin_error(404, "budget_not_found", &format!("No budget with id '{id}'.")),
        },
        ("GET", ["providers"]) => {
            let providers: Vec<Value> = cfg
                .providers
                .iter()
                .map(|p| {
                    let ids: Vec<&str> =
                        p.keys.iter().filter_map(|&i| cfg.keys.get(i)).map(|k| k.id.as_str()).collect();
                    json!({"id": p.id, "kind": p.kind.as_str(), "keys": ids})
                })
                .collect();
            reply::json(200, &json!({ "providers": providers }))
        }
        ("GET", ["state"]) => reply::json(200, &state_json(cfg, store, now_ms)),
        ("GET", ["health"]) => {
            let s = state_json(cfg, store, now_ms);
            let usable = s["keys"]["available"].as_u64().unwrap_or(0) > 0;
            let fleet = fleet_state(cfg, store, now_ms);
            let degraded = fleet.as_ref().is_some_and(|(_, d)| *d);
            let mut body = json!({
                "status": health_status(usable, degraded),
                "version": env!("CARGO_PKG_VERSION"),
                "keys_registered": s["keys"]["total"],
                "providers_registered": cfg.providers.len(),
                "keys": s["keys"],
                "unavailable": s["unavailable"],
            });
            if let Some((f, degraded)) = fleet {
                body["fleet"] = f.to_json();
                // A stale status is degraded even if its last sync said not.
                body["fleet"]["degraded"] = json!(degraded);
            }
            // Degraded still serves (on local state): 200.
            reply::json(if usable { 200 } else { 503 }, &body)
        }
        (
            _,
            ["keys"]
            | ["keys", _]
            | ["objects"]
            | ["providers"]
            | ["state"]
            | ["health"]
            | ["decisions"]
            | ["budgets"]
            | ["budgets", _],
        ) => admin_error(405, "method_not_allowed", &format!("{} is not supported on {}.", req.method, path)),
        _ => admin_error(404, "not_found", &format!("Unknown admin path '{path}'.")),
    }
}

/// `GET objects[?client=ID][&kind=KIND][&limit=N]`: the objects the
/// gateway remembers (id, kind, provider, key group, owner, expiry), in no
/// particular order, and how many match; never their content.
fn objects_json(cfg: &Config, store: &dyn Store, query: &str, now_ms: u64) -> Reply {
    if !cfg.objects.enabled {
        return admin_error(404, "objects_disabled", "Object records are off (objects.enabled is false).");
    }
    let limit = match limit_param(query, 100) {
        Ok(l) => l.min(10_000),
        Err(r) => return r,
    };
    let param = |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='));
    let client = param("client");
    let kind = param("kind");
    if let Some(k) = kind.filter(|k| crate::objects::Kind::parse(k).is_none()) {
        let shown: String = k.chars().take(32).collect();
        return admin_error(400, "invalid_kind", &format!("Unknown object kind {shown:?}."));
    }
    let recs: Vec<_> = crate::objects::all(store, cfg.objects.layout, now_ms)
        .into_iter()
        .filter(|r| client.is_none_or(|c| r.owner == c) && kind.is_none_or(|k| r.kind.as_str() == k))
        .collect();
    let shown: Vec<String> = recs.iter().take(limit).map(|r| r.to_json(None)).collect();
    let body = format!(r#"{{"objects":[{}],"total":{}}}"#, shown.join(","), recs.len());
    Reply { status: 200, headers: vec![("content-type", "application/json".to_string())], body: body.into_bytes() }
}

/// An answer to an admin change, saying where the change is kept: in fleet
/// mode etcd has it after the next sync (see [`crate::durable`]); otherwise
/// it lives in this process's shared data and is lost when Envoy restarts.
fn kept(cfg: &Config, mut answer: Value) -> Value {
    answer["persistence"] = json!(if cfg.fleet.is_some() {
        "pending: written to etcd by the next fleet sync"
    } else {
        "local: this Envoy process only, lost when it restarts"
    });
    answer
}

/// `?limit=N`, or `default` when absent.
fn limit_param(query: &str, default: usize) -> Result<usize, Reply> {
    match query.split('&').find_map(|kv| kv.strip_prefix("limit=")) {
        None => Ok(default),
        Some(v) => v.parse::<usize>().map_err(|_| admin_error(400, "invalid_limit", "limit must be a whole number.")),
    }
}

/// Records a state transition made through the admin API.
#[allow(clippy::too_many_arguments)]
fn note(store: &dyn Store, cfg: &Config, now_ms: u64, kind: &str, id: &str, from: &str, to: &str, reason: &str) {
    let t = Transition {
        time_ms: now_ms,
        kind: kind.into(),
        id: id.into(),
        from: from.into(),
        to: to.into(),
        reason: reason.into(),
        seq: 0,
    };
    transition::record(store, cfg.max_transitions, t);
}

fn registry_error(e: RegistryError, id: &str) -> Reply {
    match e {
        RegistryError::Invalid(field, reason) => admin_error(400, "invalid_key", &format!("{field}: {reason}")),
        RegistryError::Conflict(id) => admin_error(409, "key_exists", &format!("A key with id '{id}' already exists.")),
        RegistryError::NotFound => admin_error(404, "key_not_found", &format!("No runtime key with id '{id}'.")),
        RegistryError::ConfigKey => admin_error(
            409,
            "config_key",
            &format!(
                "Key '{id}' comes from the configuration and can only be disabled (PATCH with state \"disabled\")."
            ),
        ),
        RegistryError::Full => admin_error(507, "registry_full", "No more runtime keys can be registered."),
        RegistryError::Busy => admin_error(503, "state_busy", "The key registry could not be written."),
    }
}

/// `POST keys`: registers a key at runtime; its material is kept in shared
/// data (in fleet mode also in etcd, sealed: [`crate::durable`]) and never
/// returned.
fn post_key(cfg: &Config, store: &dyn Store, body: &[u8], now_ms: u64) -> Reply {
    let new = match runtime_keys::parse_new_key(body, cfg) {
        Ok(k) => k,
        Err(e) => return registry_error(e, ""),
    };
    if cfg.fleet.as_ref().is_some_and(|f| !crate::durable::Sealing::of(f).runtime_keys) {
        return admin_error(
            409,
            "runtime_keys_not_durable",
            "In fleet mode runtime keys are kept in etcd, and without APIKEYROUTER_ENCRYPTION_KEY their material would be stored there in plain text: set it, or allow that with fleet.plaintext_runtime_keys.",
        );
    }
    let mut new = new;
    new.at_ms = now_ms;
    let id = new.id.clone();
    let reg = match runtime_keys::register(store, cfg, new) {
        Ok(r) => r,
        Err(e) => return registry_error(e, &id),
    };
    crate::shared_data::bump_generation(store);
    note(store, cfg, now_ms, "registry", &id, "absent", "registered", "POST keys");
    match runtime_keys::merged(cfg, &reg) {
        Ok(merged) => match merged.key_by_id(&id) {
            Some((_, k)) => reply::json(201, &kept(cfg, key_json(&merged, k, &read_or_default(store, k), now_ms))),
            None => reply::json(201, &kept(cfg, json!({"id": id}))),
        },
        Err(_) => reply::json(201, &kept(cfg, json!({"id": id}))),
    }
}

/// `PATCH keys/{id}` with `{"state": "disabled"|"available"|"throttled",
/// "duration_seconds": N, "reason": "..."}`; throttled without a duration
/// cools the key for `cooldown.default_seconds`.
fn patch_key(cfg: &Config, store: &dyn Store, k: &Key, body: &[u8], now_ms: u64) -> Reply {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return admin_error(400, "invalid_body", "The body must be a JSON object."),
        Err(e) => return admin_error(400, "invalid_json", &format!("The body is not valid JSON: {e}")),
    };
    // No cooldown is longer than cooldown.max_seconds, an admin's included:
    // other instances drop longer ones from etcd.
    let max_s = cfg.cooldown.max_ms / 1000;
    let duration =
        v.get("duration_seconds").filter(|d| !d.is_null()).map(|d| d.as_u64().filter(|d| (1..=max_s).contains(d)));
    let to = match v.get("state").and_then(Value::as_str) {
        Some("available") => SetState::Available,
        Some("disabled") => SetState::Disabled,
        Some("throttled") => match duration {
            // As the original design: no duration is the default cooldown.
            None => SetState::Throttled { until_ms: now_ms.saturating_add(cfg.cooldown.default_ms) },
            Some(Some(d)) => SetState::Throttled { until_ms: now_ms + d * 1000 },
            Some(None) => {
                return admin_error(
                    400,
                    "invalid_duration",
                    &format!(
                        "duration_seconds must be a whole number from 1 to {max_s} (cooldown.max_seconds), or left out for cooldown.default_seconds."
                    ),
                )
            }
        },
        _ => return admin_error(400, "invalid_state", "state must be \"available\", \"disabled\" or \"throttled\"."),
    };
    let before = read_or_default(store, k).effective(now_ms).as_str();
    match set_state(store, &k.record_name, to, now_ms) {
        Ok(r) => {
            let reason = v.get("reason").and_then(Value::as_str).unwrap_or("");
            let after = r.effective(now_ms).as_str();
            log::info!("admin: key {} set to {after} ({reason})", k.id);
            note(store, cfg, now_ms, "key", &k.id, before, after, &format!("admin: {reason}"));
            reply::json(200, &kept(cfg, key_json(cfg, k, &r, now_ms)))
        }
        Err(e) => admin_error(503, "state_busy", &format!("The key state could not be written: {e:?}")),
    }
}

fn budget_json(cfg: &Config, store: &dyn Store, b: &Budget, now_ms: u64) -> Value {
    let rec = budget::load(store, b, now_ms);
    let limit = rec.limit(b);
    let scope = match &b.scope {
        Scope::Global => json!("global"),
        Scope::Provider(p) => json!({"provider": cfg.providers.get(*p).map(|p| p.id.as_str())}),
        Scope::Key(k) => json!({"key": cfg.keys.get(*k).map(|k| k.id.as_str())}),
        Scope::Model(m) => json!({"model": m}),
        Scope::Client(c) => json!({"client": c}),
        Scope::Team(t) => json!({"team": t}),
    };
    // In fleet mode `spent` is the fleet's: this instance's plus what the
    // others spent as of the last sync.
    let spent = rec.spent.saturating_add(rec.others());
    let mut out = json!({
        "id": b.id,
        "scope": scope,
        "window": b.window.map_or("total", |w| w.as_str()),
        "enforcement": match b.enforcement { Enforcement::Hard => "hard", Enforcement::Soft => "soft" },
        "limit": show(limit),
        "configured_limit": show(b.limit),
        "spent": show(spent),
        "reserved": show(rec.reserved),
        "reservations_expired": rec.expired,
        "remaining": show(rec.remaining(b)),
        "requests": rec.requests,
        "refused": rec.refused,
        "window_start": b.window.map(|_| crate::window::rfc3339(rec.window_start_ms)),
        "resets_at": b.resets_at(now_ms).map(crate::window::rfc3339),
    });
    out["forecast"] = rec.forecast(b, now_ms).to_json(now_ms);
    if cfg.fleet.is_some() {
        out["fleet"] = json!({
            "instance_spent": show(rec.spent),
            "others_spent": show(rec.others()),
            "local_share": rec.local_share.map(show),
        });
    }
    out
}

/// `PATCH budgets/{id}` with `{"limit": "12.50"}`, or `{"limit": null}` to
/// go back to the configured limit. Takes effect on every worker at once.
fn patch_budget(cfg: &Config, store: &dyn Store, b: &Budget, body: &[u8], now_ms: u64) -> Reply {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return admin_error(400, "invalid_body", "The body must be a JSON object."),
        Err(e) => return admin_error(400, "invalid_json", &format!("The body is not valid JSON: {e}")),
    };
    let limit = match v.get("limit") {
        Some(Value::Null) => None,
        Some(Value::String(s)) => match s.trim().parse::<rust_decimal::Decimal>() {
            Ok(d) if d > rust_decimal::Decimal::ZERO => Some(d),
            _ => return admin_error(400, "invalid_limit", "limit must be a positive decimal string, e.g. \"25.00\"."),
        },
        _ => return admin_error(400, "invalid_limit", "limit must be a positive decimal string, or null to reset it."),
    };
    match budget::set_limit(store, b, limit, now_ms) {
        Some(_) if !crate::durable::note_limit(store, &b.id, limit, now_ms) => {
            admin_error(503, "state_busy", "The budget's change time could not be written.")
        }
        Some(_) => {
            let to = limit.map_or("its configured value".to_string(), show);
            log::info!("admin: budget {} limit set to {to}", b.id);
            note(store, cfg, now_ms, "budget", &b.id, "limit", &format!("limit {to}"), "admin");
            reply::json(200, &kept(cfg, budget_json(cfg, store, b, now_ms)))
        }
        None => admin_error(503, "state_busy", "The budget could not be written."),
    }
}

/// The newest `limit` decisions across every worker's ring.
fn decisions(cfg: &Config, store: &dyn Store, limit: usize) -> Vec<Value> {
    let workers = store
        .value(crate::shared_data::DECISION_WORKERS)
        .and_then(|b| b.as_slice().try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    let mut all: Vec<Stored> = Vec::new();
    for w in 0..workers.min(1024) {
        for slot in 0..cfg.decisions.ring_size {
            match store.value(&crate::shared_data::decision_slot(w, slot)) {
                Some(b) => all.extend(Stored::decode(&b)),
                // Slots fill in order: the first gap ends this ring.
                None => break,
            }
        }
    }
    all.sort_by_key(|d| std::cmp::Reverse((d.at_ms, d.seq)));
    all.into_iter().take(limit).map(|d| d.to_json(cfg)).collect()
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
    let state_until = match eff {
        Effective::Exhausted { until_ms } if until_ms > 0 => Some(until_ms),
        _ => None,
    };
    let h = headroom(r, &k.limits, &cfg.routing.thresholds, now_ms);
    let known = |v: u64| (v != UNKNOWN).then_some(v);
    let reported = |at: u64| at > now_ms;
    json!({
        "id": k.id,
        "provider": cfg.providers.get(k.provider).map(|p| p.id.as_str()),
        "group": k.group,
        "state": eff.as_str(),
        "state_reason": match eff { Effective::Disabled | Effective::Exhausted { .. } => Some(r.reason.as_str()), _ => None },
        "state_until_ms": state_until,
        "cooldown_until_ms": cooldown_until,
        "cooldown_remaining_ms": cooldown_until.map(|t| t.saturating_sub(now_ms)),
        "capacity_state": h.capacity.as_str(),
        "headroom": (h.fraction * 1000.0).round() / 1000.0,
        "headroom_tightest": if h.tightest.is_empty() { None } else { Some(h.tightest) },
        "forecast": crate::forecast::key(r, &k.limits, now_ms).to_json(now_ms),
        "reliability": (r.reliability(now_ms, cfg.routing.reliability_window_ms) * 1000.0).round() / 1000.0,
        "latency_ms": (r.latency_samples > 0).then(|| r.latency_us as f64 / 1000.0),
        "provider_limits": {
            "remaining_requests": if reported(r.provider.reset_requests_ms) { known(r.provider.remaining_requests) } else { None },
            "limit_requests": known(r.provider.limit_requests),
            "remaining_tokens": if reported(r.provider.reset_tokens_ms) { known(r.provider.remaining_tokens) } else { None },
            "limit_tokens": known(r.provider.limit_tokens),
        },
        "limits": {"rpm": k.limits.rpm, "tpm": k.limits.tpm, "daily_tokens": k.limits.daily_tokens,
                   "monthly_tokens": k.limits.monthly_tokens},
        "cost_per_1k": k.cost_per_1k.map(|d| d.to_string()),
        "weight": k.weight,
        "metadata": k.metadata,
        "fingerprint": k.fingerprint,
        "source": match k.source {
            SecretSource::Env => "config:env",
            SecretSource::Inline => "config:inline",
            SecretSource::Runtime => "runtime",
        },
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
            "reasoning_tokens": r.reasoning_tokens,
        },
    })
}

/// At most this many keys that cannot serve are listed, with why, in
/// `GET state` and `GET health`.
const MAX_UNAVAILABLE_LISTED: usize = 100;

fn state_json(cfg: &Config, store: &dyn Store, now_ms: u64) -> Value {
    let (mut available, mut throttled, mut disabled, mut exhausted, mut quota_exhausted) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut requests, mut input, mut output, mut total) = (0u64, 0u64, 0u64, 0u64);
    let mut spent = rust_decimal::Decimal::ZERO;
    let mut unavailable: Vec<Value> = Vec::new();
    for (i, k) in cfg.keys.live() {
        let r = read_or_default(store, k);
        // As key choice sees the key: its state, then its capacity.
        let excluded = evaluate(cfg, i, &r, now_ms).excluded;
        let detail = match excluded {
            None => {
                available += 1;
                None
            }
            Some((Exclusion::QuotaExhausted, _)) => {
                quota_exhausted += 1;
                Some(headroom(&r, &k.limits, &cfg.routing.thresholds, now_ms).tightest)
            }
            Some((Exclusion::Throttled, _)) => {
                throttled += 1;
                None
            }
            Some((Exclusion::Disabled, _)) => {
                disabled += 1;
                Some(r.reason.as_str())
            }
            Some(_) => {
                exhausted += 1;
                Some(r.reason.as_str())
            }
        };
        if let Some((why, until)) = excluded.filter(|_| unavailable.len() < MAX_UNAVAILABLE_LISTED) {
            unavailable.push(json!({
                "id": k.id,
                "reason": why.as_str(),
                "detail": detail.filter(|d| !d.is_empty()),
                "until_ms": (until > 0).then_some(until),
            }));
        }
        requests += r.requests;
        input += r.input_tokens;
        output += r.output_tokens;
        total += r.total_tokens;
        spent = spent.checked_add(r.spent).unwrap_or(rust_decimal::Decimal::MAX);
    }
    let budgets: Vec<Value> = cfg
        .budgets
        .iter()
        .map(|b| {
            let r = budget::load(store, b, now_ms);
            json!({"id": b.id, "spent": show(r.spent), "reserved": show(r.reserved), "limit": show(r.limit(b))})
        })
        .collect();
    json!({
        "budgets": budgets,
        "keys": {"total": available + throttled + disabled + exhausted + quota_exhausted, "available": available,
                 "throttled": throttled, "disabled": disabled, "exhausted": exhausted,
                 "quota_exhausted": quota_exhausted},
        "unavailable": unavailable,
        "quotas": {"exhausted_keys": quota_exhausted},
        "costs": {"total_spent": show(spent)},
        "requests": requests,
        "tokens": {"input": input, "output": output, "total": total},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile;
    use crate::key_record::Outcome;
    use crate::keys::{record_attempt, KeyAction};
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
        AdminRequest { method: "GET", path, authorization: auth, x_api_key: None, body: b"" }
    }

    fn body(r: &Reply) -> Value {
        serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&r.body)))
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
                body: b"",
            },
            0,
        );
        assert_eq!(r.status, 200);
    }

    const READ_TOKEN: &str = "admin-read-token-9876543210";

    fn cfg_with_read_token() -> Config {
        let json = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"sk-material-one"}]}],
            "admin":{"token_env":"ADMIN","read_token_env":"READ"}}"#;
        let env = |n: &str| match n {
            "ADMIN" => Some(TOKEN.to_string()),
            "READ" => Some(READ_TOKEN.to_string()),
            _ => None,
        };
        compile(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"))
    }

    fn call<'a>(method: &'a str, path: &'a str, token: &'a str, body: &'a [u8]) -> AdminRequest<'a> {
        AdminRequest { method, path, authorization: None, x_api_key: Some(token), body }
    }

    #[test]
    fn the_read_only_token_reads_everything_and_changes_nothing() {
        let c = cfg_with_read_token();
        let s = FakeStore::new();
        for path in ["keys", "keys/k1", "state", "health", "providers", "budgets", "decisions", "transitions"] {
            let path = format!("/apikeyrouter/v1/{path}");
            assert_eq!(handle(&c, &s, &call("GET", &path, READ_TOKEN, b""), 0).status, 200, "{path}");
        }
        let disable = br#"{"state":"disabled"}"#;
        let add = br#"{"id":"evil","provider":"openai","key_material":"sk-attacker-owned"}"#;
        for (method, path, sent) in [
            ("PATCH", "/apikeyrouter/v1/keys/k1", &disable[..]),
            ("POST", "/apikeyrouter/v1/keys", &add[..]),
            ("DELETE", "/apikeyrouter/v1/keys/k1", b""),
            ("PATCH", "/apikeyrouter/v1/budgets/none", br#"{"limit":"1"}"#),
        ] {
            let r = handle(&c, &s, &call(method, path, READ_TOKEN, sent), 0);
            assert_eq!((r.status, body(&r)["error"]["code"].clone()), (403, Value::from("read_only_token")));
        }
        let k1 = body(&handle(&c, &s, &call("GET", "/apikeyrouter/v1/keys", READ_TOKEN, b""), 0));
        assert_eq!(k1["keys"][0]["state"], "available");
        assert_eq!(k1["keys"].as_array().map(Vec::len), Some(1), "no key was added");
        // The full token still does everything.
        assert_eq!(handle(&c, &s, &call("PATCH", "/apikeyrouter/v1/keys/k1", TOKEN, disable), 0).status, 200);
    }

    #[test]
    fn tokens_are_matched_whole_whatever_their_length() {
        let c = cfg_with_read_token();
        let s = FakeStore::new();
        let longer = format!("{TOKEN}0");
        let shorter = &TOKEN[..TOKEN.len() - 1];
        let padded = format!("{TOKEN}\u{0}");
        for wrong in [longer.as_str(), shorter, padded.as_str(), "", "x", &READ_TOKEN[..16]] {
            assert_eq!(handle(&c, &s, &call("GET", "/apikeyrouter/v1/keys", wrong, b""), 0).status, 401, "{wrong:?}");
        }
    }

    #[test]
    fn the_failure_budget_takes_ten_then_refuses_everyone_until_it_refills() {
        let mut f = FailureBudget::default();
        assert_eq!(f.left(0), FAILURE_BURST);
        for _ in 0..FAILURE_BURST {
            f.charge(1_000);
        }
        assert_eq!((f.left(1_000), f.retry_after_ms(1_000)), (0, FAILURE_REFILL_MS));
        assert_eq!(f.left(1_000 + FAILURE_REFILL_MS - 1), 0);
        assert_eq!(f.left(1_000 + FAILURE_REFILL_MS), 1, "one more every refill interval");
        assert_eq!(f.left(1_000 + FAILURE_BURST * FAILURE_REFILL_MS), FAILURE_BURST, "whole again");
        assert_eq!(f.left(u64::MAX), FAILURE_BURST);
        f.charge(u64::MAX);
        assert!(f.left(u64::MAX) <= FAILURE_BURST, "saturates at the end of time");
    }

    #[test]
    fn wrong_tokens_are_counted_and_slowed_down_with_429_and_retry_after() {
        let c = cfg_with_read_token();
        let s = FakeStore::new();
        let _ = metrics::take_noted();
        let get = |token, now| handle(&c, &s, &call("GET", "/apikeyrouter/v1/keys", token, b""), now);
        let t0 = 5_000;
        for i in 0..FAILURE_BURST {
            assert_eq!(get("guess-0123456789abcdef", t0 + i).status, 401, "failure {i}");
        }
        let r = get("guess-0123456789abcdef", t0 + 10);
        assert_eq!((r.status, body(&r)["error"]["code"].clone()), (429, Value::from("admin_auth_throttled")));
        assert!(r.headers.contains(&("retry-after", "6".to_string())), "{:?}", r.headers);
        // While the budget is spent even the right token waits: a guess must
        // not learn whether it was right.
        assert_eq!(get(TOKEN, t0 + 20).status, 429);
        assert_eq!(get(READ_TOKEN, t0 + 20).status, 429);
        assert_eq!(
            metrics::take_noted(),
            vec![(metrics::ADMIN_AUTH_FAILURES, FAILURE_BURST), (metrics::ADMIN_AUTH_THROTTLED, 3)]
        );
        // One refill later: one more attempt.
        let later = t0 + FAILURE_REFILL_MS;
        assert_eq!(get(TOKEN, later).status, 200);
        assert_eq!(get("guess-again-0123456789", later).status, 401);
        assert_eq!(get(TOKEN, later).status, 429);
    }

    #[test]
    fn throttling_lasts_no_longer_than_cooldown_max_seconds() {
        let json = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"s"}]}],
            "cooldown":{"max_seconds":600},"admin":{"token_env":"ADMIN"}}"#;
        let c = compile(json.as_bytes(), &|_| Some(TOKEN.to_string())).unwrap_or_else(|e| panic!("{e}"));
        let s = FakeStore::new();
        let r =
            handle(&c, &s, &patch("/apikeyrouter/v1/keys/k1", br#"{"state":"throttled","duration_seconds":601}"#), 0);
        assert_eq!((r.status, body(&r)["error"]["code"].clone()), (400, Value::from("invalid_duration")));
        let r =
            handle(&c, &s, &patch("/apikeyrouter/v1/keys/k1", br#"{"state":"throttled","duration_seconds":600}"#), 0);
        assert_eq!(body(&r)["cooldown_remaining_ms"], 600_000);
    }

    #[test]
    fn keys_are_listed_with_state_counters_and_fingerprint_but_no_material() {
        let c = cfg();
        let s = FakeStore::new();
        let _ = record_attempt(
            &s,
            &c,
            0,
            &Outcome { status: 429, ..Outcome::default() },
            None,
            KeyAction::CoolUntil(5_000),
            0,
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
        assert_eq!(body(&handle(&c, &s, &get("/apikeyrouter/v1/keys/k2", Some(BEARER)), 0))["id"], "k2");
        assert_eq!(handle(&c, &s, &get("/apikeyrouter/v1/keys/nope", Some(BEARER)), 0).status, 404);
        assert_eq!(handle(&c, &s, &get("/apikeyrouter/v1/whatever", Some(BEARER)), 0).status, 404);
        let del = AdminRequest {
            method: "DELETE",
            path: "/apikeyrouter/v1/health",
            authorization: Some(BEARER),
            x_api_key: None,
            body: b"",
        };
        assert_eq!(handle(&c, &s, &del, 0).status, 405);
    }

    fn patch<'a>(path: &'a str, body: &'a [u8]) -> AdminRequest<'a> {
        AdminRequest { method: "PATCH", path, authorization: Some(BEARER), x_api_key: None, body }
    }

    #[test]
    fn patch_sets_a_key_state_and_refuses_bad_input() {
        let c = cfg();
        let s = FakeStore::new();
        let r = handle(&c, &s, &patch("/apikeyrouter/v1/keys/k1", br#"{"state":"disabled","reason":"rotating"}"#), 0);
        assert_eq!((r.status, body(&r)["state"].clone()), (200, Value::from("disabled")));
        let r =
            handle(&c, &s, &patch("/apikeyrouter/v1/keys/k1", br#"{"state":"throttled","duration_seconds":30}"#), 0);
        assert_eq!(body(&r)["state"], "disabled", "disabled stays disabled while throttled");
        let r = handle(&c, &s, &patch("/apikeyrouter/v1/keys/k1", br#"{"state":"available"}"#), 0);
        assert_eq!(body(&r)["state"], "available");
        let r =
            handle(&c, &s, &patch("/apikeyrouter/v1/keys/k2", br#"{"state":"throttled","duration_seconds":30}"#), 0);
        assert_eq!(body(&r)["cooldown_remaining_ms"], 30_000);
        for (bad, code) in [
            (&b"{"[..], "invalid_json"),
            (b"[]", "invalid_body"),
            (br#"{"state":"sleeping"}"#, "invalid_state"),
            (br#"{"state":"throttled","duration_seconds":0}"#, "invalid_duration"),
            (br#"{"state":"throttled","duration_seconds":"60"}"#, "invalid_duration"),
        ] {
            let r = handle(&c, &s, &patch("/apikeyrouter/v1/keys/k1", bad), 0);
            assert_eq!((r.status, body(&r)["error"]["code"].clone()), (400, Value::from(code)));
        }
        assert_eq!(handle(&c, &s, &patch("/apikeyrouter/v1/keys/zz", br#"{"state":"available"}"#), 0).status, 404);
    }

    #[test]
    fn decisions_are_read_newest_first_across_workers() {
        use crate::decision::{Decision, Stored};
        let c = cfg();
        let s = FakeStore::new();
        let _ = s.set(crate::shared_data::DECISION_WORKERS, &2u64.to_le_bytes(), None);
        for (w, slot, at) in [(0u64, 0usize, 10u64), (0, 1, 30), (1, 0, 20)] {
            let d = Stored {
                at_ms: at,
                seq: 0,
                attempt: 1,
                request_id: format!("r{at}"),
                client: String::new(),
                decision: Decision {
                    objective: "fairness".into(),
                    chosen: Some(0),
                    score: 1.0,
                    margin: None,
                    candidates: 1,
                    excluded: vec![],
                    excluded_total: 0,
                    basis: None,
                },
                charged: None,
                chain: String::new(),
            };
            let _ = s.set(&crate::shared_data::decision_slot(w, slot), &d.encode(), None);
        }
        let r = handle(&c, &s, &get("/apikeyrouter/v1/decisions?limit=2", Some(BEARER)), 0);
        let v = body(&r);
        let ids: Vec<&str> =
            v["decisions"].as_array().into_iter().flatten().filter_map(|d| d["request_id"].as_str()).collect();
        assert_eq!(ids, vec!["r30", "r20"]);
        assert_eq!(handle(&c, &s, &get("/apikeyrouter/v1/decisions?limit=x", Some(BEARER)), 0).status, 400);
    }

    #[test]
    fn budgets_are_listed_and_their_limit_adjusted() {
        let json = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"s"}]}],"admin":{"token_env":"ADMIN"},
            "budgets":[{"id":"daily","limit":"10","window":"day"}]}"#;
        let c = compile(json.as_bytes(), &|_| Some(TOKEN.to_string())).unwrap_or_else(|e| panic!("{e}"));
        let s = FakeStore::new();
        let _ = budget::reserve(&s, &c.budgets, &[0], rust_decimal::Decimal::new(25, 1), 0);
        let v = body(&handle(&c, &s, &get("/apikeyrouter/v1/budgets", Some(BEARER)), 0));
        assert_eq!(v["budgets"][0]["reserved"], "2.5");
        assert_eq!(v["budgets"][0]["remaining"], "7.5");
        assert_eq!(v["budgets"][0]["resets_at"], "1970-01-02T00:00:00Z");
        let r = handle(&c, &s, &patch("/apikeyrouter/v1/budgets/daily", br#"{"limit":"3"}"#), 0);
        assert_eq!(body(&r)["limit"], "3");
        assert_eq!(body(&r)["configured_limit"], "10");
        let r = handle(&c, &s, &patch("/apikeyrouter/v1/budgets/daily", br#"{"limit":null}"#), 0);
        assert_eq!(body(&r)["limit"], "10");
        assert_eq!(handle(&c, &s, &patch("/apikeyrouter/v1/budgets/daily", br#"{"limit":"-2"}"#), 0).status, 400);
        assert_eq!(handle(&c, &s, &patch("/apikeyrouter/v1/budgets/nope", br#"{"limit":"2"}"#), 0).status, 404);
    }

    #[test]
    fn a_budget_limit_too_large_for_millionths_is_shown_with_its_forecast_not_a_trap() {
        let json = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"s"}]}],"admin":{"token_env":"ADMIN"},
            "budgets":[{"id":"daily","limit":"100000000000000000000000000","window":"day"}]}"#;
        let c = compile(json.as_bytes(), &|_| Some(TOKEN.to_string())).unwrap_or_else(|e| panic!("{e}"));
        let s = FakeStore::new();
        for i in 0..=20 {
            let a = budget::reserve(&s, &c.budgets, &[0], rust_decimal::Decimal::ONE, i * 1000)
                .unwrap_or_else(|r| panic!("{r:?}"));
            a.held.settle(&s, &c.budgets, rust_decimal::Decimal::ONE, i * 1000);
        }
        let v = body(&handle(&c, &s, &get("/apikeyrouter/v1/budgets", Some(BEARER)), 20_000));
        assert_eq!(v["budgets"][0]["remaining"], "99999999999999999999999979");
        assert_eq!(v["budgets"][0]["forecast"]["runs_out_before_reset"], false);
        // The same through an override, and the tick's gauges.
        let huge = br#"{"limit":"79228162514264337593543950335"}"#;
        assert_eq!(handle(&c, &s, &patch("/apikeyrouter/v1/budgets/daily", huge), 20_000).status, 200);
        let rec = budget::expire(&s, &c.budgets[0], 20_000);
        let gauges = metrics::budget_forecast_gauges("daily", &rec.forecast(&c.budgets[0], 20_000), 20_000);
        assert_eq!(gauges[0].1, crate::forecast::LASTS);
    }

    #[test]
    fn runtime_keys_are_registered_listed_and_deleted_without_showing_material() {
        let c = cfg();
        let s = FakeStore::new();
        let post = AdminRequest {
            method: "POST",
            path: "/apikeyrouter/v1/keys",
            authorization: Some(BEARER),
            x_api_key: None,
            body: br#"{"id":"r1","provider":"openai","key_material":"sk-runtime-secret"}"#,
        };
        let r = handle(&c, &s, &post, 0);
        assert_eq!((r.status, body(&r)["source"].clone()), (201, Value::from("runtime")));
        assert!(!String::from_utf8_lossy(&r.body).contains("sk-runtime-secret"));
        assert_eq!(handle(&c, &s, &post, 0).status, 409, "id taken");
        let merged = runtime_keys::merged(&c, &runtime_keys::load(&s)).unwrap_or_else(|e| panic!("{e}"));
        let list = handle(&merged, &s, &get("/apikeyrouter/v1/keys", Some(BEARER)), 0);
        assert_eq!(body(&list)["keys"].as_array().map(Vec::len), Some(3));
        let del =
            |path| AdminRequest { method: "DELETE", path, authorization: Some(BEARER), x_api_key: None, body: b"" };
        assert_eq!(
            handle(&merged, &s, &del("/apikeyrouter/v1/keys/k1"), 0).status,
            409,
            "config keys are disabled, not deleted"
        );
        assert_eq!(handle(&merged, &s, &del("/apikeyrouter/v1/keys/r1"), 0).status, 200);
        assert_eq!(handle(&merged, &s, &del("/apikeyrouter/v1/keys/r1"), 0).status, 404);
        // Listing and looking up agree: a deleted key is in neither.
        let after = runtime_keys::merged(&c, &runtime_keys::load(&s)).unwrap_or_else(|e| panic!("{e}"));
        let list = body(&handle(&after, &s, &get("/apikeyrouter/v1/keys", Some(BEARER)), 0));
        let ids: Vec<&str> = list["keys"].as_array().into_iter().flatten().filter_map(|k| k["id"].as_str()).collect();
        assert!(!ids.contains(&"r1") && ids.len() == 2, "{ids:?}");
        assert_eq!(handle(&after, &s, &get("/apikeyrouter/v1/keys/r1", Some(BEARER)), 0).status, 404);
        let t = body(&handle(&c, &s, &get("/apikeyrouter/v1/transitions", Some(BEARER)), 0));
        assert_eq!(t["transitions"][0]["to"], "deleted");
        assert_eq!(t["transitions"][1]["to"], "registered");
    }

    #[test]
    fn health_is_503_when_no_key_is_usable() {
        let c = cfg();
        let s = FakeStore::new();
        assert_eq!(handle(&c, &s, &get("/apikeyrouter/v1/health", Some(BEARER)), 0).status, 200);
        for k in 0..c.keys.slots() {
            let _ = record_attempt(
                &s,
                &c,
                k,
                &Outcome { status: 429, ..Outcome::default() },
                None,
                KeyAction::CoolUntil(9_000),
                0,
            );
        }
        let r = handle(&c, &s, &get("/apikeyrouter/v1/health", Some(BEARER)), 0);
        assert_eq!(r.status, 503);
        assert_eq!(body(&r)["status"], "unhealthy");
        assert_eq!(body(&r)["keys"]["throttled"], 2);
    }

    /// Compiles `json` with the admin token in `ADMIN` and no other
    /// variable set (no encryption key).
    fn compiled(json: &str) -> Config {
        compile(json.as_bytes(), &|v| (v == "ADMIN").then(|| TOKEN.to_string())).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Two keys with a daily quota of 100 tokens, a probe path and prices.
    fn quota_cfg() -> Config {
        compiled(
            r#"{"providers":[{"id":"openai","keys":[
                {"id":"k1","secret":"s1","limits":{"daily_tokens":100}},
                {"id":"k2","secret":"s2","limits":{"daily_tokens":100}}]}],
              "prices":{"gpt-4o":{"input":"2.50","output":"10.00"}},
              "admin":{"token_env":"ADMIN","probe_path":"/healthz"}}"#,
        )
    }

    fn spend(c: &Config, s: &FakeStore, k: usize, tokens: u64, cost: &str, now: u64) {
        let u = crate::usage::Usage { input: tokens, output: 0, total: tokens, ..Default::default() };
        let o = Outcome { status: 200, usage: Some(u), cost: cost.parse().ok(), ..Outcome::default() };
        let _ = record_attempt(s, c, k, &o, None, KeyAction::Nothing, now);
    }

    #[test]
    fn the_probe_says_only_its_status_and_turns_503_when_every_key_is_quota_exhausted() {
        let c = quota_cfg();
        let s = FakeStore::new();
        let r = probe(&c, &s, "GET", 1_000);
        assert_eq!((r.status, body(&r)), (200, json!({"status": "healthy"})));
        assert!(r.headers.contains(&("cache-control", "no-store".to_string())));
        spend(&c, &s, 0, 100, "0.00025", 1_000);
        assert_eq!(probe(&c, &s, "GET", 1_000).status, 200, "k2 still has room");
        spend(&c, &s, 1, 150, "0.000375", 1_000);
        let r = probe(&c, &s, "HEAD", 2_000);
        assert_eq!((r.status, body(&r)), (503, json!({"status": "unhealthy"})));
        // The next UTC day gives the quota back.
        assert_eq!(probe(&c, &s, "GET", 86_400_000).status, 200);
        let r = probe(&c, &s, "POST", 0);
        assert_eq!((r.status, body(&r)["error"]["code"].clone()), (405, Value::from("method_not_allowed")));
    }

    #[test]
    fn state_and_health_count_quota_exhausted_keys_as_unavailable_and_say_why() {
        let c = quota_cfg();
        let s = FakeStore::new();
        spend(&c, &s, 0, 100, "0.00025", 1_000);
        let v = body(&handle(&c, &s, &get("/apikeyrouter/v1/state", Some(BEARER)), 2_000));
        assert_eq!(
            v["keys"],
            json!({"total": 2, "available": 1, "throttled": 0, "disabled": 0, "exhausted": 0,
                                     "quota_exhausted": 1})
        );
        assert_eq!(v["quotas"]["exhausted_keys"], 1);
        assert_eq!(
            v["unavailable"],
            json!([{"id": "k1", "reason": "quota_exhausted", "detail": "daily_tokens",
                                             "until_ms": 86_400_000}])
        );
        spend(&c, &s, 1, 150, "0.000375", 1_000);
        let r = handle(&c, &s, &get("/apikeyrouter/v1/health", Some(BEARER)), 2_000);
        assert_eq!((r.status, body(&r)["status"].clone()), (503, Value::from("unhealthy")));
        assert_eq!(body(&r)["keys"]["quota_exhausted"], 2);
        assert_eq!(body(&r)["unavailable"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn state_sums_the_exact_spend_of_every_key_without_any_budget() {
        let c = quota_cfg();
        assert!(c.budgets.is_empty());
        let s = FakeStore::new();
        let v = body(&handle(&c, &s, &get("/apikeyrouter/v1/state", Some(BEARER)), 0));
        assert_eq!(v["costs"]["total_spent"], "0");
        spend(&c, &s, 0, 10, "0.000025", 0);
        spend(&c, &s, 1, 10, "0.1", 0);
        spend(&c, &s, 1, 10, "0.0000000001", 0);
        let v = body(&handle(&c, &s, &get("/apikeyrouter/v1/state", Some(BEARER)), 0));
        assert_eq!(v["costs"]["total_spent"], "0.1000250001", "exact to the tenth decimal place, as budgets show");
    }

    #[test]
    fn the_probe_is_answered_while_wrong_tokens_have_throttled_the_admin_api() {
        let c = quota_cfg();
        let s = FakeStore::new();
        for i in 0..=FAILURE_BURST {
            let _ = handle(&c, &s, &get("/apikeyrouter/v1/keys", Some("Bearer guess-0123456789")), i);
        }
        assert_eq!(handle(&c, &s, &get("/apikeyrouter/v1/keys", Some(BEARER)), 20).status, 429);
        assert_eq!(probe(&c, &s, "GET", 20).status, 200);
        assert!(is_probe_path(&c, "/healthz") && is_probe_path(&c, "/healthz?check=1"));
        assert!(!is_probe_path(&c, "/healthz/") && !is_probe_path(&c, "/apikeyrouter/v1/health"));
        assert!(!is_probe_path(&cfg(), "/healthz"), "no probe unless configured");
    }

    fn fleet_cfg() -> Config {
        compiled(
            r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"s1"}]}],
              "fleet":{"etcd_cluster":"etcd","instance":"gw-1","sync_interval_ms":500,"timeout_ms":1000,
                       "degraded_after_ms":3000},
              "admin":{"enabled":false,"probe_path":"/healthz"}}"#,
        )
    }

    fn fleet_status(s: &FakeStore, st: &crate::fleet::Status) {
        let _ = s.set(crate::fleet::STATUS_KEY, &st.encode(), None);
    }

    #[test]
    fn in_fleet_mode_the_probe_is_degraded_while_etcd_is_unreachable_or_the_sync_is_stale() {
        let c = fleet_cfg();
        let s = FakeStore::new();
        let mut st = crate::fleet::Status { instance: "gw-1".into(), started_ms: 1_000, ..Default::default() };
        st.succeeded(2_000);
        fleet_status(&s, &st);
        assert_eq!(body(&probe(&c, &s, "GET", 3_000)), json!({"status": "healthy"}));
        // Failed syncs past degraded_after_ms: the sync says degraded.
        let mut failing = st.clone();
        assert!(failing.failed(5_500, "connection refused", 3_000));
        fleet_status(&s, &failing);
        let r = probe(&c, &s, "GET", 5_500);
        assert_eq!((r.status, body(&r)), (200, json!({"status": "degraded"})));
        // A status nobody updated for degraded_after + interval + timeout
        // (4.5 s) is stale: degraded as well.
        fleet_status(&s, &st);
        assert_eq!(body(&probe(&c, &s, "GET", 6_500)), json!({"status": "healthy"}));
        assert_eq!(body(&probe(&c, &s, "GET", 6_501)), json!({"status": "degraded"}));
    }

    #[test]
    fn throttled_without_a_duration_cools_for_the_default_cooldown() {
        let c = compiled(
            r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"s"}]}],
              "cooldown":{"default_seconds":45},"admin":{"token_env":"ADMIN"}}"#,
        );
        let s = FakeStore::new();
        for sent in [
            &br#"{"state":"throttled","reason":"Rate limit encountered"}"#[..],
            br#"{"state":"throttled","duration_seconds":null}"#,
        ] {
            let r = handle(&c, &s, &patch("/apikeyrouter/v1/keys/k1", sent), 1_000);
            assert_eq!((r.status, body(&r)["cooldown_remaining_ms"].clone()), (200, Value::from(45_000)));
            let _ = handle(&c, &s, &patch("/apikeyrouter/v1/keys/k1", br#"{"state":"available"}"#), 1_000);
        }
    }

    fn post<'a>(prefix_path: &'a str, sent: &'a [u8]) -> AdminRequest<'a> {
        AdminRequest { method: "POST", path: prefix_path, authorization: Some(BEARER), x_api_key: None, body: sent }
    }

    #[test]
    fn posting_a_key_without_an_id_generates_one_from_its_fingerprint_and_takes_provider_id() {
        let c = cfg();
        let s = FakeStore::new();
        let sent = br#"{"key_material":"sk-your-openai-key","provider_id":"openai","metadata":{"tier":"payg"}}"#;
        let r = handle(&c, &s, &post("/apikeyrouter/v1/keys", sent), 0);
        let v = body(&r);
        let fp = crate::config::fingerprint("sk-your-openai-key");
        assert_eq!(r.status, 201, "{v}");
        assert_eq!(v["id"], format!("openai-{}", &fp["sha256:".len()..]));
        assert_eq!((v["provider"].clone(), v["fingerprint"].clone()), (Value::from("openai"), Value::from(fp)));
        assert!(!String::from_utf8_lossy(&r.body).contains("sk-your-openai-key"));
        // The same material again has the same id: refused, not duplicated.
        assert_eq!(handle(&c, &s, &post("/apikeyrouter/v1/keys", sent), 0).status, 409);
        let other = br#"{"key_material":"sk-another-key","provider_id":"openai"}"#;
        let r = handle(&c, &s, &post("/apikeyrouter/v1/keys", other), 0);
        assert_eq!(r.status, 201);
        assert_ne!(body(&r)["id"], v["id"]);
        let both = br#"{"key_material":"sk-third","provider":"openai","provider_id":"azure"}"#;
        let r = handle(&c, &s, &post("/apikeyrouter/v1/keys", both), 0);
        assert_eq!((r.status, body(&r)["error"]["code"].clone()), (400, Value::from("invalid_key")));
        let long = "p".repeat(64);
        assert_eq!(runtime_keys::generated_id(&long, "x").len(), 64, "ids stay within 64 characters");
    }

    #[test]
    fn the_api_answers_under_the_designs_api_v1_prefix() {
        let c = compiled(
            r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"s"}]}],
              "admin":{"prefix":"/api/v1/","token_env":"ADMIN"}}"#,
        );
        let s = FakeStore::new();
        assert!(is_admin_path(&c, "/api/v1/keys") && !is_admin_path(&c, "/apikeyrouter/v1/keys"));
        let v = body(&handle(&c, &s, &get("/api/v1/keys", Some(BEARER)), 0));
        assert_eq!(v["keys"][0]["id"], "k1");
        let r = handle(&c, &s, &patch("/api/v1/keys/k1", br#"{"state":"throttled"}"#), 0);
        assert_eq!(body(&r)["cooldown_remaining_ms"], 60_000);
    }
}
