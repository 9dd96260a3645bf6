//! Keys registered at runtime through the admin API (`POST keys`).
//!
//! They live in shared data: one JSON record lists them, with a version
//! that every worker compares against its own when the state generation
//! moves. A worker that sees a new version rebuilds its key table as the
//! configured keys followed by the runtime ones, in registration order.
//! Deleted entries keep their place (marked deleted) so that key indexes
//! never shift under a request in flight. In fleet mode the sync also keeps
//! them in etcd ([`crate::durable`]): each entry carries the time of the
//! admin change that made it (`at_ms`), and [`adopt`] applies a newer one
//! read from etcd.

use crate::config::{fingerprint, Config, ConfigError, Key, SecretSource};
use crate::store::{update, Store, UpdateError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

// The registry record, and the counter bumped after every change: workers
// compare it (8 bytes) instead of parsing the registry.
use crate::shared_data::{RUNTIME_KEYS as REGISTRY_KEY, RUNTIME_KEYS_CHANGES as CHANGES};
/// Most runtime keys (deleted ones included) a registry holds.
pub const MAX_RUNTIME_KEYS: usize = 1000;

/// One runtime key. `secret` is key material: never logged or returned.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeKey {
    pub id: String,
    pub provider: String,
    pub secret: String,
    pub weight: u32,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    #[serde(default)]
    pub deleted: bool,
    /// When the admin change that made this entry (registration or
    /// deletion) happened, on the instance that made it; 0: before fleet
    /// mode kept runtime keys.
    #[serde(default)]
    pub at_ms: u64,
}

impl std::fmt::Debug for RuntimeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeKey").field("id", &self.id).field("deleted", &self.deleted).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Registry {
    pub version: u64,
    pub keys: Vec<RuntimeKey>,
}

impl Registry {
    /// The newest entry for `id` (live or deleted).
    pub fn latest(&self, id: &str) -> Option<&RuntimeKey> {
        self.keys.iter().rev().find(|k| k.id == id)
    }

    pub fn decode(b: &[u8]) -> Option<Registry> {
        serde_json::from_slice(b).ok()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The registry change counter.
pub fn changes(store: &dyn Store) -> u64 {
    store.value(CHANGES).and_then(|b| b.as_slice().try_into().ok()).map(u64::from_le_bytes).unwrap_or(0)
}

/// Reads the registry (empty when absent or unreadable).
pub fn load(store: &dyn Store) -> Registry {
    store.value(REGISTRY_KEY).and_then(|b| Registry::decode(&b)).unwrap_or_default()
}

/// Why a registration or deletion was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// 400: the field and the reason.
    Invalid(String, String),
    /// 409: the id is taken.
    Conflict(String),
    /// 404.
    NotFound,
    /// 409: configured keys can only be disabled.
    ConfigKey,
    /// 507: the registry is full.
    Full,
    /// 503: shared data refused the write.
    Busy,
}

/// Parses a `POST keys` body: `{"id", "provider" (or the original
/// design's "provider_id"), "key_material" (or "secret"), "weight",
/// "metadata"}`. Without an `id` (or with `"id": null`) the key gets
/// [`generated_id`].
pub fn parse_new_key(body: &[u8], base: &Config) -> Result<RuntimeKey, RegistryError> {
    let invalid = |f: &str, r: &str| RegistryError::Invalid(f.to_string(), r.to_string());
    let v: Value = serde_json::from_slice(body).map_err(|e| invalid("(body)", &format!("not valid JSON: {e}")))?;
    let Value::Object(mut o) = v else { return Err(invalid("(body)", "expected a JSON object")) };
    // A field given as null is a field not given.
    let mut take_str = |name: &str| o.remove(name).filter(|v| !v.is_null()).map(|v| v.as_str().map(str::to_string));
    let id = match take_str("id") {
        None => None,
        Some(Some(id)) => Some(id),
        Some(None) => return Err(invalid("id", "a string, or left out to have one generated")),
    };
    if let Some(id) = &id {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(invalid("id", "must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'"));
        }
    }
    let provider = match (take_str("provider"), take_str("provider_id")) {
        (Some(Some(a)), Some(Some(b))) if a != b => {
            return Err(invalid("provider_id", "names another provider than provider; give one of the two"))
        }
        (Some(Some(p)), _) | (None, Some(Some(p))) => p,
        (None, None) if base.providers.len() == 1 => base.providers[0].id.clone(),
        _ => return Err(invalid("provider", "required (or provider_id), the id of a configured provider")),
    };
    if base.provider_by_id(&provider).is_none() {
        return Err(invalid("provider", &format!("no provider with id {provider:?}")));
    }
    let secret = match take_str("key_material").or_else(|| take_str("secret")) {
        Some(Some(s)) if !s.is_empty() && s.bytes().all(|b| (0x21..0x7f).contains(&b)) => s,
        _ => return Err(invalid("key_material", "required: printable ASCII without spaces")),
    };
    let weight = match o.remove("weight") {
        None => 1,
        Some(w) => match w.as_u64() {
            Some(w) if (1..=crate::config::MAX_WEIGHT).contains(&w) => w as u32,
            _ => return Err(invalid("weight", "expected an integer from 1 to 10000")),
        },
    };
    let metadata = match o.remove("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(invalid("metadata", "expected an object")),
    };
    if let Some(unknown) = o.keys().next() {
        return Err(invalid(unknown, "unknown field"));
    }
    let id = id.unwrap_or_else(|| generated_id(&provider, &secret));
    Ok(RuntimeKey { id, provider, secret, weight, metadata, deleted: false, at_ms: 0 })
}

