//! Two bench-only proxy-wasm filters, chosen by the plugin configuration:
//!
//! - `{}`: a no-op filter. Its callbacks all keep the SDK defaults
//!   (`Continue`). Loaded in the same two positions as apikeyrouter, it
//!   measures what the V8 wasm runtime costs by itself.
//! - `{"floor":true}`: the *design floor*. It makes only the host calls and
//!   pauses that any filter doing apikeyrouter's job must make, and does no
//!   work of its own between them. At ingress it reads the request headers,
//!   removes the caller's credential, holds the body until its end and reads
//!   it (the model, `stream` and `max_tokens` are in it). In the attempt
//!   stage it reads one shared-data record (the key's state), writes the
//!   auth header, reads the response headers (status, rate-limit headers),
//!   holds a JSON body until its end and reads it (the usage block is at its
//!   end), and updates the key's record with one compare-and-swap when the
//!   attempt is done. The gap between this floor and the no-op filter is the
//!   price of the work itself in Envoy and V8, whatever the filter computes.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot { floor: None }) });
}}

struct NoopRoot {
    /// `Some(upstream)` for the floor filter: `{"floor":"ingress"}` or
    /// `{"floor":"attempt"}`.
    floor: Option<bool>,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX).ok().flatten();
        let has = |c: &[u8], s: &[u8]| c.windows(s.len()).any(|w| w == s);
        self.floor = config.filter(|c| has(c, b"\"floor\"")).map(|c| has(&c, b"attempt"));
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        match self.floor {
            Some(upstream) => Some(Box::new(Floor { body: false, upstream })),
            None => Some(Box::new(Noop)),
        }
    }
}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {}

const RECORD: &str = "floor.key";

struct Floor {
    /// The response body is JSON and is held until its end.
    body: bool,
    /// This context runs in the attempt stage.
    upstream: bool,
}

impl Context for Floor {
    fn on_done(&mut self) -> bool {
        if self.upstream {
            // One compare-and-swap on the key's record.
            if let Ok((value, cas)) = hostcalls::get_shared_data(RECORD) {
                let mut v = value.unwrap_or_else(|| vec![0; 8]);
                if let Some(b) = v.first_mut() {
                    *b = b.wrapping_add(1);
                }
                let _ = hostcalls::set_shared_data(RECORD, Some(&v), cas);
            }
        }
        true
    }
}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        // Both stages read the request headers (x-request-id, the caller's
        // credential, router headers).
        let _ = hostcalls::get_map(MapType::HttpRequestHeaders);
        if self.upstream {
            let _ = hostcalls::get_shared_data(RECORD);
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "authorization", Some("Bearer sk-floor"));
            return Action::Continue;
        }
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, "authorization", None);
        if end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.upstream {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let _ = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        if !self.upstream {
            return Action::Continue;
        }
        let headers = hostcalls::get_map(MapType::HttpResponseHeaders).unwrap_or_default();
        self.body = !end_of_stream
            && headers.iter().any(|(k, v)| k == "content-type" && v.contains("json"));
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !self.upstream {
            return Action::Continue;
        }
        if self.body {
            if !end_of_stream {
                return Action::Pause;
            }
            let _ = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size);
        } else if size > 0 {
            // A stream: each chunk is read as it passes.
            let _ = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size);
        }
        Action::Continue
    }
}
