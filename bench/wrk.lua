-- wrk script for `make bench`: POSTs a chat completion and prints the run's
-- summary as one JSON line (prefixed with BENCH_JSON) for bench/run.py.
--   BENCH_STREAM=1   a streaming request ("stream": true) routed to the SSE upstream
--   BENCH_AUTH=key   sent as `Authorization: Bearer key`: a client's virtual key,
--                    or a credential the gateway removes (run.py always sets it)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_AUTH") or "sk-caller-credential-the-gateway-removes")
if os.getenv("BENCH_STREAM") == "1" then
  wrk.headers["Host"] = "sse.bench"    -- run.py's SSE_HOST: routed to the SSE upstream
  wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}],"stream":true}'
else
  wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}'
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
