"""Budgets through real Envoy: reservations hold a hard limit under
concurrency, spend is recorded exactly, soft budgets flag, reservations are
released after failures, a stream its caller aborted is charged exactly what
the charging rules call for (`partial`: README, "Budgets" -> "Charging
rules") and holds nothing reserved, and streams can be cut off."""

import asyncio
import json
import re
from collections import Counter
from decimal import Decimal

import aiohttp

from harness import PRICE_IN, PRICE_OUT, PRICES, chat, expected_spend, http, plugin_with_keys, secrets, wait_until
from harness import budget_of as budget


def with_prices(keys, **extra):
    """plugin_with_keys with PRICES (unlike harness.priced, no budget)."""
    return plugin_with_keys(keys, prices=PRICES, **extra)


async def _clients(url, n, concurrency, body_of):
    sem = asyncio.Semaphore(concurrency)
    results = []

    async def one(session, i):
        async with sem:
            async with session.post(url + "/v1/chat/completions", json=body_of(i)) as r:
                results.append((r.status, await r.read(), dict(r.headers)))

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        await asyncio.gather(*(one(s, i) for i in range(n)))
    return results


def test_hard_budget_never_overspends_under_64_concurrent_clients_and_spend_is_exact(mock3, start_envoy):
    keys = secrets(3)
    plugin = with_prices(keys, budgets=[{"id": "hard", "scope": "global", "window": "total", "limit": "2.00"}])
    e = start_envoy(mock3, plugin=plugin)

    def body(i):
        return {"model": "gpt-4o-mini", "max_tokens": 10,
                "messages": [{"role": "user", "content": f"budget request {i:04d}"}]}

    results = asyncio.run(_clients(e.url, 400, 64, body))
    statuses = Counter(s for s, _, _ in results)
    assert len(results) == 400 and set(statuses) == {200, 429}, statuses
    assert statuses[200] > 20 and statuses[429] > 0, statuses
    for status, raw, headers in results:
        if status == 429:
            err = json.loads(raw)["error"]
            assert err["code"] == "insufficient_quota" and "Budget 'hard'" in err["message"]
            assert headers.get("x-apikeyrouter-budget") == "hard"
    wait_until(lambda: budget(e, "hard")["reserved"] == "0", what="reservations settled")
    b = budget(e, "hard")
    actual = expected_spend(mock3)
    assert Decimal(b["spent"]) == actual, "recorded spend is usage x price, exactly"
    assert actual <= Decimal("2.00"), "never over the hard limit"
    assert b["requests"] == statuses[200]
    assert b["refused"] == statuses[429]
    # The provider saw exactly the admitted requests.
    assert sum(s["requests"] for s in mock3.stats().values()) == statuses[200]


def test_cost_header_reports_the_exact_cost_of_a_non_streaming_request(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=with_prices(keys))
    status, headers, body = chat(e.url, extra={"model": "gpt-4o-mini"})
    assert status == 200
    u = json.loads(body)["usage"]
    want = (Decimal(u["prompt_tokens"]) * PRICE_IN + Decimal(u["completion_tokens"]) * PRICE_OUT) / 10**6
    assert Decimal(headers["x-apikeyrouter-cost"]) == want
    wait_until(lambda: '\\"cost\\"' in e.logs(), what="access log line")
    lines = [l for l in e.logs().splitlines() if l.startswith("{") and "cost" in l]
    assert len(lines) == 1, "one access log line for the one request"
    logged = json.loads(json.loads(lines[0])["apikeyrouter"])
    assert Decimal(logged["cost"]) == want and logged["key_id"] == headers["x-apikeyrouter-key-id"]
    assert logged["input_tokens"] == u["prompt_tokens"]
    assert logged["decision"].startswith("objective=fairness; key=")


def test_soft_budget_lets_traffic_through_flagged_and_logs_once(mock3, start_envoy):
    keys = secrets(3)
    plugin = with_prices(keys, budgets=[{"id": "soft1", "window": "day", "limit": "0.0001", "enforcement": "soft"}])
    e = start_envoy(mock3, plugin=plugin)
    for _ in range(6):
        status, headers, _ = chat(e.url, extra={"model": "gpt-4o-mini", "max_tokens": 5})
        assert status == 200
        assert headers["x-apikeyrouter-budget-warning"] == "soft1"
    assert e.logs().count("budget soft1 passed its soft limit") == 1
    wait_until(lambda: budget(e, "soft1")["reserved"] == "0", what="settled")
    assert Decimal(budget(e, "soft1")["spent"]) == expected_spend(mock3)


def test_reservations_are_released_after_upstream_errors(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=with_prices(keys, budgets=[{"id": "b", "window": "day", "limit": "100"}]))
    for k in keys:
        mock3.behavior(k, status=500)
    for _ in range(10):
        assert chat(e.url, extra={"model": "gpt-4o-mini"})[0] == 500
    wait_until(lambda: budget(e, "b")["reserved"] == "0", what="reservations released")
    b = budget(e, "b")
    assert (b["spent"], b["requests"]) == ("0", 0)


