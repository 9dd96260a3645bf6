//! Fleet mode's sync: the lease that picks one syncing root context per
//! process, the calls to etcd's JSON gateway (with etcd's token when it has
//! authentication enabled), and applying their answers to shared data, less
//! the values outside their bounds. The protocol and the merge rules are in
//! [`crate::fleet`].

use super::host::{Buffer, Host, Map};
use crate::budget;
use crate::config::{Config, Fleet};
use crate::durable;
use crate::fleet::{self, Bases, Counter, Dropped, EtcdView, Guard, Op, SharedState, Status};
use crate::keys;
use crate::transition::{self, Transition};
use crate::window::{self, Window};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Authenticate,
    Range,
    Txn,
    /// Object records changed since the last revision learned.
    Objects,
}

/// Every this many reads of the object records, one reads them all, to
/// remove expired ones from etcd; the others read only the new ones.
const OBJECTS_FULL_EVERY: u64 = 64;

/// After etcd refused the credentials, this long before they are tried
/// again (at least the sync interval): each try costs etcd a bcrypt.
const AUTH_RETRY_MS: u64 = 2_000;

// This process's life nonce (written once per process, so that a restart
// shows in etcd) and the count of root contexts started in it (the lease
// epoch).
use crate::shared_data::{FLEET_EPOCH as EPOCH_KEY, FLEET_LIFE as LIFE_KEY};

/// The fleet sync of one root context (attempt stage).
pub struct FleetSync {
    fleet: Fleet,
    instance: String,
    /// This root context as a lease holder.
    me: fleet::Holder,
    /// This process's life nonce.
    life: u64,
    pending: Option<(u32, Call, u64)>,
    /// Transactions left to send in this sync, in order.
    queued: Vec<String>,
    /// An instance-id clash was logged.
    clash_logged: bool,
    next_ms: u64,
    /// The key-state generation at the last sync: a change (a cooldown, a
    /// disable) is pushed at the next tick rather than the next interval.
    last_gen: u64,
    /// The budgets' local spend at the last sync: new spend, too, is pushed
    /// at the next tick.
    last_spend: Vec<Decimal>,
    /// etcd's token for `fleet.auth`'s user (kept in VM memory only, never
    /// logged); `None` until authenticated, and after etcd refuses it.
    token: Option<String>,
    /// No authentication before this (after refused credentials).
    auth_after_ms: u64,
    /// The highest etcd revision of an object record already learned.
    objects_rev: u64,
    /// This sync still reads the object records (after its transactions).
    objects_due: bool,
    objects_reads: u64,
    /// Runtime key and limit records opened at earlier syncs.
    opened: durable::Opened,
}

/// The instance id: the configured one, else Envoy's node id (property `xds.node.id`) (made safe
/// for etcd keys: other characters become `_`, with a short hash to keep
/// ids distinct). `None` when neither is set.
pub fn instance_id(h: &dyn Host, fleet: &Fleet) -> Option<String> {
    if let Some(i) = &fleet.instance {
        return Some(i.clone());
    }
    let node = h.property_string(&["xds", "node", "id"]).filter(|n| !n.is_empty())?;
    if crate::config::check_id("", node.clone()).is_ok() {
        return Some(node);
    }
    let safe: String = node
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(48)
        .collect();
    let hash = crate::crypto::sha256(node.as_bytes());
    let tag: String = hash.iter().take(4).map(|b| format!("{b:02x}")).collect();
    Some(format!("{safe}-{tag}"))
}

/// A POST to etcd's JSON gateway through the fleet's cluster and authority,
/// with etcd's `token` when it has one (the sync's and the alert claims'
/// calls); its call token.
pub fn etcd_call(h: &dyn Host, fleet: &Fleet, token: Option<&str>, path: &str, body: &[u8]) -> Result<u32, String> {
    let mut headers = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", fleet.authority.as_str()),
        ("content-type", "application/json"),
    ];
    // etcd's gateway takes the token as is, without a scheme.
    if let Some(t) = token {
        headers.push(("authorization", t));
    }
    h.dispatch_http_call(&fleet.cluster, &headers, body, fleet.timeout_ms)
        .map_err(|s| format!("could not call cluster {:?} (host status {})", fleet.cluster, s.0))
}

/// The status of a call's answer (`None`: no answer, timeout or failure).
pub fn call_status(h: &dyn Host, n_headers: usize) -> Option<u32> {
    if n_headers == 0 {
        return None;
    }
    h.headers(Map::CallResponseHeaders)
        .ok()
        .and_then(|h| h.into_iter().find(|(k, _)| k == ":status").and_then(|(_, v)| v.parse::<u32>().ok()))
}