/// The id of a key registered without one: its provider's id (cut to 51
/// characters) and the 12 hex digits of its fingerprint, e.g.
/// `openai-3f2a9c1b7d4e`. Nothing secret: the fingerprint is what the admin
/// API already shows of every key. Unique as the material is: registering
/// the same material twice is refused (409) rather than adding a duplicate.
pub fn generated_id(provider: &str, secret: &str) -> String {
    let fp = fingerprint(secret);
    let hex = fp.strip_prefix("sha256:").unwrap_or(&fp);
    let head: String = provider.chars().take(51).collect();
    format!("{head}-{hex}")
}

/// Adds a key to the registry, refusing a taken id.
pub fn register(store: &dyn Store, base: &Config, key: RuntimeKey) -> Result<Registry, RegistryError> {
    if base.key_by_id(&key.id).is_some() {
        return Err(RegistryError::Conflict(key.id));
    }
    // Its state record exists before any worker can choose the key, so
    // every update of it is a compare-and-swap.
    let record = crate::shared_data::key_record(&key.provider, &key.id);
    if crate::store::seed(store, &record, &crate::key_record::KeyRecord::default().encode()).is_err() {
        return Err(RegistryError::Busy);
    }
    let (r, _) = update(store, REGISTRY_KEY, |cur| {
        let mut reg = cur.and_then(Registry::decode).unwrap_or_default();
        if reg.keys.iter().any(|k| k.id == key.id && !k.deleted) {
            return Err(RegistryError::Conflict(key.id.clone()));
        }
        if reg.keys.len() >= MAX_RUNTIME_KEYS {
            return Err(RegistryError::Full);
        }
        let mut key = key.clone();
        // Later than the id's last change, even with the same clock reading.
        key.at_ms = key.at_ms.max(reg.latest(&key.id).map_or(0, |k| k.at_ms.saturating_add(1)));
        reg.version += 1;
        reg.keys.push(key);
        Ok((reg.clone(), reg.encode()))
    });
    settle(store, r)
}

