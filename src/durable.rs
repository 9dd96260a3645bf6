//! Fleet mode's durable admin changes: runtime keys (`POST keys`, `DELETE
//! keys/{id}`) and budget limit overrides (`PATCH budgets/{id}`) kept in
//! etcd, so that every instance, and an instance after a restart, has them.
//! (Admin key states travel with the other key states, `<prefix>/s/<key>`:
//! see [`crate::fleet`].)
//!
//! # Records
//!
//! - `<prefix>/k/<id>`: a runtime key, as the registry holds it (id,
//!   provider, material, weight, metadata, `deleted`, `at_ms`). A deletion
//!   is kept as a record with `deleted: true` and no material: an instance
//!   that still has the key learns that it was deleted, rather than writing
//!   it back.
//! - `<prefix>/l/<budget>`: `{"budget", "limit": "decimal" or null (the
//!   configured one), "at_ms"}`.
//!
//! With `APIKEYROUTER_ENCRYPTION_KEY` set, each value is `fernet:<token>`
//! of that JSON: etcd never holds the material in the clear, and a record
//! that does not decrypt and verify under the key (forged, damaged, another
//! key's) is refused. Without it, limits are plain JSON, and runtime keys
//! are kept in etcd only with `fleet.plaintext_runtime_keys: true` (else
//! `POST keys` is refused in fleet mode and `<prefix>/k/` is not read).
//!
//! # Merge: last writer wins, by the time of the admin change
//!
//! Each side has the time of the admin change it holds (`at_ms`). A sync
//! takes etcd's record when it is newer than the local change, or as new
//! and different (a tie goes to etcd: whichever instance wrote first); it
//! writes the local change when that is newer, with a compare on the
//! record's `mod_revision` as read, so of two instances writing at once one
//! wins and the other merges the winner at its next sync. "Newer" compares
//! the instances' clocks, as key states do: keep them in sync (NTP). A
//! record stamped more than [`MAX_SKEW_MS`] ahead is refused, so none can
//! win over every later change.

use crate::budget::Budget;
use crate::config::{Config, Fleet, MAX_WEIGHT};
use crate::fernet::FernetKey;
use crate::fleet::{EtcdView, Guard, Kv, Op, MAX_COUNT, MAX_SKEW_MS};
use crate::runtime_keys::{Registry, RuntimeKey};
use crate::store::{update, Store};
use hashbrown::HashMap;
use rust_decimal::Decimal;
use serde_json::Value;
use std::str::FromStr;

/// Prefix of the limit override last set on this process for each budget,
/// with its time (`.<budget>` follows).
pub use crate::shared_data::FLEET_LIMITS as LIMITS_KEY;

/// Longest key material and metadata (serialized) a record may hold.
const MAX_SECRET: usize = 4096;
const MAX_METADATA: usize = 4096;

pub fn key_record(prefix: &str, id: &str) -> String {
    format!("{prefix}/k/{id}")
}

pub fn limit_record(prefix: &str, budget: &str) -> String {
    format!("{prefix}/l/{budget}")
}

/// How this instance keeps admin changes in etcd.
#[derive(Debug, Clone, Copy)]
pub struct Sealing<'a> {
    pub key: Option<&'a FernetKey>,
    /// Runtime keys are kept in etcd (encrypted, or in plain text allowed).
    pub runtime_keys: bool,
}

impl Sealing<'_> {
    pub fn of(fleet: &Fleet) -> Sealing<'_> {
        Sealing {
            key: fleet.encryption_key.as_ref(),
            runtime_keys: fleet.encryption_key.is_some() || fleet.plaintext_runtime_keys,
        }
    }

    /// The value to write for a record's JSON.
    pub fn seal(&self, plain: &str, now_ms: u64, nonce: [u8; 16]) -> String {
        match self.key {
            Some(k) => format!("fernet:{}", k.encrypt(plain.as_bytes(), now_ms / 1000, nonce)),
            None => plain.to_string(),
        }
    }

    /// A record's JSON text from its value, or why it is refused.
    pub fn open(&self, value: &[u8]) -> Result<Vec<u8>, &'static str> {
        let text = std::str::from_utf8(value).map_err(|_| "it is not text")?;
        let plain = match (self.key, text.strip_prefix("fernet:")) {
            (Some(k), Some(token)) => {
                k.decrypt(token).map_err(|_| "it does not decrypt with APIKEYROUTER_ENCRYPTION_KEY")?
            }
            (Some(_), None) => return Err("it is not encrypted, and APIKEYROUTER_ENCRYPTION_KEY is set"),
            (None, Some(_)) => return Err("it is encrypted, and APIKEYROUTER_ENCRYPTION_KEY is not set"),
            (None, None) => text.as_bytes().to_vec(),
        };
        Ok(plain)
    }
}

