//! Choosing a key and changing key state.
//!
//! Each VM keeps a [`Snapshot`] of every key's record. A request reads one
//! small generation record from shared data; the snapshot reloads the key
//! records only when some worker changed a key's eligibility (cooldown,
//! disable, exhaustion, a capacity-state change) or when its statistics are
//! older than `routing.stats_refresh_ms`. So the common path costs one
//! shared-data read however many keys there are.
//!
//! [`snapshot`] holds the per-VM view of every key, [`chooser`] picks one
//! for an objective, [`changes`] applies what a response or an admin does
//! to a key's record.

pub mod changes;
pub mod chooser;
pub mod snapshot;
#[cfg(test)]
mod test_support;

pub use changes::*;
pub use chooser::*;
pub use snapshot::*;

use crate::key_record::{DecodeError, KeyRecord};
use crate::store::Store;

/// Reads a key record; absent records read as fresh.
pub fn read_record(store: &dyn Store, name: &str) -> Result<KeyRecord, DecodeError> {
    match store.value(name) {
        None => Ok(KeyRecord::default()),
        Some(b) => KeyRecord::decode(&b),
    }
}
