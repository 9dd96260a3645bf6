"""What an Envoy operator checks before signing off a shipped config
(envoy/*.yaml), read from each file and then seen working in real Envoy:

- every TLS cluster checks the provider's name (SNI and a DNS subject alt
  name), not just any publicly trusted certificate, TLS inside a CONNECT
  tunnel included;
- routes have no total timeout (streams and reasoning calls run as long as
  they send) but an idle timeout, a per-try idle timeout and a maximum stream
  duration;
- retries never resend a request that may have reached the provider
  (reset-before-request, not reset) and are limited by a retry budget, not
  by 10,000 max_retries;
- an overload manager with a heap ceiling and a downstream connection limit,
  a request_headers_timeout on every HTTP listener, TCP keepalive upstream;
- a health listener with only /ready and /stats/prometheus, apart from the
  admin API, and the filter's token-free health probe where the management
  listener serves one (and nothing else of the management API);
- the access log has response flags, upstream host, attempt count, time to
  first byte and bytes;
- the public gateway takes the caller from the connection
  (`use_remote_address`, no trusted x-forwarded-for hop) and gives every
  request a request id of its own, returned in the response.
Every config also passes `envoy --mode validate`."""

import json
import os
import socket
import tempfile

import pytest
import yaml

from harness import (ROOT, SHIPPED_ENV, chat, hcm, http, listener, priced, secrets, shipped_text, validate,
                     wait_until, wasm_filter_configs)

CONFIGS = sorted((ROOT / "envoy").glob("*.yaml"))
IDS = [p.name for p in CONFIGS]
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
# A transport socket that wraps another: TLS inside an HTTP CONNECT tunnel
# (envoy/egress-tunnel.yaml).
CONNECT_TYPE = ("type.googleapis.com/envoy.extensions.transport_sockets.http_11_proxy.v3."
                "Http11ProxyUpstreamTransport")


def load(path):
    text = shipped_text(path)
    return yaml.safe_load(text), text


def seconds(d):
    assert isinstance(d, str) and d.endswith("s"), d
    return float(d[:-1])


def listeners(cfg):
    return cfg["static_resources"]["listeners"]


def clusters(cfg):
    return {c["name"]: c for c in cfg["static_resources"]["clusters"]}



def hcms(cfg):
    """(listener name, HTTP connection manager) of every listener."""
    for l in listeners(cfg):
        for fc in l["filter_chains"]:
            for f in fc["filters"]:
                if f["typed_config"]["@type"] == HCM_TYPE:
                    yield l["name"], f["typed_config"]


def gateway_routes(cfg):
    """Every route of the gateway listener that goes to a provider cluster."""
    _, gw = next(hcms(cfg))
    for vh in gw["route_config"]["virtual_hosts"]:
        for r in vh["routes"]:
            if "route" in r:
                yield r["route"]


def admin_address(cfg):
    a = cfg["admin"]["address"]["socket_address"]
    return a["address"], a["port_value"]


# Clusters to this Envoy's own listeners, not to a provider.
LOCAL_CLUSTERS = ("envoy_admin", "apikeyrouter_management")