impl FleetSync {
    /// `me` is a random id of this root context. The process's life nonce is
    /// created by the first root context to start (any random value will do).
    /// Until the first sync succeeds, each budget keeps to this instance's
    /// share, as while etcd is unreachable: the others' spend is not yet known.
    pub fn new(h: &dyn Host, cfg: &Config, fleet: Fleet, instance: String, me: u64) -> FleetSync {
        let store = h.store();
        let _ = crate::store::seed(store, LIFE_KEY, &me.to_le_bytes());
        let epoch = crate::shared_data::increment(store, EPOCH_KEY).0.unwrap_or(0);
        let life =
            store.value(LIFE_KEY).and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok()).map_or(me, u64::from_le_bytes);
        let now = h.now_ms();
        match (fleet.encryption_key.is_some(), fleet.plaintext_runtime_keys) {
            (true, _) => {}
            (false, true) => log::warn!(
                "fleet: runtime keys' material is kept in etcd in plain text (fleet.plaintext_runtime_keys; set APIKEYROUTER_ENCRYPTION_KEY to encrypt it)"
            ),
            (false, false) => log::info!(
                "fleet: POST keys is refused: runtime keys would be kept in etcd in plain text (set APIKEYROUTER_ENCRYPTION_KEY, or fleet.plaintext_runtime_keys)"
            ),
        }
        let status = fleet::Status::decode(store.value(fleet::STATUS_KEY).as_deref());
        if status.is_none_or(|s| s.last_ok_ms == 0) {
            for b in &cfg.budgets {
                budget::set_local_share(store, b, Some(fleet.local_share), now);
            }
        }
        FleetSync {
            fleet,
            instance,
            me: fleet::Holder { id: me, epoch },
            life,
            pending: None,
            queued: Vec::new(),
            clash_logged: false,
            next_ms: 0,
            last_gen: 0,
            last_spend: Vec::new(),
            token: None,
            auth_after_ms: 0,
            objects_rev: 0,
            objects_due: false,
            objects_reads: 0,
            opened: durable::Opened::default(),
        }
    }

    /// The tick period fleet mode needs: a quarter of the sync interval, so
    /// that a key-state change or new spend leaves within a quarter interval.
    pub fn tick_ms(&self) -> u64 {
        (self.fleet.sync_interval_ms / 4).clamp(25, 500)
    }

    fn status(&self, h: &dyn Host, now_ms: u64) -> Status {
        fleet::Status::decode(h.store().value(fleet::STATUS_KEY).as_deref()).unwrap_or_else(|| Status {
            instance: self.instance.clone(),
            started_ms: now_ms,
            ..Status::default()
        })
    }

    fn save_status(&self, h: &dyn Host, s: &Status) {
        if h.store().set(fleet::STATUS_KEY, &s.encode(), None).is_err() {
            log::warn!("fleet: could not record the sync status");
        }
    }

    /// Holds (or renews) the process-wide sync lease; false when another
    /// root context holds it. It outlasts a call to etcd and its timeout,
    /// and is renewed on every tick, a call pending or not.
    fn lease(&self, h: &dyn Host, now_ms: u64) -> bool {
        let ttl = (3 * self.fleet.sync_interval_ms).max(self.fleet.timeout_ms + self.fleet.sync_interval_ms + 1000);
        let Ok((cur, cas)) = h.store().get(fleet::LEASE_KEY) else { return false };
        match fleet::claim_lease(cur.as_deref(), self.me, now_ms, ttl) {
            Some(v) => h.store().set(fleet::LEASE_KEY, &v, cas).is_ok(),
            None => false,
        }
    }

    /// Whether this root context holds the lease now (without renewing it).
    fn holds_lease(&self, h: &dyn Host, now_ms: u64) -> bool {
        let cur = h.store().value(fleet::LEASE_KEY);
        fleet::lease_of(cur.as_deref()).is_some_and(|(owner, until, _)| owner == self.me.id && until > now_ms)
    }

    /// Called on every tick of the owning root context.
    pub fn tick(&mut self, h: &dyn Host, cfg: &Config, now_ms: u64) {
        if !self.lease(h, now_ms) {
            self.pending = None;
            self.queued.clear();
            return;
        }
        if let Some((_, _, started)) = self.pending {
            // Envoy answers every call, at worst with a timeout; this only
            // guards against a lost callback.
            if now_ms.saturating_sub(started) < 2 * self.fleet.timeout_ms + 1000 {
                return;
            }
            self.pending = None;
            self.queued.clear();
        }
        let gen = crate::shared_data::read_u64(h.store(), crate::shared_data::GENERATION);
        let spend: Vec<Decimal> = cfg.budgets.iter().map(|b| budget::load(h.store(), b, now_ms).spent).collect();
        // Objects recorded here leave at the next tick too.
        let objects_waiting =
            cfg.objects.enabled && h.store().value(crate::objects::OUTBOX).is_some_and(|b| b.len() > 1);
        if now_ms < self.next_ms && gen == self.last_gen && spend == self.last_spend && !objects_waiting {
            return;
        }
        let authenticate = self.fleet.auth.is_some() && self.token.is_none();
        if authenticate && now_ms < self.auth_after_ms {
            return;
        }
        self.last_gen = gen;
        self.last_spend = spend;
        self.objects_due = cfg.objects.enabled;
        self.next_ms = now_ms + self.fleet.sync_interval_ms;
        let sent = match &self.fleet.auth {
            Some(a) if authenticate => {
                let body = fleet::auth_body(&a.username, &a.password);
                self.call(h, Call::Authenticate, "/v3/auth/authenticate", body.as_bytes(), now_ms)
            }
            _ => self.range(h, now_ms),
        };
        if let Err(why) = sent {
            self.failed(h, cfg, now_ms, &why);
        }
    }

    /// Reads everything under the prefix.
    fn range(&mut self, h: &dyn Host, now_ms: u64) -> Result<(), String> {
        let body = fleet::range_body(&self.fleet.prefix);
        self.call(h, Call::Range, "/v3/kv/range", body.as_bytes(), now_ms)
    }

    fn call(&mut self, h: &dyn Host, call: Call, path: &str, body: &[u8], now_ms: u64) -> Result<(), String> {
        let token = self.token.as_deref().filter(|_| call != Call::Authenticate);
        let t = etcd_call(h, &self.fleet, token, path, body)?;
        self.pending = Some((t, call, now_ms));
        Ok(())
    }

    /// Sends the next queued transaction, if any.
    fn send_queued(&mut self, h: &dyn Host, cfg: &Config, now_ms: u64) {
        if self.queued.is_empty() {
            // Then the object records, once per sync.
            if std::mem::take(&mut self.objects_due) {
                let after = if self.objects_reads.is_multiple_of(OBJECTS_FULL_EVERY) { 0 } else { self.objects_rev };
                self.objects_reads += 1;
                let body = fleet::objects_range_body(&self.fleet.prefix, after);
                if let Err(why) = self.call(h, Call::Objects, "/v3/kv/range", body.as_bytes(), now_ms) {
                    self.failed(h, cfg, now_ms, &why);
                }
            }
            return;
        }
        let body = self.queued.remove(0);
        if let Err(why) = self.call(h, Call::Txn, "/v3/kv/txn", body.as_bytes(), now_ms) {
            self.queued.clear();
            self.failed(h, cfg, now_ms, &why);
        }
    }

    /// An answer from etcd (or Envoy's failure to get one).
    pub fn on_response(&mut self, h: &dyn Host, cfg: &Config, token: u32, n_headers: usize, body_size: usize) {
        let Some((t, call, _)) = self.pending else { return };
        if t != token {
            return;
        }
        self.pending = None;
        let now = h.now_ms();
        if !self.holds_lease(h, now) {
            // Another root context took over meanwhile: its view wins.
            self.queued.clear();
            return;
        }
        let status = call_status(h, n_headers);
        if body_size > self.fleet.max_range_bytes {
            // Not even read: whoever can write under the prefix must not
            // make every instance copy an unbounded answer.
            h.count(crate::metrics::FLEET_VALUES_DROPPED, 1);
            self.queued.clear();
            let why = format!(
                "etcd's answer is {body_size} bytes, above fleet.max_range_bytes ({}): dropped",
                self.fleet.max_range_bytes
            );
            return self.failed(h, cfg, now, &why);
        }
        let body = h.buffer(Buffer::CallResponseBody, 0, body_size).ok().flatten().unwrap_or_default();
        let outcome = match status {
            None => Err("etcd did not answer (timeout or connection failure)".to_string()),
            Some(200) => Ok(body),
            Some(s) => {
                // etcd answers 400 to refused credentials, 401 to a token
                // it no longer knows (expired, or etcd restarted).
                if call == Call::Authenticate {
                    self.auth_after_ms = now.saturating_add(AUTH_RETRY_MS.max(self.fleet.sync_interval_ms));
                }
                if s == 401 {
                    self.token = None;
                }
                // etcd's error message, never a request of ours: no token
                // or password can show.
                let text: String = String::from_utf8_lossy(&body).chars().take(120).collect();
                let hint = if self.fleet.auth.is_none() && (s == 401 || text.contains("user name is empty")) {
                    " (etcd has authentication enabled: set fleet.username and fleet.password_env)"
                } else {
                    ""
                };
                Err(format!("etcd answered {s}{hint}: {text}"))
            }
        };
        match (call, outcome) {
            (_, Err(why)) => {
                self.queued.clear();
                self.failed(h, cfg, now, &why)
            }
            (Call::Authenticate, Ok(body)) => match fleet::parse_auth(&body) {
                Ok(token) => {
                    self.token = Some(token);
                    if let Err(why) = self.range(h, now) {
                        self.failed(h, cfg, now, &why);
                    }
                }
                Err(e) => {
                    self.auth_after_ms = now.saturating_add(AUTH_RETRY_MS.max(self.fleet.sync_interval_ms));
                    self.failed(h, cfg, now, &e.0)
                }
            },
            (Call::Range, Ok(body)) => match fleet::parse_range(&body) {
                Ok(kvs) => self.merge_and_push(h, cfg, EtcdView::new(kvs), now),
                Err(e) => self.failed(h, cfg, now, &e.0),
            },
            (Call::Objects, Ok(body)) => match fleet::parse_range(&body) {
                Ok(kvs) => {
                    let mut dropped = Vec::new();
                    let ops = self.sync_objects(h, cfg, &EtcdView::new(kvs), &mut dropped, now);
                    report_dropped(h, &dropped);
                    self.queued = ops.chunks(fleet::MAX_OPS).map(fleet::txn_body).collect();
                    self.send_queued(h, cfg, now);
                }
                Err(e) => self.failed(h, cfg, now, &e.0),
            },
            (Call::Txn, Ok(body)) => match fleet::parse_txn(&body) {
                Ok(true) => {
                    h.count("apikeyrouter.fleet.pushes", 1);
                    self.send_queued(h, cfg, now);
                }
                // Another instance wrote a key state or removed a marker
                // first: the next sync retries on fresh values.
                Ok(false) => {
                    h.count("apikeyrouter.fleet.push_conflicts", 1);
                    self.send_queued(h, cfg, now);
                }
                Err(e) => {
                    self.queued.clear();
                    self.failed(h, cfg, now, &e.0)
                }
            },
        }
    }

    fn failed(&mut self, h: &dyn Host, cfg: &Config, now_ms: u64, why: &str) {
        h.count("apikeyrouter.fleet.sync_failures", 1);
        let mut s = self.status(h, now_ms);
        let first = s.failures == 0;
        if s.failed(now_ms, why, self.fleet.degraded_after_ms) {
            log::warn!(
                "fleet: degraded, no sync with etcd for {} ms ({why}); serving on local state, each budget limited to {} of its limit for this instance",
                now_ms.saturating_sub(s.last_ok_ms.max(s.started_ms)),
                self.fleet.local_share
            );
            for b in &cfg.budgets {
                budget::set_local_share(h.store(), b, Some(self.fleet.local_share), now_ms);
            }
            h.gauge("apikeyrouter.fleet.degraded", 1);
        } else if first {
            log::info!("fleet: sync with etcd failed: {why}");
        }
        self.save_status(h, &s);
    }

    /// The local counters of this window: each budget's spend, and the
    /// daily and monthly tokens of keys with such quotas.
    fn counters(&self, h: &dyn Host, cfg: &Config, now_ms: u64) -> Vec<Counter> {
        let mut out = Vec::new();
        for b in &cfg.budgets {
            let r = budget::load(h.store(), b, now_ms);
            let until = b.resets_at(now_ms).unwrap_or(u64::MAX);
            let bound = r.limit(b).max(b.limit) * Decimal::from(fleet::MARKER_LIMIT_MULTIPLE);
            out.push(Counter { name: format!("b/{}", b.id), window: r.window_start_ms, until, local: r.spent, bound });
        }
        for (_, key) in cfg.keys.live() {
            let quotas =
                [(key.limits.daily_tokens, Window::Day, "day"), (key.limits.monthly_tokens, Window::Month, "month")];
            if !quotas.iter().any(|q| q.0.is_some()) {
                continue;
            }
            let r = keys::read_record(h.store(), &key.record_name).unwrap_or_default();
            for (quota, w, label) in quotas.into_iter().filter_map(|(q, w, l)| q.map(|q| (q, w, l))) {
                let (start, tokens) =
                    if w == Window::Day { (r.day_start_ms, r.day_tokens) } else { (r.month_start_ms, r.month_tokens) };
                out.push(Counter {
                    name: format!("q/{}/{label}", key.id),
                    window: w.start(now_ms),
                    until: w.next_start(now_ms),
                    local: Decimal::from(window::current(w, start, tokens, now_ms)),
                    bound: Decimal::from(quota).saturating_mul(Decimal::from(fleet::MARKER_LIMIT_MULTIPLE)),
                });
            }
        }
        out
    }

    fn merge_and_push(&mut self, h: &dyn Host, cfg: &Config, etcd: EtcdView, now_ms: u64) {
        let store = h.store();
        let prefix = self.fleet.prefix.clone();
        let counters = self.counters(h, cfg, now_ms);
        let bases_key = format!("{}.{}", fleet::BASES_KEY, self.instance);
        let mut bases = Bases::decode(store.value(&bases_key).as_deref());
        let plan = fleet::plan_counters(&prefix, &self.instance, self.life, &counters, &etcd, &mut bases, now_ms);
        let (syncs, writes, deletes, mut dropped) = (plan.syncs, plan.writes, plan.deletes, plan.dropped);
        if store.set(&bases_key, &bases.encode(), None).is_err() {
            log::warn!("fleet: could not record the counter bases");
            return;
        }
        if syncs.iter().any(|s| s.id_clash) {
            h.count("apikeyrouter.fleet.instance_conflicts", 1);
            if !self.clash_logged {
                self.clash_logged = true;
                log::error!(
                    "fleet: another Envoy process writes as instance {:?}: give every process its own node id or fleet.instance; this instance's spend is not pushed meanwhile",
                    self.instance
                );
            }
        }
        let mut states = Vec::new();
        // Tokens the others spent, by counter name (`q/<key>/day|month`).
        let mut tokens: hashbrown::HashMap<&str, (u64, u64)> = hashbrown::HashMap::new();
        for s in &syncs {
            if let Some(id) = s.name.strip_prefix("b/") {
                if let Some(b) = cfg.budgets.iter().find(|b| b.id == id) {
                    budget::set_fleet_spent(store, b, s.window, s.others, now_ms);
                }
            } else {
                tokens.insert(s.name.as_str(), (s.window, s.others.trunc().to_u64().unwrap_or(u64::MAX)));
            }
        }
        let mut applied = 0u64;
        for (_, key) in cfg.keys.live() {
            let skey = fleet::state_key(&prefix, &key.id);
            let kv = etcd.get(&skey);
            let mut shared = kv.and_then(|kv| SharedState::parse(&kv.value));
            let why = shared.as_ref().and_then(|s| s.out_of_bounds(now_ms, cfg.cooldown.max_ms));
            if let Some(why) = why {
                dropped.push(Dropped { key: skey.clone(), why });
                shared = None;
            }
            let day = tokens.get(format!("q/{}/day", key.id).as_str()).copied();
            let month = tokens.get(format!("q/{}/month", key.id).as_str()).copied();
            let after = if shared.is_some() || day.is_some() || month.is_some() {
                match keys::apply_fleet(store, &key.record_name, shared.as_ref(), day, month, now_ms) {
                    Ok((before, after)) => {
                        let (was, now) = (before.effective(now_ms), after.effective(now_ms));
                        if was != now {
                            applied += 1;
                            let by = shared.as_ref().map_or("?", |s| s.by.as_str());
                            log::info!("fleet: key {} is {} as instance {by} reported", key.id, now.as_str());
                            transition::record(
                                store,
                                cfg.max_transitions,
                                Transition {
                                    time_ms: now_ms,
                                    kind: "key".into(),
                                    id: key.id.clone(),
                                    from: was.as_str().into(),
                                    to: now.as_str().into(),
                                    reason: format!("fleet: reported by instance {by}"),
                                    seq: 0,
                                },
                            );
                        }
                        after
                    }
                    Err(e) => {
                        log::warn!("fleet: key {}: state not merged ({e:?})", key.id);
                        continue;
                    }
                }
            } else {
                keys::read_record(store, &key.record_name).unwrap_or_default()
            };
            if let Some(s) = fleet::state_to_push(&after, shared.as_ref(), &self.instance, now_ms) {
                states.push(Op::Put { key: skey, value: s.to_json(), guard: Some(Guard::of(kv)) });
            } else if why.is_some() {
                // Nothing of ours replaces the dropped state: removed.
                states.push(Op::Delete { key: skey, guard: Guard::of(kv) });
            }
        }
        states.extend(self.admin_changes(h, cfg, &etcd, now_ms));
        report_dropped(h, &dropped);
        h.count("apikeyrouter.fleet.syncs", 1);
        h.count("apikeyrouter.fleet.states_applied", applied);
        let mut s = self.status(h, now_ms);
        s.instance = self.instance.clone();
        s.peers = fleet::peers(&prefix, &self.instance, &etcd);
        if s.succeeded(now_ms) {
            log::info!("fleet: etcd reachable again; local spend is pushed and budgets are fleet-wide again");
        }
        // Lifts the share of a degraded spell or of the start-up (also one a
        // late-starting root context set just after the first sync).
        for b in &cfg.budgets {
            if budget::load(store, b, now_ms).local_share.is_some() {
                budget::set_local_share(store, b, None, now_ms);
            }
        }
        h.gauge("apikeyrouter.fleet.degraded", 0);
        self.save_status(h, &s);
        // This instance's markers (plain puts, never refused), then key
        // states and removals (guarded: a race refuses them until the next
        // sync), at most MAX_OPS writes per transaction.
        self.queued.clear();
        for batch in [writes, states, deletes] {
            for chunk in batch.chunks(fleet::MAX_OPS) {
                self.queued.push(fleet::txn_body(chunk));
            }
        }
        self.send_queued(h, cfg, now_ms);
    }
}

