//! Fleet mode: budgets, token quotas and key states shared by several Envoy
//! processes through etcd's HTTP/JSON gateway.
//!
//! Shared data is per process. In fleet mode one root context per process
//! (the holder of a lease in shared data, [`claim_lease`]) syncs with etcd
//! every `sync_interval_ms`: it reads everything under the prefix with one
//! range request, merges it into shared data, and writes what this process
//! has that etcd lacks in a few transactions (its counters, key states,
//! removals of ended markers). Everything here is pure: the host sends the
//! bodies built here and hands back the answers.
//!
//! # Counters: spend and tokens
//!
//! A counter (a budget's spend, a key's daily or monthly tokens) has one
//! marker per instance, `<prefix>/m/<instance>/<name>`, written only by that
//! instance: `{"w": window start, "until": window end, "v": "<decimal>",
//! "life": <process nonce>, "base": "<decimal>"}`. `v` is everything the
//! instance counted in the window: `base` (what its earlier lives, before a
//! restart, counted) plus this process's own count. A write is a plain put of
//! absolute values, so a lost answer or a repeated write changes nothing, and
//! no two instances ever write the same key. What the others counted is the
//! sum of the other instances' markers for the same window, plus `base`;
//! budgets and quotas add it to this process's count. Markers of windows that
//! ended are deleted by whichever instance sees them first.
//!
//! # Key states
//!
//! `<prefix>/s/<key>` holds a key's shared state: its cooldown deadline and
//! its state (available, disabled, exhausted) with the time it last changed,
//! written with a compare on its revision. The newer state change wins;
//! cooldowns merge to the longer one, except that a newer admin "available"
//! clears them.
//!
//! # What is taken from etcd
//!
//! Whoever can write under the prefix could otherwise take keys offline for
//! good or freeze every budget, so every value read is checked against what
//! an instance could have written ([`MAX_SKEW_MS`], [`SharedState::out_of_bounds`],
//! [`Marker::out_of_bounds`]); one outside is dropped (it counts for nothing)
//! and reported as [`Dropped`], and removed from etcd unless this sync
//! overwrites it. etcd's own authentication is [`auth_body`] and
//! [`parse_auth`]: the token it answers goes in the `authorization` header of
//! every later call.
//!
//! # Without etcd
//!
//! When no sync succeeded for `degraded_after_ms` (and before the first sync),
//! the instance keeps serving, each budget limited to `local_share` of its
//! limit for this instance's own spend, on top of the fleet-wide check with
//! the last known totals. Spend keeps accumulating locally and is written when
//! etcd answers again.

use crate::codec::{Reader, Writer};
use crate::encoding::{base64_decode, base64_encode};
use crate::key_record::{KeyRecord, KeyState, Reason};
use hashbrown::HashMap;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use std::fmt;
use std::str::FromStr;

// The sync lease (one syncing context per process), the sync status (JSON,
// [`Status`]) and the counter bases (JSON, [`Bases`], `.<instance>` follows).
pub use crate::shared_data::{FLEET_BASES as BASES_KEY, FLEET_LEASE as LEASE_KEY, FLEET_STATUS as STATUS_KEY};

// ---------------------------------------------------------------- the lease

/// A root context that may hold the sync lease: a random id, and its epoch
/// (a per-process counter bumped by every root context that starts). The
/// newest root context takes the lease over, so that after a config reload
/// the new configuration syncs while the old root contexts drain; once every
/// root context has started, the newest keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub id: u64,
    pub epoch: u64,
}

/// The lease as stored: holder id, held until, holder epoch.
pub fn lease_of(current: Option<&[u8]>) -> Option<(u64, u64, u64)> {
    let mut r = Reader::new(current?);
    Some((r.u64()?, r.u64()?, r.u64()?))
}

/// Whether `me` may sync now; if so, the lease value to write (with the
/// cas of `current`): held until `now_ms + ttl_ms`.
pub fn claim_lease(current: Option<&[u8]>, me: Holder, now_ms: u64, ttl_ms: u64) -> Option<Vec<u8>> {
    if let Some((owner, until, epoch)) = lease_of(current) {
        if owner != me.id && until > now_ms && me.epoch <= epoch {
            return None;
        }
    }
    let mut out = Writer::with_capacity(24);
    out.u64(me.id).u64(now_ms.saturating_add(ttl_ms)).u64(me.epoch);
    Some(out.finish())
}

// ---------------------------------------------------------------- etcd JSON

/// An answer from etcd that is not what was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdError(pub String);

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One key-value pair of a range answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: u64,
}

/// The body of `/v3/auth/authenticate`: etcd answers a token for the user.
pub fn auth_body(username: &str, password: &str) -> String {
    json!({"name": username, "password": password}).to_string()
}

/// The token of an `/v3/auth/authenticate` answer. It goes into a header, so
/// anything but visible ASCII is refused.
pub fn parse_auth(body: &[u8]) -> Result<String, EtcdError> {
    let v = answer(body)?;
    match v.get("token").and_then(Value::as_str) {
        Some(t) if !t.is_empty() && t.len() <= 4096 && t.bytes().all(|b| (0x21..0x7f).contains(&b)) => {
            Ok(t.to_string())
        }
        _ => Err(EtcdError("etcd's authenticate answer holds no usable token".into())),
    }
}

/// The body of a range request for every key under `prefix/`.
/// The sync's range: everything under the prefix but the object records
/// (`<prefix>/~o/`, which sort last and are read on their own, see
/// [`objects_range_body`]) and the alert claims (`<prefix>/~a/`, see
/// `crate::alerts::claim`).
pub fn range_body(prefix: &str) -> String {
    json!({"key": base64_encode(format!("{prefix}/").as_bytes()),
           "range_end": base64_encode(format!("{prefix}/~").as_bytes())})
    .to_string()
}

/// The object records' range: those changed after revision `after` (every
/// one with 0). range_end is the head with its last byte plus one: '/' + 1
/// = '0'.
pub fn objects_range_body(prefix: &str, after: u64) -> String {
    let head = crate::objects::fleet_head(prefix);
    let end = format!("{}0", head.trim_end_matches('/'));
    let mut v = json!({"key": base64_encode(head.as_bytes()), "range_end": base64_encode(end.as_bytes())});
    if after > 0 {
        v["min_mod_revision"] = json!(after.saturating_add(1).to_string());
    }
    v.to_string()
}

/// 64-bit numbers arrive as JSON strings (proto3 JSON); absent means zero.
fn u64_field(v: &Value, name: &str) -> Result<u64, EtcdError> {
    match v.get(name) {
        None => Ok(0),
        Some(Value::String(s)) => s.parse().map_err(|_| EtcdError(format!("{name} is not a number: {s:?}"))),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| EtcdError(format!("{name} is not a count: {n}"))),
        Some(other) => Err(EtcdError(format!("{name} is not a number: {other}"))),
    }
}

