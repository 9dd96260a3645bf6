"""A caller's policy chooses its objective, through real Envoy: a team's or
client's `force_objective` ignores the caller's x-apikeyrouter-objective
header, and a policy's `objective` applies when the caller sends none.
Checked through the key that serves, the x-apikeyrouter-decision header and
the decision record."""

import json

from harness import chat, plugin_with_keys, secrets, sha256_hex, wait_until

# One virtual key per caller; the config holds only their SHA-256.
CALLERS = {
    "team-forced": "vk-team-forced-0123456789",    # in team "frugal" (cost, forced)
    "own-forced": "vk-own-forced-0123456789",      # its own policy: cost, forced
    "forced-bare": "vk-forced-bare-0123456789",    # forced, no objective of its own
    "defaulted": "vk-defaulted-0123456789",        # its own default: cost, not forced
    "plain": "vk-plain-0123456789",                # no policy
}


def policy_plugin():
    """Three keys of distinct flat prices (k3 cheapest, then k1, then k2) and
    one client per kind of objective policy; the gateway's default is
    fairness."""
    plugin = plugin_with_keys(secrets(3))
    for key, price in zip(plugin["providers"][0]["keys"], ["0.01", "0.02", "0.0001"]):
        key["cost_per_1k"] = price
    plugin["teams"] = [{"id": "frugal", "objective": "cost", "force_objective": True}]
    plugin["clients"] = [
        {"id": "team-forced", "team": "frugal"},
        {"id": "own-forced", "objective": "cost", "force_objective": True},
        {"id": "forced-bare", "force_objective": True},
        {"id": "defaulted", "objective": "cost"},
        {"id": "plain"},
    ]
    for c in plugin["clients"]:
        c["key_sha256"] = sha256_hex(CALLERS[c["id"]])
    return plugin


def ask(e, caller, objective=None):
    """One chat request as `caller`, with the objective header when given;
    returns (status, headers)."""
    headers = {"authorization": f"Bearer {CALLERS[caller]}"}
    if objective is not None:
        headers["x-apikeyrouter-objective"] = objective
    status, h, body = chat(e.url, headers=headers)
    assert status == 200, (caller, objective, status, body)
    return h


def decision_record(e, request_id):
    """The decision record of one request, once its worker has written it."""
    found = []

    def written():
        status, _, body = e.admin_api("GET", "decisions?limit=1000")
        assert status == 200, body
        found[:] = [d for d in json.loads(body)["decisions"] if d["request_id"] == request_id]
        return found

    wait_until(written, what=f"decision record of {request_id}")
    assert len(found) == 1, found
    return found[0]


def test_forced_objective_ignores_the_callers_header(mock3, start_envoy):
    e = start_envoy(mock3, plugin=policy_plugin())
    cheapest = "objective=cost; key=k3; score=1.000"
    # A team's forced objective and a client's own: every header, valid,
    # weighted or malformed, is ignored; the cheapest key serves each time.
    weighted = '{"primary":"fairness","weights":{"fairness":0.9,"cost":0.1}}'
    for caller in ("team-forced", "own-forced"):
        for sent in (None, "fairness", "latency", weighted, "cheapest-please"):
            h = ask(e, caller, sent)
            assert h["x-apikeyrouter-key-id"] == "k3", (caller, sent, h)
            assert h["x-apikeyrouter-decision"].startswith(cheapest + ";"), (caller, sent, h)
    # Forced without an objective of its own: the gateway's default
    # (fairness) holds whatever the header says.
    for sent in ("cost", "latency", "cheapest-please"):
        h = ask(e, "forced-bare", sent)
        assert h["x-apikeyrouter-decision"].startswith("objective=fairness; key=k"), (sent, h)
    # The same header from a caller that is not forced is honoured, and a
    # malformed one refused: the policy, not the header, made the difference.
    assert ask(e, "plain", "cost")["x-apikeyrouter-decision"].startswith(cheapest + ";")
    status, _, body = chat(e.url, headers={"authorization": f"Bearer {CALLERS['plain']}",
                                           "x-apikeyrouter-objective": "cheapest-please"})
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_objective"
    # The decision record says the same, with the caller.
    h = ask(e, "team-forced", "latency")
    record = decision_record(e, h["x-request-id"])
    assert (record["client"], record["objective"], record["key"]) == ("team-forced", "cost", "k3")
    assert record["candidates"] == 3 and record["excluded"] == []
    # 10 + 3 + 1 + 1 requests served; the provider never saw the header.
    received = mock3.received()
    assert len(received) == 15
    assert not any("x-apikeyrouter-objective" in r["headers"] for r in received)


def test_a_policy_objective_applies_when_the_caller_sends_none(mock3, start_envoy):
    e = start_envoy(mock3, plugin=policy_plugin())
    keys = set()
    for _ in range(3):
        h = ask(e, "defaulted")
        assert h["x-apikeyrouter-key-id"] == "k3"
        assert h["x-apikeyrouter-decision"].startswith("objective=cost; key=k3; score=1.000;"), h
    record = decision_record(e, h["x-request-id"])
    assert (record["client"], record["objective"], record["key"]) == ("defaulted", "cost", "k3")
    # Not forced: the caller's own header still wins over its policy's default.
    for _ in range(6):
        h = ask(e, "defaulted", "fairness")
        assert h["x-apikeyrouter-decision"].startswith("objective=fairness; key=k"), h
        keys.add(h["x-apikeyrouter-key-id"])
    assert len(keys) >= 2, "fairness spreads the requests over the keys"
    # A caller without a policy objective gets the gateway's default.
    h = ask(e, "plain")
    assert h["x-apikeyrouter-decision"].startswith("objective=fairness; key=k"), h
    record = decision_record(e, h["x-request-id"])
    assert (record["client"], record["objective"]) == ("plain", "fairness")
