"""Caller identity (virtual keys) and per-client and per-team policies,
through real Envoy."""

import asyncio
import json
import time
from collections import Counter

import aiohttp

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
    e = start_envoy(mock3, plugin=identity_plugin(secrets(3)))
    s, _, body = chat(e.url, headers=bearer(APP_KEY), extra={"model": "gpt-4o-mini", "max_tokens": 10})
    assert s == 200 and json.loads(body)["choices"]
    s, _, _ = http("POST", e.url + "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"},
                   {"x-api-key": APP_KEY})
    assert s == 200
    for r in mock3.received():
        assert APP_KEY not in json.dumps(r["headers"])
        assert r["headers"]["authorization"].startswith("Bearer sk-test-")
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
    # Stay inside one UTC minute: the limit counts per minute.
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)
    statuses, retry_after = asyncio.run(_burst(e.url, 200, 32, APP_KEY))
    assert statuses == {200: 40, 429: 160}, statuses
    assert all(ra and 1 <= int(ra) <= 60 for ra in retry_after)
    assert len(mock3.received()) == 40


def test_identity_travels_to_decisions_access_logs_and_metrics(mock3, start_envoy):
    e = start_envoy(mock3, plugin=identity_plugin(secrets(3)))
    s, h, _ = chat(e.url, headers=bearer(APP_KEY), extra={"model": "gpt-4o-mini", "max_tokens": 10})
    assert s == 200
    rid = h["x-request-id"]

    def record():
        status, _, body = e.admin_api("GET", "decisions?limit=5")
        return [d for d in json.loads(body)["decisions"] if d["request_id"] == rid]

    wait_until(record, what="decision record")
    assert record()[0]["client"] == "app"
    wait_until(lambda: '\\"client\\":\\"app\\"' in e.logs(), what="access log")
    line = [l for l in e.logs().splitlines() if l.startswith("{") and "client" in l][-1]
    outcome = json.loads(json.loads(line)["apikeyrouter"])
    assert (outcome["client"], outcome["team"]) == ("app", "blue")

    def scraped():
        _, _, body = http("GET", e.admin_url + "/stats/prometheus")
        return 'apikeyrouter_client_requests{client="app"} 1' in body.decode()

    wait_until(scraped, timeout=10, what="client metric")
    everything = e.logs() + json.dumps(record())
    _, _, prom = http("GET", e.admin_url + "/stats/prometheus")
    assert APP_KEY not in everything + prom.decode()
