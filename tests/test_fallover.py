"""Falling over to the next provider inside the same request, through real
Envoy (envoy/providers-mock.yaml) against the dialect mock: when a provider
has no key left for the request, the attempt stage turns its last failing
answer into a 307 that Envoy follows internally (the route's
internal_redirect_policy), and the ingress stage takes the request over as its
next hop: next provider, its model name, path and auth, re-priced."""

import hashlib
import json
from decimal import Decimal

import pytest

import harness
from harness import ROOT, budget_of, hcm, http, raw_request, wait_until

# The dialect mock and Envoy with envoy/providers-mock.yaml, as the providers tests use them.
from test_providers import KEYS, dialects, gateway  # noqa: F401

AZURE_PATH = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
OPENAI_KEYS = ["sk-openai-1", "sk-openai-2"]
CLIENT_KEY = "vk-openai-only"


def plugin():
    """The plugin configuration of envoy/providers-mock.yaml, to change."""
    cfg = harness.render((ROOT / "envoy" / "providers-mock.yaml").read_text(), 1, 2, 3)
    return json.loads(hcm(cfg)["http_filters"][0]["typed_config"]["config"]["configuration"]["value"])


@pytest.fixture
def start(dialects, start_envoy, monkeypatch):  # noqa: F811
    """Envoy with envoy/providers-mock.yaml and its plugin configuration as `change` leaves it."""
    monkeypatch.setattr(harness, "DEMO_CONFIG", ROOT / "envoy" / "providers-mock.yaml")

    def go(change=None, edit=None):
        p = plugin()
        if change:
            change(p)
        return start_envoy(dialects, plugin=p, edit=edit)
    return go


def fail_all(mock, keys, status, headers=None):
    for k in keys:
        mock.behavior(k, status=status, times=1, headers=headers or {})


def chain_of(h):
    """The chain header with the order of a provider's keys left out."""
    return [(hop.split(":")[0], sorted(hop.split(": ")[1].split(", "))) for hop in h["x-apikeyrouter-chain"].split(" -> ")]


def test_when_every_openai_key_answers_429_the_same_request_is_answered_by_azure(gateway):  # noqa: F811
    mock, e = gateway
    fail_all(mock, OPENAI_KEYS, 429, {"retry-after": "600"})
    s, h, body = http("POST", e.url + "/v1/chat/completions", CHAT)
    assert s == 200, body
    assert h["x-apikeyrouter-key-id"] == "azure-1"
    assert json.loads(body)["model"] == "gpt4o-prod"
    got = mock.received()
    assert [r["dialect"] for r in got] == ["openai", "openai", "azure"]
    last = got[-1]
    assert last["path"] == AZURE_PATH
    assert last["headers"]["api-key"] == "az-key-1"
    assert not {"authorization", "openai-organization", "x-envoy-original-url"} & set(last["headers"]), last
    assert json.loads(last["body"])["model"] == "gpt4o-prod"
    assert chain_of(h) == [("openai", ["openai-1 429", "openai-2 429"]), ("azure", ["azure-1 200"])]
    # One caller request, one answer; the fall-over is counted per provider pair.
    wait_until(lambda: e.stats("fallover").get("wasmcustom.apikeyrouter.fallover.openai.azure") == "1",
               what="the fall-over counted")
    # The access log: Envoy logs the first pass as an internal redirect; the
    # hop's outcome names the provider that served and the chain.
    def logged():
        lines = [json.loads(x) for x in e.logs().splitlines() if x.startswith('{"apikeyrouter"')]
        return {x["status"]: x for x in lines} if len(lines) >= 2 else None
    wait_until(logged, what="both passes logged")
    assert logged()[307]["response_code_details"] == "internal_redirect"
    outcome = json.loads(logged()[200]["apikeyrouter"])
    assert (outcome["provider"], outcome["key_id"], outcome["attempts"]) == ("azure", "azure-1", 3), outcome
    assert outcome["chain"] == h["x-apikeyrouter-chain"], outcome
    # The serving attempt's decision record carries the chain too.
    def recorded():
        status, _, body = e.admin_api("GET", "decisions?limit=20")
        assert status == 200, body
        return [d for d in json.loads(body)["decisions"] if d.get("key") == "azure-1"]
    wait_until(recorded, what="the serving decision recorded")
    assert recorded()[0]["chain"] == h["x-apikeyrouter-chain"]


