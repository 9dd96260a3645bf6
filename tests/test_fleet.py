"""Fleet mode through real Envoy processes and a real etcd: a fleet-wide
hard budget holds within its documented bound under load spread across the
instances, a 429 on one instance cools the key on the others, and when etcd
dies mid-run the instances keep serving on local state, report it, and
reconcile every cent once etcd is back."""

import asyncio
import json
import time
from decimal import Decimal

import aiohttp
import pytest

from harness import (ADMIN_TOKEN, PRICES, Etcd, chat, expected_spend, plugin_with_keys, secrets, wait_until,
                     wait_until_async)
from harness import budget_of as budget

INTERVAL_MS = 200
PREFIX = "/akr-test"


@pytest.fixture
def etcd():
    with Etcd() as e:
        yield e


def fleet_plugin(keys, **extra):
    fleet = {"etcd_cluster": "etcd", "prefix": PREFIX, "sync_interval_ms": INTERVAL_MS, "timeout_ms": 300,
             "degraded_after_ms": 1000, "local_share": "0.5"}
    fleet.update(extra.pop("fleet", {}))
    return plugin_with_keys(keys, prices=PRICES, fleet=fleet, **extra)


def with_etcd(etcd, node_id):
    """Gives Envoy a node id (the instance id) and a cluster for etcd's
    JSON gateway (HTTP/1.1)."""
    def edit(cfg):
        cfg["node"] = {"id": node_id, "cluster": "apikeyrouter-fleet-test"}
        cfg["static_resources"]["clusters"].append({
            "name": "etcd", "type": "STATIC", "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": "etcd", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": etcd.port}}}}]}]},
        })
    return edit


def start_fleet(start_envoy, mock, etcd, plugin, n):
    fleet = [start_envoy(mock, plugin=plugin, edit=with_etcd(etcd, f"gw-{i + 1}")) for i in range(n)]
    for e in fleet:
        wait_until(lambda: health(e)["fleet"]["syncs"] > 0, timeout=10, what="a first sync with etcd")
    return fleet


def health(e):
    """GET health; 503 exactly when it says unhealthy (no key can serve, as
    when a quota is spent fleet-wide)."""
    status, _, body = e.admin_api("GET", "health")
    assert status in (200, 503), body
    h = json.loads(body)
    assert (status == 503) == (h["status"] == "unhealthy"), (status, h)
    return h


def syncs(e):
    """How many syncs with etcd this instance has finished."""
    return health(e)["fleet"]["syncs"]


def after_two_syncs(e, what):
    """Waits until the instance has finished two more syncs than now. The
    first may have read etcd before now; the second reads it after the
    first ended (and after the writes that sync queued), so what was in
    etcd or in the instance's own state now has been read and written."""
    start = syncs(e)
    wait_until(lambda: syncs(e) >= start + 2, timeout=10, what=f"two more syncs ({what})")


def shared_state(etcd, key_id):
    """The fleet's state of a key in etcd (`<prefix>/s/<key>`), as a dict."""
    value = etcd.get(f"{PREFIX}/s/{key_id}")
    return json.loads(value) if value else {}


def marker(etcd, instance, name):
    """What one instance counted for a counter, as its marker in etcd says (0 without one)."""
    value = etcd.get(f"{PREFIX}/m/{instance}/{name}")
    return Decimal(json.loads(value)["v"]) if value else Decimal(0)


def etcd_total(etcd, name):
    """The fleet's count of a counter: the sum of every instance's marker."""
    markers = etcd.range_prefix(f"{PREFIX}/m/")
    return sum((Decimal(json.loads(v)["v"]) for k, v in markers.items() if k.endswith("/" + name)), Decimal(0))


async def _load(urls, per_url, stop_after_refusals, seconds, model="gpt-4o-mini", stop=None):
    """`per_url` clients per gateway, each posting until it has seen
    `stop_after_refusals` refusals in a row, `seconds` have passed, or
    `stop` is set. Returns (gateway index, finished at, status, body,
    headers) per request."""
    results = []
    deadline = time.monotonic() + seconds

    async def client(session, g, url, c):
        refused = 0
        i = 0
        while time.monotonic() < deadline and refused < stop_after_refusals and not (stop and stop.is_set()):
            body = {"model": model, "max_tokens": 7,
                    "messages": [{"role": "user", "content": f"fleet load g{g} c{c} #{i}"}]}
            i += 1
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                data = await r.read()
                results.append((g, time.monotonic(), r.status, data, dict(r.headers)))
                refused = refused + 1 if r.status == 429 else 0
                if r.status == 429:
                    await asyncio.sleep(0.02)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        await asyncio.gather(*(client(s, g, url, c) for g, url in enumerate(urls) for c in range(per_url)))
    return results


