"""The management API, health and Prometheus metrics, served by the filter
inside real Envoy; the API refuses anything without its token."""

import json
import re
import secrets as pysecrets
import time
from collections import Counter

import pytest

from harness import (ADMIN_TOKEN, budget_of, chat, http, ids_by_secret, plugin_with_keys, priced, secrets, sha256_hex,
                     wait_until)

RUNTIME_SECRET = "sk-runtime-added-key-0001"


@pytest.fixture
def mock_rt(start_mock):
    """A mock provider that accepts secrets(3) and the key the tests add at run time."""
    return start_mock(secrets(3) + [RUNTIME_SECRET])


def admin_plugin(keys):
    return plugin_with_keys(keys, budgets=[{"id": "daily", "window": "day", "limit": "10"}],
                            prices={"gpt-4o-mini*": {"input": "1", "output": "2"}}, max_transitions=50)


class Recorder:
    """Calls the admin API and keeps every response for the leak scan."""

    def __init__(self, envoy):
        self.e = envoy
        self.bodies = []

    def __call__(self, method, path, body=None, token=ADMIN_TOKEN, raw=None, header="authorization"):
        headers = {}
        if token is not None:
            headers = {"authorization": f"Bearer {token}"} if header == "authorization" else {"x-api-key": token}
        status, h, b = http(method, self.e.url + "/apikeyrouter/v1/" + path,
                            raw if raw is not None else body, headers)
        self.bodies.append(json.dumps(h) + b.decode("utf-8", "replace"))
        assert h.get("content-type") == "application/json", (path, h)
        return status, json.loads(b)


def test_every_endpoint_answers_json_and_refuses_bad_input(mock_rt, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock_rt, plugin=admin_plugin(keys))
    api = Recorder(e)
    for _ in range(4):
        assert chat(e.url, extra={"model": "gpt-4o-mini"})[0] == 200

    # Authentication: no token, a wrong one, and both accepted header forms.
    assert api("GET", "keys", token=None)[0] == 401
    assert api("GET", "keys", token="not-the-token-at-all")[0] == 401
    assert api("GET", "keys", header="x-api-key")[0] == 200
    assert api("GET", "nope")[0] == 404
    assert api("PUT", "keys")[0] == 405

    status, body = api("GET", "keys")
    assert status == 200 and [k["id"] for k in body["keys"]] == ["k1", "k2", "k3"]
    k = body["keys"][0]
    for field in ["provider", "state", "capacity_state", "cooldown_until_ms", "counters", "metadata",
                  "fingerprint", "source", "weight", "reliability"]:
        assert field in k, field
    assert sum(k["counters"]["requests"] for k in body["keys"]) == 4
    assert api("GET", "keys/k2")[1]["id"] == "k2"
    assert api("GET", "keys/zz")[0] == 404

    # PATCH: bad input, unknown key, then real changes.
    assert api("PATCH", "keys/k1", raw=b"{not json")[1]["error"]["code"] == "invalid_json"
    assert api("PATCH", "keys/k1", {"state": "asleep"})[1]["error"]["code"] == "invalid_state"
    assert api("PATCH", "keys/k1", {"state": "throttled", "duration_seconds": 0})[1]["error"]["code"] \
        == "invalid_duration"
    assert api("PATCH", "keys/zz", {"state": "disabled"})[0] == 404
    t0 = time.time_ns() // 1_000_000
    status, body = api("PATCH", "keys/k1", {"state": "throttled", "duration_seconds": 30, "reason": "test"})
    t1 = time.time_ns() // 1_000_000
    # The answer is the key as written, at the instant it was written.
    assert status == 200 and body["state"] == "throttled" and body["cooldown_remaining_ms"] == 30_000
    assert t0 + 30_000 <= body["cooldown_until_ms"] <= t1 + 30_000, (t0, body["cooldown_until_ms"], t1)
    assert api("PATCH", "keys/k1", {"state": "available"})[1]["state"] == "available"

    # Runtime keys.
    assert api("POST", "keys", raw=b"[1]")[0] == 400
    assert api("POST", "keys", {"id": "k1", "key_material": "sk-x"})[0] == 409
    assert api("POST", "keys", {"id": "bad id", "key_material": "sk-x"})[0] == 400
    status, body = api("POST", "keys", {"id": "rt1", "provider": "openai", "key_material": RUNTIME_SECRET,
                                        "metadata": {"owner": "ops"}})
    assert status == 201 and body["source"] == "runtime" and body["fingerprint"].startswith("sha256:")
    assert [k["id"] for k in api("GET", "keys")[1]["keys"]] == ["k1", "k2", "k3", "rt1"]
    assert api("DELETE", "keys/k2")[0] == 409, "a config key can only be disabled"
    assert api("DELETE", "keys/zz")[0] == 404

    # Providers, budgets, decisions, state, health, transitions.
    assert api("GET", "providers")[1]["providers"][0]["id"] == "openai"
    status, body = api("GET", "budgets")
    assert status == 200 and body["budgets"][0]["id"] == "daily"
    assert api("PATCH", "budgets/daily", {"limit": "oops"})[0] == 400
    assert api("PATCH", "budgets/nope", {"limit": "1"})[0] == 404
    assert api("PATCH", "budgets/daily", {"limit": "25"})[1]["limit"] == "25"
    assert api("GET", "budgets/daily")[1]["configured_limit"] == "10"
    # Decision records reach the ring on each worker's next tick.
    wait_until(lambda: len(api("GET", "decisions?limit=3")[1]["decisions"]) == 3, what="decisions written")
    assert api("GET", "decisions?limit=x")[0] == 400
    status, body = api("GET", "state")
    assert status == 200 and body["keys"]["total"] == 4 and body["requests"] == 4
    assert body["budgets"][0]["id"] == "daily"
    status, body = api("GET", "health")
    assert status == 200 and body["status"] == "healthy" and body["version"] and body["providers_registered"] == 1
    status, body = api("GET", "transitions?limit=10")
    changes = [(t["kind"], t["id"], t["from"], t["to"]) for t in body["transitions"]]
    assert changes == [("budget", "daily", "limit", "limit 25"), ("registry", "rt1", "absent", "registered"),
                       ("key", "k1", "throttled", "available"), ("key", "k1", "available", "throttled")], changes
    assert [t["seq"] for t in body["transitions"]] == [4, 3, 2, 1]

    assert api("DELETE", "keys/rt1")[0] == 200
    for k in ["k1", "k2", "k3"]:
        assert api("PATCH", f"keys/{k}", {"state": "disabled"})[1]["state"] == "disabled"
    status, body = api("GET", "health")
    assert status == 503 and body["status"] == "unhealthy"

    # No key material in any admin response, headers included.
    everything = "\n".join(api.bodies)
    for secret in keys + [RUNTIME_SECRET]:
        assert secret not in everything