/// 16 fresh random bytes (std's per-thread random SipHash keys, from the
/// host's random source: WASI `random_get`).
pub fn nonce() -> [u8; 16] {
    use std::hash::BuildHasher;
    let s = std::collections::hash_map::RandomState::new();
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&s.hash_one(1u8).to_le_bytes());
    out[8..].copy_from_slice(&s.hash_one(2u8).to_le_bytes());
    out
}

/// What a sync does with one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// Apply etcd's record here.
    Take,
    /// Write this instance's change to etcd.
    Push,
    /// Nothing: both agree, or neither has a change.
    Keep,
}

/// The merge rule: `local` and `remote` are each side's change time and
/// whether the two differ in content.
pub fn merge(local_at: Option<u64>, remote_at: Option<u64>, differ: bool) -> Merge {
    match (local_at, remote_at) {
        (Some(l), None) if l > 0 => Merge::Push,
        (_, None) => Merge::Keep,
        (None, Some(_)) => Merge::Take,
        (Some(l), Some(r)) if l > r => Merge::Push,
        (Some(_), Some(_)) if differ => Merge::Take,
        _ => Merge::Keep,
    }
}

// ---------------------------------------------------------------- runtime keys

/// A runtime key from its record, checked against what an admin could have
/// registered here: an id, a configured provider, printable material of at
/// most 4 KiB (none when deleted), a weight from 1 to 10000, metadata of at
/// most 4 KiB, a change time not ahead of `now_ms` by more than the skew.
pub fn key_from(json: &[u8], id: &str, cfg: &Config, now_ms: u64) -> Result<RuntimeKey, &'static str> {
    let k: RuntimeKey = serde_json::from_slice(json).map_err(|_| "it is not a runtime key record")?;
    if k.id != id {
        return Err("its id is not the one in its name");
    }
    if cfg.provider_by_id(&k.provider).is_none() {
        return Err("its provider is not configured here");
    }
    let printable = k.secret.bytes().all(|b| (0x21..0x7f).contains(&b));
    if k.deleted != k.secret.is_empty() || k.secret.len() > MAX_SECRET || !printable {
        return Err("its key material is not printable ASCII of at most 4 KiB");
    }
    if !(1..=MAX_WEIGHT).contains(&u64::from(k.weight)) {
        return Err("its weight is not from 1 to 10000");
    }
    if Value::Object(k.metadata.clone()).to_string().len() > MAX_METADATA {
        return Err("its metadata is larger than 4 KiB");
    }
    if k.at_ms == 0 || k.at_ms > now_ms.saturating_add(MAX_SKEW_MS) {
        return Err("its change time is zero or in the future");
    }
    Ok(k)
}

/// Whether two entries of one id say different things (change times aside).
fn differ(a: &RuntimeKey, b: &RuntimeKey) -> bool {
    a.deleted != b.deleted
        || (!a.deleted
            && (a.provider != b.provider || a.secret != b.secret || a.weight != b.weight || a.metadata != b.metadata))
}

/// A record read from etcd, as opened.
#[derive(Debug, Clone)]
pub enum Record {
    Key(RuntimeKey),
    Limit(Limit),
}

/// One record read from etcd, as opened at its revision.
#[derive(Debug, Clone)]
pub struct Seen {
    pub mod_revision: u64,
    pub record: Result<Record, &'static str>,
}

/// Records opened at earlier syncs, by etcd key: a record is decrypted and
/// checked once per revision, and a bad one reported once.
#[derive(Debug, Default)]
pub struct Opened(pub HashMap<String, Seen>);

/// A record refused at this sync (first seen at this revision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub key: String,
    pub revision: u64,
    pub why: &'static str,
}

/// Refused records this process has reported: a ring of 8-byte tags of
/// (etcd key, revision), after a version byte. Every root context that
/// syncs opens the records again; this keeps the report to one per process.
pub use crate::shared_data::FLEET_REPORTED as REPORTED_KEY;
const MAX_REPORTED: usize = 256;

