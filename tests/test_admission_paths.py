"""Every request is admitted (issue 16), through real Envoy: a multipart
form, JSON under text/plain, an Azure deployment path and a Gemini model
path are each policed and priced; `n` choices multiply the estimate; a
policy's cap is written into the body; and an HTTP/2 body that ends with
trailers (sent by nghttp over h2c) gets the same checks.

The provider here is an in-process HTTP server (ProviderLedger) that speaks
each shape these requests need, answers deterministic usage and keeps a
ledger of it, so every spend assertion is the ledger times the price,
exactly. Envoy runs envoy/providers-mock.yaml, whose routes pick the
cluster by x-apikeyrouter-provider and whose listener takes HTTP/1.1 and
h2c (codec_type AUTO, the default)."""

import json
import os
import shutil
import subprocess
import tempfile
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import harness
from harness import ROOT, budget_of, http, sha256_hex, wait_until

ALICE = "vk-admission-alice-0123456789"
# Per 1M tokens.
PRICES = {
    "gpt-4o-mini": {"input": "1000", "output": "2000"},
    "gpt-4o": {"input": "2500", "output": "10000"},
    "gemini-2.0-flash": {"input": "100", "output": "400"},
    "whisper-1": {"input": "10", "output": "20"},
}
POLICY_CAP = 64
API_VERSION = "2024-10-21"


# --- The provider -------------------------------------------------------------

class ProviderLedger:
    """A provider on 127.0.0.1 (port picked at run time) for the shapes these
    tests send: OpenAI JSON paths and multipart forms, Azure deployment paths
    and Gemini's native generateContent. Every request is recorded with the
    usage it was answered (input tokens: 5 + body bytes // 20; output: 7 per
    choice), in the dialect's own usage format."""

    def __init__(self):
        self.received = []
        self.lock = threading.Lock()
        ledger = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def read_body(self):
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def do_POST(self):
                body = self.read_body()
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = {}
                choices = doc.get("n", 1) if isinstance(doc, dict) else 1
                usage = {"input": 5 + len(body) // 20, "output": 7 * max(1, int(choices or 1))}
                with ledger.lock:
                    ledger.received.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                            "body": body, "usage": usage})
                if ":generateContent" in self.path:
                    answer = {"candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}}],
                              "usageMetadata": {"promptTokenCount": usage["input"],
                                                "candidatesTokenCount": usage["output"],
                                                "totalTokenCount": usage["input"] + usage["output"]}}
                elif self.path.startswith("/v1/audio/"):
                    answer = {"text": "Hello.", "usage": {"type": "tokens", "input_tokens": usage["input"],
                                                          "output_tokens": usage["output"],
                                                          "total_tokens": usage["input"] + usage["output"]}}
                else:
                    answer = {"id": "c1", "object": "chat.completion",
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
                              "usage": {"prompt_tokens": usage["input"], "completion_tokens": usage["output"],
                                        "total_tokens": usage["input"] + usage["output"]}}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def requests(self):
        with self.lock:
            return list(self.received)

    def spend(self, model):
        """What the usage answered so far costs at `model`'s price."""
        p = PRICES[model]
        return sum((Decimal(r["usage"]["input"]) * Decimal(p["input"])
                    + Decimal(r["usage"]["output"]) * Decimal(p["output"])) / 10**6
                   for r in self.requests())


@pytest.fixture
def provider():
    p = ProviderLedger()
    yield p
    p.stop()


def plugin(limit="100", window="day"):
    """OpenAI, Azure (two deployments) and native Gemini, each on its route
    in providers-mock.yaml; PRICES; one hard budget `b`; client alice allowed
    gpt-4o-mini, gemini-2.0-flash and whisper-1 with max_tokens POLICY_CAP."""
    return {
        "providers": [
            {"id": "openai", "kind": "openai", "keys": [{"id": "o1", "secret": "sk-openai-1"}]},
            {"id": "azure", "kind": "azure", "api_version": API_VERSION,
             "deployments": {"mini-prod": "gpt-4o-mini", "big-prod": "gpt-4o"},
             "keys": [{"id": "az1", "secret": "az-key-1"}]},
            {"id": "gemini", "kind": "gemini", "keys": [{"id": "g1", "secret": "gm-key-1"}]},
        ],
        "prices": PRICES,
        "budgets": [{"id": "b", "window": window, "limit": limit}],
        "clients": [{"id": "alice", "key_sha256": sha256_hex(ALICE),
                     "allowed_models": ["gpt-4o-mini", "gemini-2.0-flash", "whisper-1"],
                     "max_tokens": POLICY_CAP}],
        "admin": {"token_env": "APIKEYROUTER_ADMIN_TOKEN"},
    }