def test_a_stream_falls_over_before_its_first_byte(gateway):  # noqa: F811
    mock, e = gateway
    fail_all(mock, OPENAI_KEYS, 429, {"retry-after": "600"})
    s, h, body = http("POST", e.url + "/v1/chat/completions", {**CHAT, "stream": True})
    assert s == 200 and h["content-type"] == "text/event-stream", body
    assert h["x-apikeyrouter-key-id"] == "azure-1" and body.endswith(b"data: [DONE]\n\n"), body
    assert b'"model": "gpt4o-prod"' in body
    last = mock.received()[-1]
    assert (last["dialect"], last["path"], last["headers"]["api-key"]) == ("azure", AZURE_PATH, "az-key-1")
    assert json.loads(last["body"])["stream"] is True
    wait_until(lambda: e.key_counters()["azure-1"]["counters"]["streams"] == 1, what="the stream recorded")


def test_when_every_openai_key_answers_503_azure_answers(gateway):  # noqa: F811
    mock, e = gateway
    fail_all(mock, OPENAI_KEYS, 503)
    s, h, body = http("POST", e.url + "/v1/chat/completions", CHAT)
    assert s == 200 and h["x-apikeyrouter-key-id"] == "azure-1", body
    assert [r["dialect"] for r in mock.received()] == ["openai", "openai", "azure"]
    assert chain_of(h) == [("openai", ["openai-1 503", "openai-2 503"]), ("azure", ["azure-1 200"])]
    # A 5xx is not the key's fault: OpenAI's keys stay available.
    assert {e.key_counters()[k]["state"] for k in ("openai-1", "openai-2")} == {"available"}


def test_the_chain_goes_on_to_a_third_openai_compatible_provider_once(start, dialects):
    def three(p):
        p["models"]["gpt-4o"].append({"provider": "gemini_openai", "model": "gemini-2.0-flash"})
    e = start(three)
    fail_all(dialects, OPENAI_KEYS + ["az-key-1"], 429, {"retry-after": "600"})
    s, h, body = http("POST", e.url + "/v1/chat/completions", CHAT)
    assert s == 200 and h["x-apikeyrouter-key-id"] == "gemini-oa-1", body
    got = dialects.received()
    assert [r["dialect"] for r in got] == ["openai", "openai", "azure", "gemini_openai"]
    last = got[-1]
    assert (last["path"], last["headers"]["authorization"]) == ("/v1beta/openai/chat/completions", "Bearer gm-key-2")
    assert "api-key" not in last["headers"] and json.loads(last["body"])["model"] == "gemini-2.0-flash"
    assert chain_of(h) == [("openai", ["openai-1 429", "openai-2 429"]), ("azure", ["azure-1 429"]),
                           ("gemini_openai", ["gemini-oa-1 200"])]
    wait_until(lambda: e.stats("fallover").get("wasmcustom.apikeyrouter.fallover.azure.gemini_openai") == "1",
               what="the second fall-over counted")


def test_when_every_provider_fails_the_caller_gets_the_last_answer_and_the_soonest_retry_after(gateway):  # noqa: F811
    mock, e = gateway
    fail_all(mock, OPENAI_KEYS, 429, {"retry-after": "5"})
    mock.behavior("az-key-1", status=429, times=1, headers={"retry-after": "600"})
    s, h, body = http("POST", e.url + "/v1/chat/completions", CHAT)
    # One pass: OpenAI, then Azure, never OpenAI again.
    assert [r["dialect"] for r in mock.received()] == ["openai", "openai", "azure"]
    assert s == 429 and json.loads(body)["error"]["code"] == "no_available_key", body
    # Azure's key is cooling for 600 s, OpenAI's for 5: the soonest wins.
    assert 1 <= int(h["retry-after"]) <= 5, h
    assert chain_of(h) == [("openai", ["openai-1 429", "openai-2 429"]), ("azure", ["azure-1 429"])]


def test_a_caller_whose_policy_excludes_azure_gets_the_429(start, dialects):
    def client(p):
        p["clients"] = [{"id": "narrow", "key_sha256": hashlib.sha256(CLIENT_KEY.encode()).hexdigest(),
                         "allowed_providers": ["openai"]}]
    e = start(client)
    fail_all(dialects, OPENAI_KEYS, 429, {"retry-after": "600"})
    s, h, body = http("POST", e.url + "/v1/chat/completions", CHAT, {"authorization": f"Bearer {CLIENT_KEY}"})
    assert s == 429, body
    assert "x-apikeyrouter-chain" not in h and "location" not in h
    assert [r["dialect"] for r in dialects.received()] == ["openai", "openai"]


def priced(openai, azure, limit):
    """A change to the plugin: flat key prices (per 1,000 tokens) per provider and a hard budget b."""
    def change(p):
        for prov in p["providers"]:
            for k in prov["keys"]:
                k["cost_per_1k"] = {"openai": openai, "azure": azure}.get(prov["id"], "5")
        p["budgets"] = [{"id": "b", "window": "day", "limit": limit}]
    return change


