"""Core behaviour through real Envoy: rotation, cooldowns and retries,
streaming usage, exact counters, credential hygiene and bad input.

Each test starts the built filter in the pip Envoy (--concurrency 2) against
the mock provider and asserts on both sides: what the client saw and what
the provider received.
"""

import asyncio
import json
import math
import re
import time
from collections import Counter

import aiohttp

from harness import (ADMIN_TOKEN, DEMO_CONFIG, chat, fill, http, ids_by_secret, open_stream,
                     plugin_with_keys, render, secrets, validate, wait_recorded, wait_until, WASM)


def now_ms():
    """The wall clock in ms, as the filter reads it: a value taken before a
    request is <= the filter's clock during it, one taken after is >=."""
    return time.time_ns() // 1_000_000


def between(lo, value, hi):
    assert lo <= value <= hi, f"{value} not in [{lo}, {hi}]"


def retry_after_bounds(until_ms, t0, t1):
    """The whole seconds (at least 1) a reply made at some instant in [t0, t1]
    gives for a recovery at until_ms: (fewest, most)."""
    return (max(1, math.ceil((until_ms - t1) / 1000)), max(1, math.ceil((until_ms - t0) / 1000)))


def cooling_logged(e, key_id):
    """Each cooldown the attempt stage logged for key_id, as (until_ms, ms)."""
    pattern = re.compile(rf"key {re.escape(key_id)} answered 429: cooling until (\d+) \((\d+) ms\)")
    return [(int(until), int(ms)) for until, ms in pattern.findall(e.logs())]


def test_requests_rotate_evenly_across_all_keys(five_keys, start_envoy):
    e = start_envoy(five_keys, plugin=plugin_with_keys(secrets(5)))
    seen_by_client = []
    for i in range(100):
        status, headers, _ = chat(e.url, content=f"request {i}")
        assert status == 200
        seen_by_client.append(headers["x-apikeyrouter-key-id"])
    received = five_keys.received()
    assert len(received) == 100
    by_key = Counter(r["key"] for r in received)
    assert set(by_key) == set(secrets(5))
    # Each worker spreads evenly on its own; two workers together stay within 2.
    assert max(by_key.values()) - min(by_key.values()) <= 2, by_key
    # The key the client was told about is the key the provider saw.
    id_of = ids_by_secret(secrets(5))
    assert [id_of[r["key"]] for r in received] == seen_by_client


def test_429_on_one_key_is_retried_on_another_and_the_client_gets_200(five_keys, start_envoy):
    keys = secrets(3)
    e = start_envoy(five_keys, plugin=plugin_with_keys(keys))
    five_keys.behavior(keys[0], status=429, headers={"retry-after": "300"})
    t0 = now_ms()
    results = [chat(e.url)]
    t1 = now_ms()
    results += [chat(e.url) for _ in range(8)]
    assert [s for s, _, _ in results] == [200] * 9
    assert all(h["x-apikeyrouter-key-id"] in ("k2", "k3") for _, h, _ in results)
    retried = [h for _, h, _ in results if h["x-apikeyrouter-attempts"] == "2"]
    assert len(retried) == 1, "only the first request met the 429"
    received = five_keys.received()
    assert [r["key"] for r in received].count(keys[0]) == 1, "a cooling key is not chosen again"
    assert len(received) == 10
    k1 = e.key_counters()["k1"]
    assert results[0][1]["x-apikeyrouter-attempts"] == "2", "the first request met the 429"
    assert k1["state"] == "throttled"
    # Cooling 300 s from the 429, which came during the first request.
    between(t0 + 300_000, k1["cooldown_until_ms"], t1 + 300_000)
    assert (k1["counters"]["rate_limited"], k1["counters"]["cooldowns"]) == (1, 1)


