"""Tenants through real Envoy (issue 17), from the hostile caller's side:
a key's own headers stay with that key, a model name cannot steer the
provider's path, only allowed headers and endpoints reach the provider."""

from harness import chat, http, plugin_with_keys, secrets


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
