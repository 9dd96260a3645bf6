//! The one host boundary: proxy-wasm root and HTTP contexts that map Envoy's
//! callbacks to the stages in [`crate::stages`], and [`Envoy`], the
//! [`Host`] those stages call. Nothing outside `src/host/` calls the host,
//! and nothing here decides routing, budgets or key state.

mod abi;
mod metrics;

use crate::metrics::Kind;
use crate::stages::flight::Flights;
use crate::stages::host::{Buffer, Host, HostError, Map, Next};
use crate::stages::{Request, Root};
use crate::store::Store;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(RootCtx::default()) });
}}

thread_local! {
    /// Requests in flight on this VM, shared by both stages.
    static FLIGHTS: Rc<RefCell<Flights>> = Rc::new(RefCell::new(Flights::default()));
}

/// Envoy, through the non-panicking hostcalls of [`abi`], as one callback
/// sees it: made afresh for each callback, it reads the clock at most once
/// (a callback is one instant to the stages).
#[derive(Default)]
struct Envoy {
    now_ns: std::cell::Cell<u64>,
}

fn map(m: Map) -> u32 {
    match m {
        Map::RequestHeaders => abi::REQUEST_HEADERS,
        Map::ResponseHeaders => abi::RESPONSE_HEADERS,
        Map::CallResponseHeaders => abi::HTTP_CALL_RESPONSE_HEADERS,
    }
}

fn buffer(b: Buffer) -> u32 {
    match b {
        Buffer::RequestBody => abi::REQUEST_BODY,
        Buffer::ResponseBody => abi::RESPONSE_BODY,
        Buffer::CallResponseBody => abi::HTTP_CALL_RESPONSE_BODY,
        Buffer::PluginConfiguration => abi::PLUGIN_CONFIGURATION,
    }
}

impl Host for Envoy {
    fn now_ns(&self) -> u64 {
        if self.now_ns.get() == 0 {
            self.now_ns.set(abi::now_ns());
        }
        self.now_ns.get()
    }
    fn headers(&self, m: Map) -> Result<Vec<(String, String)>, HostError> {
        abi::headers(map(m))
    }
    fn header(&self, m: Map, name: &str) -> Result<Option<String>, HostError> {
        abi::header(map(m), name)
    }
    fn set_header(&self, m: Map, name: &str, value: &str) -> Result<(), HostError> {
        abi::set_header(map(m), name, value)
    }
    fn remove_header(&self, m: Map, name: &str) -> Result<(), HostError> {
        abi::remove_header(map(m), name)
    }
    fn buffer(&self, b: Buffer, start: usize, max: usize) -> Result<Option<Vec<u8>>, HostError> {
        abi::buffer(buffer(b), start, max)
    }
    fn set_buffer(&self, b: Buffer, start: usize, size: usize, value: &[u8]) -> Result<(), HostError> {
        abi::set_buffer(buffer(b), start, size, value)
    }
    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<(), HostError> {
        abi::send_local_response(status, headers, body)
    }
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        abi::property(path)
    }
    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        abi::set_property(name, value)
    }
    fn declare_request_property(&self, name: &str) -> Result<(), HostError> {
        abi::call_foreign("declare_property", &crate::stages::host::declare_property_args(name))
    }
    fn store(&self) -> &dyn Store {
        &abi::SharedData
    }
    fn define_metric(&self, kind: Kind, name: &str) {
        metrics::define(kind, name)
    }
    fn count(&self, name: &str, delta: u64) {
        metrics::add(name, delta)
    }
    fn gauge(&self, name: &str, value: u64) {
        metrics::gauge(name, value)
    }
    fn histogram(&self, name: &str, value: u64) {
        metrics::histogram(name, value)
    }
    fn histogram_since(&self, name: &str, since_ns: u64) {
        // Sampled before the clock is read: seven in eight cost nothing.
        if metrics::histogram_due() {
            metrics::record_histogram(name, abi::now_ns().saturating_sub(since_ns) / 1000);
        }
    }
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError> {
        abi::http_call(cluster, headers, body, timeout_ms)
    }
    fn set_tick_period(&self, ms: u32) -> Result<(), HostError> {
        abi::set_tick_period(ms)
    }
}

fn action(n: Next) -> Action {
    match n {
        Next::Continue => Action::Continue,
        Next::Pause => Action::Pause,
    }
}

#[derive(Default)]
struct RootCtx {
    root: Option<Root>,
}

impl Context for RootCtx {
    fn on_http_call_response(&mut self, token: u32, n_headers: usize, body_size: usize, _n_trailers: usize) {
        if let Some(r) = self.root.as_mut() {
            r.on_call_response(&Envoy::default(), token, n_headers, body_size);
        }
    }
}

impl RootContext for RootCtx {
    fn on_tick(&mut self) {
        metrics::flush();
        if let Some(r) = self.root.as_mut() {
            r.tick(&Envoy::default());
        }
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let root_id = Envoy::default().property_string(&["plugin_root_id"]).unwrap_or_default();
        let me = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new().build_hasher().finish()
        };
        let flights = FLIGHTS.with(|f| f.clone());
        match Root::configure(&Envoy::default(), &root_id, &|name| std::env::var(name).ok(), flights, me) {
            Ok(root) => {
                self.root = Some(root);
                true
            }
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Returning None would make the SDK panic; without a config (which
        // Envoy never allows to happen) every request gets a clear 503.
        Some(match self.root.as_ref().and_then(|r| r.request(context_id)) {
            Some(req) => Box::new(Http(req)),
            None => Box::new(Unconfigured(context_id)),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// An HTTP context: one request in the ingress stage, or one attempt.
struct Http(Request);

impl Context for Http {
    fn on_done(&mut self) -> bool {
        if let Request::Attempt(a) = &mut self.0 {
            a.on_done(&Envoy::default());
        }
        true
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        action(match &mut self.0 {
            Request::Ingress(i) => i.on_request_headers(&Envoy::default(), end_of_stream),
            Request::Attempt(a) => a.on_request_headers(&Envoy::default()),
        })
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        action(match &mut self.0 {
            Request::Ingress(i) => i.on_request_body(&Envoy::default(), size, end_of_stream),
            Request::Attempt(_) => Next::Continue,
        })
    }

    fn on_http_request_trailers(&mut self, _n: usize) -> Action {
        action(match &mut self.0 {
            Request::Ingress(i) => i.on_request_trailers(&Envoy::default()),
            Request::Attempt(_) => Next::Continue,
        })
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        action(match &mut self.0 {
            Request::Ingress(i) => i.on_response_headers(&Envoy::default(), end_of_stream),
            Request::Attempt(a) => a.on_response_headers(&Envoy::default(), end_of_stream),
        })
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        action(match &mut self.0 {
            Request::Ingress(i) => i.on_response_body(&Envoy::default(), end_of_stream),
            Request::Attempt(a) => a.on_response_body(&Envoy::default(), size, end_of_stream),
        })
    }

    fn on_log(&mut self) {
        if let Request::Ingress(i) = &mut self.0 {
            i.on_log(&Envoy::default());
        }
    }
}

struct Unconfigured(u32);

impl Context for Unconfigured {}

impl HttpContext for Unconfigured {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        Envoy::default()
            .reply(&crate::reply::error(503, "api_error", "not_configured", "apikeyrouter is not configured."), self.0);
        Action::Pause
    }
}
