//! The ingress stage (downstream HTTP filter, once per request): admin API,
//! caller authentication and credential stripping, the request's objective,
//! request-body validation and policy, the provider choice, budget
//! admission, the stream-usage rewrite, and refusing early when no key can
//! serve. What it decides is handed to the attempts once, as an
//! [`Admission`], when it lets the request go.

use super::flight::{self, Admission, Flight, Flights, Holder, FALLOVER_HEADER, FLIGHT_PROPERTY};
use super::host::{Buffer, Host, HostError, Map, Next};
use super::worker_state::WorkerState;
use crate::admin::{self, AdminRequest};
use crate::admission::{self, Caller};
use crate::budget::{self, show, Reservation};
use crate::config::Config;
use crate::forward;
use crate::identity;
use crate::keys::check_within;
use crate::metrics;
use crate::multipart;
use crate::objective::Objective;
use crate::objects;
use crate::providers;
use crate::reply;
use crate::request::{self, Form};
use std::cell::RefCell;
use std::rc::Rc;

/// The header the ingress stage sets to the chosen provider's id; routes
/// match it to send the request to that provider's cluster.
pub const PROVIDER_HEADER: &str = "x-apikeyrouter-provider";

/// The request header that picks an objective for one request.
pub const OBJECTIVE_HEADER: &str = "x-apikeyrouter-objective";
/// Admin request bodies larger than this are refused.
const MAX_ADMIN_BODY: usize = 64 << 10;

/// An admin request waiting for its body.
struct PendingAdmin {
    method: String,
    authorization: Option<String>,
    x_api_key: Option<String>,
}

pub struct Ingress {
    id: u32,
    cfg: Rc<Config>,
    routing: Rc<RefCell<WorkerState>>,
    flights: Rc<RefCell<Flights>>,
    /// The request's flight (its nonce), once opened.
    flight: Option<String>,
    path: String,
    content_type: String,
    /// What this stage decides, handed over once by [`Ingress::admit_flight`].
    admission: Admission,
    read_body: bool,
    admin: Option<PendingAdmin>,
    done: bool,
    /// Filter state for access logs was written.
    logged_state: bool,
    /// The request's objective puts cost first: providers are tried
    /// cheapest first.
    cost_first: bool,
    /// Which pass over the request's `models` entry this is: 0, or the
    /// hop of an internal redirect to the next provider.
    hop: u32,
    /// On a hop: the providers already tried, and the model (with whether
    /// a policy alias named it) as the first pass read it.
    tried_providers: Vec<usize>,
    hop_model: Option<(Option<String>, bool)>,
    /// The request's `:authority`, for the redirect to the next provider.
    authority: String,
    /// The object ids the request's path names.
    path_refs: Vec<String>,
    /// The provider of the objects the request refers to, when the gateway
    /// knows them: only it (and keys of their group) may serve.
    pinned: Option<usize>,
}

impl Ingress {
    pub fn new(id: u32, cfg: Rc<Config>, routing: Rc<RefCell<WorkerState>>, flights: Rc<RefCell<Flights>>) -> Ingress {
        Ingress {
            id,
            cfg,
            routing,
            flights,
            flight: None,
            path: String::new(),
            content_type: String::new(),
            admission: Admission::default(),
            read_body: false,
            admin: None,
            done: false,
            logged_state: false,
            cost_first: false,
            hop: 0,
            tried_providers: Vec::new(),
            hop_model: None,
            authority: String::new(),
            path_refs: Vec::new(),
            pinned: None,
        }
    }

    fn client(&self) -> Option<&identity::Client> {
        self.admission.client.and_then(|c| self.cfg.clients.get(c))
    }

