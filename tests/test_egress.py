"""The two egress configs as shipped, run for real on loopback (issue 24):

- envoy/egress-tunnel.yaml: the gateway opens an HTTP CONNECT tunnel through
  a forward proxy (Debian's tinyproxy, allowing CONNECT only to the mock's
  port) and does TLS to the provider inside it;
- envoy/egress-mtls.yaml with envoy/egress/egress-gateway.yaml: mutual TLS
  from the gateway to a second Envoy, the egress gateway, which originates
  TLS to the provider.

The provider is the mock over HTTPS, with a certificate from a CA the test
makes for api.openai.com (and localhost, the name the tunnel's CONNECT asks
for, which tinyproxy resolves to the mock). The files are taken as they are
and only what ties them to a deployment changes: ports, the files they read
from /etc (the test's CA and certificates), the addresses of the proxy, the
egress gateway and the provider, and the example client's key. A recording
relay sits on the hop between the gateway and the proxy (or egress gateway),
so the test sees every byte that crossed it."""

import json
import socket
import ssl
import tempfile
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from harness import (ROOT, SHIPPED_ENV, Mock, RecordingRelay, Tinyproxy, chat, distinct_ports,
                     listener, make_certs, management, secrets, shipped_on_loopback, shipped_text, validate,
                     wait_until)

TUNNEL = ROOT / "envoy" / "egress-tunnel.yaml"
MTLS = ROOT / "envoy" / "egress-mtls.yaml"
EGRESS_GATEWAY = ROOT / "envoy" / "egress" / "egress-gateway.yaml"
PROXY_ADDRESS = "envoy.http11_proxy_transport_socket.proxy_address"
SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"
CLIENT_KEY = "vk-egress-client-0123456789abcdef"
KEYS = secrets(3, prefix="sk-egress")
PATTERNS = ["tunnel", "mtls"]
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
CONNECT_TYPE = ("type.googleapis.com/envoy.extensions.transport_sockets.http_11_proxy.v3."
                "Http11ProxyUpstreamTransport")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA; from it the provider's certificate (api.openai.com and
    localhost), the egress gateway's (egress.internal) and the gateway's
    client certificate (DNS subject alt name apikeyrouter)."""
    return make_certs(tmp_path_factory.mktemp("egress-certs"),
                      {"provider": ["api.openai.com", "localhost"], "egress": "egress.internal"}, {"client": ""})


def start(started, thing):
    started.append(thing)
    return thing


def clusters(cfg):
    return {c["name"]: c for c in cfg["static_resources"]["clusters"]}


def replacing(cfg):
    """An Envoy edit that swaps the demo config for cfg."""
    def edit(c):
        c.clear()
        c.update(cfg)
    return edit


def gateway(start_envoy, mock, path, files, edit_cluster):
    """Envoy running the shipped gateway config `path` on loopback, with the
    files it reads swapped for `files` and its openai cluster as shipped
    but for edit_cluster(cluster); its management listener's URL is
    `.management`."""
    gateway_port, management_port, admin_port = distinct_ports(3)
    text = shipped_text(path, files)
    shipped_cluster = clusters(yaml.safe_load(text))["openai"]
    cfg = shipped_on_loopback(text, gateway_port, management_port, admin_port, mock.port, CLIENT_KEY)
    cluster = clusters(cfg)["openai"]
    cluster.clear()
    cluster.update(shipped_cluster)
    edit_cluster(cluster)
    env = {f"OPENAI_KEY_{i + 1}": k for i, k in enumerate(KEYS)}
    e = start_envoy(mock, edit=replacing(cfg), env=env, gateway_port=gateway_port, admin_port=admin_port)
    e.management = f"http://127.0.0.1:{management_port}"
    return e


def endpoint(cluster):
    return cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]


def tunnel_gateway(start_envoy, mock, certs, proxy_port):
    """envoy/egress-tunnel.yaml: the provider at localhost:<mock's port>,
    reached through the proxy at 127.0.0.1:proxy_port; the provider's
    certificate checked against the test's CA, SNI and SAN as shipped."""
    def edit(cluster):
        lb = endpoint(cluster)
        lb["endpoint"]["address"]["socket_address"] = {"address": "localhost", "port_value": mock.port}
        lb["metadata"]["typed_filter_metadata"][PROXY_ADDRESS]["socket_address"] = {
            "address": "127.0.0.1", "port_value": proxy_port}
    return gateway(start_envoy, mock, TUNNEL, {SYSTEM_CAS: certs["ca.pem"]}, edit)


def egress_files(certs):
    return {SYSTEM_CAS: certs["ca.pem"], "/etc/envoy/egress-ca.pem": certs["ca.pem"],
            "/etc/envoy/egress-client.pem": certs["client.pem"], "/etc/envoy/egress-client.key": certs["client.key"],
            "/etc/envoy/egress-gateway.pem": certs["egress.pem"], "/etc/envoy/egress-gateway.key": certs["egress.key"]}