/// Whether `r` is reported for the first time in this process (and notes
/// that it now is).
pub fn first_report(store: &dyn Store, r: &Refused) -> bool {
    let digest = crate::crypto::sha256(format!("{}\n{}", r.key, r.revision).as_bytes());
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&digest[..8]);
    let (res, _) = update(store, REPORTED_KEY, |cur| {
        let tags = cur.and_then(|b| b.get(1..)).unwrap_or(&[]);
        if tags.chunks_exact(8).any(|t| t == tag) {
            return Err(());
        }
        let keep = tags.len() / 8 + 1 - (tags.len() / 8 + 1).min(MAX_REPORTED);
        let mut out = Vec::with_capacity(1 + tags.len() + 8);
        out.push(1);
        out.extend(tags.chunks_exact(8).skip(keep).flatten());
        out.extend_from_slice(&tag);
        Ok(((), out))
    });
    res.is_ok()
}

impl Opened {
    /// Opens `kv` unless it was opened at this revision; a refusal is
    /// reported in `refused` the first time only.
    fn open(
        &mut self,
        kv: &Kv,
        refused: &mut Vec<Refused>,
        open: impl FnOnce(&[u8]) -> Result<Record, &'static str>,
    ) -> Option<&Record> {
        if self.0.get(&kv.key).is_none_or(|s| s.mod_revision != kv.mod_revision) {
            let record = open(&kv.value);
            if let Err(why) = record {
                refused.push(Refused { key: kv.key.clone(), revision: kv.mod_revision, why });
            }
            self.0.insert(kv.key.clone(), Seen { mod_revision: kv.mod_revision, record });
        }
        self.get(&kv.key)
    }

    fn get(&self, key: &str) -> Option<&Record> {
        self.0.get(key).and_then(|s| s.record.as_ref().ok())
    }
}

/// What one sync does about runtime keys and limits.
#[derive(Debug, Default)]
pub struct Plan {
    /// Registrations and deletions to apply here.
    pub keys: Vec<RuntimeKey>,
    /// Limit overrides to apply here.
    pub limits: Vec<Limit>,
    /// This instance's changes to write, each guarded by the revision read.
    pub writes: Vec<Op>,
    pub refused: Vec<Refused>,
}

/// Plans the sync of the runtime keys and limit overrides against a range
/// read of etcd. `limits` are this process's overrides, one per budget of
/// `cfg` in order ([`local_limit`]).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    prefix: &str,
    sealing: Sealing<'_>,
    cfg: &Config,
    registry: &Registry,
    limits: &[Option<Limit>],
    etcd: &EtcdView,
    cache: &mut Opened,
    now_ms: u64,
) -> Plan {
    let mut p = Plan::default();
    if sealing.runtime_keys {
        let head = format!("{prefix}/k/");
        for kv in etcd.under(&head) {
            let Some(id) = kv.key.strip_prefix(&head) else { continue };
            cache.open(kv, &mut p.refused, |value| key_from(&sealing.open(value)?, id, cfg, now_ms).map(Record::Key));
        }
        // Each id once: the newest local entry of each, then the ids only
        // etcd has.
        // (At most MAX_RUNTIME_KEYS entries: quadratic is cheap enough.)
        let newest =
            registry.keys.iter().enumerate().filter(|(i, k)| !registry.keys.iter().skip(i + 1).any(|l| l.id == k.id));
        let only_remote =
            etcd.under(&head).filter_map(|kv| kv.key.strip_prefix(&head)).filter(|id| registry.latest(id).is_none());
        let ids: Vec<(&str, Option<&RuntimeKey>)> =
            newest.map(|(_, k)| (k.id.as_str(), Some(k))).chain(only_remote.map(|id| (id, None))).collect();
        for (id, local) in ids {
            let kv = etcd.get(&key_record(prefix, id));
            let theirs = match kv.and_then(|kv| cache.get(&kv.key)) {
                Some(Record::Key(k)) => Some(k),
                _ => None,
            };
            let d = matches!((local, theirs), (Some(a), Some(b)) if differ(a, b));
            match merge(local.map(|k| k.at_ms), theirs.map(|k| k.at_ms), d) {
                // A deletion of a key this instance never had changes nothing.
                Merge::Take if local.is_none() && theirs.is_some_and(|k| k.deleted) => {}
                Merge::Take => p.keys.extend(theirs.cloned()),
                // A deletion of a key etcd never had tells nobody anything.
                Merge::Push if local.is_some_and(|k| k.deleted) && kv.is_none() => {}
                Merge::Push => {
                    if let Some(k) = local {
                        let plain = serde_json::to_string(k).unwrap_or_default();
                        let value = sealing.seal(&plain, now_ms, nonce());
                        p.writes.push(Op::Put { key: key_record(prefix, id), value, guard: Some(Guard::of(kv)) });
                    }
                }
                Merge::Keep => {}
            }
        }
    }
    for (i, b) in cfg.budgets.iter().enumerate() {
        let name = limit_record(prefix, &b.id);
        let kv = etcd.get(&name);
        let opened = kv.and_then(|kv| {
            cache.open(kv, &mut p.refused, |value| Limit::from(&sealing.open(value)?, b, now_ms).map(Record::Limit))
        });
        let theirs = match opened {
            Some(Record::Limit(l)) => Some(l),
            _ => None,
        };
        let mine = limits.get(i).and_then(Option::as_ref);
        let d = matches!((mine, theirs), (Some(a), Some(b)) if a.limit != b.limit);
        match merge(mine.map(|l| l.at_ms), theirs.map(|l| l.at_ms), d) {
            Merge::Take => p.limits.extend(theirs.cloned()),
            Merge::Push => {
                if let Some(l) = mine {
                    let value = sealing.seal(&l.to_json(), now_ms, nonce());
                    p.writes.push(Op::Put { key: name, value, guard: Some(Guard::of(kv)) });
                }
            }
            Merge::Keep => {}
        }
    }
    cache.0.retain(|key, _| etcd.get(key).is_some());
    p
}