fn bytes_field(v: &Value, name: &str) -> Result<Vec<u8>, EtcdError> {
    match v.get(name) {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => base64_decode(s).ok_or_else(|| EtcdError(format!("{name} is not base64"))),
        Some(other) => Err(EtcdError(format!("{name} is not a base64 string: {other}"))),
    }
}

fn answer(body: &[u8]) -> Result<Value, EtcdError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| EtcdError(format!("not JSON: {e}")))?;
    if v.get("header").is_none() {
        let msg = v.get("message").or_else(|| v.get("error")).and_then(Value::as_str).unwrap_or("no header");
        return Err(EtcdError(format!("not an etcd answer: {msg}")));
    }
    Ok(v)
}

/// The pairs of a range answer (`kvs` is omitted when there are none).
pub fn parse_range(body: &[u8]) -> Result<Vec<Kv>, EtcdError> {
    let v = answer(body)?;
    let Some(kvs) = v.get("kvs") else { return Ok(Vec::new()) };
    let kvs = kvs.as_array().ok_or_else(|| EtcdError("kvs is not an array".into()))?;
    kvs.iter()
        .map(|kv| {
            let key = String::from_utf8(bytes_field(kv, "key")?).map_err(|_| EtcdError("a key is not UTF-8".into()))?;
            Ok(Kv { key, value: bytes_field(kv, "value")?, mod_revision: u64_field(kv, "mod_revision")? })
        })
        .collect()
}

/// What a write expects of its key: not to exist yet, or to be unchanged
/// since it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    Absent,
    Revision(u64),
}

impl Guard {
    pub fn of(kv: Option<&Kv>) -> Guard {
        kv.map_or(Guard::Absent, |kv| Guard::Revision(kv.mod_revision))
    }
}

/// The body of a transaction that applies every op if every guard holds.
pub fn txn_body(ops: &[Op]) -> String {
    let mut compare = Vec::new();
    let mut success = Vec::new();
    for op in ops {
        let (key, guard) = match op {
            Op::Put { key, value, guard } => {
                let k = base64_encode(key.as_bytes());
                success.push(json!({"requestPut": {"key": k, "value": base64_encode(value.as_bytes())}}));
                (k, *guard)
            }
            Op::Delete { key, guard } => {
                let k = base64_encode(key.as_bytes());
                success.push(json!({"requestDeleteRange": {"key": k}}));
                (k, Some(*guard))
            }
        };
        match guard {
            None => {}
            Some(Guard::Absent) => {
                compare.push(json!({"key": key, "target": "VERSION", "result": "EQUAL", "version": "0"}))
            }
            Some(Guard::Revision(r)) => {
                compare.push(json!({"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": r.to_string()}))
            }
        }
    }
    json!({"compare": compare, "success": success}).to_string()
}

/// An alert claim (`crate::alerts::claim_key`): creates `key` holding
/// `value` if it has never existed (create revision 0), and with it deletes
/// the keys from `stale_from` (inclusive) to `stale_to` (exclusive), the same
/// budget's claims of earlier windows. `key` sorts at or after `stale_to`, so
/// etcd sees no put inside the deleted range. When the key exists, the
/// answer holds it ([`parse_claim`]).
pub fn claim_body(key: &str, value: &str, stale_from: &str, stale_to: &str) -> String {
    let k = base64_encode(key.as_bytes());
    json!({"compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
           "success": [{"requestPut": {"key": k, "value": base64_encode(value.as_bytes())}},
                       {"requestDeleteRange": {"key": base64_encode(stale_from.as_bytes()),
                                               "range_end": base64_encode(stale_to.as_bytes())}}],
           "failure": [{"requestRange": {"key": k}}]})
    .to_string()
}

/// The answer to [`claim_body`]: `None` when the key was created, else the
/// `instance` its value names (empty when it names none).
pub fn parse_claim(body: &[u8]) -> Result<Option<String>, EtcdError> {
    let v = answer(body)?;
    if v.get("succeeded").and_then(Value::as_bool).unwrap_or(false) {
        return Ok(None);
    }
    let first = |v: Option<&Value>| v.and_then(|a| a.get(0)).cloned().unwrap_or_default();
    let kv = first(first(v.get("responses")).get("response_range").and_then(|r| r.get("kvs")));
    let value: Value = serde_json::from_slice(&bytes_field(&kv, "value")?).unwrap_or_default();
    Ok(Some(value.get("instance").and_then(Value::as_str).unwrap_or_default().to_string()))
}

/// Whether a transaction's compares held. A failed compare is *not*
/// `"succeeded": false`: proto3 JSON omits false fields.
pub fn parse_txn(body: &[u8]) -> Result<bool, EtcdError> {
    Ok(answer(body)?.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
}

/// Everything one range read returned, by key.
#[derive(Debug, Default)]
pub struct EtcdView {
    by_key: HashMap<String, Kv>,
}

impl EtcdView {
    pub fn new(kvs: Vec<Kv>) -> EtcdView {
        EtcdView { by_key: kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect() }
    }

    pub fn get(&self, key: &str) -> Option<&Kv> {
        self.by_key.get(key)
    }

    /// The pairs whose key starts with `head`.
    pub fn under<'a>(&'a self, head: &'a str) -> impl Iterator<Item = &'a Kv> + 'a {
        self.by_key.values().filter(move |kv| kv.key.starts_with(head))
    }
}

// ---------------------------------------------------------------- counters

/// Counts above this (a thousand trillion) in etcd are refused as damaged:
/// sums of them cannot overflow a decimal.
pub const MAX_COUNT: i64 = 1_000_000_000_000_000;

/// How far ahead of this instance's clock another instance's may run: a time
/// from etcd later than now plus this is refused.
pub const MAX_SKEW_MS: u64 = 60_000;

/// The longest counting window (a month), for the end of a marker's window.
const MAX_WINDOW_MS: u64 = 31 * 86_400_000;

/// A marker may count at most this many times its counter's limit (a
/// budget's limit, the larger of the configured and the current one; a
/// key's token quota).
pub const MARKER_LIMIT_MULTIPLE: i64 = 10;

/// A value read from etcd and dropped for being outside its bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub key: String,
    pub why: &'static str,
}

/// Writes per transaction (etcd refuses more than 128 by default); the rest
/// wait for the next sync.
pub const MAX_OPS: usize = 100;

