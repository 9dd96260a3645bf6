"""Fault injection through real Envoy: the mock provider resets mid-body,
times out, answers 500/502/503, malformed JSON, a truncated SSE stream, no
usage, a huge body or a slow trickle. The client always gets a clear answer,
the filter never traps (Envoy's wasm reload stats stay at 0) and the books
balance: per-key counters equal what the provider reported, reservations
return to zero and spend equals reported usage x price plus exactly what the
charging rules (README, "Budgets" -> "Charging rules"; src/charge.rs) charge
the 2xx answers that reported none: the reservation for one that ended
without usage, `partial` for a stream cut after its headers reached the
caller. The shipped route retries `reset-before-request`, not `reset`: an
attempt reset after the request went out is not retried."""

import http.client as httpclient
import json
from decimal import Decimal

import pytest

from harness import (PRICE_IN, PRICE_OUT, assert_no_trap, body_of, budget_of, chat, expected_spend, hcm,
                     ids_by_secret, plugin_with_keys, priced, route, secrets, wait_recorded, wait_until,
                     wasm_failure_stats)

# estimate.default_max_tokens, which priced() leaves at its default: the
# output tokens assumed for a request that sets no cap (body_of sets none).
DEFAULT_MAX_TOKENS = 4096


def tokens_cost(input_tokens, output_tokens):
    """What these tokens cost at the harness prices (PRICES)."""
    return (Decimal(input_tokens) * PRICE_IN + Decimal(output_tokens) * PRICE_OUT) / 10**6


def reservation(raw_body):
    """The admission upper bound, charged to a 2xx that ended without
    usage: every body byte a prompt token, every allowed output token."""
    return tokens_cost(len(raw_body), DEFAULT_MAX_TOKENS)