/// Counts and logs the values read from etcd and dropped.
fn report_dropped(h: &dyn Host, dropped: &[Dropped]) {
    if dropped.is_empty() {
        return;
    }
    h.count(crate::metrics::FLEET_VALUES_DROPPED, dropped.len() as u64);
    for d in dropped {
        let key: String = d.key.chars().take(200).collect();
        log::warn!("fleet: dropped {key:?} read from etcd: {}", d.why);
    }
}

impl FleetSync {
    /// Object records (read after the sync's transactions, only those
    /// changed since the last revision learned but on every
    /// [`OBJECTS_FULL_EVERY`]th read): learns those other instances wrote
    /// (into shared data, never pushed back), removes expired and damaged
    /// ones from etcd, and returns the writes of the records this process
    /// made since (its outbox).
    fn sync_objects(
        &mut self,
        h: &dyn Host,
        cfg: &Config,
        etcd: &EtcdView,
        dropped: &mut Vec<Dropped>,
        now_ms: u64,
    ) -> Vec<Op> {
        if !cfg.objects.enabled {
            return Vec::new();
        }
        let head = crate::objects::fleet_head(&self.fleet.prefix);
        let mut ops = Vec::new();
        let mut top = self.objects_rev;
        let mut learned = 0u64;
        for kv in etcd.under(&head) {
            let id = kv.key.get(head.len()..).unwrap_or_default();
            let guard = Guard::Revision(kv.mod_revision);
            match crate::objects::Record::from_fleet(id, &kv.value, now_ms, cfg.objects.ttl_ms) {
                Err(why) => {
                    dropped.push(Dropped { key: kv.key.clone(), why });
                    ops.push(Op::Delete { key: kv.key.clone(), guard });
                }
                Ok(rec) if rec.expires_ms <= now_ms => ops.push(Op::Delete { key: kv.key.clone(), guard }),
                // A provider this configuration lacks: left for those that have it.
                Ok(rec) if cfg.provider_by_id(&rec.provider).is_none() => {}
                Ok(rec) => {
                    if kv.mod_revision > self.objects_rev
                        && crate::objects::remember(h.store(), cfg.objects.layout, &rec, now_ms).stored
                    {
                        learned += 1;
                    }
                    top = top.max(kv.mod_revision);
                }
            }
        }
        self.objects_rev = top;
        if learned > 0 {
            h.count("apikeyrouter.fleet.objects_learned", learned);
        }
        for rec in crate::objects::take_outbox(h.store()) {
            let key = format!("{head}{}", rec.id);
            ops.push(Op::Put { key, value: rec.to_json(Some(&self.instance)), guard: None });
        }
        ops
    }

