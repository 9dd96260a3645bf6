//! The compiler: plugin JSON -> [`Config`], by one function per top-level
//! section, each named after its section and reading it from the root object.
//!
//! [`compile`] calls them in a fixed order, and the first refusal wins, so
//! that order is part of the behaviour: which error a document with two
//! mistakes gets. The small sections are here; the larger ones have files of
//! their own: `providers` (providers and their keys), `spend` (prices and
//! budgets), `callers` (teams and clients).

use super::model::{
    Admin, Alerts, Config, Cooldown, Decisions, EtcdAuth, Fleet, Objects, Provider, Routing, RoutingHeaders,
    StatusAction, UnknownModel,
};
use super::walk::{check_id, decimal, err, ConfigError, Obj};
use crate::objective::Objective;
use crate::quota::Thresholds;
use rust_decimal::Decimal;
use serde_json::Value;

mod callers;
mod providers;
mod spend;

pub use providers::ENCRYPTION_KEY_ENV;

/// Resolves an environment variable (inside Envoy: one listed in
/// `vm_config.environment_variables.host_env_keys`).
type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// [`Config::models`]: model name -> (provider index, its name there).
type Models = Vec<(String, Vec<(usize, String)>)>;

const DEFAULT_ADMIN_PREFIX: &str = "/apikeyrouter/v1/";

/// Compile plugin configuration bytes into a [`Config`].
///
/// `env` resolves environment variables (inside Envoy: those listed in
/// `vm_config.environment_variables.host_env_keys`).
pub fn compile(bytes: &[u8], env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let root: Value = serde_json::from_slice(bytes).map_err(|e| err("(root)", format!("not valid JSON: {e}")))?;
    let mut root = Obj::new(root, "")?;
    let (providers, mut keys) = providers::providers(&mut root, env)?;
    let cooldown = cooldown(&mut root)?;
    let inject_stream_usage = root.opt_bool("inject_stream_usage")?.unwrap_or(true);
    // The request's outcome in filter state for access logs: a host call
    // (about 8 µs) that only gateways logging it should pay.
    let access_log_state = root.opt_bool("access_log_state")?.unwrap_or(false);
    let forward_headers = forward_headers(&mut root)?;
    let admin = admin(&mut root, env)?;
    let routing = routing(&mut root)?;
    let status_actions = status_actions(&mut root)?;
    let error_code_actions = error_code_actions(&mut root)?;
    // A key disabled by a provider's answer is tried again with one real
    // request this long after it was disabled (0: never).
    let probe_disabled_after_ms =
        root.opt_u64_in("probe_disabled_after_seconds", 0, 30 * 86_400)?.unwrap_or(600) * 1000;
    let decisions = decisions(&mut root)?;
    let prices = spend::prices(&mut root)?;
    let unknown_model = spend::unknown_model(&mut root)?;
    let estimate = spend::estimate(&mut root)?;
    let max_cost_per_request = spend::max_cost_per_request(&mut root)?;
    let mut budgets = spend::budgets(&mut root, &providers, &mut keys)?;
    // Seconds a reservation may stay held before it expires (its request lost).
    if let Some(ttl) = root.opt_u64_in("reservation_ttl_seconds", 10, 86_400)? {
        for b in budgets.iter_mut() {
            b.reservation_ttl_ms = ttl * 1000;
        }
    }
    let stream_cutoff = root.opt_bool("stream_cutoff")?.unwrap_or(false);
    let fleet = fleet(&mut root, env)?;
    let alerts = alerts(&mut root)?;
    if let Some(i) = budgets.iter().position(|b| !b.alerts.is_empty()).filter(|_| alerts.is_none()) {
        return Err(err(&format!("budgets[{i}].alerts"), "needs the top-level alerts section (the webhook cluster)"));
    }
    let models = models(&mut root, &providers)?;
    let max_transitions = root.opt_u64_in("max_transitions", 0, 100_000)?.unwrap_or(1000) as usize;
    let teams = callers::teams(&mut root, &providers)?;
    let clients = callers::clients(&mut root, &providers, &teams)?;
    let objects = objects(&mut root)?;
    if unknown_model == Some(UnknownModel::Refuse) && prices.is_empty() {
        return Err(err("unknown_model", "\"refuse\" needs a price table in prices"));
    }
    // With a budget to keep, a model without a price is refused unless the
    // config says to count it at zero.
    let unknown_model =
        unknown_model.unwrap_or(if budgets.is_empty() { UnknownModel::Zero } else { UnknownModel::Refuse });
    root.finish()?;
    Ok(Config {
        providers,
        keys: keys.into(),
        cooldown,
        inject_stream_usage,
        access_log_state,
        forward_headers,
        admin,
        max_transitions,
        routing,
        status_actions,
        error_code_actions,
        probe_disabled_after_ms,
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
        objects,
        alerts,
    })
}

