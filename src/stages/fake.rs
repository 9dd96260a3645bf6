//! A [`Host`] in memory, for the native lifecycle tests: header maps and
//! bodies a test sets and reads, local replies, properties, a shared store
//! with Envoy's cas semantics, metrics, a clock the test moves, injected
//! host failures, and a count of every host call.
//!
//! One [`FakeHost`] is one HTTP context (the ingress stage of a request, or
//! one attempt); [`World`] is what they share: the store, the clock, the
//! metrics and the requests in flight of one VM.

use super::flight::Flights;
use super::host::{Buffer, Host, HostError, Map, Next};
use super::{Request, Root};
use crate::metrics::Kind;
use crate::store::{FakeStore, Store};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;

/// What every context of one fake VM shares.
#[derive(Default)]
pub struct World {
    pub store: FakeStore,
    pub now_ms: Cell<u64>,
    pub counters: RefCell<BTreeMap<String, u64>>,
    pub gauges: RefCell<BTreeMap<String, u64>>,
    pub defined: RefCell<Vec<(Kind, String)>>,
    pub flights: Rc<RefCell<Flights>>,
    /// Route metadata and other properties, by path joined with `.`.
    pub properties: RefCell<BTreeMap<String, Vec<u8>>>,
    /// `dispatch_http_call`s made.
    pub calls: RefCell<Vec<Call>>,
}

impl World {
    pub fn new(now_ms: u64) -> Rc<World> {
        let w = World::default();
        w.now_ms.set(now_ms);
        Rc::new(w)
    }

    pub fn advance(&self, ms: u64) {
        self.now_ms.set(self.now_ms.get() + ms);
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.counters.borrow().get(name).copied().unwrap_or(0)
    }

    /// A configured root context of `root_id`'s stage over `config` JSON.
    pub fn root(self: &Rc<World>, root_id: &str, config: &str) -> Result<Root, String> {
        let h = FakeHost::new(self);
        *h.plugin_config.borrow_mut() = config.as_bytes().to_vec();
        Root::configure(&h, root_id, &|_| None, self.flights.clone(), 7)
    }
}

/// A `dispatch_http_call`: cluster, headers, body.
pub type Call = (String, Vec<(String, String)>, Vec<u8>);

/// A local reply sent through the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Sent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// One HTTP context's view of the host.
pub struct FakeHost {
    pub world: Rc<World>,
    pub request_headers: RefCell<Vec<(String, String)>>,
    pub response_headers: RefCell<Vec<(String, String)>>,
    pub request_body: RefCell<Vec<u8>>,
    pub response_body: RefCell<Vec<u8>>,
    pub plugin_config: RefCell<Vec<u8>>,
    pub sent: RefCell<Option<Sent>>,
    /// Filter state set through `set_property`: the downstream request's,
    /// which Envoy shows its router upstream filters too (an attempt's
    /// context shares its request's).
    pub filter_state: Rc<RefCell<BTreeMap<String, Vec<u8>>>>,
    /// Host calls made, by name, in order.
    pub log: Rc<RefCell<Vec<&'static str>>>,
    /// Host calls that fail (by name, as in `log`).
    pub failing: Rc<RefCell<HashSet<&'static str>>>,
    /// The instant of the current callback, once read.
    clock: std::cell::Cell<Option<u64>>,
    shared: SharedData,
}

/// The world's store as one context reaches it: each read and write is a
/// host call, logged (and failed on demand) like the others.
struct SharedData {
    world: Rc<World>,
    log: Rc<RefCell<Vec<&'static str>>>,
    failing: Rc<RefCell<HashSet<&'static str>>>,
}

impl Store for SharedData {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), crate::store::ReadError> {
        self.log.borrow_mut().push("get_shared_data");
        if self.failing.borrow().contains("get_shared_data") {
            return Err(crate::store::ReadError);
        }
        self.world.store.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), crate::store::SetError> {
        self.log.borrow_mut().push("set_shared_data");
        if self.failing.borrow().contains("set_shared_data") {
            return Err(crate::store::SetError::Host);
        }
        self.world.store.set(key, value, cas)
    }
}