    /// Runtime keys and limit overrides ([`crate::durable`]): applies here
    /// the records etcd holds newer, and returns this instance's newer
    /// changes to write. A record refused (or one that cannot apply here,
    /// e.g. an id of a configured key) is logged and counted once per
    /// revision, and skipped.
    fn admin_changes(&mut self, h: &dyn Host, cfg: &Config, etcd: &EtcdView, now_ms: u64) -> Vec<Op> {
        let store = h.store();
        let prefix = self.fleet.prefix.clone();
        let sealing = durable::Sealing::of(&self.fleet);
        let registry = crate::runtime_keys::load(store);
        let limits: Vec<_> = cfg.budgets.iter().map(|b| durable::local_limit(store, &b.id)).collect();
        let mut plan = durable::plan(&prefix, sealing, cfg, &registry, &limits, etcd, &mut self.opened, now_ms);
        let mut changed = false;
        let record = |kind: &str, id: &str, from: &str, to: String| {
            let reason = "fleet: from etcd".to_string();
            let t =
                Transition { time_ms: now_ms, kind: kind.into(), id: id.into(), from: from.into(), to, reason, seq: 0 };
            transition::record(store, cfg.max_transitions, t);
        };
        for k in &plan.keys {
            let (from, to) = if k.deleted { ("registered", "deleted") } else { ("absent", "registered") };
            match crate::runtime_keys::adopt(store, cfg, k) {
                Ok(true) => {
                    changed = true;
                    log::info!("fleet: runtime key {} {to}, as etcd holds it", k.id);
                    record("registry", &k.id, from, to.into());
                }
                Ok(false) => {}
                Err(crate::runtime_keys::RegistryError::Busy) => {
                    log::warn!("fleet: runtime key {}: the registry was busy, retried at the next sync", k.id)
                }
                Err(e) => {
                    let why = match e {
                        crate::runtime_keys::RegistryError::ConfigKey => "its id is a configured key's",
                        _ => "the runtime key registry is full",
                    };
                    let name = durable::key_record(&prefix, &k.id);
                    let mut revision = 0;
                    if let Some(seen) = self.opened.0.get_mut(&name) {
                        seen.record = Err(why);
                        revision = seen.mod_revision;
                    }
                    plan.refused.push(durable::Refused { key: name, revision, why });
                }
            }
        }
        for l in &plan.limits {
            let Some(b) = cfg.budgets.iter().find(|b| b.id == l.budget) else { continue };
            if budget::set_limit(store, b, l.limit, now_ms).is_some() && durable::adopt_limit(store, l) {
                let to = l.limit.map_or("its configured value".to_string(), budget::show);
                log::info!("fleet: budget {} limit set to {to}, as etcd holds it", b.id);
                record("budget", &b.id, "limit", format!("limit {to}"));
            }
        }
        for r in plan.refused.iter().filter(|r| durable::first_report(store, r)) {
            h.count(crate::metrics::FLEET_VALUES_DROPPED, 1);
            let key: String = r.key.chars().take(200).collect();
            log::warn!("fleet: skipped {key:?} read from etcd (revision {}): {}", r.revision, r.why);
        }
        if changed {
            crate::shared_data::bump_generation(store);
        }
        plan.writes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::base64_encode;
    use crate::stages::fake::{FakeHost, World};
    use serde_json::{json, Value};

    const NOW: u64 = 20_000 * 86_400_000;

    fn config(auth: bool) -> Config {
        let auth = if auth { r#","username":"gw","password_env":"ETCD_PASSWORD""# } else { "" };
        let json = format!(
            r#"{{"providers":[{{"id":"p","keys":[{{"id":"k1","secret":"s1"}},{{"id":"k2","secret":"s2"}}]}}],
               "fleet":{{"etcd_cluster":"etcd","prefix":"/p","instance":"gw-1","max_range_bytes":65536{auth}}}}}"#
        );
        let env = |n: &str| match n {
            "ETCD_PASSWORD" => Some("etcd-secret-pw".to_string()),
            crate::config::ENCRYPTION_KEY_ENV => Some(FERNET_KEY.to_string()),
            _ => None,
        };
        crate::config::compile(json.as_bytes(), &env).unwrap_or_else(|e| panic!("{e}"))
    }

