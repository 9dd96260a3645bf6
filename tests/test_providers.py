"""Providers beyond OpenAI, through real Envoy against a mock that speaks each
dialect (mock/dialects.py) with envoy/providers-mock.yaml: auth styles,
usage formats, rate-limit signals, errors, streaming, and fallback to the
next provider."""

import datetime
import json
import math
import re
import time

import pytest

import harness
from harness import DIALECTS, ROOT, hcm, http, wait_until

KEYS = ["sk-openai-1", "sk-openai-2", "az-key-1", "sk-ant-1", "sk-ant-2", "gm-key-1", "gm-key-2"]
# Each dialect's keys in envoy/providers-mock.yaml, and the header it sends one in.
DIALECT_KEYS = {"openai": {"sk-openai-1", "sk-openai-2"}, "azure": {"az-key-1"},
                "anthropic": {"sk-ant-1", "sk-ant-2"}, "gemini": {"gm-key-1"}, "gemini_openai": {"gm-key-2"}}
AUTH_HEADER = {"openai": ("authorization", "Bearer "), "gemini_openai": ("authorization", "Bearer "),
               "azure": ("api-key", ""), "anthropic": ("x-api-key", ""), "gemini": ("x-goog-api-key", "")}


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


def now_ms():
    """The wall clock in ms, as the filter reads it."""
    return time.time_ns() // 1_000_000


def settled(e, key_id, n):
    wait_until(lambda: counters(e, key_id)["requests"] == n, what=f"{key_id}: {n} requests recorded")
    return counters(e, key_id)


def test_each_dialect_gets_its_own_auth_and_its_usage_is_counted(gateway):
    mock, e = gateway
    answers = []  # what the client got: (headers, body)
    # OpenAI: Bearer, plus the key's own headers.
    # Four requests: whatever worker each lands on, both keys get used.
    for _ in range(4):
        s, h, body = http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []})
        assert s == 200 and h["x-apikeyrouter-key-id"].startswith("openai-")
        answers.append((h, body))
    openai = [r for r in mock.received() if r["dialect"] == "openai"]
    assert len(openai) == 4 and {r["key"] for r in openai} == {"sk-openai-1", "sk-openai-2"}
    for r in openai:
        assert r["headers"].get("openai-organization") == ("org-demo" if r["key"] == "sk-openai-1" else None), r

    # Anthropic: x-api-key and a default anthropic-version; JSON and stream usage.
    msg = {"model": "claude-3-5-sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
    s, h, body = http("POST", e.url + "/v1/messages", msg)
    assert s == 200 and json.loads(body)["type"] == "message"
    answers.append((h, body))
    s, h, body = http("POST", e.url + "/v1/messages", {**msg, "stream": True})
    assert s == 200 and b"message_delta" in body
    answers.append((h, body))
    ant = [r for r in mock.received() if r["dialect"] == "anthropic"]
    assert len(ant) == 2, ant
    assert [r["headers"]["anthropic-version"] for r in ant] == ["2023-06-01"] * 2
    assert all(r["key"] in ("sk-ant-1", "sk-ant-2") for r in ant), ant
    assert not any("authorization" in r["headers"] for r in ant)
    wait_until(lambda: counters(e, "claude-1")["requests"] + counters(e, "claude-2")["requests"] == 2, what="recorded")
    c1, c2 = counters(e, "claude-1"), counters(e, "claude-2")
    assert (c1["input_tokens"] + c2["input_tokens"], c1["output_tokens"] + c2["output_tokens"]) == (22, 10)
    assert c1["streams"] + c2["streams"] == 1

    # Gemini native: x-goog-api-key; usageMetadata in JSON and in the stream.
    gen = {"contents": [{"parts": [{"text": "Hi"}]}]}
    s, h, body = http("POST", e.url + "/v1beta/models/gemini-2.0-flash:generateContent", gen)
    assert s == 200
    answers.append((h, body))
    s, h, body = http("POST", e.url + "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", gen)
    assert s == 200 and b"usageMetadata" in body
    answers.append((h, body))
    gem = [r for r in mock.received() if r["dialect"] == "gemini"]
    assert [(r["key"], r["headers"].get("x-goog-api-key")) for r in gem] == [("gm-key-1", "gm-key-1")] * 2
    g = settled(e, "gemini-1", 2)
    assert (g["input_tokens"], g["output_tokens"], g["total_tokens"]) == (22, 10, 32)

    # Gemini's OpenAI-compatible endpoint, chosen through the models table.
    s, h, body = http("POST", e.url + "/v1/chat/completions", {"model": "gemini-2.0-flash", "messages": []})
    assert s == 200 and h["x-apikeyrouter-key-id"] == "gemini-oa-1"
    answers.append((h, body))
    last = mock.received()[-1]
    assert (last["dialect"], last["path"], last["key"]) == ("gemini_openai", "/v1beta/openai/chat/completions", "gm-key-2")

    # No provider's key material ever went to another dialect, nor to the client:
    # each request carries one key of its own dialect, in that dialect's
    # header only, and no other key anywhere in its headers.
    received = mock.received()
    assert [r["dialect"] for r in received] == ["openai"] * 4 + ["anthropic"] * 2 + ["gemini"] * 2 + ["gemini_openai"]
    auth_headers = {name for name, _ in AUTH_HEADER.values()}
    for r in received:
        assert r["key"] in DIALECT_KEYS[r["dialect"]], r
        name, scheme = AUTH_HEADER[r["dialect"]]
        assert r["headers"][name] == scheme + r["key"], r
        assert not (auth_headers - {name}) & set(r["headers"]), r
        everything_sent = json.dumps(r["headers"])
        assert [k for k in KEYS if k != r["key"] and k in everything_sent] == [], r
    assert len(answers) == 9
    for h, body in answers:
        assert not [k for k in KEYS if k in json.dumps(h) or k.encode() in body], (h, body)


def test_when_every_key_of_a_provider_is_cooling_the_next_provider_serves(gateway):
    mock, e = gateway
    for k in ["sk-openai-1", "sk-openai-2"]:
        mock.behavior(k, status=429, times=1, headers={"retry-after": "600"})
    # The first request finds OpenAI's keys rate limited one after the other,
    # and falls over to Azure (tests/test_fallover.py).
    first = http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []})
    assert first[0] == 200 and first[1]["x-apikeyrouter-key-id"] == "azure-1"
    assert {k["state"] for k in (e.key_counters()["openai-1"], e.key_counters()["openai-2"])} == {"throttled"}
    # From then on gpt-4o goes to Azure at once, under its deployment name.
    s, h, body = http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []})
    assert s == 200 and h["x-apikeyrouter-key-id"] == "azure-1" and "x-apikeyrouter-chain" not in h
    assert [r["dialect"] for r in mock.received()] == ["openai", "openai", "azure", "azure"]
    last = mock.received()[-1]
    assert last["dialect"] == "azure"
    assert last["path"] == "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
    assert last["headers"]["api-key"] == "az-key-1" and "authorization" not in last["headers"]
    assert json.loads(last["body"])["model"] == "gpt4o-prod"
    assert json.loads(body)["model"] == "gpt4o-prod"


