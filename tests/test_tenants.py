"""Tenants through real Envoy (issue 17), from the hostile caller's side:
a key's own headers stay with that key, a model name cannot steer the
provider's path, only allowed headers and endpoints reach the provider."""

import pytest

import harness
from harness import DIALECTS, ROOT, chat, http, plugin_with_keys, secrets, sha256_hex

DIALECT_KEYS = ["sk-openai-1", "sk-openai-2", "az-key-1", "sk-ant-1", "sk-ant-2", "gm-key-1", "gm-key-2"]


@pytest.fixture
def providers_gateway(start_mock, start_envoy, monkeypatch):
    """envoy/providers-mock.yaml (OpenAI, Azure, Anthropic, Gemini) against the dialect mock."""
    mock = start_mock(DIALECT_KEYS, script=DIALECTS)
    monkeypatch.setattr(harness, "DEMO_CONFIG", ROOT / "envoy" / "providers-mock.yaml")
    return mock, start_envoy(mock)


def test_a_retry_on_another_key_never_carries_the_previous_keys_headers(mock3, start_envoy):
    keys = secrets(2)
    plugin = plugin_with_keys(keys)
    plugin["providers"][0]["keys"][0]["headers"] = {"OpenAI-Organization": "org-of-k1"}
    e = start_envoy(mock3, plugin=plugin)
    mock3.behavior(keys[0], status=429, headers={"retry-after": "300"})
    retried = []
    for i in range(6):
        status, headers, _ = chat(e.url, content=f"request {i}")
        assert status == 200
        if headers["x-apikeyrouter-attempts"] == "2":
            retried.append(headers)
            break
    assert retried, "no request met k1's 429"
    received = mock3.received()
    k1 = [r for r in received if r["key"] == keys[0]]
    k2 = [r for r in received if r["key"] == keys[1]]
    assert k1 and all(r["headers"].get("openai-organization") == "org-of-k1" for r in k1)
    assert k2 and not any("openai-organization" in r["headers"] for r in k2), k2


def test_a_model_name_that_would_steer_the_azure_path_gets_400_and_the_provider_sees_nothing(providers_gateway):
    mock, e = providers_gateway
    evil = "gpt-4o/../../other-deployment/chat/completions?"
    for path in ["/v1/chat/completions", "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"]:
        s, _, body = http("POST", e.url + path, {"model": evil, "messages": []})
        assert s == 400 and b"invalid_model" in body, (path, s, body)
    s, _, _ = http("POST", e.url + "/v1/chat/completions", {"model": "a" * 300, "messages": []})
    assert s == 400
    assert mock.received() == []
    # A legitimate name is still served.
    s, _, _ = http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []})
    assert s == 200


def test_a_callers_bogus_organization_never_reaches_the_provider_and_keys_stay_available(mock3, start_envoy):
    e = start_envoy(mock3, plugin=plugin_with_keys(secrets(3)))
    hostile = {"OpenAI-Organization": "org-bogus", "OpenAI-Project": "proj-bogus", "Cookie": "c=1",
               "x-stainless-lang": "python", "OpenAI-Beta": "assistants=v2"}
    for i in range(4):
        status, _, _ = chat(e.url, content=f"hostile {i}", headers=hostile)
        assert status == 200
    received = mock3.received()
    assert len(received) == 4
    for r in received:
        assert not {"openai-organization", "openai-project", "cookie"} & set(r["headers"]), r["headers"]
        assert r["headers"].get("x-stainless-lang") == "python" and r["headers"].get("openai-beta") == "assistants=v2"
    assert {k["state"] for k in e.key_counters().values()} == {"available"}
    # Another caller is still served.
    assert chat(e.url)[0] == 200


def test_a_client_without_the_files_endpoint_gets_403_and_the_provider_sees_nothing(mock3, start_envoy):
    plugin = plugin_with_keys(secrets(3))
    plugin["clients"] = [{"id": "app", "key_sha256": sha256_hex("vk-app")},
                         {"id": "ops", "key_sha256": sha256_hex("vk-ops"), "allowed_endpoints": ["files", "files/*"]}]
    e = start_envoy(mock3, plugin=plugin)
    app = {"authorization": "Bearer vk-app"}
    for method, path in [("GET", "/v1/files"), ("DELETE", "/v1/files/file-1"), ("GET", "/v1/chat/completions"),
                         ("GET", "/v1/responses/resp_1"), ("POST", "/v1/batches")]:
        s, _, body = http(method, e.url + path, headers=app)
        assert s == 403 and b"endpoint_not_allowed" in body, (method, path, s, body)
    assert mock3.received() == []
    assert chat(e.url, headers=app)[0] == 200
    # A client whose policy lists files reaches them.
    s, _, _ = http("GET", e.url + "/v1/files", headers={"authorization": "Bearer vk-ops"})
    assert s != 403 and len(mock3.received()) == 2


def test_a_caller_cannot_set_its_own_retries_or_hedging_through_envoy_headers(mock3, start_envoy):
    # Envoy's router honours x-envoy-* request headers: with them a caller
    # could retry a 400 on every key, or hedge parallel attempts that the
    # provider bills and the gateway never charges. The ingress stage strips
    # them before the router reads them.
    e = start_envoy(mock3, plugin=plugin_with_keys(secrets(3)))
    for key in secrets(3):
        mock3.behavior(key, status=400)
    hostile = {"x-envoy-retry-on": "retriable-status-codes,5xx", "x-envoy-retriable-status-codes": "400",
               "x-envoy-max-retries": "5", "x-envoy-upstream-rq-per-try-timeout-ms": "1",
               "x-envoy-hedge-on-per-try-timeout": "true"}
    status, headers, _ = chat(e.url, headers=hostile)
    assert (status, headers.get("x-apikeyrouter-attempts")) == (400, "1")
    received = mock3.received()
    assert len(received) == 1, [r["key"] for r in received]
    assert not any(k.startswith("x-envoy-") and k != "x-envoy-attempt-count" for k in received[0]["headers"]), \
        received[0]["headers"]