def test_a_change_made_on_one_worker_is_seen_by_requests_on_every_worker(mock_rt, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock_rt, plugin=admin_plugin(keys))
    api = Recorder(e)
    assert api("PATCH", "keys/k1", {"state": "disabled", "reason": "rotation"})[0] == 200
    # Each request on a new connection: Envoy spreads them over both workers.
    for _ in range(40):
        assert chat(e.url)[0] == 200
    ids = ids_by_secret(keys)
    used = Counter(ids.get(r["key"], r["key"]) for r in mock_rt.received())
    # Each worker round-robins over k2 and k3: together within 2 of even.
    assert set(used) == {"k2", "k3"} and used["k2"] + used["k3"] == 40, used
    assert abs(used["k2"] - used["k3"]) <= 2, used
    # A key registered at runtime goes into rotation on every worker.
    assert api("POST", "keys", {"id": "rt1", "key_material": RUNTIME_SECRET})[0] == 201
    for _ in range(40):
        assert chat(e.url)[0] == 200
    after = mock_rt.received()[40:]
    assert len(after) == 40
    # Round-robin over three keys gives a key floor(n/3) or ceil(n/3) of a
    # worker's n requests; for any split of 40 over two workers that sums
    # to 12..14.
    assert 12 <= sum(1 for r in after if r["key"] == RUNTIME_SECRET) <= 14, Counter(r["key"] for r in after)
    assert api("DELETE", "keys/rt1")[0] == 200
    before = len(mock_rt.received())
    for _ in range(20):
        assert chat(e.url)[0] == 200
    gone = mock_rt.received()[before:]
    assert len(gone) == 20 and not any(r["key"] == RUNTIME_SECRET for r in gone)


