"""Routing objectives, quota awareness, key states and decision records,
through real Envoy."""

import json
import time
from collections import Counter

from harness import chat, hcm, ids_by_secret, plugin_with_keys, secrets, wait_until


def key_ids(mock, keys):
    id_of = ids_by_secret(keys)
    return [id_of.get(r["key"], r["key"]) for r in mock.received()]


def test_router_moves_off_a_key_whose_reported_remaining_shrinks_before_any_429(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys))
    mock3.control("/_mock/limit", {"key": keys[0], "limit": 20, "reset": "60s"})
    statuses = Counter(chat(e.url)[0] for _ in range(90))
    assert statuses == {200: 90}
    received = key_ids(mock3, keys)
    stats = mock3.stats()
    assert stats[keys[0]]["statuses"] == {"200": stats[keys[0]]["requests"]}, "k1 never answered 429"
    # 15% of 20 left (3 requests) makes k1 Critical: the router stops there.
    assert received.count("k1") == 17, Counter(received)
    assert e.key_counters()["k1"]["capacity_state"] == "critical"
    assert e.key_counters()["k1"]["provider_limits"]["remaining_requests"] == 3


def test_a_key_that_answered_401_is_not_chosen_again_until_reenabled(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys))
    mock3.behavior(keys[0], status=401)
    results = [chat(e.url) for _ in range(12)]
    assert [s for s, _, _ in results] == [200] * 12, "the 401 was retried on another key"
    assert key_ids(mock3, keys).count("k1") == 1
    k1 = e.key_counters()["k1"]
    assert k1["state"] == "disabled" and k1["state_reason"] == "provider answered 401"
    mock3.behavior(keys[0], status=200)
    status, _, body = e.admin_api("PATCH", "keys/k1", {"state": "available", "reason": "rotated"})
    assert status == 200 and json.loads(body)["state"] == "available"
    for _ in range(12):
        assert chat(e.url)[0] == 200
    # Back in the rotation: round-robin over three keys gives k1 floor(n/3)
    # or ceil(n/3) of a worker's n requests; for any split of 12 over two
    # workers that sums to 3..5.
    assert 3 <= key_ids(mock3, keys)[-12:].count("k1") <= 5, Counter(key_ids(mock3, keys)[-12:])


