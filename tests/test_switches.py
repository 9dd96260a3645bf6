"""Config switches in their non-default state, through real Envoy:
`inject_stream_usage: false`, `decisions.header: false`,
`decisions.ring_size: 0`, `admin.enabled: false` and a custom
`admin.prefix`. Each is set against the same gateway that, without it,
behaves otherwise (the default case is run alongside where it is cheap)."""

import http.client as httpclient
import json
import re

import pytest

from harness import (ADMIN_TOKEN, assert_no_trap, chat, http, ids_by_secret, open_stream, plugin_with_keys, secrets,
                     wait_recorded, wait_until, wasm_failure_stats)

# A streaming request exactly as a caller might write it: odd spacing and
# key order, no stream_options.
STREAM_BODY = (b'{"stream" : true,  "model":"gpt-4o-mini",\n'
               b' "messages":[ {"role":"user","content":"count to five"} ] }')


def stream_raw(url, body):
    host, port = url.replace("http://", "").split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("inject", [False, True], ids=["inject_stream_usage-false", "default"])
def test_inject_stream_usage_false_sends_the_body_unchanged(mock3, start_envoy, inject):
    keys = secrets(3)
    plugin = plugin_with_keys(keys)
    if not inject:
        plugin["inject_stream_usage"] = False
    e = start_envoy(mock3, plugin=plugin)
    status, headers, body = stream_raw(e.url, STREAM_BODY)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert body.endswith(b"data: [DONE]\n\n") and re.findall(rb"tok\d", body) == [b"tok%d" % i for i in range(5)]
    [sent] = mock3.received()
    counters = wait_recorded(e, 1)[ids_by_secret(keys)[sent["key"]]]
    assert counters["streams"] == 1
    if not inject:
        # The provider got the caller's bytes; no usage was asked for, so
        # none came back and no tokens were counted.
        assert sent["body"].encode() == STREAM_BODY
        assert int(sent["headers"]["content-length"]) == len(STREAM_BODY)
        assert b'"usage"' not in body
        assert counters["total_tokens"] == 0
    else:
        assert json.loads(sent["body"])["stream_options"] == {"include_usage": True}
        assert int(sent["headers"]["content-length"]) == len(sent["body"].encode()) > len(STREAM_BODY)
        assert counters["total_tokens"] == mock3.stats()[sent["key"]]["total_tokens"] > 0


def decisions(e, limit=1000):
    status, _, body = e.admin_api("GET", f"decisions?limit={limit}")
    assert status == 200, body
    return json.loads(body)["decisions"]


def key_requests_scraped(e):
    """The apikeyrouter_key_requests counters summed, as Prometheus shows
    them: they are written on each worker's tick, like decision records."""
    _, _, text = http("GET", e.admin_url + "/stats/prometheus")
    return sum(int(l.rsplit(" ", 1)[1]) for l in text.decode().splitlines()
               if l.startswith("apikeyrouter_key_requests{"))


def test_decisions_header_false_sends_no_decision_header_and_still_records(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys, decisions={"header": False}))
    ids = []
    for _ in range(6):
        status, headers, _ = chat(e.url)
        assert status == 200
        assert "x-apikeyrouter-decision" not in headers, headers
        assert headers["x-apikeyrouter-key-id"] in ("k1", "k2", "k3")
        ids.append(headers["x-request-id"])
    # Streams and the gateway's own 429 carry none either.
    conn, resp = open_stream(e.url, {"model": "gpt-4o-mini", "stream": True,
                                     "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status == 200 and resp.getheader("x-apikeyrouter-decision") is None
    resp.read()
    conn.close()
    for k in ("k1", "k2", "k3"):
        assert e.admin_api("PATCH", f"keys/{k}", {"state": "disabled"})[0] == 200
    status, headers, body = chat(e.url)
    assert status == 429 and json.loads(body)["error"]["code"] == "no_available_key"
    assert "x-apikeyrouter-decision" not in headers
    # The records are kept all the same.
    wait_until(lambda: {d["request_id"] for d in decisions(e)} >= set(ids), what="decision records written")


def test_decisions_ring_size_0_keeps_none_and_nothing_breaks(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys, decisions={"ring_size": 0}))
    base = wasm_failure_stats(e)
    for _ in range(20):
        status, headers, _ = chat(e.url)
        assert status == 200
        assert headers["x-apikeyrouter-decision"].startswith("objective=fairness; key=k")
    # Every worker has ticked since (the counters it writes on its tick are
    # all there): still no record.
    wait_until(lambda: key_requests_scraped(e) == 20, timeout=15, what="20 attempts in the key metrics")
    assert decisions(e) == []
    status, _, body = e.admin_api("GET", "decisions")
    assert status == 200 and json.loads(body) == {"decisions": []}
    assert chat(e.url)[0] == 200
    assert_no_trap(e, base)


def test_admin_enabled_false_leaves_the_admin_paths_to_envoy(mock3, start_envoy):
    keys = secrets(3)
    plugin = plugin_with_keys(keys)
    plugin["admin"] = {"enabled": False}
    e = start_envoy(mock3, plugin=plugin)
    for method, path in [("GET", "keys"), ("GET", "health"), ("GET", "decisions"), ("PATCH", "keys/k1")]:
        status, headers, body = http(method, e.url + "/apikeyrouter/v1/" + path,
                                     {"state": "disabled"} if method == "PATCH" else None,
                                     {"authorization": f"Bearer {ADMIN_TOKEN}"})
        # Envoy's own answer for a path no route matches: not the filter's
        # (which are JSON), and nothing changed.
        assert (status, body, headers.get("content-type")) == (404, b"", None), (path, status, headers, body)
    assert mock3.received() == []
    served = {chat(e.url)[1]["x-apikeyrouter-key-id"] for _ in range(6)}
    assert served == {"k1", "k2", "k3"}, "PATCH keys/k1 disabled nothing"


def test_a_custom_admin_prefix_serves_there_and_not_at_the_default(mock3, start_envoy):
    keys = secrets(3)
    plugin = plugin_with_keys(keys)
    plugin["admin"] = {"prefix": "/ops/router/", "token_env": "APIKEYROUTER_ADMIN_TOKEN"}
    e = start_envoy(mock3, plugin=plugin)
    token = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    status, headers, body = http("GET", e.url + "/ops/router/keys", headers=token)
    assert status == 200 and headers["content-type"] == "application/json"
    assert [k["id"] for k in json.loads(body)["keys"]] == ["k1", "k2", "k3"]
    status, _, body = http("GET", e.url + "/ops/router/keys")
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    status, _, body = http("PATCH", e.url + "/ops/router/keys/k1", {"state": "disabled"}, token)
    assert status == 200 and json.loads(body)["state"] == "disabled"
    for path in ["keys", "health"]:
        status, headers, body = http("GET", e.url + "/apikeyrouter/v1/" + path, headers=token)
        assert (status, body, headers.get("content-type")) == (404, b"", None), (path, status, body)
    served = {chat(e.url)[1]["x-apikeyrouter-key-id"] for _ in range(6)}
    assert served == {"k2", "k3"}, "the PATCH under the custom prefix took effect"