/// A local counter for the current window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// `b/<budget id>`, `q/<key id>/day` or `q/<key id>/month`.
    pub name: String,
    pub window: u64,
    /// When the window ends (`u64::MAX` for totals).
    pub until: u64,
    /// This process's own count in the window.
    pub local: Decimal,
    /// The most any instance's marker of it may count:
    /// [`MARKER_LIMIT_MULTIPLE`] times its limit.
    pub bound: Decimal,
}

/// One instance's count of one counter, as kept in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    pub window: u64,
    pub until: u64,
    pub value: Decimal,
    pub life: u64,
    pub base: Decimal,
}

fn count(v: &Value, name: &str) -> Option<Decimal> {
    let d = Decimal::from_str(v.get(name)?.as_str()?).ok()?;
    (d >= Decimal::ZERO && d <= Decimal::from(MAX_COUNT)).then_some(d)
}

impl Marker {
    /// A marker, or `None` for anything else (damaged, negative, huge).
    pub fn parse(b: &[u8]) -> Option<Marker> {
        let v: Value = serde_json::from_slice(b).ok()?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        let (value, base) = (count(&v, "v")?, count(&v, "base")?);
        (base <= value).then_some(Marker { window: n("w")?, until: n("until")?, value, life: n("life")?, base })
    }

    /// Why this marker is outside what an instance could have written at
    /// `now_ms`, if it is: a window that starts or ends too far ahead, or a
    /// count above `bound` (its counter's, when this instance has it).
    pub fn out_of_bounds(&self, bound: Option<Decimal>, now_ms: u64) -> Option<&'static str> {
        let horizon = now_ms.saturating_add(MAX_SKEW_MS);
        if self.window > horizon {
            return Some("its window starts in the future");
        }
        if self.until != u64::MAX && self.until > horizon.saturating_add(MAX_WINDOW_MS) {
            return Some("its window ends more than a month ahead");
        }
        if bound.is_some_and(|b| self.value > b) {
            return Some("its count is above 10 times the limit");
        }
        None
    }

    pub fn to_json(&self) -> String {
        json!({"w": self.window, "until": self.until, "v": self.value.normalize().to_string(),
               "life": self.life, "base": self.base.normalize().to_string()})
        .to_string()
    }
}

/// What this process's earlier lives counted, per counter, as first seen in
/// this life, with the life nonce of the marker it was read from: kept in
/// shared data (JSON) to tell an earlier life of this instance (or this life's
/// write not yet seen) from another process that wrongly shares its id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bases(pub HashMap<String, Base>);

/// One counter's entry in [`Bases`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    pub window: u64,
    pub base: Decimal,
    /// The life nonce of the marker the base was read from (0: none).
    pub from_life: u64,
}

impl Bases {
    pub fn decode(b: Option<&[u8]>) -> Bases {
        let mut out = Bases::default();
        let Some(Value::Object(m)) = b.and_then(|b| serde_json::from_slice::<Value>(b).ok()) else { return out };
        for (name, v) in m {
            let w = v.get(0).and_then(Value::as_u64);
            let d = v.get(1).and_then(Value::as_str).and_then(|s| Decimal::from_str(s).ok());
            let l = v.get(2).and_then(Value::as_u64);
            if let (Some(window), Some(base), Some(from_life)) = (w, d, l) {
                out.0.insert(name, Base { window, base, from_life });
            }
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let m: serde_json::Map<String, Value> =
            self.0.iter().map(|(k, b)| (k.clone(), json!([b.window, b.base.to_string(), b.from_life]))).collect();
        Value::Object(m).to_string().into_bytes()
    }
}

/// What one sync learned about a counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterSync {
    pub name: String,
    pub window: u64,
    /// What the rest of the fleet counted in the window (including this
    /// instance's earlier lives).
    pub others: Decimal,
    /// Whether this sync writes this instance's marker.
    pub push: bool,
    /// Another process writes this instance's marker: its id is not unique.
    pub id_clash: bool,
}

fn marker_key(prefix: &str, instance: &str, name: &str) -> String {
    format!("{prefix}/m/{instance}/{name}")
}

/// A write to etcd: a put or a delete, guarded or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: String, guard: Option<Guard> },
    Delete { key: String, guard: Guard },
}

/// What one sync does about the counters: what each learned, this
/// instance's markers to write, markers to delete, and the values dropped.
#[derive(Debug, Default)]
pub struct CounterPlan {
    pub syncs: Vec<CounterSync>,
    pub writes: Vec<Op>,
    pub deletes: Vec<Op>,
    pub dropped: Vec<Dropped>,
}