def egress_envoy(start_envoy, mock, certs):
    """envoy/egress/egress-gateway.yaml on loopback, its provider the mock
    (SNI and SAN api.openai.com as shipped, the test's CA); `.port` is its
    mTLS listener's."""
    port, admin_port = distinct_ports(2)
    cfg = yaml.safe_load(shipped_text(EGRESS_GATEWAY, egress_files(certs)))
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener(cfg, "egress")["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    endpoint(clusters(cfg)["openai"])["endpoint"]["address"]["socket_address"] = {
        "address": "127.0.0.1", "port_value": mock.port}
    e = start_envoy(mock, edit=replacing(cfg), gateway_port=port, admin_port=admin_port)
    e.port = port
    return e


def mtls_gateway(start_envoy, mock, certs, egress_port, client_certificate=True):
    """envoy/egress-mtls.yaml with the egress gateway at
    127.0.0.1:egress_port (SNI and SAN egress.internal as shipped); without
    its client certificate when client_certificate is false."""
    def edit(cluster):
        endpoint(cluster)["endpoint"]["address"]["socket_address"] = {"address": "127.0.0.1",
                                                                      "port_value": egress_port}
        if not client_certificate:
            del cluster["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"]
    return gateway(start_envoy, mock, MTLS, egress_files(certs), edit)


def chain(kind, started, start_envoy, certs):
    """The TLS mock, the hop (tinyproxy, or the egress Envoy) behind a
    recording relay, and the gateway in front: a namespace with mock, hop,
    relay and gateway."""
    mock = start(started, Mock(KEYS, tls=(certs["provider.pem"], certs["provider.key"], certs["ca.pem"])))
    if kind == "tunnel":
        hop = start(started, Tinyproxy(connect_ports=[mock.port]))
        relay = start(started, RecordingRelay(hop.port))
        gw = tunnel_gateway(start_envoy, mock, certs, relay.port)
    else:
        hop = egress_envoy(start_envoy, mock, certs)
        relay = start(started, RecordingRelay(hop.port))
        gw = mtls_gateway(start_envoy, mock, certs, relay.port)
    return SimpleNamespace(mock=mock, hop=hop, relay=relay, gateway=gw)


def ask(e, content="hello", **extra):
    return chat(e.url, content=content, headers={"authorization": f"Bearer {CLIENT_KEY}"},
                extra={"max_tokens": 5, **extra})


def settled_budget(e):
    """The shipped daily budget once no reservation is open."""
    wait_until(lambda: management(e, "budgets/daily")["reserved"] == "0", timeout=10, what="reservations settled")
    return management(e, "budgets/daily")


