"""The management API on a separate internal listener, as envoy/openai.yaml
ships it, run in real Envoy: the file is taken as it is and only what ties
it to api.openai.com and fixed ports is changed (the cluster points at the
mock provider over plain HTTP, the listeners and Envoy's admin get ports
picked at run time, the module path is the build's and the example
client's key hash is one the test knows). The admin API answers on the
internal listener and not on the public one, and both share one state."""

import json
from decimal import Decimal

import pytest

from harness import (ADMIN_TOKEN, ROOT, chat, distinct_ports, http, listener, secrets, shipped_on_loopback,
                     shipped_text, wait_until, wasm_filter_configs)
from test_shipped_configs import health_port

SHIPPED = ROOT / "envoy" / "openai.yaml"
CLIENT_KEY = "vk-openai-yaml-client-0123456789"


def openai_yaml(gateway_port, management_port, admin_port, mock_port):
    """envoy/openai.yaml, adapted to run against the mock on run-time ports."""
    cfg = shipped_on_loopback(shipped_text(SHIPPED), gateway_port, management_port, admin_port, mock_port,
                              CLIENT_KEY)
    assert {c["name"] for c in cfg["static_resources"]["clusters"]} == {"openai", "envoy_admin", "apikeyrouter_management"}
    # The shape under test: the public listener runs both stages on one
    # plugin config (a YAML anchor) without "admin"; the internal one runs
    # only the ingress stage, in the same VM, with "admin".
    public_stages = list(wasm_filter_configs(listener(cfg, "gateway")))
    [internal] = wasm_filter_configs(listener(cfg, "management"))
    assert [c["root_id"] for c in public_stages] == ["apikeyrouter_ingress", "apikeyrouter_attempt"]
    assert public_stages[0]["configuration"] is public_stages[1]["configuration"]
    assert internal["root_id"] == "apikeyrouter_ingress"
    assert {c["vm_config"]["vm_id"] for c in public_stages + [internal]} == {"apikeyrouter"}
    assert "admin" in json.loads(internal["configuration"]["value"])
    assert "admin" not in json.loads(public_stages[0]["configuration"]["value"])
    return cfg


@pytest.fixture
def shipped_gateway(mock3, start_envoy):
    """Envoy running the adapted envoy/openai.yaml in front of mock3; yields
    (Envoy, the internal listener's URL, the provider keys)."""
    keys = secrets(3)
    gateway_port, management_port, admin_port = distinct_ports(3)
    adapted = openai_yaml(gateway_port, management_port, admin_port, mock3.port)

    def edit(cfg):
        cfg.clear()
        cfg.update(adapted)

    env = {f"OPENAI_KEY_{i + 1}": k for i, k in enumerate(keys)}
    e = start_envoy(mock3, edit=edit, env=env, gateway_port=gateway_port, admin_port=admin_port)
    return e, f"http://127.0.0.1:{management_port}", keys


def bearer(key):
    return {"authorization": f"Bearer {key}"}


def admin(base, method, path, body=None, token=ADMIN_TOKEN):
    """Calls the management API under the shipped prefix at `base`."""
    return http(method, base + "/apikeyrouter/v1/" + path, body, bearer(token) if token else {})


def test_the_admin_api_answers_on_the_internal_listener_and_not_on_the_public_one(shipped_gateway, mock3):
    e, management, keys = shipped_gateway
    # The internal listener serves it, behind the token.
    status, headers, body = admin(management, "GET", "keys")
    assert status == 200 and headers["content-type"] == "application/json"
    assert [k["id"] for k in json.loads(body)["keys"]] == ["openai-1", "openai-2", "openai-3"]
    status, _, body = admin(management, "GET", "health")
    assert status == 200 and json.loads(body)["status"] == "healthy"
    for token in (None, CLIENT_KEY):
        status, _, body = admin(management, "GET", "keys", token=token)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_admin_token"
    # The public listener has no admin API: the admin token is an unknown
    # caller's key there, and the client's key is refused the path, which is
    # none of its allowed endpoints (endpoint_not_allowed, issue 17).
    for method, path in [("GET", "keys"), ("GET", "health"), ("GET", "budgets"), ("GET", "decisions"),
                         ("PATCH", "keys/openai-1")]:
        body = {"state": "disabled"} if method == "PATCH" else None
        status, _, raw = admin(e.url, method, path, body)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key", (path, status, raw)
        status, headers, raw = admin(e.url, method, path, body, token=CLIENT_KEY)
        assert (status, json.loads(raw)["error"]["code"]) == (403, "endpoint_not_allowed"), (path, status, raw)
    # Nothing changed, and the internal listener serves no model traffic.
    status, _, body = admin(management, "GET", "keys")
    assert {k["state"] for k in json.loads(body)["keys"]} == {"available"}
    # (its filter has budgets and no prices, so the model is refused unpriced
    # before Envoy's router, which has no route for it anyway)
    status, _, raw = chat(management)
    assert (status, json.loads(raw)["error"]["code"]) == (400, "model_not_priced"), raw
    assert mock3.received() == []


