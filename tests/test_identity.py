"""Caller identity (virtual keys) and per-client and per-team policies,
through real Envoy."""

import asyncio
import json
import math
import time
from collections import Counter

import aiohttp
import pytest

from harness import chat, http, plugin_with_keys, secrets, sha256_hex, wait_until

APP_KEY = "vk-app-alpha-0123456789"
OLD_KEY = "vk-expired-0123456789"
NARROW_KEY = "vk-narrow-0123456789"


def identity_plugin(keys, rpm=None):
    plugin = plugin_with_keys(keys, prices={"gpt-4o*": {"input": "2.50", "output": "10"}})
    plugin["providers"].append({"id": "claude", "kind": "anthropic", "keys": [{"id": "c1", "secret": "sk-claude-unused"}]})
    plugin["teams"] = [{"id": "blue", "allowed_models": ["gpt-4o*", "text-embedding-3-*"],
                        "model_aliases": {"gpt-4": "gpt-4o"}, "max_tokens": 1000}]
    app = {"id": "app", "team": "blue", "key_sha256": sha256_hex(APP_KEY), "max_cost_per_request": "0.05"}
    if rpm:
        app["rpm"] = rpm
    plugin["clients"] = [
        app,
        {"id": "old", "team": "blue", "key_sha256": sha256_hex(OLD_KEY), "expires_at": "2020-01-01T00:00:00Z"},
        # May only use Anthropic: nothing it may use serves the OpenAI paths.
        {"id": "narrow", "key_sha256": sha256_hex(NARROW_KEY), "allowed_providers": ["claude"]},
    ]
    return plugin


def bearer(k):
    return {"authorization": f"Bearer {k}"}


def error_of(body):
    return json.loads(body)["error"]


def test_every_refusal_says_why_and_the_provider_is_not_called(mock3, start_envoy):
    e = start_envoy(mock3, plugin=identity_plugin(secrets(3)))
    cases = [
        ({}, {}, 401, "invalid_api_key"),
        (bearer("vk-who-is-this"), {}, 401, "invalid_api_key"),
        (bearer(OLD_KEY), {}, 401, "invalid_api_key"),
        (bearer(NARROW_KEY), {}, 403, "provider_not_allowed"),
        (bearer(APP_KEY), {"model": "o1"}, 403, "model_not_allowed"),
        (bearer(APP_KEY), {"model": "gpt-4o", "max_tokens": 5000}, 400, "max_tokens_too_large"),
        (bearer(APP_KEY), {"model": "gpt-4o", "max_tokens": 1000,
                           "messages": [{"role": "user", "content": "x" * 20000}]}, 400, "cost_cap_exceeded"),
    ]
    for headers, extra, status, code in cases:
        s, h, body = chat(e.url, headers=headers, extra=extra)
        assert (s, error_of(body)["code"]) == (status, code), (headers, extra, body)
        assert h["content-type"] == "application/json"
    assert "expired" in error_of(chat(e.url, headers=bearer(OLD_KEY))[2])["message"]
    assert "o1" in error_of(chat(e.url, headers=bearer(APP_KEY), extra={"model": "o1"})[2])["message"]
    assert mock3.received() == []


def test_a_permitted_client_is_served_and_its_key_stays_at_the_gateway(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=identity_plugin(keys))
    s, _, body = chat(e.url, headers=bearer(APP_KEY), extra={"model": "gpt-4o-mini", "max_tokens": 10})
    assert s == 200 and json.loads(body)["choices"]
    s, _, _ = http("POST", e.url + "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"},
                   {"x-api-key": APP_KEY})
    assert s == 200
    received = mock3.received()
    assert [r["path"] for r in received] == ["/v1/chat/completions", "/v1/embeddings"], received
    for r in received:
        assert APP_KEY not in json.dumps(r["headers"]) + r["body"]
        assert r["headers"]["authorization"] in {f"Bearer {k}" for k in keys}, r
        assert "x-api-key" not in r["headers"]


