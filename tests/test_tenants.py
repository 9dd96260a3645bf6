"""Tenants through real Envoy (issue 17), from the hostile caller's side:
a key's own headers stay with that key, a model name cannot steer the
provider's path, only allowed headers and endpoints reach the provider, a
request id of the caller's choosing cannot join another request's books,
and only a key's own failure changes the key."""

import json
import time
from decimal import Decimal

import pytest

import harness
from harness import (DIALECTS, ROOT, budget_of, chat, expected_spend, hcm, http, open_stream, plugin_with_keys,
                     priced, secrets, sha256_hex, wait_until)

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


def outcomes(e, request_id):
    """The filter's outcome in every access-log line of `request_id`."""
    found = []
    for line in e.logs().splitlines():
        if line.startswith("{") and request_id in line:
            entry = json.loads(line)
            if entry.get("request_id") == request_id and entry.get("apikeyrouter") not in (None, "-"):
                found.append(json.loads(entry["apikeyrouter"]))
    return found


def test_two_requests_with_the_same_caller_chosen_request_id_are_accounted_separately(mock3, start_envoy):
    # One worker: both requests meet in one VM's table of requests in flight.
    # Envoy 1.40 trusts no caller's x-request-id by default (the shipped
    # configs replace it); a gateway told to keep external ids is the
    # attacker's best case, and the provider receiving the chosen id below
    # shows it was kept.
    def keep_callers_ids(cfg):
        hcm(cfg)["preserve_external_request_id"] = True
    e = start_envoy(mock3, plugin=priced(secrets(3)), concurrency=1, edit=keep_callers_ids)
    same = {"x-request-id": "chosen-by-the-caller"}
    # The first attempt answers 429: the stream is served by its retry.
    mock3.behavior("*", status=429, times=1, headers={"retry-after": "30"})
    mock3.control("/_mock/stream", {"chunks": 4, "gate": True, "gate_after": 1})
    streamed = {"model": "gpt-4o-mini", "stream": True,
                "messages": [{"role": "user", "content": "a longer prompt than the other " * 10}]}
    conn, resp = open_stream(e.url, streamed, headers=same)
    try:
        assert resp.status == 200
        assert (resp.getheader("x-request-id"), resp.getheader("x-apikeyrouter-attempts")) == (same["x-request-id"], "2")
        assert resp.readline().startswith(b"data: "), "the stream is held open after its first event"
        # While it is in flight, the same id again.
        status, headers, _ = chat(e.url, content="short", headers=same)
        assert status == 200 and headers["x-request-id"] == same["x-request-id"]
        own_cost = Decimal(headers["x-apikeyrouter-cost"])
    finally:
        mock3.control("/_mock/release", {})
    rest = resp.read()
    conn.close()
    assert b'"usage"' in rest and rest.rstrip().endswith(b"data: [DONE]")
    assert [r["headers"].get("x-request-id") for r in mock3.received()] == [same["x-request-id"]] * 3

    wait_until(lambda: budget_of(e, "b")["requests"] == 2 and budget_of(e, "b")["reserved"] == "0",
               what="both requests settled")
    spent = Decimal(budget_of(e, "b")["spent"])
    assert spent == expected_spend(mock3), "each charged its own usage: the sum"
    stream_cost = spent - own_cost
    assert 0 < own_cost < stream_cost
    wait_until(lambda: len(outcomes(e, same["x-request-id"])) == 2, what="two access-log lines")
    logged = sorted((o["attempts"], Decimal(o["cost"]), o["charged"]) for o in outcomes(e, same["x-request-id"]))
    assert logged == [(1, own_cost, "usage"), (2, stream_cost, "usage")]

    def records():
        _, _, body = e.admin_api("GET", "decisions?limit=100")
        return sorted((d["attempt"], d["charged"] or "-") for d in json.loads(body)["decisions"]
                      if d["request_id"] == same["x-request-id"])
    wait_until(lambda: len(records()) == 3, what="three decision records")
    assert records() == [(1, "-"), (1, "usage"), (2, "usage")], "the 429, the short request, the stream's retry"
# --- Only a key's own failure changes the key (point 2) ----------------------


def key_states(e):
    return {k: c["state"] for k, c in e.key_counters().items()}


def key_transitions(e):
    status, _, body = e.admin_api("GET", "transitions?limit=50")
    assert status == 200, body
    return [(t["id"], t["from"], t["to"], t["reason"]) for t in json.loads(body)["transitions"] if t["kind"] == "key"]


def test_a_caller_asking_for_a_model_no_project_may_use_cannot_take_keys_offline(mock3, start_envoy):
    """The measured attack: each 403 used to disable a key and be retried on
    the next, so four requests left every key disabled and other callers
    unserved. Now the 403 goes back to its caller after one attempt."""
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys))
    mock3.control("/_mock/models", {k: ["gpt-4o-mini"] for k in keys})
    for i in range(4):
        status, headers, body = chat(e.url, content=f"hostile {i}", extra={"model": "o1-pro"})
        assert (status, headers["x-apikeyrouter-attempts"]) == (403, "1"), body
        assert json.loads(body)["error"]["code"] == "model_not_found"
        assert "x-apikeyrouter-retry" not in headers
    assert len(mock3.received()) == 4, "no request was retried on another key"
    assert key_states(e) == {"k1": "available", "k2": "available", "k3": "available"}
    assert key_transitions(e) == []
    # Every other caller is served, by every key.
    served = [chat(e.url, content=f"other {i}") for i in range(10)]
    assert [s for s, _, _ in served] == [200] * 10
    assert {h["x-apikeyrouter-key-id"] for _, h, _ in served} == {"k1", "k2", "k3"}