def test_the_budget_is_charged_once_at_the_serving_providers_price(start, dialects):
    e = start(priced(openai="1", azure="2", limit="100"))
    fail_all(dialects, OPENAI_KEYS, 429, {"retry-after": "600"})
    s, h, body = http("POST", e.url + "/v1/chat/completions", CHAT)
    assert s == 200 and h["x-apikeyrouter-key-id"] == "azure-1", body
    tokens = json.loads(body)["usage"]["total_tokens"]
    wait_until(lambda: budget_of(e, "b")["reserved"] == "0", what="the reservation settled")
    b = budget_of(e, "b")
    assert Decimal(b["spent"]) == Decimal(tokens) * 2 / 1000, b
    assert b["requests"] == 1, b


def test_a_hard_budget_the_next_provider_would_exceed_refuses_before_it_is_called(start, dialects):
    e = start(priced(openai="0.001", azure="1000", limit="1"))
    fail_all(dialects, OPENAI_KEYS, 429, {"retry-after": "600"})
    s, h, body = http("POST", e.url + "/v1/chat/completions", CHAT)
    assert s == 429 and json.loads(body)["error"]["code"] == "insufficient_quota", body
    assert [r["dialect"] for r in dialects.received()] == ["openai", "openai"]
    wait_until(lambda: budget_of(e, "b")["reserved"] == "0", what="nothing left reserved")
    assert budget_of(e, "b")["spent"] == "0"


def test_a_provider_whose_keys_own_budgets_have_no_room_sends_the_request_to_the_next_one(start, dialects):
    def change(p):
        priced(openai="1", azure="2", limit="100")(p)
        # Each OpenAI key has a budget of its own, too small for any request.
        p["budgets"] += [{"id": f"cap-{k}", "limit": "0.000001", "scope": {"key": k}}
                         for k in ("openai-1", "openai-2")]
    e = start(change)
    s, h, body = http("POST", e.url + "/v1/chat/completions", CHAT)
    assert s == 200 and h["x-apikeyrouter-key-id"] == "azure-1", body
    # Chosen at the ingress stage: OpenAI never saw the request.
    assert [r["dialect"] for r in dialects.received()] == ["azure"]
    wait_until(lambda: budget_of(e, "b")["reserved"] == "0", what="the reservation settled")
    tokens = json.loads(body)["usage"]["total_tokens"]
    assert Decimal(budget_of(e, "b")["spent"]) == Decimal(tokens) * 2 / 1000


def test_no_fall_over_after_the_first_streamed_byte(gateway):  # noqa: F811
    mock, e = gateway
    for k in OPENAI_KEYS:
        mock.behavior(k, cut_stream=True, times=1)
    req = json.dumps({**CHAT, "stream": True}).encode()
    raw = raw_request(e.gateway_port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(req), req))
    # The caller had the answer's headers and first event: the stream is cut,
    # not replaced by another provider's.
    assert raw.startswith(b"HTTP/1.1 200") and b"x-apikeyrouter-key-id: openai-" in raw, raw
    assert b'"content":"H"' in raw and b"[DONE]" not in raw, raw
    assert [r["dialect"] for r in mock.received()] == ["openai"]


def test_without_the_routes_redirect_policy_the_caller_gets_the_providers_answer(start, dialects):
    def no_redirects(cfg):
        for vh in hcm(cfg)["route_config"]["virtual_hosts"]:
            for r in vh["routes"]:
                r.get("route", {}).pop("internal_redirect_policy", None)
    e = start(edit=no_redirects)
    fail_all(dialects, OPENAI_KEYS, 429, {"retry-after": "600"})
    s, h, body = http("POST", e.url + "/v1/chat/completions", CHAT)
    assert s == 429 and "location" not in h and "x-apikeyrouter-fallover" not in h, (h, body)
    assert json.loads(body)["error"]["message"] == "mock error"
    assert [r["dialect"] for r in dialects.received()] == ["openai", "openai"]
    # The request was let go: nothing stays reserved, the next one is served.
    s, h, _ = http("POST", e.url + "/v1/chat/completions", CHAT)
    assert s == 200 and h["x-apikeyrouter-key-id"] == "azure-1"


def test_when_the_routes_retries_are_used_up_the_next_provider_answers(start, dialects):
    def no_retries(cfg):
        for vh in hcm(cfg)["route_config"]["virtual_hosts"]:
            for r in vh["routes"]:
                if "retry_policy" in r.get("route", {}):
                    r["route"]["retry_policy"]["num_retries"] = 0
    e = start(edit=no_retries)
    fail_all(dialects, OPENAI_KEYS, 503)
    s, h, body = http("POST", e.url + "/v1/chat/completions", CHAT)
    # OpenAI's other key was never tried: Envoy had no retry left for it.
    assert s == 200 and h["x-apikeyrouter-key-id"] == "azure-1", body
    assert [r["dialect"] for r in dialects.received()] == ["openai", "azure"]
    assert chain_of(h)[1] == ("azure", ["azure-1 200"])
