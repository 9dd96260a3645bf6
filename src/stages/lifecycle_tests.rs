//! Whole requests through both stages against the fake host: what a caller
//! and the provider see, what the budgets and key records hold afterwards,
//! and how many host calls a request costs. The real-Envoy tests in
//! `tests/` are the end-to-end layer above these.

use super::fake::{Exchange, FakeHost, World};
use super::flight::FLIGHT_PROPERTY;
use super::host::{Map, Next};
use super::Root;
use crate::budget::{self, BudgetRecord};
use crate::key_record::Effective;
use crate::store::Store;
use rust_decimal::Decimal;
use std::rc::Rc;

pub(super) const NOW: u64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

pub(super) fn sha_hex(s: &str) -> String {
    crate::crypto::sha256(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Two OpenAI keys, gpt-4o priced at 2.50/10 per million tokens, a hard
/// daily budget of `limit`, and client `alice` allowed only gpt-4o* with
/// `max_tokens` up to 64.
pub(super) fn config(limit: &str) -> String {
    format!(
        r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}},{{"id":"k2","secret":"sk-two"}}]}}],
            "prices":{{"gpt-4o*":{{"input":"2.50","output":"10"}}}},
            "budgets":[{{"id":"daily","limit":"{limit}"}}],"access_log_state":true,
            "clients":[{{"id":"alice","key_sha256":"{}","allowed_models":["gpt-4o-mini"],"max_tokens":64}}]}}"#,
        sha_hex("vk-alice")
    )
}

/// Both stages of one VM over a config (`admission_tests` and
/// `charging_tests` add requests of their own).
pub(super) struct Gateway {
    pub(super) world: Rc<World>,
    pub(super) ingress: Root,
    pub(super) attempt: Root,
}

impl Gateway {
    pub(super) fn new(config: &str) -> Gateway {
        let world = World::new(NOW);
        let ingress = world.root("apikeyrouter_ingress", config).unwrap_or_else(|e| panic!("{e}"));
        let attempt = world.root("apikeyrouter_attempt", config).unwrap_or_else(|e| panic!("{e}"));
        Gateway { world, ingress, attempt }
    }

    pub(super) fn chat(&self, body: &str) -> Exchange {
        self.request("POST", "/v1/chat/completions", body)
    }

    /// A request of client `alice` (`x-request-id: req-1`).
    pub(super) fn request(&self, method: &str, path: &str, body: &str) -> Exchange {
        Exchange::new(
            &self.world,
            &self.ingress,
            &[
                (":method", method),
                (":path", path),
                ("content-type", "application/json"),
                ("authorization", "Bearer vk-alice"),
                ("x-request-id", "req-1"),
            ],
            body.as_bytes(),
        )
    }

    pub(super) fn budget(&self) -> BudgetRecord {
        let cfg = self.attempt.routing.borrow().config.clone();
        budget::load(&self.world.store, &cfg.budgets[0], self.world.now_ms.get())
    }

