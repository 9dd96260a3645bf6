//! One request's whole path, as plain Rust behind the [`host::Host`] trait.
//!
//! One module is loaded twice with one `vm_id`: `root_id` containing
//! `ingress` selects the downstream stage ([`ingress`]), `attempt` the
//! router upstream stage ([`attempt`], once per upstream attempt). The two
//! hand a request over through [`flight`]; each keeps its per-VM state in
//! [`worker_state`]. [`Root`] is what a root context does: compile the
//! configuration, seed state, and on every tick write decisions and run the
//! fleet sync ([`fleet_sync`]). `src/host/` only maps Envoy's callbacks to
//! these calls.

pub mod attempt;
pub mod fleet_sync;
pub mod flight;
pub mod host;
pub mod ingress;
pub mod worker_state;

#[cfg(test)]
mod admission_tests;
#[cfg(test)]
mod alert_tests;
#[cfg(test)]
mod charging_tests;
#[cfg(test)]
pub mod fake;
#[cfg(test)]
mod fallover_tests;
#[cfg(test)]
mod hop_tests;
#[cfg(test)]
mod host_call_tests;
#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod object_tests;
#[cfg(test)]
mod tenant_tests;
#[cfg(test)]
mod verdict_tests;

use crate::config;
use crate::key_record::KeyRecord;
use crate::shared_data::increment;
use crate::store;
use flight::Flights;
use host::{Buffer, Host};
use std::cell::RefCell;
use std::rc::Rc;
use worker_state::WorkerState;

/// Which placement a root context serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Ingress,
    Attempt,
}

impl Stage {
    /// The stage a plugin `root_id` names.
    pub fn of_root_id(root_id: &str) -> Option<Stage> {
        if root_id.contains("attempt") {
            Some(Stage::Attempt)
        } else if root_id.contains("ingress") {
            Some(Stage::Ingress)
        } else {
            None
        }
    }
}

/// How often each root context writes its queued metrics and decisions.
pub const TICK_MS: u32 = 500;

/// Writes every record requests update, when absent, so that every later
/// update is a compare-and-swap: the host inserts an absent name whatever
/// the cas, so two first writes could overwrite each other. The main
/// thread's root context configures before any worker serves, so its seeds
/// come first.
fn seed_records(h: &dyn Host, cfg: &config::Config) {
    let store = h.store();
    let zero = KeyRecord::default().encode();
    let mut seeds: Vec<(&str, &str, Vec<u8>)> = Vec::new();
    for (_, k) in cfg.keys.live() {
        seeds.push(("key", &k.record_name, zero.clone()));
    }
    let budget = crate::budget::BudgetRecord::default().encode();
    for b in &cfg.budgets {
        seeds.push(("budget", &b.record_name, budget.clone()));
    }
    let client = crate::identity::ClientUsage::default().encode();
    for c in &cfg.clients {
        seeds.push(("client", &c.record_name, client.clone()));
    }
    seeds.push(("registry", crate::shared_data::RUNTIME_KEYS, crate::runtime_keys::Registry::default().encode()));
    let counter = 0u64.to_le_bytes().to_vec();
    for name in [
        crate::shared_data::GENERATION,
        crate::shared_data::DECISION_WORKERS,
        crate::shared_data::TRANSITIONS_HEAD,
        crate::shared_data::RUNTIME_KEYS_CHANGES,
        crate::shared_data::FLEET_EPOCH,
    ] {
        seeds.push(("counter", name, counter.clone()));
    }
    let buckets: Vec<String> = if cfg.objects.enabled {
        (0..cfg.objects.layout.buckets).map(crate::objects::bucket_name).collect()
    } else {
        Vec::new()
    };
    let empty = crate::objects::encode(&[]);
    for name in &buckets {
        seeds.push(("objects", name, empty.clone()));
    }
    if cfg.objects.enabled && cfg.fleet.is_some() {
        seeds.push(("objects", crate::objects::OUTBOX, empty.clone()));
    }
    seeds.push(("fleet", crate::shared_data::FLEET_REPORTED, vec![1]));
    // Each budget's limit override with its time: none yet (a byte that
    // holds no override).
    let limits: Vec<String> = cfg.budgets.iter().map(|b| crate::durable::local_name(&b.id)).collect();
    seeds.extend(limits.iter().map(|name| ("limit", name.as_str(), vec![0])));
    for (kind, name, value) in seeds {
        if store::seed(store, name, &value).is_err() {
            log::warn!("{kind} record {name}: could not seed it");
        }
    }
}