// ---------------------------------------------------------------- limits

/// A budget's limit override as the admin last set it: `None` is the
/// configured limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub budget: String,
    pub limit: Option<Decimal>,
    pub at_ms: u64,
}

impl Limit {
    /// A limit from its record: for budget `b`, a positive decimal of at most
    /// 10^15 or null, a change time not ahead by more than the skew.
    pub fn from(json: &[u8], b: &Budget, now_ms: u64) -> Result<Limit, &'static str> {
        let v: Value = serde_json::from_slice(json).map_err(|_| "it is not a JSON record")?;
        if v.get("budget").and_then(Value::as_str) != Some(b.id.as_str()) {
            return Err("its budget is not the one in its name");
        }
        let limit = match v.get("limit") {
            Some(Value::Null) => None,
            Some(Value::String(s)) => match Decimal::from_str(s) {
                Ok(d) if d > Decimal::ZERO && d <= Decimal::from(MAX_COUNT) => Some(d),
                _ => return Err("its limit is not a positive decimal of at most 10^15"),
            },
            _ => return Err("its limit is not a decimal string or null"),
        };
        let at_ms = v.get("at_ms").and_then(Value::as_u64).unwrap_or(0);
        if at_ms == 0 || at_ms > now_ms.saturating_add(MAX_SKEW_MS) {
            return Err("its change time is zero or in the future");
        }
        Ok(Limit { budget: b.id.clone(), limit, at_ms })
    }

    pub fn to_json(&self) -> String {
        // A decimal's text needs no escaping; the id goes through Value's.
        let limit = self.limit.map_or("null".to_string(), |d| format!("\"{}\"", d.normalize()));
        format!(r#"{{"budget":{},"limit":{limit},"at_ms":{}}}"#, Value::from(self.budget.as_str()), self.at_ms)
    }
}

impl Limit {
    /// As kept in shared data: whether it is set, the limit, the time.
    fn encode(&self) -> Vec<u8> {
        let mut out = crate::codec::Writer::with_capacity(25);
        out.u8(u8::from(self.limit.is_some())).decimal(self.limit.unwrap_or_default()).u64(self.at_ms);
        out.finish()
    }

    fn decode(budget: &str, b: &[u8]) -> Option<Limit> {
        let mut r = crate::codec::Reader::new(b);
        let (set, limit, at_ms) = (r.u8()?, r.decimal()?, r.u64()?);
        Some(Limit { budget: budget.to_string(), limit: (set == 1).then_some(limit), at_ms })
    }
}

