//! Objects a provider keeps for the project of the key that made them
//! (stored responses, files, uploads, batches, vector stores, assistants,
//! threads, fine-tuning jobs, stored chat completions, Anthropic message
//! batches and files): which request creates one, which refers to one, and
//! the record of where each lives and who owns it.
//!
//! Records live in shared data in a fixed set of buckets (seeded at
//! configure, so every write, the first included, is a compare-and-swap),
//! chosen by a hash of the id; a full bucket drops the oldest record of the
//! client holding the most there. Only a provider's 2xx answer to a
//! creating request makes a record: nothing a caller sends can plant one. In fleet mode the records this instance
//! made wait in an outbox the fleet sync pushes to etcd.

use crate::store::{update, Store};
use serde_json::Value;

/// What kind of object an id names, by its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Response,
    File,
    Upload,
    Batch,
    VectorStore,
    Assistant,
    Thread,
    FineTuningJob,
    ChatCompletion,
    MessageBatch,
    Conversation,
    Container,
}

/// Id prefixes, most specific first (`file-` OpenAI, `file_` Anthropic),
/// with the kind's name.
const PREFIXES: &[(&str, Kind, &str)] = &[
    ("resp_", Kind::Response, "response"),
    ("file-", Kind::File, "file"),
    ("file_", Kind::File, "file"),
    ("upload_", Kind::Upload, "upload"),
    ("batch_", Kind::Batch, "batch"),
    ("vs_", Kind::VectorStore, "vector_store"),
    ("asst_", Kind::Assistant, "assistant"),
    ("thread_", Kind::Thread, "thread"),
    ("ftjob-", Kind::FineTuningJob, "fine_tuning_job"),
    ("chatcmpl-", Kind::ChatCompletion, "chat_completion"),
    ("msgbatch_", Kind::MessageBatch, "message_batch"),
    ("conv_", Kind::Conversation, "conversation"),
    ("cntr_", Kind::Container, "container"),
];

/// The longest id the gateway remembers.
pub const MAX_ID_LEN: usize = 128;
/// The most object references one request may carry.
pub const MAX_REFS: usize = 32;

impl Kind {
    pub fn as_str(self) -> &'static str {
        PREFIXES.iter().find(|(_, k, _)| *k == self).map_or("object", |(_, _, name)| name)
    }

    fn code(self) -> u8 {
        PREFIXES.iter().position(|(_, k, _)| *k == self).map_or(0, |i| i as u8)
    }

    fn of_code(c: u8) -> Option<Kind> {
        PREFIXES.get(usize::from(c)).map(|(_, k, _)| *k)
    }

    pub fn parse(s: &str) -> Option<Kind> {
        PREFIXES.iter().find(|(_, _, name)| *name == s).map(|(_, k, _)| *k)
    }
}

/// The kind of the object `id` names: `None` unless it is an id as
/// providers make them (a known prefix, then ASCII letters, digits, `_` or
/// `-`, at most [`MAX_ID_LEN`] in all).
pub fn kind_of(id: &str) -> Option<Kind> {
    if id.len() > MAX_ID_LEN || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return None;
    }
    PREFIXES.iter().find(|(p, _, _)| id.len() > p.len() && id.starts_with(p)).map(|(_, k, _)| *k)
}

/// Collections whose paths name objects (`/v1/files/{id}`, ...).
const COLLECTIONS: &[&str] = &[
    "responses",
    "files",
    "uploads",
    "batches",
    "vector_stores",
    "assistants",
    "threads",
    "fine_tuning",
    "chat",
    "messages",
    "conversations",
    "containers",
];

/// POST paths that create an object, with what their answer's `id` is.
const CREATES: &[(&str, Kind)] = &[
    ("responses", Kind::Response),
    ("files", Kind::File),
    ("uploads", Kind::Upload),
    ("batches", Kind::Batch),
    ("vector_stores", Kind::VectorStore),
    ("assistants", Kind::Assistant),
    ("threads", Kind::Thread),
    ("fine_tuning/jobs", Kind::FineTuningJob),
    ("chat/completions", Kind::ChatCompletion),
    ("messages/batches", Kind::MessageBatch),
    ("conversations", Kind::Conversation),
    ("containers", Kind::Container),
];

/// GET paths that list a project's objects.
const LISTS: &[&str] = &[
    "files",
    "batches",
    "vector_stores",
    "assistants",
    "fine_tuning/jobs",
    "chat/completions",
    "messages/batches",
    "uploads",
    "containers",
];

fn bare(path: &str) -> &str {
    let p = path.split('?').next().unwrap_or(path);
    p.strip_suffix('/').filter(|p| !p.is_empty()).unwrap_or(p)
}