DOCUMENTED = [
    'apikeyrouter_key_requests{provider="openai",key="k1",status_class="2xx"}',
    'apikeyrouter_key_requests{provider="openai",key="k2",status_class="4xx"}',
    'apikeyrouter_key_rate_limited{provider="openai",key="k2"}',
    'apikeyrouter_key_cooldowns{provider="openai",key="k2"}',
    'apikeyrouter_key_input_tokens{provider="openai",key="k1"}',
    'apikeyrouter_key_output_tokens{provider="openai",key="k1"}',
    'apikeyrouter_key_spend_micros{provider="openai",key="k1"}',
    'apikeyrouter_key_state{provider="openai",key="k2"}',
    'apikeyrouter_key_capacity{provider="openai",key="k1"}',
    'apikeyrouter_budget_spent_micros{budget="daily"}',
    'apikeyrouter_budget_soft_over{budget="soft"}',
    'apikeyrouter_selection_us_count',
]


def test_prometheus_shows_the_documented_metrics_with_labels(mock_rt, start_envoy):
    keys = secrets(3)
    plugin = admin_plugin(keys)
    plugin["budgets"].append({"id": "soft", "window": "day", "limit": "0.000001", "enforcement": "soft"})
    e = start_envoy(mock_rt, plugin=plugin)
    mock_rt.behavior(keys[1], status=429, headers={"retry-after": "600"})
    for _ in range(9):
        assert chat(e.url, extra={"model": "gpt-4o-mini"})[0] == 200

    # What the metrics must say, from what the provider saw: k2 answered one
    # 429 and cooled; k1 and k3 served the 9 requests. Prices are 1 and 2
    # per 1M tokens, so spend in micros is input + 2 * output tokens.
    reported = mock_rt.stats()
    ids = ids_by_secret(keys)
    assert reported[keys[1]]["statuses"] == {"429": 1}, reported
    served = {ids[s]: r for s, r in reported.items() if s != keys[1]}
    assert set(served) == {"k1", "k3"} and sum(r["statuses"]["200"] for r in served.values()) == 9, reported

    def key(name, k, extra=""):
        return f'apikeyrouter_key_{name}{{provider="openai",key="{k}"{extra}}}'

    want = {key("requests", "k2", ',status_class="4xx"'): 1, key("rate_limited", "k2"): 1,
            key("cooldowns", "k2"): 1, key("state", "k2"): 1,
            'apikeyrouter_budget_soft_over{budget="soft"}': 9, 'apikeyrouter_budget_soft_over{budget="daily"}': 0,
            'apikeyrouter_budget_refused{budget="soft"}': 0, 'apikeyrouter_budget_refused{budget="daily"}': 0,
            "apikeyrouter_no_key{}": 0}
    for k in ("k1", "k2", "k3"):
        want[key("capacity", k)] = 0  # the mock reports 9999 of 10000 requests left: abundant
    spent = 0
    for k, r in served.items():
        micros = r["prompt_tokens"] + 2 * r["completion_tokens"]
        spent += micros
        want.update({key("requests", k, ',status_class="2xx"'): r["statuses"]["200"], key("state", k): 0,
                     key("input_tokens", k): r["prompt_tokens"], key("output_tokens", k): r["completion_tokens"],
                     key("spend_micros", k): micros})
    want['apikeyrouter_budget_spent_micros{budget="daily"}'] = spent
    want['apikeyrouter_budget_spent_micros{budget="soft"}'] = spent

    def scrape():
        _, _, body = http("GET", e.admin_url + "/stats/prometheus")
        return body.decode()

    def values(text):
        return {m[0]: int(float(m[1])) for m in re.findall(r"^(apikeyrouter_\S+) (\S+)$", text, re.M)}

    def flushed():
        text = scrape()
        missing = [m for m in DOCUMENTED if m not in text]
        got = values(text)
        wrong = {name: (got.get(name), v) for name, v in want.items() if got.get(name) != v}
        assert not missing and not wrong, (missing, wrong)
        return True

    # Counters are batched per worker and written on its next tick.
    wait_until(flushed, timeout=15, what="metrics flushed with their values", errors=(AssertionError,))
    text = scrape()
    assert key("requests", "k2", ',status_class="2xx"') not in values(text), "k2 never served"
    for secret in keys:
        assert secret not in text
    # Every metric the shipped Grafana dashboard queries exists.
    from harness import ROOT
    dashboard = (ROOT / "envoy" / "grafana-dashboard.json").read_text()
    for name in set(re.findall(r"apikeyrouter_[a-z_]+", dashboard)):
        if name.startswith("apikeyrouter_ingress") or name.startswith("apikeyrouter_attempt"):
            continue
        base = re.sub(r"_bucket$", "", name)
        assert base in text, name


