"""Routing objectives, quota awareness, key states and decision records,
through real Envoy."""

import json
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
    assert key_ids(mock3, keys)[-12:].count("k1") >= 2, "back in the rotation"


def test_insufficient_quota_exhausts_the_key_and_the_request_is_served_by_another(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys))
    mock3.behavior(keys[1], status=429, body={"error": {
        "message": "You exceeded your current quota", "type": "insufficient_quota",
        "param": None, "code": "insufficient_quota"}})
    for _ in range(9):
        assert chat(e.url)[0] == 200
    assert key_ids(mock3, keys).count("k2") == 1
    k2 = e.key_counters()["k2"]
    assert k2["state"] == "exhausted"
    assert k2["state_reason"] == "provider reported insufficient_quota"
    assert k2["state_until_ms"] > 0


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
    plugin = plugin_with_keys(keys)
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


def test_decision_header_is_present_and_the_ring_holds_the_records(mock3, start_envoy):
    keys = secrets(3)
    plugin = plugin_with_keys(keys, decisions={"ring_size": 50})
    e = start_envoy(mock3, plugin=plugin)
    e.admin_api("PATCH", "keys/k3", {"state": "disabled", "reason": "test"})
    request_ids = []
    for _ in range(60):
        status, h, _ = chat(e.url)
        assert status == 200
        d = h["x-apikeyrouter-decision"]
        assert d.startswith("objective=fairness; key=k")
        assert "candidates=2" in d and "excluded=k3:disabled" in d
        request_ids.append(h["x-request-id"])
    def ring_of(n):
        status, _, body = e.admin_api("GET", f"decisions?limit={n}")
        assert status == 200
        return json.loads(body)["decisions"]

    # Each worker writes its queued records on its next tick (500 ms).
    wait_until(lambda: ring_of(60) and ring_of(60)[0]["request_id"] == request_ids[-1], what="ring flushed")
    ring = ring_of(10)
    assert len(ring) == 10
    assert [d["request_id"] for d in ring] == request_ids[::-1][:10], "newest first"
    newest = ring[0]
    assert newest["objective"] == "fairness" and newest["key"] in ("k1", "k2")
    assert newest["candidates"] == 2
    assert newest["excluded"] == [{"key": "k3", "reason": "disabled"}]
    assert newest["confidence"] is not None and newest["provider"] == "openai"
    # Bounded: per worker at most ring_size records.
    _, _, body = e.admin_api("GET", "decisions?limit=1000")
    assert len(json.loads(body)["decisions"]) <= 100