/// The path after its API root, as providers serve it (`/v1/`, Azure's
/// and Groq's `/openai/`, `/openai/v1/`, an Azure deployment,
/// `/v1beta/openai/`, `/v1beta/`), without query or trailing slash: every
/// root reaches the same objects. `None` outside those roots.
fn op(path: &str) -> Option<&str> {
    let p = bare(path);
    let p = p.strip_prefix("/openai/deployments/").and_then(|r| Some(r.split_once('/')?.1)).unwrap_or(p);
    ["/v1beta/openai/", "/openai/v1/", "/openai/", "/v1/", "/v1beta/", "/v1alpha/", ""]
        .iter()
        .find_map(|r| p.strip_prefix(r))
        .filter(|o| !o.starts_with('/'))
}

/// Whether `path` lies under a collection of objects.
pub fn in_collection(path: &str) -> bool {
    op(path).and_then(|r| r.split('/').next()).is_some_and(|c| COLLECTIONS.contains(&c))
}

/// The kind a `POST` to `path` creates, if it creates one (a stored chat
/// completion only with `store: true`; a response unless `store: false`).
pub fn creates(method: &str, path: &str) -> Option<Kind> {
    if method != "POST" {
        return None;
    }
    let p = op(path)?;
    if p.starts_with("uploads/") && p.ends_with("/complete") {
        // The completed upload carries the file it made (`file.id`).
        return Some(Kind::File);
    }
    if p == "threads/runs" {
        return Some(Kind::Thread);
    }
    CREATES.iter().find(|(c, _)| *c == p).map(|(_, k)| *k)
}

/// Whether a creating request asks the provider to keep its answer:
/// the body's `store`, else `default` (true for the Responses API, false
/// for chat completions).
pub fn stored(body: &[u8], default: bool) -> bool {
    let hint = |n: &[u8]| body.windows(n.len()).any(|w| w == n);
    if !hint(b"store") && !hint(b"\\u") {
        return default;
    }
    serde_json::from_slice::<Value>(body).ok().and_then(|v| v.get("store")?.as_bool()).unwrap_or(default)
}

/// The 404 a provider gives for an id its project does not have.
pub fn not_found(id: &str) -> crate::reply::Reply {
    let what = kind_of(id).map_or("object", Kind::as_str);
    crate::reply::error(404, "invalid_request_error", "object_not_found", &format!("No {what} found with id '{id}'."))
}

/// Whether a `GET` of `path` lists a project's objects.
pub fn lists(method: &str, path: &str) -> bool {
    method == "GET" && op(path).is_some_and(|p| LISTS.contains(&p))
}

/// A path the gateway cannot read an object id from with certainty
/// (percent-encoding, backslashes, empty or dot segments) under an object
/// collection: refused, since the provider might decode it to another id.
pub fn unreadable_path(path: &str) -> bool {
    let p = path.split('?').next().unwrap_or(path);
    in_collection(p) && (p.contains(['%', '\\']) || p.contains("//") || p.split('/').any(|s| s == "." || s == ".."))
}

/// The object ids a request path names (`/v1/files/file-1/content`,
/// `/v1/vector_stores/vs_1/files/file-2`, a list's `?after=file-3`): every
/// segment and query value that is an id.
pub fn path_refs(path: &str) -> Vec<String> {
    if !in_collection(path) {
        return Vec::new();
    }
    path.split(['/', '?', '&', '=']).filter(|s| kind_of(s).is_some()).take(MAX_REFS + 1).map(str::to_string).collect()
}

/// Body fields whose string value names an object.
const REF_FIELDS: &[&str] = &[
    "previous_response_id",
    "response_id",
    "file_id",
    "input_file_id",
    "training_file",
    "validation_file",
    "thread_id",
    "assistant_id",
    "vector_store_id",
    "batch_id",
    "conversation",
    "conversation_id",
    "container",
    "container_id",
];
/// Body fields whose array of strings names objects.
const REF_LISTS: &[&str] = &["vector_store_ids", "file_ids"];

/// Why a body's references were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefError {
    TooMany,
    /// JSON the request check read but this parser cannot (nested past
    /// 128 levels): the provider may read a reference in it.
    Unreadable,
}

/// The object ids a JSON request body refers to, anywhere in it (tools,
/// messages, attachments, `tool_resources`) except in `metadata`, which is
/// the caller's own. A body that does not parse is [`RefError::Unreadable`]
/// (called on JSON bodies only: fails closed). Cheap for a body
/// without a candidate field name (no escapes either, which could spell
/// one): it is not parsed.
pub fn body_refs(body: &[u8]) -> Result<Vec<String>, RefError> {
    let hint = |n: &[u8]| body.windows(n.len()).any(|w| w == n);
    let hints: [&[u8]; 6] = [b"_id\"", b"_ids\"", b"_file\"", b"conversation\"", b"container\"", b"\\u"];
    if !hints.iter().any(|n| hint(n)) {
        return Ok(Vec::new());
    }
    let v = serde_json::from_slice::<Value>(body).map_err(|_| RefError::Unreadable)?;
    let mut out = Vec::new();
    walk(&v, 0, &mut out)?;
    Ok(out)
}

fn add(out: &mut Vec<String>, s: &str) -> Result<(), RefError> {
    if kind_of(s).is_some() && !out.iter().any(|o| o == s) {
        if out.len() >= MAX_REFS {
            return Err(RefError::TooMany);
        }
        out.push(s.to_string());
    }
    Ok(())
}