def tokens_cost(input_tokens, output_tokens):
    """What these tokens cost at PRICES."""
    return (Decimal(input_tokens) * PRICE_IN + Decimal(output_tokens) * PRICE_OUT) / 10**6


# estimate.default_max_tokens, left at its default: the output tokens assumed
# for a request that sets no cap.
DEFAULT_MAX_TOKENS = 4096


def partial_stream(raw_body, text):
    """The `partial` charge of a stream cut after its headers reached the
    caller: the prompt estimate (every body byte a token) plus
    ceil(characters / 4) of the output text that passed, never more than the
    upper bound."""
    upper = tokens_cost(len(raw_body), DEFAULT_MAX_TOKENS)
    return min(tokens_cost(len(raw_body), -(-len(text) // 4)), upper)


ABORTED = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "abort me"}]})


async def _aborts(url, n, concurrency):
    sem = asyncio.Semaphore(concurrency)
    got_first = 0

    async def one(session):
        nonlocal got_first
        async with sem:
            resp = await session.post(url + "/v1/chat/completions", data=ABORTED,
                                      headers={"content-type": "application/json"})
            line = await resp.content.readline()
            if line.startswith(b"data: "):
                got_first += 1
            resp.close()  # the client goes away mid-stream

    conn = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        await asyncio.gather(*(one(s) for _ in range(n)))
    return got_first


def test_1000_aborted_streams_leave_no_reservation_and_are_each_charged_the_text_they_were_sent(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=with_prices(keys, budgets=[{"id": "b", "window": "day", "limit": "1000000"}]))
    # Each stream sends one chunk, then waits: its caller reads it and hangs up.
    mock3.control("/_mock/stream", {"chunks": 5, "gate": True})
    try:
        got_first = asyncio.run(_aborts(e.url, 1000, 50))
        # Read before the gate opens (the mock is asked nothing after it):
        # what each stream had sent when its caller left, and the usage the
        # provider reported for them.
        sent = [r["sent_text"] for r in mock3.received()]
        reported = expected_spend(mock3)
    finally:
        mock3.control("/_mock/release", {})
    assert got_first == 1000
    assert sent == ["tok0 "] * 1000
    wait_until(lambda: budget(e, "b")["reserved"] == "0", timeout=30, what="every reservation settled")
    # Cut after its headers reached the caller: each is charged `partial`,
    # its prompt estimate plus ceil(characters / 4) of the text it was sent.
    charges = [partial_stream(ABORTED, text) for text in sent]
    assert all(c > 0 for c in charges)
    assert reported == 0, "the provider reported no usage for streams cut short"
    b = budget(e, "b")
    assert (Decimal(b["spent"]), b["requests"], b["reserved"]) == (sum(charges), 1000, "0"), b


def test_unknown_model_and_cost_cap_are_refused_with_400(mock3, start_envoy):
    keys = secrets(3)
    plugin = with_prices(keys, unknown_model="refuse", max_cost_per_request="0.50")
    e = start_envoy(mock3, plugin=plugin)
    status, _, body = chat(e.url, extra={"model": "o9-unpriced"})
    assert status == 400 and json.loads(body)["error"]["code"] == "model_not_priced"
    status, _, body = chat(e.url, extra={"model": "gpt-4o-mini", "max_tokens": 100000})
    err = json.loads(body)["error"]
    assert status == 400 and err["code"] == "cost_cap_exceeded" and "max_cost_per_request" in err["message"]
    assert chat(e.url, extra={"model": "gpt-4o-mini", "max_tokens": 10})[0] == 200
    assert len(mock3.received()) == 1


def test_stream_is_cut_off_cleanly_when_a_hard_budget_is_crossed(mock3, start_envoy):
    keys = secrets(3)
    plugin = with_prices(keys, stream_cutoff=True, estimate={"default_max_tokens": 2},
                    budgets=[{"id": "tiny", "window": "total", "limit": "0.012"}])
    plugin["prices"] = {"gpt-4o-mini*": {"input": "0", "output": "1000"}}
    e = start_envoy(mock3, plugin=plugin)
    mock3.control("/_mock/stream", {"chunks": 50, "delay_ms": 5})
    status, _, body = http("POST", e.url + "/v1/chat/completions",
                           {"model": "gpt-4o-mini", "stream": True,
                            "messages": [{"role": "user", "content": "a long answer please"}]})
    text = body.decode()
    assert status == 200
    events = [l for l in text.split("\n\n") if l.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "budget_exceeded"
    assert "tok49" not in text, "the rest of the stream was not sent"
    assert len(re.findall(r"tok\d+", text)) < 20