/// Plans the sync of `counters` against a fresh range read: what the others
/// counted, this instance's markers to write, and ended windows' markers to
/// delete. `life` is this process's nonce; `bases` keeps what earlier lives
/// counted, per counter, as first seen in this life. A marker outside its
/// bounds ([`Marker::out_of_bounds`]) counts for nothing, is reported in
/// `dropped` and deleted (this instance's own only when it writes no new one).
pub fn plan_counters(
    prefix: &str,
    instance: &str,
    life: u64,
    counters: &[Counter],
    etcd: &EtcdView,
    bases: &mut Bases,
    now_ms: u64,
) -> CounterPlan {
    let mut syncs = Vec::with_capacity(counters.len());
    let mut writes = Vec::new();
    let mut deletes = Vec::new();
    let mut dropped = Vec::new();
    // This instance's own markers dropped: deleted unless overwritten.
    let mut own_dropped: Vec<(&str, Guard)> = Vec::new();
    let markers_head = format!("{prefix}/m/");
    let bounds: HashMap<&str, Decimal> = counters.iter().map(|c| (c.name.as_str(), c.bound)).collect();
    // Every marker, by counter name: (instance, marker).
    let mut by_name: HashMap<&str, Vec<(&str, Marker)>> = HashMap::new();
    for (key, kv) in &etcd.by_key {
        let Some(rest) = key.strip_prefix(&markers_head) else { continue };
        let Some((who, name)) = rest.split_once('/') else { continue };
        let guard = Guard::Revision(kv.mod_revision);
        let marker = Marker::parse(&kv.value);
        let why = marker.as_ref().and_then(|m| m.out_of_bounds(bounds.get(name).copied(), now_ms));
        match (marker, why) {
            (Some(_), Some(why)) => {
                dropped.push(Dropped { key: key.clone(), why });
                if who == instance {
                    own_dropped.push((name, guard));
                } else {
                    deletes.push(Op::Delete { key: key.clone(), guard });
                }
            }
            // Another instance's, of a window that ended more than a minute
            // ago: removed (this instance overwrites its own).
            (Some(m), None) if m.until.saturating_add(60_000) < now_ms && who != instance => {
                deletes.push(Op::Delete { key: key.clone(), guard })
            }
            (Some(m), None) if m.until.saturating_add(60_000) < now_ms => {}
            (Some(m), None) => by_name.entry(name).or_default().push((who, m)),
            // Damaged: nobody counts it; removed (this instance overwrites
            // its own).
            (None, _) if who != instance => deletes.push(Op::Delete { key: key.clone(), guard }),
            (None, _) => {}
        }
    }
    for c in counters {
        let markers = by_name.get(c.name.as_str()).map_or(&[][..], Vec::as_slice);
        let own = markers.iter().find(|(who, _)| *who == instance).map(|(_, m)| m);
        let seen = bases.0.get(&c.name).filter(|b| b.window == c.window).copied();
        let mut id_clash = false;
        let base = match (own.filter(|m| m.window == c.window), seen) {
            (Some(m), _) if m.life == life => m.base,
            // The marker of the earlier life the base was read from (this
            // life's write not seen yet), or none: the recorded base.
            (Some(m), Some(b)) if m.life == b.from_life => b.base,
            (None, Some(b)) => b.base,
            // Another process writes with this id this window: keep ours.
            (Some(_), Some(b)) => {
                id_clash = true;
                b.base
            }
            // First sight in this life: an earlier life's count.
            (Some(m), None) => m.value,
            (None, None) => Decimal::ZERO,
        };
        let from_life = match (own.filter(|m| m.window == c.window), seen) {
            (_, Some(b)) => b.from_life,
            (Some(m), None) if m.life != life => m.life,
            _ => 0,
        };
        bases.0.insert(c.name.clone(), Base { window: c.window, base, from_life });
        let value = (base + c.local).min(Decimal::from(MAX_COUNT));
        let others = markers
            .iter()
            .filter(|(who, m)| *who != instance && m.window == c.window)
            .fold(base, |acc, (_, m)| acc + m.value);
        let mine = Marker { window: c.window, until: c.until, value, life, base };
        let push = !id_clash && value > Decimal::ZERO && own != Some(&mine);
        if push {
            writes.push(Op::Put { key: marker_key(prefix, instance, &c.name), value: mine.to_json(), guard: None });
            own_dropped.retain(|(name, _)| *name != c.name);
        }
        syncs.push(CounterSync { name: c.name.clone(), window: c.window, others, push, id_clash });
    }
    for (name, guard) in own_dropped {
        deletes.push(Op::Delete { key: marker_key(prefix, instance, name), guard });
    }
    deletes.truncate(MAX_OPS);
    CounterPlan { syncs, writes, deletes, dropped }
}

// ---------------------------------------------------------------- key states

/// A key's state as shared through etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedState {
    pub cooldown_until_ms: u64,
    pub state: KeyState,
    pub reason: Reason,
    pub exhausted_until_ms: u64,
    /// When the state last changed.
    pub at_ms: u64,
    /// The instance that pushed it.
    pub by: String,
}

impl SharedState {
    pub fn parse(b: &[u8]) -> Option<SharedState> {
        let v: Value = serde_json::from_slice(b).ok()?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let state = match v.get("state")?.as_str()? {
            "available" => KeyState::Available,
            "disabled" => KeyState::Disabled,
            "exhausted" => KeyState::Exhausted,
            _ => return None,
        };
        Some(SharedState {
            cooldown_until_ms: n("cooldown_until_ms"),
            state,
            reason: Reason::from_u8(u8::try_from(n("reason")).unwrap_or(0)),
            exhausted_until_ms: n("exhausted_until_ms"),
            at_ms: n("at_ms"),
            by: v.get("by").and_then(Value::as_str).unwrap_or("").to_string(),
        })
    }

    pub fn to_json(&self) -> String {
        let state = match self.state {
            KeyState::Available => "available",
            KeyState::Disabled => "disabled",
            KeyState::Exhausted => "exhausted",
        };
        json!({"cooldown_until_ms": self.cooldown_until_ms, "state": state, "reason": self.reason as u8,
               "exhausted_until_ms": self.exhausted_until_ms, "at_ms": self.at_ms, "by": self.by})
        .to_string()
    }

    /// Why this state is outside what an instance could have written at
    /// `now_ms`, if it is: a change later than now plus [`MAX_SKEW_MS`] (it
    /// would win over every later change), a cooldown longer than
    /// `max_cooldown_ms` (`cooldown.max_seconds`), an exhaustion past the
    /// end of the month, or an instance name that is not an id.
    pub fn out_of_bounds(&self, now_ms: u64, max_cooldown_ms: u64) -> Option<&'static str> {
        let horizon = now_ms.saturating_add(MAX_SKEW_MS);
        if self.at_ms > horizon {
            return Some("its change time is in the future");
        }
        if self.cooldown_until_ms > horizon.saturating_add(max_cooldown_ms) {
            return Some("its cooldown is longer than cooldown.max_seconds");
        }
        if self.exhausted_until_ms > crate::window::Window::Month.next_start(horizon) {
            return Some("its exhaustion outlasts the month");
        }
        let id = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        if self.by.is_empty() || self.by.len() > 64 || !self.by.bytes().all(id) {
            return Some("its instance name is not an id");
        }
        None
    }

    fn of(r: &KeyRecord, by: &str) -> SharedState {
        SharedState {
            cooldown_until_ms: r.cooldown_until_ms,
            state: r.state,
            reason: r.reason,
            exhausted_until_ms: r.exhausted_until_ms,
            at_ms: r.state_at_ms,
            by: by.to_string(),
        }
    }
}

pub fn state_key(prefix: &str, key_id: &str) -> String {
    format!("{prefix}/s/{key_id}")
}

/// Whether a shared state is an admin's "available": it clears cooldowns.
fn is_reset(s: &SharedState) -> bool {
    s.state == KeyState::Available && s.reason == Reason::Admin
}

/// Merges the fleet's state of a key into its local record; returns whether
/// the record changed. The newer state change wins; cooldowns are merged to
/// the longer one, except that a newer admin "available" clears them.
pub fn merge_state(rec: &mut KeyRecord, remote: &SharedState) -> bool {
    let before = *rec;
    if remote.at_ms > rec.state_at_ms {
        rec.state = remote.state;
        rec.reason = remote.reason;
        rec.exhausted_until_ms = remote.exhausted_until_ms;
        rec.state_at_ms = remote.at_ms;
        if is_reset(remote) {
            rec.cooldown_until_ms = remote.cooldown_until_ms;
        }
    }
    if remote.at_ms >= rec.state_at_ms || !is_reset(&SharedState::of(rec, "")) {
        rec.cooldown_until_ms = rec.cooldown_until_ms.max(remote.cooldown_until_ms);
    }
    *rec != before
}