def test_azure_retry_after_ms_sets_the_cooldown(gateway):
    mock, e = gateway
    for k in ["sk-openai-1", "sk-openai-2"]:
        mock.behavior(k, status=429, times=1, headers={"retry-after": "600"})
    assert http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []})[0] == 200
    mock.behavior("az-key-1", status=429, times=1, headers={"x-ms-retry-after-ms": "1500"})
    t0 = now_ms()
    s, _, body = http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []})
    t1 = now_ms()
    assert s == 429 and json.loads(body)["error"]["code"] == "no_available_key"
    # OpenAI's keys are cooling: nothing to fall over to.
    assert [r["dialect"] for r in mock.received()] == ["openai", "openai", "azure", "azure"]
    # The cooldown may be over before the admin API is asked: its deadline
    # comes from the attempt stage's log line, which says how long it is.
    pattern = re.compile(r"key azure-1 answered 429: cooling until (\d+) \((\d+) ms\)")
    wait_until(lambda: pattern.search(e.logs()), what="azure-1's cooldown in the log")
    [(until, ms)] = [(int(u), int(m)) for u, m in pattern.findall(e.logs())]
    assert ms == 1500 and t0 + 1500 <= until <= t1 + 1500, (t0, until, t1)
    az = e.key_counters()["azure-1"]["counters"]
    assert (az["requests"], az["rate_limited"], az["cooldowns"]) == (2, 1, 1)


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
    reset_at = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) + datetime.timedelta(minutes=10)
    reset_ms = int(reset_at.timestamp()) * 1000
    for k in ("sk-ant-1", "sk-ant-2"):
        mock.behavior(k, status=429, times=1, headers={
            "anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-reset": reset_at.strftime("%Y-%m-%dT%H:%M:%SZ")})
    msg = {"model": "claude-3-5-sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
    t0 = now_ms()
    s, h, body = http("POST", e.url + "/v1/messages", msg)
    t1 = now_ms()
    assert s == 429 and json.loads(body)["error"]["code"] == "no_available_key"
    # Whole seconds (at least 1) from the answer, made within [t0, t1], to the reset.
    fewest, most = (max(1, math.ceil((reset_ms - t) / 1000)) for t in (t1, t0))
    assert fewest <= int(h["retry-after"]) <= most, (fewest, h["retry-after"], most)
    for k in ("claude-1", "claude-2"):
        c = e.key_counters()[k]
        assert c["state"] == "throttled" and c["cooldown_until_ms"] == reset_ms, c


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
