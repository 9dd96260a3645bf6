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
                        "ratelimit_remaining": {"requests": N, "tokens": N}}
  POST /_mock/limit    {"key": "sk-..", "limit": N, "reset": "60s"}: the key
                       reports x-ratelimit-limit/remaining-requests that shrink
                       with each request, and answers 429 once none remain
  POST /_mock/stream   {"chunks": N, "gate": bool, "delay_ms": N}
  POST /_mock/release  releases streams held at the gate
  POST /_mock/reset    forgets records, behaviors and totals
  GET  /_mock/received?limit=N   recorded requests, newest last
  GET  /_mock/stats    per-key totals: requests, statuses, usage reported
"""

import argparse
import asyncio
import json
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
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


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
            return web.json_response(payload, status=status, headers=headers or {})

        if key not in state.keys:
            return respond(401, error_body("Incorrect API key provided.", "invalid_request_error",
                                           "invalid_api_key"))
        lim = state.limits.get(key)
        if lim is not None:
            if lim["used"] >= lim["limit"]:
                return respond(429, error_body("Rate limit reached for requests", "requests",
                                               "rate_limit_exceeded"),
                               {"x-ratelimit-limit-requests": str(lim["limit"]),
                                "x-ratelimit-remaining-requests": "0",
                                "x-ratelimit-reset-requests": lim["reset"], "retry-after": "60"})
            lim["used"] += 1
        queue = state.behaviors.get(key) or []
        if queue:
            b = queue[0]
            if b.get("times") is not None:
                b["times"] -= 1
                if b["times"] <= 0:
                    queue.pop(0)
            status = int(b.get("status", 200))
            if status != 200:
                body = b.get("body") or error_body(
                    "Rate limit reached for requests" if status == 429 else "The server had an error",
                    "requests" if status == 429 else "server_error",
                    "rate_limit_exceeded" if status == 429 else None)
                return respond(status, body, b.get("headers"))
            extra_headers = b.get("headers") or {}
        else:
            extra_headers = {}

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

        is_chat = request.path.endswith("/chat/completions")
        if body.get("stream"):
            return await stream(request, body, model, usage, headers, is_chat, st)

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

    async def stream(request, body, model, usage, headers, is_chat, st):
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
            if i == 0 and cfg.get("gate"):
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
    args = ap.parse_args()
    keys = [k for k in args.keys.split(",") if k]
    rl = [k for k in args.rate_limited.split(",") if k]
    state = State(keys, rl)
    app = make_app(state)

    async def on_startup(_):
        print(f"mock provider listening on http://{args.host}:{args.port}", flush=True)

    app.on_startup.append(on_startup)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None,
                handle_signals=True)


if __name__ == "__main__":
    sys.exit(main())
