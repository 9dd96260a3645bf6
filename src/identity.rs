//! Caller identity (virtual keys) and per-client and per-team policies.
//!
//! Callers present `Authorization: Bearer <virtual key>` or `x-api-key`. The
//! config holds each client's id, team, the SHA-256 of its key (never the key)
//! and an optional expiry, in [`Clients`], which also indexes the clients by
//! that digest: a presented key is hashed once and looked up, whatever the
//! number of clients. Policies come from the client's team and are
//! overridden field by field by the client's own.

use crate::codec::{Reader, Writer};
use crate::crypto::sha256;
use crate::objective::Objective;
use crate::reply::{self, Reply};
use crate::request::RequestInfo;
use crate::store::{update, Store};
use crate::window::Window;
use hashbrown::HashMap;
use rust_decimal::Decimal;

/// What a client (or its team) may do.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    /// Provider ids; `None` allows all.
    pub allowed_providers: Option<Vec<String>>,
    /// Exact names, `prefix*`, or `*`; `None` allows all.
    pub allowed_models: Option<Vec<String>>,
    /// Endpoints ([`crate::providers::endpoint`]): exact, `prefix/*`, or
    /// `*`, for every method; `None` allows [`DEFAULT_ENDPOINTS`] by `POST`
    /// and [`DEFAULT_READS`] by `GET`.
    pub allowed_endpoints: Option<Vec<String>>,
    /// Requested model -> the model sent to the provider.
    pub model_aliases: Vec<(String, String)>,
    pub max_tokens: Option<u64>,
    pub max_cost_per_request: Option<Decimal>,
    /// The client's default objective.
    pub objective: Option<Objective>,
    /// When true the objective header is ignored for this client.
    pub force_objective: bool,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
}

impl Policy {
    /// `self` with every field `over` sets taken from `over`.
    pub fn overridden_by(&self, over: &Policy) -> Policy {
        Policy {
            allowed_providers: over.allowed_providers.clone().or_else(|| self.allowed_providers.clone()),
            allowed_models: over.allowed_models.clone().or_else(|| self.allowed_models.clone()),
            allowed_endpoints: over.allowed_endpoints.clone().or_else(|| self.allowed_endpoints.clone()),
            model_aliases: if over.model_aliases.is_empty() {
                self.model_aliases.clone()
            } else {
                over.model_aliases.clone()
            },
            max_tokens: over.max_tokens.or(self.max_tokens),
            max_cost_per_request: over.max_cost_per_request.or(self.max_cost_per_request),
            objective: over.objective.clone().or_else(|| self.objective.clone()),
            force_objective: over.force_objective || self.force_objective,
            rpm: over.rpm.or(self.rpm),
            tpm: over.tpm.or(self.tpm),
        }
    }
}

/// A configured client.
#[derive(Clone, PartialEq)]
pub struct Client {
    pub id: String,
    pub team: Option<String>,
    pub key_sha256: [u8; 32],
    pub expires_ms: Option<u64>,
    /// The team's policy overridden by the client's.
    pub policy: Policy,
    pub record_name: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("id", &self.id).field("team", &self.team).finish_non_exhaustive()
    }
}

fn unauthorized(message: &str) -> Reply {
    let mut r = reply::error(401, "invalid_request_error", "invalid_api_key", message);
    r.headers.push(("www-authenticate", "Bearer".to_string()));
    r
}

/// The configured clients, by index, and an index from the SHA-256 of each
/// one's key to it. The two change only together ([`Clients::push`]), so
/// every copy of a configuration (a runtime-key merge clones it) carries an
/// index that matches its list.
#[derive(Clone, PartialEq, Default)]
pub struct Clients {
    list: Vec<Client>,
    by_key: HashMap<[u8; 32], usize>,
}

impl Clients {
    /// Adds a client; its index, or, when another client already has the
    /// same key digest, that client's index (and nothing is added).
    pub fn push(&mut self, client: Client) -> Result<usize, usize> {
        let i = self.list.len();
        match self.by_key.try_insert(client.key_sha256, i) {
            Ok(_) => {
                self.list.push(client);
                Ok(i)
            }
            Err(taken) => Err(*taken.entry.get()),
        }
    }

