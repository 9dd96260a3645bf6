//! The attempt stage (router upstream filter, once per upstream attempt):
//! chooses a key, writes the provider's auth header, learns from the
//! response (cooldown on 429, usage from JSON or SSE) and records the attempt.

use super::{abi, send, with_flights, Routing};
use crate::config::Config;
use crate::keys::{record_attempt, CooledDown};
use crate::ratelimit::{cooldown_ms, Signals};
use crate::reply;
use crate::state::Outcome;
use crate::usage::{self, SseUsage};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::cell::RefCell;
use std::rc::Rc;

/// Non-streaming bodies larger than this are passed on without reading usage.
const MAX_JSON_BODY: usize = 16 << 20;

enum Body {
    Ignore,
    Json,
    Sse(Box<SseUsage>),
}

pub(crate) struct Attempt {
    id: u32,
    cfg: Rc<Config>,
    routing: Rc<RefCell<Routing>>,
    key: Option<usize>,
    attempt: u32,
    status: u32,
    body: Body,
    usage: Option<usage::Usage>,
    recorded: bool,
}

impl Attempt {
    pub(crate) fn new(id: u32, cfg: Rc<Config>, routing: Rc<RefCell<Routing>>) -> Attempt {
        Attempt {
            id,
            cfg,
            routing,
            key: None,
            attempt: 0,
            status: 0,
            body: Body::Ignore,
            usage: None,
            recorded: false,
        }
    }

    fn outcome(&self) -> Outcome {
        Outcome {
            status: self.status,
            usage: self.usage,
            stream: matches!(self.body, Body::Sse(_)),
        }
    }

    /// Records the attempt once, with the usage seen so far.
    fn finish(&mut self) {
        if self.recorded {
            return;
        }
        if let Body::Sse(parser) = &mut self.body {
            if self.usage.is_none() {
                parser.finish();
                self.usage = parser.usage;
            }
        }
        self.record(None);
    }

    fn record(&mut self, cool_until_ms: Option<u64>) -> Option<CooledDown> {
        let k = self.key?;
        let key = self.cfg.keys.get(k)?;
        self.recorded = true;
        let (r, stats) = record_attempt(
            &abi::SharedData,
            &key.record_name,
            &self.outcome(),
            cool_until_ms,
        );
        if stats.conflicts > 0 {
            log::debug!(
                "[{}] key {}: {} cas conflicts",
                self.id,
                key.id,
                stats.conflicts
            );
        }
        match r {
            Ok(c) => c,
            Err(e) => {
                log::warn!("[{}] key {}: attempt not recorded: {e:?}", self.id, key.id);
                None
            }
        }
    }
}

impl Context for Attempt {
    // Envoy does not call on_log for router upstream filters; on_done marks
    // the end of the attempt, whether it completed, was reset or aborted.
    fn on_done(&mut self) -> bool {
        self.finish();
        true
    }
}

impl HttpContext for Attempt {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        let now = abi::now_ms();
        let rid = abi::header(abi::REQUEST_HEADERS, "x-request-id")
            .ok()
            .flatten();
        // What the ingress stage left for this request: the provider and the
        // keys earlier attempts used. Absent when the ingress stage is not
        // installed; then the first provider serves and retries still avoid
        // cooling keys through shared state.
        let (provider, tried, attempt) = rid
            .as_deref()
            .and_then(|rid| {
                with_flights(|fl| {
                    fl.get_mut(rid).map(|f| {
                        f.attempts += 1;
                        (f.provider, f.tried.clone(), f.attempts)
                    })
                })
                .flatten()
            })
            .unwrap_or_else(|| {
                let n = abi::header(abi::REQUEST_HEADERS, "x-envoy-attempt-count")
                    .ok()
                    .flatten()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                (0, Vec::new(), n)
            });
        self.attempt = attempt;