def test_all_keys_cooling_gives_429_with_retry_after_of_the_earliest_recovery(five_keys, start_envoy):
    keys = secrets(3)
    e = start_envoy(five_keys, plugin=plugin_with_keys(keys))
    waits = dict(zip(keys, [400, 200, 600]))
    for key, wait in waits.items():
        five_keys.behavior(key, status=429, headers={"retry-after": str(wait)})
    t0 = now_ms()
    status, headers, body = chat(e.url)
    t1 = now_ms()
    assert status == 429
    err = json.loads(body)["error"]
    assert err["code"] == "no_available_key"
    assert err["type"] == "rate_limit_error"
    assert "3 cooling down" in err["message"]
    assert len(five_keys.received()) == 3
    # Each key cools for its own retry-after from its 429 (all within the
    # request); the answer's retry-after counts to the earliest, k2's.
    id_of = ids_by_secret(keys)
    until = {}
    for key, k in e.key_counters().items():
        assert k["state"] == "throttled", k
        until[key] = k["cooldown_until_ms"]
    assert set(until) == set(id_of.values())
    for key, wait in waits.items():
        between(t0 + wait * 1000, until[id_of[key]], t1 + wait * 1000)
    earliest = min(until.values())
    assert earliest == until["k2"]
    lo, hi = retry_after_bounds(earliest, t0, t1)
    between(lo, int(headers["retry-after"]), hi)
    # Later requests are refused by the ingress stage: no upstream attempt.
    upstream = e.stats("cluster.openai.upstream_rq_total")["cluster.openai.upstream_rq_total"]
    t2 = now_ms()
    status, headers, body = chat(e.url)
    t3 = now_ms()
    assert status == 429 and json.loads(body)["error"]["code"] == "no_available_key"
    lo, hi = retry_after_bounds(earliest, t2, t3)
    between(lo, int(headers["retry-after"]), hi)
    assert len(five_keys.received()) == 3
    assert e.stats("cluster.openai.upstream_rq_total")["cluster.openai.upstream_rq_total"] == upstream


def test_cooldown_follows_retry_after_ms_then_the_key_recovers(five_keys, start_envoy):
    keys = secrets(1)
    e = start_envoy(five_keys, plugin=plugin_with_keys(keys))
    five_keys.behavior(keys[0], status=429, times=1, headers={"retry-after-ms": "1200"})
    t0 = now_ms()
    status, headers, body = chat(e.url)
    t1 = now_ms()
    assert status == 429 and json.loads(body)["error"]["code"] == "no_available_key"
    # The cooldown may be over before the admin API is asked: its deadline
    # comes from the attempt stage's log line.
    wait_until(lambda: cooling_logged(e, "k1"), what="k1's cooldown in the log")
    [(until, ms)] = cooling_logged(e, "k1")
    assert ms == 1200
    between(t0 + 1200, until, t1 + 1200)
    lo, hi = retry_after_bounds(until, t0, t1)
    between(lo, int(headers["retry-after"]), hi)

    def recovered():
        # Throttled only before `until`, available only after it.
        before = now_ms()
        k1 = e.key_counters()["k1"]
        after = now_ms()
        if k1["state"] == "throttled":
            assert k1["cooldown_until_ms"] == until and before < until, (before, k1)
            return False
        assert k1["state"] == "available" and after >= until, (after, k1)
        return True

    wait_until(recovered, what="k1 to recover", errors=())
    status, headers, _ = chat(e.url)
    assert status == 200 and headers["x-apikeyrouter-key-id"] == "k1"


def test_openai_reset_duration_sets_the_cooldown(five_keys, start_envoy):
    keys = secrets(2)
    e = start_envoy(five_keys, plugin=plugin_with_keys(keys))
    five_keys.behavior(keys[0], status=429, headers={
        "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s",
        "x-ratelimit-remaining-tokens": "5000", "x-ratelimit-reset-tokens": "20ms"})
    t0 = now_ms()
    for _ in range(4):
        assert chat(e.url)[0] == 200
    t1 = now_ms()
    k1 = e.key_counters()["k1"]
    # The requests dimension ran out: its reset (6 minutes) wins over the tokens'.
    assert k1["state"] == "throttled" and k1["counters"]["rate_limited"] == 1
    between(t0 + 360_000, k1["cooldown_until_ms"], t1 + 360_000)


