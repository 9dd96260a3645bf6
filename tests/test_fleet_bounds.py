"""Fleet mode from the side of whoever can write to etcd (issue 17, point 7):
values outside their bounds are dropped, counted and removed, and keys and
budgets keep working; an oversized range answer is refused; and etcd's own
authentication (user and password traded for a token) works against a real
etcd with auth enabled, without the password or the token in any log."""

import json
import re
import subprocess
import time

import pytest

from harness import _b64, chat, make_certs, secrets, wait_until, Etcd, TlsEtcd
from test_fleet import PREFIX, after_two_syncs, fleet_plugin, health, shared_state, with_etcd

DAY_MS = 86_400_000
U64_MAX = 2**64 - 1


@pytest.fixture
def etcd():
    with Etcd() as e:
        yield e


def dropped(e):
    return int(e.stats("apikeyrouter.fleet.values_dropped")["wasmcustom.apikeyrouter.fleet.values_dropped"])


def start(start_envoy, mock, etcd, plugin, node="gw-1", env=None, host_env_keys=None):
    kw = {"env": env} if env else {}
    if host_env_keys:
        kw["host_env_keys"] = host_env_keys
    return start_envoy(mock, plugin=plugin, edit=with_etcd(etcd, node), **kw)


def test_a_poisoned_etcd_record_is_dropped_and_the_key_stays_available(mock3, etcd, start_envoy):
    plugin = fleet_plugin(secrets(3), budgets=[{"id": "daily", "window": "day", "limit": "1.00"}])
    e = start(start_envoy, mock3, etcd, plugin)
    wait_until(lambda: health(e)["fleet"]["syncs"] > 0, timeout=10, what="a first sync with etcd")
    assert dropped(e) == 0
    now = int(time.time() * 1000)
    day = now - now % DAY_MS
    # What an attacker with write access to etcd would write: k1 disabled
    # by a change "at the end of time" (no admin change is ever newer), k2
    # cooling for ten days, and a marker that spends the whole budget a
    # million times over.
    poison = {
        f"{PREFIX}/s/k1": {"state": "disabled", "reason": 2, "at_ms": U64_MAX, "cooldown_until_ms": 0,
                           "exhausted_until_ms": 0, "by": "evil"},
        f"{PREFIX}/s/k2": {"state": "available", "reason": 0, "at_ms": now, "cooldown_until_ms": now + 10 * DAY_MS,
                           "exhausted_until_ms": 0, "by": "evil"},
        f"{PREFIX}/m/evil/b/daily": {"w": day, "until": day + DAY_MS, "v": "1000000", "life": 1, "base": "0"},
    }
    for key, value in poison.items():
        etcd.put(key, json.dumps(value))
    after_two_syncs(e, "the poisoned values are read")

    # Every key stays available, the budget is not frozen, and requests go
    # through on every key.
    keys = e.key_counters()
    assert {k: v["state"] for k, v in keys.items()} == {"k1": "available", "k2": "available", "k3": "available"}
    status, _, body = e.admin_api("GET", "budgets/daily")
    budget = json.loads(body)
    assert budget["fleet"]["others_spent"] == "0", budget
    served = set()
    for _ in range(6):
        status, headers, body = chat(e.url, extra={"max_tokens": 5})
        assert status == 200, body
        served.add(headers["x-apikeyrouter-key-id"])
    assert served == {"k1", "k2", "k3"}
    # Dropped, counted, logged by key and reason, and removed from etcd.
    wait_until(lambda: dropped(e) >= 3, timeout=10, what="the three values counted as dropped")
    logs = e.logs()
    for key, why in [(f"{PREFIX}/s/k1", "its change time is in the future"),
                     (f"{PREFIX}/s/k2", "its cooldown is longer than cooldown.max_seconds"),
                     (f"{PREFIX}/m/evil/b/daily", "its count is above 10 times the limit")]:
        assert f'fleet: dropped "{key}" read from etcd: {why}' in logs, key
    wait_until(lambda: all(etcd.get(k) is None or json.loads(etcd.get(k)).get("by") != "evil" for k in poison),
               timeout=10, what="the poisoned values removed or overwritten")

    # The same path still takes what an instance could have written: a
    # disable reported now by another instance disables k1 here.
    count = dropped(e)
    etcd.put(f"{PREFIX}/s/k1", json.dumps({"state": "disabled", "reason": 2, "at_ms": int(time.time() * 1000),
                                           "cooldown_until_ms": 0, "exhausted_until_ms": 0, "by": "gw-2"}))
    after_two_syncs(e, "a legitimate state is read")
    assert e.key_counters()["k1"]["state"] == "disabled"
    assert shared_state(etcd, "k1")["by"] == "gw-2"
    assert dropped(e) == count