    pub(super) fn key_state(&self, k: usize) -> Effective {
        let cfg = self.attempt.routing.borrow().config.clone();
        crate::keys::read_record(&self.world.store, &cfg.keys[k].record_name)
            .map(|r| r.effective(self.world.now_ms.get()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The ingress root's tick (abandoned flights are released there).
    pub(super) fn ingress_tick(&mut self) {
        self.ingress.tick(&FakeHost::new(&self.world));
    }

    pub(super) fn in_flight(&self) -> usize {
        self.world.flights.borrow().len()
    }
}

const BODY: &str = r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
const ANSWER: &str =
    r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;

/// (10 * 2.50 + 20 * 10) / 1e6
fn answer_cost() -> Decimal {
    Decimal::new(225, 6)
}

/// Sends `BODY`, one attempt answering 200 with `ANSWER`.
pub(super) fn served(gw: &Gateway) -> Exchange {
    let mut x = gw.chat(BODY);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    assert_eq!(x.replied(), None);
    assert_eq!(x.attempt(&gw.attempt), Next::Continue);
    x.upstream_headers(200, &[("content-type", "application/json"), ("content-length", "95")], false);
    x.upstream_body(&[ANSWER.as_bytes()], true);
    x.attempt_done();
    x.finish();
    x
}

#[test]
fn a_served_request_is_reserved_then_charged_its_exact_cost() {
    let gw = Gateway::new(&config("1.00"));
    let mut x = gw.chat(BODY);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    assert!(gw.budget().reserved > Decimal::ZERO, "reserved at admission");
    assert_eq!(x.attempt(&gw.attempt), Next::Continue);
    let up = &x.attempts[0].1;
    assert_eq!(up.get(Map::RequestHeaders, "authorization").as_deref(), Some("Bearer sk-one"));
    x.upstream_headers(200, &[("content-type", "application/json")], false);
    x.upstream_body(&[ANSWER.as_bytes()], true);
    let up = &x.attempts[0].1;
    assert_eq!(up.get(Map::ResponseHeaders, "x-apikeyrouter-cost").as_deref(), Some("0.000225"));
    x.attempt_done();
    x.finish();
    let b = gw.budget();
    assert_eq!((b.spent, b.reserved, b.requests), (answer_cost(), Decimal::ZERO, 1));
    assert_eq!(gw.in_flight(), 0);
    let outcome = x.downstream.filter_state.borrow().get("apikeyrouter").cloned();
    let outcome = outcome.unwrap_or_else(|| panic!("no apikeyrouter filter state"));
    let outcome: serde_json::Value = serde_json::from_slice(&outcome).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(outcome["key_id"], "k1");
    assert_eq!(outcome["client"], "alice");
    assert_eq!(outcome["total_tokens"], 30);
    assert_eq!(outcome["cost"], "0.000225");
}

#[test]
fn the_callers_credential_never_reaches_the_provider() {
    let gw = Gateway::new(&config("1.00"));
    let mut x = gw.chat(BODY);
    x.downstream.request_headers.borrow_mut().push(("x-api-key".into(), "vk-alice".into()));
    x.downstream.request_headers.borrow_mut().push(("x-apikeyrouter-provider".into(), "evil".into()));
    x.send_request(usize::MAX, false);
    x.attempt(&gw.attempt);
    let sent = x.attempts[0].1.request_headers.borrow().clone();
    assert!(!sent.iter().any(|(_, v)| v.contains("vk-alice")), "{sent:?}");
    assert!(!sent.iter().any(|(k, _)| k == "x-apikeyrouter-provider"), "{sent:?}");
    assert_eq!(sent.iter().filter(|(k, _)| k == "authorization").count(), 1);
}

#[test]
fn a_429_cools_the_key_and_the_retry_writes_the_other_keys_secret() {
    let gw = Gateway::new(&config("1.00"));
    let mut x = gw.chat(BODY);
    x.send_request(usize::MAX, false);
    x.attempt(&gw.attempt);
    x.upstream_headers(429, &[("retry-after", "20"), ("content-type", "text/plain")], false);
    x.upstream_body(&[b"slow down"], true);
    x.attempt_done();
    assert!(matches!(gw.key_state(0), Effective::Throttled { .. }), "{:?}", gw.key_state(0));
    assert_eq!(x.attempt(&gw.attempt), Next::Continue);
    let up = &x.attempts[1].1;
    assert_eq!(up.get(Map::RequestHeaders, "authorization").as_deref(), Some("Bearer sk-two"));
    x.upstream_headers(200, &[("content-type", "application/json")], false);
    x.upstream_body(&[ANSWER.as_bytes()], true);
    let up = &x.attempts[1].1;
    assert_eq!(up.get(Map::ResponseHeaders, "x-apikeyrouter-attempts").as_deref(), Some("2"));
    x.attempt_done();
    x.finish();
    let b = gw.budget();
    assert_eq!((b.spent, b.reserved), (answer_cost(), Decimal::ZERO), "charged once, for the served attempt");
}

#[test]
fn a_401_naming_a_bad_key_disables_it_until_an_admin_enables_it_or_a_probe_succeeds() {
    let gw = Gateway::new(&config("1.00"));
    let mut x = gw.chat(BODY);
    x.send_request(usize::MAX, false);
    x.attempt(&gw.attempt);
    x.upstream_headers(401, &[("content-type", "application/json")], false);
    x.upstream_body(&[br#"{"error":{"message":"Incorrect API key provided.","code":"invalid_api_key"}}"#], true);
    x.attempt_done();
    x.finish();
    assert_eq!(gw.key_state(0), Effective::Disabled);
    gw.world.advance(3_600_000);
    assert_eq!(gw.key_state(0), Effective::Disabled);
    let b = gw.budget();
    assert_eq!((b.spent, b.reserved), (Decimal::ZERO, Decimal::ZERO), "nothing served, nothing charged");
}

#[test]
fn when_every_key_is_cooling_the_attempt_answers_429_without_a_key() {
    let gw = Gateway::new(&config("1.00"));
    let mut x = gw.chat(BODY);
    x.send_request(usize::MAX, false);
    for _ in 0..2 {
        x.attempt(&gw.attempt);
        x.upstream_headers(429, &[("retry-after", "30")], true);
        x.attempt_done();
    }
    assert_eq!(x.attempt(&gw.attempt), Next::Pause);
    let up = &x.attempts[2].1;
    let sent = up.sent.borrow().clone().unwrap_or_else(|| panic!("no local reply"));
    assert_eq!(sent.status, 429);
    assert_eq!(up.get(Map::RequestHeaders, "authorization"), None, "the previous key does not go upstream");
    x.attempt_done();
    x.finish();
    assert_eq!(gw.budget().reserved, Decimal::ZERO);
    assert_eq!(gw.in_flight(), 0);
}

#[test]
fn a_stream_in_arbitrary_chunks_is_charged_from_its_usage_event() {
    let gw = Gateway::new(&config("1.00"));
    let stream = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20,\"total_tokens\":30}}\n\n",
        "data: [DONE]\n\n"
    )
    .as_bytes();
    for step in [1, 3, 7, 64, stream.len()] {
        let before = gw.budget().spent;
        let mut x = gw.chat(r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#);
        x.send_request(usize::MAX, false);
        x.attempt(&gw.attempt);
        x.upstream_headers(200, &[("content-type", "text/event-stream")], false);
        let chunks: Vec<&[u8]> = stream.chunks(step).collect();
        let passed = x.upstream_body(&chunks, true);
        assert_eq!(passed, stream, "every byte passes on, in order (chunks of {step})");
        x.attempt_done();
        x.finish();
        assert_eq!(gw.budget().spent - before, answer_cost(), "chunks of {step}");
    }
    assert_eq!(gw.budget().reserved, Decimal::ZERO);
}

#[test]
fn a_body_ending_in_trailers_gets_the_same_policy_checks() {
    let gw = Gateway::new(&config("1.00"));
    // gpt-4o is not in alice's allowed models.
    let mut x = gw.chat(r#"{"model":"gpt-4o","max_tokens":50,"messages":[]}"#);
    assert_eq!(x.send_request(8, true), Next::Pause);
    let r = x.replied().unwrap_or_else(|| panic!("forwarded a forbidden model"));
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    // max_tokens over the policy's 64.
    let mut x = gw.chat(r#"{"model":"gpt-4o-mini","max_tokens":5000,"messages":[]}"#);
    x.send_request(8, true);
    assert_eq!(x.replied().map(|r| r.status), Some(400));
    // And an allowed request ending in trailers is admitted and reserved.
    let mut x = gw.chat(BODY);
    assert_eq!(x.send_request(8, true), Next::Continue);
    assert_eq!(x.replied(), None);
    assert!(gw.budget().reserved > Decimal::ZERO);
    x.finish();
    assert_eq!(gw.budget().reserved, Decimal::ZERO);
}

#[test]
fn a_hard_budget_without_room_refuses_before_any_attempt() {
    let gw = Gateway::new(&config("0.0001"));
    let mut x = gw.chat(BODY);
    assert_eq!(x.send_request(usize::MAX, false), Next::Pause);
    let r = x.replied().unwrap_or_else(|| panic!("admitted over budget"));
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "insufficient_quota");
    assert!(r.json()["error"]["message"].as_str().unwrap_or("").contains("'daily'"), "{}", r.json());
    x.finish();
    let b = gw.budget();
    assert_eq!((b.spent, b.reserved, b.refused), (Decimal::ZERO, Decimal::ZERO, 1));
    assert_eq!(gw.world.counter("apikeyrouter.budget.daily.refused"), 1);
}

#[test]
fn an_unknown_virtual_key_is_refused_and_nothing_is_reserved() {
    // Also when it sends Envoy's internal-redirect header: only filter
    // state makes a request a fall-over hop, which skips authentication.
    for redirected in [false, true] {
        let gw = Gateway::new(&config("1.00"));
        let mut x = gw.chat(BODY);
        x.downstream.set_header_value("authorization", "Bearer vk-mallory");
        if redirected {
            x.downstream.set_header_value("x-envoy-original-url", "http://gw/v1/chat/completions");
        }
        x.send_request(usize::MAX, false);
        assert_eq!(x.replied().map(|r| r.status), Some(401), "redirected: {redirected}");
        x.finish();
        assert_eq!(gw.budget().reserved, Decimal::ZERO);
        assert_eq!(gw.in_flight(), 0);
    }
}

#[test]
fn a_hop_whose_flight_waits_for_no_hop_is_refused_not_sent() {
    // Filter state names a flight that no attempt redirected: refused.
    let gw = Gateway::new(&config("1.00"));
    let mut x = gw.chat(BODY);
    x.downstream.set_header_value("x-envoy-original-url", "http://gw/v1/chat/completions");
    x.downstream.filter_state.borrow_mut().insert(FLIGHT_PROPERTY.into(), b"0123456789abcdef".to_vec());
    x.send_request(usize::MAX, false);
    assert_eq!(x.replied().map(|r| r.status), Some(500));
    x.finish();
    assert_eq!(gw.budget().reserved, Decimal::ZERO);
}

/// One step of a request as Envoy drives it; the flag says an attempt runs.
type Step = dyn Fn(&mut Exchange, &Gateway, &mut bool);

/// Where Envoy may stop a request: after each callback, it resets the
/// stream and calls `on_done` for a running attempt and `on_log` for the
/// request.
#[test]
fn a_reset_after_any_callback_leaves_nothing_reserved_and_charges_only_a_whole_answer() {
    for stop in 0..8 {
        let gw = Gateway::new(&config("1.00"));
        let mut x = gw.chat(BODY);
        let mut attempt_running = false;
        let steps: [&Step; 7] = [
            &|x, _, _| {
                x.request_headers(false);
            },
            &|x, _, _| {
                x.request_body();
            },
            &|x, gw, running| {
                x.attempt(&gw.attempt);
                *running = true;
            },
            &|x, _, _| {
                x.upstream_headers(200, &[("content-type", "application/json")], false);
            },
            &|x, _, _| {
                x.upstream_body(&[&ANSWER.as_bytes()[..40]], false);
            },
            &|x, _, _| {
                x.upstream_body(&[ANSWER.as_bytes()], true);
            },
            &|x, _, running| {
                x.attempt_done();
                *running = false;
            },
        ];
        for step in steps.iter().take(stop) {
            step(&mut x, &gw, &mut attempt_running);
        }
        if attempt_running {
            x.attempt_done();
        }
        x.ingress.on_log(&x.downstream);
        let b = gw.budget();
        assert_eq!(b.reserved, Decimal::ZERO, "reset after step {stop}: reservation left");
        let whole = stop >= 6;
        assert_eq!(b.spent, if whole { answer_cost() } else { Decimal::ZERO }, "reset after step {stop}");
        assert_eq!(gw.in_flight(), 0, "reset after step {stop}: flight left");
    }
}

#[test]
fn a_host_that_cannot_read_the_body_gets_a_500_not_a_forwarded_request() {
    let gw = Gateway::new(&config("1.00"));
    let mut x = gw.chat(BODY);
    x.request_headers(false);
    x.downstream.failing.borrow_mut().insert("buffer");
    assert_eq!(x.request_body(), Next::Pause);
    assert_eq!(x.replied().map(|r| r.status), Some(500));
    x.finish();
    assert_eq!(gw.budget().reserved, Decimal::ZERO);
}

#[test]
fn a_host_that_refuses_the_flight_hand_off_gets_a_500_not_a_request_its_attempts_cannot_find() {
    let gw = Gateway::new(&config("1.00"));
    let mut x = gw.chat(BODY);
    x.downstream.failing.borrow_mut().insert("set_property");
    assert_eq!(x.send_request(usize::MAX, false), Next::Pause);
    assert_eq!(x.replied().map(|r| r.status), Some(500));
    x.finish();
    assert_eq!(gw.budget().reserved, Decimal::ZERO);
    assert_eq!(gw.in_flight(), 0);
}

#[test]
fn an_attempt_whose_flight_is_gone_is_refused_not_sent_unaccounted() {
    let gw = Gateway::new(&config("1.00"));
    let mut x = gw.chat(BODY);
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue);
    // The VM reloads between the ingress stage and the attempt.
    *gw.world.flights.borrow_mut() = Default::default();
    assert_eq!(x.attempt(&gw.attempt), Next::Pause);
    let up = &x.attempts[0].1;
    assert_eq!(up.sent.borrow().as_ref().map(|s| s.status), Some(500));
    assert_eq!(up.get(Map::RequestHeaders, "authorization"), None, "no key was written");
    x.attempt_done();
    x.finish();
    assert_eq!(gw.budget().spent, Decimal::ZERO);
}

#[test]
fn the_tick_writes_this_workers_decisions_to_its_ring() {
    let mut gw = Gateway::new(&config("1.00"));
    served(&gw);
    let worker = gw.attempt.routing.borrow().ring_worker;
    assert_eq!(worker, Some(0));
    let slot = crate::shared_data::decision_slot(0, 0);
    assert_eq!(gw.world.store.value(&slot), None, "queued, not written on the request path");
    gw.attempt.tick(&FakeHost::new(&gw.world));
    let rec = gw.world.store.value(&slot).and_then(|b| crate::decision::Stored::decode(&b));
    assert_eq!(rec.map(|r| (r.request_id, r.client)), Some(("req-1".to_string(), "alice".to_string())));
}

#[test]
fn a_bad_config_refuses_to_configure_with_one_line_naming_the_field() {
    let world = World::new(NOW);
    let e = world.root("apikeyrouter_ingress", r#"{"providers":[{"id":"p","keys":[]}],"budgets":[{"id":"b"}]}"#);
    let Err(e) = e else { panic!("configured") };
    assert!(e.starts_with("invalid apikeyrouter config: "), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let Err(e) = world.root("something_else", &config("1")) else { panic!("configured") };
    assert!(e.contains("root_id"), "{e}");
}

#[test]
fn configure_seeds_every_record_requests_update_so_first_writes_are_compare_and_swaps() {
    let gw = Gateway::new(&config("1.00"));
    let cfg = gw.attempt.routing.borrow().config.clone();
    let mut names: Vec<String> = cfg.keys.live().map(|(_, k)| k.record_name.clone()).collect();
    names.extend(cfg.budgets.iter().map(|b| b.record_name.clone()));
    names.extend(cfg.clients.iter().map(|c| c.record_name.clone()));
    names.extend(
        [
            crate::shared_data::GENERATION,
            crate::shared_data::DECISION_WORKERS,
            crate::shared_data::TRANSITIONS_HEAD,
            crate::shared_data::RUNTIME_KEYS,
            crate::shared_data::RUNTIME_KEYS_CHANGES,
        ]
        .map(String::from),
    );
    for name in &names {
        assert!(gw.world.store.value(name).is_some(), "{name} not seeded");
    }
    assert_eq!(names.len(), 2 + 1 + 1 + 5);
}

#[test]
fn a_request_whose_budget_record_cannot_be_updated_is_refused_not_sent() {
    let gw = Gateway::new(&config("1.00"));
    let name = gw.attempt.routing.borrow().config.budgets[0].record_name.clone();
    assert!(gw.world.store.set(&name, b"\x07damaged", None).is_ok());
    let mut x = gw.chat(BODY);
    assert_eq!(x.send_request(usize::MAX, false), Next::Pause);
    let r = x.replied().unwrap_or_else(|| panic!("sent without a reservation"));
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (503, "budget_unavailable".into()));
    x.finish();
    assert_eq!(gw.in_flight(), 0);
}

#[test]
fn a_reservation_whose_request_was_lost_expires_on_the_tick() {
    let mut gw = Gateway::new(&config("1.00"));
    let mut x = gw.chat(BODY);
    x.send_request(usize::MAX, false);
    let held = gw.budget().reserved;
    assert!(held > Decimal::ZERO);
    // The VM reloads: the flight (and its on_log) is gone for good.
    *gw.world.flights.borrow_mut() = Default::default();
    drop(x);
    gw.world.advance(budget::DEFAULT_RESERVATION_TTL_MS);
    gw.attempt.tick(&FakeHost::new(&gw.world));
    assert_eq!(gw.budget().reserved, held, "not before its deadline bucket ends");
    gw.world.advance(budget::DEFAULT_RESERVATION_TTL_MS / 4);
    gw.attempt.tick(&FakeHost::new(&gw.world));
    let b = gw.budget();
    assert_eq!((b.reserved, b.expired, b.spent), (Decimal::ZERO, 1, Decimal::ZERO));
    assert_eq!(gw.world.gauges.borrow().get("apikeyrouter.budget.daily.reservations_expired"), Some(&1));
}

#[test]
fn forecast_gauges_follow_a_steady_load_on_a_key_with_a_quota_and_on_a_budget() {
    let limited =
        config("100.00").replace(r#""secret":"sk-one"}"#, r#""secret":"sk-one","limits":{"daily_tokens":100000}}"#);
    let mut gw = Gateway::new(&limited);
    // One request a second for 10 s, then a tick.
    for _ in 0..10 {
        served(&gw);
        gw.world.advance(1_000);
    }
    served(&gw);
    gw.attempt.tick(&FakeHost::new(&gw.world));
    let gauge = |name: &str| gw.world.gauges.borrow().get(name).copied();
    let tpm = gauge("apikeyrouter.key.openai.k1.tokens_per_minute").unwrap_or(0);
    let rpm = gauge("apikeyrouter.key.openai.k1.requests_per_minute").unwrap_or(0);
    // Fairness gives k1 every other request: 30 a minute of 30 tokens each.
    assert!((25..=35).contains(&rpm) && tpm == 30 * rpm, "{tpm} {rpm}");
    let runway = gauge("apikeyrouter.key.openai.k1.runway_seconds").unwrap_or(0);
    assert!(runway > 0 && runway < crate::forecast::LASTS, "{runway}");
    assert_eq!(gauge("apikeyrouter.key.openai.k2.runway_seconds"), None, "a key without quotas has no runway");
    let per_hour = gauge("apikeyrouter.budget.daily.spend_per_hour_micros").unwrap_or(0);
    assert!(per_hour > 0, "{per_hour}");
    assert!(gauge("apikeyrouter.budget.daily.runway_seconds").is_some_and(|r| r > 0));
}
