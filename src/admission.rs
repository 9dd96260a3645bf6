//! Admission of a request against prices, the per-request cost cap and
//! budgets: the pure part of what the ingress stage decides once it has read
//! the body.

use crate::budget::{show, worst_estimate, Budget, Price, Refusal, Scope};
use crate::config::{Config, UnknownModel};
use crate::reply::{self, Reply};
use crate::request::RequestInfo;
use crate::window::rfc3339;
use rust_decimal::Decimal;

/// The most output tokens an estimate counts (10^15).
const MAX_OUTPUT_ESTIMATE: u64 = 1_000_000_000_000_000;

/// Who is asking, once caller identity is configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller<'a> {
    pub client: Option<&'a str>,
    pub team: Option<&'a str>,
    /// The client's own per-request cost cap, on top of the gateway's.
    pub max_cost_per_request: Option<Decimal>,
}

/// What admission needs to reserve and later true up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub price: Option<Price>,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// Upper bound of the request's cost over the keys that may serve it.
    pub estimate: Decimal,
    /// Budgets to reserve against now (key budgets wait for the key).
    pub budgets: Vec<usize>,
    /// The model is not in the price table (and is counted at zero).
    pub unpriced: bool,
}

fn model_matches(pattern: &str, model: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    }
}

/// Does `budget` cover a request to `provider` for `model` from `caller`?
pub fn applies(b: &Budget, provider: usize, model: Option<&str>, caller: &Caller<'_>) -> bool {
    match &b.scope {
        Scope::Global => true,
        Scope::Provider(p) => *p == provider,
        Scope::Key(_) => false,
        Scope::Model(m) => model.is_some_and(|model| model_matches(m, model)),
        Scope::Client(c) => caller.client == Some(c.as_str()),
        Scope::Team(t) => caller.team == Some(t.as_str()),
    }
}

/// Prices the request and picks its budgets, or refuses it with a 400.
pub fn plan(cfg: &Config, provider: usize, info: &RequestInfo, caller: &Caller<'_>) -> Result<Plan, Reply> {
    let price = info.model.as_deref().and_then(|m| cfg.prices.lookup(m)).copied();
    let pricings = cfg.providers.get(provider).map(|p| p.pricings.as_slice()).unwrap_or(&[]);
    let all_flat = !pricings.is_empty() && pricings.iter().all(|k| k.cost_per_1k.is_some());
    let unpriced = info.model.is_some() && price.is_none() && !all_flat;
    if unpriced && cfg.unknown_model == UnknownModel::Refuse {
        let model = info.model.as_deref().unwrap_or_default();
        return Err(reply::error(
            400,
            "invalid_request_error",
            "model_not_priced",
            &format!("The model '{model}' has no price configured on this gateway, so its cost cannot be accounted."),
        ));
    }
    let prompt_tokens = (info.body_len as u64).div_ceil(cfg.estimate.prompt_bytes_per_token.max(1));
    // Every choice may use the whole cap; bounded so that no price can
    // overflow a decimal.
    let output_tokens = info
        .max_tokens
        .unwrap_or(cfg.estimate.default_max_tokens)
        .saturating_mul(info.choices.max(1))
        .min(MAX_OUTPUT_ESTIMATE);
    let estimate = worst_estimate(prompt_tokens, output_tokens, price.as_ref(), pricings);
    let cap = match (cfg.max_cost_per_request, caller.max_cost_per_request) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(cap) = cap {
        if estimate > cap {
            return Err(reply::error(
                400,
                "invalid_request_error",
                "cost_cap_exceeded",
                &format!(
                    "This request could cost up to {} ({} prompt and {} output tokens at most), above the gateway's max_cost_per_request of {}. Lower max_tokens or shorten the prompt.",
                    show(estimate),
                    prompt_tokens,
                    output_tokens,
                    show(cap)
                ),
            ));
        }
    }
    let budgets = if estimate > Decimal::ZERO || !cfg.budgets.is_empty() {
        cfg.budgets
            .iter()
            .enumerate()
            .filter(|(_, b)| applies(b, provider, info.model.as_deref(), caller))
            .map(|(i, _)| i)
            .collect()
    } else {
        Vec::new()
    };
    Ok(Plan { price, prompt_tokens, output_tokens, estimate, budgets, unpriced })
}

/// Whether a request whose model the router cannot read must be refused:
/// when a budget is configured, unpriced models are refused, or the caller's
/// policy limits its models.
pub fn needs_model(cfg: &Config, policy_limits_models: bool) -> bool {
    !cfg.budgets.is_empty() || cfg.unknown_model == UnknownModel::Refuse || policy_limits_models
}