def test_an_oversized_range_answer_is_refused_and_the_instance_keeps_serving(mock3, etcd, start_envoy):
    plugin = fleet_plugin(secrets(3), fleet={"max_range_bytes": 65536})
    e = start(start_envoy, mock3, etcd, plugin)
    wait_until(lambda: health(e)["fleet"]["syncs"] > 0, timeout=10, what="a first sync with etcd")
    etcd.put(f"{PREFIX}/junk", "x" * 100_000)
    wait_until(lambda: health(e)["status"] == "degraded", timeout=10, what="the instance degraded")
    assert dropped(e) >= 1
    assert "above fleet.max_range_bytes (65536): dropped" in health(e)["fleet"]["last_error"]
    status, _, body = chat(e.url, extra={"max_tokens": 5})
    assert status == 200, body
    etcd.delete(f"{PREFIX}/junk")
    wait_until(lambda: health(e)["status"] == "healthy", timeout=10, what="healthy once the answer fits")


# --- etcd's own authentication ------------------------------------------------

ROOT_PW = "root-pw-for-the-test-etcd"
GW_PW = "gw-pw-7f3a9c1e5b2d8046"


def enable_auth(etcd):
    """Root, and a user `gw` that may read and write only the prefix."""
    etcd.enable_auth(PREFIX, "gw", GW_PW, root_password=ROOT_PW)


def root_token(etcd):
    return etcd.token("root", ROOT_PW)


