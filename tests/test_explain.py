"""Decisions explain themselves, through real Envoy: the confidence in the
x-apikeyrouter-decision header, the access log's outcome and GET decisions
is in [0, 1] and means the same under every objective (1 - (1 - m) / n,
README "Decisions you can explain"), and GET decisions carries a one-line
explanation naming the chosen key, why it won, and why each other key was
left out (key ids only)."""

import json
import re

from harness import chat, plugin_with_keys, secrets, wait_until
from test_charging import outcome
from test_policy_objectives import decision_record


def test_fairness_confidence_grows_with_the_keys_left_and_the_explanation_names_the_rest(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys))
    # Three interchangeable keys: 1 - 1/3.
    status, h, _ = chat(e.url)
    assert status == 200
    kid = h["x-apikeyrouter-key-id"]
    assert h["x-apikeyrouter-decision"] == (
        f"objective=fairness; key={kid}; score=1.000; margin=0.000; confidence=0.667; candidates=3")
    d = decision_record(e, h["x-request-id"])
    assert (d["confidence"], d["margin"]) == (0.667, 0.0), d
    assert d["explanation"] == f"chose {kid}: its turn (an even spread by weight) among 3 available", d
    assert outcome(e, h["x-request-id"])["decision"] == h["x-apikeyrouter-decision"]
    # Two keys out: no alternative is left, so the choice says nothing (0).
    assert e.admin_api("PATCH", "keys/k2", {"state": "disabled", "reason": "test"})[0] == 200
    assert e.admin_api("PATCH", "keys/k3", {"state": "throttled", "duration_seconds": 120})[0] == 200
    status, h, _ = chat(e.url)
    assert status == 200 and h["x-apikeyrouter-key-id"] == "k1"
    assert h["x-apikeyrouter-decision"] == (
        "objective=fairness; key=k1; score=1.000; margin=-; confidence=0.000; candidates=1; "
        "excluded=k2:disabled,k3:throttled")
    d = decision_record(e, h["x-request-id"])
    assert d["confidence"] == 0.0 and d["margin"] is None, d
    m = re.fullmatch(r"chose k1: its turn \(an even spread by weight\), the only key available; "
                     r"k2 disabled, k3 cooling (\d+) (s|min)", d["explanation"])
    assert m, d["explanation"]
    assert (m.group(2) == "min" and int(m.group(1)) == 2) or (m.group(2) == "s" and 100 <= int(m.group(1)) <= 120), m
    assert outcome(e, h["x-request-id"])["decision"] == h["x-apikeyrouter-decision"]
    # No key material anywhere in what the operator reads.
    _, _, raw = e.admin_api("GET", "decisions?limit=1000")
    assert not any(s in raw.decode() for s in keys)


def test_cost_confidence_reflects_the_margin_and_the_explanation_gives_price_cooldown_and_critical(
        start_mock, start_envoy):
    keys = secrets(4)
    mock = start_mock(keys)
    plugin = plugin_with_keys(keys, routing={"objective": "cost"})
    # k1 and k3 cheapest, then k2, then k4.
    for key, price in zip(plugin["providers"][0]["keys"], ["0.0001", "0.00015", "0.0001", "0.0003"]):
        key["cost_per_1k"] = price
    e = start_envoy(mock, plugin=plugin)
    # k1 answers one 429 (it cools down 30 s); k3 reports 10 of 100
    # requests left for an hour (Critical capacity).
    mock.behavior(keys[0], status=429, headers={"retry-after": "30"}, times=1)
    mock.behavior(keys[2], status=200, headers={"x-ratelimit-limit-requests": "100",
                                               "x-ratelimit-remaining-requests": "10",
                                               "x-ratelimit-reset-requests": "1h"})
    served = set()
    while not {"k3"} <= served or e.key_counters()["k1"]["state"] != "throttled":
        assert len(served) < 5, served
        status, h, _ = chat(e.url)
        assert status == 200
        served.add(h["x-apikeyrouter-key-id"])
    wait_until(lambda: e.key_counters()["k3"]["capacity_state"] == "critical", what="k3 critical")
    # Now k2 wins on price over k4, the only other candidate: scores 1 and
    # 0.1 (cheapest 1, dearest 0.1), so m = 0.9 and confidence 1 - 0.1/2.
    status, h, _ = chat(e.url)
    assert status == 200 and h["x-apikeyrouter-key-id"] == "k2", h
    assert h["x-apikeyrouter-decision"] == (
        "objective=cost; key=k2; score=1.000; margin=0.900; confidence=0.950; candidates=2; "
        "excluded=k1:throttled,k3:critical"), h
    d = decision_record(e, h["x-request-id"])
    assert (d["key"], d["confidence"], round(d["margin"], 9)) == ("k2", 0.95, 0.9), d
    m = re.fullmatch(r"chose k2: lowest cost 0\.00015/1k tokens among 2 available; "
                     r"k1 cooling (\d+) s, k3 quota critical", d["explanation"])
    assert m and 1 <= int(m.group(1)) <= 30, d["explanation"]
    assert outcome(e, h["x-request-id"])["decision"] == h["x-apikeyrouter-decision"]
    # A constraint that leaves one key: nothing was compared (0), and the
    # explanation says why each other key was left out.
    assert e.admin_api("PATCH", "keys/k4", {"state": "disabled", "reason": "test"})[0] == 200
    assert e.admin_api("PATCH", "keys/k3", {"state": "disabled", "reason": "test"})[0] == 200
    assert e.admin_api("PATCH", "keys/k1", {"state": "available"})[0] == 200
    cheap_only = {"primary": "cost", "constraints": {"max_cost_per_1k": 0.0001}}
    status, h, _ = chat(e.url, headers={"x-apikeyrouter-objective": json.dumps(cheap_only)})
    assert status == 200 and h["x-apikeyrouter-key-id"] == "k1", h
    d = decision_record(e, h["x-request-id"])
    assert d["confidence"] == 0.0 and d["candidates"] == 1, d
    assert d["explanation"] == ("chose k1: lowest cost 0.0001/1k tokens, the only key available; "
                                "k3 disabled, k4 disabled, k2 above max_cost_per_1k"), d