        let chosen = match self.routing.try_borrow_mut() {
            Ok(mut routing) => {
                let routing = &mut *routing;
                routing.cache.refresh(&abi::SharedData, &self.cfg);
                routing
                    .spread
                    .choose(&self.cfg, provider, &routing.cache.views, now, &tried)
            }
            Err(_) => Err(Default::default()),
        };
        match chosen {
            Ok(k) => {
                let Some(key) = self.cfg.keys.get(k) else {
                    return Action::Continue;
                };
                // Always overwrite: the header map carries over between
                // attempts, so this replaces the previous attempt's key.
                if let Err(e) =
                    abi::set_header(abi::REQUEST_HEADERS, "authorization", &key.auth_value)
                {
                    log::warn!(
                        "[{}] could not set the auth header (host status {})",
                        self.id,
                        e.0
                    );
                    let msg = "The gateway could not authenticate the request.";
                    send(&reply::gateway_error(msg), self.id);
                    return Action::Pause;
                }
                self.key = Some(k);
                if let Some(rid) = rid.as_deref() {
                    with_flights(|fl| {
                        if let Some(f) = fl.get_mut(rid) {
                            f.tried.push(k);
                        }
                    });
                }
                Action::Continue
            }
            Err(why) => {
                let pid = self
                    .cfg
                    .providers
                    .get(provider)
                    .map_or("?", |p| p.id.as_str());
                // The previous attempt's key must not go upstream either.
                let _ = abi::remove_header(abi::REQUEST_HEADERS, "authorization");
                let mut r = reply::no_key(why.retry_after_secs(now), &why.explain(pid));
                r.headers
                    .push(("x-apikeyrouter-attempts", attempt.to_string()));
                send(&r, self.id);
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        let Some(k) = self.key else {
            return Action::Continue;
        };
        let now = abi::now_ms();
        let headers = abi::headers(abi::RESPONSE_HEADERS).unwrap_or_default();
        let mut content_type = String::new();
        for (name, v) in &headers {
            match name.as_str() {
                ":status" => self.status = v.parse().unwrap_or(0),
                "content-type" => content_type = v.to_ascii_lowercase(),
                _ => {}
            }
        }
        if let Some(key) = self.cfg.keys.get(k) {
            let _ = abi::set_header(abi::RESPONSE_HEADERS, "x-apikeyrouter-key-id", &key.id);
            let _ = abi::set_header(
                abi::RESPONSE_HEADERS,
                "x-apikeyrouter-attempts",
                &self.attempt.to_string(),
            );
        }
        if self.status == 429 {
            // Cool the key now, before Envoy's retry picks the next one.
            let signals = Signals::from_headers(&headers);
            let wait = cooldown_ms(
                &signals,
                now,
                self.cfg.cooldown.default_ms,
                self.cfg.cooldown.max_ms,
            );
            if let Some(c) = self.record(Some(now.saturating_add(wait))) {
                let kid = self.cfg.keys.get(k).map_or("?", |k| k.id.as_str());
                log::info!(
                    "[{}] key {kid} rate limited: cooling until {} ({} ms{})",
                    self.id,
                    c.until_ms,
                    c.until_ms.saturating_sub(now),
                    if c.extended {
                        ""
                    } else {
                        ", kept the longer cooldown"
                    }
                );
            }
            return Action::Continue;
        }
        if end_of_stream {
            return Action::Continue;
        }
        if content_type.starts_with("text/event-stream") {
            self.body = Body::Sse(Box::default());
        } else if (200..300).contains(&self.status) && content_type.contains("json") {
            self.body = Body::Json;
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        match &mut self.body {
            Body::Ignore => Action::Continue,
            Body::Sse(parser) => {
                // Read each chunk as it passes; never hold the stream back.
                if size > 0 {
                    if let Ok(Some(chunk)) = abi::buffer(abi::RESPONSE_BODY, 0, size) {
                        parser.feed(&chunk);
                    }
                }
                if end_of_stream {
                    parser.finish();
                    self.usage = parser.usage;
                }
                Action::Continue
            }
            Body::Json => {
                if !end_of_stream {
                    if size > MAX_JSON_BODY {
                        self.body = Body::Ignore;
                        return Action::Continue;
                    }
                    return Action::Pause;
                }
                if let Ok(Some(body)) = abi::buffer(abi::RESPONSE_BODY, 0, size) {
                    self.usage = usage::from_json_body(&body);
                }
                Action::Continue
            }
        }
    }

    fn on_log(&mut self) {
        self.finish();
    }
}