def test_without_rate_limit_headers_the_default_cooldown_applies(five_keys, start_envoy):
    keys = secrets(2)
    e = start_envoy(five_keys, plugin=plugin_with_keys(keys, cooldown={"default_seconds": 450}))
    five_keys.behavior(keys[0], status=429)
    t0 = now_ms()
    for _ in range(4):
        assert chat(e.url)[0] == 200
    t1 = now_ms()
    k1 = e.key_counters()["k1"]
    assert k1["state"] == "throttled" and k1["counters"]["rate_limited"] == 1
    between(t0 + 450_000, k1["cooldown_until_ms"], t1 + 450_000)


def test_server_error_is_retried_on_a_different_key(five_keys, start_envoy):
    keys = secrets(2)
    e = start_envoy(five_keys, plugin=plugin_with_keys(keys))
    five_keys.behavior(keys[0], status=503, times=1)
    five_keys.behavior(keys[1], status=503, times=1)
    status, headers, _ = chat(e.url)
    received = [r["key"] for r in five_keys.received()]
    assert status == 200
    assert len(received) == 3 and set(received) == set(keys), received
    assert received[0] != received[1], "the retry used the other key"
    assert headers["x-apikeyrouter-attempts"] == "3"
    counters = e.key_counters()
    assert set(counters) == {"k1", "k2"}
    assert sum(c["counters"]["server_errors"] for c in counters.values()) == 2
    assert all(c["state"] == "available" for c in counters.values()), "a 5xx is not the key's fault"


def test_stream_passes_chunks_unbuffered_and_its_usage_is_counted(five_keys, start_envoy):
    keys = secrets(1)
    e = start_envoy(five_keys, plugin=plugin_with_keys(keys))
    # The mock sends one chunk, then holds the rest until released: a
    # buffering gateway would deliver nothing before the release.
    five_keys.control("/_mock/stream", {"chunks": 6, "gate": True})
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "stream please"}]}
    conn, resp = open_stream(e.url, body)
    try:
        assert resp.status == 200
        assert resp.getheader("content-type").startswith("text/event-stream")
        assert resp.getheader("x-apikeyrouter-key-id") == "k1"
        first = resp.readline()
        assert first.startswith(b"data: ") and b"tok0" in first
        five_keys.control("/_mock/release", {})
        rest = resp.read().decode()
    finally:
        conn.close()
    assert "tok5" in rest and "data: [DONE]" in rest
    assert '"usage": {"prompt_tokens"' in rest, "the client sees the usage chunk it was given"
    # The filter asked for usage and fixed content-length: the provider parsed it.
    sent = five_keys.received()[-1]
    sent_body = json.loads(sent["body"])
    assert sent_body["stream_options"] == {"include_usage": True}
    assert int(sent["headers"]["content-length"]) == len(sent["body"].encode())
    reported = five_keys.stats()[keys[0]]
    wait_until(lambda: e.key_counters()["k1"]["counters"]["streams"] == 1, what="stream recorded")
    c = e.key_counters()["k1"]["counters"]
    assert (c["input_tokens"], c["output_tokens"], c["total_tokens"]) == (
        reported["prompt_tokens"], reported["completion_tokens"], reported["total_tokens"])
    assert c["total_tokens"] > 0


def test_stream_that_already_asks_for_usage_is_forwarded_byte_for_byte(five_keys, start_envoy):
    keys = secrets(1)
    e = start_envoy(five_keys, plugin=plugin_with_keys(keys))
    raw = ('{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},'
           '"messages":[{"role":"user","content":"hi"}]}')
    status, _, body = http("POST", e.url + "/v1/chat/completions", raw)
    assert status == 200 and b"[DONE]" in body
    assert five_keys.received()[-1]["body"] == raw