    /// The client at index `i`.
    pub fn get(&self, i: usize) -> Option<&Client> {
        self.list.get(i)
    }

    /// No clients: an open gateway.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Client> {
        self.list.iter()
    }

    /// The client whose key has this SHA-256 digest.
    ///
    /// A hash-map lookup is not constant-time: how long it takes depends
    /// on the bytes of the presented digest and of the digests stored near
    /// it. That is safe here, where comparing the keys themselves would not
    /// be, because what the timing can reveal is about digests, and a
    /// digest is the SHA-256 of a secret: a caller chooses a key, not its
    /// digest, so learning that its digest shares a bucket or some leading
    /// bytes with a stored one does not bring it closer to that stored
    /// digest (each further byte costs 256 times the hashing, which is
    /// brute force over the key space), and even a whole digest gives the
    /// key only through a preimage of SHA-256, which is infeasible for a key
    /// with enough entropy. The map is filled from the configuration only,
    /// so callers cannot load it with colliding entries either. This
    /// replaces a constant-time comparison against every client, whose cost
    /// grew with their number.
    fn by_key(&self, digest: &[u8; 32]) -> Option<usize> {
        self.by_key.get(digest).copied()
    }
}

impl<'a> IntoIterator for &'a Clients {
    type Item = &'a Client;
    type IntoIter = std::slice::Iter<'a, Client>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

impl std::fmt::Debug for Clients {
    // Hand-written so that `{:?}` never prints the key digests of the index
    // (a weak key could be found from its digest offline).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.list).finish()
    }
}

#[cfg(test)]
impl std::ops::Index<usize> for Clients {
    type Output = Client;
    fn index(&self, i: usize) -> &Client {
        self.get(i).unwrap_or_else(|| panic!("no client {i}"))
    }
}

/// The client presenting `authorization` or `x_api_key`, by index; `Ok(None)`
/// when no clients are configured (an open gateway). The presented key is
/// hashed once and its digest looked up (see [`Clients::by_key`]).
pub fn authenticate(
    clients: &Clients,
    authorization: Option<&str>,
    x_api_key: Option<&str>,
    now_ms: u64,
) -> Result<Option<usize>, Reply> {
    if clients.is_empty() {
        return Ok(None);
    }
    let bearer = authorization
        .map(str::trim)
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).map(str::trim));
    let Some(presented) = bearer.or(x_api_key.map(str::trim)).filter(|k| !k.is_empty()) else {
        return Err(unauthorized(
            "You didn't provide an API key. Send your gateway key as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
        ));
    };
    let Some(i) = clients.by_key(&sha256(presented.as_bytes())) else {
        return Err(unauthorized("Incorrect API key provided."));
    };
    if clients.get(i).is_some_and(|c| c.expires_ms.is_some_and(|t| now_ms >= t)) {
        return Err(unauthorized("This API key has expired."));
    }
    Ok(Some(i))
}

fn model_allowed(patterns: &[String], model: &str) -> bool {
    patterns.iter().any(|p| p == "*" || p == model || p.strip_suffix('*').is_some_and(|pre| model.starts_with(pre)))
}

fn forbidden(code: &str, message: &str) -> Reply {
    reply::error(403, "permission_error", code, message)
}

/// Whether `client` may use `provider`.
pub fn check_provider(client: &Client, provider: &str) -> Result<(), Reply> {
    match &client.policy.allowed_providers {
        Some(list) if !list.iter().any(|p| p == provider) => Err(forbidden(
            "provider_not_allowed",
            &format!("Client '{}' may not use provider '{provider}'.", client.id),
        )),
        _ => Ok(()),
    }
}