impl FakeHost {
    pub fn new(world: &Rc<World>) -> FakeHost {
        let log: Rc<RefCell<Vec<&'static str>>> = Rc::default();
        let failing: Rc<RefCell<HashSet<&'static str>>> = Rc::default();
        FakeHost {
            shared: SharedData { world: world.clone(), log: log.clone(), failing: failing.clone() },
            world: world.clone(),
            request_headers: RefCell::default(),
            response_headers: RefCell::default(),
            request_body: RefCell::default(),
            response_body: RefCell::default(),
            plugin_config: RefCell::default(),
            sent: RefCell::default(),
            filter_state: Rc::default(),
            log,
            failing,
            clock: std::cell::Cell::new(None),
        }
    }

    /// A new callback begins: as Envoy's host, the clock is read afresh
    /// (at most once) in it.
    pub fn callback(&self) -> &FakeHost {
        self.clock.set(None);
        self
    }

    /// Host calls made so far (counters excluded: they are written on the
    /// tick, not per request).
    pub fn calls(&self) -> usize {
        self.log.borrow().len()
    }

    fn call(&self, name: &'static str) -> Result<(), HostError> {
        self.log.borrow_mut().push(name);
        if self.failing.borrow().contains(name) {
            Err(HostError(2))
        } else {
            Ok(())
        }
    }

    fn map(&self, m: Map) -> &RefCell<Vec<(String, String)>> {
        match m {
            Map::RequestHeaders => &self.request_headers,
            Map::ResponseHeaders | Map::CallResponseHeaders => &self.response_headers,
        }
    }

    fn buf(&self, b: Buffer) -> &RefCell<Vec<u8>> {
        match b {
            Buffer::RequestBody => &self.request_body,
            Buffer::ResponseBody | Buffer::CallResponseBody => &self.response_body,
            Buffer::PluginConfiguration => &self.plugin_config,
        }
    }

    /// Replaces a request header before the request is sent.
    pub fn set_header_value(&self, name: &str, value: &str) {
        let mut map = self.request_headers.borrow_mut();
        map.retain(|(k, _)| k != name);
        map.push((name.to_string(), value.to_string()));
    }

