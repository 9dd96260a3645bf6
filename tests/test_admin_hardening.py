"""The management API from an attacker's side (issue 17, point 6): the
read-only token cannot change anything, wrong tokens are slowed down,
counted and logged without their content, and no shipped config serves the
API on a public listener."""

import http.client
import ipaddress
import json
import re

import pytest
import yaml

from harness import ADMIN_TOKEN, ROOT, chat, plugin_with_keys, secrets, wait_until, wasm_filter_configs

READ_TOKEN = "read-only-token-for-monitoring-0001"
ATTACKER_SECRET = "sk-attacker-owned-key-0001"
# The failure budget of each worker (src/admin.rs): 10 failures at once,
# one more every 6 s.
BURST = 10
REFILL_S = 6


def hardened_plugin(keys):
    return plugin_with_keys(keys, admin={"token_env": "APIKEYROUTER_ADMIN_TOKEN",
                                         "read_token_env": "APIKEYROUTER_READ_TOKEN"},
                            budgets=[{"id": "daily", "window": "day", "limit": "10"}],
                            prices={"gpt-4o-mini*": {"input": "1", "output": "2"}})


@pytest.fixture
def gateway(mock3, start_envoy):
    return start_envoy(mock3, plugin=hardened_plugin(secrets(3)),
                       host_env_keys=["APIKEYROUTER_ADMIN_TOKEN", "APIKEYROUTER_READ_TOKEN"],
                       env={"APIKEYROUTER_READ_TOKEN": READ_TOKEN})


