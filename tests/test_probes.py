"""The token-free health probe (`admin.probe_path`) and the original
design's management API forms, through real Envoy:

- the probe answers `{"status": "healthy"}` without any token or client
  key, turns 503 `unhealthy` once every key has spent its configured token
  quota (while requests get 429), and 200 again when the quota's minute
  turns; `GET health` and `GET state` count those keys as quota-exhausted
  and say which quota;
- wrong admin tokens that throttle the management API do not throttle the
  probe, and the probe says nothing but its status;
- in fleet mode the probe says `degraded` (still 200) while etcd cannot be
  reached, and `healthy` again once it can;
- under the design's `/api/v1/` prefix (and its `/health`): `POST keys`
  without an id and with `provider_id`, `PATCH` to `throttled` without a
  duration, `GET state`'s quota-exhausted count and total spend without any
  budget."""

import hashlib
import json
import time
from decimal import Decimal

from harness import (ADMIN_TOKEN, DEMO_KEYS, PRICES, Etcd, chat, expected_spend, http, plugin_with_keys, secrets,
                     sha256_hex, wait_recorded, wait_until)
from test_fleet import fleet_plugin, health, with_etcd

APP_KEY = "vk-probe-app-0123456789"
APP = {"authorization": f"Bearer {APP_KEY}"}
# The mock reports this many completion tokens when asked: one request
# spends a 500-token-per-minute quota.
COMPLETION = 1000


def probe(e, path="/healthz", method="GET"):
    status, headers, body = http(method, e.url + path)
    return status, headers, (json.loads(body) if body else None)