async def _sync_gaps(gateways, stop, every=0.02):
    """Polls each gateway's sync count (GET health) until `stop` is set.
    Returns the longest time between two of any gateway's syncs, as seen:
    between the polls that saw its count change, plus the longest time
    between two polls (what a poll can miss)."""
    changes = [[] for _ in gateways]
    polled = []
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        last = [None] * len(gateways)
        while not stop.is_set():
            for i, e in enumerate(gateways):
                async with s.get(e.url + "/apikeyrouter/v1/health", headers=headers) as r:
                    n = json.loads(await r.read())["fleet"]["syncs"]
                if n != last[i]:
                    changes[i].append(time.monotonic())
                    last[i] = n
            polled.append(time.monotonic())
            await asyncio.sleep(every)
    assert all(len(c) >= 3 for c in changes), f"syncs went on during the load: {changes}"
    spacing = max(b - a for a, b in zip(polled, polled[1:]))
    return max(b - a for c in changes for a, b in zip(c, c[1:])) + spacing


def test_fleet_wide_hard_budget_holds_within_the_documented_bound_across_three_instances(
        mock3, etcd, start_envoy):
    limit = Decimal("2.00")
    plugin = fleet_plugin(secrets(3), budgets=[{"id": "fleet", "scope": "global", "window": "day",
                                                "limit": str(limit)}])
    gws = start_fleet(start_envoy, mock3, etcd, plugin, 3)
    # A model takes its time: every answer after 300 ms.
    mock3.behavior("*", fault="timeout", delay_s=0.3, times=None)

    async def run():
        stop = asyncio.Event()
        gaps = asyncio.ensure_future(_sync_gaps(gws, stop))
        try:
            results = await _load([e.url for e in gws], per_url=2, stop_after_refusals=8, seconds=60)
        finally:
            stop.set()
        return results, await gaps
    results, sync_gap = asyncio.run(run())

    ok = [r for r in results if r[2] == 200]
    refused = [r for r in results if r[2] == 429]
    assert ok and refused, "the load ran into the budget"
    assert {r[0] for r in refused} == {0, 1, 2}, "every instance refused once the fleet's budget was spent"
    for r in refused:
        assert json.loads(r[3])["error"]["code"] == "insufficient_quota" and b"fleet" in r[3], r[3]
    assert len(results) == len(ok) + len(refused), "nothing but 200s and budget refusals"

    # Spend is settled, pushed and pulled: every instance shows the fleet's
    # spend, etcd holds it exactly, and it is exactly usage x price.
    actual = expected_spend(mock3)
    assert sum(Decimal(r[4]["x-apikeyrouter-cost"]) for r in ok) == actual
    wait_until(lambda: etcd_total(etcd, "b/fleet") == actual, timeout=10, what="every instance's spend in etcd")
    for e in gws:
        wait_until(lambda: Decimal(budget(e, "fleet")["spent"]) == actual, timeout=10,
                   what="the fleet's spend on every instance")
        assert budget(e, "fleet")["reserved"] == "0"

    # The documented bound: what the other instances spent within one sync
    # interval and a quarter (new spend is pushed at the next tick, a
    # quarter interval; the others pull it within an interval), plus their
    # requests in flight. The interval is the longest one measured between
    # two syncs in this run (with its calls to etcd), not the configured
    # one: on a loaded machine ticks come late.
    window = 1.25 * sync_gap
    costs = sorted((r[1], r[0], Decimal(r[4]["x-apikeyrouter-cost"])) for r in ok)
    worst = Decimal(0)
    for t, g, _ in costs:
        others = sum((c for (u, h, c) in costs if t - window <= u <= t and h != g), Decimal(0))
        worst = max(worst, others)
    in_flight = 2 * 2 * max(c for _, _, c in costs)  # 2 other instances x 2 clients
    overshoot = actual - limit
    print(f"fleet spend {actual} for limit {limit}: overshoot {overshoot}, bound {worst + in_flight}"
          f" ({len(ok)} served, {len(refused)} refused; longest sync interval {sync_gap * 1000:.0f} ms)")
    assert overshoot <= worst + in_flight
    assert actual < limit * Decimal("1.5"), "far below what three separate budgets (3x the limit) would allow"


