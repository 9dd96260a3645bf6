"""envoy/fleet.yaml as shipped, in real Envoy, against a real etcd that
serves TLS and has its authentication enabled (issue 17, point 7).

The file is taken as it is (harness.shipped_on_loopback) and only what ties
it to a deployment changes: ports picked at run time, the module path, the
CA file (a throwaway CA made for the test), etcd's address (127.0.0.1 and
the test etcd's port; the name Envoy checks stays the shipped one), the
openai cluster (the mock, plain HTTP), the example client's key and the
node id. etcd gets root and the shipped user, with a role that may read and
write the shipped prefix, as the README says.

- Two replicas sync through etcd: what one spends is in etcd under its name
  and in the other's view of the budget.
- A replica with a wrong password never syncs: it says why, counts the
  failures, turns degraded, keeps serving, tries again no more often than
  every 2 s, and logs neither password.
- etcd with a certificate from the same CA for another name: the SAN check
  refuses it, and the replica turns degraded and keeps serving.
- etcd with --client-cert-auth: the file as shipped is refused, and syncs
  once its commented client certificate is put in, as its header says."""

import json
import re
import time
from decimal import Decimal

import pytest
import yaml

from harness import (ROOT, TlsEtcd, _b64, _unb64, chat, distinct_ports, http, make_certs, management, secrets,
                     shipped_on_loopback, shipped_text, wait_until, wasm_filter_configs)
from test_shipped_configs import health_port

SHIPPED = ROOT / "envoy" / "fleet.yaml"
CLIENT_KEY = "vk-fleet-yaml-client-0123456789"
PASSWORD = "etcd-pw-of-the-fleet-yaml-test-4d9b17"
ROOT_PASSWORD = "root-pw-of-the-fleet-yaml-test-a3c8e2"


def shipped():
    """What the test takes from the file: its fleet section and its etcd
    cluster."""
    cfg = yaml.safe_load(shipped_text(SHIPPED))
    fleet = json.loads(next(wasm_filter_configs(cfg))["configuration"]["value"])["fleet"]
    [cluster] = [c for c in cfg["static_resources"]["clusters"] if c["name"] == fleet["etcd_cluster"]]
    return fleet, cluster