def minute():
    return int(time.time() // 60)


def tpm_gateway(start_mock, start_envoy):
    keys = secrets(2)
    mock = start_mock(keys)
    plugin = plugin_with_keys(keys, prices=PRICES, clients=[{"id": "app", "key_sha256": sha256_hex(APP_KEY)}])
    for k in plugin["providers"][0]["keys"]:
        k["limits"] = {"tpm": 500}
    plugin["admin"]["probe_path"] = "/healthz"
    return mock, start_envoy(mock, plugin=plugin)


def test_the_probe_needs_no_token_and_is_503_while_every_key_has_spent_its_token_quota(start_mock, start_envoy):
    mock, e = tpm_gateway(start_mock, start_envoy)
    status, headers, body = probe(e)
    assert (status, body) == (200, {"status": "healthy"})
    assert headers["cache-control"] == "no-store"
    assert not [h for h in headers if h.startswith("x-apikeyrouter")], headers
    # Spend both keys' tokens per minute, one request each, and probe in
    # the same UTC minute (a run that straddles a minute is made again:
    # the new minute gave the quota back).
    for run in range(3):
        # Each run starts with a whole minute's quota and 20 s to go at least.
        if run > 0 or time.time() % 60 > 40:
            start = minute()
            wait_until(lambda: minute() != start, timeout=65, interval=0.2, what="the next UTC minute")
        first = minute()
        attempts = sum(k["counters"]["requests"] for k in e.key_counters().values())
        for _ in range(2):
            status, _, raw = chat(e.url, headers=APP, extra={"mock_completion_tokens": COMPLETION})
            assert status == 200, raw
            attempts += 1
            wait_recorded(e, attempts)
        status, _, raw = chat(e.url, headers=APP)
        probed = probe(e)
        _, _, health = e.admin_api("GET", "health")
        _, _, state = e.admin_api("GET", "state")
        if minute() == first:
            break
    else:
        raise AssertionError("3 runs each straddled a UTC minute boundary")
    # Requests get 429 ...
    assert (status, json.loads(raw)["error"]["code"]) == (429, "no_available_key"), raw
    # ... and the probe says so, and nothing more.
    assert (probed[0], probed[2]) == (503, {"status": "unhealthy"})
    health, state = json.loads(health), json.loads(state)
    assert health["status"] == "unhealthy"
    assert health["keys"] == {"total": 2, "available": 0, "throttled": 0, "disabled": 0, "exhausted": 0,
                              "quota_exhausted": 2}
    assert {(u["id"], u["reason"], u["detail"]) for u in health["unavailable"]} == {
        ("k1", "quota_exhausted", "tpm"), ("k2", "quota_exhausted", "tpm")}
    assert all(u["until_ms"] % 60_000 == 0 for u in health["unavailable"]), "back at the next UTC minute"
    assert state["quotas"] == {"exhausted_keys": 2} and state["keys"]["available"] == 0
    assert Decimal(state["costs"]["total_spent"]) == expected_spend(mock) > 0
    # The next UTC minute gives the quota back: healthy again.
    wait_until(lambda: probe(e)[0] == 200, timeout=70, interval=0.5, what="the probe healthy in the next minute")
    assert probe(e)[2] == {"status": "healthy"}
    assert chat(e.url, headers=APP)[0] == 200


def test_the_probe_answers_while_wrong_tokens_have_throttled_the_admin_api(mock, start_envoy):
    plugin = plugin_with_keys(list(DEMO_KEYS.values())[:1])
    plugin["admin"]["probe_path"] = "/healthz"
    # One worker: the guesses and the probe meet the same failure budget.
    e = start_envoy(mock, plugin=plugin, concurrency=1)
    for _ in range(11):
        e.admin_api("GET", "keys", token="a-wrong-guess-0123456789")
    status, headers, _ = e.admin_api("GET", "keys")
    assert status == 429 and "retry-after" in headers, "the right token waits too"
    for path in ("/healthz", "/healthz?from=kubelet"):
        status, headers, body = probe(e, path)
        assert (status, body) == (200, {"status": "healthy"}), path
    status, headers, body = probe(e, method="HEAD")
    assert (status, body) == (200, None)
    status, headers, body = probe(e, method="POST")
    assert (status, body["error"]["code"], headers["allow"]) == (405, "method_not_allowed", "GET, HEAD")
    # The probe's failures budget was never charged: still 429 for admin.
    assert e.admin_api("GET", "keys")[0] == 429
    # Nor does the probe leak: no version, key ids or material.
    text = http("GET", e.url + "/healthz")[2].decode()
    assert text == '{"status":"healthy"}'


def test_in_fleet_mode_the_probe_is_degraded_while_etcd_is_unreachable(mock3, start_envoy):
    with Etcd() as etcd:
        plugin = fleet_plugin(secrets(3))
        plugin["admin"]["probe_path"] = "/healthz"
        e = start_envoy(mock3, plugin=plugin, edit=with_etcd(etcd, "gw-1"))
        wait_until(lambda: health(e)["fleet"]["syncs"] > 0, timeout=10, what="a first sync with etcd")
        assert probe(e)[::2] == (200, {"status": "healthy"})
        etcd.kill()
        # Unreachable past degraded_after_ms (1 s): degraded, still serving.
        wait_until(lambda: probe(e)[2] == {"status": "degraded"}, timeout=10, what="the probe degraded")
        assert probe(e)[0] == 200
        assert health(e)["status"] == "degraded"
        assert chat(e.url)[0] == 200
        etcd.start()
        wait_until(lambda: probe(e)[2] == {"status": "healthy"}, timeout=20, what="the probe healthy again")


RUNTIME_MATERIAL = "sk-your-openai-key"


def api_v1(e, method, path, body=None, headers=None):
    """The design's management API: /api/v1/<path> with X-API-Key."""
    status, _, raw = http(method, e.url + "/api/v1/" + path, body, {"x-api-key": ADMIN_TOKEN, **(headers or {})})
    return status, json.loads(raw)


def test_the_designs_management_api_under_api_v1(start_mock, start_envoy):
    keys = secrets(1)
    mock = start_mock(keys + [RUNTIME_MATERIAL])
    plugin = plugin_with_keys(keys, prices=PRICES, cooldown={"default_seconds": 45})
    plugin["admin"].update(prefix="/api/v1/", probe_path="/health")
    assert "budgets" not in plugin
    e = start_envoy(mock, plugin=plugin)
    # The design's health check: no token, status only.
    status, _, body = probe(e, "/health")
    assert (status, body) == (200, {"status": "healthy"})
    # Register a key as the design does: no id, provider_id.
    status, added = api_v1(e, "POST", "keys", {"key_material": RUNTIME_MATERIAL, "provider_id": "openai",
                                               "metadata": {"tier": "pay-as-you-go"}})
    fingerprint = hashlib.sha256(RUNTIME_MATERIAL.encode()).hexdigest()[:12]
    assert status == 201, added
    assert (added["id"], added["provider"], added["source"]) == (f"openai-{fingerprint}", "openai", "runtime")
    assert added["metadata"] == {"tier": "pay-as-you-go"}
    assert RUNTIME_MATERIAL not in json.dumps(added)
    status, again = api_v1(e, "POST", "keys", {"key_material": RUNTIME_MATERIAL, "provider_id": "openai"})
    assert (status, again["error"]["code"]) == (409, "key_exists"), "the same material twice is one key"
    status, listed = api_v1(e, "GET", "keys")
    assert [k["id"] for k in listed["keys"]] == ["k1", added["id"]]
    # Throttle k1 as the design does: no duration, cooldown.default_seconds.
    status, k1 = api_v1(e, "PATCH", "keys/k1", {"state": "throttled", "reason": "Rate limit encountered"})
    assert (status, k1["state"], k1["cooldown_remaining_ms"]) == (200, "throttled", 45_000), k1
    # The runtime key serves meanwhile.
    for _ in range(3):
        status, headers, body = chat(e.url)
        assert status == 200, body
        assert headers["x-apikeyrouter-key-id"] == added["id"]
    wait_recorded_v1(e, 3)
    status, state = api_v1(e, "GET", "state")
    assert status == 200
    assert state["keys"] == {"total": 2, "available": 1, "throttled": 1, "disabled": 0, "exhausted": 0,
                             "quota_exhausted": 0}
    assert state["quotas"] == {"exhausted_keys": 0}
    assert state["budgets"] == [], "no budget configured ..."
    assert Decimal(state["costs"]["total_spent"]) == expected_spend(mock) > 0, "... and the spend is known"
    assert [(u["id"], u["reason"]) for u in state["unavailable"]] == [("k1", "throttled")]
    # Every endpoint is under the prefix: the shipped one is not the API.
    status, _, raw = http("GET", e.url + "/apikeyrouter/v1/keys", headers={"x-api-key": ADMIN_TOKEN})
    assert status == 404 and b'"keys"' not in raw, raw
    status, deleted = api_v1(e, "DELETE", f"keys/{added['id']}")
    assert (status, deleted) == (200, {"id": added["id"], "deleted": True,
                                       "persistence": "local: this Envoy process only, lost when it restarts"})


def wait_recorded_v1(e, attempts):
    """wait_recorded, through the /api/v1/ prefix."""
    def recorded():
        return sum(k["counters"]["requests"] for k in api_v1(e, "GET", "keys")[1]["keys"]) == attempts
    wait_until(recorded, timeout=15, what=f"{attempts} attempts recorded")
