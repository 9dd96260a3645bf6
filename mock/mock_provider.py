#!/usr/bin/env python3
"""A mock OpenAI-compatible provider for the demo and the real-Envoy tests.

It speaks enough of the OpenAI API to exercise apikeyrouter end to end:
chat completions (JSON and SSE streaming), completions, embeddings and
models. It knows a set of API keys, answers 401 to others, and can be told
to misbehave per key through a small control API under /_mock/.

Every request it serves is recorded (headers, body, key) so tests can assert
on what the provider actually received; usage it reported is totalled per
key so tests can compare it with the gateway's counters.

Control API (JSON):
  POST /_mock/behavior {"key": "sk-..", "status": 429, "headers": {..},
                        "times": N | null, "body": {..} | null,
                        "ratelimit_remaining": {"requests": N, "tokens": N},
                        "fault": NAME | null, "append": bool}
                       "key": "*" applies to every key that has no behavior
                       of its own. A fault (status 200) misbehaves:
                         reset_mid_body  send part of the body (or of the
                                         stream), then reset the connection
                         timeout         hold the request for "delay_s"
                                         (default 30) before answering
                         malformed_json  a 200 JSON body that does not parse
                         truncated_sse   a 200 event stream of "chunks"
                                         (default 3) events, then cut
                                         mid-event, without usage or [DONE]
                         no_usage        a normal answer without usage
                         huge_body       an answer of about "size_bytes"
                                         (default 8 MiB; JSON, or events for
                                         a stream), usage at the end
                         trickle         the answer in "chunk_bytes" pieces
                                         (default 16) every "interval_ms"
                                         (default 10)
  POST /_mock/chaos    {"rate_limit_fraction": F, "headers": {..}, "seed": N}:
                       a random fraction F of requests to keys without a
                       behavior answer 429 with these headers (e.g.
                       {"retry-after": "1"}); F = 0 turns it off
  POST /_mock/limit    {"key": "sk-..", "limit": N, "reset": "60s"}: the key
                       reports x-ratelimit-limit/remaining-requests that shrink
                       with each request, and answers 429 once none remain
  POST /_mock/stream   {"chunks": N, "gate": bool, "delay_ms": N, "gate_after": N}:
                       with "gate", a stream sends "gate_after" chunks
                       (default 1), then waits for /_mock/release; each
                       recorded stream keeps the text it sent in "sent_text"
  POST /_mock/organizations {"sk-..": "org-..", ...}: each key's organization;
                       from then on a request whose OpenAI-Organization names
                       another one gets OpenAI's 401 mismatched_organization
  POST /_mock/models   {"sk-..": ["gpt-4o-mini", ...], ...}: the models each
                       key's project may use; any other gets OpenAI's 403
                       model_not_found
  POST /_mock/projects {"sk-..": "proj_a", ...}: each key's project. From then
                       on the mock keeps objects per project, as OpenAI does,
                       and answers 404 for another project's id:
                         POST /v1/responses (previous_response_id must be the
                           project's), GET /v1/responses/{id}
                         POST /v1/files (multipart), GET /v1/files,
                           GET|DELETE /v1/files/{id}
                         POST /v1/batches (input_file_id must be the
                           project's), GET /v1/batches, GET /v1/batches/{id}
                       GET /_mock/objects lists every project's object ids
  POST /_mock/release  releases streams held at the gate
  POST /_mock/reset    forgets records, behaviors and totals
  GET  /_mock/received?limit=N   recorded requests, newest last, each
                       with the status it was answered ("dropped" when the
                       caller left before the answer) and the fault, if any
  GET  /_mock/stats    per-key totals: requests, statuses, usage reported
                       (a response cut before its usage reports none)

Answers without usage, as the real endpoints give them (usage_less below):
  POST /v1/images/generations   {"created", "data": [{"url"}]}
  POST /v1/audio/speech         audio/mpeg bytes
  POST /v1/responses {"background": true}   a queued response without
                       usage (its usage is counted in the stats now: the
                       provider bills it once); GET /v1/responses/{id} then
                       answers it completed, with its usage

With --tls-cert and --tls-key it serves HTTPS only (the egress tests: a
provider behind a forward proxy or an egress gateway, with a certificate
from a CA the test makes).
"""