    /// A header's value as the upstream (or the client) would see it.
    pub fn get(&self, m: Map, name: &str) -> Option<String> {
        self.map(m).borrow().iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
}

impl Host for FakeHost {
    fn now_ns(&self) -> u64 {
        if let Some(t) = self.clock.get() {
            return t;
        }
        self.log.borrow_mut().push("now");
        let t = self.world.now_ms.get() * 1_000_000;
        self.clock.set(Some(t));
        t
    }
    fn histogram_since(&self, _name: &str, _since_ns: u64) {
        // As a sample the host skips: no clock read.
    }
    fn headers(&self, m: Map) -> Result<Vec<(String, String)>, HostError> {
        self.call("headers")?;
        Ok(self.map(m).borrow().clone())
    }
    fn header(&self, m: Map, name: &str) -> Result<Option<String>, HostError> {
        self.call("header")?;
        Ok(self.get(m, name))
    }
    fn set_header(&self, m: Map, name: &str, value: &str) -> Result<(), HostError> {
        self.call("set_header")?;
        let mut map = self.map(m).borrow_mut();
        map.retain(|(k, _)| k != name);
        map.push((name.to_string(), value.to_string()));
        Ok(())
    }
    fn remove_header(&self, m: Map, name: &str) -> Result<(), HostError> {
        self.call("remove_header")?;
        self.map(m).borrow_mut().retain(|(k, _)| k != name);
        Ok(())
    }
    fn buffer(&self, b: Buffer, start: usize, max: usize) -> Result<Option<Vec<u8>>, HostError> {
        self.call("buffer")?;
        let data = self.buf(b).borrow();
        let start = start.min(data.len());
        let end = start.saturating_add(max).min(data.len());
        Ok(if start == end { None } else { Some(data[start..end].to_vec()) })
    }
    fn set_buffer(&self, b: Buffer, start: usize, size: usize, value: &[u8]) -> Result<(), HostError> {
        self.call("set_buffer")?;
        let mut data = self.buf(b).borrow_mut();
        let start = start.min(data.len());
        let end = start.saturating_add(size).min(data.len());
        data.splice(start..end, value.iter().copied());
        Ok(())
    }
    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<(), HostError> {
        self.call("send_reply")?;
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        *self.sent.borrow_mut() = Some(Sent { status, headers, body: body.to_vec() });
        Ok(())
    }
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
        self.call("property")?;
        if let Some(v) = self.world.properties.borrow().get(&path.join(".")) {
            return Ok(Some(v.clone()));
        }
        // A name Envoy does not know is looked up in filter state
        // (`wasm.<name>`, as `set_property` wrote it).
        Ok(match path {
            [name] => self.filter_state.borrow().get(*name).cloned(),
            _ => None,
        })
    }
    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        self.call("set_property")?;
        self.filter_state.borrow_mut().insert(name.to_string(), value.to_vec());
        Ok(())
    }
    fn declare_request_property(&self, _name: &str) -> Result<(), HostError> {
        self.call("declare_request_property")
    }
    fn store(&self) -> &dyn Store {
        &self.shared
    }
    fn define_metric(&self, kind: Kind, name: &str) {
        self.world.defined.borrow_mut().push((kind, name.to_string()));
    }
    fn count(&self, name: &str, delta: u64) {
        *self.world.counters.borrow_mut().entry(name.to_string()).or_insert(0) += delta;
    }
    fn gauge(&self, name: &str, value: u64) {
        self.world.gauges.borrow_mut().insert(name.to_string(), value);
    }
    fn histogram(&self, _name: &str, _value: u64) {}
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        _timeout_ms: u64,
    ) -> Result<u32, HostError> {
        self.call("dispatch_http_call")?;
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut calls = self.world.calls.borrow_mut();
        calls.push((cluster.to_string(), headers, body.to_vec()));
        Ok(calls.len() as u32)
    }
    fn set_tick_period(&self, _ms: u32) -> Result<(), HostError> {
        self.call("set_tick_period")
    }
}

/// One request through both stages, driven callback by callback the way
/// Envoy does: the ingress context, then one context per upstream attempt.
pub struct Exchange {
    pub world: Rc<World>,
    pub ingress: super::ingress::Ingress,
    pub downstream: FakeHost,
    pub attempts: Vec<(super::attempt::Attempt, FakeHost)>,
}

impl Exchange {
    /// A request with `headers` (and a body, sent later) to the gateway of
    /// `ingress`.
    pub fn new(world: &Rc<World>, ingress: &Root, headers: &[(&str, &str)], body: &[u8]) -> Exchange {
        let Some(Request::Ingress(i)) = ingress.request(1) else {
            panic!("not an ingress root");
        };
        let downstream = FakeHost::new(world);
        *downstream.request_headers.borrow_mut() =
            headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        *downstream.request_body.borrow_mut() = body.to_vec();
        Exchange { world: world.clone(), ingress: i, downstream, attempts: Vec::new() }
    }

    pub fn request_headers(&mut self, end_of_stream: bool) -> Next {
        self.ingress.on_request_headers(self.downstream.callback(), end_of_stream)
    }

    /// The whole body in one callback, ending the stream.
    pub fn request_body(&mut self) -> Next {
        let n = self.downstream.request_body.borrow().len();
        self.ingress.on_request_body(self.downstream.callback(), n, true)
    }

