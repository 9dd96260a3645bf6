//! What the stages need from Envoy, as one small trait.
//!
//! The stages (ingress, attempt, the root's configure and tick) are plain
//! Rust that call only this trait. `src/host/` implements it with the
//! proxy-wasm hostcalls; a fake host implements it in memory
//! for the native lifecycle tests (`stages/fake.rs`) and counts every call.

use crate::store::Store;

/// A host status other than Ok (the proxy-wasm `WasmResult` code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

/// A header map the stages read or change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Map {
    RequestHeaders,
    ResponseHeaders,
    /// The headers of a `dispatch_http_call` answer (in its callback).
    CallResponseHeaders,
}

/// A byte buffer the stages read or change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buffer {
    RequestBody,
    ResponseBody,
    /// The body of a `dispatch_http_call` answer (in its callback).
    CallResponseBody,
    PluginConfiguration,
}

/// What a stage tells Envoy to do with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Stop iteration: keep the headers back, or buffer the body.
    Pause,
}

/// The host as the stages see it. Every call may fail; none panics.
pub trait Host {
    /// Unix time in nanoseconds (0 if the host cannot tell); the same
    /// instant throughout one callback.
    fn now_ns(&self) -> u64;
    fn now_ms(&self) -> u64 {
        self.now_ns() / 1_000_000
    }
    fn headers(&self, map: Map) -> Result<Vec<(String, String)>, HostError>;
    fn header(&self, map: Map, name: &str) -> Result<Option<String>, HostError>;
    /// Sets (replaces) a header. Request headers may only change while the
    /// headers are still paused: Envoy refuses it afterwards.
    fn set_header(&self, map: Map, name: &str, value: &str) -> Result<(), HostError>;
    /// Removes a header; removing an absent one is not an error.
    fn remove_header(&self, map: Map, name: &str) -> Result<(), HostError>;
    /// Up to `max` bytes of a buffer from `start`; `None` when it is empty.
    fn buffer(&self, buf: Buffer, start: usize, max: usize) -> Result<Option<Vec<u8>>, HostError>;
    /// Replaces `size` bytes at `start` with `value`.
    fn set_buffer(&self, buf: Buffer, start: usize, size: usize, value: &[u8]) -> Result<(), HostError>;
    /// Answers the request locally; the upstream is never contacted.
    fn send_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<(), HostError>;
    fn property(&self, path: &[&str]) -> Result<Option<Vec<u8>>, HostError>;
    /// Filter state `wasm.<name>` (access logs read it).
    fn set_property(&self, name: &str, value: &[u8]) -> Result<(), HostError>;
    /// Declares filter state `wasm.<name>` (for this root context's
    /// requests) as read-only bytes that live as long as the downstream
    /// request: unlike a plain property, it survives an internal redirect
    /// (Envoy's `declare_property` foreign function, life span
    /// `DownstreamRequest`).
    fn declare_request_property(&self, name: &str) -> Result<(), HostError>;
    /// Shared data: the one namespace every worker of this `vm_id` sees.
    fn store(&self) -> &dyn Store;
    /// Defines a stat so that it shows (at zero) before anything happens.
    fn define_metric(&self, kind: crate::metrics::Kind, name: &str);
    /// Adds to a counter (written on the tick).
    fn count(&self, name: &str, delta: u64);
    fn gauge(&self, name: &str, value: u64);
    /// Records a histogram value (the host may sample).
    fn histogram(&self, name: &str, value: u64);
    /// Records the microseconds since `since_ns` (a time read earlier in
    /// this callback) in a histogram: the host samples first and reads a
    /// fresh clock only for a sampled value.
    fn histogram_since(&self, name: &str, since_ns: u64);
    /// Calls a cluster; the answer arrives in the root's call callback
    /// under the returned token.
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, HostError>;
    /// Asks for a tick every `ms` milliseconds on this root context.
    fn set_tick_period(&self, ms: u32) -> Result<(), HostError>;

    /// A property as a string (e.g. route metadata), if present and readable.
    fn property_string(&self, path: &[&str]) -> Option<String> {
        self.property(path).ok().flatten().map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// Sends a local reply; logs instead of failing if the host refuses.
    fn reply(&self, reply: &crate::reply::Reply, context_id: u32) {
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Err(e) = self.send_reply(reply.status, &headers, &reply.body) {
            log::warn!("[{context_id}] local reply {} refused by host (status {})", reply.status, e.0);
        }
    }
}

/// The arguments of Envoy's `declare_property` foreign function for
/// [`Host::declare_request_property`]: the protobuf message
/// `envoy.source.extensions.common.wasm.DeclarePropertyArguments`
/// (`name` = 1, `readonly` = 2, `type` = 3 (Bytes, the default, left
/// out), `span` = 5), encoded by hand.
pub fn declare_property_args(name: &str) -> Vec<u8> {
    let mut out = vec![0x0a];
    let mut len = name.len();
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(name.as_bytes());
    // readonly = true; span = DownstreamRequest (1).
    out.extend_from_slice(&[0x10, 0x01, 0x28, 0x01]);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn declare_property_arguments_are_the_protobuf_envoy_parses() {
        assert_eq!(
            super::declare_property_args("apikeyrouter_flight"),
            [&[0x0a, 19][..], b"apikeyrouter_flight", &[0x10, 1, 0x28, 1]].concat()
        );
        let long = "x".repeat(200);
        assert_eq!(&super::declare_property_args(&long)[..3], &[0x0a, 0xc8, 0x01]);
    }
}