import argparse
import asyncio
import json
import random
import socket
import ssl
import struct
import sys
import time
from collections import defaultdict, deque

from aiohttp import web


class State:
    def __init__(self, keys, rate_limited):
        self.keys = set(keys)
        self.default_rate_limited = set(rate_limited)
        self.reset()

    def reset(self):
        self.behaviors = {}  # key -> list of behaviors (consumed in order)
        for k in self.default_rate_limited:
            self.behaviors[k] = [{
                "status": 429, "times": None,
                "headers": {"retry-after": "30", "x-ratelimit-remaining-requests": "0",
                            "x-ratelimit-reset-requests": "30s"},
            }]
        self.received = deque(maxlen=20000)
        self.stats = defaultdict(lambda: {"requests": 0, "statuses": defaultdict(int),
                                          "prompt_tokens": 0, "completion_tokens": 0,
                                          "total_tokens": 0})
        self.stream_cfg = {"chunks": 5, "gate": False, "delay_ms": 0}
        self.gate = asyncio.Event()
        self.gate_waiters = 0
        self.limits = {}  # key -> {"limit": N, "used": N, "reset": "60s"}
        self.chaos = {"rate_limit_fraction": 0.0, "headers": {}}
        self.rng = random.Random(0)
        self.orgs = {}  # key -> its organization, once a test sets them
        self.models = {}  # key -> the models its project may use, once a test sets them
        self.projects = {}  # key -> its project, once a test sets them
        self.objects = defaultdict(dict)  # project -> {object id: object}
        self.object_seq = 0


def bearer(request):
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


def error_body(message, kind, code):
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def usage_for(body):
    """Deterministic usage: prompt tokens from the request, fixed completion."""
    text = json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")
    prompt = 5 + len(text) // 4
    completion = int(body.get("mock_completion_tokens", 7))
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": prompt + completion}
    # OpenAI's details, when a test asks for them.
    if "mock_cached_tokens" in body:
        usage["prompt_tokens_details"] = {"cached_tokens": int(body["mock_cached_tokens"])}
    if "mock_reasoning_tokens" in body:
        usage["completion_tokens_details"] = {"reasoning_tokens": int(body["mock_reasoning_tokens"])}
    return usage