async def _load(url, n, concurrency):
    sem = asyncio.Semaphore(concurrency)
    statuses = Counter()

    async def one(session, i):
        stream = i % 4 == 0
        body = {"model": "gpt-4o-mini", "stream": stream,
                "messages": [{"role": "user", "content": "x" * (i % 50)}]}
        async with sem:
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                await r.read()
                statuses[r.status] += 1

    timeout = aiohttp.ClientTimeout(total=120)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        await asyncio.gather(*(one(session, i) for i in range(n)))
    return statuses


def test_counters_are_exact_after_2000_concurrent_requests(five_keys, start_envoy):
    keys = secrets(4)
    e = start_envoy(five_keys, plugin=plugin_with_keys(keys))
    statuses = asyncio.run(_load(e.url, 2000, 64))
    assert statuses == {200: 2000}
    reported = five_keys.stats()
    id_of = ids_by_secret(keys)
    counters = wait_recorded(e, 2000, timeout=10)
    assert set(reported) == set(keys), reported.keys()
    for secret, r in reported.items():
        c = counters[id_of[secret]]
        assert c["requests"] == r["requests"] == c["successes"], (secret, c, r)
        assert c["input_tokens"] == r["prompt_tokens"], (secret, c, r)
        assert c["output_tokens"] == r["completion_tokens"], (secret, c, r)
        assert c["total_tokens"] == r["total_tokens"], (secret, c, r)
    assert sum(c["streams"] for c in counters.values()) == 500


def test_client_credentials_and_forged_router_headers_never_reach_the_provider(five_keys, start_envoy):
    keys = secrets(2)
    e = start_envoy(five_keys, plugin=plugin_with_keys(keys))
    five_keys.behavior(keys[0], status=429, times=1, headers={"retry-after": "1"})
    client = {"authorization": "Bearer sk-client-own-secret", "x-api-key": "sk-client-other-secret",
              "x-apikeyrouter-key-id": "forged", "x-apikeyrouter-objective": "cost"}
    for _ in range(3):
        assert chat(e.url, headers=client)[0] == 200
    status, _, _ = http("GET", e.url + "/v1/models", headers=client)
    assert status == 200
    received = five_keys.received()
    assert len(received) == 5
    for r in received:
        assert r["headers"]["authorization"] in {f"Bearer {k}" for k in keys}
        assert "x-api-key" not in r["headers"]
        assert not any(h.startswith("x-apikeyrouter-") for h in r["headers"])
        assert "sk-client" not in json.dumps(r["headers"])


def test_malformed_json_gets_an_openai_style_400_and_the_provider_is_not_called(five_keys, start_envoy):
    e = start_envoy(five_keys, plugin=plugin_with_keys(secrets(1)))
    for raw in [b'{"model": "gpt-4o-mini", "messages": [', b"not json", b"[1, 2]",
                b'{"model": "m", "stream": "yes"}']:
        status, headers, body = http("POST", e.url + "/v1/chat/completions", raw)
        assert status == 400, raw
        assert headers["content-type"] == "application/json"
        err = json.loads(body)["error"]
        assert err["type"] == "invalid_request_error" and err["message"], raw
    assert five_keys.received() == []