def provider_clusters(cfg):
    return {n: c for n, c in clusters(cfg).items() if n not in LOCAL_CLUSTERS}


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_envoy_validates_it(path):
    d = tempfile.mkdtemp(prefix="akr-shipped-")
    out = os.path.join(d, path.name)
    with open(out, "w") as f:
        f.write(load(path)[1])
    code, log = validate(out, SHIPPED_ENV)
    assert code == 0, log[-3000:]


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_every_tls_cluster_checks_the_providers_name(path):
    cfg, _ = load(path)
    for name, c in clusters(cfg).items():
        ts = c.get("transport_socket")
        if not ts:
            continue
        tls = ts["typed_config"]
        if tls["@type"] == CONNECT_TYPE:
            tls = tls["transport_socket"]["typed_config"]
        assert tls["@type"] == TLS_TYPE, name
        sni = tls.get("sni")
        assert sni, f"{name}: no SNI"
        vc = tls["common_tls_context"]["validation_context"]
        assert vc.get("trusted_ca"), f"{name}: no CA"
        sans = vc.get("match_typed_subject_alt_names") or []
        assert {"san_type": "DNS", "matcher": {"exact": sni}} in sans, \
            f"{name}: any trusted certificate would do; the SAN must be {sni}"


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_routes_let_streams_run_but_not_hang(path):
    cfg, _ = load(path)
    routes = list(gateway_routes(cfg))
    assert routes
    for r in routes:
        where = f"route to {r['cluster']}"
        assert seconds(r["timeout"]) == 0, f"{where}: a total timeout cuts long streams"
        assert 0 < seconds(r["idle_timeout"]) <= 3600, where
        assert 0 < seconds(r["max_stream_duration"]["max_stream_duration"]) <= 24 * 3600, where
        rp = r["retry_policy"]
        assert 0 < seconds(rp["per_try_idle_timeout"]) <= seconds(r["idle_timeout"]), where
    for name, h in hcms(cfg):
        if name == "gateway":
            assert seconds(h["request_timeout"]) == 0 and seconds(h["stream_idle_timeout"]) > 0, name


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_retries_follow_the_filters_verdict_and_never_resend_what_the_provider_may_have_billed(path):
    cfg, _ = load(path)
    for r in gateway_routes(cfg):
        on = r["retry_policy"]["retry_on"].split(",")
        assert "reset" not in on and "5xx" not in on and "gateway-error" not in on, on
        # Bare statuses would retry a caller's own 401/403 on every key.
        assert "retriable-status-codes" not in on and "retriable-4xx" not in on, on
        assert "reset-before-request" in on and "retriable-headers" in on, on
        assert r["retry_policy"]["retriable_headers"] == [
            {"name": "x-apikeyrouter-retry", "string_match": {"exact": "another-key"}}]


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_retries_are_limited_by_a_budget(path):
    cfg, _ = load(path)
    for name, c in provider_clusters(cfg).items():
        [t] = c["circuit_breakers"]["thresholds"]
        assert "max_retries" not in t, f"{name}: max_retries; a retry budget limits retries by traffic"
        b = t["retry_budget"]
        assert 0 < b["budget_percent"]["value"] <= 100 and b["min_retry_concurrency"] > 3, name


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_overload_manager_bounds_heap_and_connections(path):
    cfg, _ = load(path)
    om = cfg["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in om["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] > 0
    assert monitors["envoy.resource_monitors.global_downstream_max_connections"][
        "max_active_downstream_connections"] > 0
    actions = {a["name"]: a["triggers"] for a in om["actions"]}
    stop = actions["envoy.overload_actions.stop_accepting_requests"]
    assert [t["name"] for t in stop] == ["envoy.resource_monitors.fixed_heap"]
    assert stop[0]["threshold"]["value"] < 1


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_every_http_listener_has_a_request_headers_timeout(path):
    cfg, _ = load(path)
    found = list(hcms(cfg))
    assert len(found) >= 2
    for name, h in found:
        assert 0 < seconds(h["request_headers_timeout"]) <= 60, name


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_upstream_connections_have_tcp_keepalive(path):
    cfg, _ = load(path)
    for name, c in provider_clusters(cfg).items():
        ka = c["upstream_connection_options"]["tcp_keepalive"]
        assert 0 < ka["keepalive_time"] <= 300 and ka["keepalive_interval"] > 0 and ka["keepalive_probes"] > 0, name


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_health_listener_serves_only_ready_and_prometheus_from_the_admin_api(path):
    cfg, _ = load(path)
    [health] = [l for l in listeners(cfg) if l["name"] == "health"]
    [(_, h)] = [(n, x) for n, x in hcms(cfg) if n == "health"]
    [vh] = h["route_config"]["virtual_hosts"]
    served = {r["match"].get("path"): r["route"]["cluster"] for r in vh["routes"] if "route" in r}
    probe = served.pop("/apikeyrouter/health", None)
    assert served == {"/ready": "envoy_admin", "/stats/prometheus": "envoy_admin"}
    if probe:
        # Only the probe's exact path reaches the management listener, and
        # its plugin config serves the probe there.
        assert probe == "apikeyrouter_management"
        ep = clusters(cfg)[probe]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        addr = listener(cfg, "management")["address"]["socket_address"]
        assert ep["address"]["socket_address"] == {"address": addr["address"], "port_value": addr["port_value"]}
        management = wasm_filter_configs(listener(cfg, "management"))
        plugins = [json.loads(wf["configuration"]["value"]) for wf in management]
        assert [p["admin"].get("probe_path") for p in plugins] == ["/apikeyrouter/health"]
    assert vh["routes"][-1] == {"match": {"prefix": "/"}, "direct_response": {"status": 404}}
    admin = clusters(cfg)["envoy_admin"]
    ep = admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (ep["address"], ep["port_value"]) == admin_address(cfg)
    assert admin_address(cfg)[0] == "127.0.0.1", "the admin API itself stays on loopback"
    addr = health["address"]["socket_address"]
    assert (addr["address"], addr["port_value"]) != admin_address(cfg)