    /// The caller as admission sees it: its client, team and cost cap.
    fn caller(&self) -> Caller<'_> {
        let client = self.client();
        Caller {
            client: client.map(|c| c.id.as_str()),
            team: client.and_then(|c| c.team.as_deref()),
            max_cost_per_request: client.and_then(|c| c.policy.max_cost_per_request),
        }
    }

    /// Hands what this stage decided, with the request's reservation, to
    /// the attempts: once, as it lets the request go. Without a flight the
    /// reservation is released at once.
    fn admit_flight(&mut self, h: &dyn Host, reservation: Reservation, now: u64) {
        let admission = std::mem::take(&mut self.admission);
        let client = admission.client;
        let leftover = match self.flight.as_deref() {
            Some(rid) => match self
                .flights
                .try_borrow_mut()
                .ok()
                .and_then(|mut fl| fl.get_mut(rid).map(|f| f.admit(admission, reservation)))
            {
                Some(Ok(())) => None,
                Some(Err(r)) => Some(r),
                None => None,
            },
            None => Some(reservation),
        };
        self.admission.client = client;
        if let Some(r) = leftover {
            r.release(h.store(), &self.cfg.budgets, now);
        }
    }

    /// Prices the request, applies the per-request cap and reserves its
    /// estimate against every budget that applies; refuses when a hard
    /// budget has no room. Returns the refusal to send, if any.
    fn admit(&mut self, h: &dyn Host, info: &request::RequestInfo, now: u64) -> Option<reply::Reply> {
        let caller = self.caller();
        let plan = match admission::plan(&self.cfg, self.admission.provider, info, &caller) {
            Ok(p) => p,
            Err(r) => return Some(r),
        };
        if plan.unpriced {
            if let Some(m) = info.model.as_deref() {
                warn_unpriced_once(m);
            }
        }
        let mut admitted = budget::Admitted::default();
        if !plan.budgets.is_empty() {
            match budget::reserve(h.store(), &self.cfg.budgets, &plan.budgets, plan.estimate, now) {
                Ok(a) => admitted = a,
                Err(budget::NotReserved::Over(r)) => {
                    let id = self.cfg.budgets.get(r.budget).map_or("?", |b| b.id.as_str());
                    log::info!("[{}] refused by budget {id}", self.id);
                    h.count(&metrics::budget_metric(id, "refused"), 1);
                    return Some(admission::refusal(&self.cfg, &r, now));
                }
                Err(budget::NotReserved::Unavailable { budget }) => {
                    let id = self.cfg.budgets.get(budget).map_or("?", |b| b.id.as_str());
                    let mut r = reply::error(
                        503,
                        "api_error",
                        "budget_unavailable",
                        &format!("Budget '{id}' could not be checked right now; the request was not sent. Retry."),
                    );
                    r.headers.push(("retry-after", "1".to_string()));
                    return Some(r);
                }
            }
            for &i in &admitted.over_soft {
                if let Some(b) = self.cfg.budgets.get(i) {
                    h.count(&metrics::budget_metric(&b.id, "soft_over"), 1);
                }
            }
            for &i in &admitted.log_soft {
                if let Some(b) = self.cfg.budgets.get(i) {
                    log::warn!(
                        "budget {} passed its soft limit of {} in this window; requests are flagged",
                        b.id,
                        show(b.limit)
                    );
                }
            }
        }
        self.admission.price = plan.price;
        self.admission.model_label = self.cfg.prices.label(info.model.as_deref());
        if self.cfg.access_log_state {
            self.admission.model.clone_from(&info.model);
        }
        self.admission.estimate = plan.estimate;
        self.admission.prompt_tokens_est = plan.prompt_tokens;
        self.admission.output_tokens_est = plan.output_tokens;
        self.admission.soft_over = admitted.over_soft;
        self.admit_flight(h, admitted.held, now);
        None
    }

    /// Chooses the provider for this request: the `models` table's providers
    /// for `model` (or those speaking the path's API), in order, skipping any
    /// the client may not use and any whose keys are all unavailable. Applies
    /// the choice: the routing header the route matches, and the provider's
    /// path. Returns the model name to send, when it changes. On a path that
    /// names its model, the path's model is replaced only by the provider's
    /// own name for it, or by `model` when `renamed` (a policy alias).
    fn select_provider(
        &mut self,
        h: &dyn Host,
        model: Option<&str>,
        renamed: bool,
        info: Option<&request::RequestInfo>,
        now: u64,
    ) -> Result<Option<String>, reply::Reply> {
        // One refresh (one shared-data read) for every candidate below.
        if let Ok(mut routing) = self.routing.try_borrow_mut() {
            self.cfg = routing.refresh(h, now);
        }
        let mut cands = providers::candidates(&self.cfg, &self.path, model);
        // A hop goes on along the chain: never back to a provider tried.
        cands.retain(|c| !self.tried_providers.contains(&c.provider));
        if let Some(c) = self.client() {
            let before = cands.first().map(|x| x.provider);
            cands.retain(|x| {
                self.cfg.providers.get(x.provider).is_some_and(|p| identity::check_provider(c, &p.id).is_ok())
            });
            if cands.is_empty() {
                let pid = before.and_then(|p| self.cfg.providers.get(p)).map_or("", |p| p.id.as_str());
                return Err(identity::check_provider(c, pid)
                    .err()
                    .unwrap_or_else(|| reply::gateway_error("no provider")));
            }
        }
        if let Some(p) = self.pinned {
            // The objects live with one provider: only it can serve.
            cands.retain(|c| c.provider == p);
            if cands.is_empty() {
                let pid = self.cfg.providers.get(p).map_or("?", |p| p.id.as_str());
                return Err(reply::error(
                    404,
                    "invalid_request_error",
                    "object_not_found",
                    &format!("The object this request refers to lives with provider '{pid}', which does not serve this request."),
                ));
            }
        }
        if self.cost_first {
            // Cheapest first: a provider ranks by its cheapest priced key.
            let cheapest = |p: usize| {
                self.cfg.providers.get(p).and_then(|p| {
                    p.keys.iter().filter_map(|&k| self.cfg.keys.get(k)?.cost_score_price).min_by(f64::total_cmp)
                })
            };
            cands.sort_by(|a, b| match (cheapest(a.provider), cheapest(b.provider)) {
                (Some(x), Some(y)) => x.total_cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            });
        }
        let mut first_refusal = None;
        let mut chosen = None;
        // A provider whose keys' own budgets have no room is passed over
        // for the next one; when no other can serve, it is kept, and its
        // attempt answers why (each key passed over as budget_exhausted).
        let mut budget_blocked = None;
        for c in &cands {
            if let Some(why) = self.refuse_when_no_key(c.provider, now) {
                first_refusal.get_or_insert(why);
                continue;
            }
            if info.is_some_and(|i| self.key_budgets_refuse(h, c.provider, i, now).is_some()) {
                budget_blocked.get_or_insert_with(|| c.clone());
                continue;
            }
            chosen = Some(c.clone());
            break;
        }
        let chosen = chosen.or(budget_blocked);
        let Some(chosen) = chosen else {
            h.count("apikeyrouter.no_key", 1);
            let (mut retry_after, why) =
                first_refusal.unwrap_or((60, "No provider is configured for this request.".into()));
            // After a fall-over, the soonest any provider in the chain frees up.
            if let Some(at) = self.chain_frees_at() {
                retry_after = retry_after.min(at.saturating_sub(now).div_ceil(1000).max(1));
            }
            return Err(reply::no_key(retry_after, &why));
        };
        self.admission.provider = chosen.provider;
        if let Some(&from) = self.tried_providers.last() {
            let id = |p: usize| self.cfg.providers.get(p).map_or("?", |p| p.id.as_str());
            h.count(&metrics::fallover_metric(id(from), id(chosen.provider)), 1);
            log::info!("[{}] falls over from {} to {}", self.id, id(from), id(chosen.provider));
        }
        if self.cfg.providers.len() > 1 {
            // Headers are still paused: the route is matched again on it.
            let pid = self.cfg.providers.get(chosen.provider).map_or("", |p| p.id.as_str());
            if h.set_header(Map::RequestHeaders, PROVIDER_HEADER, pid).is_err() {
                log::warn!("[{}] could not set {PROVIDER_HEADER}", self.id);
            }
        }
        let sent_model = match providers::path_model(&self.path) {
            Some(_) => chosen.model.as_deref().or(model.filter(|_| renamed)),
            None => chosen.model.as_deref().or(model),
        };
        if let Some(path) = providers::path_for(&self.cfg, chosen.provider, &self.path, sent_model) {
            if h.set_header(Map::RequestHeaders, ":path", &path).is_err() {
                log::warn!("[{}] could not rewrite the path for the provider", self.id);
            }
        }
        Ok(chosen.model)
    }

    /// `Some(())` when every key of `provider` that could serve now has a
    /// hard budget of its own without room for this request (its estimate
    /// at that key's price): the request is passed to the next provider
    /// here, where it still can be; an attempt that finds no key can only
    /// answer 429. Reads the key budgets' records only when the provider's
    /// keys have budgets of their own.
    fn key_budgets_refuse(&self, h: &dyn Host, provider: usize, info: &request::RequestInfo, now: u64) -> Option<()> {
        let cfg = &self.cfg;
        let p = cfg.providers.get(provider)?;
        if p.keys.iter().all(|&k| cfg.keys.get(k).is_none_or(|key| key.budgets.is_empty())) {
            return None;
        }
        let caller = self.caller();
        // A plan this provider refuses is refused, with its reason, later.
        let plan = admission::plan(cfg, provider, info, &caller).ok()?;
        let mut routing = self.routing.try_borrow_mut().ok()?;
        // A disabled key due for its probe may serve this request too.
        let probe = routing.snapshot.due_probe(cfg, provider, &[], now);
        let mut examined = 0;
        for &k in &p.keys {
            let Some(key) = cfg.keys.get(k) else { continue };
            if routing.snapshot.eval(cfg, k, now).excluded.is_some() && probe != Some(k) {
                continue;
            }
            examined += 1;
            let estimate = budget::estimate(plan.prompt_tokens, plan.output_tokens, plan.price.as_ref(), &key.pricing);
            let full = key.budgets.iter().filter_map(|&b| cfg.budgets.get(b)).any(|b| {
                b.enforcement == budget::Enforcement::Hard && budget::load(h.store(), b, now).would_pass(b, estimate)
            });
            if !full {
                return None;
            }
        }
        (examined > 0).then_some(())
    }

    /// The soonest a provider the request fell over from frees up (ms).
    fn chain_frees_at(&self) -> Option<u64> {
        let rid = self.flight.as_deref().filter(|_| self.hop > 0)?;
        self.flights.try_borrow().ok()?.get(rid)?.fallover.soonest_free_ms
    }

    /// Keeps the request as the caller sent it in its flight, for a hop to
    /// the next provider (first pass only).
    /// Only a request whose model has a `models` entry falls over (to
    /// that entry's next provider), and never one that only reads or
    /// removes: an object id of one provider account means nothing to
    /// another provider, and must not reach it.
    fn remember_route(&self, model: Option<&str>, renamed: bool) {
        if self.hop > 0 || self.cfg.routing.max_fallovers == 0 || self.admission.read_only || self.pinned.is_some() {
            return;
        }
        if !model.is_some_and(|m| self.cfg.models.iter().any(|(name, _)| name == m)) {
            return;
        }
        let Some(rid) = self.flight.as_deref() else { return };
        if let Some(f) = self.flights.try_borrow_mut().ok().as_deref_mut().and_then(|fl| fl.get_mut(rid)) {
            f.fallover.path.clone_from(&self.path);
            f.fallover.authority.clone_from(&self.authority);
            f.fallover.model = model.map(str::to_string);
            f.fallover.renamed = renamed;
        }
    }

    /// A request Envoy redirected internally (it has `x-envoy-original-url`):
    /// when the request's filter state names a flight waiting for its next
    /// hop, this stage takes the request over as that hop. Filter state
    /// with the request's life span survives Envoy's internal redirect and
    /// no caller can write it, so a caller cannot pose as a hop. `Ok(false)`:
    /// not a hop.
    fn claim_hop(&mut self, h: &dyn Host) -> Result<bool, reply::Reply> {
        let lost = || reply::gateway_error("The gateway lost track of this request; it was not sent.");
        let nonce = match h.property(&[FLIGHT_PROPERTY]) {
            Ok(Some(n)) => String::from_utf8_lossy(&n).into_owned(),
            Ok(None) => return Ok(false),
            Err(_) => return Err(lost()),
        };
        let mut fl = self.flights.try_borrow_mut().map_err(|_| lost())?;
        let f = fl.get_mut(&nonce).filter(|f| f.fallover.pending).ok_or_else(lost)?;
        f.fallover.pending = false;
        f.fallover.logged_while_pending = false;
        f.fallover.hop += 1;
        self.hop = f.fallover.hop;
        let a = &f.admission;
        self.admission = Admission {
            request_id: a.request_id.clone(),
            client: a.client,
            objective: a.objective.clone(),
            read_only: a.read_only,
            objects: a.objects.clone(),
            ..Admission::default()
        };
        self.tried_providers = f.fallover.tried().collect();
        self.hop_model = Some((f.fallover.model.clone(), f.fallover.renamed));
        self.path.clone_from(&f.fallover.path);
        drop(fl);
        self.flight = Some(nonce);
        Ok(true)
    }

    /// On a hop: releases what the request held at the provider it fell
    /// over from, before it is admitted again at the new one's price.
    fn release_for_reprice(&self, h: &dyn Host, now: u64) {
        let Some(rid) = self.flight.as_deref().filter(|_| self.hop > 0) else { return };
        let held = self.flights.try_borrow_mut().ok().and_then(|mut fl| fl.get_mut(rid)?.take_to_reprice());
        if let Some(r) = held {
            r.release(h.store(), &self.cfg.budgets, now);
        }
    }

    /// Counts the request against its client's rpm/tpm; the refusal if over.
    fn admit_client(&self, h: &dyn Host, now: u64) -> Option<reply::Reply> {
        let c = self.client()?;
        let r = identity::admit_rate(h.store(), c, now).err()?;
        h.count(&format!("apikeyrouter.client.{}.rate_limited", c.id), 1);
        Some(r)
    }

    /// Leaves the request's outcome in filter state for access logs, as one
    /// JSON object: `%FILTER_STATE(wasm.apikeyrouter:PLAIN)%`.
    fn publish_outcome(&mut self, h: &dyn Host) {
        if self.logged_state || !self.cfg.access_log_state {
            return;
        }
        self.logged_state = true;
        let Some(rid) = self.flight.as_deref() else { return };
        let outcome = self.flights.try_borrow().ok().and_then(|fl| fl.get(rid).map(|f| f.outcome_json(&self.cfg)));
        if let Some(json) = outcome {
            let _ = h.set_property("apikeyrouter", json.as_bytes());
        }
    }

    /// What the request does with provider objects, from its method and
    /// path alone (no host call): which ids its path names, whether its
    /// answer creates one, lists them, or deletes one.
    fn plan_objects(&mut self, method: &str) -> Result<(), reply::Reply> {
        if objects::unreadable_path(&self.path) {
            return Err(reply::error(
                400,
                "invalid_request_error",
                "invalid_object_path",
                "The path names an object in an encoded or ambiguous form; send the object id as it is.",
            ));
        }
        self.path_refs = objects::path_refs(&self.path);
        let plan = &mut self.admission.objects;
        plan.creates = objects::creates(method, &self.path);
        // Only `DELETE /v1/<collection>/<id>` deletes the object itself.
        if method == "DELETE" && self.path_refs.len() == 1 {
            let last = self.path.split('?').next().unwrap_or_default().trim_end_matches('/').rsplit('/').next();
            plan.forget = self.path_refs.first().filter(|id| last == Some(id.as_str())).cloned();
        }
        if objects::lists(method, &self.path) && !self.cfg.clients.is_empty() {
            if !self.cfg.objects.filter_lists {
                return Err(reply::error(
                    403,
                    "permission_error",
                    "object_list_refused",
                    "This gateway does not list objects: retrieve each of yours by its id.",
                ));
            }
            plan.filter_list = true;
        }
        Ok(())
    }

    /// Looks up the records of the objects the request refers to (one
    /// shared-data read each) and decides: another client's object (or an
    /// unknown one under `unknown_objects: "deny"`) is not found; known
    /// ones pin the request to their provider and key group.
    fn resolve_objects(&mut self, h: &dyn Host, refs: &[String], now: u64) -> Result<(), reply::Reply> {
        if refs.len() > objects::MAX_REFS {
            return Err(too_many_refs());
        }
        let layout = self.cfg.objects.layout;
        let found: Vec<(String, Option<objects::Record>)> =
            refs.iter().map(|id| (id.clone(), objects::lookup(h.store(), layout, id, now))).collect();
        let misses = found.iter().filter(|(_, r)| r.is_none()).count() as u64;
        if misses > 0 {
            h.count(metrics::OBJECTS_MISSES, misses);
        }
        let caller = self.client().map_or("", |c| c.id.as_str());
        match objects::decide(&found, caller, self.cfg.objects.deny_unknown) {
            objects::Verdict::Free => Ok(()),
            objects::Verdict::Pinned { provider, group } => {
                let Some(p) = self.cfg.provider_by_id(&provider) else {
                    h.count(metrics::OBJECTS_REFUSED, 1);
                    return Err(objects::not_found(refs.first().map_or("", String::as_str)));
                };
                h.count(metrics::OBJECTS_HITS, 1);
                self.pinned = Some(p);
                self.admission.objects.group = Some(group);
                Ok(())
            }
            objects::Verdict::NotFound(id) => {
                h.count(metrics::OBJECTS_REFUSED, 1);
                log::info!("[{}] refused: object {id} is not the caller's", self.id);
                Err(objects::not_found(&id))
            }
            objects::Verdict::Split => Err(reply::error(
                400,
                "invalid_request_error",
                "objects_in_different_groups",
                "The objects this request refers to were made with keys of different projects; no key can reach them all.",
            )),
        }
    }

    /// The keys of `provider` this request may not use: those outside the
    /// group of the objects it refers to.
    fn outside(&self, provider: usize) -> Vec<usize> {
        match self.admission.objects.group.as_deref().filter(|_| self.pinned == Some(provider)) {
            Some(g) => crate::keys::outside_group(&self.cfg, provider, g),
            None => Vec::new(),
        }
    }

    fn reply(&mut self, h: &dyn Host, r: &reply::Reply) -> Next {
        self.done = true;
        h.reply(r, self.id);
        Next::Pause
    }

    /// Logs a refused hostcall and answers 500 rather than forwarding a
    /// request the filter could not prepare.
    fn host_failure(&mut self, h: &dyn Host, what: &str, e: HostError) -> Next {
        log::warn!("[{}] could not {what} (host status {})", self.id, e.0);
        self.reply(h, &reply::gateway_error(&format!("The gateway could not {what}.")))
    }

    /// `Some((retry_after_secs, explanation))` when no key of `provider` is
    /// available now: the request is refused before any upstream attempt.
    /// The snapshot must have been refreshed for this request.
    fn refuse_when_no_key(&self, provider: usize, now: u64) -> Option<(u64, String)> {
        let outside = self.outside(provider);
        let mut routing = self.routing.try_borrow_mut().ok()?;
        let why = check_within(&self.cfg, provider, &outside, &mut routing.snapshot, now).err()?;
        let pid = self.cfg.providers.get(provider).map_or("?", |p| p.id.as_str());
        Some((why.retry_after_secs(now), why.explain(pid)))
    }

    fn run_admin(&mut self, h: &dyn Host, pending: &PendingAdmin, body: &[u8]) -> Next {
        // Answer from the latest key table (keys registered at runtime).
        let now = h.now_ms();
        if let Ok(mut routing) = self.routing.try_borrow_mut() {
            self.cfg = routing.refresh(h, now);
        }
        let req = AdminRequest {
            method: &pending.method,
            path: &self.path,
            authorization: pending.authorization.as_deref(),
            x_api_key: pending.x_api_key.as_deref(),
            body,
        };
        let r = admin::handle(&self.cfg, h.store(), &req, now);
        self.reply(h, &r)
    }

    /// The objective for this request: the header (when allowed), else
    /// route metadata `filter_metadata.apikeyrouter.objective`, else `None`
    /// (the configured default).
    fn objective(&self, h: &dyn Host, header: Option<&str>) -> Result<Option<Objective>, String> {
        let policy = self.client().map(|c| &c.policy);
        if let Some(p) = policy.filter(|p| p.force_objective) {
            return Ok(p.objective.clone());
        }
        if let Some(h) = header.filter(|_| self.cfg.routing.allow_objective_header) {
            return Objective::parse_str(h).map(Some).map_err(|e| format!("Invalid {OBJECTIVE_HEADER} header: {e}"));
        }
        if !self.cfg.routing.route_objectives {
            return Ok(policy.and_then(|p| p.objective.clone()));
        }
        let meta = h.property_string(&["xds", "route_metadata", "filter_metadata", "apikeyrouter", "objective"]);
        match meta {
            None => Ok(policy.and_then(|p| p.objective.clone())),
            Some(m) => match Objective::parse_str(&m) {
                Ok(o) => Ok(Some(o)),
                Err(e) => {
                    log::warn!("[{}] route metadata apikeyrouter.objective ignored: {e}", self.id);
                    Ok(None)
                }
            },
        }
    }
}

