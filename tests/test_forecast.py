"""Forecasts through real Envoy: a steady load against a key with a daily
token quota and a budget shows, in GET keys, GET budgets and
/stats/prometheus, the burn rate and runway that load implies (within 10%),
and the `runway` goal moves traffic off a key that is running out.

The expected figures are computed from the requests actually sent and when
their answers arrived, with the rate's definition (README "Forecasts"):
what was counted since the first answer, over the time since then."""

import json
import time
from decimal import Decimal

from harness import PRICES, budget_of, chat, expected_spend, plugin_with_keys, secrets, wait_recorded, wait_until
from test_metric_values import prometheus

LASTS = 31_536_000
COMPLETION = 100


def steady_load(e, per_second, seconds, headers=None):
    """Sends requests at a steady rate, one after the other; returns
    (time sent, time answered, tokens) of each, every one served."""
    sent = []
    start = time.time()
    n = int(per_second * seconds)
    for i in range(n):
        pause = start + i / per_second - time.time()
        if pause > 0:
            time.sleep(pause)
        t_sent = time.time()
        status, _, body = chat(e.url, headers=headers, extra={"mock_completion_tokens": COMPLETION})
        assert status == 200, body
        sent.append((t_sent, time.time(), json.loads(body)["usage"]["total_tokens"]))
    return sent


def read_at(f):
    """f() and the instant it was read (the middle of the call)."""
    before = time.time()
    v = f()
    return v, (before + time.time()) / 2


def close(actual, expected, what):
    assert actual is not None and abs(actual / expected - 1) < 0.10, (what, actual, expected)


def test_forecasts_match_a_steady_load(start_mock, start_envoy):
    keys = secrets(1)
    mock = start_mock(keys)
    daily = 2_000_000
    plugin = plugin_with_keys(keys, prices=PRICES, budgets=[{"id": "b", "window": "month", "limit": "1000"}],
                              routing={"stats_refresh_ms": 100})
    plugin["providers"][0]["keys"][0]["limits"] = {"daily_tokens": daily}
    e = start_envoy(mock, plugin=plugin)
    # Before any traffic there is no rate, and nothing runs out.
    k = e.key_counters()["k1"]["forecast"]
    assert (k["tokens_per_minute"], k["runway_seconds"], k["runs_out"]) == (None, None, None), k
    assert budget_of(e, "b")["forecast"] == {"spend_per_hour": None, "runway_seconds": None,
                                             "runs_out_before_reset": False}

    sent = steady_load(e, per_second=4, seconds=12)
    wait_recorded(e, len(sent))
    wait_until(lambda: budget_of(e, "b")["reserved"] == "0", what="every request settled")
    first = sent[0][1]
    tokens = sum(t for _, _, t in sent)

    k, now = read_at(lambda: e.key_counters()["k1"])
    span = now - first
    f = k["forecast"]
    close(f["tokens_per_minute"], tokens / span * 60, "tokens per minute")
    close(f["requests_per_minute"], len(sent) / span * 60, "requests per minute")
    [q] = f["quotas"]
    assert (q["limit"], q["remaining"]) == ("daily_tokens", daily - tokens), q
    close(q["runway_seconds"], (daily - tokens) / (tokens / span), "daily_tokens runway")
    # The key runs out before midnight UTC only if the runway is shorter.
    if q["runs_out_before_reset"]:
        assert (f["runs_out"], f["runway_seconds"]) == ("daily_tokens", q["runway_seconds"]), f
    else:
        assert (f["runs_out"], f["runway_seconds"]) == (None, None), f

    spent = expected_spend(mock)
    b, now = read_at(lambda: budget_of(e, "b"))
    assert Decimal(b["spent"]) == spent and b["reserved"] == "0", b
    per_second = float(spent) / (now - first)
    close(b["forecast"]["spend_per_hour"], per_second * 3600, "spend per hour")
    close(b["forecast"]["runway_seconds"], float(Decimal(b["remaining"])) / per_second, "budget runway")

    # The gauges: a key's are written when a worker reloads its snapshot, at
    # most once a second (so at one of the last requests' choices, before
    # that request was counted: under a steady load the rate then is the
    # rate at the last one); a budget's on every tick (500 ms).
    (t_last, _, last_tokens) = sent[-1]
    rate_then = (tokens - last_tokens) / (t_last - first)
    p, now = read_at(lambda: prometheus(e))
    labels = '{provider="openai",key="k1"}'
    close(p["apikeyrouter_key_tokens_per_minute" + labels], rate_then * 60, "tokens per minute gauge")
    close(p["apikeyrouter_key_requests_per_minute" + labels], (len(sent) - 1) / (t_last - first) * 60,
          "requests per minute gauge")
    runway_then = (daily - tokens + last_tokens) / rate_then
    if q["runs_out_before_reset"]:
        close(p["apikeyrouter_key_runway_seconds" + labels], runway_then, "key runway gauge")
    else:
        assert p["apikeyrouter_key_runway_seconds" + labels] == LASTS
    per_second = float(spent) / (now - first)
    close(p['apikeyrouter_budget_spend_per_hour_micros{budget="b"}'], per_second * 3600 * 1e6,
          "spend per hour gauge")
    close(p['apikeyrouter_budget_runway_seconds{budget="b"}'], float(Decimal(b["remaining"])) / per_second,
          "budget runway gauge")


