//! The ingress stage (downstream HTTP filter, once per request): admin API,
//! caller credential stripping, request-body validation, the stream-usage
//! rewrite, and refusing early when no key can serve.

use super::{abi, send, with_flights, Routing};
use crate::admin::{self, AdminRequest};
use crate::config::Config;
use crate::flight::Flight;
use crate::keys::check;
use crate::reply;
use crate::request;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::cell::RefCell;
use std::rc::Rc;

pub(crate) struct Ingress {
    id: u32,
    cfg: Rc<Config>,
    routing: Rc<RefCell<Routing>>,
    request_id: Option<String>,
    path: String,
    read_body: bool,
    done: bool,
}

impl Ingress {
    pub(crate) fn new(id: u32, cfg: Rc<Config>, routing: Rc<RefCell<Routing>>) -> Ingress {
        Ingress {
            id,
            cfg,
            routing,
            request_id: None,
            path: String::new(),
            read_body: false,
            done: false,
        }
    }

    fn reply(&mut self, r: &reply::Reply) -> Action {
        self.done = true;
        send(r, self.id);
        Action::Pause
    }

    /// Logs a refused hostcall and answers 500 rather than forwarding a
    /// request the filter could not prepare.
    fn host_failure(&mut self, what: &str, e: abi::HostError) -> Action {
        log::warn!("[{}] could not {what} (host status {})", self.id, e.0);
        self.reply(&reply::gateway_error(&format!(
            "The gateway could not {what}."
        )))
    }

    /// `Some((retry_after_secs, explanation))` when no key of `provider` is
    /// available now: the request is refused before any upstream attempt.
    fn refuse_when_no_key(&self, provider: usize, now: u64) -> Option<(u64, String)> {
        let mut routing = self.routing.borrow_mut();
        routing.cache.refresh(&abi::SharedData, &self.cfg);
        let why = check(&self.cfg, provider, &routing.cache.views, now).err()?;
        let pid = self
            .cfg
            .providers
            .get(provider)
            .map_or("?", |p| p.id.as_str());
        Some((why.retry_after_secs(now), why.explain(pid)))
    }

    fn admin(&mut self, method: &str, headers: &[(String, String)], now: u64) -> Action {
        let find = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        let req = AdminRequest {
            method,
            path: &self.path,
            authorization: find("authorization"),
            x_api_key: find("x-api-key"),
        };
        let r = admin::handle(&self.cfg, &abi::SharedData, &req, now);
        self.reply(&r)
    }
}

impl Context for Ingress {}

impl HttpContext for Ingress {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        let now = abi::now_ms();
        let headers = match abi::headers(abi::REQUEST_HEADERS) {
            Ok(h) => h,
            Err(e) => return self.host_failure("read the request headers", e),
        };
        let mut method = "";
        let mut content_type = "";
        let mut request_id: Option<&str> = None;
        let mut strip: Vec<&str> = Vec::new();
        for (k, v) in &headers {
            match k.as_str() {
                ":path" => self.path = v.clone(),
                ":method" => method = v.as_str(),
                "content-type" => content_type = v.as_str(),
                "x-request-id" => request_id = Some(v.as_str()),
                "authorization" | "x-api-key" => strip.push(k),
                _ if k.starts_with("x-apikeyrouter-") => strip.push(k),
                _ => {}
            }
        }
        if admin::is_admin_path(&self.cfg, &self.path) {
            let method = method.to_string();
            return self.admin(&method, &headers, now);
        }
        // The caller's credential and any routing header it forged never
        // reach the provider.
        for name in strip {
            if let Err(e) = abi::remove_header(abi::REQUEST_HEADERS, name) {
                return self.host_failure("strip a client header", e);
            }
        }

        let provider = 0;
        if let Some((retry_after, why)) = self.refuse_when_no_key(provider, now) {
            return self.reply(&reply::no_key(retry_after, &why));
        }

        let salt = self.id as u64;
        let rid = with_flights(|fl| match request_id {
            Some(r) if !r.is_empty() && !fl.contains(r) => (r.to_string(), false),
            _ => (fl.fresh_id(now, salt), true),
        });
        let Some((rid, fresh)) = rid else {
            return Action::Continue;
        };
        if fresh && abi::set_header(abi::REQUEST_HEADERS, "x-request-id", &rid).is_err() {
            log::warn!("[{}] could not set x-request-id", self.id);
        }
        let flight = Flight {
            provider,
            started_ms: now,
            ..Flight::default()
        };
        with_flights(|fl| fl.insert(rid.clone(), flight, now));
        self.request_id = Some(rid);

        if end_of_stream {
            return Action::Continue;
        }
        let ct = content_type.to_ascii_lowercase();
        self.read_body =
            ct.is_empty() || ct.starts_with("application/json") || ct.contains("+json");
        if self.read_body {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.done || !self.read_body {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = match abi::buffer(abi::REQUEST_BODY, 0, size) {
            Ok(b) => b.unwrap_or_default(),
            Err(e) => return self.host_failure("read the request body", e),
        };
        let info = match request::inspect(&body) {
            Ok(i) => i,
            Err(e) => return self.reply(&reply::bad_request(&e.to_string())),
        };
        if let Some(rid) = &self.request_id {
            with_flights(|fl| {
                if let Some(f) = fl.get_mut(rid) {
                    f.stream = info.stream;
                }
            });
        }
        if self.cfg.inject_stream_usage && request::path_takes_stream_options(&self.path) {
            if let Some(new_body) = request::with_include_usage(&body, &info) {
                // Headers are still paused here, so content-length may change.
                let ok = abi::set_buffer(abi::REQUEST_BODY, 0, size, &new_body).is_ok()
                    && abi::set_header(
                        abi::REQUEST_HEADERS,
                        "content-length",
                        &new_body.len().to_string(),
                    )
                    .is_ok();
                if !ok {
                    log::warn!("[{}] could not add stream_options.include_usage; usage of this stream may be missed", self.id);
                }
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if let Some(rid) = self.request_id.take() {
            with_flights(|fl| fl.remove(&rid));
        }
    }
}