def test_admin_api_refuses_every_endpoint_without_the_right_token_and_changes_nothing(mock3, start_envoy):
    keys = secrets(3)
    vk = "sk-client-virtual-" + pysecrets.token_hex(12)
    plugin = priced(keys, clients=[{"id": "app", "key_sha256": sha256_hex(vk)}])
    e = start_envoy(mock3, plugin=plugin)
    calls = [("GET", "keys", None), ("GET", "keys/k1", None), ("PATCH", "keys/k1", {"state": "disabled"}),
             ("POST", "keys", {"id": "rt9", "provider": "openai", "key_material": "sk-evil-0000000000"}),
             ("DELETE", "keys/k1", None), ("GET", "providers", None), ("GET", "budgets", None),
             ("GET", "budgets/b", None), ("PATCH", "budgets/b", {"limit": "0.01"}),
             ("GET", "decisions", None), ("GET", "transitions", None), ("GET", "state", None),
             ("GET", "health", None), ("GET", "no-such-endpoint", None), ("PUT", "keys", None),
             ("PATCH", "keys/k2", {"state": "throttled", "duration_seconds": 600})]
    credentials = [
        {}, {"authorization": "Bearer"}, {"authorization": "Bearer "}, {"authorization": "Bearer wrong-token-000000"},
        {"authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, {"authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"authorization": f"Bearer {ADMIN_TOKEN.upper()}"}, {"authorization": f"Basic {ADMIN_TOKEN}"},
        {"authorization": f"Token {ADMIN_TOKEN}"}, {"authorization": ADMIN_TOKEN},
        {"x-api-key": "wrong-token-000000"}, {"x-api-key": ""}, {"authorization": f"Bearer {vk}"},
        {"authorization": f"Bearer {keys[0]}"}, {"x-apikeyrouter-admin-token": ADMIN_TOKEN},
        {"cookie": f"token={ADMIN_TOKEN}"},
    ]
    # Each refusal is a 401 until the worker's failure budget is spent (10),
    # then a 429 with retry-after (test_admin_hardening covers the budget).
    answers = Counter()
    for method, path, body in calls:
        for cred in credentials:
            for suffix in ["", f"?token={ADMIN_TOKEN}"]:
                status, headers, raw = http(method, e.url + "/apikeyrouter/v1/" + path + suffix, body, cred)
                assert status in (401, 429), (method, path, cred, status, raw)
                answers[status] += 1
                err = json.loads(raw)["error"]
                if status == 401:
                    assert err["type"] == "authentication_error", err
                    assert headers.get("www-authenticate") == "Bearer"
                else:
                    assert (err["type"], err["code"]) == ("rate_limit_error", "admin_auth_throttled"), err
                    assert int(headers["retry-after"]) >= 1
                assert ADMIN_TOKEN not in raw.decode() and vk not in raw.decode()
    assert answers[401] >= 10 and answers[429] > 0, answers
    # Every worker's failure budget takes one more attempt at most 6 s after
    # its last failure, which came before now.
    refilled = time.monotonic() + 6.5
    wait_until(lambda: time.monotonic() >= refilled and e.admin_api("GET", "keys")[0] == 200, timeout=30,
               interval=0.5, what="the admin token taken again on every worker")
    assert mock3.received() == [], "no admin request reaches the provider"
    # Nothing changed.
    status, _, body = e.admin_api("GET", "keys")
    listed = {k["id"]: k for k in json.loads(body)["keys"]}
    assert set(listed) == {"k1", "k2", "k3"}
    assert all(k["state"] == "available" for k in listed.values()), listed
    assert budget_of(e, "b")["limit"] == "100"
    status, _, body = e.admin_api("GET", "transitions")
    assert json.loads(body)["transitions"] == []
    # And the right token still works, in both accepted forms.
    assert e.admin_api("GET", "health")[0] == 200
    assert http("GET", e.url + "/apikeyrouter/v1/health", headers={"x-api-key": ADMIN_TOKEN})[0] == 200
