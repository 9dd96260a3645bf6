"""Secrets through real Envoy: client credentials and x-apikeyrouter-*
headers never reach the provider, whatever the request's shape; key material
appears in no log (trace level), stat, admin response, response header or
access log."""

import json
import secrets as pysecrets

from harness import (ADMIN_TOKEN, assert_no_trap, body_of, chat, http, plugin_with_keys, raw_request, secrets,
                     sha256_hex, wait_until, wasm_failure_stats)


def test_client_credentials_and_router_headers_never_reach_the_provider_in_any_request_shape(start_mock, start_envoy):
    keys = secrets(3)
    vk = "sk-client-virtual-" + pysecrets.token_hex(12)
    mock = start_mock(keys)
    plugin = plugin_with_keys(keys, clients=[{"id": "app", "key_sha256": sha256_hex(vk)}])
    e = start_envoy(mock, plugin=plugin)
    forged = {"x-apikeyrouter-key-id": "forged", "X-ApiKeyRouter-Objective": "cost",
              "x-apikeyrouter-budget": "forged", "X-APIKEYROUTER-DECISION": "forged",
              "x-apikeyrouter-attempts": "9", "x-apikeyrouter-x": "sk-client-smuggled"}
    bearer = {"authorization": f"Bearer {vk}", **forged}
    both = {"authorization": f"Bearer {vk}", "x-api-key": vk, **forged}
    via_x_api_key = {"x-api-key": vk, **forged}
    mock.behavior(keys[0], status=429, times=1, headers={"retry-after": "1"})  # one request is retried
    sent = 0
    for headers in (bearer, both, via_x_api_key):
        assert chat(e.url, headers=headers)[0] == 200
        assert chat(e.url, headers=headers, stream=True)[0] == 200
        assert http("GET", e.url + "/v1/models", headers=headers)[0] == 200
        assert http("POST", e.url + "/v1/embeddings", {"model": "text-embedding-3-small", "input": "a"},
                    headers)[0] == 200
        sent += 4
    # A body the ingress stage does not read (not JSON by its content type).
    status, _, _ = http("POST", e.url + "/v1/chat/completions",
                        json.dumps(body_of(False)).encode(), {**bearer, "content-type": "text/plain"})
    assert status == 200
    sent += 1
    # Repeated headers, in raw HTTP/1.1.
    payload = json.dumps(body_of(False)).encode()

    def raw_chat(header_lines):
        head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + "".join(l + "\r\n" for l in header_lines)
                + f"Content-Type: application/json\r\nConnection: close\r\nContent-Length: {len(payload)}\r\n\r\n")
        return raw_request(e.gateway_port, head.encode() + payload)

    repeated = ["X-Apikeyrouter-Key-Id: a", "x-apikeyrouter-key-id: b", "x-apikeyrouter-objective: latency",
                "X-Api-Key: sk-client-third-secret", f"x-api-key: {vk}"]
    raw = raw_chat([f"Authorization: Bearer {vk}"] + repeated)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
    sent += 1
    # Envoy joins repeated Authorization headers into one value, which
    # matches no client: refused, and nothing is forwarded.
    raw = raw_chat([f"Authorization: Bearer {vk}", "Authorization: Bearer sk-client-second-secret"] + repeated)
    assert raw.startswith(b"HTTP/1.1 401"), raw[:300]

    received = mock.received()
    assert len(received) == sent + 1, "every request reached the provider once (plus the retry)"
    provider_auth = {f"Bearer {k}" for k in keys}
    for r in received:
        h = r["headers"]
        assert h.get("authorization") in provider_auth, h
        assert "x-api-key" not in h, h
        assert not [n for n in h if n.startswith("x-apikeyrouter")], h
        dumped = json.dumps(h)
        assert vk not in dumped and "sk-client" not in dumped and "forged" not in dumped, h


def _fragments(secret):
    """The secret, its random part, and the first 12 characters of that."""
    rand = secret.rsplit("-", 1)[-1]
    return [secret, rand, rand[:12]] if len(rand) >= 16 else [secret]


