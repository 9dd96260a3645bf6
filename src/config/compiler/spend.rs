//! The spending sections: `prices`, `unknown_model`, `estimate`,
//! `max_cost_per_request` and `budgets` (each with its scope, window, limit
//! and enforcement).

use crate::budget::{Budget, Enforcement, Price, PriceTable, Scope};
use crate::config::model::{Estimate, Key, Provider, UnknownModel};
use crate::config::walk::{decimal, err, ConfigError, Obj};
use crate::window::Window;
use rust_decimal::Decimal;
use serde_json::Value;

/// `prices`: model name (or `prefix*`) -> price per 1M tokens.
pub(super) fn prices(root: &mut Obj) -> Result<PriceTable, ConfigError> {
    let mut prices = PriceTable::default();
    if let Some(table) = root.opt_obj("prices")? {
        for (model, v) in table.entries() {
            let path = table.field(model);
            let price = price(v, &path)?;
            if model.is_empty() || model == "*" {
                return Err(err(&path, "a model name or prefix* is required"));
            }
            prices.insert(model, price);
        }
    }
    Ok(prices)
}

/// `prices.<model>`: per token, `input` and `output` required and
/// `cached_input` defaulting to `input`; or per request, `per_request` alone.
fn price(v: &Value, path: &str) -> Result<Price, ConfigError> {
    let mut p = Obj::new(v.clone(), path)?;
    if let Some(per_request) = price_field(&mut p, "per_request", false)? {
        if let Some(f) = ["input", "output", "cached_input"].into_iter().find(|f| p.take(f).is_some()) {
            return Err(err(&p.field(f), "not with per_request: a model is priced per token or per request"));
        }
        p.finish()?;
        return Ok(Price { per_request: Some(per_request), ..Price::default() });
    }
    let input = price_field(&mut p, "input", true)?.unwrap_or_default();
    let output = price_field(&mut p, "output", true)?.unwrap_or_default();
    let cached_input = price_field(&mut p, "cached_input", false)?.unwrap_or(input);
    p.finish()?;
    Ok(Price { input, output, cached_input, per_request: None })
}

fn price_field(p: &mut Obj, name: &str, required: bool) -> Result<Option<Decimal>, ConfigError> {
    match p.take(name) {
        None if required => {
            Err(err(&p.field(name), "required (price per 1M tokens), or per_request alone (price of one request)"))
        }
        None => Ok(None),
        Some(v) => decimal(&v)
            .map(Some)
            .ok_or_else(|| err(&p.field(name), "expected a non-negative decimal string, e.g. \"2.50\"")),
    }
}

/// `unknown_model`: `zero` or `refuse`; `None` when absent (then `refuse`
/// when any budget is configured, else `zero`).
pub(super) fn unknown_model(root: &mut Obj) -> Result<Option<UnknownModel>, ConfigError> {
    match root.opt_str("unknown_model")?.as_deref() {
        None => Ok(None),
        Some("zero") => Ok(Some(UnknownModel::Zero)),
        Some("refuse") => Ok(Some(UnknownModel::Refuse)),
        Some(other) => Err(err("unknown_model", format!("expected \"zero\" or \"refuse\", found {other:?}"))),
    }
}

/// `estimate`: how a request's cost is bounded before it runs.
pub(super) fn estimate(root: &mut Obj) -> Result<Estimate, ConfigError> {
    let Some(mut e) = root.opt_obj("estimate")? else {
        return Ok(Estimate { prompt_bytes_per_token: 1, default_max_tokens: 4096 });
    };
    let est = Estimate {
        prompt_bytes_per_token: e.opt_u64_in("prompt_bytes_per_token", 1, 16)?.unwrap_or(1),
        default_max_tokens: e.opt_u64_in("default_max_tokens", 0, 10_000_000)?.unwrap_or(4096),
    };
    e.finish()?;
    Ok(est)
}

/// `max_cost_per_request`: no limit when absent.
pub(super) fn max_cost_per_request(root: &mut Obj) -> Result<Option<Decimal>, ConfigError> {
    root.opt_positive_decimal("max_cost_per_request", "0.50")
}