/// The inference endpoints a client may call by `POST` when its policy sets
/// no `allowed_endpoints`: nothing that lists, reads or deletes what is
/// stored in the shared provider account (files, stored responses and
/// completions, batches, assistants, vector stores, fine-tuning).
pub const DEFAULT_ENDPOINTS: &[&str] = &[
    "chat/completions",
    "completions",
    "embeddings",
    "responses",
    "messages",
    "messages/count_tokens",
    "moderations",
    "audio/*",
    "images/*",
    "generateContent",
    "streamGenerateContent",
    "embedContent",
    "batchEmbedContents",
    "countTokens",
];

/// What a client may read by `GET` when its policy sets no
/// `allowed_endpoints`: the model list and a model's description.
pub const DEFAULT_READS: &[&str] = &["models", "models/*"];

/// Whether `endpoint` matches an `allowed_endpoints` entry: `*`, a prefix
/// ending in `/*`, or the exact endpoint.
fn endpoint_listed(list: &[impl AsRef<str>], endpoint: &str) -> bool {
    list.iter().any(|e| match e.as_ref() {
        "*" => true,
        e => match e.strip_suffix('*') {
            Some(prefix) => endpoint.starts_with(prefix),
            None => e == endpoint,
        },
    })
}

/// Whether `client` may call the endpoint of `path` with `method`.
pub fn check_endpoint(client: &Client, method: &str, path: &str) -> Result<(), Reply> {
    let ep = crate::providers::endpoint(path);
    let ok = ep.is_some_and(|ep| match &client.policy.allowed_endpoints {
        Some(list) => endpoint_listed(list, ep),
        None => {
            (method == "POST" && endpoint_listed(DEFAULT_ENDPOINTS, ep))
                || (method == "GET" && endpoint_listed(DEFAULT_READS, ep))
        }
    });
    if ok {
        return Ok(());
    }
    let shown: String = path.split('?').next().unwrap_or(path).chars().take(128).collect();
    Err(forbidden("endpoint_not_allowed", &format!("Client '{}' may not call {method} {shown:?}.", client.id)))
}

/// Applies the client's model policy to a request body: the model sent to
/// the provider (after aliases), or a refusal.
pub fn check_request(client: &Client, info: &RequestInfo) -> Result<Option<String>, Reply> {
    let p = &client.policy;
    let mut rewritten = None;
    if let Some(model) = info.model.as_deref() {
        let target = p.model_aliases.iter().find(|(from, _)| from == model).map(|(_, to)| to.as_str());
        let effective = target.unwrap_or(model);
        if let Some(allowed) = &p.allowed_models {
            if !model_allowed(allowed, effective) {
                return Err(forbidden(
                    "model_not_allowed",
                    &format!("Client '{}' may not use model '{effective}'.", client.id),
                ));
            }
        }
        rewritten = target.map(str::to_string);
    }
    if let (Some(cap), Some(asked)) = (p.max_tokens, info.max_tokens) {
        if asked > cap {
            return Err(reply::error(
                400,
                "invalid_request_error",
                "max_tokens_too_large",
                &format!("max_tokens {asked} is above the limit of {cap} for client '{}'.", client.id),
            ));
        }
    }
    Ok(rewritten)
}

/// Rewrites the `model` of a JSON body.
pub fn rewrite_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.as_object_mut()?.insert("model".into(), serde_json::Value::String(model.to_string()));
    serde_json::to_vec(&v).ok()
}

/// A client's use in the current UTC minute: `start:u64 requests:u64 tokens:u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientUsage {
    pub minute_start_ms: u64,
    pub requests: u64,
    pub tokens: u64,
}

impl ClientUsage {
    /// Words missing from a short record read as zero.
    pub fn decode(b: &[u8]) -> ClientUsage {
        let mut r = Reader::new(b);
        let mut u = || r.u64().unwrap_or(0);
        ClientUsage { minute_start_ms: u(), requests: u(), tokens: u() }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Writer::with_capacity(24);
        out.u64(self.minute_start_ms).u64(self.requests).u64(self.tokens);
        out.finish()
    }

    fn current(mut self, now_ms: u64) -> ClientUsage {
        let start = Window::Minute.start(now_ms);
        if self.minute_start_ms != start {
            self = ClientUsage { minute_start_ms: start, requests: 0, tokens: 0 };
        }
        self
    }
}