fn walk(v: &Value, depth: usize, out: &mut Vec<String>) -> Result<(), RefError> {
    // serde_json refuses nesting past 128 levels; this bounds the walk too.
    if depth > 128 {
        return Ok(());
    }
    match v {
        Value::Object(m) => {
            // An eval run's data source: `{"type": "file_id", "id": ...}`.
            if m.get("type").and_then(Value::as_str) == Some("file_id") {
                add(out, m.get("id").and_then(Value::as_str).unwrap_or_default())?;
            }
            for (k, v) in m {
                match v {
                    _ if k == "metadata" => {}
                    Value::String(s) if REF_FIELDS.contains(&k.as_str()) => add(out, s)?,
                    // The Responses API's `conversation: {"id": "conv_..."}`.
                    Value::Object(o) if k == "conversation" => {
                        if let Some(s) = o.get("id").and_then(Value::as_str) {
                            add(out, s)?;
                        }
                        walk(v, depth + 1, out)?;
                    }
                    Value::Array(a) if REF_LISTS.contains(&k.as_str()) => {
                        for s in a.iter().filter_map(Value::as_str) {
                            add(out, s)?;
                        }
                    }
                    _ => walk(v, depth + 1, out)?,
                }
            }
        }
        Value::Array(a) => {
            for v in a {
                walk(v, depth + 1, out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The ids a provider's 2xx JSON answer to a creating request made: its
/// `id` when that is an id of `kind`, or a completed upload's `file.id`,
/// or a run's `thread_id`.
pub fn created_ids(kind: Kind, body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else { return Vec::new() };
    let of_kind = |s: Option<&str>| s.filter(|s| kind_of(s) == Some(kind)).map(str::to_string);
    [v.get("id"), v.get("file").and_then(|f| f.get("id")), v.get("thread_id")]
        .into_iter()
        .filter_map(|x| of_kind(x.and_then(Value::as_str)))
        .take(1)
        .collect()
}

/// The first id of `kind` in an event stream's text (`"id":"resp_..."` in
/// `response.created`), for a created object that streams.
pub fn streamed_id(kind: Kind, text: &[u8]) -> Option<String> {
    let needle = b"\"id\":\"";
    let mut at = 0;
    while let Some(i) = text.get(at..)?.windows(needle.len()).position(|w| w == needle) {
        let start = at + i + needle.len();
        let rest = text.get(start..)?;
        let end = rest.iter().position(|&b| b == b'"')?;
        let id = std::str::from_utf8(rest.get(..end)?).ok()?;
        if kind_of(id) == Some(kind) {
            return Some(id.to_string());
        }
        at = start;
    }
    None
}

/// Where an object lives and who made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: String,
    pub kind: Kind,
    /// The provider's id and the key group (empty: the provider's default
    /// group) of the key that created it.
    pub provider: String,
    pub group: String,
    /// The client that created it; empty on a gateway without clients.
    pub owner: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// Learned from another instance (fleet mode): never pushed back.
    pub from_fleet: bool,
}

const VERSION: u8 = 1;

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(b.get(..n).unwrap_or_default());
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<String> {
        let n = usize::from(self.u8()?);
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

impl Record {
    fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.kind.code());
        out.push(u8::from(self.from_fleet));
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        for s in [&self.id, &self.provider, &self.group, &self.owner] {
            put_str(out, s);
        }
    }

    fn decode_from(r: &mut Reader<'_>) -> Option<Record> {
        let kind = Kind::of_code(r.u8()?)?;
        let from_fleet = r.u8()? != 0;
        let (created_ms, expires_ms) = (r.u64()?, r.u64()?);
        Some(Record {
            kind,
            from_fleet,
            created_ms,
            expires_ms,
            id: r.str()?,
            provider: r.str()?,
            group: r.str()?,
            owner: r.str()?,
        })
    }

    /// The record as JSON (the admin API's view, and with `by`, the
    /// instance that made it, fleet mode's value in etcd). Every string in
    /// a record is an id of letters, digits, `-` and `_` (checked where it
    /// enters), so none needs escaping.
    pub fn to_json(&self, by: Option<&str>) -> String {
        let by = by.map(|b| format!(r#","by":"{b}""#)).unwrap_or_default();
        format!(
            r#"{{"id":"{}","kind":"{}","provider":"{}","group":"{}","owner":"{}","created_ms":{},"expires_ms":{},"from_fleet":{}{by}}}"#,
            self.id,
            self.kind.as_str(),
            self.provider,
            self.group,
            self.owner,
            self.created_ms,
            self.expires_ms,
            self.from_fleet
        )
    }
}

/// Where fleet mode keeps object records in etcd: `<prefix>/~o/<id>`
/// (after every other key of the prefix, so the sync's range leaves them
/// out and they are read on their own, only the new ones).
pub fn fleet_head(prefix: &str) -> String {
    format!("{prefix}/~o/")
}

impl Record {
    /// A record read from etcd under `id`, unless it is damaged or out of
    /// bounds: an id that is not one, a kind that is not its prefix's, names
    /// that are not ids, or an expiry further off than `ttl_ms` from now
    /// (with a minute for clocks).
    pub fn from_fleet(id: &str, value: &[u8], now_ms: u64, ttl_ms: u64) -> Result<Record, &'static str> {
        let v: Value = serde_json::from_slice(value).map_err(|_| "object record: not JSON")?;
        let kind = kind_of(id).ok_or("object record: not an object id")?;
        if v.get("kind").and_then(Value::as_str) != Some(kind.as_str()) {
            return Err("object record: kind does not match the id");
        }
        let name = |f: &str, empty_ok: bool| -> Result<String, &'static str> {
            let s = v.get(f).and_then(Value::as_str).ok_or("object record: a name is missing")?;
            let ok = (empty_ok && s.is_empty()) || crate::config::check_id("", s.to_string()).is_ok();
            ok.then(|| s.to_string()).ok_or("object record: a name is not an id")
        };
        let num = |f: &str| v.get(f).and_then(Value::as_u64).ok_or("object record: a time is missing");
        let (created_ms, expires_ms) = (num("created_ms")?, num("expires_ms")?);
        if expires_ms > now_ms.saturating_add(ttl_ms).saturating_add(60_000) || created_ms > expires_ms {
            return Err("object record: expiry out of bounds");
        }
        Ok(Record {
            id: id.to_string(),
            kind,
            provider: name("provider", false)?,
            group: name("group", true)?,
            owner: name("owner", true)?,
            created_ms,
            expires_ms,
            from_fleet: true,
        })
    }
}

/// Records in one shared-data value (a bucket, or the fleet outbox).
pub fn encode(records: &[Record]) -> Vec<u8> {
    let mut out = vec![VERSION];
    for r in records {
        r.encode_into(&mut out);
    }
    out
}

/// The records of a value; `None` when it is not one this version wrote.
pub fn decode(b: &[u8]) -> Option<Vec<Record>> {
    let (&v, rest) = b.split_first()?;
    if v != VERSION {
        return None;
    }
    let mut r = Reader(rest);
    let mut out = Vec::new();
    while !r.0.is_empty() {
        out.push(Record::decode_from(&mut r)?);
    }
    Some(out)
}

/// How the records are laid out in shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub buckets: u32,
    pub per_bucket: usize,
}

impl Layout {
    /// About 32 records a bucket (one read of a few KiB per lookup).
    pub fn new(max_records: usize) -> Layout {
        let buckets = max_records.div_ceil(32).clamp(1, 1024);
        Layout { buckets: buckets as u32, per_bucket: max_records.div_ceil(buckets).max(1) }
    }

    /// The bucket of `id` (FNV-1a: the same in every VM).
    pub fn bucket(&self, id: &str) -> String {
        let mut h: u32 = 0x811c_9dc5;
        for b in id.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        bucket_name(h % self.buckets.max(1))
    }
}

pub fn bucket_name(i: u32) -> String {
    format!("akr.v1.obj.{i}")
}

/// The fleet outbox: records made here and not yet pushed to etcd.
pub const OUTBOX: &str = "akr.v1.obj.outbox";
/// The most records the outbox holds; older ones go unpushed.
pub const MAX_OUTBOX: usize = 512;

/// The live record of `id`, if any (one shared-data read).
pub fn lookup(store: &dyn Store, layout: Layout, id: &str, now_ms: u64) -> Option<Record> {
    let b = store.value(&layout.bucket(id))?;
    decode(&b)?.into_iter().find(|r| r.id == id && r.expires_ms > now_ms)
}

/// What [`remember`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Remembered {
    pub stored: bool,
    /// Records dropped to make room (expired ones not counted).
    pub evicted: u32,
    pub conflicts: u32,
}

/// Changes the records of one shared-data value by compare-and-swap:
/// `change` returns `None` to leave it as it is.
fn modify(
    store: &dyn Store,
    name: &str,
    change: &mut dyn FnMut(&mut Vec<Record>) -> Option<u32>,
) -> (Option<u32>, u32) {
    let (r, stats) = update(store, name, |cur| {
        let mut recs = cur.and_then(decode).unwrap_or_default();
        let out = change(&mut recs).ok_or(())?;
        Ok::<_, ()>((out, encode(&recs)))
    });
    (r.ok(), stats.conflicts)
}

/// Stores `rec` in its bucket by compare-and-swap, replacing a record of
/// the same id and dropping expired ones, then, while the bucket is full,
/// the oldest record of the owner holding the most there. A live record
/// already there is kept when `rec` comes from the fleet or names another
/// owner (the same object, told twice).
pub fn remember(store: &dyn Store, layout: Layout, rec: &Record, now_ms: u64) -> Remembered {
    let (r, conflicts) = modify(store, &layout.bucket(&rec.id), &mut |recs| {
        recs.retain(|r| r.expires_ms > now_ms);
        // Ids are unique, so an id told again is the same object: its first
        // owner keeps it (a provider that makes ids from what the caller
        // sends, as some OpenAI-compatible servers do from x-request-id,
        // cannot hand one client another's object).
        if recs.iter().any(|r| r.id == rec.id && (rec.from_fleet || r.owner != rec.owner)) {
            return None;
        }
        recs.retain(|r| r.id != rec.id);
        let evicted = make_room(recs, rec, layout.per_bucket);
        Some(evicted)
    });
    Remembered { stored: r.is_some(), evicted: r.unwrap_or(0), conflicts }
}

/// Drops records until fewer than `max` are left, then adds `rec`; how
/// many went. The owner with the most records (`rec` counted) gives up its
/// oldest: a client's flood evicts its own records, never another client's
/// while it holds more than they do.
fn make_room(recs: &mut Vec<Record>, rec: &Record, max: usize) -> u32 {
    let mut evicted = 0;
    while recs.len() >= max {
        let held = |o: &str| recs.iter().filter(|r| r.owner == o).count() + usize::from(rec.owner == o);
        let most = recs.iter().map(|r| held(&r.owner)).max().unwrap_or(0);
        let oldest = recs
            .iter()
            .enumerate()
            .filter(|(_, r)| held(&r.owner) == most)
            .min_by_key(|(_, r)| r.created_ms)
            .map_or(0, |(i, _)| i);
        recs.remove(oldest);
        evicted += 1;
    }
    recs.push(rec.clone());
    evicted
}

/// Forgets `id` (the provider deleted it).
pub fn forget(store: &dyn Store, layout: Layout, id: &str) {
    modify(store, &layout.bucket(id), &mut |recs| {
        let before = recs.len();
        recs.retain(|r| r.id != id);
        (recs.len() != before).then_some(0)
    });
}

/// Queues a record for the fleet sync; when it is full, the oldest of the
/// client with the most queued goes.
pub fn queue_for_fleet(store: &dyn Store, rec: &Record) {
    modify(store, OUTBOX, &mut |recs| Some(make_room(recs, rec, MAX_OUTBOX)));
}

/// Takes every queued record (the outbox is left empty).
pub fn take_outbox(store: &dyn Store) -> Vec<Record> {
    let mut taken = Vec::new();
    modify(store, OUTBOX, &mut |recs| {
        taken = std::mem::take(recs);
        (!taken.is_empty()).then_some(0)
    });
    taken
}

/// Every live record, bucket by bucket (the admin API).
pub fn all(store: &dyn Store, layout: Layout, now_ms: u64) -> Vec<Record> {
    (0..layout.buckets)
        .filter_map(|i| store.value(&bucket_name(i)))
        .filter_map(|b| decode(&b))
        .flatten()
        .filter(|r| r.expires_ms > now_ms)
        .collect()
}

/// What a request referring to objects may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing the gateway knows: any key may serve.
    Free,
    /// Only keys of this provider and group may serve.
    Pinned { provider: String, group: String },
    /// The caller may not refer to this id: answered 404.
    NotFound(String),
    /// The objects live in different places: no key can serve them all.
    Split,
}