ACCESS_FIELDS = ("%RESPONSE_FLAGS%", "%UPSTREAM_HOST%", "%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "%RESPONSE_DURATION%",
                 "%BYTES_RECEIVED%", "%BYTES_SENT%", "%RESPONSE_CODE%", "%DURATION%")


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_access_log_says_what_an_operator_needs(path):
    cfg, _ = load(path)
    _, gw = next(hcms(cfg))
    [log] = gw["access_log"]
    values = set(log["typed_config"]["log_format"]["json_format"].values())
    missing = [f for f in ACCESS_FIELDS if f not in values]
    assert not missing, missing


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_the_public_gateway_takes_the_caller_from_the_connection_and_sets_its_own_request_ids(path):
    cfg, _ = load(path)
    [gw] = [h for name, h in hcms(cfg) if name == "gateway"]
    assert gw.get("use_remote_address") is True, "the caller's address must come from the connection"
    assert gw.get("xff_num_trusted_hops") == 0, "stated: no hop in front is trusted to set x-forwarded-for"
    assert gw.get("preserve_external_request_id") is False, "stated: a caller's x-request-id is replaced"
    assert gw.get("generate_request_id", True) is True
    assert gw.get("always_set_request_id_in_response") is True


# --- The same, working in real Envoy (envoy/demo.yaml, as the other tests run it)


def health_port(e):
    status, _, body = http("GET", e.admin_url + "/listeners?format=json")
    assert status == 200, body
    for l in json.loads(body)["listener_statuses"]:
        if l["name"] == "health":
            return l["local_address"]["socket_address"]["port_value"]
    raise AssertionError("no health listener")


def test_health_listener_answers_probes_and_scrapes_and_nothing_else(mock, start_envoy):
    e = start_envoy(mock)
    assert chat(e.url, headers={"authorization": "Bearer sk-gateway-demo-key-0001"})[0] == 200
    base = f"http://127.0.0.1:{health_port(e)}"
    status, _, body = http("GET", base + "/ready")
    assert (status, body.strip()) == (200, b"LIVE")
    wait_until(lambda: b"apikeyrouter_key_requests{" in http("GET", base + "/stats/prometheus")[2],
               timeout=10, what="the filter's metrics on the health listener")
    status, _, body = http("GET", base + "/stats/prometheus?usedonly")
    assert status == 200 and b"# TYPE envoy_server_live gauge" in body
    for path in ("/clusters", "/config_dump", "/stats", "/logging", "/quitquitquit", "/ready/"):
        assert http("GET", base + path)[0] == 404, path
    assert http("POST", base + "/ready", b"")[0] == 404, "only GET reaches the admin API"
    assert http("POST", base + "/quitquitquit", b"")[0] == 404
    assert e.proc.poll() is None


def access_lines(e):
    return [json.loads(l) for l in e.logs().splitlines() if l.startswith("{") and '"upstream_attempts"' in l]