    const FERNET_KEY: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";

    struct Rig {
        world: std::rc::Rc<World>,
        h: FakeHost,
        cfg: Config,
        sync: FleetSync,
    }

    impl Rig {
        fn new(auth: bool) -> Rig {
            let world = World::new(NOW);
            let h = FakeHost::new(&world);
            let cfg = config(auth);
            let fleet = cfg.fleet.clone().unwrap_or_else(|| panic!("no fleet"));
            let sync = FleetSync::new(&h, &cfg, fleet, "gw-1".into(), 42);
            Rig { world, h, cfg, sync }
        }

        /// The last call made: its path, its authorization header, its body.
        fn last_call(&self) -> (String, Option<String>, Value) {
            let calls = self.world.calls.borrow();
            let (_, headers, body) = calls.last().unwrap_or_else(|| panic!("no call"));
            let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            let body = serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}"));
            (find(":path").unwrap_or_default(), find("authorization"), body)
        }

        fn answer(&mut self, status: u32, body: &[u8]) {
            *self.h.response_headers.borrow_mut() = vec![(":status".into(), status.to_string())];
            *self.h.response_body.borrow_mut() = body.to_vec();
            let token = self.world.calls.borrow().len() as u32;
            self.sync.on_response(self.h.callback(), &self.cfg, token, 1, body.len());
        }