/// Deletes a runtime key (its slot stays, marked deleted) at `now_ms`.
pub fn delete(store: &dyn Store, base: &Config, id: &str, now_ms: u64) -> Result<Registry, RegistryError> {
    if base.key_by_id(id).is_some_and(|(_, k)| k.source != SecretSource::Runtime) {
        return Err(RegistryError::ConfigKey);
    }
    let (r, _) = update(store, REGISTRY_KEY, |cur| {
        let mut reg = cur.and_then(Registry::decode).unwrap_or_default();
        let Some(k) = reg.keys.iter_mut().find(|k| k.id == id && !k.deleted) else {
            return Err(RegistryError::NotFound);
        };
        k.deleted = true;
        k.secret.clear();
        k.at_ms = now_ms.max(k.at_ms.saturating_add(1));
        reg.version += 1;
        Ok((reg.clone(), reg.encode()))
    });
    settle(store, r)
}

/// Applies a registration or deletion read from etcd (fleet mode), newer
/// than this registry's entry for its id ([`crate::durable::merge`] decides):
/// a deletion marks the live entry deleted; a registration replaces the live
/// entry (marked deleted, a new slot added) or adds one. Returns whether the
/// registry changed. `cfg` is the configuration now in force: an id of a
/// configured key is refused.
pub fn adopt(store: &dyn Store, cfg: &Config, remote: &RuntimeKey) -> Result<bool, RegistryError> {
    if cfg.key_by_id(&remote.id).is_some_and(|(_, k)| k.source != SecretSource::Runtime) {
        return Err(RegistryError::ConfigKey);
    }
    if !remote.deleted {
        let record = crate::shared_data::key_record(&remote.provider, &remote.id);
        if crate::store::seed(store, &record, &crate::key_record::KeyRecord::default().encode()).is_err() {
            return Err(RegistryError::Busy);
        }
    }
    let (r, _) = update(store, REGISTRY_KEY, |cur| {
        let mut reg = cur.and_then(Registry::decode).unwrap_or_default();
        let live = reg.keys.iter().rposition(|k| k.id == remote.id && !k.deleted);
        if remote.deleted && live.is_none() {
            return Err(RegistryError::NotFound);
        }
        if !remote.deleted && live.is_none() && reg.keys.len() >= MAX_RUNTIME_KEYS {
            return Err(RegistryError::Full);
        }
        if let Some(k) = live.and_then(|i| reg.keys.get_mut(i)) {
            k.deleted = true;
            k.secret.clear();
            k.at_ms = remote.at_ms;
        }
        if !remote.deleted {
            reg.keys.push(remote.clone());
        }
        reg.version += 1;
        Ok((reg.clone(), reg.encode()))
    });
    match settle(store, r) {
        Ok(_) => Ok(true),
        Err(RegistryError::NotFound) => Ok(false),
        Err(e) => Err(e),
    }
}

fn settle(store: &dyn Store, r: Result<Registry, UpdateError<RegistryError>>) -> Result<Registry, RegistryError> {
    match r {
        Ok(reg) => {
            crate::shared_data::increment(store, CHANGES);
            Ok(reg)
        }
        Err(UpdateError::Rejected(e)) => Err(e),
        Err(_) => Err(RegistryError::Busy),
    }
}