/// `objects`: the records of where provider objects live and who owns
/// them (on unless `enabled: false`): for how long (`ttl_seconds`, 30 days
/// by default), how many (`max_records`), whether an id without a record
/// may be used (`unknown_objects`) and what a list endpoint answers a
/// client (`list_endpoints`).
fn objects(root: &mut Obj) -> Result<Objects, ConfigError> {
    let mut out = Objects {
        enabled: true,
        ttl_ms: 30 * 86_400_000,
        layout: crate::objects::Layout::new(10_000),
        deny_unknown: false,
        filter_lists: true,
    };
    let Some(mut o) = root.opt_obj("objects")? else { return Ok(out) };
    out.enabled = o.opt_bool("enabled")?.unwrap_or(true);
    out.ttl_ms = o.opt_u64_in("ttl_seconds", 60, 366 * 86_400)?.unwrap_or(30 * 86_400) * 1000;
    out.layout = crate::objects::Layout::new(o.opt_u64_in("max_records", 1, 100_000)?.unwrap_or(10_000) as usize);
    // Each policy is one of two words: is it the second?
    let mut second = |name: &str, first: &str, other: &str| -> Result<bool, ConfigError> {
        match o.opt_str(name)? {
            None => Ok(false),
            Some(x) if x == first || x == other => Ok(x == other),
            Some(x) => Err(err(&o.field(name), format!("{x:?}: expected \"{first}\" or \"{other}\""))),
        }
    };
    out.deny_unknown = second("unknown_objects", "allow", "deny")?;
    out.filter_lists = !second("list_endpoints", "filter", "deny")?;
    o.finish()?;
    Ok(out)
}

/// `alerts`: the webhook cluster alert events are posted to.
fn alerts(root: &mut Obj) -> Result<Option<Alerts>, ConfigError> {
    let Some(mut a) = root.opt_obj("alerts")? else {
        return Ok(None);
    };
    let cluster = a
        .opt_str("cluster")?
        .filter(|c| !c.is_empty())
        .ok_or_else(|| err(&a.field("cluster"), "required (the Envoy cluster of the webhook)"))?;
    let path = a.opt_str("path")?.unwrap_or_else(|| "/".into());
    if !path.starts_with('/') || path.len() > 1024 || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(err(&a.field("path"), "must start with '/' and hold no spaces or control characters"));
    }
    let authority = a.opt_str("authority")?.unwrap_or_else(|| cluster.clone());
    let timeout_ms = a.opt_u64_in("timeout_ms", 10, 60_000)?.unwrap_or(5000);
    let max_queue = a.opt_u64_in("max_queue", 1, 10_000)?.unwrap_or(256) as usize;
    let max_attempts = a.opt_u64_in("max_attempts", 1, 100)?.unwrap_or(10) as u32;
    let mut headers = Vec::new();
    if let Some(h) = a.opt_obj("headers")? {
        for (name, v) in h.entries() {
            let at = a.field(&format!("headers.{name}"));
            let lower = name.to_ascii_lowercase();
            let reserved = [":", "host", "content-type", "content-length", "transfer-encoding", "connection"];
            if lower.is_empty()
                || !lower.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                || reserved.iter().any(|r| lower.starts_with(r))
            {
                return Err(err(&at, "expected a header name other than the call's own"));
            }
            match v.as_str() {
                Some(s) if !s.bytes().any(|b| b.is_ascii_control()) => headers.push((lower, s.to_string())),
                _ => return Err(err(&at, "expected a string without control characters")),
            }
        }
    }
    a.finish()?;
    Ok(Some(Alerts { cluster, path, authority, timeout_ms, headers, max_queue, max_attempts }))
}

/// `forward_headers`: caller header names (or prefixes ending in `*`)
/// forwarded besides the built-in allowlist; never a credential, a router
/// header or one only a key may set.
fn forward_headers(root: &mut Obj) -> Result<Vec<String>, ConfigError> {
    let field = root.field("forward_headers");
    let mut out = Vec::new();
    for (i, v) in root.opt_array("forward_headers")?.unwrap_or_default().iter().enumerate() {
        let at = format!("{field}[{i}]");
        let name = v.as_str().ok_or_else(|| err(&at, "expected a header name"))?.to_ascii_lowercase();
        let stem = name.strip_suffix('*').unwrap_or(&name);
        let valid = !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return Err(err(&at, "expected a header name, or a prefix ending in *"));
        }
        let credential = ["authorization", "x-api-key", "api-key", "x-goog-api-key", "x-apikeyrouter-"];
        let prefix = name.ends_with('*');
        let key_only = crate::forward::KEY_ONLY
            .iter()
            .chain(&credential)
            .any(|h| (prefix && h.starts_with(stem)) || stem == *h || (h.ends_with('-') && stem.starts_with(h)));
        if key_only || name == "host" {
            return Err(err(
                &at,
                "a credential, router header or key-only header (OpenAI-Organization/Project) is never forwarded",
            ));
        }
        out.push(name);
    }
    Ok(out)
}

