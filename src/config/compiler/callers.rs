//! The caller sections: `teams` and `clients` (virtual keys, stored only as
//! SHA-256), and the policy fields both carry. A client's policy is its
//! team's, overridden field by field by its own.

use super::objective;
use crate::config::model::Provider;
use crate::config::walk::{err, ConfigError, Obj};
use crate::identity::{Client, Clients, Policy};
use hashbrown::HashSet;

/// `teams`: id -> policy, for clients to refer to.
pub(super) fn teams(root: &mut Obj, providers: &[Provider]) -> Result<Vec<(String, Policy)>, ConfigError> {
    let mut teams: Vec<(String, Policy)> = Vec::new();
    if let Some(list) = root.opt_array("teams")? {
        for (i, v) in list.into_iter().enumerate() {
            let mut t = Obj::new(v, &format!("teams[{i}]"))?;
            let id = t.req_id("id")?;
            if teams.iter().any(|(x, _)| *x == id) {
                return Err(err(&t.field("id"), format!("duplicate team id {id:?}")));
            }
            let policy = policy(&mut t, providers)?;
            t.finish()?;
            teams.push((id, policy));
        }
    }
    Ok(teams)
}

/// `clients`: empty means an open gateway. Ids and key digests are checked
/// for duplicates by lookup, so a config of many clients compiles in time
/// proportional to their number.
pub(super) fn clients(
    root: &mut Obj,
    providers: &[Provider],
    teams: &[(String, Policy)],
) -> Result<Clients, ConfigError> {
    let mut clients = Clients::default();
    if let Some(list) = root.opt_array("clients")? {
        let mut ids: HashSet<String> = HashSet::with_capacity(list.len());
        for (i, v) in list.into_iter().enumerate() {
            let c = Obj::new(v, &format!("clients[{i}]"))?;
            let key_field = c.field("key_sha256");
            if let Err(other) = clients.push(client(c, &mut ids, providers, teams)?) {
                let other = clients.get(other).map(|x| x.id.as_str()).unwrap_or_default();
                return Err(err(&key_field, format!("client {other:?} has the same key")));
            }
        }
    }
    Ok(clients)
}

/// `clients[i]`; `ids` holds the ids of the clients before it.
fn client(
    mut c: Obj,
    ids: &mut HashSet<String>,
    providers: &[Provider],
    teams: &[(String, Policy)],
) -> Result<Client, ConfigError> {
    let id = c.req_id("id")?;
    if !ids.insert(id.clone()) {
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
    let key_sha256 = key_sha256(&mut c)?;
    let expires_ms = expires_at(&mut c)?;
    let own = policy(&mut c, providers)?;
    c.finish()?;
    Ok(Client {
        record_name: crate::shared_data::client_record(&id),
        id,
        team,
        key_sha256,
        expires_ms,
        policy: team_policy.overridden_by(&own),
    })
}

/// `clients[i].key_sha256`: required (its uniqueness is [`Clients::push`]'s).
fn key_sha256(c: &mut Obj) -> Result<[u8; 32], ConfigError> {
    let hex = c
        .opt_str("key_sha256")?
        .ok_or_else(|| err(&c.field("key_sha256"), "required: the SHA-256 of the client's key, 64 hex digits"))?;
    parse_sha256(&hex)
        .ok_or_else(|| err(&c.field("key_sha256"), "expected 64 hex digits (the SHA-256 of the key, never the key)"))
}

/// `clients[i].expires_at`: an RFC 3339 time, in ms since the epoch.
fn expires_at(c: &mut Obj) -> Result<Option<u64>, ConfigError> {
    match c.opt_str("expires_at")? {
        None => Ok(None),
        Some(t) => crate::window::parse_rfc3339(&t).map(Some).ok_or_else(|| {
            err(&c.field("expires_at"), format!("{t:?} is not an RFC 3339 time such as \"2027-01-01T00:00:00Z\""))
        }),
    }
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
fn policy(o: &mut Obj, providers: &[Provider]) -> Result<Policy, ConfigError> {
    let allowed_providers = strings(o, "allowed_providers")?;
    if let Some(list) = &allowed_providers {
        if let Some(bad) = list.iter().find(|p| !providers.iter().any(|q| &q.id == *p)) {
            return Err(err(&o.field("allowed_providers"), format!("no provider with id {bad:?}")));
        }
    }
    let allowed_models = strings(o, "allowed_models")?;
    let allowed_endpoints = strings(o, "allowed_endpoints")?;
    if let Some(bad) = allowed_endpoints.iter().flatten().find(|e| !endpoint_entry(e)) {
        return Err(err(
            &o.field("allowed_endpoints"),
            format!("{bad:?} is not an endpoint such as \"chat/completions\", \"files/*\" or \"*\""),
        ));
    }
    let model_aliases = model_aliases(o)?;
    let max_tokens = o.opt_u64_in("max_tokens", 1, 100_000_000)?;
    let max_cost_per_request = o.opt_positive_decimal("max_cost_per_request", "0.10")?;
    let objective = objective(o)?;
    let force_objective = o.opt_bool("force_objective")?.unwrap_or(false);
    let rpm = o.opt_u64_in("rpm", 1, u32::MAX as u64)?;
    let tpm = o.opt_u64_in("tpm", 1, u64::MAX >> 1)?;
    Ok(Policy {
        allowed_providers,
        allowed_models,
        allowed_endpoints,
        model_aliases,
        max_tokens,
        max_cost_per_request,
        objective,
        force_objective,
        rpm,
        tpm,
    })
}

/// An `allowed_endpoints` entry: `*`, or path segments of ASCII letters,
/// digits and `-_.:`, optionally ending in `/*`.
fn endpoint_entry(e: &str) -> bool {
    let stem = e.strip_suffix("/*").unwrap_or(e);
    e == "*"
        || (!stem.is_empty()
            && stem.split('/').all(|s| {
                !s.is_empty()
                    && s != "."
                    && s != ".."
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            }))
}

/// An optional array of strings.
fn strings(o: &mut Obj, name: &str) -> Result<Option<Vec<String>>, ConfigError> {
    match o.opt_array(name)? {
        None => Ok(None),
        Some(items) => items
            .into_iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| err(&o.field(name), "expected an array of strings")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
    }
}

/// `model_aliases`: requested model -> the model sent instead.
fn model_aliases(o: &mut Obj) -> Result<Vec<(String, String)>, ConfigError> {
    let mut model_aliases = Vec::new();
    if let Some(a) = o.opt_obj("model_aliases")? {
        for (from, to) in a.entries() {
            let to = to.as_str().ok_or_else(|| err(&a.field(from), "expected the model name to send instead"))?;
            model_aliases.push((from.clone(), to.to_string()));
        }
    }
    Ok(model_aliases)
}