class Connection:
    """One keep-alive HTTP/1.1 connection to the gateway: every request on
    it is served by the same Envoy worker (the failure budget is per
    worker)."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.connect()
        self.sock = self.conn.sock

    def admin(self, method, path, token, body=None):
        headers = {"authorization": f"Bearer {token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        self.conn.request(method, "/apikeyrouter/v1/" + path, data, headers)
        r = self.conn.getresponse()
        raw = r.read()
        assert self.conn.sock is self.sock, "Envoy closed the connection: the next request may meet another worker"
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw)

    def close(self):
        self.conn.close()


def stat(e, name):
    return int(e.stats(name).get("wasmcustom." + name, "-1"))


def test_the_read_only_token_reads_everything_and_cannot_add_disable_or_delete_keys(gateway, mock3):
    e = gateway
    c = Connection(e.gateway_port)
    for path in ["keys", "keys/k1", "state", "health", "providers", "budgets", "budgets/daily", "decisions",
                 "transitions"]:
        status, _, body = c.admin("GET", path, READ_TOKEN)
        assert status == 200, (path, body)
    # What a stolen monitoring token would be used for: an attacker-owned
    # key in, every other key out, the budget lifted.
    writes = [("POST", "keys", {"id": "evil", "provider": "openai", "key_material": ATTACKER_SECRET}),
              ("PATCH", "keys/k1", {"state": "disabled"}),
              ("PATCH", "keys/k2", {"state": "throttled", "duration_seconds": 600}),
              ("DELETE", "keys/k3", None),
              ("PATCH", "budgets/daily", {"limit": "1000000"})]
    for method, path, body in writes:
        status, _, answer = c.admin(method, path, READ_TOKEN, body)
        assert (status, answer["error"]["code"]) == (403, "read_only_token"), (method, path, answer)
    # Nothing changed, and traffic still goes to the configured keys only.
    _, _, keys = c.admin("GET", "keys", READ_TOKEN)
    assert [(k["id"], k["state"]) for k in keys["keys"]] == [("k1", "available"), ("k2", "available"),
                                                             ("k3", "available")]
    assert c.admin("GET", "budgets/daily", READ_TOKEN)[2]["limit"] == "10"
    for _ in range(3):
        assert chat(e.url)[0] == 200
    assert ATTACKER_SECRET not in {r["key"] for r in mock3.received()}
    # The full token still does everything, and none of the above was a
    # failed authentication.
    status, _, body = c.admin("PATCH", "keys/k1", ADMIN_TOKEN, {"state": "disabled", "reason": "rotating"})
    assert (status, body["state"]) == (200, "disabled")
    assert stat(e, "apikeyrouter.admin.auth_failures") == 0
    c.close()


def test_wrong_admin_tokens_are_slowed_down_counted_and_logged_without_their_content(gateway):
    e = gateway
    assert stat(e, "apikeyrouter.admin.auth_failures") == 0, "defined at zero before anything happens"
    c = Connection(e.gateway_port)
    guesses = [f"guess-{i:02d}-{'x' * (i * 7)}-attempt" for i in range(BURST)]
    # Wrong tokens of every length, the read-only token's prefix, and none.
    guesses[3] = READ_TOKEN[:-1]
    guesses[4] = ADMIN_TOKEN + "0"
    for g in guesses:
        status, headers, body = c.admin("GET", "keys", g)
        assert (status, body["error"]["code"]) == (401, "invalid_admin_token"), (g, body)
    # The budget is spent: the next guess gets 429 and so does the right
    # token (a guess must not learn that it was right).
    status, headers, body = c.admin("GET", "keys", "guess-after-the-budget")
    assert (status, body["error"]["code"]) == (429, "admin_auth_throttled"), body
    assert 1 <= int(headers["retry-after"]) <= REFILL_S, headers
    status, headers, _ = c.admin("PATCH", "keys/k1", ADMIN_TOKEN, {"state": "disabled"})
    assert status == 429 and 1 <= int(headers["retry-after"]) <= REFILL_S

    # Counted: each refused authentication once, each 429 once.
    wait_until(lambda: stat(e, "apikeyrouter.admin.auth_failures") == BURST, timeout=10,
               what=f"{BURST} failures counted")
    wait_until(lambda: stat(e, "apikeyrouter.admin.auth_throttled") == 2, timeout=10, what="2 throttled counted")
    # Logged: one line per failure and one for the spell of 429s, none with
    # any token.
    logs = e.logs()
    refused = [l for l in logs.splitlines() if "admin: GET" in l and "refused: a token that matches no admin token" in l]
    assert len(refused) == BURST, refused
    assert len(re.findall(r"failed authentications on this worker: every admin request gets 429", logs)) == 1
    for secret in guesses + [ADMIN_TOKEN, READ_TOKEN, "guess-after-the-budget"]:
        assert secret not in logs, secret

    # The budget refills: one more attempt every 6 s. Retried on the same
    # connection (the same worker) until the right token is taken again.
    answers = []

    def admitted():
        status, _, _ = c.admin("GET", "keys", ADMIN_TOKEN)
        answers.append(status)
        return status == 200
    wait_until(admitted, timeout=REFILL_S * 3, interval=0.5, what="the failure budget to refill")
    assert set(answers[:-1]) <= {429}, answers
    # The key was never disabled.
    assert c.admin("GET", "keys/k1", ADMIN_TOKEN)[2]["state"] == "available"
    c.close()


# --- Shipped configs: the admin API only on a loopback or internal listener ----

ISTIO = ROOT / "deploy" / "istio"
K8S_CONFIGMAP = ROOT / "deploy" / "kubernetes" / "configmap.yaml"
PUBLIC_ADMIN = {}


def shipped_envoy_configs():
    """Every shipped Envoy bootstrap, parsed, by name: envoy/*.yaml (their
    ${...} placeholders filled with 1) and the one in the Kubernetes ConfigMap."""
    out = {}
    for p in sorted((ROOT / "envoy").glob("*.yaml")):
        out[p.name] = yaml.safe_load(re.sub(r"\$\{[A-Z_]+\}", "1", p.read_text()))
    configmap = yaml.safe_load(K8S_CONFIGMAP.read_text())
    out["kubernetes/configmap.yaml"] = yaml.safe_load(configmap["data"]["envoy.yaml"])
    return out


SHIPPED = shipped_envoy_configs()


def admin_enabled(plugin_json):
    try:
        plugin = json.loads(plugin_json)
    except ValueError:
        return False
    a = plugin.get("admin")
    return isinstance(a, dict) and a.get("enabled", True) is not False


def serves_admin(doc):
    """Whether an ingress stage anywhere in doc has the admin API enabled."""
    for wf in wasm_filter_configs(doc):
        root_id = str(wf.get("root_id", ""))
        if "ingress" in root_id and "attempt" not in root_id:
            if admin_enabled(wf.get("configuration", {}).get("value", "")):
                return True
    return False


def private(listener):
    """A loopback address, or an Envoy internal listener."""
    if "internal_listener" in listener or "envoy_internal_address" in listener.get("address", {}):
        return True
    host = listener.get("address", {}).get("socket_address", {}).get("address", "")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_admin_listeners(doc):
    listeners = (doc.get("static_resources") or {}).get("listeners") or []
    return [l.get("name", "?") for l in listeners if serves_admin(l) and not private(l)]


@pytest.mark.parametrize("name", [
    pytest.param(n, id=n, marks=[pytest.mark.xfail(strict=True, reason=PUBLIC_ADMIN[n])] if n in PUBLIC_ADMIN else [])
    for n in SHIPPED])
def test_no_shipped_envoy_config_serves_the_admin_api_on_a_public_listener(name):
    assert public_admin_listeners(SHIPPED[name]) == [], f"{name} serves the admin API on a public listener"


def test_the_istio_gateway_lets_only_the_operators_principal_reach_the_admin_api():
    """On Istio the ingress stage runs on the gateway callers reach: there an
    AuthorizationPolicy must deny the admin prefix to every principal but the
    operators' (Istio's RBAC filter runs before the ingress stage)."""
    docs = [d for f in sorted(ISTIO.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    prefixes = set()
    for d in docs:
        for wf in wasm_filter_configs(d):
            value = wf.get("configuration", {}).get("value", "")
            if "ingress" in str(wf.get("root_id", "")) and admin_enabled(value):
                prefixes.add(json.loads(value)["admin"].get("prefix", "/apikeyrouter/v1/"))
    assert prefixes, "the Istio recipe has an ingress stage with the admin API"
    guards = [d["spec"] for d in docs if d.get("kind") == "AuthorizationPolicy" and d["spec"].get("action") == "DENY"]
    for prefix in prefixes:
        assert any(all(src.get("notPrincipals") for r in g.get("rules", []) for src in
                       [f.get("source", {}) for f in r.get("from", [])])
                   and any(prefix.startswith(path.rstrip("*")) for r in g.get("rules", [])
                           for t in r.get("to", []) for path in t.get("operation", {}).get("paths", []))
                   for g in guards), f"nothing keeps callers from {prefix} on the Istio gateway"


def test_the_config_walk_finds_the_admin_api_where_it_is():
    """The check above must not pass by failing to see an admin API."""
    def listener(address, plugin, root_id="apikeyrouter_ingress"):
        return {"address": {"socket_address": {"address": address, "port_value": 1}},
                "filter_chains": [{"filters": [{"typed_config": {"http_filters": [
                    {"name": "envoy.filters.http.wasm", "typed_config": {"config": {
                        "root_id": root_id, "configuration": {"value": json.dumps(plugin)}}}}]}}]}]}
    with_admin = {"admin": {"token_env": "T"}}
    doc = {"static_resources": {"listeners": [
        listener("0.0.0.0", with_admin), listener("127.0.0.1", with_admin), listener("::", {"x": 1}),
        listener("10.0.0.1", {"admin": {"enabled": False, "token_env": "T"}}),
        listener("0.0.0.0", with_admin, root_id="apikeyrouter_attempt")]}}
    assert public_admin_listeners(doc) == ["?"]
    assert not private({"address": {"socket_address": {"address": "0.0.0.0"}}})
    assert private({"address": {"socket_address": {"address": "::1"}}})
    assert private({"name": "x", "internal_listener": {}, "address": {}})
    assert "kubernetes/configmap.yaml" in SHIPPED and "openai.yaml" in SHIPPED
