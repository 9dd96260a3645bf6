"""The per-caller and budget-refusal metrics, by value, in Envoy's
/stats/prometheus: known traffic from known callers, then each of
apikeyrouter_budget_refused, apikeyrouter_client_tokens,
apikeyrouter_client_spend_micros and apikeyrouter_client_rate_limited is
exactly what that traffic implies (tokens and spend from the mock's usage
and the price table)."""

import pytest

from harness import budget_of, http, secrets, wait_until
from test_budget_scopes import SECOND_MODEL, cost_of, estimate_of, in_one_window, request_body, scoped_plugin, send
from test_budget_scopes import settled, show, tokens_of


def prometheus(e):
    """Every sample of /stats/prometheus as {'name{labels}': value}."""
    status, _, body = http("GET", e.admin_url + "/stats/prometheus")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def micros(amount):
    """An amount in millionths, as the filter counts spend (per request)."""
    return int((amount * 1_000_000).to_integral_value())


# The request flushed() sends.
ZED_BODY = request_body("zed's request closes the traffic")


def flushed(e):
    """Sends zed's one request and waits until its count shows. With one
    worker, its counters are flushed together on its tick, so everything
    counted before zed's request shows too."""
    assert send(e, "zed", ZED_BODY)[0] == 200
    wait_until(lambda: prometheus(e).get('apikeyrouter_client_requests{client="zed"}') == 1, timeout=15,
               what="zed's request in the flushed metrics")
    return prometheus(e)


def test_budget_refusals_and_per_client_tokens_spend_and_rate_limits_are_counted_exactly(mock3, start_envoy):
    keys = secrets(3)
    bodies = {"alice": request_body("alice asks"), "bob": request_body("bob asks something longer"),
              "carol": request_body("carol asks a question of yet another length"),
              "zed": ZED_BODY}
    cost = {c: cost_of(b) for c, b in bodies.items()}
    # bob's budget holds exactly two of his requests; carol may use one
    # request's tokens a minute; alice three requests a minute.
    clients = {"alice": {"rpm": 3}, "carol": {"tpm": tokens_of(bodies["carol"])}}
    budgets = [{"id": "bob-cap", "scope": {"client": "bob"}, "window": "day",
                "limit": show(cost["bob"] + estimate_of(bodies["bob"]))},
               # zed spends, but never near this limit.
               {"id": "idle", "scope": {"client": "zed"}, "window": "day", "limit": "1"},
               {"id": "all", "window": "total", "limit": "1000"}]
    sent = {"alice": 5, "bob": 4, "carol": 2}

    def run():
        # One worker, for flushed().
        e = start_envoy(mock3, plugin=scoped_plugin(keys, budgets, clients=clients), concurrency=1)
        answers = {}
        for caller, n in sent.items():
            answers[caller] = []
            for _ in range(n):
                status, _, out = send(e, caller, bodies[caller])
                answers[caller].append((status, out.get("error", {}).get("code")))
                settled(e, ["all"])
        return e, answers

    # rpm and tpm are per UTC minute: the whole burst in one minute.
    e, answers = in_one_window("minute", run)
    assert answers["alice"] == [(200, None)] * 3 + [(429, "client_rate_limited")] * 2
    assert answers["bob"] == [(200, None)] * 2 + [(429, "insufficient_quota")] * 2
    assert answers["carol"] == [(200, None), (429, "client_rate_limited")]

    m = flushed(e)
    served = {"alice": 3, "bob": 2, "carol": 1, "zed": 1}
    want = {}
    for c, n in served.items():
        want[f'apikeyrouter_client_tokens{{client="{c}"}}'] = n * tokens_of(bodies[c])
        want[f'apikeyrouter_client_spend_micros{{client="{c}"}}'] = n * micros(cost[c])
    want['apikeyrouter_client_rate_limited{client="alice"}'] = 2
    want['apikeyrouter_client_rate_limited{client="carol"}'] = 1
    want['apikeyrouter_budget_refused{budget="bob-cap"}'] = 2
    want['apikeyrouter_budget_refused{budget="idle"}'] = 0
    want['apikeyrouter_budget_refused{budget="all"}'] = 0
    assert {k: m.get(k) for k in want} == want
    # Callers never rate limited have no such counter at all.
    assert not [k for k in m if k.startswith("apikeyrouter_client_rate_limited") and ("bob" in k or "zed" in k)]
    # The refusals are the budget's own count too.
    assert budget_of(e, "bob-cap")["refused"] == 2


def test_a_key_budget_that_leaves_a_request_without_a_key_counts_as_a_refusal_in_the_metric(mock3, start_envoy):
    keys = secrets(3)
    body = request_body("for the provider with one key", model=SECOND_MODEL)
    # k3, the one key of provider `second`, has room for one request.
    budgets = [{"id": "k3-day", "scope": {"key": "k3"}, "window": "day", "limit": show(estimate_of(body))}]
    e = start_envoy(mock3, plugin=scoped_plugin(keys, budgets), concurrency=1)
    assert send(e, "carol", body)[0] == 200
    settled(e, ["k3-day"])
    status, _, out = send(e, "carol", body)
    assert (status, out["error"]["code"]) == (429, "no_available_key"), out
    assert budget_of(e, "k3-day")["refused"] == 1
    assert flushed(e).get('apikeyrouter_budget_refused{budget="k3-day"}') == 1
