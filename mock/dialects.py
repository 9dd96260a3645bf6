#!/usr/bin/env python3
"""A mock of several LLM provider dialects on one port, for the providers tests.

- OpenAI:            POST /v1/chat/completions          Authorization: Bearer
- Azure OpenAI:      POST /openai/deployments/{d}/chat/completions?api-version=V   api-key
- Anthropic:         POST /v1/messages                   x-api-key + anthropic-version
- Gemini (native):   POST /v1beta/models/{m}:generateContent | :streamGenerateContent?alt=sse
                     x-goog-api-key
- Gemini (OpenAI):   POST /v1beta/openai/chat/completions Authorization: Bearer

Each answers in its own JSON, SSE, usage and rate-limit header format.
Control: POST /_mock/behavior {"key", "status", "headers", "times", "body"} (or
{"key", "cut_stream": true, "times"}: a 200 stream dropped after its first event),
GET /_mock/received, GET /_mock/stats (usage reported per key).
"""

import argparse
import json
import sys
from collections import defaultdict

from aiohttp import web

# Each dialect's answer to a key it does not know: (status, body).
BAD_KEY = {
    "openai": (401, {"error": {"message": "Incorrect API key provided: sk-****.", "type": "invalid_request_error",
                               "param": None, "code": "invalid_api_key"}}),
    "azure": (401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong "
                                                        "API endpoint. Make sure to provide a valid key for an "
                                                        "active subscription and use a correct regional API "
                                                        "endpoint for your resource."}}),
    "anthropic": (401, {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
    "gemini": (400, {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                               "status": "INVALID_ARGUMENT",
                               "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                            "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}),
    "gemini_openai": (400, [{"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                                       "status": "INVALID_ARGUMENT",
                                       "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                                    "reason": "API_KEY_INVALID"}]}}]),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--keys", required=True, help="comma-separated keys accepted in any dialect")
    args = ap.parse_args()
    keys = set(k for k in args.keys.split(",") if k)
    behaviors, received = {}, []
    stats = defaultdict(lambda: {"requests": 0, "input": 0, "output": 0, "statuses": defaultdict(int)})
    routes = web.RouteTableDef()

    @routes.post("/_mock/behavior")
    async def behavior(request):
        b = await request.json()
        behaviors[b.pop("key")] = b
        return web.json_response({"ok": True})

    @routes.get("/_mock/received")
    async def get_received(request):
        return web.json_response({"received": received})

    @routes.get("/_mock/stats")
    async def get_stats(request):
        return web.json_response({k: {**v, "statuses": dict(v["statuses"])} for k, v in stats.items()})

    @routes.get("/_mock/health")
    async def health(request):
        return web.json_response({"ok": True})

    def credential(request, dialect):
        h = request.headers
        if dialect in ("openai", "gemini_openai"):
            a = h.get("authorization", "")
            return a[7:] if a.startswith("Bearer ") else None
        return h.get({"azure": "api-key", "anthropic": "x-api-key", "gemini": "x-goog-api-key"}[dialect])

    async def handle(request, dialect, model=None):
        raw = await request.read()
        key = credential(request, dialect)
        received.append({"dialect": dialect, "path": request.path_qs, "key": key, "body": raw.decode(),
                         "headers": {k.lower(): v for k, v in request.headers.items()}})
        st = stats[key or "(none)"]
        st["requests"] += 1

        def answer(status, payload, headers=None):
            st["statuses"][str(status)] += 1
            return web.json_response(payload, status=status, headers=headers or {})

        if key not in keys:
            # Each dialect's own answer to a bad key.
            return answer(*BAD_KEY[dialect])
        if dialect == "anthropic" and "anthropic-version" not in request.headers:
            return answer(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                           "message": "anthropic-version header is required"}})
        b = behaviors.get(key)
        if b and b.get("cut_stream") and b.get("times", 1) > 0:
            # A stream that breaks after its first event: the connection is
            # dropped mid-answer.
            if "times" in b:
                b["times"] -= 1
            st["statuses"]["200"] += 1
            resp = web.StreamResponse(status=200, headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"H"}}]}\n\n')
            request.transport.abort()
            return resp
        if b and b.get("times", 1) > 0:
            if "times" in b:
                b["times"] -= 1
            return answer(int(b["status"]), b.get("body") or {"error": {"message": "mock error"}}, b.get("headers"))
        body = json.loads(raw or b"{}")
        stream = body.get("stream") or request.path.endswith(":streamGenerateContent")
        n_in, n_out = 11, 5
        st["input"] += n_in
        st["output"] += n_out
        if dialect == "anthropic":
            limits = {"anthropic-ratelimit-requests-limit": "100", "anthropic-ratelimit-requests-remaining": "99",
                      "anthropic-ratelimit-requests-reset": "2030-01-01T00:00:00Z"}
            if not stream:
                return answer(200, {"id": "msg_1", "type": "message", "role": "assistant", "model": body.get("model"),
                                    "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn",
                                    "usage": {"input_tokens": n_in, "output_tokens": n_out}}, limits)
            events = [
                ("message_start", {"type": "message_start", "message": {"id": "msg_1", "type": "message",
                                   "usage": {"input_tokens": n_in, "output_tokens": 1}}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                         "delta": {"type": "text_delta", "text": "Hi"}}),
                ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                   "usage": {"output_tokens": n_out}}),
                ("message_stop", {"type": "message_stop"}),
            ]
            return await sse(request, [f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events], limits, st)
        if dialect == "gemini":
            usage = {"promptTokenCount": n_in, "candidatesTokenCount": n_out, "totalTokenCount": n_in + n_out}
            chunk = {"candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}}], "usageMetadata": usage}
            if not stream:
                return answer(200, chunk)
            first = {"candidates": [{"content": {"parts": [{"text": "H"}]}}],
                     "usageMetadata": {"promptTokenCount": n_in, "candidatesTokenCount": 1, "totalTokenCount": n_in + 1}}
            return await sse(request, [f"data: {json.dumps(first)}\r\n\r\n", f"data: {json.dumps(chunk)}\r\n\r\n"], {}, st)
        # OpenAI-shaped: openai, azure, gemini_openai.
        headers = {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "99"}
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        name = model or body.get("model")
        if not stream:
            return answer(200, {"id": "c1", "object": "chat.completion", "model": name,
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
                                "usage": usage}, headers)
        chunks = [{"id": "c1", "object": "chat.completion.chunk", "model": name,
                   "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
                  {"id": "c1", "object": "chat.completion.chunk", "model": name, "choices": [], "usage": usage}]
        return await sse(request, [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"], headers, st)

    async def sse(request, events, headers, st):
        st["statuses"]["200"] += 1
        resp = web.StreamResponse(status=200, headers={**headers, "content-type": "text/event-stream"})
        await resp.prepare(request)
        for e in events:
            await resp.write(e.encode())
        await resp.write_eof()
        return resp

    @routes.post("/v1/chat/completions")
    async def openai(request):
        return await handle(request, "openai")

    @routes.post("/openai/deployments/{deployment}/chat/completions")
    async def azure(request):
        if "api-version" not in request.query:
            return web.json_response({"error": {"message": "api-version is required"}}, status=400)
        return await handle(request, "azure", model=request.match_info["deployment"])

    @routes.post("/v1/messages")
    async def anthropic(request):
        return await handle(request, "anthropic")

    @routes.post("/v1beta/openai/chat/completions")
    async def gemini_openai(request):
        return await handle(request, "gemini_openai")

    @routes.post("/v1beta/models/{model_action}")
    async def gemini(request):
        return await handle(request, "gemini")

    app = web.Application()
    app.add_routes(routes)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    sys.exit(main())