/// `cooldown`: how long a key rests after a 429 without `retry-after`, and
/// the longest rest any `retry-after` may ask for.
fn cooldown(root: &mut Obj) -> Result<Cooldown, ConfigError> {
    let Some(mut c) = root.opt_obj("cooldown")? else {
        return Ok(Cooldown { default_ms: 60_000, max_ms: 3_600_000 });
    };
    let default_s = c.opt_u64_in("default_seconds", 1, 86_400)?.unwrap_or(60);
    let max_s = c.opt_u64_in("max_seconds", 1, 7 * 86_400)?.unwrap_or(3600);
    if default_s > max_s {
        return Err(err(&c.field("default_seconds"), "must not exceed cooldown.max_seconds"));
    }
    c.finish()?;
    Ok(Cooldown { default_ms: default_s * 1000, max_ms: max_s * 1000 })
}

/// `admin`: disabled when absent; enabled, it needs a token from `token_env`
/// and may have a read-only one from `read_token_env`. Only their SHA-256
/// digests are kept.
fn admin(root: &mut Obj, env: Env<'_>) -> Result<Admin, ConfigError> {
    let Some(mut a) = root.opt_obj("admin")? else {
        return Ok(Admin {
            enabled: false,
            prefix: DEFAULT_ADMIN_PREFIX.to_string(),
            token_sha256: None,
            read_token_sha256: None,
            probe_path: None,
        });
    };
    let enabled = a.opt_bool("enabled")?.unwrap_or(true);
    let prefix = a.opt_str("prefix")?.unwrap_or_else(|| DEFAULT_ADMIN_PREFIX.to_string());
    if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 2 {
        return Err(err(&a.field("prefix"), "must start and end with '/', e.g. \"/apikeyrouter/v1/\""));
    }
    if prefix.starts_with("/v1/") {
        return Err(err(&a.field("prefix"), "must not overlap the OpenAI API paths under /v1/"));
    }
    let token = match a.opt_str("token_env")? {
        Some(name) if enabled => Some(admin_token(&a.field("token_env"), &name, env)?),
        None if enabled => return Err(err(&a.field("token_env"), "required when the admin API is enabled")),
        _ => None,
    };
    let read_token = match a.opt_str("read_token_env")? {
        Some(name) if enabled => Some(admin_token(&a.field("read_token_env"), &name, env)?),
        _ => None,
    };
    if read_token.is_some() && read_token == token {
        return Err(err(&a.field("read_token_env"), "must hold another token than token_env"));
    }
    let probe_path = a.opt_str("probe_path")?;
    if let Some(p) = &probe_path {
        let well_formed = p.len() >= 2
            && p.len() <= 256
            && p.starts_with('/')
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"/-_.~".contains(&b));
        if !well_formed {
            return Err(err(
                &a.field("probe_path"),
                "must be a path of 2-256 characters starting with '/' (A-Z a-z 0-9 / - _ . ~), e.g. \"/healthz\"",
            ));
        }
        if p.starts_with("/v1/") || p.starts_with(prefix.as_str()) {
            return Err(err(&a.field("probe_path"), "must not be under /v1/ (the OpenAI API) or under admin.prefix"));
        }
    }
    a.finish()?;
    let digest = |t: Option<String>| t.map(|t| crate::crypto::sha256(t.as_bytes()));
    Ok(Admin { enabled, prefix, token_sha256: digest(token), read_token_sha256: digest(read_token), probe_path })
}

/// An admin token from the environment variable `name`: at least 16
/// characters.
fn admin_token(field: &str, name: &str, env: Env<'_>) -> Result<String, ConfigError> {
    match env(name) {
        Some(v) if v.len() >= 16 => Ok(v),
        Some(_) => Err(err(field, format!("environment variable {name} must hold at least 16 characters"))),
        None => Err(err(
            field,
            format!(
                "environment variable {name} is not set (list it in vm_config.environment_variables.host_env_keys)"
            ),
        )),
    }
}