def test_insufficient_quota_exhausts_the_key_and_the_request_is_served_by_another(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys))
    mock3.behavior(keys[1], status=429, body={"error": {
        "message": "You exceeded your current quota", "type": "insufficient_quota",
        "param": None, "code": "insufficient_quota"}})
    t0 = time.time_ns() // 1_000_000
    for _ in range(9):
        assert chat(e.url)[0] == 200
    t1 = time.time_ns() // 1_000_000
    assert key_ids(mock3, keys).count("k2") == 1
    k2 = e.key_counters()["k2"]
    assert k2["state"] == "exhausted"
    assert k2["state_reason"] == "provider reported insufficient_quota"
    # Without a monthly quota: until the next UTC midnight after the answer.
    day = 86_400_000
    assert k2["state_until_ms"] in {(t // day + 1) * day for t in (t0, t1)}, (t0, k2["state_until_ms"], t1)


def test_cost_objective_uses_the_cheap_key_until_its_quota_is_exhausted_then_the_next_cheapest(mock3, start_envoy):
    keys = secrets(3)
    plugin = plugin_with_keys(keys, routing={"objective": "cost"})
    ks = plugin["providers"][0]["keys"]
    ks[0].update(cost_per_1k="0.010")
    ks[1].update(cost_per_1k="0.001", limits={"rpm": 5})
    ks[2].update(metadata={"cost_per_1k": "0.002"})
    e = start_envoy(mock3, plugin=plugin)
    headers = [chat(e.url)[1] for _ in range(9)]
    assert key_ids(mock3, keys) == ["k2"] * 5 + ["k3"] * 4
    assert headers[0]["x-apikeyrouter-decision"].startswith("objective=cost; key=k2; score=1.000")
    assert "k2:quota_exhausted" in headers[-1]["x-apikeyrouter-decision"]
    assert e.key_counters()["k2"]["capacity_state"] == "exhausted"


def test_objective_header_overrides_the_default_and_can_be_forbidden(mock3, start_envoy):
    keys = secrets(3)
    plugin = plugin_with_keys(keys)
    plugin["providers"][0]["keys"][2]["cost_per_1k"] = "0.0001"
    plugin["providers"][0]["keys"][0]["cost_per_1k"] = "0.01"
    plugin["providers"][0]["keys"][1]["cost_per_1k"] = "0.01"
    e = start_envoy(mock3, plugin=plugin)
    for _ in range(3):
        _, h, _ = chat(e.url, headers={"x-apikeyrouter-objective": "cost"})
        assert h["x-apikeyrouter-key-id"] == "k3"
        assert h["x-apikeyrouter-decision"].startswith("objective=cost;")
    weighted = '{"primary":"cost","weights":{"cost":0.5,"fairness":0.5}}'
    _, h, _ = chat(e.url, headers={"x-apikeyrouter-objective": weighted})
    assert h["x-apikeyrouter-decision"].startswith("objective=cost=0.5,fairness=0.5;")
    status, _, body = chat(e.url, headers={"x-apikeyrouter-objective": "cheapest"})
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_objective"
    assert not any("x-apikeyrouter-objective" in r["headers"] for r in mock3.received())

    plugin["routing"] = {"allow_objective_header": False}
    e2 = start_envoy(mock3, plugin=plugin)
    _, h, _ = chat(e2.url, headers={"x-apikeyrouter-objective": "cost"})
    assert h["x-apikeyrouter-decision"].startswith("objective=fairness;")


def test_route_metadata_sets_the_objective_for_that_route(mock3, start_envoy):
    keys = secrets(3)
    plugin = plugin_with_keys(keys, routing={"route_objectives": True})
    plugin["providers"][0]["keys"][1]["cost_per_1k"] = "0.0001"

    def cheap_route(cfg):
        vh = hcm(cfg)["route_config"]["virtual_hosts"][0]
        cheap = json.loads(json.dumps(vh["routes"][0]))
        cheap["match"] = {"prefix": "/v1/", "headers": [{"name": "x-tier",
                                                         "string_match": {"exact": "cheap"}}]}
        cheap["metadata"] = {"filter_metadata": {"apikeyrouter": {"objective": "cost"}}}
        vh["routes"].insert(0, cheap)

    e = start_envoy(mock3, plugin=plugin, edit=cheap_route)
    for _ in range(3):
        _, h, _ = chat(e.url, headers={"x-tier": "cheap"})
        assert h["x-apikeyrouter-decision"].startswith("objective=cost; key=k2")
    _, h, _ = chat(e.url)
    assert h["x-apikeyrouter-decision"].startswith("objective=fairness;")
    # Without routing.route_objectives the metadata is not read at all.
    plugin["routing"] = {}
    e2 = start_envoy(mock3, plugin=plugin, edit=cheap_route)
    _, h, _ = chat(e2.url, headers={"x-tier": "cheap"})
    assert h["x-apikeyrouter-decision"].startswith("objective=fairness;")


def worker_connections(e):
    """Connections each Envoy worker accepted on the gateway listener, by
    worker stat name (harness.http opens one connection per request)."""
    gateway = f"listener.127.0.0.1_{e.gateway_port}.worker_"
    return {k: int(v) for k, v in e.stats("downstream_cx_total").items() if k.startswith(gateway)}


def test_decision_header_is_present_and_the_ring_wraps_at_ring_size_per_worker(mock3, start_envoy):
    keys = secrets(3)
    ring_size = 50
    plugin = plugin_with_keys(keys, decisions={"ring_size": ring_size})
    e = start_envoy(mock3, plugin=plugin)
    assert e.admin_api("PATCH", "keys/k3", {"state": "disabled", "reason": "test"})[0] == 200
    # Every request is attributed to the worker whose listener accepted its
    # connection; send until each worker has wrapped its ring.
    by_worker = {}
    request_ids = []
    before = worker_connections(e)
    assert len(before) == 2, before
    while min((len(ids) for ids in by_worker.values()), default=0) < ring_size + 10 or len(by_worker) < 2:
        assert len(request_ids) < 400, f"400 requests never wrapped both workers' rings: {by_worker.keys()}"
        status, h, _ = chat(e.url)
        assert status == 200
        # Equal weights: every candidate scores 1.0, so the margin is 0 and
        # the confidence 1 - 1/2 (two interchangeable keys).
        assert h["x-apikeyrouter-decision"] == (
            f"objective=fairness; key={h['x-apikeyrouter-key-id']}; score=1.000; margin=0.000; "
            "confidence=0.500; candidates=2; excluded=k3:disabled")
        assert h["x-apikeyrouter-key-id"] in ("k1", "k2")
        after = worker_connections(e)
        served = [w for w in after if after[w] != before.get(w, 0)]
        assert len(served) == 1 and after[served[0]] == before.get(served[0], 0) + 1, (before, after)
        before = after
        by_worker.setdefault(served[0], []).append(h["x-request-id"])
        request_ids.append(h["x-request-id"])
    # Each worker's ring holds exactly its newest ring_size records: the
    # older ones were overwritten.
    kept = {rid for ids in by_worker.values() for rid in ids[-ring_size:]}
    overwritten = {rid for ids in by_worker.values() for rid in ids[:-ring_size]}
    assert len(kept) == 2 * ring_size and len(overwritten) == len(request_ids) - 2 * ring_size > 0

    def ring(limit):
        status, _, body = e.admin_api("GET", f"decisions?limit={limit}")
        assert status == 200, body
        return json.loads(body)["decisions"]

    # Each worker writes its queued records on its next tick (500 ms).
    wait_until(lambda: {d["request_id"] for d in ring(1000)} == kept, what="both rings flushed and wrapped")
    everything = ring(1000)
    assert len(everything) == 2 * ring_size, "bounded: ring_size records per worker"
    assert {d["request_id"] for d in everything}.isdisjoint(overwritten)
    newest = ring(10)
    assert [d["request_id"] for d in newest] == request_ids[::-1][:10], "newest first"
    for d in everything:
        assert d["objective"] == "fairness" and d["key"] in ("k1", "k2") and d["provider"] == "openai", d
        assert (d["attempt"], d["candidates"], d["score"], d["margin"], d["confidence"]) == (1, 2, 1.0, 0.0, 0.5), d
        assert d["explanation"] == (
            f"chose {d['key']}: its turn (an even spread by weight) among 2 available; k3 disabled"), d
        assert d["excluded"] == [{"key": "k3", "reason": "disabled"}] and d["excluded_total"] == 1, d
        assert d["client"] is None, d