/// Admits one request against the client's rpm and tpm, counting it in the
/// same compare-and-swap, so the limit holds exactly under concurrency.
pub fn admit_rate(store: &dyn Store, client: &Client, now_ms: u64) -> Result<(), Reply> {
    let p = &client.policy;
    if p.rpm.is_none() && p.tpm.is_none() {
        return Ok(());
    }
    let (r, _) = update(store, &client.record_name, |cur| {
        let mut u = cur.map(ClientUsage::decode).unwrap_or_default().current(now_ms);
        if p.rpm.is_some_and(|rpm| u.requests >= rpm) {
            return Err("requests per minute");
        }
        if p.tpm.is_some_and(|tpm| u.tokens >= tpm) {
            return Err("tokens per minute");
        }
        u.requests += 1;
        Ok(((), u.encode()))
    });
    match r {
        Ok(()) => Ok(()),
        Err(crate::store::UpdateError::Rejected(what)) => {
            let wait = Window::Minute.next_start(now_ms).saturating_sub(now_ms).div_ceil(1000).max(1);
            let mut reply = reply::error(
                429,
                "rate_limit_error",
                "client_rate_limited",
                &format!("Client '{}' is over its {what} limit; retry in {wait} s.", client.id),
            );
            reply.headers.push(("retry-after", wait.to_string()));
            Err(reply)
        }
        // The record could not be updated: the limit cannot be kept, so the
        // request is not admitted (it never reached the provider).
        Err(e) => {
            log::warn!("client {}: rate record not updatable ({e:?})", client.id);
            let mut reply = reply::error(
                503,
                "api_error",
                "rate_limit_unavailable",
                &format!("Client '{}' rate limits could not be checked right now; retry.", client.id),
            );
            reply.headers.push(("retry-after", "1".to_string()));
            Err(reply)
        }
    }
}

/// Adds a finished request's tokens to the client's minute (for tpm).
pub fn record_tokens(store: &dyn Store, client: &Client, tokens: u64, now_ms: u64) {
    if client.policy.tpm.is_none() || tokens == 0 {
        return;
    }
    let _ = update(store, &client.record_name, |cur| {
        let mut u = cur.map(ClientUsage::decode).unwrap_or_default().current(now_ms);
        u.tokens = u.tokens.saturating_add(tokens);
        Ok::<_, ()>(((), u.encode()))
    });
}