/// `routing`: the objective and how key statistics are kept.
fn routing(root: &mut Obj) -> Result<Routing, ConfigError> {
    let Some(mut r) = root.opt_obj("routing")? else {
        return Ok(Routing {
            objective: Objective::default(),
            allow_objective_header: true,
            route_objectives: false,
            reliability_window_ms: 300_000,
            stats_refresh_ms: 1000,
            thresholds: Thresholds::default(),
            max_fallovers: DEFAULT_FALLOVERS,
        });
    };
    let objective = objective(&mut r)?.unwrap_or_default();
    let allow_objective_header = r.opt_bool("allow_objective_header")?.unwrap_or(true);
    // Reading a route's metadata costs every request a host call: only
    // gateways whose routes name objectives pay it.
    let route_objectives = r.opt_bool("route_objectives")?.unwrap_or(false);
    let reliability_window_ms = r.opt_u64_in("reliability_window_seconds", 1, 86_400)?.unwrap_or(300) * 1000;
    let stats_refresh_ms = r.opt_u64_in("stats_refresh_ms", 10, 60_000)?.unwrap_or(1000);
    let thresholds = capacity(&mut r)?;
    let max_fallovers = r.opt_u64_in("max_fallovers", 0, 8)?.map_or(DEFAULT_FALLOVERS, |n| n as u32);
    r.finish()?;
    Ok(Routing {
        objective,
        allow_objective_header,
        route_objectives,
        reliability_window_ms,
        stats_refresh_ms,
        thresholds,
        max_fallovers,
    })
}

/// Fall-overs a request may make by default (`routing.max_fallovers`).
const DEFAULT_FALLOVERS: u32 = 2;

/// `objective`, in `routing` and in a team's or client's policy.
fn objective(o: &mut Obj) -> Result<Option<Objective>, ConfigError> {
    o.take("objective").map(|v| Objective::from_value(&v).map_err(|e| err(&o.field("objective"), e.0))).transpose()
}

/// `routing.capacity`: where remaining quota counts as constrained or critical.
fn capacity(r: &mut Obj) -> Result<Thresholds, ConfigError> {
    let Some(mut c) = r.opt_obj("capacity")? else {
        return Ok(Thresholds::default());
    };
    let d = Thresholds::default();
    let constrained = c.opt_f64_in("constrained_below", 0.0, 1.0)?.unwrap_or(d.constrained);
    let critical = c.opt_f64_in("critical_below", 0.0, 1.0)?.unwrap_or(d.critical);
    if critical > constrained {
        return Err(err(&c.field("critical_below"), "must not exceed constrained_below"));
    }
    c.finish()?;
    Ok(Thresholds { constrained, critical })
}

/// `status_actions`: HTTP status -> action, merged over the defaults. A 401
/// or 403 has no action of its own by default: only an error code that
/// blames the key disables it (`provider_error::blames_key`).
fn status_actions(root: &mut Obj) -> Result<Vec<(u32, StatusAction)>, ConfigError> {
    let mut status_actions: Vec<(u32, StatusAction)> =
        vec![(429, StatusAction::Cooldown), (402, StatusAction::Exhaust)];
    if let Some(a) = root.opt_obj("status_actions")? {
        for (k, v) in a.entries() {
            let field = a.field(k);
            let status: u32 = k
                .parse()
                .ok()
                .filter(|s| (400..600).contains(s))
                .ok_or_else(|| err(&field, "expected an HTTP status from 400 to 599 as the key"))?;
            let action = action(v, &field)?;
            status_actions.retain(|(s, _)| *s != status);
            status_actions.push((status, action));
        }
    }
    Ok(status_actions)
}

/// `error_code_actions`: `error.code` -> action, merged over the defaults.
/// A code's action wins over its status's, and over the dialect's bad-key
/// codes, `none` included: a code set to `none` leaves the key as it is
/// whatever the status.
fn error_code_actions(root: &mut Obj) -> Result<Vec<(String, StatusAction)>, ConfigError> {
    let mut error_code_actions = vec![("insufficient_quota".to_string(), StatusAction::Exhaust)];
    if let Some(a) = root.opt_obj("error_code_actions")? {
        for (k, v) in a.entries() {
            let action = action(v, &a.field(k))?;
            error_code_actions.retain(|(c, _)| c != k);
            error_code_actions.push((k.clone(), action));
        }
    }
    Ok(error_code_actions)
}

fn action(v: &Value, field: &str) -> Result<StatusAction, ConfigError> {
    v.as_str()
        .and_then(StatusAction::parse)
        .ok_or_else(|| err(field, "expected \"cooldown\", \"disable\", \"exhaust\" or \"none\""))
}