impl Ingress {
    pub fn on_request_headers(&mut self, h: &dyn Host, end_of_stream: bool) -> Next {
        let now = h.now_ms();
        let headers = match h.headers(Map::RequestHeaders) {
            Ok(hs) => hs,
            Err(e) => return self.host_failure(h, "read the request headers", e),
        };
        let mut method = "";
        let mut content_type = "";
        let mut request_id: Option<&str> = None;
        let mut objective_header: Option<&str> = None;
        let mut strip: Vec<&str> = Vec::new();
        let mut redirected = false;
        for (k, v) in &headers {
            match k.as_str() {
                ":path" => self.path = v.clone(),
                ":authority" => self.authority = v.clone(),
                ":method" => method = v.as_str(),
                "content-type" => content_type = v.as_str(),
                "x-request-id" => request_id = Some(v.as_str()),
                "x-envoy-original-url" => {
                    redirected = true;
                    strip.push(k);
                }
                "authorization" | "x-api-key" | "api-key" | "x-goog-api-key" => strip.push(k),
                OBJECTIVE_HEADER => {
                    objective_header = Some(v.as_str());
                    strip.push(k);
                }
                _ if k.starts_with("x-apikeyrouter-") => strip.push(k),
                // Only what providers and Envoy need goes on (`forward`).
                _ if !forward::forwarded(&self.cfg.forward_headers, k) => strip.push(k),
                _ => {}
            }
        }
        if redirected {
            match self.claim_hop(h) {
                Ok(true) => {
                    // A multipart form is read again on the hop.
                    self.content_type = content_type.to_string();
                    return self.hop_headers(h, &strip, end_of_stream, now);
                }
                Ok(false) => {}
                Err(r) => return self.reply(h, &r),
            }
        }
        // The health probe takes no token: answered before any
        // authentication, it is never charged to the admin failure budget.
        if admin::is_probe_path(&self.cfg, &self.path) {
            // Runtime keys count too: the latest key table. The keys are
            // judged on the worker's snapshot, as key choice judges them:
            // an unauthenticated caller cannot make each probe read every
            // key's record.
            let r = match self.routing.try_borrow_mut() {
                Ok(mut routing) => {
                    self.cfg = routing.refresh(h, now);
                    let records = &routing.snapshot.records;
                    let record = |i: usize, _: &crate::config::Key| records.get(i).copied().unwrap_or_default();
                    admin::probe_on(&self.cfg, h.store(), method, now, &record)
                }
                Err(_) => admin::probe(&self.cfg, h.store(), method, now),
            };
            return self.reply(h, &r);
        }
        if admin::is_admin_path(&self.cfg, &self.path) {
            let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            let pending = PendingAdmin {
                method: method.to_string(),
                authorization: find("authorization"),
                x_api_key: find("x-api-key"),
            };
            if end_of_stream {
                return self.run_admin(h, &pending, b"");
            }
            self.admin = Some(pending);
            return Next::Pause;
        }
        if !self.cfg.clients.is_empty() {
            let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
            match identity::authenticate(&self.cfg.clients, find("authorization"), find("x-api-key"), now) {
                Ok(c) => self.admission.client = c,
                Err(r) => return self.reply(h, &r),
            }
            // A client calls only its endpoints (by default the inference
            // ones): not the shared account's files, batches or stored answers.
            if let Some(Err(r)) = self.client().map(|c| identity::check_endpoint(c, method, &self.path)) {
                return self.reply(h, &r);
            }
        }
        // The caller's credential, any router header it sent and any header
        // off the allowlist never reach the provider.
        for name in strip {
            if let Err(e) = h.remove_header(Map::RequestHeaders, name) {
                return self.host_failure(h, "strip a client header", e);
            }
        }
        // Nor does a credential in the query string (`?key=` for Gemini).
        if let Some(clean) = request::without_credential_params(&self.path) {
            if let Err(e) = h.set_header(Map::RequestHeaders, ":path", &clean) {
                return self.host_failure(h, "strip a credential from the query", e);
            }
            self.path = clean;
        }
        let objective = match self.objective(h, objective_header) {
            Ok(o) => o,
            Err(msg) => return self.reply(h, &reply::error(400, "invalid_request_error", "invalid_objective", &msg)),
        };
        self.cost_first =
            objective.as_ref().unwrap_or(&self.cfg.routing.objective).primary == crate::objective::Goal::Cost;
        self.admission.objective = objective;
        self.admission.read_only = matches!(method, "GET" | "HEAD" | "DELETE");
        if self.cfg.objects.enabled {
            if let Err(r) = self.plan_objects(method) {
                return self.reply(h, &r);
            }
        }

        match providers::candidates(&self.cfg, &self.path, None).first() {
            Some(c) => self.admission.provider = c.provider,
            None => {
                return self.reply(
                    h,
                    &reply::error(
                        404,
                        "invalid_request_error",
                        "provider_not_configured",
                        &format!("No provider configured on this gateway serves {}.", self.path),
                    ),
                )
            }
        }
        // Every body is read (JSON, a form, or JSON under another content
        // type) before the request goes on.
        self.content_type = content_type.to_string();
        self.read_body = !end_of_stream;
        if !self.read_body {
            // No body to read a model from: choose the provider now.
            let refs = std::mem::take(&mut self.path_refs);
            if let Err(r) = self.resolve_objects(h, &refs, now) {
                return self.reply(h, &r);
            }
            if let Err(r) = self.select_provider(h, None, false, None, now) {
                return self.reply(h, &r);
            }
        }

        // The flight is keyed by a nonce no caller sees or sends, handed to
        // the attempts in filter state; the caller's x-request-id is only a
        // label, never rewritten. Without a flight no request goes on: its
        // attempts could not find its reservation.
        let Ok(mut fl) = self.flights.try_borrow_mut() else {
            return self.reply(h, &reply::gateway_error("The gateway could not track the request."));
        };
        let label = match request_id.filter(|r| !r.is_empty()) {
            Some(r) => flight::label(r),
            None => {
                let made = fl.fresh_request_id();
                if h.set_header(Map::RequestHeaders, "x-request-id", &made).is_err() {
                    log::warn!("[{}] could not set x-request-id", self.id);
                }
                made
            }
        };
        let nonce = fl.open(Flight::new(now), now);
        drop(fl);
        self.admission.request_id = label;
        self.flight = Some(nonce.clone());
        if let Err(e) = h.set_property(FLIGHT_PROPERTY, nonce.as_bytes()) {
            return self.host_failure(h, "hand the request to its attempts", e);
        }

        if !self.read_body {
            if let Some(r) = self.admit_client(h, now) {
                return self.reply(h, &r);
            }
            self.remember_route(None, false);
            self.admit_flight(h, Reservation::default(), now);
            return Next::Continue;
        }
        Next::Pause
    }