def shipped_price(path):
    cfg = yaml.safe_load(shipped_text(path))
    for n in cfg["static_resources"]["listeners"]:
        if n["name"] == "gateway":
            http_filters = n["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
            plugin = json.loads(http_filters[0]["typed_config"]["config"]["configuration"]["value"])
            return plugin["prices"]["gpt-4o-mini*"]
    raise AssertionError("no gateway listener")


def assert_nothing_in_clear(relay, prompts):
    """No key, no caller key, no prompt and no HTTP request crossed the
    relayed hop in clear text; something did cross it."""
    seen = relay.bytes_seen()
    assert seen, "traffic crossed the hop"
    for secret in KEYS + [CLIENT_KEY] + prompts:
        assert secret.encode() not in seen, "a key or a prompt crossed the hop in clear text"
    for marker in (b"authorization", b"Authorization", b"/v1/chat/completions", b"gpt-4o-mini", b"Bearer"):
        assert marker not in seen, marker


@pytest.mark.parametrize("kind", PATTERNS)
def test_requests_through_the_egress_hop_rotate_keys_and_are_charged_with_nothing_readable_on_the_hop(
        kind, started, start_envoy, certs):
    c = chain(kind, started, start_envoy, certs)
    prompts = [f"confidential prompt number {i} for the egress test" for i in range(6)]
    for p in prompts:
        status, headers, body = ask(c.gateway, p)
        assert status == 200, body
        assert headers["x-apikeyrouter-key-id"].startswith("openai-")
    received = c.mock.received()
    assert len(received) == 6
    assert {r["key"] for r in received} == set(KEYS), "every key served"
    # The gateway's counters and budget: what the provider reported, at the shipped prices.
    counters = {k["id"]: k["counters"]["requests"] for k in management(c.gateway, "keys")["keys"]}
    assert sum(counters.values()) == 6 and all(n >= 1 for n in counters.values()), counters
    price = shipped_price(TUNNEL if kind == "tunnel" else MTLS)
    want = sum(Decimal(s["prompt_tokens"]) * Decimal(price["input"])
               + Decimal(s["completion_tokens"]) * Decimal(price["output"]) for s in c.mock.stats().values()) / 10**6
    spent = Decimal(settled_budget(c.gateway)["spent"])
    assert spent > 0 and spent == want, (spent, want)
    assert_nothing_in_clear(c.relay, prompts)
    for e in [c.gateway] + ([c.hop] if kind == "mtls" else []):
        logs = e.logs()
        assert not [k for k in KEYS if k in logs], "a provider key in a log"
    if kind == "mtls":
        # The egress gateway's access log names the client certificate it admitted.
        def lines():
            return [json.loads(l) for l in c.hop.logs().splitlines() if l.startswith("{")]
        wait_until(lambda: len(lines()) == 6, timeout=15, what="the egress gateway's 6 access log lines")
        assert {(l["peer"], l["authority"], l["status"]) for l in lines()} == {
            ("apikeyrouter", "api.openai.com", 200)}, lines()


def test_the_forward_proxy_sees_only_connect_to_the_providers_name(started, start_envoy, certs):
    c = chain("tunnel", started, start_envoy, certs)
    for i in range(3):
        status, _, body = ask(c.gateway, f"a prompt the proxy must not read {i}")
        assert status == 200, body
    requests = c.hop.requests()
    assert requests and set(requests) == {f"CONNECT localhost:{c.mock.port} HTTP/1.1"}, requests
    log = c.hop.logs()
    assert not [k for k in KEYS + [CLIENT_KEY] if k in log] and "prompt" not in log
    # On the wire: each connection is the CONNECT request and then TLS records only.
    for sent in c.relay.sent:
        head, sep, rest = bytes(sent).partition(b"\r\n\r\n")
        target = f"localhost:{c.mock.port}"
        assert sep and head.split(b"\r\n") == [f"CONNECT {target} HTTP/1.1".encode(),
                                               f"Host: {target}".encode()], head
        assert rest[:1] == b"\x16", "a TLS handshake record follows the CONNECT"
    assert c.mock.received()[-1]["headers"]["authorization"] in {f"Bearer {k}" for k in KEYS}


def test_a_proxy_that_refuses_the_connect_gives_a_503_and_nothing_reaches_the_provider(
        started, start_envoy, certs):
    mock = start(started, Mock(KEYS, tls=(certs["provider.pem"], certs["provider.key"], certs["ca.pem"])))
    proxy = start(started, Tinyproxy(connect_ports=[443]))     # not the mock's port
    e = tunnel_gateway(start_envoy, mock, certs, proxy.port)
    status, _, body = ask(e)
    assert status == 503, body
    assert mock.received() == []
    # The first attempt and the route's 3 retries (connect-failure), each refused by the proxy.
    assert proxy.requests() == [f"CONNECT localhost:{mock.port} HTTP/1.1"] * 4, proxy.logs()[-2000:]
    budget = settled_budget(e)
    assert Decimal(budget["spent"]) == 0, budget
    assert {k["state"] for k in management(e, "keys")["keys"]} == {"available"}, "the proxy failed, not a key"


@pytest.mark.parametrize("kind", PATTERNS)
def test_a_429_through_the_egress_hop_is_retried_on_another_key_and_cools_the_key(
        kind, started, start_envoy, certs):
    c = chain(kind, started, start_envoy, certs)
    c.mock.behavior(KEYS[0], status=429, headers={"retry-after": "300"})
    results = [ask(c.gateway, f"request {i}") for i in range(6)]
    assert [s for s, _, _ in results] == [200] * 6, [b for _, _, b in results]
    assert all(h["x-apikeyrouter-key-id"] in ("openai-2", "openai-3") for _, h, _ in results)
    tried = [r["key"] for r in c.mock.received()]
    assert tried.count(KEYS[0]) == 1, "a cooling key is not chosen again"
    assert sum(1 for _, h, _ in results if h["x-apikeyrouter-attempts"] == "2") == 1
    states = {k["id"]: k["state"] for k in management(c.gateway, "keys")["keys"]}
    assert states["openai-1"] == "throttled" and states["openai-2"] == states["openai-3"] == "available", states


@pytest.mark.parametrize("kind", PATTERNS)
def test_an_egress_hop_that_is_down_gives_the_caller_a_503_and_charges_nothing(
        kind, started, start_envoy, certs):
    c = chain(kind, started, start_envoy, certs)
    c.hop.stop()
    c.relay.stop()
    status, headers, body = ask(c.gateway, "nobody will answer this")
    assert status == 503, body
    assert b"upstream connect error" in body, body
    assert c.mock.received() == []
    budget = settled_budget(c.gateway)
    assert Decimal(budget["spent"]) == 0, budget
    keys = management(c.gateway, "keys")["keys"]
    assert all(k["counters"]["successes"] == k["counters"]["total_tokens"] == 0 for k in keys), keys
    # The hop failed, not a key: every key stays available.
    assert {k["state"] for k in keys} == {"available"}, [(k["id"], k["state"]) for k in keys]


def test_the_egress_envoy_refuses_a_gateway_without_the_client_certificate(started, start_envoy, certs):
    mock = start(started, Mock(KEYS, tls=(certs["provider.pem"], certs["provider.key"], certs["ca.pem"])))
    egress = egress_envoy(start_envoy, mock, certs)
    e = mtls_gateway(start_envoy, mock, certs, egress.port, client_certificate=False)
    status, _, body = ask(e)
    assert status == 503, body
    assert mock.received() == []
    stats = egress.stats("ssl.fail_verify_no_cert")
    assert sum(int(v) for k, v in stats.items() if k.endswith("ssl.fail_verify_no_cert")) >= 1, stats
    assert Decimal(settled_budget(e)["spent"]) == 0
    # A client with the CA but no certificate of its own gets no HTTP answer.
    ctx = ssl.create_default_context(cafile=certs["ca.pem"])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection(("127.0.0.1", egress.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="egress.internal") as s:
                s.sendall(b"GET /v1/models HTTP/1.1\r\nhost: api.openai.com\r\n\r\n")
                if not s.recv(100):
                    raise ConnectionError("closed without an answer")
    # With it, the same request goes through.
    ctx.load_cert_chain(certs["client.pem"], certs["client.key"])
    with socket.create_connection(("127.0.0.1", egress.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="egress.internal") as s:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nhost: api.openai.com\r\nauthorization: Bearer "
                      + KEYS[0].encode() + b"\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200"), "the egress gateway serves a client with the certificate"


# --- The files themselves: no hop without TLS --------------------------------


def shipped(path):
    return yaml.safe_load(shipped_text(path))


def names_checked(tls):
    """(SNI, the DNS subject alt names an upstream or downstream TLS context
    accepts, its CA file)."""
    vc = tls["common_tls_context"]["validation_context"]
    return (tls.get("sni"), [m["matcher"]["exact"] for m in vc["match_typed_subject_alt_names"]
                             if m["san_type"] == "DNS"], vc["trusted_ca"]["filename"])


def test_the_tunnel_config_does_tls_to_the_provider_inside_the_connect_and_names_the_proxy():
    cluster = clusters(shipped(TUNNEL))["openai"]
    outer = cluster["transport_socket"]["typed_config"]
    assert outer["@type"] == CONNECT_TYPE
    tls = outer["transport_socket"]["typed_config"]
    assert tls["@type"] == TLS_TYPE
    assert names_checked(tls) == ("api.openai.com", ["api.openai.com"], SYSTEM_CAS)
    lb = endpoint(cluster)
    assert lb["endpoint"]["address"]["socket_address"] == {"address": "api.openai.com", "port_value": 443}
    assert set(lb["metadata"]["typed_filter_metadata"][PROXY_ADDRESS]["socket_address"]) == {
        "address", "port_value"}


def test_the_mtls_config_shows_a_client_certificate_and_checks_the_egress_gateways_name():
    raw = yaml.safe_load(MTLS.read_text())
    tls = clusters(raw)["openai"]["transport_socket"]["typed_config"]
    assert tls["@type"] == TLS_TYPE
    assert names_checked(tls) == ("egress.internal", ["egress.internal"], "/etc/envoy/egress-ca.pem")
    assert tls["common_tls_context"]["tls_certificates"] == [
        {"certificate_chain": {"filename": "/etc/envoy/egress-client.pem"},
         "private_key": {"filename": "/etc/envoy/egress-client.key"}}]


def test_the_egress_gateway_config_validates_requires_the_client_certificate_and_checks_the_provider():
    text = shipped_text(EGRESS_GATEWAY)
    path = Path(tempfile.mkdtemp(prefix="akr-egress-")) / "egress-gateway.yaml"
    path.write_text(text)
    code, out = validate(path, SHIPPED_ENV)
    assert code == 0, out[-3000:]
    raw = yaml.safe_load(EGRESS_GATEWAY.read_text())
    for chain_ in listener(raw, "egress")["filter_chains"]:
        down = chain_["transport_socket"]["typed_config"]
        assert down["require_client_certificate"] is True
        assert names_checked(down) == (None, ["apikeyrouter"], "/etc/envoy/egress-ca.pem")
    up = clusters(raw)["openai"]["transport_socket"]["typed_config"]
    assert names_checked(up) == ("api.openai.com", ["api.openai.com"], SYSTEM_CAS)
