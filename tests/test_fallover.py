"""Falling over to the next provider inside the same request, through real
Envoy (envoy/providers-mock.yaml) against the dialect mock: the attempt stage
turns the last answer of a provider with no key left into a 307 that Envoy
follows internally (internal_redirect_policy), and the ingress stage takes the
request over as its next hop."""

import json

from harness import http

# The dialect mock and Envoy with envoy/providers-mock.yaml, as the providers tests use them.
from test_providers import KEYS, dialects, gateway  # noqa: F401

AZURE_PATH = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"


def test_when_every_openai_key_answers_429_the_same_request_is_answered_by_azure(gateway):
    mock, e = gateway
    for k in ["sk-openai-1", "sk-openai-2"]:
        mock.behavior(k, status=429, times=1, headers={"retry-after": "600"})
    s, h, body = http("POST", e.url + "/v1/chat/completions", {"model": "gpt-4o", "messages": []})
    assert s == 200, body
    assert h["x-apikeyrouter-key-id"] == "azure-1"
    got = mock.received()
    assert [r["dialect"] for r in got] == ["openai", "openai", "azure"]
    last = got[-1]
    assert last["path"] == AZURE_PATH
    assert last["headers"]["api-key"] == "az-key-1" and "authorization" not in last["headers"]
    assert json.loads(last["body"])["model"] == "gpt4o-prod"
    assert h["x-apikeyrouter-chain"] == "openai: openai-1 429, openai-2 429 -> azure: azure-1 200" or \
        h["x-apikeyrouter-chain"] == "openai: openai-2 429, openai-1 429 -> azure: azure-1 200", h