@pytest.fixture
def gateway(provider, start_envoy, monkeypatch):
    """Starts Envoy (envoy/providers-mock.yaml) in front of the provider with
    a plugin config; returns it."""
    monkeypatch.setattr(harness, "DEMO_CONFIG", ROOT / "envoy" / "providers-mock.yaml")

    def start(cfg=None):
        return start_envoy(provider, plugin=cfg or plugin())

    return start


def post(e, path, body, content_type="application/json", headers=None):
    hdrs = {"authorization": f"Bearer {ALICE}", **(headers or {})}
    if content_type:
        hdrs["content-type"] = content_type
    return http("POST", e.url + path, body, hdrs)


def error_code(raw):
    return json.loads(raw)["error"]["code"]


def settled(e):
    """The budget once nothing is reserved."""
    wait_until(lambda: budget_of(e, "b")["reserved"] == "0", what="reservations settled")
    return budget_of(e, "b")


def multipart(boundary, fields):
    out = b""
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: audio/wav\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


# --- Tests ---------------------------------------------------------------------

def test_multipart_with_a_forbidden_model_is_refused_and_with_an_allowed_one_is_priced(provider, gateway):
    e = gateway()
    ct = "multipart/form-data; boundary=----akrBoundary7MA4YWxk"
    audio = bytes(range(256)) * 8
    forbidden = multipart("----akrBoundary7MA4YWxk", [("file", audio, "a.wav"), ("model", b"gpt-4o-transcribe", None)])
    status, _, body = post(e, "/v1/audio/transcriptions", forbidden, ct)
    assert (status, error_code(body)) == (403, "model_not_allowed")
    assert provider.requests() == []

    allowed = multipart("----akrBoundary7MA4YWxk", [("file", audio, "a.wav"), ("model", b"whisper-1", None),
                                                     ("response_format", b"json", None)])
    status, headers, body = post(e, "/v1/audio/transcriptions", allowed, ct)
    assert status == 200, body
    [got] = provider.requests()
    assert got["body"] == allowed, "the form reaches the provider unchanged"
    assert Decimal(headers["x-apikeyrouter-cost"]) == provider.spend("whisper-1")
    b = settled(e)
    assert Decimal(b["spent"]) == provider.spend("whisper-1") and b["requests"] == 1


def test_a_form_without_a_readable_model_is_refused_under_a_budget(provider, gateway):
    e = gateway()
    ct = "multipart/form-data; boundary=xx"
    for form in [multipart("xx", [("purpose", b"batch", None), ("file", b"{}", "b.jsonl")]),
                 multipart("xx", [("model", b"whisper-1", None), ("model", b"gpt-4o", None)])]:
        status, _, body = post(e, "/v1/audio/transcriptions", form, ct)
        assert (status, error_code(body)) == (400, "model_required"), body
    assert provider.requests() == []


def test_json_sent_as_text_plain_is_admitted_and_priced(provider, gateway):
    e = gateway()
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 10,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    status, headers, raw = post(e, "/v1/chat/completions", body, "text/plain")
    assert status == 200, raw
    assert Decimal(headers["x-apikeyrouter-cost"]) == provider.spend("gpt-4o-mini")
    assert Decimal(settled(e)["spent"]) == provider.spend("gpt-4o-mini")
    forbidden = json.dumps({"model": "gpt-4o", "max_tokens": 10, "messages": []}).encode()
    status, _, raw = post(e, "/v1/chat/completions", forbidden, "text/plain")
    assert (status, error_code(raw)) == (403, "model_not_allowed")
    assert len(provider.requests()) == 1


def test_an_azure_deployment_path_is_policed_and_priced_as_the_model_it_serves(provider, gateway):
    e = gateway()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    status, _, raw = post(e, f"/openai/deployments/big-prod/chat/completions?api-version={API_VERSION}", body)
    assert (status, error_code(raw)) == (403, "model_not_allowed")
    assert "gpt-4o" in json.loads(raw)["error"]["message"]
    path = f"/openai/deployments/mini-prod/chat/completions?api-version={API_VERSION}"
    status, headers, raw = post(e, path, body)
    assert status == 200, raw
    [got] = provider.requests()
    assert got["path"] == path
    assert got["headers"]["api-key"] == "az-key-1" and "authorization" not in got["headers"]
    assert Decimal(headers["x-apikeyrouter-cost"]) == provider.spend("gpt-4o-mini")
    assert Decimal(settled(e)["spent"]) == provider.spend("gpt-4o-mini")


def test_a_gemini_model_path_is_policed_priced_and_capped(provider, gateway):
    e = gateway()
    body = {"contents": [{"parts": [{"text": "Hi"}]}]}
    status, _, raw = post(e, "/v1beta/models/gemini-1.5-pro:generateContent", body)
    assert (status, error_code(raw)) == (403, "model_not_allowed")
    status, headers, raw = post(e, "/v1beta/models/gemini-2.0-flash:generateContent", body)
    assert status == 200, raw
    [got] = provider.requests()
    assert got["path"] == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert got["headers"]["x-goog-api-key"] == "gm-key-1"
    assert json.loads(got["body"])["generationConfig"] == {"maxOutputTokens": POLICY_CAP}
    assert Decimal(headers["x-apikeyrouter-cost"]) == provider.spend("gemini-2.0-flash")
    assert Decimal(settled(e)["spent"]) == provider.spend("gemini-2.0-flash")


