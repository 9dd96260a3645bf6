//! The one host boundary: proxy-wasm root and HTTP contexts that translate
//! Envoy callbacks into calls on the pure modules and back. Nothing outside
//! `src/host/` calls the host.
//!
//! One module is loaded twice with one `vm_id`: `root_id` containing
//! `ingress` selects the downstream stage, `attempt` the router upstream
//! stage (see README, "How it sits in Envoy").

mod abi;
mod attempt;
mod fleet;
mod ingress;
mod metrics;

use crate::config::{self, Config};
use crate::decision;
use crate::flight::Flights;
use crate::keys::{increment, Chooser, Snapshot};
use crate::registry;
use crate::reply::Reply;
use crate::state::Effective;
use crate::state::KeyRecord;
use crate::store;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

thread_local! {
    /// Requests in flight on this VM, shared by both stages.
    static FLIGHTS: RefCell<Flights> = RefCell::new(Flights::default());
}

pub(crate) fn with_flights<T>(f: impl FnOnce(&mut Flights) -> T) -> Option<T> {
    FLIGHTS.with(|cell| cell.try_borrow_mut().ok().map(|mut fl| f(&mut fl)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Ingress,
    Attempt,
}

/// Per-VM routing state of one stage.
pub(crate) struct Routing {
    /// The configuration as compiled from the plugin JSON.
    pub base: Rc<Config>,
    /// `base` plus the keys registered at runtime: what requests use.
    pub config: Rc<Config>,
    /// The registry change counter `config` was built from.
    pub registry_changes: u64,
    pub snapshot: Snapshot,
    pub chooser: Chooser,
    /// This worker's decision ring: its id and the next slot to write.
    pub ring_worker: Option<u64>,
    pub ring_next: u64,
    /// The attempt stage keeps the key gauges current.
    pub gauges: bool,
    /// Decision records not yet written to this worker's ring, newest last
    /// (at most `ring_size`; written on the tick).
    pub pending_decisions: std::collections::VecDeque<(u64, Vec<u8>)>,
}

impl Routing {
    fn new(base: Rc<Config>) -> Routing {
        Routing {
            config: base.clone(),
            base,
            registry_changes: 0,
            snapshot: Snapshot::default(),
            chooser: Chooser::default(),
            ring_worker: None,
            ring_next: 0,
            gauges: false,
            pending_decisions: std::collections::VecDeque::new(),
        }
    }

    /// Queues a decision record for this worker's ring.
    pub fn queue_decision(&mut self, record: Vec<u8>) {
        let size = self.config.decisions.ring_size;
        if self.ring_worker.is_none() || size == 0 {
            return;
        }
        let seq = self.ring_next;
        self.ring_next += 1;
        if self.pending_decisions.len() >= size {
            self.pending_decisions.pop_front();
        }
        self.pending_decisions.push_back((seq, record));
    }

    /// Writes the queued decision records to this worker's ring in shared
    /// data: one unconditional write each, since only this VM writes it.
    pub fn flush_decisions(&mut self) {
        let (Some(worker), size) = (self.ring_worker, self.config.decisions.ring_size as u64) else { return };
        if size == 0 {
            return;
        }
        for (seq, rec) in self.pending_decisions.drain(..) {
            let _ = crate::store::Store::set(
                &abi::SharedData,
                &decision::slot_name(worker, (seq % size) as usize),
                &rec,
                None,
            );
        }
    }

    /// Brings the snapshot up to date; when it reloaded, also picks up keys
    /// registered or deleted at runtime and refreshes the key gauges.
    /// Returns the configuration requests should use now.
    pub fn refresh(&mut self, now: u64) -> Rc<Config> {
        if self.snapshot.refresh(&abi::SharedData, &self.config, now) {
            let changes = registry::changes(&abi::SharedData);
            if changes != self.registry_changes {
                self.registry_changes = changes;
                match registry::merged(&self.base, &registry::load(&abi::SharedData)) {
                    Ok(c) => {
                        log::info!("runtime keys changed: {} keys now", c.keys.iter().filter(|k| !k.deleted).count());
                        self.config = Rc::new(c);
                        self.snapshot.refresh(&abi::SharedData, &self.config, now);
                    }
                    Err(e) => log::warn!("runtime keys not applied: {e}"),
                }
            }
            if self.gauges {
                let cfg = self.config.clone();
                for (k, key) in cfg.keys.iter().enumerate().filter(|(_, k)| !k.deleted) {
                    let e = self.snapshot.eval(&cfg, k, now);
                    let eff = self.snapshot.records.get(k).map_or(Effective::Available, |r| r.effective(now));
                    let pid = cfg.providers.get(key.provider).map_or("", |p| p.id.as_str());
                    metrics::key_gauges(pid, &key.id, &e, eff);
                }
            }
        }
        self.config.clone()
    }
}

#[derive(Default)]
struct Root {
    stage: Option<Stage>,
    routing: Option<Rc<RefCell<Routing>>>,
    /// Fleet mode (attempt stage): the sync with etcd.
    fleet: Option<fleet::FleetSync>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, n_headers: usize, body_size: usize, _n_trailers: usize) {
        let Some(cfg) = self.routing.as_ref().and_then(|r| r.try_borrow().ok().map(|r| r.config.clone())) else {
            return;
        };
        if let Some(f) = self.fleet.as_mut() {
            f.on_response(&cfg, token, n_headers, body_size);
        }
    }
}

/// How often each root context writes its queued metrics and decisions.
const TICK_MS: u32 = 500;

impl RootContext for Root {
    fn on_tick(&mut self) {
        metrics::flush();
        if let Some(r) = &self.routing {
            if let Ok(mut r) = r.try_borrow_mut() {
                r.flush_decisions();
            }
        }
        if let (Some(f), Some(r)) = (self.fleet.as_mut(), self.routing.as_ref()) {
            if let Ok(cfg) = r.try_borrow().map(|r| r.config.clone()) {
                f.tick(&cfg, abi::now_ms());
            }
        }
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let root_id = abi::property(&["plugin_root_id"])
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let stage = if root_id.contains("attempt") {
            Stage::Attempt
        } else if root_id.contains("ingress") {
            Stage::Ingress
        } else {
            log::error!(
                "invalid apikeyrouter config: root_id: {root_id:?} must contain \"ingress\" (downstream HTTP filter) or \"attempt\" (router upstream filter)"
            );
            return false;
        };
        let bytes = match abi::buffer(abi::PLUGIN_CONFIGURATION, 0, usize::MAX) {
            Ok(Some(b)) => b,
            Ok(None) => Vec::new(),
            Err(e) => {
                log::error!(
                    "invalid apikeyrouter config: (root): host refused the plugin configuration (status {})",
                    e.0
                );
                return false;
            }
        };
        let cfg = match config::compile(&bytes, &|name| std::env::var(name).ok()) {
            Ok(c) => c,
            Err(e) => {
                log::error!("{e}");
                return false;
            }
        };
        // Seed every record so later updates always run with a real cas.
        let zero = KeyRecord::default().encode();
        for k in &cfg.keys {
            if store::seed(&abi::SharedData, &k.record_name, &zero).is_err() {
                log::warn!("key {}: could not seed its state record", k.id);
            }
        }
        log::info!(
            "apikeyrouter {} stage configured: {} providers, {} keys",
            if stage == Stage::Ingress { "ingress" } else { "attempt" },
            cfg.providers.len(),
            cfg.keys.len()
        );
        metrics::define_static(&cfg);
        let mut tick_ms = TICK_MS;
        if let Some(f) = cfg.fleet.as_ref() {
            let Some(instance) = fleet::instance_id(f) else {
                log::error!(
                    "invalid apikeyrouter config: fleet.instance: required when Envoy's node.id is empty (set node.id, --service-node, or fleet.instance)"
                );
                return false;
            };
            if stage == Stage::Attempt {
                let me = {
                    use std::hash::{BuildHasher, Hasher};
                    std::collections::hash_map::RandomState::new().build_hasher().finish()
                };
                let sync = fleet::FleetSync::new(&cfg, f.clone(), instance.clone(), me);
                tick_ms = tick_ms.min(u32::try_from(sync.tick_ms()).unwrap_or(TICK_MS));
                self.fleet = Some(sync);
                log::info!("fleet mode: instance {instance}, etcd through cluster {}", f.cluster);
            }
        }
        let mut routing = Routing::new(Rc::new(cfg));
        if stage == Stage::Attempt && routing.base.decisions.ring_size > 0 {
            // Each attempt-stage VM owns one ring, so recording a decision
            // is a single unconditional write on the request path.
            routing.ring_worker = increment(&abi::SharedData, decision::RING_WORKERS).0.map(|n| n - 1);
        }
        routing.gauges = stage == Stage::Attempt;
        // Keys registered at runtime before this VM started (a reload).
        routing.refresh(abi::now_ms());
        self.stage = Some(stage);
        self.routing = Some(Rc::new(RefCell::new(routing)));
        if abi::set_tick_period(tick_ms).is_err() {
            log::warn!("no tick: metrics and decision records will not be written");
        }
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None would make the SDK panic; without a config (which
        // Envoy never allows to happen) every request gets a clear 503.
        let Some((routing, cfg)) =
            self.routing.as_ref().and_then(|r| r.try_borrow().ok().map(|b| (r.clone(), b.config.clone())))
        else {
            return Some(Box::new(Unconfigured(context_id)));
        };
        Some(match self.stage {
            Some(Stage::Attempt) => Box::new(attempt::Attempt::new(context_id, cfg, routing)),
            _ => Box::new(ingress::Ingress::new(context_id, cfg, routing)),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Unconfigured(u32);

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> proxy_wasm::types::Action {
        send(&crate::reply::error(503, "api_error", "not_configured", "apikeyrouter is not configured."), self.0);
        proxy_wasm::types::Action::Pause
    }
}

/// Sends a local reply; logs instead of trapping if the host refuses.
pub(crate) fn send(reply: &Reply, context_id: u32) {
    let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if let Err(e) = abi::send_local_response(reply.status, &headers, &reply.body) {
        log::warn!("[{context_id}] local reply {} refused by host (status {})", reply.status, e.0);
    }
}