def partial_stream(raw_body, text):
    """The `partial` charge of a stream cut after its headers reached the
    caller: the prompt estimate plus ceil(characters / 4) of the output text
    that passed, never more than the upper bound."""
    return min(tokens_cost(len(raw_body), -(-len(text) // 4)), reservation(raw_body))


def sse_text(body):
    """The output text (choices[].delta.content) of the whole events of an
    OpenAI chat stream, and the bytes after its last whole event."""
    *events, rest = body.split(b"\n\n")
    text = "".join(c["delta"].get("content") or "" for ev in events if ev.startswith(b"data: {")
                   for c in json.loads(ev[len(b"data: "):])["choices"])
    return text, rest


# What the mock's reset_mid_body fault sends of a stream before its reset:
# two whole events and the first 10 bytes of the third.
RESET_STREAM_TEXT, RESET_STREAM_REST = "tok0 tok1 ", b'data: {"id'


def assert_books_balance(e, mock, keys, charged=Decimal(0)):
    """Counters equal what the provider reported for each key, no
    reservation is left and spend is reported usage x price plus `charged`,
    what the charging rules add for 2xx answers that reported no usage."""
    counters = wait_recorded(e, len(mock.received()))
    reported = mock.stats()
    id_of = ids_by_secret(keys)
    for secret in keys:
        c = counters[id_of[secret]]
        r = reported.get(secret, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
        assert c["requests"] == r["requests"], (secret, c, r)
        assert (c["input_tokens"], c["output_tokens"], c["total_tokens"]) == (
            r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]), (secret, c, r)
    wait_until(lambda: budget_of(e, "b")["reserved"] == "0", timeout=10, what="reservation released")
    assert Decimal(budget_of(e, "b")["spent"]) == expected_spend(mock) + charged
    return counters


def totals(counters):
    """Each counter summed over the keys (a dict: a name no key has is a
    KeyError, not 0)."""
    names = [n for n, v in next(iter(counters.values())).items() if isinstance(v, int)]
    return {n: sum(c[n] for c in counters.values()) for n in names}


def start_gateway(start_envoy, mock, plugin, behavior=None, **kw):
    """Envoy in front of the mock, then every key's behavior set (a dict of
    mock.behavior's arguments); returns Envoy and its wasm failure stats
    from before the fault (the baseline of assert_no_trap)."""
    e = start_envoy(mock, plugin=plugin, **kw)
    base = wasm_failure_stats(e)
    if behavior:
        mock.behavior("*", **behavior)
    return e, base


def assert_unharmed(e, base, mock):
    """No VM trapped, and with the fault gone the next request is served
    normally."""
    assert_no_trap(e, base)
    mock.reset()
    status, headers, body = chat(e.url, content="after the fault")
    assert status == 200, body
    assert json.loads(body)["usage"]["total_tokens"] > 0


def fetch(url, body, timeout=30):
    """POSTs to /v1/chat/completions and reads the whole answer; a response
    cut short is returned with the error instead of raising."""
    host, port = url.replace("http://", "").split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        try:
            got = resp.status, headers, resp.read(), None
        except (httpclient.IncompleteRead, ConnectionError) as err:
            got = resp.status, headers, getattr(err, "partial", b""), err
    finally:
        conn.close()
    return got


def outcome(e, request_id):
    """The filter's outcome in the access-log line of `request_id`."""
    return json.loads(access_log_entry(e, request_id)["apikeyrouter"])


def short_timeout(seconds):
    """The route's total timeout, as the only limit in force (the shipped
    route's max_stream_duration would take its place)."""
    def edit(cfg):
        route(cfg)["timeout"] = f"{seconds}s"
        route(cfg).pop("max_stream_duration", None)
    return edit


@pytest.mark.parametrize("status", [500, 502, 503])
def test_provider_5xx_is_retried_on_other_keys_then_passed_through_with_books_balanced(mock3, start_envoy, status):
    keys = secrets(3)
    e, base = start_gateway(start_envoy, mock3, priced(keys), behavior={"status": status})
    got, headers, body = chat(e.url)
    assert got == status
    assert headers["x-apikeyrouter-attempts"] == "4", "1 try + the route's 3 retries"
    assert json.loads(body)["error"]["type"] == "server_error", "the provider's own error, passed on"
    sent = [r["key"] for r in mock3.received()]
    assert len(sent) == 4 and len(set(sent[:3])) == 3, "each retry used a key not tried yet"
    t = totals(assert_books_balance(e, mock3, keys))
    assert (t["server_errors"], t["successes"]) == (4, 0), t
    assert all(k["state"] == "available" for k in e.key_counters().values()), "a 5xx does not cool a key"
    assert budget_of(e, "b")["spent"] == "0"
    assert_unharmed(e, base, mock3)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("fault", ["malformed_json", "no_usage"])
def test_answer_without_readable_usage_passes_through_counts_no_tokens_and_is_charged_its_reservation(
        mock3, start_envoy, fault, stream):
    keys = secrets(3)
    e, base = start_gateway(start_envoy, mock3, priced(keys), behavior={"fault": fault})
    status, headers, body, err = fetch(e.url, body_of(stream))
    assert err is None and status == 200
    charge = reservation(json.dumps(body_of(stream)))
    if stream:
        assert headers["content-type"].startswith("text/event-stream")
        assert body.endswith(b"data: [DONE]\n\n")
    else:
        assert headers["x-apikeyrouter-key-id"] in ("k1", "k2", "k3")
        if fault == "malformed_json":
            assert body.endswith(b"]]]"), "the provider's body is passed on as it is"
        else:
            assert "usage" not in json.loads(body)
        assert Decimal(headers["x-apikeyrouter-cost"]) == charge
    # The key's counters hold only what the provider reported (nothing); the
    # answer ended without usage, so it is charged its reservation.
    t = totals(assert_books_balance(e, mock3, keys, charged=charge))
    assert (t["successes"], t["total_tokens"]) == (1, 0), t
    assert expected_spend(mock3) == 0 and Decimal(budget_of(e, "b")["spent"]) == charge
    o = outcome(e, headers["x-request-id"])
    assert (o["charged"], Decimal(o["cost"])) == ("reservation", charge), o
    assert_unharmed(e, base, mock3)


def test_truncated_sse_stream_reaches_the_client_as_sent_and_is_charged_its_reservation(mock3, start_envoy):
    keys = secrets(3)
    e, base = start_gateway(start_envoy, mock3, priced(keys), behavior={"fault": "truncated_sse", "chunks": 3})
    status, headers, body, err = fetch(e.url, body_of(True))
    assert err is None and status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert body.count(b"data: ") == 4 and b"tok2" in body
    assert b"[DONE]" not in body and body.endswith(b'"choi'), "the cut is visible to the client"
    # The provider ended the stream (cleanly, mid-event) without its usage
    # event: an answer that ended without usage is charged its reservation.
    charge = reservation(json.dumps(body_of(True)))
    t = totals(assert_books_balance(e, mock3, keys, charged=charge))
    assert (t["streams"], t["total_tokens"]) == (1, 0), t
    assert expected_spend(mock3) == 0 and Decimal(budget_of(e, "b")["spent"]) == charge
    o = outcome(e, headers["x-request-id"])
    assert (o["charged"], Decimal(o["cost"])) == ("reservation", charge), o
    assert_unharmed(e, base, mock3)


def test_reset_mid_json_body_is_not_retried_answered_502_and_not_charged(mock3, start_envoy):
    keys = secrets(3)
    e, base = start_gateway(start_envoy, mock3, priced(keys), behavior={"fault": "reset_mid_body"})
    status, headers, body, err = fetch(e.url, body_of(False))
    # The attempt stage holds a priced answer's headers until its usage is
    # read, so nothing reached the caller: Envoy answers 502. The shipped
    # route retries only resets before the request went out, so this one is
    # not retried (the provider may have billed it).
    assert err is None and status == 502, (status, body)
    assert b"reset" in body
    assert len(mock3.received()) == 1
    t = totals(assert_books_balance(e, mock3, keys))
    assert (t["requests"], t["successes"], t["server_errors"], t["total_tokens"]) == (1, 0, 1, 0), t
    # A priced JSON answer cut while its headers were held is never charged.
    assert budget_of(e, "b")["spent"] == "0"
    o = outcome(e, headers["x-request-id"])
    assert "charged" not in o and "cost" not in o, o
    assert_unharmed(e, base, mock3)


def test_reset_mid_stream_ends_the_client_stream_and_is_charged_what_passed(mock3, start_envoy):
    keys = secrets(3)
    e, base = start_gateway(start_envoy, mock3, priced(keys), behavior={"fault": "reset_mid_body"})
    status, headers, body, err = fetch(e.url, body_of(True))
    # A stream is passed on as it comes: the client has the 200 and the
    # first events, then sees the connection cut (no [DONE]).
    assert status == 200 and err is not None, (status, body, err)
    assert b"tok0" in body and b"[DONE]" not in body
    assert len(mock3.received()) == 1
    # Cut after its headers reached the caller: charged `partial`, the
    # prompt estimate plus ceil(characters / 4) of the text that passed.
    assert sse_text(body) == (RESET_STREAM_TEXT, RESET_STREAM_REST), body
    charge = partial_stream(json.dumps(body_of(True)), RESET_STREAM_TEXT)
    assert_books_balance(e, mock3, keys, charged=charge)
    assert expected_spend(mock3) == 0 and Decimal(budget_of(e, "b")["spent"]) == charge
    o = outcome(e, headers["x-request-id"])
    assert (o["charged"], Decimal(o["cost"]), o["output_tokens"]) == ("partial", charge, 3), o
    assert_unharmed(e, base, mock3)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_reset_mid_body_counts_as_a_failure_not_a_success(mock3, start_envoy, stream):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=priced(keys))
    mock3.behavior("*", fault="reset_mid_body")
    status, _, body, err = fetch(e.url, body_of(stream))
    attempts = len(mock3.received())
    if stream:
        # Passed on as it came: the 200 and the first events, then the cut.
        assert (status, attempts) == (200, 1) and err is not None and b"[DONE]" not in body, (status, err)
    else:
        # Cut while its headers were held, after the request went out: not
        # retried (the shipped route retries reset-before-request), a 502.
        assert (status, attempts, err) == (502, 1, None), (status, attempts, body, err)
    counters = wait_recorded(e, attempts)
    t = totals(counters)
    assert (t["successes"], t["server_errors"]) == (0, attempts), counters


def retrying_every_reset(cfg):
    """The route retries `reset` (also a reset after the request went out),
    as an operator may configure it, instead of the shipped
    `reset-before-request`."""
    policy = route(cfg)["retry_policy"]
    on = policy["retry_on"].split(",")
    assert "reset-before-request" in on and "reset" not in on, on
    policy["retry_on"] = ",".join("reset" if c == "reset-before-request" else c for c in on)


def test_spend_is_charged_when_a_retry_succeeds_after_a_mid_body_reset(mock3, start_envoy):
    """The filter's charge when Envoy DOES retry an attempt reset mid-body:
    the shipped route does not (it retries reset-before-request only), so
    this gateway's route is edited to retry `reset`. The cut attempt, its
    JSON headers still held, reached no one and is not charged; the retry
    that succeeds is charged its usage, once."""
    keys = secrets(3)
    e, base = start_gateway(start_envoy, mock3, priced(keys), edit=retrying_every_reset)
    mock3.behavior(keys[0], fault="reset_mid_body", times=1)
    status, headers, body, err = fetch(e.url, body_of(False))
    assert err is None and status == 200
    assert headers["x-apikeyrouter-attempts"] == "2" and headers["x-apikeyrouter-key-id"] != "k1"
    assert [r.get("fault") for r in mock3.received()] == ["reset_mid_body", None]
    cost = Decimal(headers["x-apikeyrouter-cost"])
    assert cost > 0 and cost == expected_spend(mock3)
    t = totals(assert_books_balance(e, mock3, keys))  # spent == reported usage x price
    assert t["total_tokens"] == json.loads(body)["usage"]["total_tokens"]
    o = outcome(e, headers["x-request-id"])
    assert (o["charged"], Decimal(o["cost"])) == ("usage", cost), o
    assert_no_trap(e, base)


def with_response_flags(cfg):
    """Adds Envoy's response flags (%RESPONSE_FLAGS%) to the access log."""
    for log in hcm(cfg)["access_log"]:
        log["typed_config"]["log_format"]["json_format"]["flags"] = "%RESPONSE_FLAGS%"


def access_log_entry(e, request_id):
    """The access log's JSON line for this request, once Envoy has flushed
    it (it flushes its stdout log every few seconds)."""
    def entries():
        return [json.loads(l) for l in e.logs().splitlines() if l.startswith("{")]
    wait_until(lambda: any(a["request_id"] == request_id for a in entries()), timeout=30,
               what=f"the access log line of request {request_id}")
    return next(a for a in entries() if a["request_id"] == request_id)


def test_upstream_timeout_gives_504_counts_a_failure_and_releases_the_reservation(mock3, start_envoy):
    keys = secrets(3)

    def edit(cfg):
        short_timeout(1)(cfg)
        with_response_flags(cfg)
    e, base = start_gateway(start_envoy, mock3, priced(keys), edit=edit, behavior={"fault": "timeout", "delay_s": 4})
    status, headers, body, err = fetch(e.url, body_of(False))
    # Envoy's own answer to the route's timeout (response flag UT), not the
    # provider's: the provider is still holding the request.
    assert err is None and status == 504 and body == b"upstream request timeout"
    assert access_log_entry(e, headers["x-request-id"])["flags"] == "UT"
    assert e.stats("cluster.openai.upstream_rq_timeout")["cluster.openai.upstream_rq_timeout"] == "1"
    counters = assert_books_balance(e, mock3, keys)
    k = [c for c in counters.values() if c["requests"]]
    assert len(k) == 1 and (k[0]["server_errors"], k[0]["successes"]) == (1, 0), counters
    wait_until(lambda: sum(int(v) for n, v in e.stats("apikeyrouter.key").items()
                           if n.endswith(".requests.none")) == 1, what="status class none counted")
    assert budget_of(e, "b")["spent"] == "0"
    # The provider answers after the gateway gave up: nothing is delivered.
    wait_until(lambda: mock3.received()[0].get("status") == "dropped", timeout=10, what="late answer dropped")
    assert_unharmed(e, base, mock3)


@pytest.mark.parametrize("stream,size_mib", [(False, 8), (True, 24)], ids=["json-8MiB", "sse-24MiB"])
def test_huge_answer_is_delivered_whole_and_its_usage_counted_exactly(mock3, start_envoy, stream, size_mib):
    keys = secrets(3)
    e, base = start_gateway(start_envoy, mock3, priced(keys),
                            behavior={"fault": "huge_body", "size_bytes": size_mib << 20})
    status, headers, body, err = fetch(e.url, body_of(stream), timeout=60)
    assert err is None and status == 200
    assert len(body) >= size_mib << 20
    if stream:
        assert body.endswith(b"data: [DONE]\n\n")
    else:
        assert int(headers["content-length"]) == len(body)
        assert json.loads(body)["usage"]["total_tokens"] > 0
        assert Decimal(headers["x-apikeyrouter-cost"]) == expected_spend(mock3)
    assert totals(assert_books_balance(e, mock3, keys))["total_tokens"] > 0
    assert_unharmed(e, base, mock3)


@pytest.mark.parametrize("prices", [True, False], ids=["priced", "unpriced"])
def test_json_answer_above_the_buffer_limit_reaches_the_client_whole(mock3, start_envoy, prices):
    keys = secrets(3)
    e, base = start_gateway(start_envoy, mock3, priced(keys) if prices else plugin_with_keys(keys),
                            behavior={"fault": "huge_body", "size_bytes": 20 << 20})
    status, headers, body, err = fetch(e.url, body_of(False), timeout=60)
    assert_no_trap(e, base)
    assert err is None and status == 200, (status, body[:200], err)
    assert len(body) == int(headers["content-length"]) > 20 << 20
    assert json.loads(body)["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_slow_trickle_is_delivered_whole_and_counted_exactly(mock3, start_envoy, stream):
    keys = secrets(3)
    e, base = start_gateway(start_envoy, mock3, priced(keys),
                            behavior={"fault": "trickle", "chunk_bytes": 7, "interval_ms": 5})
    status, headers, body, err = fetch(e.url, body_of(stream))
    assert err is None and status == 200
    if stream:
        assert body.endswith(b"data: [DONE]\n\n") and b'"usage": {"prompt_tokens"' in body
    else:
        assert json.loads(body)["usage"]["total_tokens"] > 0
        assert Decimal(headers["x-apikeyrouter-cost"]) == expected_spend(mock3)
    t = totals(assert_books_balance(e, mock3, keys))
    assert t["total_tokens"] > 0
    assert t["streams"] == (1 if stream else 0)
    assert_unharmed(e, base, mock3)


# Every fault of the mock provider (its behavior arguments), by name.
FAULTS = {"500": {"status": 500}, "502": {"status": 502}, "503": {"status": 503},
          "reset_mid_body": {"fault": "reset_mid_body"}, "malformed_json": {"fault": "malformed_json"},
          "truncated_sse": {"fault": "truncated_sse"}, "no_usage": {"fault": "no_usage"},
          "trickle": {"fault": "trickle", "chunk_bytes": 64, "interval_ms": 2},
          "huge_body": {"fault": "huge_body", "size_bytes": 1 << 20},
          "timeout": {"fault": "timeout", "delay_s": 3}}


def whole(stream, body):
    """The answer arrived complete: a stream up to its [DONE], or JSON
    with its usage."""
    if stream:
        return body.endswith(b"data: [DONE]\n\n")
    try:
        return json.loads(body)["usage"]["total_tokens"] > 0
    except (ValueError, KeyError):
        return False


def assert_fault_outcome(fault, stream, tried, bad, got, raw):
    """What the client of a request (its body `raw`) must see, given the
    keys its attempts went to in order (`tried`) and the key that has the
    fault (`bad`). Returns what the charging rules charge it beyond the
    usage the provider reported (which /_mock/stats holds)."""
    status, headers, body, err = got
    where = (fault, "sse" if stream else "json", tried, status, err, body[-120:])
    if tried[0] != bad:
        # A healthy key served it first: nothing of the fault shows.
        assert (status, err, len(tried)) == (200, None, 1) and whole(stream, body), where
        return Decimal(0)
    if fault in ("500", "502", "503"):
        # An error status: Envoy retries it once on a healthy key, which
        # serves it whole (charged its usage).
        assert (status, err, len(tried)) == (200, None, 2) and tried[1] != bad and whole(stream, body), where
        assert headers["x-apikeyrouter-attempts"] == "2", where
        return Decimal(0)
    if fault == "reset_mid_body" and not stream:
        # A reset while the filter held the JSON answer's headers, after the
        # request went out: not retried, a 502, nothing charged.
        assert (status, err, len(tried)) == (502, None, 1) and b"reset" in body, where
        return Decimal(0)
    if fault == "reset_mid_body":
        # A stream is passed on as it comes: the client sees the cut, and it
        # is charged `partial` for the text that passed.
        assert status == 200 and err is not None and len(tried) == 1, where
        assert b"tok0" in body and b"[DONE]" not in body, where
        assert sse_text(body) == (RESET_STREAM_TEXT, RESET_STREAM_REST), where
        return partial_stream(raw, RESET_STREAM_TEXT)
    if fault == "timeout":
        # The route's 2 s timeout ends it: Envoy answers 504, no retry.
        assert (status, err, len(tried), body) == (504, None, 1, b"upstream request timeout"), where
        return Decimal(0)
    assert (status, err, len(tried)) == (200, None, 1), where
    if fault in ("truncated_sse", "malformed_json", "no_usage"):
        # Ended without readable usage: charged its reservation.
        charge = reservation(raw)
    else:
        # A trickle or a huge answer reports its usage.
        charge = Decimal(0)
    if fault == "truncated_sse":
        # An event stream (whatever was asked) cut mid-event.
        assert b"[DONE]" not in body and body.endswith(b'"choi'), where
    elif fault == "malformed_json" and not stream:
        assert body.endswith(b"]]]"), "passed on as it is: " + repr(where)
    elif fault == "no_usage" and not stream:
        assert "usage" not in json.loads(body), where
    else:
        # malformed or usage-less events end with [DONE]; a trickle or a
        # huge answer arrives whole.
        assert whole(stream, body), where
        if fault == "huge_body" and not stream:
            assert len(body) > 1 << 20, where
    return charge


def test_every_fault_in_turn_gives_its_own_outcome_and_leaves_no_reservation_and_no_trap(mock3, start_envoy):
    """All the faults against one gateway, one key misbehaving at a time,
    JSON and streaming: each request's outcome is the one its fault and the
    keys it went to call for, each fault is met by at least one request in
    each mode, and the books still balance at the end: spend is the usage
    the provider reported plus exactly what the charging rules add for the
    answers that reported none."""
    keys = secrets(3)
    e, base = start_gateway(start_envoy, mock3, priced(keys), edit=short_timeout(2))
    charged = Decimal(0)
    for i, (name, f) in enumerate(FAULTS.items()):
        bad = keys[i % 3]
        for k in keys:
            mock3.behavior(k, status=200)
        mock3.behavior(bad, **f)
        for stream in (False, True):
            # Requests until one goes to the misbehaving key first (the
            # fairness objective spreads them over the three keys).
            for n in range(9):
                content = f"fault {name} {'sse' if stream else 'json'} request {n}"
                body = body_of(stream, content=content)
                got = fetch(e.url, body)
                tried = [r["key"] for r in mock3.received() if content in r["body"]]
                charged += assert_fault_outcome(name, stream, tried, bad, got, json.dumps(body))
                if tried[0] == bad:
                    break
            else:
                raise AssertionError(f"{name}: the misbehaving key served none of 9 requests first")
    assert charged > 0
    assert_books_balance(e, mock3, keys, charged=charged)
    assert_unharmed(e, base, mock3)