def test_both_listeners_share_keys_budgets_and_decisions(shipped_gateway, mock3):
    e, management, keys = shipped_gateway
    id_of = {k: f"openai-{i + 1}" for i, k in enumerate(keys)}
    costs, request_ids = [], []
    for _ in range(3):
        status, headers, body = chat(e.url, headers=bearer(CLIENT_KEY))
        assert status == 200, body
        costs.append(Decimal(headers["x-apikeyrouter-cost"]))
        request_ids.append(headers["x-request-id"])

    def listed():
        status, _, body = admin(management, "GET", "keys")
        assert status == 200
        return {k["id"]: k["counters"] for k in json.loads(body)["keys"]}

    # What the public listener's requests did shows on the internal one.
    wait_until(lambda: sum(c["requests"] for c in listed().values()) == 3, what="3 attempts on the internal listener")
    reported = mock3.stats()
    for secret, kid in id_of.items():
        r = reported.get(secret, {"requests": 0, "total_tokens": 0})
        assert (listed()[kid]["requests"], listed()[kid]["total_tokens"]) == (r["requests"], r["total_tokens"])
    # The shipped prices: gpt-4o-mini at 0.15 input and 0.60 output per 1M.
    want = sum((Decimal(s["prompt_tokens"]) * Decimal("0.15") + Decimal(s["completion_tokens"]) * Decimal("0.60"))
               / 10**6 for s in reported.values())
    assert sum(costs) == want
    status, _, body = admin(management, "GET", "budgets/daily")
    daily = json.loads(body)
    assert (Decimal(daily["spent"]), daily["reserved"], daily["requests"]) == (want, "0", 3), daily
    wait_until(lambda: {d["request_id"] for d in json.loads(admin(management, "GET", "decisions")[2])["decisions"]}
               >= set(request_ids), what="the public listener's decisions on the internal listener")
    # A key disabled through the internal listener leaves the public
    # listener's rotation.
    status, _, body = admin(management, "PATCH", "keys/openai-1", {"state": "disabled", "reason": "rotating"})
    assert status == 200 and json.loads(body)["state"] == "disabled"
    before = len(mock3.received())
    for _ in range(6):
        status, headers, _ = chat(e.url, headers=bearer(CLIENT_KEY))
        assert status == 200
        assert "excluded=openai-1:disabled" in headers["x-apikeyrouter-decision"]
    used = {id_of[r["key"]] for r in mock3.received()[before:]}
    assert used == {"openai-2", "openai-3"}, used


def test_the_readiness_probe_reaches_only_the_filters_health_probe_and_is_503_while_no_key_can_serve(
        shipped_gateway, mock3):
    e, management, keys = shipped_gateway
    health = f"http://127.0.0.1:{health_port(e)}"

    def probe():
        status, _, body = http("GET", health + "/apikeyrouter/health")
        return status, json.loads(body)

    assert probe() == (200, {"status": "healthy"})
    # Nothing else of the management API passes the health listener, token or not.
    for path in ("/apikeyrouter/v1/health", "/apikeyrouter/v1/keys", "/apikeyrouter/health/"):
        assert http("GET", health + path, headers=bearer(ADMIN_TOKEN))[0] == 404, path
    assert http("POST", health + "/apikeyrouter/health", b"")[0] == 404
    # The public listener serves no probe: its plugin config has none.
    status, _, raw = http("GET", e.url + "/apikeyrouter/health")
    assert (status, json.loads(raw)["error"]["code"]) == (401, "invalid_api_key")
    # A request through the public listener: its cost is the total spend
    # the internal listener shows.
    status, headers, _ = chat(e.url, headers=bearer(CLIENT_KEY))
    assert status == 200
    wait_until(lambda: json.loads(admin(management, "GET", "state")[2])["requests"] == 1, what="the attempt recorded")
    state = json.loads(admin(management, "GET", "state")[2])
    assert Decimal(state["costs"]["total_spent"]) == Decimal(headers["x-apikeyrouter-cost"]) > 0
    # Every key out of service: not ready; one back: ready again.
    for kid in ("openai-1", "openai-2", "openai-3"):
        assert admin(management, "PATCH", f"keys/{kid}", {"state": "disabled", "reason": "drill"})[0] == 200
    assert probe() == (503, {"status": "unhealthy"})
    assert admin(management, "PATCH", "keys/openai-2", {"state": "available"})[0] == 200
    assert probe() == (200, {"status": "healthy"})