def seconds_to_utc_midnight():
    return 86_400 - time.time() % 86_400


def test_the_runway_goal_moves_traffic_off_a_key_that_is_running_out(start_mock, start_envoy):
    # The daily quota resets at midnight UTC: a key that lasts until then
    # does not run out, so start well before it.
    if seconds_to_utc_midnight() < 300:
        time.sleep(seconds_to_utc_midnight() + 1)
    keys = secrets(2)
    mock = start_mock(keys)
    plugin = plugin_with_keys(keys)
    plugin["providers"][0]["keys"][0]["limits"] = {"daily_tokens": 20_000}
    e = start_envoy(mock, plugin=plugin)
    # k2 has no quota of its own, but its provider says a quarter of its
    # requests are used for the next hour: 0.75 headroom, and no burn to
    # run out by.
    mock.behavior(keys[1], status=200, headers={"x-ratelimit-limit-requests": "100",
                                               "x-ratelimit-remaining-requests": "75",
                                               "x-ratelimit-reset-requests": "1h"})
    assert e.admin_api("PATCH", "keys/k1", {"state": "disabled", "reason": "test"})[0] == 200
    status, h, _ = chat(e.url)
    assert status == 200 and h["x-apikeyrouter-key-id"] == "k2"
    assert e.admin_api("PATCH", "keys/k1", {"state": "available"})[0] == 200
    wait_until(lambda: e.key_counters()["k2"]["headroom"] == 0.75, what="k2's reported headroom")

    # By headroom alone k1 (over 0.85 of its day left) wins every time, and
    # burns through its quota.
    served = []
    for t_sent, _, _ in steady_load(e, per_second=3, seconds=7, headers={"x-apikeyrouter-objective": "headroom"}):
        served.append(t_sent)
    counters = wait_recorded(e, len(served) + 1)
    assert (counters["k1"]["requests"], counters["k2"]["requests"]) == (len(served), 1), counters
    k1 = e.key_counters()["k1"]
    assert k1["headroom"] > 0.85 and k1["forecast"]["runs_out"] == "daily_tokens", k1
    assert k1["forecast"]["runway_seconds"] < 600, k1["forecast"]

    # Weighing the runway in, k2 (which lasts) wins despite less headroom.
    lasting = json.dumps({"primary": "headroom", "weights": {"headroom": 0.5, "runway": 0.5}})
    status, h, _ = chat(e.url, headers={"x-apikeyrouter-objective": lasting})
    assert status == 200 and h["x-apikeyrouter-key-id"] == "k2", h
    assert h["x-apikeyrouter-decision"].startswith("objective=headroom=0.5,runway=0.5; key=k2;"), h
    # And headroom alone still prefers k1: the runway term made the difference.
    status, h, _ = chat(e.url, headers={"x-apikeyrouter-objective": "headroom"})
    assert status == 200 and h["x-apikeyrouter-key-id"] == "k1", h
