"""Providers beyond OpenAI, through real Envoy against a mock that speaks each
dialect (mock/dialects.py) with envoy/providers-mock.yaml: auth styles,
usage formats, rate-limit signals, errors, streaming, and fallback to the
next provider."""

import datetime
import json

import pytest

import harness
from harness import DIALECTS, ROOT, hcm, http, wait_until

KEYS = ["sk-openai-1", "sk-openai-2", "az-key-1", "sk-ant-1", "sk-ant-2", "gm-key-1", "gm-key-2"]


@pytest.fixture
def dialects(start_mock):
    """The mock that speaks each provider's dialect (mock/dialects.py), accepting KEYS."""
    return start_mock(KEYS, script=DIALECTS)


@pytest.fixture
def gateway(dialects, start_envoy, monkeypatch):
    monkeypatch.setattr(harness, "DEMO_CONFIG", ROOT / "envoy" / "providers-mock.yaml")
    return dialects, start_envoy(dialects)


def counters(e, key_id):
    return e.key_counters()[key_id]["counters"]


def settled(e, key_id, n):
    wait_until(lambda: counters(e, key_id)["requests"] >= n, what=f"{key_id} recorded")
    return counters(e, key_id)


def test_each_dialect_gets_its_own_auth_and_its_usage_is_counted(gateway):
    mock, e = gateway
    # OpenAI: Bearer, plus the key's own headers.
    # Four requests: whatever worker each lands on, both keys get used.
    for _ in range(4):
        s, h, _ = http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []})
        assert s == 200 and h["x-apikeyrouter-key-id"].startswith("openai-")
    sent = {r["key"]: r for r in mock.received() if r["dialect"] == "openai"}
    assert sent["sk-openai-1"]["headers"]["openai-organization"] == "org-demo"
    assert "openai-organization" not in sent["sk-openai-2"]["headers"]

    # Anthropic: x-api-key and a default anthropic-version; JSON and stream usage.
    msg = {"model": "claude-3-5-sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
    s, h, body = http("POST", e.url + "/v1/messages", msg)
    assert s == 200 and json.loads(body)["type"] == "message"
    s, h, body = http("POST", e.url + "/v1/messages", {**msg, "stream": True})
    assert s == 200 and b"message_delta" in body
    ant = [r for r in mock.received() if r["dialect"] == "anthropic"]
    assert all(r["headers"]["anthropic-version"] == "2023-06-01" for r in ant)
    assert {r["key"] for r in ant} <= {"sk-ant-1", "sk-ant-2"}
    assert not any("authorization" in r["headers"] for r in ant)
    wait_until(lambda: counters(e, "claude-1")["requests"] + counters(e, "claude-2")["requests"] == 2, what="recorded")
    c1, c2 = counters(e, "claude-1"), counters(e, "claude-2")
    assert (c1["input_tokens"] + c2["input_tokens"], c1["output_tokens"] + c2["output_tokens"]) == (22, 10)
    assert c1["streams"] + c2["streams"] == 1

    # Gemini native: x-goog-api-key; usageMetadata in JSON and in the stream.
    gen = {"contents": [{"parts": [{"text": "Hi"}]}]}
    assert http("POST", e.url + "/v1beta/models/gemini-2.0-flash:generateContent", gen)[0] == 200
    s, _, body = http("POST", e.url + "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", gen)
    assert s == 200 and b"usageMetadata" in body
    gem = [r for r in mock.received() if r["dialect"] == "gemini"]
    assert all(r["key"] == "gm-key-1" and "x-goog-api-key" in r["headers"] for r in gem)
    g = settled(e, "gemini-1", 2)
    assert (g["input_tokens"], g["output_tokens"], g["total_tokens"]) == (22, 10, 32)

    # Gemini's OpenAI-compatible endpoint, chosen through the models table.
    s, h, _ = http("POST", e.url + "/v1/chat/completions", {"model": "gemini-2.0-flash", "messages": []})
    assert s == 200 and h["x-apikeyrouter-key-id"] == "gemini-oa-1"
    last = mock.received()[-1]
    assert (last["dialect"], last["path"], last["key"]) == ("gemini_openai", "/v1beta/openai/chat/completions", "gm-key-2")

    # No provider's key material ever went to another dialect, nor to the client.
    for r in mock.received():
        assert "x-apikeyrouter-provider" not in r["headers"] or r["headers"]["x-apikeyrouter-provider"] in (
            "openai", "azure", "anthropic", "gemini", "gemini_openai")


def test_when_every_key_of_a_provider_is_cooling_the_next_provider_serves(gateway):
    mock, e = gateway
    for k in ["sk-openai-1", "sk-openai-2"]:
        mock.behavior(k, status=429, times=1, headers={"retry-after": "60"})
    # The first request finds OpenAI's keys rate limited one after the other.
    first = http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []})
    assert first[0] == 429
    assert {k["state"] for k in (e.key_counters()["openai-1"], e.key_counters()["openai-2"])} == {"throttled"}
    # From then on gpt-4o goes to Azure, under its deployment name.
    s, h, body = http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []})
    assert s == 200 and h["x-apikeyrouter-key-id"] == "azure-1"
    last = mock.received()[-1]
    assert last["dialect"] == "azure"
    assert last["path"] == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    assert last["headers"]["api-key"] == "az-key-1" and "authorization" not in last["headers"]
    assert json.loads(last["body"])["model"] == "gpt4o-prod"
    assert json.loads(body)["model"] == "gpt4o-prod"