def test_access_log_line_has_flags_upstream_attempts_ttfb_and_bytes(mock, start_envoy):
    e = start_envoy(mock, plugin={"providers": [{"id": "openai", "keys": [
        {"id": "k1", "secret": "sk-demo-3"}, {"id": "k2", "secret": "sk-demo-1"}]}],
        "admin": {"token_env": "APIKEYROUTER_ADMIN_TOKEN"}})
    mock.behavior("sk-demo-3", status=429, times=1)
    status, headers, body = chat(e.url)
    assert status == 200, body
    wait_until(lambda: access_lines(e), timeout=15, what="the access log line")
    [line] = access_lines(e)
    assert line["request_id"] == headers["x-request-id"]
    assert line["response_flags"] == "-" and line["upstream_cluster"] == "openai"
    assert line["upstream_host"] == f"127.0.0.1:{mock.port}"
    assert int(line["upstream_attempts"]) == 2, "the 429 and the retry on another key"
    assert 0 <= int(line["ttfb_ms"]) <= int(line["duration_ms"])
    assert int(line["bytes_sent"]) == len(body) and int(line["bytes_received"]) > 0


def test_a_callers_request_id_is_replaced_by_envoys_own_and_returned(mock, start_envoy):
    e = start_envoy(mock)
    ids = []
    for _ in range(2):
        status, headers, _ = chat(e.url, headers={"authorization": "Bearer sk-gateway-demo-key-0001",
                                                  "x-request-id": "chosen-by-the-caller"})
        assert status == 200
        ids.append(headers["x-request-id"])
    assert "chosen-by-the-caller" not in ids and ids[0] != ids[1], ids
    assert [r["headers"]["x-request-id"] for r in mock.received()] == ids


def test_a_reset_after_the_request_went_out_is_not_retried(mock3, start_envoy):
    # The provider may have processed (and billed) it: one attempt, not four.
    # Priced, so the attempt stage holds the answer's headers until its usage
    # is read: the reset comes before the client sees anything (502).
    e = start_envoy(mock3, plugin=priced(secrets(3)))
    mock3.behavior("*", fault="reset_mid_body")
    status, _, body = chat(e.url)
    assert status == 502, body
    assert len(mock3.received()) == 1
    mock3.reset()
    # A 429 is still answered by another key.
    mock3.behavior(secrets(3)[0], status=429)
    mock3.behavior(secrets(3)[1], status=429)
    for _ in range(3):
        assert chat(e.url)[0] == 200


def test_a_client_that_never_finishes_its_headers_is_cut_off(mock, start_envoy):
    def edit(cfg):
        hcm(cfg)["request_headers_timeout"] = "1s"
    e = start_envoy(mock, edit=edit)
    with socket.create_connection(("127.0.0.1", e.gateway_port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    assert got.startswith(b"HTTP/1.1 408"), got[:200]


def test_overload_manager_refuses_new_requests_past_the_heap_ceiling(mock, start_envoy):
    def edit(cfg):
        for m in cfg["overload_manager"]["resource_monitors"]:
            if m["name"] == "envoy.resource_monitors.fixed_heap":
                m["typed_config"]["max_heap_size_bytes"] = 1 << 20   # far below what Envoy uses
    e = start_envoy(mock, edit=edit)
    wait_until(lambda: chat(e.url)[0] == 503, timeout=15, what="the overload manager to refuse requests")
    status, headers, body = chat(e.url)
    assert status == 503 and b"envoy overloaded" in body, body


def test_the_downstream_connection_limit_holds(mock, start_envoy):
    def edit(cfg):
        for m in cfg["overload_manager"]["resource_monitors"]:
            if m["name"] == "envoy.resource_monitors.global_downstream_max_connections":
                m["typed_config"]["max_active_downstream_connections"] = 2
    e = start_envoy(mock, edit=edit)
    held = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", e.gateway_port), timeout=10)
        held.append(s)
        s.sendall(b"GET /nothing HTTP/1.1\r\nhost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 "), "accepted and kept open"
    try:
        def refused():
            with socket.create_connection(("127.0.0.1", e.gateway_port), timeout=10) as s:
                try:
                    s.sendall(b"GET /nothing HTTP/1.1\r\nhost: x\r\n\r\n")
                    return s.recv(100) == b""
                except ConnectionResetError:
                    return True
        wait_until(refused, timeout=10, what="a third connection closed at once", errors=(OSError,))
        overflow = e.stats("downstream_global_cx_overflow")
        assert sum(int(v) for k, v in overflow.items() if k.endswith("downstream_global_cx_overflow")) >= 1, overflow
    finally:
        for s in held:
            s.close()