/// `decisions`: the per-worker record ring and the decision header.
fn decisions(root: &mut Obj) -> Result<Decisions, ConfigError> {
    let Some(mut d) = root.opt_obj("decisions")? else {
        return Ok(Decisions { ring_size: 1000, header: true, headers: RoutingHeaders::Separate });
    };
    let ring_size = d.opt_u64_in("ring_size", 0, 100_000)?.unwrap_or(1000) as usize;
    // `true` / `false` (the decision header with the key-id and attempts
    // headers, or without it), `"combined"` (one header), `"none"`.
    let field = d.field("header");
    let (header, headers) = match d.take("header") {
        None | Some(Value::Bool(true)) => (true, RoutingHeaders::Separate),
        Some(Value::Bool(false)) => (false, RoutingHeaders::Separate),
        Some(Value::String(s)) if s == "combined" => (true, RoutingHeaders::Combined),
        Some(Value::String(s)) if s == "none" => (false, RoutingHeaders::Off),
        Some(_) => return Err(err(&field, "expected true, false, \"combined\" or \"none\"")),
    };
    d.finish()?;
    Ok(Decisions { ring_size, header, headers })
}

/// `models`: model name -> the providers that serve it, in order, each with
/// its own name for the model.
fn models(root: &mut Obj, providers: &[Provider]) -> Result<Models, ConfigError> {
    let mut models = Vec::new();
    if let Some(m) = root.opt_obj("models")? {
        for (name, v) in m.entries() {
            let field = m.field(name);
            let Value::Array(entries) = v else {
                return Err(err(&field, "expected an array of {\"provider\": id, \"model\": name}"));
            };
            let mut served = Vec::new();
            for (i, e) in entries.iter().enumerate() {
                let path = format!("{field}[{i}]");
                let (p, m) = served_by(e, &path, name, providers)?;
                // One pass over the chain: a provider listed twice would
                // send a falling-over request back to where it failed.
                if served.iter().any(|(q, _)| *q == p) {
                    let id = providers.get(p).map_or("", |x| x.id.as_str());
                    return Err(err(
                        &format!("{path}.provider"),
                        format!("provider {id:?} is listed twice for this model"),
                    ));
                }
                served.push((p, m));
            }
            if served.is_empty() {
                return Err(err(&field, "at least one provider is required"));
            }
            models.push((name.clone(), served));
        }
    }
    Ok(models)
}

/// `models.<name>[i]`: a provider index and the model name it is sent.
fn served_by(e: &Value, path: &str, name: &str, providers: &[Provider]) -> Result<(usize, String), ConfigError> {
    let mut o = Obj::new(e.clone(), path)?;
    let pid = o.opt_str("provider")?.ok_or_else(|| err(&o.field("provider"), "required"))?;
    let p = providers
        .iter()
        .position(|x| x.id == pid)
        .ok_or_else(|| err(&o.field("provider"), format!("no provider with id {pid:?}")))?;
    let model = o.opt_str("model")?.unwrap_or_else(|| name.to_string());
    o.finish()?;
    Ok((p, model))
}

/// `fleet`: absent means this instance keeps its state to itself.
fn fleet(root: &mut Obj, env: Env<'_>) -> Result<Option<Fleet>, ConfigError> {
    let Some(mut f) = root.opt_obj("fleet")? else {
        return Ok(None);
    };
    let cluster = f
        .opt_str("etcd_cluster")?
        .ok_or_else(|| err(&f.field("etcd_cluster"), "required (the Envoy cluster of etcd's client port)"))?;
    if cluster.is_empty() {
        return Err(err(&f.field("etcd_cluster"), "must not be empty"));
    }
    let authority = f.opt_str("authority")?.unwrap_or_else(|| cluster.clone());
    let prefix = fleet_prefix(&mut f)?;
    // Checked like an id: it is part of etcd keys.
    let instance = match f.opt_str("instance")? {
        None => None,
        Some(s) => Some(check_id(&f.field("instance"), s)?),
    };
    let sync_interval_ms = f.opt_u64_in("sync_interval_ms", 50, 60_000)?.unwrap_or(500);
    let timeout_ms = f.opt_u64_in("timeout_ms", 10, 60_000)?.unwrap_or(1000);
    let local_share = fleet_local_share(&mut f)?;
    let degraded_after_ms =
        f.opt_u64_in("degraded_after_ms", 0, 3_600_000)?.unwrap_or(3 * sync_interval_ms.max(timeout_ms));
    let auth = etcd_auth(&mut f, env)?;
    let max_range_bytes = f.opt_u64_in("max_range_bytes", 65_536, 1 << 30)?.unwrap_or(16 << 20) as usize;
    let plaintext_runtime_keys = f.opt_bool("plaintext_runtime_keys")?.unwrap_or(false);
    let encryption_key = match env(ENCRYPTION_KEY_ENV) {
        None => None,
        Some(k) => Some(crate::fernet::FernetKey::parse(&k).map_err(|e| {
            err(
                "fleet",
                format!("{ENCRYPTION_KEY_ENV} (runtime keys and budget limits are encrypted with it in etcd): {e}"),
            )
        })?),
    };
    f.finish()?;
    Ok(Some(Fleet {
        cluster,
        authority,
        prefix,
        instance,
        sync_interval_ms,
        timeout_ms,
        local_share,
        degraded_after_ms,
        auth,
        max_range_bytes,
        encryption_key,
        plaintext_runtime_keys,
    }))
}

