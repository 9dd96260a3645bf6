"""JSON answers without a content-length (chunked), through real Envoy. One
of up to 4 MiB is held whole and carries x-apikeyrouter-cost; a larger one
flows through as it comes, and its usage, at its end, is read from its last
bytes. Either way the client gets the provider's bytes exactly and the key's
counters and the budget count its usage exactly."""

import hashlib
import http.client as httpclient
import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import PRICE_IN, PRICE_OUT, budget_of, free_port, priced, secrets, wait_recorded, wait_until

USAGE = {"prompt_tokens": 123, "completion_tokens": 4567, "total_tokens": 4690}


def answer_of(size):
    """A chat completion of about `size` bytes, its usage last, with varied
    content so that a byte out of place shows."""
    words = " ".join(f"w{i:x}" for i in range(size // 5 + 1))[:size]
    head = {"id": "chatcmpl-unsized", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": words}}]}
    return (json.dumps(head)[:-1] + ', "usage": ' + json.dumps(USAGE) + "}").encode()


class ChunkedProvider:
    """An OpenAI-style upstream that answers every request with one JSON
    body in HTTP/1.1 chunks of 64 KiB, without content-length; it records
    the keys it was sent. Has the mock's .port and .stop() for start_envoy."""

    def __init__(self, answer):
        self.port = free_port()
        self.keys = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                owner.keys.append(self.headers.get("authorization", "")[len("Bearer "):])
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                step = 64 << 10
                for i in range(0, len(answer), step):
                    piece = answer[i:i + step]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def start_provider():
    started = []

    def start(answer):
        p = ChunkedProvider(answer)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.mark.parametrize("size_mib,held", [(3, True), (6, False)], ids=["3MiB-held", "6MiB-flows"])
def test_a_json_answer_without_content_length_passes_whole_and_its_usage_is_counted(
        start_provider, start_envoy, size_mib, held):
    keys = secrets(3)
    answer = answer_of(size_mib << 20)
    provider = start_provider(answer)
    e = start_envoy(provider, plugin=priced(keys))
    host, port = e.url.replace("http://", "").split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a long one"}]}),
                     {"content-type": "application/json"})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        got = resp.read()
    finally:
        conn.close()
    assert resp.status == 200
    assert len(got) == len(answer) and hashlib.sha256(got).digest() == hashlib.sha256(answer).digest(), \
        "the provider's bytes, exactly"
    cost = (USAGE["prompt_tokens"] * PRICE_IN + USAGE["completion_tokens"] * PRICE_OUT) / 10**6
    if held:
        assert Decimal(headers["x-apikeyrouter-cost"]) == cost
    else:
        assert "x-apikeyrouter-cost" not in headers, "its headers went on before its usage was known"
    kid = headers["x-apikeyrouter-key-id"]
    assert provider.keys == [keys[int(kid[1:]) - 1]]
    counters = wait_recorded(e, 1)
    assert {n: counters[kid][n] for n in ("successes", "input_tokens", "output_tokens", "total_tokens")} == {
        "successes": 1, "input_tokens": USAGE["prompt_tokens"], "output_tokens": USAGE["completion_tokens"],
        "total_tokens": USAGE["total_tokens"]}, counters
    wait_until(lambda: budget_of(e, "b")["reserved"] == "0", timeout=10, what="reservation settled")
    assert Decimal(budget_of(e, "b")["spent"]) == cost
