"""Budget scopes and windows through real Envoy.

A budget scoped to a client, a team, a provider or a key charges exactly the
requests in its scope, at the mock's usage x the price table; a hard one
refuses with a 429 naming it once the next request's estimate no longer fits
(a key's budget passes its key over instead); and GET budgets/{id} shows the
start and reset of its minute, hour, day or month window, computed here from
the time the test reads it.

Every expected amount is computed from the request bodies: the mock's own
usage_for gives the tokens it reports, PRICES the price, and the README's
estimate rule (body bytes at the input price plus max_tokens at the output
price) the reservation.
"""

import importlib.util
import json
import math
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from harness import MOCK, PRICE_IN, PRICE_OUT, PRICES, budget_of, http, secrets, sha256_hex, wait_until


def _mock_usage_for():
    spec = importlib.util.spec_from_file_location("mock_provider_usage", MOCK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.usage_for


# The usage the mock reports for a request body (its own function).
usage_for = _mock_usage_for()

# Callers (virtual keys) and their teams.
VIRTUAL_KEYS = {"alice": "sk-vk-alice-0000000000000001", "bob": "sk-vk-bob-00000000000000002",
                "carol": "sk-vk-carol-0000000000000003", "zed": "sk-vk-zed-00000000000000004"}
TEAMS = {"alice": "blue", "bob": "blue", "carol": "red", "zed": "red"}
# A model only the provider `second` serves (priced by PRICES' gpt-4o-mini*).
SECOND_MODEL = "gpt-4o-mini-2nd"
MAX_TOKENS = 16


def scoped_plugin(keys, budgets, clients=None, **extra):
    """Two providers behind one mock: `openai` with keys k1, k2 (keys[0:2])
    and `second` with k3 (keys[2]), which alone serves SECOND_MODEL; callers
    alice and bob (team blue), carol and zed (team red), each with their
    policy from `clients` (id -> fields); PRICES; and `budgets`."""
    clients = clients or {}
    return {
        "providers": [{"id": "openai", "keys": [{"id": "k1", "secret": keys[0]}, {"id": "k2", "secret": keys[1]}]},
                      {"id": "second", "keys": [{"id": "k3", "secret": keys[2]}]}],
        "models": {SECOND_MODEL: [{"provider": "second"}]},
        "prices": PRICES,
        "budgets": budgets,
        "teams": [{"id": "blue"}, {"id": "red"}],
        "clients": [{"id": c, "team": TEAMS[c], "key_sha256": sha256_hex(vk), **clients.get(c, {})}
                    for c, vk in VIRTUAL_KEYS.items()],
        "admin": {"token_env": "APIKEYROUTER_ADMIN_TOKEN"},
        **extra,
    }


def request_body(content, model="gpt-4o-mini"):
    """The exact bytes of a chat request (their length is the estimate's
    prompt tokens)."""
    return json.dumps({"model": model, "max_tokens": MAX_TOKENS,
                       "messages": [{"role": "user", "content": content}]}).encode()


def send(e, caller, body):
    """POSTs body as caller; returns (status, headers, parsed JSON body)."""
    status, headers, raw = http("POST", e.url + "/v1/chat/completions", body,
                                {"authorization": f"Bearer {VIRTUAL_KEYS[caller]}",
                                 "content-type": "application/json"})
    return status, headers, json.loads(raw)


def cost_of(body):
    """What the mock's usage for this body costs at PRICES."""
    u = usage_for(json.loads(body))
    return (Decimal(u["prompt_tokens"]) * PRICE_IN + Decimal(u["completion_tokens"]) * PRICE_OUT) / 10**6


def tokens_of(body):
    return usage_for(json.loads(body))["total_tokens"]


def estimate_of(body):
    """The reservation README describes: every body byte a prompt token at
    the input price (prompt_bytes_per_token 1), max_tokens at the output
    price."""
    return (Decimal(len(body)) * PRICE_IN + Decimal(json.loads(body)["max_tokens"]) * PRICE_OUT) / 10**6


def show(d):
    """An amount as the filter writes it: no exponent, no trailing zeros."""
    return format(d.normalize(), "f")


def rfc3339(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def window_of(window, t):
    """(window_start, resets_at) of the UTC `window` containing the instant t
    (Unix seconds), as GET budgets writes them; (None, None) for `total`."""
    d = datetime.fromtimestamp(t, timezone.utc)
    if window == "total":
        return None, None
    if window == "minute":
        start = d.replace(second=0, microsecond=0)
        end = start + timedelta(minutes=1)
    elif window == "hour":
        start = d.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1)
    elif window == "day":
        start = d.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
    elif window == "month":
        start = d.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    else:
        raise ValueError(window)
    return rfc3339(start), rfc3339(end)


def reset_epoch(window, t):
    """The Unix time (seconds) at which the window containing t resets."""
    return datetime.strptime(window_of(window, t)[1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def settled(e, budget_ids):
    """Waits until no reservation is held on these budgets: every request
    sent so far has been trued up."""
    wait_until(lambda: all(budget_of(e, b)["reserved"] == "0" for b in budget_ids),
               what=f"reservations on {budget_ids} settled")


def in_one_window(window, run, attempts=3):
    """Calls run() (which starts its own Envoy and returns it first) until
    one call starts and ends in the same UTC `window`, and returns what that
    call returned. A boundary crossed mid-run would split the spend between
    two windows, so that run's Envoy is stopped and the run repeated on a
    fresh one. Every coarser window's boundary is also a minute's, so
    guarding the finest window a test uses guards them all."""
    for _ in range(attempts):
        before = window_of(window, time.time())
        out = run()
        if window_of(window, time.time()) == before:
            return out
        out[0].stop()
    pytest.fail(f"{attempts} runs in a row crossed a {window} boundary")


def assert_shows_window(b, window, t):
    """GET budgets/{id} shows the window of the instant t (inside the run)."""
    start, reset = window_of(window, t)
    assert (b["window"], b["window_start"], b["resets_at"]) == (window, start, reset), b


# scope -> (budget scope, window, in-scope requests as (caller, model), in
# turn, and one out-of-scope request (caller, model)).
SCOPES = {
    "client": ({"client": "alice"}, "minute", [("alice", "gpt-4o-mini")], ("bob", "gpt-4o-mini")),
    "team": ({"team": "blue"}, "hour", [("alice", "gpt-4o-mini"), ("bob", "gpt-4o-mini")], ("carol", "gpt-4o-mini")),
    "provider": ({"provider": "second"}, "month", [("carol", SECOND_MODEL), ("alice", SECOND_MODEL)],
                 ("carol", "gpt-4o-mini")),
}


@pytest.mark.parametrize("scope", list(SCOPES))
def test_a_scoped_budget_charges_exactly_its_requests_and_refuses_naming_itself_when_full(
        scope, mock3, start_envoy):
    spec, window, inside, outside = SCOPES[scope]
    keys = secrets(3)
    in_body = request_body(f"a request inside the {scope} budget's scope", model=inside[0][1])
    out_body = request_body("a request from outside that scope, of another length", model=outside[1])
    c_in, c_out, est = cost_of(in_body), cost_of(out_body), estimate_of(in_body)
    assert c_in != c_out and est > c_in
    # Room for exactly three: the third is admitted with nothing to spare
    # (spent 2 x cost + its estimate = limit), the fourth is not.
    limit = 2 * c_in + est
    budgets = [{"id": "scoped", "scope": spec, "window": window, "limit": show(limit)},
               {"id": "all", "window": "total", "limit": "1000"}]

    def run():
        mock3.reset()
        e = start_envoy(mock3, plugin=scoped_plugin(keys, budgets))
        outcomes = []
        for i in range(4):
            caller, _ = inside[i % len(inside)]
            t0 = time.time()
            status, headers, body = send(e, caller, in_body)
            outcomes.append((t0, time.time(), status, headers, body))
            settled(e, ["scoped", "all"])
            # Outside the scope: never refused by it, never charged to it.
            status, _, body = send(e, outside[0], out_body)
            assert status == 200, body
            settled(e, ["scoped", "all"])
        return e, outcomes, budget_of(e, "scoped"), budget_of(e, "all"), time.time()

    e, outcomes, scoped, everything, t_read = in_one_window(window, run)

    assert [o[2] for o in outcomes] == [200, 200, 200, 429], [o[4] for o in outcomes]
    t0, t1, _, headers, body = outcomes[3]
    reset = window_of(window, t0)[1]
    assert body["error"]["type"] == body["error"]["code"] == "insufficient_quota", body
    assert body["error"]["message"] == (
        f"Budget 'scoped' would be exceeded: spent {show(3 * c_in)} + reserved 0 + this request's estimate "
        f"{show(est)} > limit {show(limit)} ({window} window, resets at {reset}).")
    assert headers["x-apikeyrouter-budget"] == "scoped"
    # retry-after: whole seconds to the reset, from Envoy's clock between t0 and t1.
    r = reset_epoch(window, t0)
    assert math.ceil(r - t1) <= int(headers["retry-after"]) <= math.ceil(r - math.floor(t0 * 1000) / 1000), headers

    assert scoped["scope"] == spec
    assert (scoped["spent"], scoped["reserved"], scoped["requests"], scoped["refused"]) == (show(3 * c_in), "0", 3, 1)
    assert scoped["remaining"] == show(limit - 3 * c_in)
    assert_shows_window(scoped, window, t_read)
    # The global budget saw every served request, in scope or not.
    assert (everything["spent"], everything["requests"]) == (show(3 * c_in + 4 * c_out), 7)
    # What the mock reported is what was priced: the provider saw exactly the
    # seven served requests, and no refused one.
    stats = mock3.stats()
    assert sum(s["requests"] for s in stats.values()) == 7
    reported = sum((Decimal(s["prompt_tokens"]) * PRICE_IN + Decimal(s["completion_tokens"]) * PRICE_OUT) / 10**6
                   for s in stats.values())
    assert reported == 3 * c_in + 4 * c_out
    if scope == "provider":
        assert stats[keys[2]]["requests"] == 3, "k3, the provider's one key, served exactly the in-scope requests"


WINDOWS = ["minute", "hour", "day", "month", "total"]


def test_every_window_charges_its_requests_and_shows_its_start_and_reset(mock3, start_envoy):
    keys = secrets(3)
    budgets = [{"id": f"w-{w}", "window": w, "limit": "10"} for w in WINDOWS]
    bodies = [request_body("first of two"), request_body("the second request of two")]

    def run():
        e = start_envoy(mock3, plugin=scoped_plugin(keys, budgets))
        for b in bodies:
            assert send(e, "carol", b)[0] == 200
        settled(e, [b["id"] for b in budgets])
        return e, {w: budget_of(e, f"w-{w}") for w in WINDOWS}, time.time()

    # A minute boundary is also every coarser window's.
    _, shown, t_read = in_one_window("minute", run)
    spent = show(sum(cost_of(b) for b in bodies))
    for w in WINDOWS:
        b = shown[w]
        assert (b["scope"], b["spent"], b["requests"], b["reserved"]) == ("global", spent, 2, "0"), b
        assert b["remaining"] == show(Decimal(10) - Decimal(spent)), b
        assert_shows_window(b, w, t_read)


def test_a_key_budget_charges_only_its_key_and_passes_the_key_over_when_full(mock3, start_envoy):
    keys = secrets(3)
    body = request_body("a request that a key budget may or may not admit")
    body2 = request_body("a request for the provider with one key", model=SECOND_MODEL)
    c, est, c2, est2 = cost_of(body), estimate_of(body), cost_of(body2), estimate_of(body2)
    budgets = [
        # k2 has room for exactly three requests; k3 for one.
        {"id": "k2-day", "scope": {"key": "k2"}, "window": "day", "limit": show(2 * c + est)},
        {"id": "k3-hour", "scope": {"key": "k3"}, "window": "hour", "limit": show(est2)},
    ]

    def run():
        mock3.reset()
        # One worker: one round-robin, so k2 comes up again after it is full.
        e = start_envoy(mock3, plugin=scoped_plugin(keys, budgets), concurrency=1)
        served_by = []
        while served_by.count("k2") < 3:
            assert len(served_by) < 12, served_by
            status, headers, out = send(e, "alice", body)
            assert status == 200, out
            served_by.append(headers["x-apikeyrouter-key-id"])
            settled(e, ["k2-day"])
        after = []
        for _ in range(6):
            status, headers, out = send(e, "bob", body)
            assert status == 200, out
            after.append((headers["x-apikeyrouter-key-id"], headers["x-apikeyrouter-decision"]))
        settled(e, ["k2-day"])
        # The provider whose one key has a full budget.
        first = send(e, "carol", body2)
        settled(e, ["k3-hour"])
        second = send(e, "carol", body2)
        return e, served_by, after, first, second, budget_of(e, "k2-day"), budget_of(e, "k3-hour"), time.time()

    e, served_by, after, first, second, k2b, k3b, t_read = in_one_window("hour", run)

    # Once k2's budget cannot hold another estimate, k1 serves everything and
    # each decision that considered k2 says why it was passed over.
    assert [k for k, _ in after] == ["k1"] * 6, after
    passed_over = [d for _, d in after if "k2:budget_exhausted" in d]
    assert passed_over, after
    assert all("k2" not in d or "k2:budget_exhausted" in d for _, d in after), after
    stats = mock3.stats()
    assert stats[keys[1]]["requests"] == 3
    assert (k2b["spent"], k2b["requests"], k2b["reserved"]) == (show(3 * c), 3, "0"), k2b
    assert k2b["refused"] == len(passed_over), "each pass-over is one refusal on the key's budget"
    assert k2b["scope"] == {"key": "k2"}
    assert_shows_window(k2b, "day", t_read)

    # A provider whose only key's budget is full has no key: 429, the key
    # excluded as budget_exhausted, and nothing sent upstream.
    assert first[0] == 200 and first[1]["x-apikeyrouter-key-id"] == "k3"
    status, headers, out = second
    assert status == 429, out
    assert out["error"]["code"] == "no_available_key", out
    assert out["error"]["message"] == ("No API key of provider 'second' is available right now: "
                                       "0 cooling down after rate limits, 0 disabled, 1 exhausted.")
    assert headers["x-apikeyrouter-decision"].endswith("excluded=k3:budget_exhausted"), headers
    assert stats[keys[2]]["requests"] == 1, "only the admitted request reached k3"
    assert (k3b["spent"], k3b["requests"], k3b["refused"], k3b["reserved"]) == (show(c2), 1, 1, "0"), k3b
    assert_shows_window(k3b, "hour", t_read)