/// The state to push for a key, when the local record knows something the
/// fleet does not: a newer state change, or a longer cooldown still running.
pub fn state_to_push(
    rec: &KeyRecord,
    remote: Option<&SharedState>,
    instance: &str,
    now_ms: u64,
) -> Option<SharedState> {
    let push = match remote {
        None => rec.state_at_ms > 0 || rec.cooldown_until_ms > now_ms,
        Some(r) => {
            rec.state_at_ms > r.at_ms
                || (rec.state_at_ms == r.at_ms && rec.cooldown_until_ms > r.cooldown_until_ms.max(now_ms))
        }
    };
    push.then(|| SharedState::of(rec, instance))
}

// ---------------------------------------------------------------- status

/// The sync status of this process, kept in shared data for the admin API
/// and for whichever root context syncs next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub instance: String,
    /// When fleet mode started in this process.
    pub started_ms: u64,
    pub last_ok_ms: u64,
    /// Failed syncs since the last success.
    pub failures: u64,
    pub last_error: String,
    pub degraded: bool,
    pub degraded_since_ms: u64,
    pub syncs: u64,
    /// Other instances whose markers were seen at the last sync.
    pub peers: Vec<String>,
}

impl Status {
    pub fn decode(b: Option<&[u8]>) -> Option<Status> {
        let v: Value = serde_json::from_slice(b?).ok()?;
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Some(Status {
            instance: s("instance"),
            started_ms: n("started_ms"),
            last_ok_ms: n("last_ok_ms"),
            failures: n("failures"),
            last_error: s("last_error"),
            degraded: v.get("degraded").and_then(Value::as_bool).unwrap_or(false),
            degraded_since_ms: n("degraded_since_ms"),
            syncs: n("syncs"),
            peers: v
                .get("peers")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|p| p.as_str().map(String::from)).collect())
                .unwrap_or_default(),
        })
    }

    pub fn to_json(&self) -> Value {
        json!({"instance": self.instance, "started_ms": self.started_ms, "last_ok_ms": self.last_ok_ms,
               "failures": self.failures, "last_error": self.last_error, "degraded": self.degraded,
               "degraded_since_ms": self.degraded_since_ms, "syncs": self.syncs, "peers": self.peers})
    }

    pub fn encode(&self) -> Vec<u8> {
        self.to_json().to_string().into_bytes()
    }

    /// A successful sync. Returns true when it ends a degraded spell.
    pub fn succeeded(&mut self, now_ms: u64) -> bool {
        let recovered = self.degraded;
        self.last_ok_ms = now_ms;
        self.failures = 0;
        self.last_error.clear();
        self.degraded = false;
        self.degraded_since_ms = 0;
        self.syncs = self.syncs.saturating_add(1);
        recovered
    }

    /// A failed sync. Returns true when it starts a degraded spell: no sync
    /// succeeded for `degraded_after_ms` (since start, before the first).
    pub fn failed(&mut self, now_ms: u64, error: &str, degraded_after_ms: u64) -> bool {
        self.failures = self.failures.saturating_add(1);
        self.last_error = error.chars().take(200).collect();
        let since = self.last_ok_ms.max(self.started_ms);
        if !self.degraded && now_ms.saturating_sub(since) >= degraded_after_ms {
            self.degraded = true;
            self.degraded_since_ms = now_ms;
            return true;
        }
        false
    }
}