/// Decides on a request's references from their records (`None`: no
/// record): another client's object, or an unknown one under
/// `unknown_objects: "deny"`, is not found; the rest pin the request to
/// their group. `caller` is the client id, empty on an open gateway.
pub fn decide(refs: &[(String, Option<Record>)], caller: &str, deny_unknown: bool) -> Verdict {
    let mut pinned: Option<(&str, &str)> = None;
    for (id, rec) in refs {
        match rec {
            None if deny_unknown => return Verdict::NotFound(id.clone()),
            None => {}
            Some(r) if r.owner != caller => return Verdict::NotFound(id.clone()),
            Some(r) => match pinned {
                None => pinned = Some((&r.provider, &r.group)),
                Some(p) if p != (r.provider.as_str(), r.group.as_str()) => return Verdict::Split,
                Some(_) => {}
            },
        }
    }
    match pinned {
        Some((p, g)) => Verdict::Pinned { provider: p.to_string(), group: g.to_string() },
        None => Verdict::Free,
    }
}

/// A list answer (`{"data": [...]}`) keeping only the items `keep`
/// accepts by id; `None` when the body is not such a list.
pub fn filter_list(body: &[u8], mut keep: impl FnMut(&str) -> bool) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let data = v.get_mut("data")?.as_array_mut()?;
    data.retain(|item| item.get("id").and_then(Value::as_str).is_some_and(&mut keep));
    let (first, last) =
        (data.first().and_then(|i| i.get("id")).cloned(), data.last().and_then(|i| i.get("id")).cloned());
    if let Some(o) = v.as_object_mut() {
        if o.contains_key("first_id") {
            o.insert("first_id".into(), first.unwrap_or(Value::Null));
        }
        if o.contains_key("last_id") {
            o.insert("last_id".into(), last.unwrap_or(Value::Null));
        }
    }
    Some(v.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FakeStore;

    fn rec(id: &str, owner: &str, group: &str, created: u64) -> Record {
        Record {
            id: id.into(),
            kind: kind_of(id).unwrap_or(Kind::File),
            provider: "openai".into(),
            group: group.into(),
            owner: owner.into(),
            created_ms: created,
            expires_ms: created + 1_000,
            from_fleet: false,
        }
    }

    #[test]
    fn ids_are_recognised_by_prefix_and_character_set_only() {
        assert_eq!(kind_of("resp_abc123"), Some(Kind::Response));
        assert_eq!(kind_of("file-XYZ"), Some(Kind::File));
        assert_eq!(kind_of("file_011CNha8iCJcU1wXNR6q4V8w"), Some(Kind::File));
        assert_eq!(kind_of("msgbatch_01"), Some(Kind::MessageBatch));
        assert_eq!(kind_of("ftjob-1"), Some(Kind::FineTuningJob));
        for bad in ["resp_", "resp_a/b", "resp_a.b", "resp_a%2f", "RESP_abc", " resp_a", "call_abc", "", "files"] {
            assert_eq!(kind_of(bad), None, "{bad:?}");
        }
        assert_eq!(kind_of(&format!("file-{}", "a".repeat(200))), None);
    }

    #[test]
    fn path_references_are_every_id_segment_under_an_object_collection() {
        assert_eq!(path_refs("/v1/files/file-1/content?x=1"), ["file-1"]);
        assert_eq!(path_refs("/v1/vector_stores/vs_1/files/file-2"), ["vs_1", "file-2"]);
        assert_eq!(path_refs("/v1/responses/resp_9/"), ["resp_9"]);
        assert!(path_refs("/v1/responses").is_empty());
        assert_eq!(path_refs("/v1/files?limit=2&after=file-4"), ["file-4"]);
        assert!(path_refs("/v1/responses/input_tokens").is_empty());
        assert!(path_refs("/v1/embeddings/file-1").is_empty(), "not an object collection");
        assert_eq!(path_refs("/openai/files/file-1?api-version=1"), ["file-1"]);
        assert_eq!(path_refs("/openai/deployments/d/files/file-1"), ["file-1"]);
        assert!(path_refs("/other/files/file-1").is_empty());
        assert!(unreadable_path("/openai/v1/files/%66ile-1"));
        assert!(unreadable_path("/v1/files/%66ile-1"));
        assert!(unreadable_path("/v1/files/../files/file-1"));
        assert!(unreadable_path("/v1/files//file-1"));
        assert!(!unreadable_path("/v1/chat/completions"));
        assert!(!unreadable_path("/v1/embeddings?x=%20"));
    }

    #[test]
    fn body_references_are_found_anywhere_but_in_metadata() {
        let body =
            br#"{"previous_response_id":"resp_1","tools":[{"type":"file_search","vector_store_ids":["vs_1","vs_2"]}],
            "input":[{"content":[{"type":"input_file","file_id":"file-3"}]}],"metadata":{"file_id":"file-9"},
            "tool_call_id":"call_1","thread_id":"not-an-id"}"#;
        let mut found = body_refs(body).unwrap_or_default();
        found.sort();
        assert_eq!(found, ["file-3", "resp_1", "vs_1", "vs_2"]);
        let body = br#"{"conversation":{"id":"conv_1"},"tools":[{"type":"code_interpreter","container":"cntr_2"}]}"#;
        assert_eq!(body_refs(body), Ok(vec!["conv_1".into(), "cntr_2".into()]));
        assert_eq!(body_refs(br#"{"conversation":"conv_3"}"#), Ok(vec!["conv_3".into()]));
        let eval_run = br#"{"data_source":{"type":"jsonl","source":{"type":"file_id","id":"file-5"}}}"#;
        assert_eq!(body_refs(eval_run), Ok(vec!["file-5".into()]));
        // A field name written with escapes is still read.
        assert_eq!(body_refs(br#"{"file\u005fid":"file-7"}"#), Ok(vec!["file-7".into()]));
        assert_eq!(body_refs(br#"{"model":"gpt-4o","messages":[]}"#), Ok(vec![]));
        let many: Vec<String> = (0..40).map(|i| format!("\"file-{i}\"")).collect();
        let body = format!("{{\"file_ids\":[{}]}}", many.join(","));
        assert_eq!(body_refs(body.as_bytes()), Err(RefError::TooMany));
    }

    #[test]
    fn parsers_never_trap_on_hostile_input() {
        let deep = format!("{}\"file_id\"{}", "[".repeat(100_000), "]".repeat(100_000));
        let nested = format!("{}\"file_id\":\"file-1\"{}", "{\"a\":".repeat(200), "}".repeat(200));
        let cases: Vec<Vec<u8>> = vec![
            deep.into_bytes(),
            nested.into_bytes(),
            b"\xff\xfe_id\"".to_vec(),
            b"{\"file_id\":".to_vec(),
            br#"{"file_ids":[1,null,{"x":"file-1"}],"vector_store_ids":"vs_1"}"#.to_vec(),
            br#"{"id":"\"id\":\"resp_"#.to_vec(),
            (0..=255u8).collect(),
        ];
        assert_eq!(body_refs(cases.get(1).map_or(&[][..], |c| c)), Err(RefError::Unreadable), "too deep");
        for c in &cases {
            let _ = body_refs(c);
            let _ = created_ids(Kind::Response, c);
            let _ = streamed_id(Kind::Response, c);
            let _ = filter_list(c, |_| true);
            let _ = decode(c);
            for i in 0..c.len().min(300) {
                let _ = streamed_id(Kind::Response, c.get(i..).unwrap_or_default());
                let _ = decode(c.get(..i).unwrap_or_default());
            }
        }
        assert_eq!(
            streamed_id(Kind::Response, b"data: {\"type\":\"x\",\"id\":\"msg_1\",\"response\":{\"id\":\"resp_7\"}}"),
            Some("resp_7".into())
        );
    }

    #[test]
    fn created_ids_take_only_an_id_of_the_kind_the_path_creates() {
        assert_eq!(created_ids(Kind::File, br#"{"id":"file-1","object":"file"}"#), ["file-1"]);
        assert!(created_ids(Kind::File, br#"{"id":"resp_1"}"#).is_empty());
        assert_eq!(created_ids(Kind::File, br#"{"id":"upload_1","file":{"id":"file-2"}}"#), ["file-2"]);
        assert_eq!(created_ids(Kind::Thread, br#"{"id":"run_1","thread_id":"thread_2"}"#), ["thread_2"]);
        assert_eq!(creates("POST", "/v1/files"), Some(Kind::File));
        assert_eq!(creates("GET", "/v1/files"), None);
        assert_eq!(creates("POST", "/v1/uploads/upload_1/complete"), Some(Kind::File));
        assert!(lists("GET", "/v1/files?limit=5") && !lists("GET", "/v1/files/file-1"));
        assert!(lists("GET", "/openai/files?api-version=1") && lists("GET", "/openai/v1/batches"));
        assert_eq!(creates("POST", "/openai/v1/responses"), Some(Kind::Response));
        assert_eq!(creates("POST", "/openai/uploads/upload_1/complete"), Some(Kind::File));
    }

    #[test]
    fn records_round_trip_and_a_damaged_value_reads_as_none() {
        let rs = vec![rec("file-1", "a", "g1", 5), rec("resp_2", "", "", 6)];
        let b = encode(&rs);
        assert_eq!(decode(&b), Some(rs));
        assert_eq!(decode(b.get(..b.len() - 1).unwrap_or_default()), None);
        assert_eq!(decode(&[2]), None);
        assert_eq!(decode(&[1]), Some(vec![]));
    }

    #[test]
    fn a_full_bucket_drops_its_oldest_record() {
        let s = FakeStore::new();
        let layout = Layout { buckets: 1, per_bucket: 2 };
        s.set(&bucket_name(0), &encode(&[]), None).unwrap_or_else(|e| panic!("{e:?}"));
        for (i, id) in ["file-1", "file-2", "file-3"].iter().enumerate() {
            let r = remember(&s, layout, &rec(id, "a", "", 10 + i as u64), 10);
            assert!(r.stored);
            assert_eq!(r.evicted, u32::from(i == 2));
        }
        assert_eq!(lookup(&s, layout, "file-1", 20), None, "the oldest went");
        assert!(lookup(&s, layout, "file-3", 20).is_some());
        assert_eq!(lookup(&s, layout, "file-3", 2_000), None, "expired");
        // A fleet copy does not replace what this instance recorded.
        let mut other = rec("file-3", "b", "g", 50);
        other.from_fleet = true;
        assert!(!remember(&s, layout, &other, 20).stored);
        assert_eq!(lookup(&s, layout, "file-3", 20).map(|r| r.owner), Some("a".into()));
        // Nor does another client's record of the same id.
        assert!(!remember(&s, layout, &rec("file-3", "b", "g", 60), 20).stored);
        assert_eq!(lookup(&s, layout, "file-3", 20).map(|r| r.owner), Some("a".into()));
        forget(&s, layout, "file-3");
        assert_eq!(lookup(&s, layout, "file-3", 20), None);
    }

    #[test]
    fn a_client_flooding_a_bucket_evicts_its_own_records_not_another_clients() {
        let s = FakeStore::new();
        let layout = Layout { buckets: 1, per_bucket: 4 };
        s.set(&bucket_name(0), &encode(&[]), None).unwrap_or_else(|e| panic!("{e:?}"));
        for (i, id) in ["file-a1", "file-a2"].iter().enumerate() {
            assert!(remember(&s, layout, &rec(id, "alice", "", i as u64), 0).stored);
        }
        for i in 0..50 {
            assert!(remember(&s, layout, &rec(&format!("file-b{i}"), "bob", "", 10 + i), 0).stored);
        }
        for id in ["file-a1", "file-a2", "file-b49", "file-b48"] {
            assert!(lookup(&s, layout, id, 0).is_some(), "{id} was evicted");
        }
        // One owner alone (an open gateway) still loses its oldest.
        assert!(lookup(&s, layout, "file-b47", 0).is_none());
    }

    #[test]
    fn a_client_flooding_the_fleet_outbox_drops_its_own_records_not_another_clients() {
        let s = FakeStore::new();
        queue_for_fleet(&s, &rec("file-a", "alice", "", 0));
        for i in 0..MAX_OUTBOX + 5 {
            queue_for_fleet(&s, &rec(&format!("file-b{i}"), "bob", "", 1 + i as u64));
        }
        let queued = take_outbox(&s);
        assert_eq!(queued.len(), MAX_OUTBOX);
        assert!(queued.iter().any(|r| r.id == "file-a"), "alice's record was dropped");
    }

    /// A store whose first `set` of each update loses to another writer
    /// that records another object in the same bucket.
    struct Contended<'a> {
        inner: &'a FakeStore,
        left: std::cell::Cell<u32>,
        rival: Record,
        layout: Layout,
    }

    impl Store for Contended<'_> {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), crate::store::ReadError> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), crate::store::SetError> {
            if self.left.get() > 0 {
                self.left.set(self.left.get() - 1);
                let _ = remember(self.inner, self.layout, &self.rival, 10);
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn concurrent_writers_to_one_bucket_both_keep_their_record() {
        let s = FakeStore::new();
        let layout = Layout { buckets: 1, per_bucket: 8 };
        s.set(&bucket_name(0), &encode(&[]), None).unwrap_or_else(|e| panic!("{e:?}"));
        let racy = Contended { inner: &s, left: std::cell::Cell::new(1), rival: rec("file-r", "b", "", 9), layout };
        let r = remember(&racy, layout, &rec("file-m", "a", "", 10), 10);
        assert!(r.stored);
        assert_eq!(r.conflicts, 1);
        assert!(lookup(&s, layout, "file-m", 10).is_some() && lookup(&s, layout, "file-r", 10).is_some());
    }

    #[test]
    fn ownership_pins_to_the_group_and_hides_other_clients_objects() {
        let mine = Some(rec("file-1", "a", "g1", 0));
        let theirs = Some(rec("file-2", "b", "g1", 0));
        let other_group = Some(rec("vs_3", "a", "g2", 0));
        let r = |id: &str, x: &Option<Record>| (id.to_string(), x.clone());
        assert_eq!(
            decide(&[r("file-1", &mine)], "a", false),
            Verdict::Pinned { provider: "openai".into(), group: "g1".into() }
        );
        assert_eq!(decide(&[r("file-1", &mine), r("file-2", &theirs)], "a", false), Verdict::NotFound("file-2".into()));
        assert_eq!(decide(&[r("file-1", &mine)], "", false), Verdict::NotFound("file-1".into()), "anonymous");
        assert_eq!(decide(&[r("file-9", &None)], "a", false), Verdict::Free);
        assert_eq!(decide(&[r("file-9", &None)], "a", true), Verdict::NotFound("file-9".into()));
        assert_eq!(decide(&[r("file-1", &mine), r("vs_3", &other_group)], "a", false), Verdict::Split);
    }

    #[test]
    fn fleet_records_round_trip_and_planted_or_damaged_ones_are_refused() {
        let r = rec("file-1", "a", "g1", 1_000);
        let json = r.to_json(Some("gw-1"));
        let back = Record::from_fleet("file-1", json.as_bytes(), 1_000, 10_000);
        assert_eq!(back, Ok(Record { from_fleet: true, ..r.clone() }));
        assert!(Record::from_fleet("resp_1", json.as_bytes(), 1_000, 10_000).is_err(), "kind of another id");
        assert!(Record::from_fleet("file-1/../x", json.as_bytes(), 1_000, 10_000).is_err());
        assert!(Record::from_fleet("file-1", json.as_bytes(), 1_000, 10).is_ok(), "within a minute");
        let far = json.replace("\"expires_ms\":2000", "\"expires_ms\":99999999999");
        assert_eq!(
            Record::from_fleet("file-1", far.as_bytes(), 1_000, 10_000),
            Err("object record: expiry out of bounds")
        );
        let bad_owner = json.replace("\"owner\":\"a\"", "\"owner\":\"a b\"");
        assert!(Record::from_fleet("file-1", bad_owner.as_bytes(), 1_000, 10_000).is_err());
        assert!(Record::from_fleet("file-1", b"\xff", 1_000, 10_000).is_err());
    }

    #[test]
    fn a_list_keeps_only_the_items_accepted() {
        let body = br#"{"object":"list","data":[{"id":"file-1"},{"id":"file-2"},{"x":1}],"first_id":"file-1","last_id":"file-2","has_more":false}"#;
        let out = filter_list(body, |id| id == "file-2").unwrap_or_default();
        let v: Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["data"], serde_json::json!([{"id": "file-2"}]));
        assert_eq!((v["first_id"].as_str(), v["last_id"].as_str()), (Some("file-2"), Some("file-2")));
        assert_eq!(filter_list(br#"{"data":{}}"#, |_| true), None);
    }
}