    /// Headers, then the body in chunks of `chunk` bytes, ending with
    /// trailers when `trailers` (no body chunk then says end-of-stream).
    pub fn send_request(&mut self, chunk: usize, trailers: bool) -> Next {
        let body = self.downstream.request_body.borrow().clone();
        let n = self.request_headers(body.is_empty() && !trailers);
        if n == Next::Continue && self.replied().is_none() && body.is_empty() && !trailers {
            return n;
        }
        if self.replied().is_some() {
            return n;
        }
        let mut seen = 0;
        let mut last = Next::Pause;
        for part in body.chunks(chunk.max(1)) {
            seen += part.len();
            let eos = !trailers && seen == body.len();
            // Envoy's buffer holds what arrived so far.
            *self.downstream.request_body.borrow_mut() = body[..seen].to_vec();
            last = self.ingress.on_request_body(self.downstream.callback(), seen, eos);
            if self.replied().is_some() {
                return last;
            }
        }
        if trailers {
            last = self.ingress.on_request_trailers(self.downstream.callback());
        }
        last
    }

    /// The local reply the ingress stage sent, if any.
    pub fn replied(&self) -> Option<Sent> {
        self.downstream.sent.borrow().clone()
    }

    /// Starts an upstream attempt of `attempt` root: it sees the request as
    /// the ingress stage (and earlier attempts) left it.
    pub fn attempt(&mut self, attempt: &Root) -> Next {
        let Some(Request::Attempt(mut a)) = attempt.request(10 + self.attempts.len() as u32) else {
            panic!("not an attempt root");
        };
        let mut up = FakeHost::new(&self.world);
        up.filter_state = self.downstream.filter_state.clone();
        let headers = match self.attempts.last() {
            Some((_, prev)) => prev.request_headers.borrow().clone(),
            None => self.downstream.request_headers.borrow().clone(),
        };
        *up.request_headers.borrow_mut() = headers;
        *up.request_body.borrow_mut() = self.downstream.request_body.borrow().clone();
        let next = a.on_request_headers(up.callback());
        self.attempts.push((a, up));
        next
    }

    fn last(&mut self) -> &mut (super::attempt::Attempt, FakeHost) {
        match self.attempts.last_mut() {
            Some(a) => a,
            None => panic!("no attempt started"),
        }
    }

    /// The current attempt's upstream answers with `status` and `headers`.
    pub fn upstream_headers(&mut self, status: u32, headers: &[(&str, &str)], end_of_stream: bool) -> Next {
        let (a, up) = self.last();
        let mut h = vec![(":status".to_string(), status.to_string())];
        h.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        *up.response_headers.borrow_mut() = h;
        a.on_response_headers(up.callback(), end_of_stream)
    }

    /// The current attempt's upstream sends body `chunks`, the last one
    /// ending the stream when `end`. Returns what passes to the client.
    pub fn upstream_body(&mut self, chunks: &[&[u8]], end: bool) -> Vec<u8> {
        let (a, up) = self.last();
        let mut out = Vec::new();
        let mut buffered: Vec<u8> = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let eos = end && i + 1 == chunks.len();
            buffered.extend_from_slice(c);
            *up.response_body.borrow_mut() = buffered.clone();
            let n = buffered.len();
            if a.on_response_body(up.callback(), n, eos) == Next::Continue {
                out.extend_from_slice(&up.response_body.borrow());
                buffered.clear();
            }
        }
        out
    }

    /// The current attempt ends (completed, reset or aborted).
    pub fn attempt_done(&mut self) {
        let (a, up) = self.last();
        a.on_done(up.callback());
    }

    /// The final response passes the ingress stage, then the request is
    /// logged.
    pub fn finish(&mut self) {
        let headers = self.attempts.last().map(|(_, up)| up.response_headers.borrow().clone()).unwrap_or_default();
        *self.downstream.response_headers.borrow_mut() = headers;
        if !self.attempts.is_empty() {
            self.ingress.on_response_headers(self.downstream.callback(), false);
            self.ingress.on_response_body(self.downstream.callback(), true);
        }
        self.ingress.on_log(self.downstream.callback());
    }

    /// Host calls made for this request, by both stages.
    pub fn host_calls(&self) -> usize {
        self.downstream.calls() + self.attempts.iter().map(|(_, up)| up.calls()).sum::<usize>()
    }
}
