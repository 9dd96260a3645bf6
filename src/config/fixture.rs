//! Fixtures shared by the config tests: an environment with known variables
//! and a compile that must succeed.

use super::{compile, Config};

/// `K1`, `K2`: key material; `EMPTY`: blank; `ADMIN`, `ADMIN_READ`: valid
/// admin tokens; `SHORT`: too short for one; `ETCD_PW`: a password; anything
/// else is not set.
pub(super) fn env(name: &str) -> Option<String> {
    match name {
        "K1" => Some("sk-one".into()),
        "K2" => Some("sk-two".into()),
        "EMPTY" => Some("  ".into()),
        "ADMIN" => Some("admin-token-0123456789".into()),
        "ADMIN_READ" => Some("admin-read-token-9876543210".into()),
        "ETCD_PW" => Some("etcd-password-1".into()),
        "SHORT" => Some("short".into()),
        _ => None,
    }
}

/// Compiles `json` with [`env`], failing the test on a refusal.
pub(super) fn ok(json: &str) -> Config {
    match compile(json.as_bytes(), &env) {
        Ok(c) => c,
        Err(e) => panic!("expected valid config, got {e}"),
    }
}