/// A configured root context: its stage, its routing state, and (attempt
/// stage in fleet mode) the sync with etcd.
pub struct Root {
    pub stage: Stage,
    pub routing: Rc<RefCell<WorkerState>>,
    pub fleet: Option<fleet_sync::FleetSync>,
    /// The requests in flight on this VM, shared with the other stage.
    pub flights: Rc<RefCell<Flights>>,
}

impl Root {
    /// `on_configure`: compiles the plugin configuration, seeds the key
    /// records, defines the static metrics, and starts fleet mode and the
    /// decision ring. `Err` is the one log line that says why Envoy must not
    /// start. `me` is a random id of this root context (the fleet lease).
    pub fn configure(
        h: &dyn Host,
        root_id: &str,
        env: &dyn Fn(&str) -> Option<String>,
        flights: Rc<RefCell<Flights>>,
        me: u64,
    ) -> Result<Root, String> {
        let Some(stage) = Stage::of_root_id(root_id) else {
            return Err(format!(
                "invalid apikeyrouter config: root_id: {root_id:?} must contain \"ingress\" (downstream HTTP filter) or \"attempt\" (router upstream filter)"
            ));
        };
        let bytes = match h.buffer(Buffer::PluginConfiguration, 0, usize::MAX) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => {
                return Err(format!(
                    "invalid apikeyrouter config: (root): host refused the plugin configuration (status {})",
                    e.0
                ))
            }
        };
        let cfg = config::compile(&bytes, env).map_err(|e| e.to_string())?;
        seed_records(h, &cfg);
        log::info!(
            "apikeyrouter {} stage configured: {} providers, {} keys",
            if stage == Stage::Ingress { "ingress" } else { "attempt" },
            cfg.providers.len(),
            cfg.keys.count()
        );
        for (kind, name) in crate::metrics::static_names(&cfg) {
            h.define_metric(kind, &name);
        }
        let mut tick_ms = TICK_MS;
        let mut fleet = None;
        if let Some(f) = cfg.fleet.as_ref() {
            let Some(instance) = fleet_sync::instance_id(h, f) else {
                return Err("invalid apikeyrouter config: fleet.instance: required when Envoy's node.id is empty (set node.id, --service-node, or fleet.instance)".into());
            };
            if stage == Stage::Attempt {
                let sync = fleet_sync::FleetSync::new(h, &cfg, f.clone(), instance.clone(), me);
                tick_ms = tick_ms.min(u32::try_from(sync.tick_ms()).unwrap_or(TICK_MS));
                fleet = Some(sync);
                log::info!("fleet mode: instance {instance}, etcd through cluster {}", f.cluster);
            }
        }
        if stage == Stage::Ingress && cfg.routing.max_fallovers > 0 {
            // The flight's nonce must outlive an internal redirect, so that
            // the next hop finds the request (see `Flights::hops`).
            match h.declare_request_property(flight::FLIGHT_PROPERTY) {
                Ok(()) => {
                    if let Ok(mut fl) = flights.try_borrow_mut() {
                        fl.hops = true;
                    }
                }
                Err(e) => log::warn!(
                    "fall-over to the next provider is off: Envoy refused to declare the request property (status {})",
                    e.0
                ),
            }
        }
        let mut routing = WorkerState::new(Rc::new(cfg));
        if stage == Stage::Attempt && routing.base.decisions.ring_size > 0 {
            // Each attempt-stage VM owns one ring, so recording a decision
            // is a single unconditional write on the request path.
            routing.ring_worker = increment(h.store(), crate::shared_data::DECISION_WORKERS).0.map(|n| n - 1);
        }
        routing.gauges = stage == Stage::Attempt;
        if routing.base.alerts.is_some() {
            // Alert events name the instance they come from.
            let fleet = routing.base.fleet.as_ref().and_then(|f| fleet_sync::instance_id(h, f));
            let node = || h.property_string(&["xds", "node", "id"]).filter(|n| !n.is_empty());
            routing.alerts = crate::alerts::Outbox::new(fleet.or_else(node).unwrap_or_default());
        }
        // Keys registered at runtime before this VM started (a reload).
        routing.refresh(h, h.now_ms());
        if h.set_tick_period(tick_ms).is_err() {
            log::warn!("no tick: metrics and decision records will not be written");
        }
        Ok(Root { stage, routing: Rc::new(RefCell::new(routing)), fleet, flights })
    }

    /// A new HTTP context of this root's stage (`None` only while the
    /// routing state is borrowed, which a single-threaded VM never sees).
    pub fn request(&self, context_id: u32) -> Option<Request> {
        let cfg = self.routing.try_borrow().ok()?.config.clone();
        let (routing, flights) = (self.routing.clone(), self.flights.clone());
        Some(match self.stage {
            Stage::Attempt => Request::Attempt(attempt::Attempt::new(context_id, cfg, routing, flights)),
            Stage::Ingress => Request::Ingress(ingress::Ingress::new(context_id, cfg, routing, flights)),
        })
    }

    /// Every tick: writes the queued decision records and the counts noted
    /// without a host (the admin API's), drops budget reservations past
    /// their deadline (attempt stage), and runs the fleet sync when it is due.
    pub fn tick(&mut self, h: &dyn Host) {
        for (name, delta) in crate::metrics::take_noted() {
            h.count(name, delta);
        }
        let cfg = match self.routing.try_borrow_mut() {
            Ok(mut r) => {
                r.flush_decisions(h);
                let base = r.base.clone();
                if let Some(a) = base.alerts.as_ref() {
                    r.alerts.pump(h, a, base.fleet.as_ref(), h.now_ms());
                }
                // The sync merges the states of runtime keys too, and adds
                // those it reads from etcd: it needs the key table of now.
                if self.fleet.is_some() {
                    r.refresh(h, h.now_ms())
                } else {
                    r.config.clone()
                }
            }
            Err(_) => return,
        };
        if self.stage == Stage::Ingress {
            // Reservations are the ingress stage's (its config's budgets).
            let abandoned = self.flights.try_borrow_mut().map(|mut fl| fl.abandoned()).unwrap_or_default();
            for r in abandoned {
                r.release(h.store(), &cfg.budgets, h.now_ms());
            }
        }
        if self.stage == Stage::Attempt {
            let now = h.now_ms();
            for b in &cfg.budgets {
                let rec = crate::budget::expire(h.store(), b, now);
                h.gauge(&crate::metrics::budget_metric(&b.id, "reservations_expired"), rec.expired);
                for (name, value) in crate::metrics::budget_forecast_gauges(&b.id, &rec.forecast(b, now), now) {
                    h.gauge(&name, value);
                }
            }
        }
        if let Some(f) = self.fleet.as_mut() {
            f.tick(h, &cfg, h.now_ms());
        }
    }

    /// The answer to a `dispatch_http_call`: an alert's, or fleet mode's
    /// call to etcd.
    pub fn on_call_response(&mut self, h: &dyn Host, token: u32, n_headers: usize, body_size: usize) {
        let Ok(mut routing) = self.routing.try_borrow_mut() else { return };
        let cfg = routing.config.clone();
        if let Some(a) = cfg.alerts.as_ref() {
            if routing.alerts.on_response(h, a, cfg.fleet.as_ref(), token, (n_headers, body_size)) {
                return;
            }
        }
        drop(routing);
        if let Some(f) = self.fleet.as_mut() {
            f.on_response(h, &cfg, token, n_headers, body_size);
        }
    }
}

/// One HTTP context: a request in the ingress stage or one attempt.
pub enum Request {
    Ingress(ingress::Ingress),
    Attempt(attempt::Attempt),
}

#[cfg(test)]
mod tests {
    use super::fake::{FakeHost, World};
    use crate::metrics::{note, ADMIN_AUTH_FAILURES};

    #[test]
    fn the_tick_writes_the_counts_noted_without_a_host() {
        let world = World::new(1_000);
        let config = r#"{"providers":[{"id":"p","keys":[{"id":"k","secret":"s"}]}]}"#;
        let mut root = world.root("apikeyrouter_ingress", config).unwrap_or_else(|e| panic!("{e}"));
        note(ADMIN_AUTH_FAILURES, 2);
        root.tick(&FakeHost::new(&world));
        assert_eq!(world.counter(ADMIN_AUTH_FAILURES), 2);
        root.tick(&FakeHost::new(&world));
        assert_eq!(world.counter(ADMIN_AUTH_FAILURES), 2, "written once");
    }
}