/// The instances that pushed markers, other than `instance`.
pub fn peers(prefix: &str, instance: &str, etcd: &EtcdView) -> Vec<String> {
    let head = format!("{prefix}/m/");
    let mut out: Vec<String> = etcd
        .by_key
        .keys()
        .filter_map(|k| k.strip_prefix(&head)?.split('/').next())
        .filter(|i| *i != instance)
        .map(String::from)
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        match Decimal::from_str(s) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        }
    }

    /// etcd's keyspace with revisions, answering the bodies built above.
    #[derive(Default)]
    struct FakeEtcd {
        kv: std::collections::BTreeMap<String, (Vec<u8>, u64)>,
        revision: u64,
    }

    fn b64(v: &Value, name: &str) -> Vec<u8> {
        bytes_field(v, name).unwrap_or_else(|e| panic!("{e}"))
    }

    impl FakeEtcd {
        fn range(&self, body: &str) -> Vec<u8> {
            let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
            let (from, to) = (b64(&v, "key"), b64(&v, "range_end"));
            let kvs: Vec<Value> = self
                .kv
                .iter()
                .filter(|(k, _)| k.as_bytes() >= from.as_slice() && k.as_bytes() < to.as_slice())
                .map(|(k, (val, rev))| {
                    json!({"key": base64_encode(k.as_bytes()), "value": base64_encode(val),
                           "mod_revision": rev.to_string(), "create_revision": "1", "version": "1"})
                })
                .collect();
            let mut out = json!({"header": {"revision": self.revision.to_string()}});
            if !kvs.is_empty() {
                out["count"] = json!(kvs.len().to_string());
                out["kvs"] = Value::Array(kvs);
            }
            out.to_string().into_bytes()
        }

        fn txn(&mut self, body: &str) -> Vec<u8> {
            let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
            let holds = v["compare"].as_array().into_iter().flatten().all(|c| {
                let key = String::from_utf8(b64(c, "key")).unwrap_or_else(|e| panic!("{e}"));
                let cur = self.kv.get(&key);
                match c["target"].as_str() {
                    Some("VERSION") => cur.is_none(),
                    Some("MOD") => cur.map(|x| x.1.to_string()) == c["mod_revision"].as_str().map(String::from),
                    _ => false,
                }
            });
            if holds {
                self.revision += 1;
                for op in v["success"].as_array().into_iter().flatten() {
                    if let Some(p) = op.get("requestPut") {
                        let key = String::from_utf8(b64(p, "key")).unwrap_or_else(|e| panic!("{e}"));
                        self.kv.insert(key, (b64(p, "value"), self.revision));
                    } else if let Some(d) = op.get("requestDeleteRange") {
                        self.kv.remove(&String::from_utf8(b64(d, "key")).unwrap_or_else(|e| panic!("{e}")));
                    }
                }
            }
            let mut out = json!({"header": {"revision": self.revision.to_string()}});
            if holds {
                out["succeeded"] = json!(true);
            }
            out.to_string().into_bytes()
        }

        fn snapshot(&self) -> EtcdView {
            match parse_range(&self.range(&range_body("/p"))) {
                Ok(kvs) => EtcdView::new(kvs),
                Err(e) => panic!("{e}"),
            }
        }

        fn apply(&mut self, ops: &[Op]) -> bool {
            ops.is_empty() || parse_txn(&self.txn(&txn_body(ops))).unwrap_or_else(|e| panic!("{e}"))
        }
    }

    /// One process: its life nonce and its bases (its shared data).
    struct Process {
        instance: &'static str,
        life: u64,
        bases: Bases,
    }

    impl Process {
        fn new(instance: &'static str, life: u64) -> Process {
            Process { instance, life, bases: Bases::default() }
        }

        /// One sync: read, plan, write. Returns what it learned.
        fn sync(&mut self, etcd: &mut FakeEtcd, counters: &[Counter], now: u64) -> Vec<CounterSync> {
            let snap = etcd.snapshot();
            let plan = plan_counters("/p", self.instance, self.life, counters, &snap, &mut self.bases, now);
            assert!(etcd.apply(&plan.writes));
            etcd.apply(&plan.deletes);
            plan.syncs
        }
    }

    const DAY: u64 = 86_400_000;

    fn spend(local: &str) -> Vec<Counter> {
        vec![Counter { name: "b/daily".into(), window: DAY, until: 2 * DAY, local: d(local), bound: d("1000") }]
    }

    fn fleet_total(etcd: &FakeEtcd) -> Decimal {
        etcd.kv
            .iter()
            .filter(|(k, _)| k.ends_with("/b/daily"))
            .filter_map(|(_, (v, _))| Marker::parse(v))
            .map(|m| m.value)
            .sum()
    }

    #[test]
    fn the_range_covers_exactly_the_prefix() {
        let v: Value = serde_json::from_str(&range_body("/gw")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b64(&v, "key"), b"/gw/");
        assert_eq!(b64(&v, "range_end"), b"/gw/~");
        let v: Value = serde_json::from_str(&objects_range_body("/gw", 7)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((b64(&v, "key"), b64(&v, "range_end")), (b"/gw/~o/".to_vec(), b"/gw/~o0".to_vec()));
        assert_eq!(v["min_mod_revision"], "8");
    }

    #[test]
    fn etcd_answers_are_parsed_and_failures_are_not_successes() {
        let body = br#"{"header":{"revision":"7"},"kvs":[{"key":"L3AvYy9h","value":"eyJ3IjoxfQ==","mod_revision":"7"}],"count":"1"}"#;
        let kvs = parse_range(body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(kvs, vec![Kv { key: "/p/c/a".into(), value: br#"{"w":1}"#.to_vec(), mod_revision: 7 }]);
        assert_eq!(parse_range(br#"{"header":{"revision":"7"}}"#), Ok(vec![]));
        assert_eq!(parse_txn(br#"{"header":{"revision":"8"},"succeeded":true}"#), Ok(true));
        assert_eq!(parse_txn(br#"{"header":{"revision":"8"}}"#), Ok(false));
        assert!(parse_txn(br#"{"error":"etcdserver: bad","code":3,"message":"bad"}"#).is_err());
        assert!(parse_range(b"<html>").is_err());
        assert!(parse_range(br#"{"header":{},"kvs":[{"key":"!!"}]}"#).is_err());
    }

    #[test]
    fn two_instances_see_each_others_spend_and_the_sum_is_exact() {
        let mut etcd = FakeEtcd::default();
        let (mut a, mut b) = (Process::new("a", 1), Process::new("b", 2));
        a.sync(&mut etcd, &spend("0.30"), DAY);
        let s = b.sync(&mut etcd, &spend("0.20"), DAY);
        assert_eq!(s[0].others, d("0.30"), "b sees a's spend");
        let s = a.sync(&mut etcd, &spend("0.35"), DAY);
        assert_eq!(s[0].others, d("0.20"));
        assert_eq!(fleet_total(&etcd), d("0.55"));
        // Nothing new: nothing written.
        let s = a.sync(&mut etcd, &spend("0.35"), DAY);
        assert!(!s[0].push);
    }

    #[test]
    fn a_write_whose_answer_was_lost_or_repeated_counts_once() {
        let mut etcd = FakeEtcd::default();
        let mut a = Process::new("a", 1);
        let snap = etcd.snapshot();
        let writes = plan_counters("/p", "a", 1, &spend("1"), &snap, &mut a.bases, DAY).writes;
        assert!(etcd.apply(&writes));
        assert!(etcd.apply(&writes), "written again");
        a.sync(&mut etcd, &spend("1.5"), DAY);
        assert_eq!(fleet_total(&etcd), d("1.5"));
    }

    #[test]
    fn a_restarted_process_keeps_its_earlier_spend_in_the_fleet() {
        let mut etcd = FakeEtcd::default();
        Process::new("a", 1).sync(&mut etcd, &spend("4"), DAY);
        // Restart: new life, shared data (local spend and bases) gone.
        let mut again = Process::new("a", 2);
        let s = again.sync(&mut etcd, &spend("0"), DAY);
        assert_eq!(s[0].others, d("4"), "its earlier life counts as others");
        again.sync(&mut etcd, &spend("1"), DAY);
        assert_eq!(fleet_total(&etcd), d("5"));
        // Its bases lost too (a reload): the marker still knows the base.
        again.bases = Bases::default();
        again.sync(&mut etcd, &spend("2"), DAY);
        assert_eq!(fleet_total(&etcd), d("6"));
    }

    #[test]
    fn a_restart_whose_first_write_was_lost_is_not_taken_for_an_id_clash() {
        let mut etcd = FakeEtcd::default();
        Process::new("a", 1).sync(&mut etcd, &spend("4"), DAY);
        let mut again = Process::new("a", 2);
        let snap = etcd.snapshot();
        let _lost = plan_counters("/p", "a", 2, &spend("1"), &snap, &mut again.bases, DAY);
        let s = again.sync(&mut etcd, &spend("1"), DAY);
        assert!(!s[0].id_clash && s[0].push);
        assert_eq!(fleet_total(&etcd), d("5"));
    }

    #[test]
    fn two_processes_sharing_an_instance_id_are_flagged_not_counted_twice() {
        let mut etcd = FakeEtcd::default();
        let (mut a1, mut a2) = (Process::new("a", 1), Process::new("a", 2));
        a1.sync(&mut etcd, &spend("1"), DAY);
        a2.sync(&mut etcd, &spend("2"), DAY);
        for _ in 0..3 {
            let s = a1.sync(&mut etcd, &spend("1"), DAY);
            assert!(s[0].id_clash && !s[0].push);
        }
        assert!(fleet_total(&etcd) <= d("3"), "no runaway: {}", fleet_total(&etcd));
    }

    #[test]
    fn a_new_window_starts_from_zero_and_ended_markers_are_removed() {
        let mut etcd = FakeEtcd::default();
        let (mut a, mut b) = (Process::new("a", 1), Process::new("b", 2));
        a.sync(&mut etcd, &spend("4"), DAY);
        b.sync(&mut etcd, &spend("1"), DAY);
        let next =
            vec![Counter { name: "b/daily".into(), window: 2 * DAY, until: 3 * DAY, local: d("1"), bound: d("1000") }];
        let s = a.sync(&mut etcd, &next, 2 * DAY + 61_000);
        assert_eq!(s[0].others, Decimal::ZERO, "yesterday's spend does not count");
        assert!(!etcd.kv.contains_key("/p/m/b/b/daily"), "b's ended marker is removed");
        assert_eq!(fleet_total(&etcd), d("1"));
    }

    #[test]
    fn damaged_negative_or_huge_markers_count_for_nothing() {
        for v in [r#""-5""#, r#""1e30""#, r#""99999999999999999999""#, r#"7"#] {
            let raw = format!(r#"{{"w":86400000,"until":172800000,"v":{v},"life":9,"base":"0"}}"#);
            assert_eq!(Marker::parse(raw.as_bytes()), None, "{raw}");
        }
        let mut etcd = FakeEtcd::default();
        etcd.kv.insert("/p/m/x/b/daily".into(), (br#"{"w":86400000,"v":"-5"}"#.to_vec(), 1));
        let s = Process::new("a", 1).sync(&mut etcd, &spend("1"), DAY);
        assert_eq!(s[0].others, Decimal::ZERO);
        assert!(!etcd.kv.contains_key("/p/m/x/b/daily"), "removed");
    }

    fn marker_json(w: u64, until: u64, v: &str) -> Vec<u8> {
        format!(r#"{{"w":{w},"until":{until},"v":"{v}","life":9,"base":"0"}}"#).into_bytes()
    }

    #[test]
    fn markers_outside_their_bounds_count_for_nothing_and_are_removed() {
        let mut etcd = FakeEtcd::default();
        // The bound of b/daily is 1000 (ten times a limit of 100).
        etcd.kv.insert("/p/m/x/b/daily".into(), (marker_json(DAY, 2 * DAY, "1000.01"), 1));
        etcd.kv.insert("/p/m/y/b/daily".into(), (marker_json(DAY + 61_000, 2 * DAY, "1"), 2));
        etcd.kv.insert("/p/m/z/b/daily".into(), (marker_json(DAY, 40 * DAY, "1"), 3));
        etcd.kv.insert("/p/m/fair/b/daily".into(), (marker_json(DAY, 2 * DAY, "1000"), 4));
        let snap = etcd.snapshot();
        let plan = plan_counters("/p", "a", 1, &spend("0"), &snap, &mut Bases::default(), DAY);
        assert_eq!(plan.syncs[0].others, d("1000"), "only the marker within bounds counts");
        let mut why: Vec<(String, &str)> = plan.dropped.iter().map(|x| (x.key.clone(), x.why)).collect();
        why.sort();
        assert_eq!(
            why,
            vec![
                ("/p/m/x/b/daily".to_string(), "its count is above 10 times the limit"),
                ("/p/m/y/b/daily".to_string(), "its window starts in the future"),
                ("/p/m/z/b/daily".to_string(), "its window ends more than a month ahead"),
            ]
        );
        etcd.apply(&plan.deletes);
        assert_eq!(etcd.kv.keys().collect::<Vec<_>>(), vec!["/p/m/fair/b/daily"], "the dropped ones are removed");
        // Clocks a little apart are not poison: a window that starts within
        // the skew allowance is taken.
        let soon = Marker::parse(&marker_json(DAY + MAX_SKEW_MS, 2 * DAY, "1")).unwrap_or_else(|| panic!("marker"));
        assert_eq!(soon.out_of_bounds(Some(d("1000")), DAY), None);
    }

    #[test]
    fn a_poisoned_marker_of_this_instance_is_not_taken_for_its_earlier_count() {
        let mut etcd = FakeEtcd::default();
        etcd.kv.insert("/p/m/a/b/daily".into(), (marker_json(DAY, 2 * DAY, "999999999"), 1));
        let mut a = Process::new("a", 1);
        // Nothing to push: the poisoned marker is removed.
        let s = a.sync(&mut etcd, &spend("0"), DAY);
        assert_eq!(s[0].others, Decimal::ZERO, "not an earlier life's count");
        assert!(!etcd.kv.contains_key("/p/m/a/b/daily"));
        // Something to push: it is overwritten with the true count.
        etcd.kv.insert("/p/m/a/b/daily".into(), (marker_json(DAY, 2 * DAY, "999999999"), 1));
        let mut a = Process::new("a", 2);
        a.sync(&mut etcd, &spend("2"), DAY);
        assert_eq!(fleet_total(&etcd), d("2"));
    }

    #[test]
    fn states_from_the_future_or_beyond_the_longest_cooldown_are_out_of_bounds() {
        let now = 10 * DAY;
        let max = 3_600_000;
        let ok = shared(KeyState::Disabled, now, now + max);
        assert_eq!(ok.out_of_bounds(now, max), None);
        let ahead = shared(KeyState::Disabled, now + MAX_SKEW_MS, now + MAX_SKEW_MS + max);
        assert_eq!(ahead.out_of_bounds(now, max), None, "another instance's clock may run a minute ahead");
        let mut forever = shared(KeyState::Disabled, u64::MAX, 0);
        assert_eq!(forever.out_of_bounds(now, max), Some("its change time is in the future"));
        forever.at_ms = now;
        forever.cooldown_until_ms = u64::MAX;
        assert_eq!(forever.out_of_bounds(now, max), Some("its cooldown is longer than cooldown.max_seconds"));
        let mut exhausted = shared(KeyState::Exhausted, now, 0);
        exhausted.exhausted_until_ms = crate::window::Window::Month.next_start(now);
        assert_eq!(exhausted.out_of_bounds(now, max), None);
        exhausted.exhausted_until_ms = u64::MAX;
        assert_eq!(exhausted.out_of_bounds(now, max), Some("its exhaustion outlasts the month"));
        let mut named = shared(KeyState::Disabled, now, 0);
        named.by = "gw-1\n[info] forged log line".into();
        assert_eq!(named.out_of_bounds(now, max), Some("its instance name is not an id"));
    }

    #[test]
    fn etcd_tokens_are_read_from_the_authenticate_answer() {
        let body = auth_body("gw", "pa\"ss");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((v["name"].as_str(), v["password"].as_str()), (Some("gw"), Some("pa\"ss")));
        assert_eq!(parse_auth(br#"{"header":{"revision":"3"},"token":"abc.12"}"#), Ok("abc.12".to_string()));
        for bad in [
            &br#"{"header":{},"token":""}"#[..],
            br#"{"header":{},"token":"a b"}"#,
            br#"{"header":{},"token":"a
x-evil: 1"}"#,
            br#"{"header":{}}"#,
            br#"{"error":"etcdserver: authentication failed, invalid user ID or password","code":3}"#,
        ] {
            assert!(parse_auth(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_lease_lets_one_context_sync_until_it_lapses_or_a_newer_config_starts() {
        let (one, two) = (Holder { id: 1, epoch: 5 }, Holder { id: 2, epoch: 4 });
        let a = claim_lease(None, one, 1000, 1500).unwrap_or_else(|| panic!("no lease"));
        assert!(claim_lease(Some(&a), two, 2000, 1500).is_none(), "held by 1");
        assert!(claim_lease(Some(&a), one, 2000, 1500).is_some(), "1 renews");
        assert!(claim_lease(Some(&a), two, 2600, 1500).is_some(), "lapsed: 2 takes over");
        let newer = Holder { id: 3, epoch: 6 };
        let b = claim_lease(Some(&a), newer, 1100, 1500).unwrap_or_else(|| panic!("no lease"));
        assert_eq!(lease_of(Some(&b)), Some((3, 2600, 6)), "a newer config takes over at once");
        assert!(claim_lease(Some(&b), one, 1200, 1500).is_none(), "and keeps it");
    }

    #[test]
    fn lease_bytes_are_pinned() {
        let b = claim_lease(None, Holder { id: 1, epoch: 5 }, 1000, 1500).unwrap_or_else(|| panic!("no lease"));
        // holder id, held until, holder epoch
        let pinned = concat!("0100000000000000", "c409000000000000", "0500000000000000");
        let mut b = crate::codec::pinned(&b, pinned);
        assert_eq!(lease_of(Some(&b)), Some((1, 2500, 5)));
        b.push(9);
        assert_eq!(lease_of(Some(&b)), Some((1, 2500, 5)), "trailing bytes are ignored");
        b.truncate(23);
        assert_eq!(lease_of(Some(&b)), None);
        assert_eq!(lease_of(None), None);
    }

    fn rec(state: KeyState, at: u64, cool: u64) -> KeyRecord {
        KeyRecord { state, state_at_ms: at, cooldown_until_ms: cool, ..KeyRecord::default() }
    }

    fn shared(state: KeyState, at: u64, cool: u64) -> SharedState {
        SharedState {
            cooldown_until_ms: cool,
            state,
            reason: Reason::Unauthorized,
            exhausted_until_ms: 0,
            at_ms: at,
            by: "b".into(),
        }
    }

    #[test]
    fn a_cooldown_learned_elsewhere_cools_the_key_here() {
        let mut r = rec(KeyState::Available, 0, 0);
        assert!(merge_state(&mut r, &shared(KeyState::Available, 0, 9_000)));
        assert_eq!(r.cooldown_until_ms, 9_000);
        // A shorter one does not shorten it.
        assert!(!merge_state(&mut r, &shared(KeyState::Available, 0, 5_000)));
    }

    #[test]
    fn the_newer_state_change_wins_and_keeps_the_longer_cooldown() {
        let mut r = rec(KeyState::Available, 10, 9_000);
        assert!(merge_state(&mut r, &shared(KeyState::Disabled, 20, 0)));
        assert_eq!((r.state, r.state_at_ms, r.reason), (KeyState::Disabled, 20, Reason::Unauthorized));
        assert_eq!(r.cooldown_until_ms, 9_000, "a local 429 is not lost to a newer state");
        // An admin's "available" (newer) clears the cooldown everywhere...
        let mut r = rec(KeyState::Available, 10, 9_000);
        let mut reset = shared(KeyState::Available, 30, 0);
        reset.reason = Reason::Admin;
        assert!(merge_state(&mut r, &reset));
        assert_eq!(r.cooldown_until_ms, 0);
        // ...and an older cooldown does not come back over it.
        assert!(!merge_state(&mut r, &shared(KeyState::Available, 10, 9_000)));
        // An older one changes nothing.
        let mut r = rec(KeyState::Disabled, 40, 0);
        assert!(!merge_state(&mut r, &shared(KeyState::Available, 30, 0)));
    }

    #[test]
    fn only_what_the_fleet_lacks_is_pushed() {
        let now = 1_000;
        assert_eq!(state_to_push(&rec(KeyState::Available, 0, 0), None, "a", now), None);
        assert_eq!(state_to_push(&rec(KeyState::Available, 0, 500), None, "a", now), None, "expired cooldown");
        let cooling = rec(KeyState::Available, 0, 5_000);
        assert_eq!(state_to_push(&cooling, None, "a", now).map(|s| s.cooldown_until_ms), Some(5_000));
        assert_eq!(state_to_push(&cooling, Some(&shared(KeyState::Available, 0, 5_000)), "a", now), None);
        assert!(state_to_push(&cooling, Some(&shared(KeyState::Available, 0, 4_000)), "a", now).is_some());
        let disabled = rec(KeyState::Disabled, 50, 0);
        assert!(state_to_push(&disabled, Some(&shared(KeyState::Available, 40, 9_000)), "a", now).is_some());
        assert_eq!(state_to_push(&disabled, Some(&shared(KeyState::Available, 60, 0)), "a", now), None);
    }

    #[test]
    fn shared_states_round_trip_through_json() {
        let s = shared(KeyState::Exhausted, 7, 8);
        assert_eq!(SharedState::parse(s.to_json().as_bytes()), Some(s));
        assert_eq!(SharedState::parse(b"{\"state\":\"sleepy\"}"), None);
        assert_eq!(SharedState::parse(b"garbage"), None);
    }

    #[test]
    fn degraded_after_the_configured_time_without_a_sync_and_recovered_by_one() {
        let mut s = Status { started_ms: 1_000, ..Status::default() };
        assert!(!s.failed(2_000, "etcd answered 503", 3_000));
        assert!(s.failed(4_000, "etcd answered 503", 3_000), "3 s since start without a sync");
        assert!(!s.failed(4_500, "again", 3_000), "already degraded");
        assert_eq!((s.degraded, s.failures), (true, 3));
        assert!(s.succeeded(5_000));
        assert_eq!((s.degraded, s.failures, s.last_ok_ms), (false, 0, 5_000));
        assert_eq!(Status::decode(Some(&s.encode())), Some(s));
    }

    #[test]
    fn bases_round_trip_through_json() {
        let mut b = Bases::default();
        b.0.insert("b/x".into(), Base { window: 5, base: d("1.25"), from_life: 3 });
        assert_eq!(Bases::decode(Some(&b.encode())), b);
        assert_eq!(Bases::decode(Some(b"nonsense")), Bases::default());
    }
}
