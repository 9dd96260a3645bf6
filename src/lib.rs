//! apikeyrouter: a proxy-wasm HTTP filter for Envoy that puts many LLM
//! provider API keys behind one OpenAI-compatible endpoint.
//!
//! Everything except `host` is plain Rust with no proxy-wasm dependency and
//! is unit-tested on the native target: [`stages`] holds one request's whole
//! path behind a small `Host` trait; `host` is the one boundary that talks
//! to Envoy and only maps its callbacks to the stages.

pub mod admin;
pub mod admission;
pub mod alerts;
pub mod budget;
pub mod charge;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod decision;
pub mod durable;
pub mod encoding;
pub mod fernet;
pub mod fleet;
pub mod forecast;
pub mod forward;
pub mod header_wire;
pub mod identity;
pub mod key_record;
pub mod keys;
pub mod metrics;
pub mod multipart;
pub mod objective;
pub mod objects;
pub mod provider_error;
pub mod providers;
pub mod quota;
pub mod ratelimit;
pub mod reply;
pub mod request;
pub mod runtime_keys;
pub mod shared_data;
pub mod stages;
pub mod store;
pub mod transition;
pub mod usage;
pub mod window;

#[cfg(target_arch = "wasm32")]
mod host;