/// `fleet.username` and `fleet.password_env`: both or neither.
fn etcd_auth(f: &mut Obj, env: Env<'_>) -> Result<Option<EtcdAuth>, ConfigError> {
    let username = f.opt_str("username")?;
    let password_env = f.opt_str("password_env")?;
    match (username, password_env) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(err(&f.field("password_env"), "required with fleet.username")),
        (None, Some(_)) => Err(err(&f.field("username"), "required with fleet.password_env")),
        (Some(u), Some(_)) if u.is_empty() || u.len() > 128 || u.chars().any(char::is_control) => {
            Err(err(&f.field("username"), "must be 1-128 characters without control characters"))
        }
        (Some(username), Some(name)) => match env(&name) {
            Some(password) if !password.is_empty() => Ok(Some(EtcdAuth { username, password })),
            Some(_) => Err(err(&f.field("password_env"), format!("environment variable {name} is empty"))),
            None => Err(err(
                &f.field("password_env"),
                format!(
                    "environment variable {name} is not set (list it in vm_config.environment_variables.host_env_keys)"
                ),
            )),
        },
    }
}

/// `fleet.local_share`: the budget fraction spent alone while etcd is away.
fn fleet_local_share(f: &mut Obj) -> Result<Decimal, ConfigError> {
    match f.take("local_share") {
        None => Ok(Decimal::new(5, 1)),
        Some(v) => decimal(&v)
            .filter(|d| *d > Decimal::ZERO && *d <= Decimal::ONE)
            .ok_or_else(|| err(&f.field("local_share"), "expected a fraction above 0 and at most 1, e.g. 0.5")),
    }
}