/// Reads a client's use in the current minute.
pub fn usage(store: &dyn Store, client: &Client, now_ms: u64) -> ClientUsage {
    store.value(&client.record_name).map(|b| ClientUsage::decode(&b)).unwrap_or_default().current(now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::sha256;
    use crate::request::inspect;
    use crate::store::FakeStore;

    fn client(key: &str, policy: Policy) -> Client {
        Client {
            id: "app".into(),
            team: Some("blue".into()),
            key_sha256: sha256(key.as_bytes()),
            expires_ms: Some(10_000),
            policy,
            record_name: "akr.v1.client.app".into(),
        }
    }

    fn code(r: &Reply) -> String {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {:?}", r.body));
        v["error"]["code"].as_str().unwrap_or_default().to_string()
    }

    fn clients(list: Vec<Client>) -> Clients {
        let mut out = Clients::default();
        for c in list {
            let id = c.id.clone();
            out.push(c).unwrap_or_else(|other| panic!("{id}: same key as client {other}"));
        }
        out
    }

    fn message(r: &Reply) -> String {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {:?}", r.body));
        v["error"]["message"].as_str().unwrap_or_default().to_string()
    }

    #[test]
    fn callers_are_known_by_the_hash_of_their_key() {
        let cs = clients(vec![
            client("vk-one", Policy::default()),
            Client { id: "b".into(), ..client("vk-two", Policy::default()) },
        ]);
        assert_eq!(authenticate(&cs, Some("Bearer vk-two"), None, 0).ok(), Some(Some(1)));
        assert_eq!(authenticate(&cs, None, Some("vk-one"), 0).ok(), Some(Some(0)));
        for (auth, api_key) in
            [(None, None), (Some("Bearer nope"), None), (Some("Basic vk-one"), None), (Some("Bearer "), None)]
        {
            let r = authenticate(&cs, auth, api_key, 0).err().unwrap_or_else(|| panic!("{auth:?} admitted"));
            assert_eq!((r.status, code(&r)), (401, "invalid_api_key".to_string()));
        }
        let expired = authenticate(&cs, Some("Bearer vk-one"), None, 10_000).err();
        assert!(expired.is_some_and(|r| String::from_utf8_lossy(&r.body).contains("expired")));
        assert_eq!(authenticate(&Clients::default(), None, None, 0).ok(), Some(None), "no clients: open");
    }

    #[test]
    fn the_presented_key_finds_its_own_client_among_ten_thousand() {
        let n = 10_000;
        let cs = clients(
            (0..n)
                .map(|i| Client {
                    id: format!("c{i}"),
                    expires_ms: (i % 2 == 1).then_some(10_000),
                    ..client(&format!("vk-{i:05}"), Policy::default())
                })
                .collect(),
        );
        assert_eq!(cs.len(), n);
        for i in [0, 1, 4_998, 4_999, n - 2, n - 1] {
            let found = authenticate(&cs, Some(&format!("Bearer vk-{i:05}")), None, 0).ok().flatten();
            assert_eq!(found, Some(i), "vk-{i:05}");
            assert_eq!(cs.get(i).map(|c| c.id.clone()), Some(format!("c{i}")));
        }
        let unknown = authenticate(&cs, Some("Bearer vk-10000"), None, 0).err().unwrap_or_else(|| panic!("admitted"));
        assert_eq!((unknown.status, code(&unknown)), (401, "invalid_api_key".to_string()));
        assert_eq!(message(&unknown), "Incorrect API key provided.");
        assert!(unknown.headers.contains(&("www-authenticate", "Bearer".to_string())));
        // Odd clients expire at 10 s: from then on their keys are refused
        // as expired, and the others still admitted.
        let expired = authenticate(&cs, None, Some("vk-09999"), 10_000).err().unwrap_or_else(|| panic!("admitted"));
        assert_eq!((expired.status, message(&expired)), (401, "This API key has expired.".to_string()));
        assert_eq!(authenticate(&cs, None, Some("vk-09998"), 10_000).ok(), Some(Some(n - 2)));
        assert_eq!(authenticate(&cs, None, Some("vk-09999"), 9_999).ok(), Some(Some(n - 1)));
    }

    #[test]
    fn a_second_client_with_the_same_key_is_not_added_and_names_the_first() {
        let mut cs = clients(vec![
            client("vk-one", Policy::default()),
            Client { id: "b".into(), ..client("vk-two", Policy::default()) },
        ]);
        assert_eq!(cs.push(Client { id: "c".into(), ..client("vk-two", Policy::default()) }), Err(1));
        assert_eq!(cs.len(), 2);
        assert_eq!(authenticate(&cs, Some("Bearer vk-two"), None, 0).ok(), Some(Some(1)), "the first keeps its key");
        assert_eq!(cs.push(Client { id: "d".into(), ..client("vk-three", Policy::default()) }), Ok(2));
        assert_eq!(authenticate(&cs, Some("Bearer vk-three"), None, 0).ok(), Some(Some(2)));
    }

    #[test]
    fn debug_output_of_clients_never_shows_key_digests() {
        let cs = clients(vec![client("vk-one", Policy::default())]);
        let hex: String = sha256(b"vk-one").iter().map(|b| format!("{b:02x}")).collect();
        let shown = format!("{cs:?}");
        assert!(shown.contains("app") && !shown.contains(&hex[..8]), "{shown}");
        assert!(!shown.contains(&format!("{:?}", sha256(b"vk-one"))[..12]), "{shown}");
    }

    #[test]
    fn model_policy_allows_prefixes_rewrites_aliases_and_caps_max_tokens() {
        let p = Policy {
            allowed_models: Some(vec!["gpt-4o*".into()]),
            model_aliases: vec![("gpt-4".into(), "gpt-4o".into())],
            max_tokens: Some(100),
            ..Policy::default()
        };
        let c = client("k", p);
        let info = |b: &str| inspect(b.as_bytes()).unwrap_or_else(|e| panic!("{b}: {e}"));
        assert_eq!(check_request(&c, &info(r#"{"model":"gpt-4o-mini"}"#)).ok(), Some(None));
        assert_eq!(check_request(&c, &info(r#"{"model":"gpt-4"}"#)).ok(), Some(Some("gpt-4o".to_string())));
        let r = check_request(&c, &info(r#"{"model":"o1"}"#)).err().unwrap_or_else(|| panic!("admitted"));
        assert_eq!((r.status, code(&r)), (403, "model_not_allowed".to_string()));
        let r = check_request(&c, &info(r#"{"model":"gpt-4o","max_tokens":101}"#))
            .err()
            .unwrap_or_else(|| panic!("admitted"));
        assert_eq!((r.status, code(&r)), (400, "max_tokens_too_large".to_string()));
        let out =
            rewrite_model(br#"{"model":"gpt-4","messages":[]}"#, "gpt-4o").unwrap_or_else(|| panic!("not rewritten"));
        assert_eq!(inspect(&out).ok().and_then(|i| i.model), Some("gpt-4o".to_string()));
    }

    #[test]
    fn providers_can_be_restricted() {
        let c = client("k", Policy { allowed_providers: Some(vec!["azure".into()]), ..Policy::default() });
        assert_eq!(check_provider(&c, "openai").err().map(|r| r.status), Some(403));
        assert!(check_provider(&c, "azure").is_ok());
    }

    #[test]
    fn client_policy_overrides_its_team_field_by_field() {
        let team = Policy { rpm: Some(10), max_tokens: Some(500), ..Policy::default() };
        let own = Policy { rpm: Some(2), ..Policy::default() };
        let p = team.overridden_by(&own);
        assert_eq!((p.rpm, p.max_tokens), (Some(2), Some(500)));
    }

    #[test]
    fn usage_bytes_are_pinned_and_short_records_read_missing_words_as_zero() {
        let u = ClientUsage { minute_start_ms: 60_000, requests: 3, tokens: 1234 };
        // minute_start_ms, requests, tokens
        let pinned = concat!("60ea000000000000", "0300000000000000", "d204000000000000");
        let b = crate::codec::pinned(&u.encode(), pinned);
        assert_eq!(ClientUsage::decode(&b), u);
        assert_eq!(ClientUsage::decode(&b[..12]), ClientUsage { minute_start_ms: 60_000, ..ClientUsage::default() });
        assert_eq!(ClientUsage::decode(&b[..23]), ClientUsage { minute_start_ms: 60_000, requests: 3, tokens: 0 });
        assert_eq!(ClientUsage::decode(&[]), ClientUsage::default());
    }

    #[test]
    fn rpm_is_exact_and_resets_each_utc_minute() {
        let s = FakeStore::new();
        let c = client("k", Policy { rpm: Some(3), ..Policy::default() });
        let admitted = (0..5).filter(|_| admit_rate(&s, &c, 1_000).is_ok()).count();
        assert_eq!(admitted, 3);
        let r = admit_rate(&s, &c, 1_000).err().unwrap_or_else(|| panic!("admitted"));
        assert!(r.headers.contains(&("retry-after", "59".to_string())));
        assert!(admit_rate(&s, &c, 60_000).is_ok(), "a new minute");
    }

    #[test]
    fn tpm_refuses_once_the_minutes_tokens_are_spent() {
        let s = FakeStore::new();
        let c = client("k", Policy { tpm: Some(100), ..Policy::default() });
        assert!(admit_rate(&s, &c, 0).is_ok());
        record_tokens(&s, &c, 100, 0);
        assert_eq!(admit_rate(&s, &c, 0).err().map(|r| r.status), Some(429));
        assert_eq!(usage(&s, &c, 0).tokens, 100);
    }
}
