"""A budget scoped to one key, through real Envoy: it is reserved when the
attempt stage chooses that key, and a key whose budget has no room for the
request's estimate is passed over for another key (`budget_exhausted` in
the decision) instead of the request being refused."""

import json
from decimal import Decimal

from harness import budget_of, http, plugin_with_keys, secrets, wait_until

MAX_TOKENS = 10


def body(n):
    return {"model": "gpt-4o-mini", "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": f"key budget request {n:03d}"}]}


def test_a_key_whose_budget_has_no_room_is_passed_over_for_another(start_mock, start_envoy):
    keys = secrets(2)
    mock = start_mock(keys)
    plugin = plugin_with_keys(keys, routing={"objective": "cost"},
                              budgets=[{"id": "k1-cap", "scope": {"key": "k1"}, "window": "total",
                                        "limit": "0.000001"}])
    k1, k2 = plugin["providers"][0]["keys"]
    # Flat prices (per 1,000 tokens): the cost objective prefers k1.
    k1["cost_per_1k"] = "1"
    k2["cost_per_1k"] = "2"
    e = start_envoy(mock, plugin=plugin)

    def send(n):
        status, headers, raw = http("POST", e.url + "/v1/chat/completions", body(n))
        assert status == 200, raw
        # Settled before the next request reserves.
        wait_until(lambda: budget_of(e, "k1-cap")["reserved"] == "0", timeout=10, what="k1-cap settled")
        return headers, json.loads(raw)["usage"]["total_tokens"]

    # No room at all: k1 is passed over, k2 serves, and the request is not
    # refused (a key budget moves choice; it does not refuse the request).
    headers, tokens = send(0)
    assert headers["x-apikeyrouter-key-id"] == "k2"
    assert headers["x-apikeyrouter-decision"] == (
        "objective=cost; key=k2; score=1.000; margin=-; confidence=0.000; candidates=1; excluded=k1:budget_exhausted")
    b = budget_of(e, "k1-cap")
    assert (b["spent"], b["reserved"], b["refused"], b["requests"]) == ("0", "0", 1, 0), b

    # Room for exactly three more requests on k1: the estimate (every body
    # byte a prompt token, plus max_tokens, at k1's price) on top of two
    # requests' actual spend.
    body_bytes = len(json.dumps(body(1)).encode())
    estimate = Decimal(body_bytes + MAX_TOKENS) / 1000
    actual = Decimal(tokens) / 1000
    assert estimate > actual
    limit = estimate + 2 * actual
    status, _, raw = e.admin_api("PATCH", "budgets/k1-cap", {"limit": str(limit)})
    assert status == 200, raw
    served = []
    for n in range(1, 6):
        headers, used = send(n)
        assert used == tokens, "every request's usage is the same size"
        served.append((headers["x-apikeyrouter-key-id"], headers["x-apikeyrouter-decision"]))
    assert [kid for kid, _ in served] == ["k1", "k1", "k1", "k2", "k2"], served
    for kid, decision in served[3:]:
        assert decision.endswith("; excluded=k1:budget_exhausted"), decision
    b = budget_of(e, "k1-cap")
    assert Decimal(b["spent"]) == 3 * actual, b
    assert (b["reserved"], b["refused"], b["requests"]) == ("0", 3, 3), b
    # k1 itself stays available: only its budget is out of room.
    k1_state = e.key_counters()["k1"]
    assert (k1_state["state"], k1_state["counters"]["requests"]) == ("available", 3)
    assert [r["key"] for r in mock.received()] == [keys[1]] + [keys[0]] * 3 + [keys[1]] * 2
