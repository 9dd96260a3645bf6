//! The one host boundary: proxy-wasm root and HTTP contexts that translate
//! Envoy callbacks into calls on the pure modules and back. Nothing outside
//! `src/host/` calls the host.
//!
//! One module is loaded twice with one `vm_id`: `root_id` containing
//! `ingress` selects the downstream stage, `attempt` the router upstream
//! stage (see README, "How it sits in Envoy").

mod abi;
mod attempt;
mod ingress;

use crate::config::{self, Config};
use crate::decision;
use crate::flight::Flights;
use crate::keys::{increment, Chooser, Snapshot};
use crate::reply::Reply;
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
#[derive(Default)]
pub(crate) struct Routing {
    pub snapshot: Snapshot,
    pub chooser: Chooser,
    /// This worker's decision ring: its id and the next slot to write.
    pub ring_worker: Option<u64>,
    pub ring_next: u64,
}

#[derive(Default)]
struct Root {
    stage: Option<Stage>,
    config: Option<Rc<Config>>,
    routing: Rc<RefCell<Routing>>,
}

impl Context for Root {}

impl RootContext for Root {
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
        let mut routing = Routing::default();
        if stage == Stage::Attempt && cfg.decisions.ring_size > 0 {
            // Each attempt-stage VM owns one ring, so recording a decision
            // is a single unconditional write on the request path.
            routing.ring_worker = increment(&abi::SharedData, decision::RING_WORKERS).0.map(|n| n - 1);
        }
        self.stage = Some(stage);
        self.config = Some(Rc::new(cfg));
        self.routing = Rc::new(RefCell::new(routing));
        true
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None would make the SDK panic; without a config (which
        // Envoy never allows to happen) every request gets a clear 503.
        let Some(cfg) = self.config.clone() else {
            return Some(Box::new(Unconfigured(context_id)));
        };
        Some(match self.stage {
            Some(Stage::Attempt) => Box::new(attempt::Attempt::new(context_id, cfg, self.routing.clone())),
            _ => Box::new(ingress::Ingress::new(context_id, cfg, self.routing.clone())),
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
