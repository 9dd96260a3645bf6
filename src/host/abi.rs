//! Raw proxy-wasm hostcalls that report every status as a `Result`: the
//! only place that calls the host.
//!
//! The SDK's own wrappers `panic!` on any unexpected status (and on header
//! values that are not UTF-8); a panic traps the VM for every request on the
//! worker. These imports bind the same host functions and never panic.

use crate::header_wire;
use crate::store::{ReadError, SetError, Store};
use std::ptr::{null, null_mut};

pub const REQUEST_HEADERS: u32 = 0;
pub const RESPONSE_HEADERS: u32 = 2;
pub const HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
pub const REQUEST_BODY: u32 = 0;
pub const RESPONSE_BODY: u32 = 1;
pub const HTTP_CALL_RESPONSE_BODY: u32 = 4;
pub const PLUGIN_CONFIGURATION: u32 = 7;

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

pub use crate::stages::host::HostError;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_data: *mut *mut u8,
        return_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(buffer_type: u32, start: usize, size: usize, data: *const u8, data_size: usize) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_call_foreign_function(
        function_name_data: *const u8,
        function_name_size: usize,
        arguments_data: *const u8,
        arguments_size: usize,
        results_data: *mut *mut u8,
        results_size: *mut usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
}

fn status(st: u32) -> Result<(), HostError> {
    if st == OK {
        Ok(())
    } else {
        Err(HostError(st))
    }
}

/// Calls `cluster`; the answer comes to the root context's
/// `on_http_call_response` with the returned token.
///
/// This one goes through the SDK: its dispatcher must register the token to
/// route the answer (`register_callout` is private to the SDK, and an
/// unregistered token makes the SDK panic when the answer arrives). The
/// SDK panics only on a status other than Ok, BadArgument and
/// InternalFailure, which Envoy's `httpCall` does not return for the
/// well-formed buffers the SDK builds.
pub fn http_call(cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, HostError> {
    let timeout = std::time::Duration::from_millis(timeout_ms);
    proxy_wasm::hostcalls::dispatch_http_call(cluster, headers.to_vec(), Some(body), vec![], timeout)
        .map_err(|s| HostError(s as u32))
}

/// Defines a metric of `kind` (0 counter, 1 gauge, 2 histogram); its id.
pub fn define_metric(kind: u32, name: &str) -> Result<u32, HostError> {
    let mut out: u32 = 0;
    // SAFETY: pointers into a live string and a local.
    let st = unsafe { proxy_define_metric(kind, name.as_ptr(), name.len(), &mut out) };
    status(st).map(|()| out)
}

pub fn increment_metric(id: u32, delta: i64) -> Result<(), HostError> {
    // SAFETY: plain integers.
    status(unsafe { proxy_increment_metric(id, delta) })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), HostError> {
    // SAFETY: plain integers.
    status(unsafe { proxy_record_metric(id, value) })
}

/// Takes ownership of a host-allocated buffer (allocated through the SDK's
/// exported `proxy_on_memory_allocate`, i.e. our own allocator).
///
/// # Safety
/// `data` must be null or a pointer the host got from our allocator for
/// exactly `size` bytes.
unsafe fn owned(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        None
    } else {
        Some(Vec::from_raw_parts(data, size, size))
    }
}

pub fn header(map: u32, name: &str) -> Result<Option<String>, HostError> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: valid pointers to locals; the host writes a buffer it
    // allocated through our allocator.
    let st = unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) };
    match st {
        OK => Ok(unsafe { owned(data, size) }.map(|b| String::from_utf8_lossy(&b).into_owned())),
        NOT_FOUND => Ok(None),
        other => Err(HostError(other)),
    }
}

pub fn headers(map: u32) -> Result<Vec<(String, String)>, HostError> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `header`.
    let st = unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) };
    match st {
        OK => match unsafe { owned(data, size) } {
            Some(b) => header_wire::decode(&b).map_err(|_| HostError(u32::MAX)),
            None => Ok(Vec::new()),
        },
        NOT_FOUND => Ok(Vec::new()),
        other => Err(HostError(other)),
    }
}