def test_azure_retry_after_ms_sets_the_cooldown(gateway):
    mock, e = gateway
    for k in ["sk-openai-1", "sk-openai-2"]:
        mock.behavior(k, status=429, times=1, headers={"retry-after": "60"})
    http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []})
    mock.behavior("az-key-1", status=429, times=1, headers={"x-ms-retry-after-ms": "1500"})
    s, _, _ = http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []})
    assert s == 429
    az = e.key_counters()["azure-1"]
    assert az["state"] == "throttled" and 0 < az["cooldown_remaining_ms"] <= 1500


def test_anthropic_529_overloaded_is_retried_and_not_held_against_the_key(gateway):
    mock, e = gateway
    mock.behavior("sk-ant-1", status=529, times=1,
                  body={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    mock.behavior("sk-ant-2", status=529, times=1,
                  body={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    msg = {"model": "claude-3-5-sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
    s, h, _ = http("POST", e.url + "/v1/messages", msg)
    assert s == 200 and h["x-apikeyrouter-attempts"] == "3"
    keys = e.key_counters()
    for k in ("claude-1", "claude-2"):
        assert keys[k]["state"] == "available"
        assert keys[k]["reliability"] == 1.0


def test_anthropic_rate_limit_headers_cool_the_key_until_their_reset(gateway):
    mock, e = gateway
    reset = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=40)).strftime("%Y-%m-%dT%H:%M:%SZ")
    for k in ("sk-ant-1", "sk-ant-2"):
        mock.behavior(k, status=429, times=1, headers={
            "anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-reset": reset})
    msg = {"model": "claude-3-5-sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
    s, h, body = http("POST", e.url + "/v1/messages", msg)
    assert s == 429 and 30 <= int(h["retry-after"]) <= 41
    for k in ("claude-1", "claude-2"):
        c = e.key_counters()[k]
        assert c["state"] == "throttled" and 30_000 <= c["cooldown_remaining_ms"] <= 41_000


def test_a_cost_objective_sends_the_model_to_its_cheapest_provider(dialects, start_envoy, monkeypatch):
    monkeypatch.setattr(harness, "DEMO_CONFIG", ROOT / "envoy" / "providers-mock.yaml")
    cfg = harness.render(harness.DEMO_CONFIG.read_text(), 1, 2, 3)
    plugin = json.loads(hcm(cfg)["http_filters"][0]["typed_config"]["config"]["configuration"]["value"])
    for p in plugin["providers"]:
        for k in p["keys"]:
            k["cost_per_1k"] = {"openai": "0.01", "azure": "0.002"}.get(p["id"], "0.05")
    e = start_envoy(dialects, plugin=plugin)
    body = {"model": "gpt-4o", "messages": []}
    s, h, _ = http("POST", e.url + "/v1/chat/completions", body)
    assert s == 200 and h["x-apikeyrouter-key-id"].startswith("openai-"), "config order without an objective"
    s, h, _ = http("POST", e.url + "/v1/chat/completions", body, {"x-apikeyrouter-objective": "cost"})
    assert s == 200 and h["x-apikeyrouter-key-id"] == "azure-1"
    assert dialects.received()[-1]["path"].startswith("/openai/deployments/gpt4o-prod/")