def make_app(state):
    routes = web.RouteTableDef()

    @routes.post("/_mock/behavior")
    async def set_behavior(request):
        b = await request.json()
        key = b.pop("key")
        if b.get("append"):
            state.behaviors.setdefault(key, []).append(b)
        else:
            state.behaviors[key] = [b]
        return web.json_response({"ok": True})

    @routes.post("/_mock/limit")
    async def set_limit(request):
        b = await request.json()
        state.limits[b["key"]] = {"limit": int(b["limit"]), "used": 0, "reset": b.get("reset", "60s")}
        return web.json_response({"ok": True})

    @routes.post("/_mock/stream")
    async def set_stream(request):
        state.stream_cfg.update(await request.json())
        state.gate = asyncio.Event()
        return web.json_response({"ok": True})

    @routes.post("/_mock/chaos")
    async def set_chaos(request):
        b = await request.json()
        state.chaos = {"rate_limit_fraction": float(b.get("rate_limit_fraction", 0.0)),
                       "headers": dict(b.get("headers") or {})}
        state.rng = random.Random(b.get("seed", 0))
        return web.json_response({"ok": True})

    @routes.post("/_mock/organizations")
    async def set_organizations(request):
        state.orgs = dict(await request.json())
        return web.json_response({"ok": True})

    @routes.post("/_mock/models")
    async def set_models(request):
        state.models = {k: set(v) for k, v in (await request.json()).items()}
        return web.json_response({"ok": True})

    @routes.post("/_mock/projects")
    async def set_projects(request):
        state.projects.update(await request.json())
        return web.json_response({"ok": True})

    @routes.get("/_mock/objects")
    async def list_objects(request):
        return web.json_response({p: sorted(objs) for p, objs in state.objects.items()})

    @routes.post("/_mock/release")
    async def release(request):
        state.gate.set()
        return web.json_response({"ok": True, "waiters": state.gate_waiters})

    @routes.post("/_mock/reset")
    async def reset(request):
        state.reset()
        return web.json_response({"ok": True})

    @routes.get("/_mock/received")
    async def received(request):
        limit = int(request.query.get("limit", "100000"))
        items = list(state.received)[-limit:]
        return web.json_response({"received": items, "count": len(state.received)})

    @routes.get("/_mock/stats")
    async def stats(request):
        return web.json_response({k: {**v, "statuses": dict(v["statuses"])}
                                  for k, v in state.stats.items()})

    @routes.get("/_mock/health")
    async def health(request):
        return web.json_response({"ok": True})

    async def provider(request):
        raw = await request.read()
        key = bearer(request)
        rec = {"method": request.method, "path": request.path_qs,
               "headers": {k.lower(): v for k, v in request.headers.items()},
               "key": key, "body": raw.decode("utf-8", "replace"), "t": time.time()}
        state.received.append(rec)
        st = state.stats[key or "(none)"]
        st["requests"] += 1

        def respond(status, payload, headers=None):
            st["statuses"][str(status)] += 1
            rec["status"] = status
            return web.json_response(payload, status=status, headers=headers or {})

        if key not in state.keys:
            return respond(401, error_body("Incorrect API key provided.", "invalid_request_error",
                                           "invalid_api_key"))
        org = request.headers.get("openai-organization")
        if state.orgs and org is not None and org != state.orgs.get(key):
            return respond(401, error_body("OpenAI-Organization header should match organization for API key",
                                           "invalid_request_error", "mismatched_organization"))
        lim = state.limits.get(key)
        if lim is not None:
            if lim["used"] >= lim["limit"]:
                return respond(429, error_body("Rate limit reached for requests", "requests",
                                               "rate_limit_exceeded"),
                               {"x-ratelimit-limit-requests": str(lim["limit"]),
                                "x-ratelimit-remaining-requests": "0",
                                "x-ratelimit-reset-requests": lim["reset"], "retry-after": "60"})
            lim["used"] += 1
        queue = state.behaviors.get(key) or state.behaviors.get("*") or []
        fault = None
        if not queue and state.chaos["rate_limit_fraction"] > 0 \
                and state.rng.random() < state.chaos["rate_limit_fraction"]:
            rec["chaos"] = True
            return respond(429, error_body("Rate limit reached for requests", "requests",
                                           "rate_limit_exceeded"), state.chaos["headers"])
        if queue:
            b = queue[0]
            if b.get("times") is not None:
                b["times"] -= 1
                if b["times"] <= 0:
                    queue.pop(0)
            status = int(b.get("status", 200))
            fault = b.get("fault")
            if status != 200:
                # A scripted 401 without a body is OpenAI's answer to a bad key.
                body = b.get("body") or (
                    error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
                    if status == 401 else error_body(
                        "Rate limit reached for requests" if status == 429 else "The server had an error",
                        "requests" if status == 429 else "server_error",
                        "rate_limit_exceeded" if status == 429 else None))
                return respond(status, body, b.get("headers"))
            extra_headers = b.get("headers") or {}
        else:
            extra_headers = {}
            b = {}
        if fault:
            rec["fault"] = fault
        if fault == "timeout":
            await asyncio.sleep(float(b.get("delay_s", 30)))
            if request.transport is None or request.transport.is_closing():
                # The caller gave up: nothing is sent, no usage is reported.
                st["statuses"]["dropped"] += 1
                rec["status"] = "dropped"
                return web.Response(status=504)

        if state.projects:
            answered = project_objects(request, raw, key, st, respond)
            if answered is not None:
                return answered
        if request.method == "GET" and request.path.startswith("/v1/responses/"):
            return usage_less_poll(request, respond)
        if request.method == "GET":
            if request.path.rstrip("/") == "/v1/models":
                return respond(200, {"object": "list", "data": [
                    {"id": "gpt-4o-mini", "object": "model", "owned_by": "mock"},
                    {"id": "text-embedding-3-small", "object": "model", "owned_by": "mock"}]})
            return respond(404, error_body("Unknown path", "invalid_request_error", "not_found"))

        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return respond(400, error_body("We could not parse the JSON body of your request.",
                                           "invalid_request_error", None))
        usage = usage_for(body)
        model = body.get("model", "gpt-4o-mini")
        allowed = state.models.get(key)
        if allowed is not None and model not in allowed:
            return respond(403, error_body(f"Project `proj_mock` does not have access to model `{model}`",
                                           "invalid_request_error", "model_not_found"))
        headers = {"x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999"}
        if lim is not None:
            headers = {"x-ratelimit-limit-requests": str(lim["limit"]),
                       "x-ratelimit-remaining-requests": str(lim["limit"] - lim["used"]),
                       "x-ratelimit-reset-requests": lim["reset"]}
        headers.update(extra_headers)

        if request.path.endswith("/embeddings"):
            inputs = body.get("input", "")
            n = len(inputs) if isinstance(inputs, list) else 1
            u = {"prompt_tokens": usage["prompt_tokens"], "total_tokens": usage["prompt_tokens"]}
            st["prompt_tokens"] += u["prompt_tokens"]
            st["total_tokens"] += u["total_tokens"]
            return respond(200, {"object": "list", "model": model, "usage": u, "data": [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(n)]},
                headers)

        if request.path in USAGE_LESS_PATHS or (request.path == "/v1/responses" and body.get("background")):
            return usage_less(request, body, model, usage, headers, st, respond)

        is_chat = request.path.endswith("/chat/completions")
        if fault in FAULTS_WITH_BODY:
            return await misbehave(request, fault, b, body, model, usage, headers, is_chat, st, rec)
        if body.get("stream"):
            rec["status"] = 200
            return await stream(request, body, model, usage, headers, is_chat, st, rec)

        st["prompt_tokens"] += usage["prompt_tokens"]
        st["completion_tokens"] += usage["completion_tokens"]
        st["total_tokens"] += usage["total_tokens"]
        if is_chat:
            payload = {"id": "chatcmpl-mock", "object": "chat.completion", "created": int(time.time()),
                       "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": "Hello from the mock provider."}}],
                       "usage": usage}
        else:
            payload = {"id": "cmpl-mock", "object": "text_completion", "created": int(time.time()),
                       "model": model, "choices": [{"index": 0, "text": "Hello", "finish_reason": "stop"}],
                       "usage": usage}
        return respond(200, payload, headers)

    def completion(model, usage, is_chat, content="Hello from the mock provider."):
        if is_chat:
            payload = {"id": "chatcmpl-mock", "object": "chat.completion", "created": int(time.time()),
                       "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": content}}]}
        else:
            payload = {"id": "cmpl-mock", "object": "text_completion", "created": int(time.time()),
                       "model": model, "choices": [{"index": 0, "text": content, "finish_reason": "stop"}]}
        if usage is not None:
            payload["usage"] = usage  # last, so a body cut short loses it
        return payload

    def sse_events(model, usage, is_chat, n):
        obj = "chat.completion.chunk" if is_chat else "text_completion"
        out = []
        for i in range(n):
            choice = ({"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None} if is_chat
                      else {"index": 0, "text": f"tok{i} ", "finish_reason": None})
            out.append(f"data: {json.dumps({'id': 'chatcmpl-mock', 'object': obj, 'created': 0, 'model': model, 'choices': [choice]})}\n\n".encode())
        if usage is not None:
            final = {"id": "chatcmpl-mock", "object": obj, "created": 0, "model": model,
                     "choices": [], "usage": usage}
            out.append(f"data: {json.dumps(final)}\n\n".encode())
        return out

    def count_usage(st, usage):
        st["prompt_tokens"] += usage["prompt_tokens"]
        st["completion_tokens"] += usage["completion_tokens"]
        st["total_tokens"] += usage["total_tokens"]

    async def send_last(resp, data, usage, st, rec):
        """Writes the last bytes of an answer and ends it. Usage is counted
        before the write, so a client that has read the whole answer always
        finds it in /_mock/stats; it is taken back if the write fails."""
        if usage is not None:
            count_usage(st, usage)
        try:
            await resp.write(data)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            rec["status"] = "dropped"
            if usage is not None:
                count_usage(st, {k: -v for k, v in usage.items()})

    def reset_connection(request):
        """Resets the connection (RST, not FIN): the answer is cut short."""
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        transport.abort()

    async def misbehave(request, fault, b, body, model, usage, headers, is_chat, st, rec):
        """A 200 that goes wrong in one of the FAULTS_WITH_BODY ways. Usage
        is counted in `st` only when the client was sent all of it."""
        streaming = bool(body.get("stream"))
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        st["statuses"]["200"] += 1
        rec["status"] = 200
        if fault == "no_usage":
            if streaming:
                data = b"".join(sse_events(model, None, is_chat, 3)) + b"data: [DONE]\n\n"
                return web.Response(status=200, body=data, headers={**headers, "content-type": "text/event-stream"})
            return web.json_response(completion(model, None, is_chat), headers=headers)
        if fault == "malformed_json":
            if streaming:
                data = b'data: {"id": "chatcmpl-mock", "choices": [{"delta": {"content": tru\n\n' \
                       b"data: not json at all\n\ndata: [DONE]\n\n"
                return web.Response(status=200, body=data, headers={**headers, "content-type": "text/event-stream"})
            data = b'{"id": "chatcmpl-mock", "object": "chat.completion", "choices": [{"index": 0, ' \
                   b'"message": {"role": "assistant", "content": "cut"}}, "usage": {"prompt_tokens": 5,, ]]]'
            return web.Response(status=200, body=data, headers={**headers, "content-type": "application/json"})
        if fault == "truncated_sse":
            # An event stream that stops in the middle of an event, before
            # its usage chunk and [DONE], and ends cleanly.
            resp = web.StreamResponse(status=200, headers={**headers, "content-type": "text/event-stream"})
            await resp.prepare(request)
            for ev in sse_events(model, None, is_chat, int(b.get("chunks", 3))):
                await resp.write(ev)
            await resp.write(b'data: {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "choi')
            await resp.write_eof()
            return resp
        if fault == "reset_mid_body":
            if streaming:
                events = sse_events(model, usage if wants_usage else None, is_chat, 4)
                data = b"".join(events) + b"data: [DONE]\n\n"
                cut = len(b"".join(events[:2])) + 10  # two events and part of the third
                resp = web.StreamResponse(status=200, headers={**headers, "content-type": "text/event-stream"})
            else:
                data = json.dumps(completion(model, usage, is_chat)).encode()
                cut = len(data) // 2
                resp = web.StreamResponse(status=200, headers={**headers, "content-type": "application/json"})
                resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[:cut])
            await asyncio.sleep(0.05)  # let the part reach the peer before the reset
            reset_connection(request)
            return resp
        if fault == "huge_body":
            size = int(b.get("size_bytes", 8 << 20))
            if streaming:
                chunk = "x" * 8192
                n = max(1, size // (len(chunk) + 120))
                obj = "chat.completion.chunk" if is_chat else "text_completion"
                resp = web.StreamResponse(status=200, headers={**headers, "content-type": "text/event-stream"})
                await resp.prepare(request)
                try:
                    for _ in range(n):
                        ev = {"id": "chatcmpl-mock", "object": obj, "created": 0, "model": model,
                              "choices": [{"index": 0, "delta": {"content": chunk}, "finish_reason": None}]}
                        await resp.write(f"data: {json.dumps(ev)}\n\n".encode())
                except (ConnectionError, RuntimeError):
                    rec["status"] = "dropped"
                    return resp
                tail = b"".join(sse_events(model, usage if wants_usage else None, is_chat, 0)) + b"data: [DONE]\n\n"
                await send_last(resp, tail, usage if wants_usage else None, st, rec)
                return resp
            data = json.dumps(completion(model, usage, is_chat, content="x" * size)).encode()
            count_usage(st, usage)
            return web.Response(status=200, body=data, headers={**headers, "content-type": "application/json"})
        if fault == "trickle":
            step = max(1, int(b.get("chunk_bytes", 16)))
            pause = float(b.get("interval_ms", 10)) / 1000
            if streaming:
                data = b"".join(sse_events(model, usage if wants_usage else None, is_chat, 5)) + b"data: [DONE]\n\n"
                resp = web.StreamResponse(status=200, headers={**headers, "content-type": "text/event-stream"})
            else:
                data = json.dumps(completion(model, usage, is_chat)).encode()
                resp = web.StreamResponse(status=200, headers={**headers, "content-type": "application/json"})
                resp.content_length = len(data)
            await resp.prepare(request)
            pieces = [data[i:i + step] for i in range(0, len(data), step)]
            try:
                for piece in pieces[:-1]:
                    await resp.write(piece)
                    await asyncio.sleep(pause)
            except (ConnectionError, RuntimeError):
                rec["status"] = "dropped"
                return resp
            await send_last(resp, pieces[-1], usage if (wants_usage or not streaming) else None, st, rec)
            return resp
        raise AssertionError(fault)

    async def stream(request, body, model, usage, headers, is_chat, st, rec):
        st["statuses"]["200"] += 1
        resp = web.StreamResponse(status=200, headers={**headers, "content-type": "text/event-stream",
                                                      "cache-control": "no-cache"})
        await resp.prepare(request)
        cfg = dict(state.stream_cfg)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        obj = "chat.completion.chunk" if is_chat else "text_completion"
        for i in range(int(cfg["chunks"])):
            if is_chat:
                choice = {"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}
            else:
                choice = {"index": 0, "text": f"tok{i} ", "finish_reason": None}
            chunk = {"id": "chatcmpl-mock", "object": obj, "created": 0, "model": model,
                     "choices": [choice]}
            if include_usage:
                chunk["usage"] = None
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            rec["sent_text"] = rec.get("sent_text", "") + f"tok{i} "
            if i + 1 == int(cfg.get("gate_after", 1)) and cfg.get("gate"):
                state.gate_waiters += 1
                try:
                    await asyncio.wait_for(state.gate.wait(), timeout=30)
                except asyncio.TimeoutError:
                    pass
            elif cfg.get("delay_ms"):
                await asyncio.sleep(cfg["delay_ms"] / 1000)
        if include_usage:
            final = {"id": "chatcmpl-mock", "object": obj, "created": 0, "model": model,
                     "choices": [], "usage": usage}
            await resp.write(f"data: {json.dumps(final)}\n\n".encode())
            st["prompt_tokens"] += usage["prompt_tokens"]
            st["completion_tokens"] += usage["completion_tokens"]
            st["total_tokens"] += usage["total_tokens"]
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    # --- Answers without usage (images, speech, background responses) ---

    def project_objects(request, raw, key, st, respond):
        """The stateful endpoints, per project like OpenAI's: None for any
        other request."""
        objs = state.objects[state.projects.get(key, "(none)")]
        parts = [p for p in request.path.split("/") if p][1:]  # after "v1"
        method = request.method

        def new_id(prefix):
            state.object_seq += 1
            return f"{prefix}mock{state.object_seq}x{random.randrange(16 ** 6):06x}"

        def missing(what, oid, param=None):
            return respond(404, {"error": {"message": f"No such {what}: {oid}", "type": "invalid_request_error",
                                           "param": param, "code": None}})

        def listing(prefix):
            data = [o for i, o in objs.items() if i.startswith(prefix)]
            return respond(200, {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                                 "last_id": data[-1]["id"] if data else None, "has_more": False})

        def body():
            try:
                return json.loads(raw or b"{}")
            except ValueError:
                return {}

        if parts == ["responses"] and method == "POST" and not body().get("background"):
            b = body()
            prev = b.get("previous_response_id")
            if prev is not None and prev not in objs:
                return respond(404, error_body(f"Previous response with id '{prev}' not found.",
                                               "invalid_request_error", "previous_response_not_found"))
            usage = usage_for(b)
            count_usage(st, usage)
            rid = new_id("resp_")
            obj = {"id": rid, "object": "response", "status": "completed", "model": b.get("model", "gpt-4o"),
                   "previous_response_id": prev,
                   "output": [{"type": "message", "content": [{"type": "output_text", "text": "ok"}]}],
                   "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                             "total_tokens": usage["total_tokens"]}}
            objs[rid] = obj
            return respond(200, obj)
        if parts[:1] == ["responses"] and len(parts) == 2 and method == "GET":
            return respond(200, objs[parts[1]]) if parts[1] in objs else missing("response", parts[1])
        if parts == ["files"] and method == "POST":
            fid = new_id("file-")
            obj = {"id": fid, "object": "file", "bytes": len(raw), "created_at": int(time.time()),
                   "filename": "upload.jsonl", "purpose": "batch"}
            objs[fid] = obj
            return respond(200, obj)
        if parts == ["files"] and method == "GET":
            return listing("file-")
        if parts[:1] == ["files"] and len(parts) == 2 and method in ("GET", "DELETE"):
            if parts[1] not in objs:
                return missing("File", parts[1])
            if method == "DELETE":
                del objs[parts[1]]
                return respond(200, {"id": parts[1], "object": "file", "deleted": True})
            return respond(200, objs[parts[1]])
        if parts == ["batches"] and method == "POST":
            fid = body().get("input_file_id")
            if fid not in objs:
                return missing("File", fid, "input_file_id")
            bid = new_id("batch_")
            obj = {"id": bid, "object": "batch", "input_file_id": fid, "status": "validating",
                   "endpoint": body().get("endpoint")}
            objs[bid] = obj
            return respond(200, obj)
        if parts == ["batches"] and method == "GET":
            return listing("batch_")
        if parts[:1] == ["batches"] and len(parts) == 2 and method == "GET":
            return respond(200, objs[parts[1]]) if parts[1] in objs else missing("Batch", parts[1])
        return None

    USAGE_LESS_PATHS = {"/v1/images/generations", "/v1/audio/speech"}
    background = {}  # response id -> its completed form (any known key may poll it)

    def usage_less(request, body, model, usage, headers, st, respond):
        if request.path == "/v1/audio/speech":
            respond(200, None)  # counts and records the status
            return web.Response(status=200, body=b"ID3\x04\x00mock-audio", headers={**headers, "content-type": "audio/mpeg"})
        if request.path == "/v1/images/generations":
            return respond(200, {"created": int(time.time()), "data": [{"url": "https://example.com/mock.png"}]}, headers)
        rid = f"resp_mock_{len(background) + 1}"
        u = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
             "total_tokens": usage["total_tokens"]}
        count_usage(st, usage)
        background[rid] = {"id": rid, "object": "response", "status": "completed", "background": True,
                           "model": model, "usage": u,
                           "output": [{"type": "message", "content": [{"type": "output_text", "text": "A poem."}]}]}
        return respond(200, {"id": rid, "object": "response", "status": "queued", "background": True,
                             "model": model, "output": [], "usage": None}, headers)

    def usage_less_poll(request, respond):
        rid = request.path.rsplit("/", 1)[-1]
        done = background.get(rid)
        if done is None:
            return respond(404, error_body(f"No response found with id '{rid}'.", "invalid_request_error", None))
        return respond(200, done)

    FAULTS_WITH_BODY = {"reset_mid_body", "malformed_json", "truncated_sse", "no_usage", "huge_body",
                        "trickle"}
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes(routes)
    app.router.add_route("*", "/v1/{tail:.*}", provider)
    return app


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--keys", default="sk-demo-1,sk-demo-2,sk-demo-3",
                    help="comma-separated API keys the mock accepts")
    ap.add_argument("--rate-limited", default="",
                    help="comma-separated keys that always answer 429")
    ap.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (chain) ...")
    ap.add_argument("--tls-key", help="... and this PEM private key")
    args = ap.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    keys = [k for k in args.keys.split(",") if k]
    rl = [k for k in args.rate_limited.split(",") if k]
    state = State(keys, rl)
    app = make_app(state)

    async def on_startup(_):
        scheme = "https" if context else "http"
        print(f"mock provider listening on {scheme}://{args.host}:{args.port}", flush=True)

    app.on_startup.append(on_startup)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None,
                handle_signals=True, ssl_context=context)


if __name__ == "__main__":
    sys.exit(main())