def estimate(body_len, output_tokens, model="gpt-4o-mini"):
    """The admission estimate: every body byte a prompt token, every allowed
    output token, at `model`'s price."""
    p = PRICES[model]
    return (Decimal(body_len) * Decimal(p["input"]) + Decimal(output_tokens) * Decimal(p["output"])) / 10**6


def test_n_8_is_refused_when_its_estimate_exceeds_the_remaining_budget(provider, gateway):
    eight = json.dumps({"model": "gpt-4o-mini", "max_tokens": 50, "n": 8, "messages": []}).encode()
    one = json.dumps({"model": "gpt-4o-mini", "max_tokens": 50, "n": 1, "messages": []}).encode()
    # Room for the single choice, not for eight.
    limit = (estimate(len(one), 50) + estimate(len(eight), 8 * 50)) / 2
    e = gateway(plugin(limit=str(limit), window="total"))
    status, headers, raw = post(e, "/v1/chat/completions", eight)
    err = json.loads(raw)["error"]
    assert (status, err["code"], headers["x-apikeyrouter-budget"]) == (429, "insufficient_quota", "b")
    assert f"estimate {estimate(len(eight), 8 * 50).normalize():f}" in err["message"], err["message"]
    assert provider.requests() == []
    status, _, raw = post(e, "/v1/chat/completions", one)
    assert status == 200, raw
    b = settled(e)
    assert (Decimal(b["spent"]), b["refused"], b["requests"]) == (provider.spend("gpt-4o-mini"), 1, 1)


def test_a_policy_cap_is_injected_when_the_request_sets_none(provider, gateway):
    e = gateway()
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, raw = post(e, "/v1/chat/completions", body)
    assert status == 200, raw
    [got] = provider.requests()
    sent = json.loads(got["body"])
    assert sent["max_completion_tokens"] == POLICY_CAP and "max_tokens" not in sent
    assert int(got["headers"]["content-length"]) == len(got["body"])
    status, _, raw = post(e, "/v1/responses", {"model": "gpt-4o-mini", "input": "hi"})
    assert status == 200, raw
    assert json.loads(provider.requests()[-1]["body"])["max_output_tokens"] == POLICY_CAP
    status, _, raw = post(e, "/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": POLICY_CAP + 1,
                                                      "messages": []})
    assert (status, error_code(raw)) == (400, "max_tokens_too_large")
    assert Decimal(settled(e)["spent"]) == provider.spend("gpt-4o-mini")


def nghttp(url, body, headers):
    """POSTs `body` over h2c (HTTP/2 with prior knowledge) as DATA frames
    followed by one trailer; returns (status, nghttp's verbose output, which
    ends with the response body)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "body.json")
        with open(path, "wb") as f:
            f.write(body)
        args = ["nghttp", "-v", "--trailer", "x-t: 1", "-d", path, url]
        for k, v in headers.items():
            args += ["-H", f"{k}: {v}"]
        out = subprocess.run(args, capture_output=True, timeout=60).stdout.decode(errors="replace")
    assert "send DATA frame" in out and "x-t: 1" in out, "the body went as DATA, then the trailer"
    statuses = [line.split(":status:")[1].strip() for line in out.splitlines() if ":status:" in line]
    assert statuses, out[-3000:]
    return int(statuses[-1]), out


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp missing: `make setup` installs nghttp2-client")
def test_an_h2c_body_ending_in_trailers_gets_every_check_and_is_charged(provider, gateway):
    e = gateway()
    auth = {"authorization": f"Bearer {ALICE}"}
    forbidden = json.dumps({"model": "gpt-4o", "max_tokens": 5000, "messages": []}).encode()
    status, out = nghttp(e.url + "/v1/chat/completions", forbidden, auth)
    assert status == 403 and "model_not_allowed" in out, out[-2000:]
    too_long = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5000, "messages": []}).encode()
    status, out = nghttp(e.url + "/v1/chat/completions", too_long, auth)
    assert status == 400 and "max_tokens_too_large" in out, out[-2000:]
    assert provider.requests() == []
    allowed = json.dumps({"model": "gpt-4o-mini", "max_tokens": 10, "messages": []}).encode()
    status, out = nghttp(e.url + "/v1/chat/completions", allowed, auth)
    assert status == 200, out[-2000:]
    [got] = provider.requests()
    assert json.loads(got["body"])["model"] == "gpt-4o-mini"
    b = settled(e)
    assert Decimal(b["spent"]) == provider.spend("gpt-4o-mini") > 0 and b["requests"] == 1