def restart_with_auth(etcd):
    """Restarts etcd (same ports and data); ready once root can log in (the
    harness's readiness check reads without a token)."""
    etcd.stop()
    etcd.proc = subprocess.Popen(etcd.command(), stdout=etcd.log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
    wait_until(lambda: etcd.request("auth/authenticate", {"name": "root", "password": ROOT_PW})[0] == 200,
               timeout=20, what="etcd back, with auth")


def test_etcd_auth_a_user_syncs_and_strangers_do_not(mock3, etcd, start_envoy):
    enable_auth(etcd)
    status, answer = etcd.request("kv/range", {"key": _b64(PREFIX + "/")})
    assert status != 200, "etcd refuses a read without a token"
    budgets = [{"id": "daily", "window": "day", "limit": "100"}]
    keys = ["APIKEYROUTER_ADMIN_TOKEN", "ETCD_PASSWORD"]
    user = fleet_plugin(secrets(3), budgets=budgets, fleet={"username": "gw", "password_env": "ETCD_PASSWORD"})
    a = start(start_envoy, mock3, etcd, user, node="gw-1", env={"ETCD_PASSWORD": GW_PW}, host_env_keys=keys)
    wrong = start(start_envoy, mock3, etcd, user, node="gw-2", env={"ETCD_PASSWORD": "not-the-password"},
                  host_env_keys=keys)
    anonymous = start(start_envoy, mock3, etcd, fleet_plugin(secrets(3), budgets=budgets), node="gw-3")

    wait_until(lambda: health(a)["fleet"]["syncs"] > 0, timeout=10, what="a sync as user gw")
    for status, headers, body in [chat(a.url, extra={"max_tokens": 5}) for _ in range(2)]:
        assert status == 200, body
    # What A spent is in etcd, under A's name: read back as root.
    token = root_token(etcd)

    def a_marker():
        status, answer = etcd.request("kv/range", {"key": _b64(f"{PREFIX}/m/gw-1/b/daily")}, token)
        return status == 200 and answer.get("kvs")
    wait_until(a_marker, timeout=10, what="gw-1's spend marker in etcd")

    # Without the right password, or without credentials, nothing is read
    # or written, and the instance says why.
    for e, why in [(wrong, "authentication failed"), (anonymous, "etcd has authentication enabled")]:
        wait_until(lambda: health(e)["fleet"]["failures"] > 0 and why in health(e)["fleet"]["last_error"],
                   timeout=10, what=f"the sync refused ({why})")
        assert health(e)["fleet"]["syncs"] == 0
    status, answer = etcd.request("kv/range", {"key": _b64(f"{PREFIX}/m/"), "range_end": _b64(f"{PREFIX}/m0")},
                                  token)
    writers = {kv["key"] for kv in answer.get("kvs", [])}
    assert writers == {_b64(f"{PREFIX}/m/gw-1/b/daily")}, writers

    # etcd restarts: its tokens are gone; A logs in again and syncs on.
    restart_with_auth(etcd)
    start_syncs = health(a)["fleet"]["syncs"]
    wait_until(lambda: health(a)["fleet"]["syncs"] >= start_syncs + 2 and health(a)["status"] == "healthy",
               timeout=20, what="A syncing again after etcd's restart")

    # Neither a password nor a token (etcd's simple tokens: 16 letters, a
    # dot, a number) shows in any log.
    for e in (a, wrong, anonymous):
        logs = e.logs()
        for secret in (GW_PW, "not-the-password", ROOT_PW, token):
            assert secret not in logs
        assert not re.findall(r"\b[A-Za-z]{16}\.[0-9]+\b", logs)


# --- etcd over TLS with a SAN check (what envoy/fleet.yaml's etcd cluster needs) ---

SAN = "etcd.fleet.internal"


def etcd_tls_cluster(certs, san):
    """The transport socket envoy/fleet.yaml's `etcd` cluster needs: TLS with
    SNI, the CA that signed etcd's certificate, a SAN check, and a client
    certificate (etcd --client-cert-auth)."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": SAN,
        "common_tls_context": {
            "tls_certificates": [{"certificate_chain": {"filename": certs["client.pem"]},
                                  "private_key": {"filename": certs["client.key"]}}],
            "validation_context": {
                "trusted_ca": {"filename": certs["ca.pem"]},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": san}}]}}}}


def with_tls_etcd(etcd, node_id, certs, san):
    plain = with_etcd(etcd, node_id)

    def edit(cfg):
        plain(cfg)
        cfg["static_resources"]["clusters"][-1]["transport_socket"] = etcd_tls_cluster(certs, san)
    return edit


def test_etcd_over_tls_syncs_only_when_the_certificate_names_etcd(mock3, start_envoy, tmp_path):
    certs = make_certs(tmp_path, {"server": SAN})
    etcd = TlsEtcd(certs, client_cert_auth=True).start()
    try:
        plugin = fleet_plugin(secrets(3))
        good = start_envoy(mock3, plugin=plugin, edit=with_tls_etcd(etcd, "gw-1", certs, SAN))
        # A certificate from the right CA but for another name: refused.
        impostor = start_envoy(mock3, plugin=plugin, edit=with_tls_etcd(etcd, "gw-2", certs, "etcd.elsewhere"))
        wait_until(lambda: health(good)["fleet"]["syncs"] > 0, timeout=10, what="a sync over TLS")
        wait_until(lambda: health(impostor)["fleet"]["failures"] > 0, timeout=10, what="the SAN check refusing")
        assert health(impostor)["fleet"]["syncs"] == 0
        assert "etcd answered 503" in health(impostor)["fleet"]["last_error"], health(impostor)["fleet"]
        stats = impostor.stats("cluster.etcd.ssl")
        assert int(stats.get("cluster.etcd.ssl.fail_verify_san", "0")) > 0, stats
    finally:
        etcd.cleanup()