        fn tick(&mut self) {
            self.world.advance(1_000);
            self.sync.tick(self.h.callback(), &self.cfg, self.world.now_ms.get());
        }
    }

    fn range_answer(kvs: &[(&str, String)]) -> Vec<u8> {
        let kvs: Vec<Value> = kvs
            .iter()
            .map(|(k, v)| json!({"key": base64_encode(k.as_bytes()), "value": base64_encode(v.as_bytes()), "mod_revision": "5"}))
            .collect();
        json!({"header": {"revision": "5"}, "kvs": kvs}).to_string().into_bytes()
    }

    #[test]
    fn with_etcd_auth_the_token_is_fetched_first_sent_with_every_call_and_fetched_again_on_401() {
        let mut rig = Rig::new(true);
        rig.tick();
        let (path, auth, body) = rig.last_call();
        assert_eq!(
            (path.as_str(), auth, body),
            ("/v3/auth/authenticate", None, json!({"name": "gw", "password": "etcd-secret-pw"}))
        );
        rig.answer(200, br#"{"header":{"revision":"1"},"token":"tok.1"}"#);
        let (path, auth, _) = rig.last_call();
        assert_eq!((path.as_str(), auth.as_deref()), ("/v3/kv/range", Some("tok.1")), "the range follows at once");
        rig.answer(200, &range_answer(&[]));
        assert_eq!(rig.world.counter("apikeyrouter.fleet.syncs"), 1);
        // etcd restarted: the token is refused, and fetched again.
        rig.tick();
        rig.answer(401, br#"{"error":"etcdserver: invalid auth token","code":16}"#);
        rig.tick();
        assert_eq!(rig.last_call().0, "/v3/auth/authenticate");
        // Refused credentials are not tried again at once (each try costs
        // etcd a bcrypt).
        rig.answer(400, br#"{"error":"etcdserver: authentication failed, invalid user ID or password","code":3}"#);
        let calls = rig.world.calls.borrow().len();
        rig.tick();
        assert_eq!(rig.world.calls.borrow().len(), calls, "waits AUTH_RETRY_MS");
        rig.tick();
        rig.tick();
        assert_eq!(rig.last_call().0, "/v3/auth/authenticate");
        let status = Status::decode(rig.h.store().value(fleet::STATUS_KEY).as_deref()).unwrap_or_default();
        assert!(!status.last_error.contains("etcd-secret-pw") && !status.last_error.contains("tok.1"));
    }

    #[test]
    fn a_poisoned_key_state_is_dropped_counted_and_removed_and_the_key_stays_available() {
        let mut rig = Rig::new(false);
        rig.tick();
        let poisoned = json!({"state": "disabled", "reason": 2, "at_ms": u64::MAX, "cooldown_until_ms": u64::MAX,
                              "exhausted_until_ms": 0, "by": "evil"});
        rig.answer(200, &range_answer(&[("/p/s/k1", poisoned.to_string())]));
        assert_eq!(rig.world.counter(crate::metrics::FLEET_VALUES_DROPPED), 1);
        let k1 = keys::read_record(rig.h.store(), &rig.cfg.keys[0].record_name).unwrap_or_default();
        assert_eq!(k1.effective(rig.world.now_ms.get()), crate::key_record::Effective::Available);
        let (path, _, body) = rig.last_call();
        assert_eq!(path, "/v3/kv/txn");
        assert_eq!(body["success"][0]["requestDeleteRange"]["key"], base64_encode(b"/p/s/k1"), "{body}");
        assert_eq!(body["compare"][0]["mod_revision"], "5", "only the value read is removed");
    }

    #[test]
    fn object_records_are_pushed_from_the_outbox_learned_from_others_and_planted_ones_dropped() {
        use crate::objects::{lookup, queue_for_fleet, Kind, Record, OUTBOX};
        let mut rig = Rig::new(false);
        let now = NOW + 1_000;
        let mine = Record {
            id: "file-mine".into(),
            kind: Kind::File,
            provider: "p".into(),
            group: String::new(),
            owner: String::new(),
            created_ms: now,
            expires_ms: now + 60_000,
            from_fleet: false,
        };
        queue_for_fleet(rig.h.store(), &mine);
        rig.tick();
        let theirs = Record { id: "resp_theirs".into(), kind: Kind::Response, from_fleet: true, ..mine.clone() };
        let expired = Record {
            id: "batch_old".into(),
            kind: Kind::Batch,
            created_ms: now - 10,
            expires_ms: now - 1,
            ..mine.clone()
        };
        let planted = theirs.to_json(Some("evil")).replace("\"kind\":\"response\"", "\"kind\":\"file\"");
        // The sync's own range leaves the object records out ...
        let (path, _, body) = rig.last_call();
        assert_eq!((path.as_str(), &body["range_end"]), ("/v3/kv/range", &json!(base64_encode(b"/p/~"))));
        rig.answer(200, &range_answer(&[]));
        while rig.last_call().0 == "/v3/kv/txn" {
            rig.answer(200, br#"{"header":{"revision":"6"},"succeeded":true}"#);
        }
        // ... and reads them after its transactions: all of them the first time.
        let (path, _, body) = rig.last_call();
        assert_eq!((path.as_str(), &body["key"]), ("/v3/kv/range", &json!(base64_encode(b"/p/~o/"))));
        assert_eq!(body.get("min_mod_revision"), None);
        rig.answer(
            200,
            &range_answer(&[
                ("/p/~o/resp_theirs", theirs.to_json(Some("gw-2"))),
                ("/p/~o/batch_old", expired.to_json(Some("gw-2"))),
                ("/p/~o/resp_planted", planted),
            ]),
        );
        let layout = rig.cfg.objects.layout;
        assert_eq!(lookup(rig.h.store(), layout, "resp_theirs", now), Some(theirs));
        assert_eq!(lookup(rig.h.store(), layout, "resp_planted", now), None);
        assert_eq!(rig.world.counter(crate::metrics::FLEET_VALUES_DROPPED), 1);
        assert_eq!(rig.world.counter("apikeyrouter.fleet.objects_learned"), 1);
        // Every transaction of this sync: this instance's record is put, the
        // expired and the planted ones removed; the outbox is empty.
        let mut bodies = Vec::new();
        while rig.last_call().0 == "/v3/kv/txn" && bodies.len() < 10 {
            bodies.push(rig.last_call().2.to_string());
            rig.answer(200, br#"{"header":{"revision":"6"},"succeeded":true}"#);
        }
        let all = bodies.join(" ");
        for key in ["/p/~o/file-mine", "/p/~o/batch_old", "/p/~o/resp_planted"] {
            assert!(all.contains(&base64_encode(key.as_bytes())), "{key} not written: {all}");
        }
        assert!(!all.contains(&base64_encode(b"/p/~o/resp_theirs")), "another instance's record is left alone");
        assert_eq!(crate::objects::decode(&rig.h.store().value(OUTBOX).unwrap_or_default()), Some(vec![]));
        // The next sync reads only the records written after those seen.
        rig.tick();
        rig.answer(200, &range_answer(&[]));
        while rig.last_call().0 == "/v3/kv/txn" {
            rig.answer(200, br#"{"header":{"revision":"7"},"succeeded":true}"#);
        }
        assert_eq!(rig.last_call().2["min_mod_revision"], "6");
    }

    #[test]
    fn a_range_answer_above_the_cap_is_not_read() {
        let mut rig = Rig::new(false);
        rig.tick();
        *rig.h.response_headers.borrow_mut() = vec![(":status".into(), "200".into())];
        let before = rig.h.log.borrow().iter().filter(|c| **c == "buffer").count();
        rig.sync.on_response(&rig.h, &rig.cfg, 1, 1, 65_537);
        assert_eq!(rig.h.log.borrow().iter().filter(|c| **c == "buffer").count(), before, "not copied into the VM");
        assert_eq!(rig.world.counter(crate::metrics::FLEET_VALUES_DROPPED), 1);
        assert_eq!(rig.world.counter("apikeyrouter.fleet.sync_failures"), 1);
        let status = Status::decode(rig.h.store().value(fleet::STATUS_KEY).as_deref()).unwrap_or_default();
        assert!(status.last_error.contains("above fleet.max_range_bytes"), "{}", status.last_error);
    }

    #[test]
    fn a_runtime_key_in_etcd_is_registered_here_and_one_registered_here_is_written_encrypted() {
        let mut rig = Rig::new(false);
        let k = crate::runtime_keys::parse_new_key(br#"{"id":"mine","key_material":"sk-mine-secret"}"#, &rig.cfg);
        let mut k = k.unwrap_or_else(|e| panic!("{e:?}"));
        k.at_ms = NOW;
        assert!(crate::runtime_keys::register(rig.h.store(), &rig.cfg, k).is_ok());
        let fernet = crate::fernet::FernetKey::parse(FERNET_KEY).unwrap_or_else(|e| panic!("{e}"));
        let theirs = json!({"id": "theirs", "provider": "p", "secret": "sk-theirs-secret", "weight": 2,
                            "metadata": {}, "deleted": false, "at_ms": NOW - 10});
        let sealed = format!("fernet:{}", fernet.encrypt(theirs.to_string().as_bytes(), NOW / 1000, [7; 16]));
        rig.tick();
        rig.answer(200, &range_answer(&[("/p/k/theirs", sealed)]));
        let reg = crate::runtime_keys::load(rig.h.store());
        let live: Vec<(&str, &str)> =
            reg.keys.iter().filter(|k| !k.deleted).map(|k| (k.id.as_str(), k.secret.as_str())).collect();
        assert_eq!(live, vec![("mine", "sk-mine-secret"), ("theirs", "sk-theirs-secret")]);
        let (path, _, body) = rig.last_call();
        assert_eq!(path, "/v3/kv/txn");
        let text = body.to_string();
        assert!(!text.contains("sk-mine") && !text.contains(&base64_encode(b"sk-mine")), "{text}");
        let put = body["success"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|op| op["requestPut"]["key"] == base64_encode(b"/p/k/mine"))
            .unwrap_or_else(|| panic!("no write of /p/k/mine: {text}"));
        let value = crate::encoding::base64_decode(put["requestPut"]["value"].as_str().unwrap_or(""));
        let value = String::from_utf8(value.unwrap_or_default()).unwrap_or_default();
        let token = value.strip_prefix("fernet:").unwrap_or_else(|| panic!("not sealed: {value}"));
        let opened: Value = serde_json::from_slice(&fernet.decrypt(token).unwrap_or_default()).unwrap_or_default();
        assert_eq!((opened["id"].as_str(), opened["secret"].as_str()), (Some("mine"), Some("sk-mine-secret")));
        assert_eq!(rig.world.counter(crate::metrics::FLEET_VALUES_DROPPED), 0);
    }
}