    /// The headers of a hop to the next provider: the caller was
    /// authenticated, counted and given its objective on the first pass;
    /// what the attempts added (the last provider's key and its headers)
    /// goes, and the request is adapted to the next provider from the path
    /// the caller sent.
    fn hop_headers(&mut self, h: &dyn Host, strip: &[&str], end_of_stream: bool, now: u64) -> Next {
        for name in strip {
            if let Err(e) = h.remove_header(Map::RequestHeaders, name) {
                return self.host_failure(h, "strip a header", e);
            }
        }
        if let Err(e) = h.set_header(Map::RequestHeaders, ":path", &self.path) {
            return self.host_failure(h, "restore the request's path", e);
        }
        self.cost_first = self.admission.objective.as_ref().unwrap_or(&self.cfg.routing.objective).primary
            == crate::objective::Goal::Cost;
        self.read_body = !end_of_stream;
        if self.read_body {
            return Next::Pause;
        }
        let model = self.hop_model.as_ref().and_then(|(m, _)| m.clone());
        if let Err(r) = self.select_provider(h, model.as_deref(), false, None, now) {
            return self.reply(h, &r);
        }
        self.release_for_reprice(h, now);
        self.admit_flight(h, Reservation::default(), now);
        Next::Continue
    }

    pub fn on_request_body(&mut self, h: &dyn Host, size: usize, end_of_stream: bool) -> Next {
        if self.done {
            return Next::Continue;
        }
        if let Some(pending) = self.admin.take() {
            if size > MAX_ADMIN_BODY {
                return self.reply(
                    h,
                    &reply::error(413, "invalid_request_error", "body_too_large", "Admin request body too large."),
                );
            }
            if !end_of_stream {
                self.admin = Some(pending);
                return Next::Pause;
            }
            let body = h.buffer(Buffer::RequestBody, 0, size).ok().flatten().unwrap_or_default();
            return self.run_admin(h, &pending, &body);
        }
        if !self.read_body {
            return Next::Continue;
        }
        if !end_of_stream {
            return Next::Pause;
        }
        self.body_complete(h, size)
    }