/// `budgets`: a key-scoped budget is also listed on its key.
pub(super) fn budgets(root: &mut Obj, providers: &[Provider], keys: &mut [Key]) -> Result<Vec<Budget>, ConfigError> {
    let mut budgets: Vec<Budget> = Vec::new();
    if let Some(list) = root.opt_array("budgets")? {
        for (bi, bv) in list.into_iter().enumerate() {
            let budget = budget(bv, &format!("budgets[{bi}]"), &budgets, providers, keys)?;
            if let Scope::Key(k) = budget.scope {
                if let Some(key) = keys.get_mut(k) {
                    key.budgets.push(budgets.len());
                }
            }
            budgets.push(budget);
        }
    }
    Ok(budgets)
}

/// `budgets[i]`.
fn budget(
    bv: Value,
    path: &str,
    budgets: &[Budget],
    providers: &[Provider],
    keys: &[Key],
) -> Result<Budget, ConfigError> {
    let mut b = Obj::new(bv, path)?;
    let id = b.req_id("id")?;
    if budgets.iter().any(|x| x.id == id) {
        return Err(err(&b.field("id"), format!("duplicate budget id {id:?}")));
    }
    let scope = scope(b.take("scope"), &b.field("scope"), providers, keys)?;
    let window = window(&mut b)?;
    let limit = b.opt_positive_decimal("limit", "100.00")?.ok_or_else(|| err(&b.field("limit"), "required"))?;
    let enforcement = enforcement(&mut b)?;
    let alerts = alerts(&mut b)?;
    b.finish()?;
    let record_name = crate::shared_data::budget_record(&id);
    let reservation_ttl_ms = crate::budget::DEFAULT_RESERVATION_TTL_MS;
    Ok(Budget { record_name, id, scope, window, limit, enforcement, reservation_ttl_ms, alerts })
}

/// `budgets[i].alerts`: fractions of the limit (above 0, at most
/// [`crate::budget::MAX_ALERT`]) whose crossing posts an event; sorted and
/// deduplicated, at most [`crate::budget::MAX_ALERTS`].
fn alerts(b: &mut Obj) -> Result<Vec<Decimal>, ConfigError> {
    let field = b.field("alerts");
    let mut out = Vec::new();
    for (i, v) in b.opt_array("alerts")?.unwrap_or_default().iter().enumerate() {
        let t = decimal(v).filter(|d| *d > Decimal::ZERO && *d <= crate::budget::MAX_ALERT).ok_or_else(|| {
            err(
                &format!("{field}[{i}]"),
                format!("expected a fraction of the limit above 0 and at most {}, e.g. 0.8", crate::budget::MAX_ALERT),
            )
        })?;
        let t = t.normalize();
        if let Err(at) = out.binary_search(&t) {
            out.insert(at, t);
        }
    }
    if out.len() > crate::budget::MAX_ALERTS {
        return Err(err(&field, format!("at most {} thresholds", crate::budget::MAX_ALERTS)));
    }
    Ok(out)
}

/// `budgets[i].window`: `day` when absent; `total` is no window.
fn window(b: &mut Obj) -> Result<Option<Window>, ConfigError> {
    match b.opt_str("window")?.as_deref() {
        Some("minute") => Ok(Some(Window::Minute)),
        Some("hour") => Ok(Some(Window::Hour)),
        None | Some("day") => Ok(Some(Window::Day)),
        Some("month") => Ok(Some(Window::Month)),
        Some("total") => Ok(None),
        Some(other) => {
            Err(err(&b.field("window"), format!("expected minute, hour, day, month or total, found {other:?}")))
        }
    }
}

/// `budgets[i].enforcement`: `hard` when absent.
fn enforcement(b: &mut Obj) -> Result<Enforcement, ConfigError> {
    match b.opt_str("enforcement")?.as_deref() {
        None | Some("hard") => Ok(Enforcement::Hard),
        Some("soft") => Ok(Enforcement::Soft),
        Some(other) => Err(err(&b.field("enforcement"), format!("expected \"hard\" or \"soft\", found {other:?}"))),
    }
}

/// `budgets[i].scope`: `"global"` (the default) or one of provider, key,
/// model, client, team.
fn scope(v: Option<Value>, path: &str, providers: &[Provider], keys: &[Key]) -> Result<Scope, ConfigError> {
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