/// The 400 for a request whose model cannot be read, saying why.
pub fn model_required(why: &str) -> Reply {
    reply::error(
        400,
        "invalid_request_error",
        "model_required",
        &format!(
            "This gateway needs the model of every request to check its policy and price it, and {why}. Send the model as the JSON field 'model', as a multipart form field 'model', or in an Azure deployment or Gemini model path."
        ),
    )
}

/// The 429 for a hard budget that would be exceeded, naming it.
pub fn refusal(cfg: &Config, r: &Refusal, now_ms: u64) -> Reply {
    let id = cfg.budgets.get(r.budget).map_or("?", |b| b.id.as_str());
    let window = cfg
        .budgets
        .get(r.budget)
        .and_then(|b| b.window)
        .map_or("total".to_string(), |w| format!("{} window", w.as_str()));
    let resets = r.resets_at_ms.map_or(String::new(), |t| format!(", resets at {}", rfc3339(t)));
    let msg = format!(
        "Budget '{id}' would be exceeded: spent {} + reserved {} + this request's estimate {} > limit {} ({window}{resets}).",
        show(r.spent),
        show(r.reserved),
        show(r.estimate),
        show(r.limit)
    );
    reply::budget_exceeded(id, &msg, r.resets_at_ms.map(|t| t.saturating_sub(now_ms).div_ceil(1000).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile;
    use crate::request::inspect;
    use serde_json::Value;

    fn cfg(extra: &str) -> Config {
        let json = format!(
            r#"{{"providers":[{{"id":"p","keys":[{{"id":"k1","secret":"s1"}},{{"id":"k2","secret":"s2","price_multiplier":"2"}}]}}],
               "prices":{{"gpt-4o*":{{"input":"2.50","output":"10"}}}}{extra}}}"#
        );
        match compile(json.as_bytes(), &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    fn info(body: &str) -> RequestInfo {
        inspect(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    fn planned(r: Result<Plan, Reply>) -> Plan {
        r.unwrap_or_else(|r| panic!("refused: {} {}", r.status, String::from_utf8_lossy(&r.body)))
    }

    /// A refusal's (status, error.type, error.code).
    fn refused(r: Result<Plan, Reply>) -> (u32, String, String) {
        let r = match r {
            Ok(p) => panic!("admitted: {p:?}"),
            Err(r) => r,
        };
        let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {:?}", r.body));
        let field = |f: &str| v["error"][f].as_str().unwrap_or_else(|| panic!("no error.{f}: {v}")).to_string();
        (r.status, field("type"), field("code"))
    }

    #[test]
    fn estimate_is_the_worst_key_pricing_of_bytes_and_max_tokens() {
        let c = cfg("");
        let body = r#"{"model":"gpt-4o","max_tokens":1000,"messages":[]}"#;
        let p = planned(plan(&c, 0, &info(body), &Caller::default()));
        assert_eq!(p.prompt_tokens, body.len() as u64);
        assert_eq!(p.output_tokens, 1000);
        // (len * 2.5 + 1000 * 10) / 1e6, doubled by k2's multiplier.
        let want = (Decimal::from(body.len() as u64) * Decimal::new(25, 1) + Decimal::from(10_000))
            / Decimal::from(1_000_000)
            * Decimal::from(2);
        assert_eq!(p.estimate, want);
        assert!(!p.unpriced);
    }

    #[test]
    fn unknown_models_are_counted_at_zero_or_refused() {
        let p = planned(plan(&cfg(""), 0, &info(r#"{"model":"o9"}"#), &Caller::default()));
        assert!(p.unpriced);
        assert_eq!(p.estimate, Decimal::ZERO);
        let r = plan(&cfg(r#","unknown_model":"refuse""#), 0, &info(r#"{"model":"o9"}"#), &Caller::default());
        assert_eq!(refused(r), (400, "invalid_request_error".into(), "model_not_priced".into()));
    }

    #[test]
    fn the_estimate_counts_every_choice_at_the_largest_cap() {
        let c = cfg("");
        let one = plan(&c, 0, &info(r#"{"model":"gpt-4o","max_tokens":100}"#), &Caller::default()).unwrap_or_default();
        let body = r#"{"model":"gpt-4o","max_tokens":100,"n":8}"#;
        let eight = plan(&c, 0, &info(body), &Caller::default()).unwrap_or_default();
        assert_eq!((one.output_tokens, eight.output_tokens), (100, 800));
        let body = r#"{"model":"gpt-4o","max_completion_tokens":10,"max_output_tokens":300}"#;
        assert_eq!(plan(&c, 0, &info(body), &Caller::default()).unwrap_or_default().output_tokens, 300);
        let body = r#"{"model":"gpt-4o","max_tokens":18446744073709551615,"n":18446744073709551615}"#;
        let huge = plan(&c, 0, &info(body), &Caller::default()).unwrap_or_default();
        assert_eq!(huge.output_tokens, MAX_OUTPUT_ESTIMATE, "bounded, not overflowing");
        let no_cap = RequestInfo { model: Some("gpt-4o".into()), choices: 3, ..RequestInfo::default() };
        assert_eq!(plan(&c, 0, &no_cap, &Caller::default()).unwrap_or_default().output_tokens, 3 * 4096);
    }

    #[test]
    fn an_unreadable_model_is_refused_whenever_something_depends_on_it() {
        assert!(!needs_model(&cfg(""), false));
        assert!(needs_model(&cfg(""), true), "the caller's policy limits its models");
        assert!(needs_model(&cfg(r#","unknown_model":"refuse""#), false));
        assert!(needs_model(&cfg(r#","budgets":[{"id":"b","limit":"1"}],"unknown_model":"zero""#), false));
        let r = model_required("its body is neither JSON nor a multipart form");
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        assert_eq!((r.status, v["error"]["code"].as_str()), (400, Some("model_required")));
        assert!(v["error"]["message"].as_str().unwrap_or("").contains("neither JSON nor a multipart form"));
    }

    #[test]
    fn per_request_cap_refuses_an_estimate_above_it() {
        let c = cfg(r#","max_cost_per_request":"0.01""#);
        let ok = plan(&c, 0, &info(r#"{"model":"gpt-4o","max_tokens":10}"#), &Caller::default());
        assert!(ok.is_ok());
        let r = plan(&c, 0, &info(r#"{"model":"gpt-4o","max_tokens":100000}"#), &Caller::default());
        assert_eq!(refused(r), (400, "invalid_request_error".into(), "cost_cap_exceeded".into()));
    }

    #[test]
    fn a_clients_own_cap_applies_too() {
        let c = cfg("");
        let caller = Caller { max_cost_per_request: Some(Decimal::new(1, 3)), ..Caller::default() };
        let body = r#"{"model":"gpt-4o","max_tokens":1000}"#;
        assert!(plan(&c, 0, &info(body), &Caller::default()).is_ok(), "no cap without the client's");
        let r = plan(&c, 0, &info(body), &caller);
        assert_eq!(refused(r), (400, "invalid_request_error".into(), "cost_cap_exceeded".into()));
    }

    #[test]
    fn budgets_apply_by_scope() {
        let c = cfg(r#","budgets":[{"id":"all","limit":"1"},{"id":"prov","limit":"1","scope":{"provider":"p"}},
               {"id":"mini","limit":"1","scope":{"model":"gpt-4o-mini*"}},{"id":"key","limit":"1","scope":{"key":"k1"}},
               {"id":"team","limit":"1","scope":{"team":"blue"}}]"#);
        let p = planned(plan(&c, 0, &info(r#"{"model":"gpt-4o-mini-2024"}"#), &Caller::default()));
        assert_eq!(p.budgets, vec![0, 1, 2]);
        let blue = Caller { client: Some("app"), team: Some("blue"), max_cost_per_request: None };
        let p = planned(plan(&c, 0, &info(r#"{"model":"gpt-4o"}"#), &blue));
        assert_eq!(p.budgets, vec![0, 1, 4]);
        assert_eq!(c.keys[0].budgets, vec![3], "key budgets wait for the key");
    }

    #[test]
    fn refusal_names_the_budget_and_its_reset() {
        let c = cfg(r#","budgets":[{"id":"daily","limit":"10","window":"day"}]"#);
        let r = Refusal {
            budget: 0,
            spent: Decimal::new(980, 2),
            reserved: Decimal::new(15, 2),
            limit: Decimal::from(10),
            estimate: Decimal::new(1, 1),
            resets_at_ms: Some(86_400_000),
        };
        let reply = refusal(&c, &r, 86_000_000);
        assert_eq!(reply.status, 429);
        let v: Value = serde_json::from_slice(&reply.body).unwrap_or_else(|e| panic!("{e}: {:?}", reply.body));
        assert_eq!(
            (v["error"]["type"].as_str(), v["error"]["code"].as_str()),
            (Some("insufficient_quota"), Some("insufficient_quota"))
        );
        let text = String::from_utf8_lossy(&reply.body).to_string();
        assert!(text.contains("Budget 'daily' would be exceeded: spent 9.8 + reserved 0.15"), "{text}");
        assert!(text.contains("resets at 1970-01-02T00:00:00Z"), "{text}");
        assert!(reply.headers.contains(&("retry-after", "400".to_string())));
        assert!(reply.headers.contains(&("x-apikeyrouter-budget", "daily".to_string())));
    }
}