    /// Trailers end the request body: Envoy does not mark the last data
    /// frame end-of-stream when trailers follow, so the body is checked
    /// here exactly as at its end.
    pub fn on_request_trailers(&mut self, h: &dyn Host) -> Next {
        if self.done {
            return Next::Continue;
        }
        if let Some(pending) = self.admin.take() {
            let body = h.buffer(Buffer::RequestBody, 0, MAX_ADMIN_BODY + 1).ok().flatten().unwrap_or_default();
            if body.len() > MAX_ADMIN_BODY {
                return self.reply(
                    h,
                    &reply::error(413, "invalid_request_error", "body_too_large", "Admin request body too large."),
                );
            }
            return self.run_admin(h, &pending, &body);
        }
        if !self.read_body {
            return Next::Continue;
        }
        self.body_complete(h, usize::MAX)
    }

    /// The whole body is buffered (`size` bytes, or all of it with
    /// `usize::MAX`): the model (from the body or the path), policy,
    /// provider choice, the policy's output cap, budget admission, rewrites.
    fn body_complete(&mut self, h: &dyn Host, size: usize) -> Next {
        self.read_body = false;
        let body = match h.buffer(Buffer::RequestBody, 0, size) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => return self.host_failure(h, "read the request body", e),
        };
        let size = body.len();
        let (mut info, form) = match request::read(&self.content_type, &body) {
            Ok(r) => r,
            Err(e) => return self.reply(h, &reply::bad_request(&e.to_string())),
        };
        // A model name goes into paths and headers: a strict set only.
        if let Some(m) = info.model.as_deref().filter(|m| !providers::valid_model(m)) {
            let shown: String = m.chars().take(64).collect();
            let msg = format!(
                "Invalid model name {shown:?}: use ASCII letters, digits and -_.:/@+ (no empty, . or .. segment), at most {} characters.",
                providers::MAX_MODEL_LEN
            );
            return self.reply(h, &reply::error(400, "invalid_request_error", "invalid_model", &msg));
        }
        // A path that names the model names the one the provider serves.
        let path_model = providers::path_model(&self.path);
        if let Some(pm) = &path_model {
            info.model = providers::resolve(&self.cfg, pm);
        }
        if info.model.is_none() {
            let limits_models = self.client().is_some_and(|c| c.policy.allowed_models.is_some());
            if admission::needs_model(&self.cfg, limits_models) {
                let why = match (&path_model, &form) {
                    (Some(_), _) => "its path names a model in a form the gateway does not read",
                    (None, Form::Unreadable(why)) => why.as_str(),
                    (None, _) => "its body names no model",
                };
                return self.reply(h, &admission::model_required(why));
            }
        }
        let now = h.now_ms();
        let mut aliased = false;
        if let Some((model, renamed)) = self.hop_model.take() {
            // A hop: the body names the last provider's model; the request
            // is the one the first pass read and let through.
            info.model = model;
            aliased = renamed;
        } else if let Some(c) = self.client() {
            match identity::check_request(c, &info) {
                Ok(Some(model)) => {
                    info.model = Some(model);
                    aliased = true;
                }
                Ok(None) => {}
                Err(r) => return self.reply(h, &r),
            }
            if let Some(r) = self.admit_client(h, now) {
                return self.reply(h, &r);
            }
        }
        if self.cfg.objects.enabled && self.hop == 0 {
            let mut refs = std::mem::take(&mut self.path_refs);
            let found = match &form {
                Form::Json => objects::body_refs(&body),
                Form::Multipart(_) if info.refs.len() > objects::MAX_REFS => Err(objects::RefError::TooMany),
                Form::Multipart(_) => Ok(std::mem::take(&mut info.refs)),
                // A body read neither way may still name another client's
                // object to a provider that reads it: not for clients.
                Form::Unreadable(_) if self.client().is_some() && objects::in_collection(&self.path) => {
                    Err(objects::RefError::Unreadable)
                }
                Form::Unreadable(_) => Ok(Vec::new()),
            };
            match found {
                Ok(found) => refs.extend(found.into_iter().filter(|id| !refs.contains(id)).collect::<Vec<_>>()),
                Err(objects::RefError::TooMany) => return self.reply(h, &too_many_refs()),
                Err(objects::RefError::Unreadable) => {
                    return self.reply(h, &reply::bad_request("The body cannot be read for the objects it refers to."))
                }
            }
            if let Err(r) = self.resolve_objects(h, &refs, now) {
                return self.reply(h, &r);
            }
            let plan = &mut self.admission.objects;
            plan.creates = plan.creates.filter(|&k| match k {
                objects::Kind::ChatCompletion => objects::stored(&body, false),
                objects::Kind::Response => objects::stored(&body, true),
                _ => true,
            });
        }
        let in_path = path_model.is_some();
        let sent = match self.select_provider(h, info.model.as_deref(), aliased, Some(&info), now) {
            Ok(s) => s,
            Err(r) => return self.reply(h, &r),
        };
        self.remember_route(info.model.as_deref(), aliased);
        // The body carries the name the provider knows the model by (a
        // path that names the model was rewritten instead); `info.model`
        // stays the name policy, prices and budgets know.
        let mut rewritten: Option<Vec<u8>> = None;
        // A hop writes the model back even when this provider knows it by
        // the caller's name: the body carries the last provider's name.
        let body_model =
            if in_path { None } else { sent.or_else(|| info.model.clone().filter(|_| aliased || self.hop > 0)) };
        if let Some(m) = body_model.as_deref() {
            rewritten = match &form {
                Form::Json => request::with_model(&body, m),
                Form::Multipart(Some(field)) => multipart::with_model(&body, field, m),
                _ => None,
            };
        }
        // A policy's output cap bounds a request that sets none: written
        // into the field of the provider's dialect, so the estimate holds.
        // On a hop the body holds the cap in the last provider's field: it
        // is written again in this provider's, never above what was there.
        let policy_cap = self.client().and_then(|c| c.policy.max_tokens);
        let cap = policy_cap.filter(|_| info.max_tokens.is_none() || self.hop > 0);
        if let (Some(cap), Form::Json) = (cap.map(|c| info.max_tokens.map_or(c, |m| m.min(c))), &form) {
            if let Some(field) = providers::cap_field(&self.cfg, self.admission.provider, &self.path) {
                if let Some(b) = request::with_cap(rewritten.as_deref().unwrap_or(&body), field, cap) {
                    rewritten = Some(b);
                    info.max_tokens = Some(cap);
                }
            }
        }
        self.release_for_reprice(h, now);
        if let Some(refusal) = self.admit(h, &info, now) {
            return self.reply(h, &refusal);
        }
        if form == Form::Json && self.cfg.inject_stream_usage && request::path_takes_stream_options(&self.path) {
            let current = rewritten.as_deref().unwrap_or(&body);
            if let Some(with_usage) = request::with_include_usage(current, &info) {
                rewritten = Some(with_usage);
            }
        }
        if let Some(new_body) = rewritten {
            // Headers are still paused here, so content-length may change.
            let ok = h.set_buffer(Buffer::RequestBody, 0, size, &new_body).is_ok()
                && h.set_header(Map::RequestHeaders, "content-length", &new_body.len().to_string()).is_ok();
            if !ok {
                log::warn!("[{}] could not rewrite the request body", self.id);
            }
        }
        Next::Continue
    }

    pub fn on_response_headers(&mut self, h: &dyn Host, end_of_stream: bool) -> Next {
        let Some(rid) = self.flight.as_deref() else {
            return Next::Continue;
        };
        let unfollowed = self.flights.try_borrow_mut().ok().is_some_and(|mut fl| {
            fl.get_mut(rid).is_some_and(|f| f.fallover.hop == self.hop && std::mem::take(&mut f.fallover.pending))
        });
        if unfollowed {
            restore_unfollowed_redirect(h);
        }
        let soft = self
            .flights
            .try_borrow()
            .ok()
            .and_then(|fl| fl.get(rid).map(|f| f.admission.soft_over.clone()))
            .unwrap_or_default();
        if !soft.is_empty() {
            let ids: Vec<&str> = soft.iter().filter_map(|&i| self.cfg.budgets.get(i)).map(|b| b.id.as_str()).collect();
            let _ = h.set_header(Map::ResponseHeaders, "x-apikeyrouter-budget-warning", &ids.join(","));
        }
        if end_of_stream {
            self.publish_outcome(h);
        }
        Next::Continue
    }

    pub fn on_response_body(&mut self, h: &dyn Host, end_of_stream: bool) -> Next {
        if end_of_stream {
            self.publish_outcome(h);
        }
        Next::Continue
    }

    /// The request is over (Envoy's `on_log`): leaves the outcome for the
    /// access log if the response never ended and something was served (the
    /// caller or the provider cut it: a refusal adds no host call), lets go
    /// of the flight and, as its last holder, releases what is still
    /// reserved.
    pub fn on_log(&mut self, h: &dyn Host) {
        let served = |f: &Flight| f.served.live.is_some() || f.served.charged.is_some();
        let rid = self.flight.as_deref();
        if rid.is_some_and(|rid| self.flights.try_borrow().is_ok_and(|fl| fl.get(rid).is_some_and(served))) {
            self.publish_outcome(h);
        }
        let Some(rid) = self.flight.take() else { return };
        let leftover = self.flights.try_borrow_mut().ok().and_then(|mut fl| fl.let_go(&rid, Holder::Ingress(self.hop)));
        if let Some(r) = leftover {
            r.release(h.store(), &self.cfg.budgets, h.now_ms());
        }
    }
}