pub fn set_header(map: u32, name: &str, value: &str) -> Result<(), HostError> {
    // SAFETY: pointers into live borrowed strings.
    let st = unsafe { proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
    if st == OK {
        Ok(())
    } else {
        Err(HostError(st))
    }
}

pub fn remove_header(map: u32, name: &str) -> Result<(), HostError> {
    // SAFETY: pointer into a live borrowed string.
    let st = unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) };
    if st == OK || st == NOT_FOUND {
        Ok(())
    } else {
        Err(HostError(st))
    }
}

pub fn buffer(kind: u32, start: usize, max: usize) -> Result<Option<Vec<u8>>, HostError> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `header`.
    let st = unsafe { proxy_get_buffer_bytes(kind, start, max, &mut data, &mut size) };
    match st {
        OK => Ok(unsafe { owned(data, size) }),
        NOT_FOUND => Ok(None),
        other => Err(HostError(other)),
    }
}

/// Sets a property (in Envoy: filter state `wasm.<name>`, readable by
/// access logs as `%FILTER_STATE(wasm.<name>:PLAIN)%`).
pub fn set_property(name: &str, value: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointers into live buffers.
    let st = unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
    if st == OK {
        Ok(())
    } else {
        Err(HostError(st))
    }
}

/// Calls one of Envoy's foreign functions (e.g. `declare_property`); its
/// result, if any, is dropped.
pub fn call_foreign(name: &str, args: &[u8]) -> Result<(), HostError> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: pointers into live buffers; the result is taken and freed.
    let st = unsafe {
        proxy_call_foreign_function(name.as_ptr(), name.len(), args.as_ptr(), args.len(), &mut data, &mut size)
    };
    drop(unsafe { owned(data, size) });
    if st == OK {
        Ok(())
    } else {
        Err(HostError(st))
    }
}

pub fn set_buffer(kind: u32, start: usize, size: usize, value: &[u8]) -> Result<(), HostError> {
    // SAFETY: pointer into a live slice.
    let st = unsafe { proxy_set_buffer_bytes(kind, start, size, value.as_ptr(), value.len()) };
    if st == OK {
        Ok(())
    } else {
        Err(HostError(st))
    }
}

pub fn send_local_response(status: u32, headers: &[(&str, &str)], body: &[u8]) -> Result<(), HostError> {
    let h = header_wire::encode(headers);
    let details = b"apikeyrouter";
    // SAFETY: pointers into live buffers.
    let st = unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            if body.is_empty() { null() } else { body.as_ptr() },
            body.len(),
            h.as_ptr(),
            h.len(),
            -1,
        )
    };
    if st == OK {
        Ok(())
    } else {
        Err(HostError(st))
    }
}

/// Unix time in nanoseconds (0 if the host cannot tell).
pub fn now_ns() -> u64 {
    let mut t: u64 = 0;
    // SAFETY: pointer to a local.
    let st = unsafe { proxy_get_current_time_nanoseconds(&mut t) };
    if st == OK {
        t
    } else {
        0
    }
}

/// Asks for `on_tick` every `ms` milliseconds on this root context.
pub fn set_tick_period(ms: u32) -> Result<(), HostError> {
    // SAFETY: plain integer.
    let st = unsafe { proxy_set_tick_period_milliseconds(ms) };
    if st == OK {
        Ok(())
    } else {
        Err(HostError(st))
    }
}

pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
    let mut p = Vec::new();
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            p.push(0);
        }
        p.extend_from_slice(part.as_bytes());
    }
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `header`.
    let st = unsafe { proxy_get_property(p.as_ptr(), p.len(), &mut data, &mut size) };
    match st {
        OK => Ok(unsafe { owned(data, size) }),
        NOT_FOUND => Ok(None),
        other => Err(HostError(other)),
    }
}

/// Proxy-wasm shared data (one namespace per `vm_id` and Envoy process).
pub struct SharedData;

impl Store for SharedData {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), ReadError> {
        let mut data: *mut u8 = null_mut();
        let mut size: usize = 0;
        let mut cas: u32 = 0;
        // SAFETY: as in `header`.
        let st = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
        match st {
            OK => Ok((unsafe { owned(data, size) }, if cas == 0 { None } else { Some(cas) })),
            NOT_FOUND => Ok((None, None)),
            _ => Err(ReadError),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        // SAFETY: pointers into live buffers.
        let st =
            unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0)) };
        match st {
            OK => Ok(()),
            CAS_MISMATCH => Err(SetError::CasMismatch),
            _ => Err(SetError::Host),
        }
    }
}