/// The shared-data name of a budget's limit override and its time.
pub fn local_name(budget: &str) -> String {
    format!("{LIMITS_KEY}.{budget}")
}

/// The limit override last set on this process for `budget`, with its time.
pub fn local_limit(store: &dyn Store, budget: &str) -> Option<Limit> {
    Limit::decode(budget, &store.value(&local_name(budget))?)
}

/// Records an admin's limit change at `at_ms` for the fleet sync: later than
/// the budget's last change, even with the same clock reading. Returns false
/// when shared data refused the write.
pub fn note_limit(store: &dyn Store, budget: &str, limit: Option<Decimal>, at_ms: u64) -> bool {
    write_limit(store, Limit { budget: budget.to_string(), limit, at_ms }, true)
}

/// Records a limit change taken from etcd, with etcd's change time.
pub fn adopt_limit(store: &dyn Store, taken: &Limit) -> bool {
    write_limit(store, taken.clone(), false)
}

fn write_limit(store: &dyn Store, mut l: Limit, later: bool) -> bool {
    let (r, _) = update(store, &local_name(&l.budget), |cur| {
        if later {
            let old = cur.and_then(|b| Limit::decode(&l.budget, b)).map_or(0, |o| o.at_ms.saturating_add(1));
            l.at_ms = l.at_ms.max(old);
        }
        Ok::<_, ()>(((), l.encode()))
    });
    r.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Kv;
    use crate::store::FakeStore;
    use serde_json::json;

    const KEY: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
    const NOW: u64 = 1_800_000_000_000;

    fn cfg() -> Config {
        let json = r#"{"providers":[{"id":"openai","keys":[{"id":"k1","secret":"sk-one"}]}],
            "budgets":[{"id":"daily","limit":"10","window":"day"}]}"#;
        crate::config::compile(json.as_bytes(), &|_| None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn fernet() -> FernetKey {
        FernetKey::parse(KEY).unwrap_or_else(|e| panic!("{e}"))
    }

    fn rk(id: &str, secret: &str, at_ms: u64) -> RuntimeKey {
        RuntimeKey {
            id: id.into(),
            provider: "openai".into(),
            secret: secret.into(),
            weight: 1,
            metadata: serde_json::Map::new(),
            deleted: secret.is_empty(),
            at_ms,
        }
    }

    fn view(kvs: &[(&str, &str, u64)]) -> EtcdView {
        EtcdView::new(
            kvs.iter()
                .map(|(k, v, r)| Kv { key: k.to_string(), value: v.as_bytes().to_vec(), mod_revision: *r })
                .collect(),
        )
    }

    /// The value a write puts, and its guard.
    fn put(op: &Op) -> (&str, &str, Option<Guard>) {
        match op {
            Op::Put { key, value, guard } => (key.as_str(), value.as_str(), *guard),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_newer_change_wins_and_a_tie_goes_to_etcd() {
        assert_eq!(merge(None, None, false), Merge::Keep);
        assert_eq!(merge(Some(5), None, false), Merge::Push, "etcd lacks it");
        assert_eq!(merge(Some(0), None, false), Merge::Keep, "made before fleet mode kept it");
        assert_eq!(merge(None, Some(5), false), Merge::Take, "a restart finds it");
        assert_eq!(merge(Some(6), Some(5), true), Merge::Push);
        assert_eq!(merge(Some(5), Some(6), true), Merge::Take);
        assert_eq!(merge(Some(5), Some(5), true), Merge::Take, "a tie: whoever wrote etcd first");
        assert_eq!(merge(Some(5), Some(6), false), Merge::Keep, "same content");
    }

    #[test]
    fn sealed_records_hold_no_material_and_open_only_under_the_key() {
        let key = fernet();
        let sealing = Sealing { key: Some(&key), runtime_keys: true };
        let plain = serde_json::to_string(&rk("r1", "sk-runtime-secret", NOW)).unwrap_or_default();
        let sealed = sealing.seal(&plain, NOW, nonce());
        assert!(sealed.starts_with("fernet:gAAAA") && !sealed.contains("sk-runtime"), "{sealed}");
        let opened = sealing.open(sealed.as_bytes()).and_then(|v| key_from(&v, "r1", &cfg(), NOW));
        assert_eq!(opened.map(|k| k.secret), Ok("sk-runtime-secret".to_string()));
        assert_eq!(
            sealing.open(plain.as_bytes()).err(),
            Some("it is not encrypted, and APIKEYROUTER_ENCRYPTION_KEY is set")
        );
        let other = FernetKey::parse("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap_or_else(|e| panic!("{e}"));
        let forged = Sealing { key: Some(&other), runtime_keys: true }.seal(&plain, NOW, nonce());
        assert_eq!(sealing.open(forged.as_bytes()).err(), Some("it does not decrypt with APIKEYROUTER_ENCRYPTION_KEY"));
        let unsealed = Sealing { key: None, runtime_keys: true };
        assert_eq!(
            unsealed.open(sealed.as_bytes()).err(),
            Some("it is encrypted, and APIKEYROUTER_ENCRYPTION_KEY is not set")
        );
        assert_eq!(unsealed.seal(&plain, NOW, nonce()), plain);
        assert_eq!(unsealed.open(b"\xff\xfe").err(), Some("it is not text"));
    }

    #[test]
    fn key_records_outside_what_an_admin_could_register_are_refused() {
        let c = cfg();
        let ok = serde_json::to_value(rk("r1", "sk-x", NOW)).unwrap_or_default();
        let text = |v: &Value| v.to_string().into_bytes();
        assert!(key_from(&text(&ok), "r1", &c, NOW).is_ok());
        assert_eq!(key_from(&text(&ok), "r2", &c, NOW).err(), Some("its id is not the one in its name"));
        let with = |f: &str, v: Value| {
            let mut o = ok.clone();
            o[f] = v;
            key_from(&text(&o), "r1", &c, NOW).err()
        };
        assert_eq!(with("provider", json!("nope")), Some("its provider is not configured here"));
        assert_eq!(
            with("secret", json!("has space")),
            Some("its key material is not printable ASCII of at most 4 KiB")
        );
        assert_eq!(
            with("secret", json!("x".repeat(4097))),
            Some("its key material is not printable ASCII of at most 4 KiB")
        );
        assert_eq!(with("deleted", json!(true)), Some("its key material is not printable ASCII of at most 4 KiB"));
        assert_eq!(with("weight", json!(0)), Some("its weight is not from 1 to 10000"));
        assert_eq!(with("weight", json!(-1)), Some("it is not a runtime key record"));
        assert_eq!(with("metadata", json!({"a": "x".repeat(5000)})), Some("its metadata is larger than 4 KiB"));
        assert_eq!(with("at_ms", json!(NOW + MAX_SKEW_MS + 1)), Some("its change time is zero or in the future"));
        assert_eq!(key_from(b"[1]", "r1", &c, NOW).err(), Some("it is not a runtime key record"));
        let tombstone = serde_json::to_vec(&rk("r1", "", NOW)).unwrap_or_default();
        assert!(key_from(&tombstone, "r1", &c, NOW).is_ok_and(|k| k.deleted));
    }

    #[test]
    fn local_changes_are_pushed_guarded_and_newer_etcd_records_are_taken() {
        let c = cfg();
        let key = fernet();
        let sealing = Sealing { key: Some(&key), runtime_keys: true };
        let reg = Registry { version: 2, keys: vec![rk("mine", "sk-mine", NOW), rk("gone", "", NOW)] };
        let seal = |k: &RuntimeKey| sealing.seal(&serde_json::to_string(k).unwrap_or_default(), NOW, nonce());
        let theirs = seal(&rk("theirs", "sk-theirs", NOW - 5));
        let old_gone = seal(&rk("gone", "sk-gone", NOW - 9));
        let etcd = view(&[("/p/k/theirs", &theirs, 7), ("/p/k/gone", &old_gone, 8)]);
        let mut cache = Opened::default();
        let p = plan("/p", sealing, &c, &reg, &[], &etcd, &mut cache, NOW);
        assert_eq!(p.keys, vec![rk("theirs", "sk-theirs", NOW - 5)], "taken");
        let mut writes: Vec<_> = p.writes.iter().map(put).collect();
        writes.sort_by_key(|w| w.0);
        assert_eq!(
            writes.iter().map(|w| (w.0, w.2)).collect::<Vec<_>>(),
            vec![("/p/k/gone", Some(Guard::Revision(8))), ("/p/k/mine", Some(Guard::Absent)),]
        );
        let written = sealing.open(writes[0].1.as_bytes()).and_then(|v| key_from(&v, "gone", &c, NOW));
        assert_eq!(written, Ok(rk("gone", "", NOW)), "the deletion, which etcd had not seen");
        assert!(p.refused.is_empty());
        // A deletion etcd never had the key of is not written, and one this
        // instance never had the key of is not taken.
        let reg = Registry { version: 1, keys: vec![rk("never", "", NOW)] };
        let p = plan("/p", sealing, &c, &reg, &[], &view(&[]), &mut Opened::default(), NOW);
        assert!(p.writes.is_empty() && p.keys.is_empty());
        let tomb = seal(&rk("other", "", NOW));
        let p = plan("/p", sealing, &c, &reg, &[], &view(&[("/p/k/other", &tomb, 3)]), &mut Opened::default(), NOW);
        assert!(p.writes.is_empty() && p.keys.is_empty());
    }

    #[test]
    fn a_bad_record_is_refused_once_per_revision_and_skipped() {
        let c = cfg();
        let key = fernet();
        let sealing = Sealing { key: Some(&key), runtime_keys: true };
        let mut cache = Opened::default();
        let reg = Registry::default();
        let etcd = view(&[("/p/k/evil", r#"{"id":"evil","secret":"sk-attacker"}"#, 3), ("/p/l/daily", "garbage", 4)]);
        let p = plan("/p", sealing, &c, &reg, &[], &etcd, &mut cache, NOW);
        assert!(p.keys.is_empty() && p.limits.is_empty() && p.writes.is_empty());
        let why: Vec<&str> = p.refused.iter().map(|r| r.why).collect();
        assert_eq!(p.refused.len(), 2, "{why:?}");
        let again = plan("/p", sealing, &c, &reg, &[], &etcd, &mut cache, NOW);
        assert!(again.refused.is_empty(), "reported once");
        let moved = view(&[("/p/k/evil", "still bad", 9)]);
        assert_eq!(plan("/p", sealing, &c, &reg, &[], &moved, &mut cache, NOW).refused.len(), 1);
        // Without an encryption key and without plaintext allowed, runtime
        // keys are not read at all.
        let off = Sealing { key: None, runtime_keys: false };
        let plain = serde_json::to_string(&rk("r1", "sk-x", NOW)).unwrap_or_default();
        let p = plan("/p", off, &c, &reg, &[], &view(&[("/p/k/r1", &plain, 1)]), &mut cache, NOW);
        assert!(p.keys.is_empty() && p.refused.is_empty());
        let on = Sealing { key: None, runtime_keys: true };
        let p = plan("/p", on, &c, &reg, &[], &view(&[("/p/k/r1", &plain, 1)]), &mut cache, NOW);
        assert_eq!(p.keys.len(), 1, "plaintext allowed");
    }

    #[test]
    fn limits_round_trip_and_the_newer_override_wins() {
        let c = cfg();
        let s = FakeStore::new();
        assert!(note_limit(&s, "daily", Some(Decimal::new(35, 1)), NOW));
        assert!(note_limit(&s, "daily", None, NOW), "same clock reading");
        let mine = [local_limit(&s, "daily")];
        assert_eq!(mine[0], Some(Limit { budget: "daily".into(), limit: None, at_ms: NOW + 1 }));
        let tie = Limit { budget: "daily".into(), limit: Some(Decimal::ONE), at_ms: NOW + 1 };
        let t = FakeStore::new();
        assert!(note_limit(&t, "daily", None, NOW + 1) && adopt_limit(&t, &tie));
        let _ = t.set(&local_name("seeded"), &[0], None);
        assert_eq!(local_limit(&t, "seeded"), None, "seeded: no change yet");
        assert_eq!(local_limit(&t, "daily"), Some(tie), "taken from etcd: its time exactly");
        assert_eq!(local_limit(&t, "other"), None);
        let sealing = Sealing { key: None, runtime_keys: false };
        let p = plan("/p", sealing, &c, &Registry::default(), &mine, &view(&[]), &mut Opened::default(), NOW);
        let (key, value, guard) = put(&p.writes[0]);
        assert_eq!((key, guard), ("/p/l/daily", Some(Guard::Absent)));
        let theirs = Limit { budget: "daily".into(), limit: Some(Decimal::new(7, 0)), at_ms: NOW + 2 };
        assert_eq!(Limit::from(value.as_bytes(), &c.budgets[0], NOW).map(|l| l.limit), Ok(None));
        let etcd = view(&[("/p/l/daily", &theirs.to_json(), 5)]);
        let p = plan("/p", sealing, &c, &Registry::default(), &mine, &etcd, &mut Opened::default(), NOW);
        assert_eq!((p.limits, p.writes.len()), (vec![theirs.clone()], 0), "newer: taken");
        for bad in [
            r#"{"budget":"other","limit":"1","at_ms":5}"#,
            r#"{"budget":"daily","limit":"-1","at_ms":5}"#,
            r#"{"budget":"daily","limit":"1e30","at_ms":5}"#,
            r#"{"budget":"daily","limit":1,"at_ms":5}"#,
            r#"{"budget":"daily","limit":"1","at_ms":99999999999999}"#,
        ] {
            assert!(Limit::from(bad.as_bytes(), &c.budgets[0], NOW).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_refused_record_is_reported_once_per_process_and_revision() {
        let s = FakeStore::new();
        let r = |key: &str, revision| Refused { key: key.into(), revision, why: "x" };
        assert!(first_report(&s, &r("/p/k/a", 1)));
        assert!(!first_report(&s, &r("/p/k/a", 1)), "another root context opened it again");
        assert!(first_report(&s, &r("/p/k/a", 2)), "a new revision");
        for i in 0..MAX_REPORTED as u64 {
            assert!(first_report(&s, &r("/p/k/b", i)));
        }
        assert_eq!(s.value(REPORTED_KEY).map(|b| b.len()), Some(1 + 8 * MAX_REPORTED), "a bounded ring");
        assert!(first_report(&s, &r("/p/k/a", 1)), "the oldest tags make room");
    }

    fn admin(fleet: &str, env_key: bool, method: &'static str, path: &'static str, body: &[u8]) -> Value {
        let json = format!(
            r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}}]}}],
                "admin":{{"token_env":"ADMIN"}}{fleet}}}"#
        );
        let env = |n: &str| match n {
            "ADMIN" => Some("an-admin-token-of-some-length".to_string()),
            crate::config::ENCRYPTION_KEY_ENV if env_key => Some(KEY.to_string()),
            _ => None,
        };
        let c = crate::config::compile(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"));
        let req = crate::admin::AdminRequest {
            method,
            path,
            authorization: Some("Bearer an-admin-token-of-some-length"),
            x_api_key: None,
            body,
        };
        let r = crate::admin::handle(&c, &FakeStore::new(), &req, NOW);
        let mut v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
        v["status"] = json!(r.status);
        v
    }

    #[test]
    fn admin_answers_say_where_a_change_is_kept_and_fleet_mode_keeps_no_plaintext_key_unasked() {
        let post: &[u8] = br#"{"id":"r1","key_material":"sk-runtime"}"#;
        let fleet = r#","fleet":{"etcd_cluster":"etcd","instance":"gw"}"#;
        let plain = r#","fleet":{"etcd_cluster":"etcd","instance":"gw","plaintext_runtime_keys":true}"#;
        let local = admin("", false, "POST", "/apikeyrouter/v1/keys", post);
        assert_eq!(local["status"], 201);
        assert_eq!(local["persistence"], "local: this Envoy process only, lost when it restarts");
        let refused = admin(fleet, false, "POST", "/apikeyrouter/v1/keys", post);
        assert_eq!(
            (refused["status"].clone(), refused["error"]["code"].clone()),
            (json!(409), json!("runtime_keys_not_durable"))
        );
        for (f, key) in [(fleet, true), (plain, false)] {
            let kept = admin(f, key, "POST", "/apikeyrouter/v1/keys", post);
            assert_eq!(kept["status"], 201, "{kept}");
            assert_eq!(kept["persistence"], "pending: written to etcd by the next fleet sync");
        }
        let patched = admin(fleet, false, "PATCH", "/apikeyrouter/v1/keys/k1", br#"{"state":"disabled"}"#);
        assert_eq!(
            (patched["status"].clone(), patched["persistence"].clone()),
            (json!(200), json!("pending: written to etcd by the next fleet sync"))
        );
    }
}