/// The attempt stage turned a failing answer into an internal redirect to
/// the next provider and Envoy did not follow it (the route has no
/// `internal_redirect_policy`, the body overflowed the buffer, the redirect
/// limit was reached): the caller gets the failing answer as it was.
fn restore_unfollowed_redirect(h: &dyn Host) {
    let Ok(Some(status)) = h.header(Map::ResponseHeaders, FALLOVER_HEADER) else { return };
    log::warn!("an internal redirect to the next provider was not followed: the caller gets the {status}");
    let _ = h.set_header(Map::ResponseHeaders, ":status", &status);
    let _ = h.remove_header(Map::ResponseHeaders, "location");
    let _ = h.remove_header(Map::ResponseHeaders, FALLOVER_HEADER);
}

fn too_many_refs() -> reply::Reply {
    reply::error(
        400,
        "invalid_request_error",
        "too_many_object_references",
        &format!("The request refers to more than {} objects.", objects::MAX_REFS),
    )
}

thread_local! {
    static WARNED_MODELS: std::cell::RefCell<hashbrown::HashSet<String>> = std::cell::RefCell::new(hashbrown::HashSet::new());
}

/// Logs once per model per VM that a model has no price.
fn warn_unpriced_once(model: &str) {
    let first = WARNED_MODELS
        .with(|w| w.try_borrow_mut().map(|mut w| w.len() < 1000 && w.insert(model.to_string())).unwrap_or(false));
    if first {
        log::warn!("model {model:?} has no price in the prices table; its tokens are counted at price zero");
    }
}