def test_an_upstream_cannot_ask_the_gateway_for_a_retry(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys))
    for k in keys:
        mock3.behavior(k, status=400, headers={"x-apikeyrouter-retry": "another-key", "x-apikeyrouter-cost": "0"},
                       body={"error": {"message": "bad", "type": "invalid_request_error", "code": None}})
    status, headers, _ = chat(e.url)
    assert (status, headers["x-apikeyrouter-attempts"]) == (400, "1")
    assert "x-apikeyrouter-retry" not in headers and "x-apikeyrouter-cost" not in headers
    assert len(mock3.received()) == 1


def test_a_key_whose_own_organization_is_wrong_is_disabled_and_the_request_served_by_another(mock3, start_envoy):
    keys = secrets(2)
    plugin = plugin_with_keys(keys)
    plugin["providers"][0]["keys"][0]["headers"] = {"OpenAI-Organization": "org-stale"}
    e = start_envoy(mock3, plugin=plugin)
    mock3.control("/_mock/organizations", {k: "org-real" for k in keys})
    for i in range(4):
        status, headers, body = chat(e.url, content=f"request {i}")
        assert status == 200 and headers["x-apikeyrouter-key-id"] == "k2", body
        if key_states(e)["k1"] == "disabled":
            break
    k1 = e.key_counters()["k1"]
    assert (k1["state"], k1["state_reason"]) == ("disabled", "provider answered 401"), k1
    assert [r["status"] for r in mock3.received() if r["key"] == keys[0]] == [401]


def test_each_dialects_bad_key_answer_disables_that_key_and_the_request_is_served_by_another(
        start_mock, start_envoy, monkeypatch):
    bad = {"sk-openai-1", "az-key-1", "sk-ant-1", "gm-key-1", "gm-key-2"}
    mock = start_mock([k for k in DIALECT_KEYS if k not in bad], script=DIALECTS)
    monkeypatch.setattr(harness, "DEMO_CONFIG", ROOT / "envoy" / "providers-mock.yaml")
    e = start_envoy(mock)
    msg = {"model": "claude-3-5-sonnet", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
    calls = [
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}, "openai-1"),
        ("/v1/messages", msg, "claude-1"),
        ("/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
         {"messages": [{"role": "user", "content": "Hi"}]}, "azure-1"),
        ("/v1beta/models/gemini-2.0-flash:generateContent", {"contents": [{"parts": [{"text": "Hi"}]}]}, "gemini-1"),
        ("/v1beta/openai/chat/completions", {"model": "gemini-2.0-flash", "messages": []}, "gemini-oa-1"),
    ]
    for path, body, key_id in calls:
        for _ in range(3):
            http("POST", e.url + path, body)
            if key_states(e)[key_id] == "disabled":
                break
        assert key_states(e)[key_id] == "disabled", (key_id, e.key_counters()[key_id])
    # Where the provider has another key, it serves; every good key stays.
    for path, body in [("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}), ("/v1/messages", msg)]:
        for _ in range(3):
            s, h, b = http("POST", e.url + path, body)
            assert s == 200, (path, s, b)
    states = key_states(e)
    assert {k for k, s in states.items() if s != "available"} == {
        "openai-1", "claude-1", "azure-1", "gemini-1", "gemini-oa-1"}, states


def test_a_disabled_key_is_probed_with_one_request_and_serves_again_once_it_works(mock3, start_envoy):
    keys = secrets(2)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys, probe_disabled_after_seconds=1))
    mock3.behavior(keys[0], status=401, times=None)
    for i in range(3):
        assert chat(e.url, content=f"first {i}")[0] == 200
    assert key_states(e)["k1"] == "disabled"
    to_k1 = lambda: [r for r in mock3.received() if r["key"] == keys[0]]  # noqa: E731
    assert len(to_k1()) == 1

    # Still bad: one probe, which fails; its request is served by k2.
    time.sleep(1.2)
    for i in range(4):
        status, _, _ = chat(e.url, content=f"probe {i}")
        assert status == 200
    assert len(to_k1()) == 2, "one probe, not one per request"
    assert key_states(e)["k1"] == "disabled"
    assert ("k1", "disabled/abundant", "disabled/abundant", "half-open probe: provider answered 401") \
        in key_transitions(e)

    # Fixed: the next probe re-enables it.
    mock3.behavior(keys[0], status=200)
    time.sleep(1.2)
    for i in range(4):
        assert chat(e.url, content=f"again {i}")[0] == 200
        if key_states(e)["k1"] == "available":
            break
    assert key_states(e)["k1"] == "available"
    assert ("k1", "disabled/abundant", "available/abundant", "half-open probe: provider answered 200") \
        in key_transitions(e)
    served = {chat(e.url, content=f"after {i}")[1]["x-apikeyrouter-key-id"] for i in range(4)}
    assert served == {"k1", "k2"}


def test_a_callers_key_in_the_query_string_never_reaches_the_provider(providers_gateway):
    mock, e = providers_gateway
    gen = {"contents": [{"parts": [{"text": "Hi"}]}]}
    s, _, body = http("POST", e.url + "/v1beta/models/gemini-2.0-flash:generateContent?key=AIzaJUNK&alt=json", gen)
    assert s == 200, body
    [r] = mock.received()
    assert (r["path"], r["key"]) == ("/v1beta/models/gemini-2.0-flash:generateContent?alt=json", "gm-key-1"), r