def test_a_429_or_401_on_one_instance_reaches_the_others_by_their_next_sync(mock3, etcd, start_envoy):
    """A key-state change leaves its instance at that instance's next sync
    and reaches the others at theirs (README, Fleet mode): checked by the
    syncs each instance reports, not by the clock."""
    keys = secrets(3)
    a, b = start_fleet(start_envoy, mock3, etcd, fleet_plugin(keys), 2)
    mock3.behavior(keys[0], status=429, times=1, headers={"retry-after": "120"})
    # Requests to A until k1 has answered 429 there (round-robin reaches it).
    for _ in range(6):
        status, headers, _ = chat(a.url, extra={"max_tokens": 7})
        assert status == 200
        if a.key_counters()["k1"]["state"] == "throttled":
            break
    assert a.key_counters()["k1"]["state"] == "throttled"
    after_two_syncs(a, "A pushes k1's cooldown")
    k1 = shared_state(etcd, "k1")
    assert (k1.get("by"), k1.get("state")) == ("gw-1", "available") and k1["cooldown_until_ms"] > 0, k1
    after_two_syncs(b, "B reads k1's cooldown")
    k1 = b.key_counters()["k1"]
    assert k1["state"] == "throttled" and k1["cooldown_remaining_ms"] > 100_000, k1

    # B never sends to k1 while it cools, though it has never seen a 429.
    before = mock3.stats().get(keys[0], {}).get("requests", 0)
    for _ in range(12):
        status, headers, _ = chat(b.url, extra={"max_tokens": 7})
        assert status == 200 and headers["x-apikeyrouter-key-id"] != "k1"
    assert mock3.stats().get(keys[0], {}).get("requests", 0) == before
    status, _, body = b.admin_api("GET", "transitions")
    assert status == 200
    assert any(t["id"] == "k1" and t["reason"] == "fleet: reported by instance gw-1"
               for t in json.loads(body)["transitions"]), body

    # An admin's "available" on B clears the cooldown on A too.
    status, _, body = b.admin_api("PATCH", "keys/k1", json.dumps({"state": "available"}).encode())
    assert status == 200, body
    after_two_syncs(b, "B pushes k1's reset")
    k1 = shared_state(etcd, "k1")
    assert (k1.get("by"), k1.get("state"), k1.get("cooldown_until_ms")) == ("gw-2", "available", 0), k1
    after_two_syncs(a, "A reads k1's reset")
    assert a.key_counters()["k1"]["state"] == "available"

    # A 401 on A disables the key on B as well.
    mock3.behavior(keys[1], status=401, times=None)
    for _ in range(6):
        status, _, _ = chat(a.url, extra={"max_tokens": 7})
        assert status == 200
        if a.key_counters()["k2"]["state"] == "disabled":
            break
    assert a.key_counters()["k2"]["state"] == "disabled"
    after_two_syncs(a, "A pushes k2's disable")
    k2 = shared_state(etcd, "k2")
    assert (k2.get("by"), k2.get("state")) == ("gw-1", "disabled"), k2
    after_two_syncs(b, "B reads k2's disable")
    k2 = b.key_counters()["k2"]
    assert (k2["state"], k2["state_reason"]) == ("disabled", "provider answered 401"), k2


def test_a_daily_token_quota_holds_across_the_fleet(start_mock, etcd, start_envoy):
    keys = secrets(1)
    mock = start_mock(keys)
    plugin = fleet_plugin(keys)
    plugin["providers"][0]["keys"][0]["limits"] = {"daily_tokens": 100}
    a, b = start_fleet(start_envoy, mock, etcd, plugin, 2)
    # A spends k1's day on its own.
    for _ in range(10):
        status, _, body = chat(a.url, extra={"max_tokens": 7})
        if status == 429:
            break
    assert status == 429 and b"no_available_key" in body and b"1 exhausted" in body, body
    used = mock.stats()[keys[0]]["total_tokens"]
    assert used >= 100
    # B learns it from etcd at its next sync after A's: k1 has no tokens
    # left today for B either.
    after_two_syncs(a, "A pushes k1's tokens")
    assert etcd_total(etcd, "q/k1/day") == used
    after_two_syncs(b, "B reads k1's tokens")
    assert b.key_counters()["k1"]["capacity_state"] == "exhausted", b.key_counters()["k1"]
    # B's health says so: A's spend left no key that can serve.
    h = health(b)
    assert (h["status"], h["keys"]["quota_exhausted"], h["unavailable"][0]["detail"]) == (
        "unhealthy", 1, "daily_tokens"), h
    status, _, body = chat(b.url, extra={"max_tokens": 7})
    assert status == 429 and b"no_available_key" in body and b"1 exhausted" in body, body
    assert mock.stats()[keys[0]]["total_tokens"] == used, "B sent nothing to k1"
    assert etcd_total(etcd, "q/k1/day") == used