def test_key_material_appears_in_no_log_stat_admin_response_header_or_access_log(start_mock, start_envoy):
    inline = "sk-inline-" + pysecrets.token_hex(16)
    env2, env3 = ("sk-env-" + pysecrets.token_hex(16) for _ in range(2))
    runtime = "sk-runtime-" + pysecrets.token_hex(16)
    vk = "sk-client-virtual-" + pysecrets.token_hex(12)
    provider_secrets = [inline, env2, env3, runtime]
    mock = start_mock(provider_secrets)
    plugin = {
        "providers": [{"id": "openai", "keys": [
            {"id": "k1", "secret": inline}, {"id": "k2", "secret_env": "HARDENING_KEY_2"},
            {"id": "k3", "secret_env": "HARDENING_KEY_3", "metadata": {"note": "from env"}}]}],
        "prices": {"gpt-4o-mini*": {"input": "1000", "output": "2000"}},
        "budgets": [{"id": "b", "window": "day", "limit": "100"}],
        "clients": [{"id": "app", "key_sha256": sha256_hex(vk)}],
        "admin": {"token_env": "APIKEYROUTER_ADMIN_TOKEN"},
    }
    e = start_envoy(mock, plugin=plugin, log_level="trace",
                    env={"HARDENING_KEY_2": env2, "HARDENING_KEY_3": env3},
                    host_env_keys=["HARDENING_KEY_2", "HARDENING_KEY_3", "APIKEYROUTER_ADMIN_TOKEN"])
    base = wasm_failure_stats(e)
    client = {"authorization": f"Bearer {vk}"}
    seen = []  # every response: headers and, for the admin API, the body

    def call(method, url, body=None, headers=None, keep_body=False):
        status, h, b = http(method, url, body, headers)
        seen.append(json.dumps(h) + (b.decode("utf-8", "replace") if keep_body else ""))
        return status, h, b

    def admin(method, path, body=None, token=ADMIN_TOKEN):
        return call(method, e.url + "/apikeyrouter/v1/" + path, body,
                    {"authorization": f"Bearer {token}"}, keep_body=True)

    assert admin("POST", "keys", {"id": "rt1", "provider": "openai", "key_material": runtime})[0] == 201
    # Refused registrations must not echo the material they were given.
    assert admin("POST", "keys", {"id": "k1", "provider": "openai", "key_material": env2})[0] == 409
    assert admin("POST", "keys", {"id": "bad id", "provider": "openai", "key_material": env3})[0] == 400
    assert admin("POST", "keys", {"id": "rt2", "provider": "openai", "key_material": env3 + " x"})[0] == 400
    # Traffic on every key, streams, and each key-state change.
    mock.behavior(env2, status=429, times=1, headers={"retry-after": "1"})
    mock.behavior(env3, status=401, times=1)
    mock.behavior(inline, status=500, times=1)
    for i in range(12):
        status, _, _ = call("POST", e.url + "/v1/chat/completions", body_of(i % 3 == 0, content=f"leak {i}"),
                            client)
        assert status == 200
    assert admin("PATCH", "keys/k3", {"state": "available"})[0] == 200
    mock.behavior(runtime, status=429, times=1,
                  body={"error": {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}})
    for i in range(6):
        assert call("POST", e.url + "/v1/chat/completions", body_of(False, content=f"more {i}"), client)[0] == 200
    for path in ["keys", "keys/k1", "keys/k2", "keys/k3", "keys/rt1", "providers", "budgets", "budgets/b",
                 "decisions?limit=1000", "transitions?limit=1000", "state", "health"]:
        assert admin("GET", path)[0] == 200, path
    assert admin("GET", "keys", token="wrong-token-wrong-token")[0] == 401
    assert admin("DELETE", "keys/rt1")[0] == 200
    # The scan below reads Envoy's stats: first wait for the filter's metrics
    # of every attempt just made (flushed every 500 ms), per key and for the
    # client, so that it scans them and not an earlier flush.
    attempts = len(mock.received())

    def flushed():
        stats = e.stats("apikeyrouter")
        per_key = sum(int(v) for n, v in stats.items()
                      if n.startswith("wasmcustom.apikeyrouter.key.openai.") and ".requests." in n)
        return (per_key, int(stats.get("wasmcustom.apikeyrouter.client.app.requests", 0))) == (attempts, attempts)
    wait_until(flushed, timeout=15, what=f"the metrics of {attempts} attempts")

    envoy_admin = []
    for path in ["/stats", "/stats?format=json", "/stats/prometheus"]:
        envoy_admin.append(http("GET", e.admin_url + path)[2].decode("utf-8", "replace"))
    config_dump = http("GET", e.admin_url + "/config_dump")[2].decode("utf-8", "replace")
    # Envoy flushes the stdout access log every few seconds.
    wait_until(lambda: sum(l.startswith("{") for l in e.logs().splitlines()) >= len(seen),
               timeout=30, what=f"an access log line per request ({len(seen)})")
    log = e.logs()
    access = [l for l in log.splitlines() if l.startswith("{")]
    assert len(access) == len(seen), "one access log line per request, no more"
    exposed = "\n".join(seen + envoy_admin + access)
    for s in provider_secrets + [ADMIN_TOKEN, vk]:
        for frag in _fragments(s):
            assert frag not in exposed, f"{frag} leaked to stats, admin, headers or access logs"
    # The trace-level log: no secret from the environment or the admin
    # API, ever. An inline secret is part of Envoy's own configuration,
    # which Envoy itself prints at debug level; the filter never logs it.
    for s in [env2, env3, runtime]:
        for frag in _fragments(s):
            assert frag not in log and frag not in config_dump, f"{frag} in the trace log or config_dump"
    for frag in _fragments(inline):
        lines = [l for l in log.splitlines() if frag in l]
        assert lines and all("][config]" in l and "config: {" in l for l in lines), lines[:3]
    # The filter's own log lines carry neither the admin token nor a
    # client's key.
    wasm_lines = "\n".join(l for l in log.splitlines() if "][wasm]" in l)
    for s in [ADMIN_TOKEN, vk]:
        assert s not in wasm_lines
    assert "provider answered 401" in json.dumps(json.loads(admin("GET", "transitions")[2])), \
        "the key-state paths ran"
    assert_no_trap(e, base)