/// `fleet.prefix`: the etcd key prefix, without a trailing `/`.
fn fleet_prefix(f: &mut Obj) -> Result<String, ConfigError> {
    let prefix = f.opt_str("prefix")?.unwrap_or_else(|| "/apikeyrouter".into());
    let prefix = prefix.trim_end_matches('/').to_string();
    if prefix.is_empty()
        || !prefix.starts_with('/')
        || prefix.len() > 128
        || prefix.bytes().any(|b| b.is_ascii_control() || b == b' ')
    {
        return Err(err(&f.field("prefix"), "must start with '/', be at most 128 characters and hold no spaces"));
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixture::{env, ok};
    use crate::config::{ProviderKind, SecretSource};

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
        assert_eq!(c.keys.slots(), 2);
        assert_eq!(c.keys[0].weight, 3);
        assert_eq!(c.keys[0].metadata.get("tier"), Some(&Value::String("pro".into())));
        assert_eq!(c.keys[1].source, SecretSource::Inline);
        assert_eq!(c.cooldown.default_ms, 5000);
        assert!(!c.inject_stream_usage);
        assert!(c.admin.enabled);
        assert_eq!(c.admin.prefix, "/akr/");
        assert_eq!(c.admin.probe_path, None, "no probe unless asked for");
        assert_eq!(c.providers[0].keys, vec![0, 1]);
    }

    #[test]
    fn a_probe_path_needs_no_management_api() {
        let c = ok(r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],
          "admin":{"enabled":false,"probe_path":"/healthz"}}"#);
        assert!(!c.admin.enabled);
        assert_eq!(c.admin.probe_path.as_deref(), Some("/healthz"));
        let c = ok(r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],
          "admin":{"prefix":"/api/v1/","token_env":"ADMIN","probe_path":"/health"}}"#);
        assert_eq!((c.admin.prefix.as_str(), c.admin.probe_path.as_deref()), ("/api/v1/", Some("/health")));
    }

    #[test]
    fn alert_thresholds_are_sorted_and_deduplicated_and_the_webhook_gets_defaults() {
        let c = ok(r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"alerts":{"cluster":"hooks"},
          "budgets":[{"id":"b","limit":"10","alerts":[1, "0.80", 0.5, 0.8]}]}"#);
        let t: Vec<String> = c.budgets[0].alerts.iter().map(|d| d.to_string()).collect();
        assert_eq!(t, ["0.5", "0.8", "1"]);
        assert_eq!(
            c.alerts,
            Some(Alerts {
                cluster: "hooks".into(),
                path: "/".into(),
                authority: "hooks".into(),
                timeout_ms: 5000,
                headers: vec![],
                max_queue: 256,
                max_attempts: 10,
            })
        );
    }

    #[test]
    fn admin_tokens_are_kept_only_as_their_sha256() {
        let c = ok(r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],
          "admin":{"token_env":"ADMIN","read_token_env":"ADMIN_READ"}}"#);
        assert_eq!(c.admin.token_sha256, Some(crate::crypto::sha256(b"admin-token-0123456789")));
        assert_eq!(c.admin.read_token_sha256, Some(crate::crypto::sha256(b"admin-read-token-9876543210")));
        let shown = format!("{c:?}");
        assert!(!shown.contains("admin-token-0123456789") && !shown.contains("admin-read-token"), "{shown}");
        let c = ok(r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN"}}"#);
        assert_eq!(c.admin.read_token_sha256, None, "the read-only token is optional");
        let off = ok(r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],
          "admin":{"enabled":false,"token_env":"NOPE","read_token_env":"NOPE"}}"#);
        assert_eq!((off.admin.token_sha256, off.admin.read_token_sha256), (None, None));
    }

    #[test]
    fn unpriced_models_are_refused_by_default_only_when_a_budget_is_configured() {
        let base =
            r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"prices":{"m":{"input":"1","output":"1"}}"#;
        let budget = r#","budgets":[{"id":"b","limit":"1"}]"#;
        let cases = [
            ("", UnknownModel::Zero),
            (budget, UnknownModel::Refuse),
            (&format!(r#"{budget},"unknown_model":"zero""#), UnknownModel::Zero),
            (r#","unknown_model":"refuse""#, UnknownModel::Refuse),
        ];
        for (extra, want) in cases {
            assert_eq!(ok(&format!("{base}{extra}}}")).unknown_model, want, "{extra}");
        }
        let no_prices =
            r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"budgets":[{"id":"b","limit":"1"}]}"#;
        assert_eq!(ok(no_prices).unknown_model, UnknownModel::Refuse, "refused at run time, with a clear reply");
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
        assert_eq!((f.auth, f.max_range_bytes), (None, 16 << 20));
        assert_eq!(ok(r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}]}"#).fleet, None);
    }

    #[test]
    fn etcd_credentials_come_from_the_environment_and_never_show() {
        let c = ok(r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],
            "fleet":{"etcd_cluster":"etcd","username":"gateway","password_env":"ETCD_PW","max_range_bytes":65536}}"#);
        let shown = format!("{c:?}");
        let f = c.fleet.unwrap_or_else(|| panic!("fleet missing"));
        let auth = f.auth.unwrap_or_else(|| panic!("auth missing"));
        assert_eq!((auth.username.as_str(), auth.password.as_str()), ("gateway", "etcd-password-1"));
        assert_eq!(f.max_range_bytes, 65_536);
        assert!(shown.contains("gateway") && !shown.contains("etcd-password-1"), "{shown}");
    }

    #[test]
    fn the_encryption_key_seals_fleet_records_and_a_bad_one_refuses_to_start() {
        let json = r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"fleet":{"etcd_cluster":"etcd"}}"#;
        let key = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
        let with = |v: &'static str| move |n: &str| (n == ENCRYPTION_KEY_ENV).then(|| v.to_string());
        let c = compile(json.as_bytes(), &with(key)).unwrap_or_else(|e| panic!("{e}"));
        let f = c.fleet.unwrap_or_else(|| panic!("fleet missing"));
        assert!(f.encryption_key.is_some() && !f.plaintext_runtime_keys);
        assert!(!format!("{f:?}").contains(key), "{f:?}");
        let e = compile(json.as_bytes(), &with("not-a-key")).err().unwrap_or_else(|| panic!("accepted"));
        assert_eq!(e.field, "fleet");
        assert!(e.reason.contains("APIKEYROUTER_ENCRYPTION_KEY") && !e.reason.contains("not-a-key"), "{e}");
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
            (fleet(r#"{"etcd_cluster":"etcd","username":"gw"}"#), "fleet.password_env", "required with"),
            (fleet(r#"{"etcd_cluster":"etcd","password_env":"ETCD_PW"}"#), "fleet.username", "required with"),
            (fleet(r#"{"etcd_cluster":"etcd","username":"gw","password_env":"NOPE"}"#), "fleet.password_env", "NOPE is not set"),
            (fleet(r#"{"etcd_cluster":"etcd","username":"","password_env":"ETCD_PW"}"#), "fleet.username", "1-128"),
            (fleet(r#"{"etcd_cluster":"etcd","max_range_bytes":1000}"#), "fleet.max_range_bytes", "from 65536"),
            (fleet(r#"{"etcd_cluster":"etcd","plaintext_runtime_keys":"yes"}"#), "fleet.plaintext_runtime_keys", "true or false"),
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
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"forward_headers":["OpenAI-Organization"]}"#.into(), "forward_headers[0]", "never forwarded"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"forward_headers":["x-api-*"]}"#.into(), "forward_headers[0]", "never forwarded"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"forward_headers":["a b"]}"#.into(), "forward_headers[0]", "header name"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{}}"#.into(), "admin.token_env", "required"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"NOPE"}}"#.into(), "admin.token_env", "NOPE is not set"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"SHORT"}}"#.into(), "admin.token_env", "at least 16"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN","prefix":"nope"}}"#.into(), "admin.prefix", "must start and end"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN","read_token_env":"SHORT"}}"#.into(), "admin.read_token_env", "at least 16"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN","read_token_env":"NOPE"}}"#.into(), "admin.read_token_env", "NOPE is not set"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN","read_token_env":"ADMIN"}}"#.into(), "admin.read_token_env", "another token"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN","prefix":"/v1/admin/"}}"#.into(), "admin.prefix", "must not overlap"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN","probe_path":"healthz"}}"#.into(), "admin.probe_path", "starting with '/'"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN","probe_path":"/healthz?x"}}"#.into(), "admin.probe_path", "starting with '/'"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN","probe_path":"/v1/health"}}"#.into(), "admin.probe_path", "must not be under"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"admin":{"token_env":"ADMIN","probe_path":"/apikeyrouter/v1/health"}}"#.into(), "admin.probe_path", "must not be under"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"colldown":{}}"#.into(), "colldown", "unknown field"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"prices":{"gpt-4o":{"input":"x","output":"1"}}}"#.into(), "prices.gpt-4o.input", "decimal"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"prices":{"gpt-4o":{"input":"1"}}}"#.into(), "prices.gpt-4o.output", "required"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"prices":{"dall-e-3":{"per_request":"4 cents"}}}"#.into(), "prices.dall-e-3.per_request", "decimal"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"prices":{"dall-e-3":{"per_request":"0.04","output":"1"}}}"#.into(), "prices.dall-e-3.output", "per token or per request"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"unknown_model":"refuse"}"#.into(), "unknown_model", "needs a price table"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"budgets":[{"id":"b","limit":"0"}]}"#.into(), "budgets[0].limit", "positive decimal"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"budgets":[{"id":"b","limit":"1","window":"week"}]}"#.into(), "budgets[0].window", "minute, hour"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"budgets":[{"id":"b","limit":"1","scope":{"key":"zz"}}]}"#.into(), "budgets[0].scope.key", "no key with id"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"budgets":[{"id":"b","limit":"1","enforcement":"strict"}]}"#.into(), "budgets[0].enforcement", "hard"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"max_cost_per_request":"-1"}"#.into(), "max_cost_per_request", "positive decimal"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"clients":[{"id":"a"}]}"#.into(), "clients[0].key_sha256", "required"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"teams":[{"id":"t","allowed_endpoints":["chat/../files"]}]}"#.into(), "teams[0].allowed_endpoints", "not an endpoint"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"clients":[{"id":"a","allowed_endpoints":["files*"],"key_sha256":"0000000000000000000000000000000000000000000000000000000000000000"}]}"#.into(), "clients[0].allowed_endpoints", "not an endpoint"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"clients":[{"id":"a","key_sha256":"sk-plain"}]}"#.into(), "clients[0].key_sha256", "64 hex"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"clients":[{"id":"a","key_sha256":"0000000000000000000000000000000000000000000000000000000000000000"},{"id":"b","key_sha256":"0000000000000000000000000000000000000000000000000000000000000000"}]}"#.into(), "clients[1].key_sha256", "client \"a\" has the same key"),
            (r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}],"clients":[{"id":"a","key_sha256":"0000000000000000000000000000000000000000000000000000000000000000"},{"id":"a","key_sha256":"1111111111111111111111111111111111111111111111111111111111111111"}]}"#.into(), "clients[1].id", "duplicate client id"),
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
}