def test_when_etcd_dies_mid_run_instances_serve_on_local_state_and_reconcile_when_it_returns(
        mock3, etcd, start_envoy):
    plugin = fleet_plugin(secrets(3), budgets=[
        {"id": "big", "scope": "global", "window": "day", "limit": "1000"},
        # Only requests for this model count against it: it shows the share.
        {"id": "small", "scope": {"model": "gpt-4o-mini-share"}, "window": "day", "limit": "0.40"},
    ])
    a, b = start_fleet(start_envoy, mock3, etcd, plugin, 2)
    stop = asyncio.Event()

    async def scenario():
        load = asyncio.ensure_future(_load([a.url, b.url], per_url=1, stop_after_refusals=1, seconds=60, stop=stop))
        # etcd dies once both instances have pushed spend of their own.
        await wait_until_async(lambda: all(marker(etcd, i, "b/big") > 0 for i in ("gw-1", "gw-2")), timeout=20,
                               interval=0.1, errors=(), what="spend from both instances in etcd")
        etcd.kill()
        # Degraded after degraded_after_ms (1 s) without a sync.
        await wait_until_async(lambda: all(health(e)["status"] == "degraded" for e in (a, b)), timeout=10,
                               interval=0.1, errors=(), what="both instances to report the degraded state")
        degraded = {e.gateway_port: (health(e), e.stats("apikeyrouter.fleet")) for e in (a, b)}
        # While degraded, an instance keeps to its share of a budget.
        shared = await _load([a.url], per_url=1, stop_after_refusals=1, seconds=20, model="gpt-4o-mini-share")
        small = budget(a, "small")
        await asyncio.sleep(1.0)
        etcd.restart()
        await wait_until_async(lambda: all(health(e)["status"] == "healthy" for e in (a, b)), timeout=20,
                               interval=0.1, errors=(), what="both instances healthy again")
        await asyncio.sleep(0.5)
        stop.set()
        return await load, degraded, shared, small

    results, degraded, shared, small = asyncio.run(scenario())
    assert results and all(r[2] == 200 for r in results), \
        "service continued through the outage: " + repr([r[2:4] for r in results if r[2] != 200][:3])
    for h, stats in degraded.values():
        assert h["fleet"]["degraded"] and h["fleet"]["failures"] > 0, h
        assert stats["wasmcustom.apikeyrouter.fleet.degraded"] == "1", stats
    assert "fleet: degraded" in a.logs() and "etcd reachable again" in a.logs()

    # The share: 0.5 of 0.40 for A on its own while etcd was away.
    assert shared[-1][2] == 429 and json.loads(shared[-1][3])["error"]["code"] == "insufficient_quota"
    assert small["fleet"]["local_share"] == "0.5"
    own = Decimal(small["fleet"]["instance_spent"])
    assert own <= Decimal("0.20"), small
    assert own > 0

    # Reconciled: etcd has every cent both instances spent, outage included,
    # and both show the fleet's total again; the share is lifted.
    actual = expected_spend(mock3)
    share_spend = sum(Decimal(r[4]["x-apikeyrouter-cost"]) for r in shared if r[2] == 200)
    wait_until(lambda: etcd_total(etcd, "b/big") == actual, timeout=10, what="spend reconciled")
    wait_until(lambda: etcd_total(etcd, "b/small") == share_spend, timeout=10, what="share spend reconciled")
    for e in (a, b):
        wait_until(lambda: Decimal(budget(e, "big")["spent"]) == actual, timeout=10,
                   what="the fleet's total on every instance")
        assert budget(e, "small")["fleet"]["local_share"] is None
        assert e.stats("apikeyrouter.fleet.degraded")["wasmcustom.apikeyrouter.fleet.degraded"] == "0"


def test_fleet_config_without_an_instance_id_is_refused_naming_the_field(tmp_path):
    from harness import DEMO_CONFIG, render, validate
    cfg = render(DEMO_CONFIG.read_text(), 1, 2, 3, plugin=fleet_plugin(secrets(1)))
    cfg.pop("node", None)
    cfg["static_resources"]["clusters"].append({"name": "etcd", "type": "STATIC", "connect_timeout": "1s"})
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(cfg))
    code, out = validate(str(path), env={"APIKEYROUTER_ADMIN_TOKEN": ADMIN_TOKEN})
    assert code != 0
    assert "fleet.instance" in out, out[-2000:]