/// The configured keys followed by the registry's, as one config. `base`
/// must be the configuration as compiled, without runtime keys.
pub fn merged(base: &Config, reg: &Registry) -> Result<Config, ConfigError> {
    let mut cfg = base.clone();
    let configured = cfg.keys.live().take_while(|(_, k)| k.source != SecretSource::Runtime).count();
    cfg.keys.truncate(configured);
    for p in cfg.providers.iter_mut() {
        p.keys.retain(|&k| k < configured);
    }
    for rk in &reg.keys {
        let Some(p) = cfg.provider_by_id(&rk.provider) else { continue };
        if rk.deleted {
            cfg.keys.push(None);
            continue;
        }
        let provider_id = cfg.providers[p].id.clone();
        let key = Key {
            id: rk.id.clone(),
            provider: p,
            weight: rk.weight,
            metadata: rk.metadata.clone(),
            source: SecretSource::Runtime,
            fingerprint: fingerprint(&rk.secret),
            auth_header: cfg.providers[p].kind.auth("").0,
            auth_value: cfg.providers[p].kind.auth(&rk.secret).1,
            extra_headers: Vec::new(),
            record_name: crate::shared_data::key_record(&provider_id, &rk.id),
            cost_per_1k: None,
            cost_score_price: None,
            limits: Default::default(),
            pricing: Default::default(),
            budgets: Vec::new(),
            group: None,
        };
        let pricing = key.pricing;
        let index = cfg.keys.push(Some(key));
        cfg.providers[p].keys.push(index);
        if !cfg.providers[p].pricings.contains(&pricing) {
            cfg.providers[p].pricings.push(pricing);
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile;
    use crate::store::FakeStore;

    fn base() -> Config {
        let json = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"sk-one"}]}]}"#;
        compile(json.as_bytes(), &|_| None).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn runtime_keys_join_the_key_table_after_the_configured_ones() {
        let s = FakeStore::new();
        let b = base();
        let k = parse_new_key(br#"{"id":"r1","key_material":"sk-runtime","metadata":{"tier":"x"}}"#, &b);
        let reg = register(&s, &b, k.unwrap_or_else(|e| panic!("{e:?}"))).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(reg.version, 1);
        let cfg = merged(&b, &load(&s)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.keys.slots(), 2);
        assert_eq!(cfg.keys[1].source, SecretSource::Runtime);
        assert_eq!(cfg.keys[1].auth_value, "Bearer sk-runtime");
        assert_eq!(cfg.providers[0].keys, vec![0, 1]);
    }

    #[test]
    fn deleting_keeps_the_slot_but_takes_the_key_out_of_rotation() {
        let s = FakeStore::new();
        let b = base();
        for id in ["r1", "r2"] {
            let k = parse_new_key(format!(r#"{{"id":"{id}","secret":"sk-{id}"}}"#).as_bytes(), &b);
            assert!(register(&s, &b, k.unwrap_or_else(|e| panic!("{e:?}"))).is_ok());
        }
        assert!(delete(&s, &b, "r1", 5).is_ok());
        let reg = load(&s);
        assert!(reg.keys[0].deleted && reg.keys[0].secret.is_empty(), "the material is gone");
        let cfg = merged(&b, &reg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.keys[2].id, "r2", "indexes do not shift");
        assert!(cfg.keys.get(1).is_none(), "the deleted key is nowhere to be read");
        assert_eq!(cfg.keys.live().map(|(_, k)| k.id.as_str()).collect::<Vec<_>>(), ["k1", "r2"]);
        assert_eq!(cfg.providers[0].keys, vec![0, 2]);
        assert_eq!(delete(&s, &b, "r1", 6), Err(RegistryError::NotFound));
        assert_eq!(delete(&s, &b, "k1", 6), Err(RegistryError::ConfigKey));
    }

    #[test]
    fn a_config_merged_with_runtime_keys_still_finds_clients_by_their_key() {
        let digest =
            |k: &str| crate::crypto::sha256(k.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>();
        let json = format!(
            r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}}]}}],
                "clients":[{{"id":"a","key_sha256":"{}"}},{{"id":"b","key_sha256":"{}"}}]}}"#,
            digest("vk-a"),
            digest("vk-b")
        );
        let b = compile(json.as_bytes(), &|_| None).unwrap_or_else(|e| panic!("{e}"));
        let s = FakeStore::new();
        let k = parse_new_key(br#"{"id":"r1","key_material":"sk-runtime"}"#, &b).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(register(&s, &b, k).is_ok());
        let cfg = merged(&b, &load(&s)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.keys.slots(), 2);
        for (key, index) in [("vk-a", 0), ("vk-b", 1)] {
            let found = crate::identity::authenticate(&cfg.clients, None, Some(key), 0).ok().flatten();
            assert_eq!(found, Some(index), "{key}");
            assert_eq!(cfg.clients.get(index).map(|c| c.id.as_str()), ["a", "b"].get(index).copied());
        }
        assert!(crate::identity::authenticate(&cfg.clients, None, Some("sk-runtime"), 0).is_err());
    }

    #[test]
    fn bad_registrations_are_refused_naming_the_field() {
        let b = base();
        for (body, field) in [
            (&b"{"[..], "(body)"),
            (b"[]", "(body)"),
            (br#"{"id":7,"secret":"sk"}"#, "id"),
            (br#"{"id":"a b","secret":"sk"}"#, "id"),
            (br#"{"id":"r","provider":"p","provider_id":"q","secret":"sk"}"#, "provider_id"),
            (br#"{"id":"r","provider":"nope","secret":"sk"}"#, "provider"),
            (br#"{"id":"r"}"#, "key_material"),
            (br#"{"id":"r","secret":"has space"}"#, "key_material"),
            (br#"{"id":"r","secret":"sk","weight":0}"#, "weight"),
            (br#"{"id":"r","secret":"sk","colour":"red"}"#, "colour"),
        ] {
            match parse_new_key(body, &b) {
                Err(RegistryError::Invalid(f, _)) => assert_eq!(f, field, "{}", String::from_utf8_lossy(body)),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
            }
        }
        let s = FakeStore::new();
        let dup = parse_new_key(br#"{"id":"k1","secret":"sk"}"#, &b).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(register(&s, &b, dup), Err(RegistryError::Conflict("k1".into())));
    }

    #[test]
    fn debug_output_never_contains_runtime_material() {
        let k = RuntimeKey {
            id: "r".into(),
            provider: "p".into(),
            secret: "sk-hidden".into(),
            weight: 1,
            metadata: Map::new(),
            deleted: false,
            at_ms: 0,
        };
        assert!(!format!("{k:?}").contains("sk-hidden"));
    }

    #[test]
    fn keys_adopted_from_etcd_are_added_replaced_and_deleted_in_place() {
        let s = FakeStore::new();
        let b = base();
        let key = |id: &str, secret: &str, at_ms| RuntimeKey {
            id: id.into(),
            provider: "openai".into(),
            secret: secret.into(),
            weight: 1,
            metadata: Map::new(),
            deleted: secret.is_empty(),
            at_ms,
        };
        assert_eq!(adopt(&s, &b, &key("r1", "sk-a", 10)), Ok(true));
        assert_eq!(adopt(&s, &b, &key("r1", "sk-b", 20)), Ok(true), "newer material replaces it");
        let reg = load(&s);
        assert_eq!(reg.keys.iter().map(|k| (k.deleted, k.at_ms)).collect::<Vec<_>>(), [(true, 20), (false, 20)]);
        assert_eq!(reg.latest("r1").map(|k| k.secret.as_str()), Some("sk-b"));
        assert!(reg.keys[0].secret.is_empty(), "the replaced material is gone");
        let cfg = merged(&b, &reg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.keys.live().map(|(_, k)| k.id.as_str()).collect::<Vec<_>>(), ["k1", "r1"]);
        assert_eq!(adopt(&s, &b, &key("r1", "", 30)), Ok(true));
        assert_eq!(load(&s).latest("r1").map(|k| (k.deleted, k.at_ms)), Some((true, 30)));
        assert_eq!(adopt(&s, &b, &key("r1", "", 40)), Ok(false), "nothing left to delete");
        assert_eq!(adopt(&s, &b, &key("k1", "sk-x", 50)), Err(RegistryError::ConfigKey));
        // A registration here after a deletion elsewhere is later than it.
        let again = parse_new_key(br#"{"id":"r1","secret":"sk-c"}"#, &b).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(register(&s, &b, again).is_ok());
        assert_eq!(load(&s).latest("r1").map(|k| k.at_ms), Some(31), "after the deletion at 30");
    }
}