def test_a_policy_alias_rewrites_the_model_the_provider_receives(mock3, start_envoy):
    e = start_envoy(mock3, plugin=identity_plugin(secrets(3)))
    for stream in (False, True):
        s, _, _ = chat(e.url, headers=bearer(APP_KEY), stream=stream, extra={"model": "gpt-4", "max_tokens": 10})
        assert s == 200
        sent = json.loads(mock3.received()[-1]["body"])
        assert sent["model"] == "gpt-4o"
        if stream:
            assert sent["stream_options"] == {"include_usage": True}
        sent_raw = mock3.received()[-1]
        assert int(sent_raw["headers"]["content-length"]) == len(sent_raw["body"].encode())


async def _burst(url, n, concurrency, key):
    sem = asyncio.Semaphore(concurrency)
    statuses, retry_after = Counter(), set()

    async def one(session):
        body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        async with sem:
            async with session.post(url + "/v1/chat/completions", json=body, headers=bearer(key)) as r:
                await r.read()
                statuses[r.status] += 1
                if r.status == 429:
                    retry_after.add(r.headers.get("retry-after"))

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        await asyncio.gather(*(one(s) for _ in range(n)))
    return statuses, retry_after


def test_per_client_rpm_is_exact_under_concurrency(mock3, start_envoy):
    e = start_envoy(mock3, plugin=identity_plugin(secrets(3), rpm=40))
    # The limit counts per UTC minute: the burst must stay inside one. One
    # that straddled a boundary is run again in a minute it never reached.
    for _ in range(3):
        mock3.reset()
        t0 = time.time_ns() // 1_000_000
        statuses, retry_after = asyncio.run(_burst(e.url, 200, 32, APP_KEY))
        t1 = time.time_ns() // 1_000_000
        if t0 // 60_000 == t1 // 60_000:
            break
        time.sleep(max(0.0, (t1 // 60_000 + 1) * 60 - time.time()))
    else:
        pytest.fail("three bursts of 200 requests each straddled a UTC minute boundary")
    assert statuses == {200: 40, 429: 160}, statuses
    assert len(mock3.received()) == 40
    # Each 429 says when the minute ends, in whole seconds from its instant in [t0, t1].
    minute_end = (t0 // 60_000 + 1) * 60_000
    fewest, most = (max(1, math.ceil((minute_end - t) / 1000)) for t in (t1, t0))
    assert retry_after and None not in retry_after, retry_after
    assert all(fewest <= int(ra) <= most for ra in retry_after), (fewest, retry_after, most)


def test_identity_travels_to_decisions_access_logs_and_metrics(mock3, start_envoy):
    e = start_envoy(mock3, plugin=identity_plugin(secrets(3)))
    s, h, _ = chat(e.url, headers=bearer(APP_KEY), extra={"model": "gpt-4o-mini", "max_tokens": 10})
    assert s == 200
    rid = h["x-request-id"]

    def record():
        status, _, body = e.admin_api("GET", "decisions?limit=5")
        return [d for d in json.loads(body)["decisions"] if d["request_id"] == rid]

    wait_until(record, what="decision record")
    [decision] = record()
    assert decision["client"] == "app"
    wait_until(lambda: '\\"client\\":\\"app\\"' in e.logs(), what="access log")
    lines = [l for l in e.logs().splitlines() if l.startswith("{") and '\\"client\\":\\"app\\"' in l]
    assert len(lines) == 1, "one access log line for the one request"
    outcome = json.loads(json.loads(lines[0])["apikeyrouter"])
    assert (outcome["client"], outcome["team"]) == ("app", "blue")

    def scraped():
        _, _, body = http("GET", e.admin_url + "/stats/prometheus")
        return 'apikeyrouter_client_requests{client="app"} 1' in body.decode()

    wait_until(scraped, timeout=10, what="client metric")
    everything = e.logs() + json.dumps(record())
    _, _, prom = http("GET", e.admin_url + "/stats/prometheus")
    assert APP_KEY not in everything + prom.decode()