def test_every_openai_path_is_routed_with_a_key(five_keys, start_envoy):
    keys = secrets(1)
    e = start_envoy(five_keys, plugin=plugin_with_keys(keys))
    status, headers, body = http("POST", e.url + "/v1/embeddings",
                                 {"model": "text-embedding-3-small", "input": ["a", "b"]})
    assert status == 200 and len(json.loads(body)["data"]) == 2
    assert headers["x-apikeyrouter-key-id"] == "k1"
    status, _, body = http("POST", e.url + "/v1/completions", {"model": "m", "prompt": "hi"})
    assert status == 200 and json.loads(body)["object"] == "text_completion"
    status, _, body = http("GET", e.url + "/v1/models")
    assert status == 200 and json.loads(body)["object"] == "list"
    assert [r["path"] for r in five_keys.received()] == ["/v1/embeddings", "/v1/completions",
                                                         "/v1/models"]
    reported = five_keys.stats()[keys[0]]
    assert wait_recorded(e, 3, timeout=20)["k1"]["input_tokens"] == reported["prompt_tokens"]


def test_admin_api_refuses_requests_without_the_token(five_keys, start_envoy):
    e = start_envoy(five_keys, plugin=plugin_with_keys(secrets(1)))
    for token in [None, "wrong-token-wrong-token"]:
        status, _, body = e.admin_api("GET", "keys", token=token)
        assert status == 401
        assert json.loads(body)["error"]["type"] == "authentication_error"
    status, _, body = e.admin_api("GET", "keys")
    assert status == 200
    assert secrets(1)[0] not in body.decode()
    status, _, body = e.admin_api("GET", "health")
    assert status == 200 and json.loads(body)["status"] == "healthy"


BAD_PLUGIN = {"providers": [{"id": "openai", "keys": [{"id": "k1", "secret": "sk-a", "weight": 0}]}]}
BAD_LINE = "invalid apikeyrouter config: providers[0].keys[0].weight: expected an integer from 1 to 10000"


def _write_config(tmp_path, plugin, env_keys=None):
    cfg = render(DEMO_CONFIG.read_text(), 1, 2, 3, plugin=plugin, host_env_keys=env_keys)
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(cfg))
    return path


def test_shipped_demo_config_validates():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/demo.yaml"
        with open(path, "w") as f:
            f.write(fill(DEMO_CONFIG.read_text(), {"GATEWAY_PORT": 10000, "ADMIN_PORT": 9901,
                                                  "MOCK_PORT": 18080, "WASM_PATH": WASM}))
        env = {"DEMO_KEY_1": "sk-a", "DEMO_KEY_2": "sk-b", "DEMO_KEY_3": "sk-c",
               "APIKEYROUTER_ADMIN_TOKEN": ADMIN_TOKEN}
        code, out = validate(path, env)
        assert code == 0, out[-3000:]
        assert "FAIL_OPEN" not in DEMO_CONFIG.read_text().replace("never FAIL_OPEN", "")
        assert DEMO_CONFIG.read_text().count("failure_policy: FAIL_RELOAD") == 2


def test_bad_config_is_refused_by_validate_with_one_line_naming_the_field(tmp_path):
    code, out = validate(_write_config(tmp_path, BAD_PLUGIN))
    assert code != 0
    assert BAD_LINE in out, out[-3000:]
    assert sum(1 for line in out.splitlines() if "invalid apikeyrouter config" in line) == 1, out[-3000:]


def test_missing_secret_env_is_refused_naming_the_variable(tmp_path):
    plugin = {"providers": [{"id": "openai", "keys": [{"id": "k1", "secret_env": "NOT_SET_ANYWHERE"}]}]}
    code, out = validate(_write_config(tmp_path, plugin, env_keys=["NOT_SET_ANYWHERE"]))
    assert code != 0
    assert "providers[0].keys[0].secret_env: environment variable NOT_SET_ANYWHERE is not set" in out


def test_envoy_refuses_to_start_with_a_bad_config(mock, tmp_path):
    import subprocess
    from harness import envoy_bin
    path = _write_config(tmp_path, BAD_PLUGIN)
    p = subprocess.run([envoy_bin(), "-c", str(path), "--concurrency", "2", "--disable-hot-restart"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert BAD_LINE in out, out[-3000:]
    assert sum(1 for line in out.splitlines() if "invalid apikeyrouter config" in line) == 1, out[-3000:]