FLEET, ETCD_CLUSTER = shipped()
PREFIX = FLEET["prefix"]
# The name the shipped cluster checks etcd's certificate for.
ETCD_NAME = ETCD_CLUSTER["transport_socket"]["typed_config"]["sni"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA; etcd's certificate for the shipped name and an impostor's for
    another name, both from that CA; client certificates without a CN and
    with one."""
    return make_certs(tmp_path_factory.mktemp("certs"), {"etcd": ETCD_NAME, "impostor": "etcd.elsewhere"},
                      {"client": "", "client-cn": "apikeyrouter"})


@pytest.fixture
def start_etcd(certs):
    """Starts etcd over TLS with the certificate `server` and authentication
    enabled for the shipped user; removes every one started."""
    started = []

    def start(server="etcd", client_cert_auth=False):
        etcd = TlsEtcd(certs, server=server, client_cert_auth=client_cert_auth)
        started.append(etcd)
        etcd.start()
        etcd.enable_auth(PREFIX, FLEET["username"], PASSWORD, root_password=ROOT_PASSWORD)
        return etcd

    yield start
    for etcd in started:
        etcd.cleanup()


def with_client_certificate(text):
    """The file's text with its commented client certificate put in."""
    text, n = re.subn(r"^(\s*)# (tls_certificates:|- certificate_chain:|  private_key:)", r"\1\2", text,
                      flags=re.M)
    assert n == 3, "the shipped tls_certificates comment has three lines"
    return text


def start_replica(start_envoy, mock, etcd, certs, node, password=PASSWORD, client_certificate=None):
    """Envoy running envoy/fleet.yaml as replica `node`, in front of mock,
    syncing with etcd, with the commented client certificate put in when
    `client_certificate` names one of certs; its management listener's URL
    is `.management`."""
    gateway_port, management_port, admin_port = distinct_ports(3)
    text = shipped_text(SHIPPED, {"/etc/envoy/etcd-ca.pem": certs["ca.pem"]})
    if client_certificate:
        text = with_client_certificate(text).replace(
            "/etc/envoy/etcd-client.pem", certs[client_certificate + ".pem"]).replace(
            "/etc/envoy/etcd-client.key", certs[client_certificate + ".key"])
    cfg = shipped_on_loopback(text, gateway_port, management_port, admin_port, mock.port, CLIENT_KEY)
    cfg["node"]["id"] = node
    [cluster] = [c for c in cfg["static_resources"]["clusters"] if c["name"] == FLEET["etcd_cluster"]]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": etcd.port}

    def edit(c):
        c.clear()
        c.update(cfg)

    env = {f"OPENAI_KEY_{i + 1}": k for i, k in enumerate(secrets(3))}
    env[FLEET["password_env"]] = password
    e = start_envoy(mock, edit=edit, env=env, gateway_port=gateway_port, admin_port=admin_port)
    e.management = f"http://127.0.0.1:{management_port}"
    return e


def fleet_status(e):
    return management(e, "health")["fleet"]


def fleet_budget(e):
    """The shipped daily budget's spend: this replica's and the others'."""
    fleet = management(e, "budgets/daily")["fleet"]
    return {k: Decimal(fleet[k]) for k in ("instance_spent", "others_spent")}


def stat(e, name):
    """The filter's counter or gauge apikeyrouter.<name> (in Prometheus,
    apikeyrouter_fleet_degraded for fleet.degraded)."""
    full = "wasmcustom.apikeyrouter." + name
    return int(e.stats(full).get(full, "0"))


def etcd_calls(e):
    """Requests Envoy has sent to the etcd cluster."""
    return int(e.stats("cluster.etcd.upstream_rq_total").get("cluster.etcd.upstream_rq_total", "0"))


def served(e):
    status, _, body = chat(e.url, headers={"authorization": f"Bearer {CLIENT_KEY}"}, extra={"max_tokens": 5})
    return status, body


def marker(etcd, token, node):
    """What replica `node` spent on the shipped daily budget, as its marker
    in etcd says (None without one), read as root."""
    answer = etcd.call("kv/range", {"key": _b64(f"{PREFIX}/m/{node}/b/daily")}, token)
    kvs = answer.get("kvs") or []
    return Decimal(json.loads(_unb64(kvs[0]["value"]))["v"]) if kvs else None


def test_replicas_sync_over_tls_as_etcds_user_and_a_wrong_password_is_refused(
        mock3, start_envoy, start_etcd, certs):
    etcd = start_etcd()
    assert etcd.request("kv/range", {"key": _b64(PREFIX + "/")})[0] != 200, "etcd refuses a read without a token"
    a = start_replica(start_envoy, mock3, etcd, certs, "gw-1")
    b = start_replica(start_envoy, mock3, etcd, certs, "gw-2")
    wrong = start_replica(start_envoy, mock3, etcd, certs, "gw-3", password="not-the-etcd-password")
    for e in (a, b):
        wait_until(lambda: fleet_status(e)["syncs"] > 0, timeout=10, what="a sync over TLS as etcd's user")

    # What A spends is in etcd under A's name, and B counts it as the others'.
    for _ in range(2):
        status, body = served(a)
        assert status == 200, body
    token = etcd.token("root", ROOT_PASSWORD)
    wait_until(lambda: (marker(etcd, token, "gw-1") or 0) > 0, timeout=10, what="gw-1's spend marker in etcd")
    wait_until(lambda: fleet_budget(a)["instance_spent"] == marker(etcd, token, "gw-1"), timeout=10,
               what="the marker holding all A spent")
    spent = marker(etcd, token, "gw-1")
    wait_until(lambda: fleet_budget(b)["others_spent"] == spent, timeout=10, what="B counting A's spend")

    # The wrong password: refused by etcd, said and counted, and never
    # anything read or written; the replica keeps serving.
    wait_until(lambda: "authentication failed" in fleet_status(wrong)["last_error"], timeout=10,
               what="the wrong password refused")
    started, calls = time.monotonic(), etcd_calls(wrong)
    wait_until(lambda: management(wrong, "health")["status"] == "degraded", timeout=10, what="degraded")
    assert fleet_status(wrong)["syncs"] == 0
    assert stat(wrong, "fleet.sync_failures") >= 1
    assert stat(wrong, "fleet.degraded") == 1
    status, body = served(wrong)
    assert status == 200, body
    # Each try costs etcd a bcrypt: after a refusal the replica waits 2 s.
    elapsed = time.monotonic() - started
    tries = etcd_calls(wrong) - calls
    assert tries <= elapsed / 2 + 1, f"{tries} tries to log in within {elapsed:.1f} s"
    assert marker(etcd, token, "gw-3") is None
    logs = wrong.logs()
    assert "fleet: sync with etcd failed: etcd answered 400" in logs and "fleet: degraded" in logs

    # Neither password nor a token (etcd's simple tokens: 16 letters, a dot,
    # a number) shows in any log.
    for e in (a, b, wrong):
        logs = e.logs()
        assert PASSWORD not in logs and "not-the-etcd-password" not in logs
        assert not re.findall(r"\b[A-Za-z]{16}\.[0-9]+\b", logs)


def test_an_etcd_certificate_for_another_name_is_refused_and_the_replica_serves_degraded(
        mock3, start_envoy, start_etcd, certs):
    impostor = start_etcd(server="impostor")
    e = start_replica(start_envoy, mock3, impostor, certs, "gw-1")
    wait_until(lambda: management(e, "health")["status"] == "degraded", timeout=10, what="degraded")
    status = fleet_status(e)
    assert status["syncs"] == 0 and "etcd answered 503" in status["last_error"], status
    assert stat(e, "fleet.degraded") == 1
    # The readiness probe, through the health listener: degraded, still ready.
    status, _, body = http("GET", f"http://127.0.0.1:{health_port(e)}/apikeyrouter/health")
    assert (status, json.loads(body)) == (200, {"status": "degraded"})
    ssl = e.stats("cluster.etcd.ssl")
    assert int(ssl.get("cluster.etcd.ssl.fail_verify_san", "0")) > 0, ssl
    status, body = served(e)
    assert status == 200, body
    token = impostor.token("root", ROOT_PASSWORD)
    assert not impostor.call("kv/range", {"key": _b64(PREFIX + "/"), "range_end": _b64(PREFIX + "0")},
                             token).get("kvs"), "nothing written"


def test_with_client_cert_auth_the_commented_client_certificate_is_what_lets_a_replica_in(
        mock3, start_envoy, start_etcd, certs):
    etcd = start_etcd(client_cert_auth=True)
    as_shipped = start_replica(start_envoy, mock3, etcd, certs, "gw-1")
    with_cert = start_replica(start_envoy, mock3, etcd, certs, "gw-2", client_certificate="client")
    # With authentication on, etcd's JSON gateway refuses a client
    # certificate that has a subject CN (as fleet.yaml's comment says).
    with_cn = start_replica(start_envoy, mock3, etcd, certs, "gw-3", client_certificate="client-cn")
    wait_until(lambda: fleet_status(with_cert)["syncs"] > 0, timeout=10, what="a sync with the client certificate")
    wait_until(lambda: fleet_status(as_shipped)["failures"] > 0, timeout=10, what="the replica without one refused")
    wait_until(lambda: "CommonName of client" in fleet_status(with_cn)["last_error"], timeout=10,
               what="the certificate with a CN refused")
    for e in (as_shipped, with_cn):
        assert fleet_status(e)["syncs"] == 0
    assert "etcd answered 503" in fleet_status(as_shipped)["last_error"], "refused in the TLS handshake"
