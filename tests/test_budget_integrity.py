"""Budget state from the very first request: records exist before traffic,
so the first concurrent reservations are compare-and-swaps and none
overwrites another (an overwritten reservation would let more requests in
than the limit holds).

Admitted requests are streams the mock holds at its gate, so no request
settles (at its actual cost, below its estimate) before every admission is
decided: exactly the limit's worth is admitted, not one more."""

import asyncio
import json
import re
from collections import Counter
from decimal import Decimal

import aiohttp

from harness import PRICES, expected_spend, http, plugin_with_keys, secrets, wait_until
from harness import budget_of as budget

FITS = 10  # requests the budget's limit holds


def _body(i):
    # Every body has the same length, so every estimate is the same.
    return {"model": "gpt-4o-mini", "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": f"first {i:03d}"}]}


async def _burst(url, mock, n):
    """n requests released at once, each on its own connection. Returns the
    statuses seen once all n were decided (admitted streams are held at the
    mock's gate), then releases the gate and lets every request finish."""
    start = asyncio.Event()
    statuses = {}

    async def one(session, i):
        await start.wait()
        async with session.post(url + "/v1/chat/completions", json=_body(i)) as r:
            statuses[i] = r.status
            await r.read()

    conn = aiohttp.TCPConnector(limit=n, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        tasks = [asyncio.create_task(one(s, i)) for i in range(n)]
        await asyncio.sleep(0.2)
        start.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(statuses) < n:
            assert loop.time() < deadline, f"only {len(statuses)} of {n} requests were decided"
            await asyncio.sleep(0.05)
        decided = Counter(statuses.values())
        mock.control("/_mock/release", {})
        await asyncio.gather(*tasks)
    return decided


def _plugin(limit):
    return plugin_with_keys(secrets(3), prices=PRICES, budgets=[
        {"id": "fresh", "scope": "global", "window": "total", "limit": limit}])


def _estimate(start_mock, start_envoy):
    """One request's estimate, from the refusal of a budget too small for it."""
    e = start_envoy(start_mock(secrets(3)), plugin=_plugin("0.000000001"))
    status, _, raw = http("POST", e.url + "/v1/chat/completions", _body(0))
    assert status == 429, raw
    m = re.search(r"this request's estimate ([0-9.]+)", json.loads(raw)["error"]["message"])
    assert m, raw
    return Decimal(m.group(1))


def test_64_concurrent_first_requests_on_a_fresh_budget_admit_exactly_what_the_limit_holds(start_mock, start_envoy):
    limit = _estimate(start_mock, start_envoy) * FITS
    for round_ in range(3):
        mock = start_mock(secrets(3))
        mock.control("/_mock/stream", {"chunks": 3, "gate": True})
        e = start_envoy(mock, plugin=_plugin(str(limit)))
        statuses = asyncio.run(_burst(e.url, mock, 64))
        assert statuses == Counter({200: FITS, 429: 64 - FITS}), f"round {round_}: {statuses}"
        wait_until(lambda: budget(e, "fresh")["reserved"] == "0", what=f"round {round_}: settlements")
        rec = budget(e, "fresh")
        assert (rec["requests"], rec["refused"]) == (FITS, 64 - FITS), rec
        assert Decimal(rec["spent"]) == expected_spend(mock), f"round {round_}: {rec}"
        assert rec["reservations_expired"] == 0
        assert sum(s["requests"] for s in mock.stats().values()) == FITS
