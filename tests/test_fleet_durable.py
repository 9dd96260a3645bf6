"""Fleet mode keeps the admin's changes in etcd: a key registered at runtime,
a budget limit override and an admin key state set on one instance appear on
the other and survive an Envoy restart; a deletion reaches every instance;
etcd holds the key material only as Fernet ciphertext under
APIKEYROUTER_ENCRYPTION_KEY; records in etcd that do not open under it are
skipped (logged once), never applied, and never trap the VM."""

import json

import pytest
from cryptography.fernet import Fernet

from harness import (ADMIN_TOKEN, PRICES, Etcd, assert_no_trap, chat, plugin_with_keys, secrets, wait_until,
                     wasm_failure_stats)
from harness import budget_of as budget
from test_fleet import with_etcd

PREFIX = "/akr-durable"
RUNTIME_SECRET = "sk-runtime-material-0123456789"
ENV_KEYS = ["APIKEYROUTER_ADMIN_TOKEN", "APIKEYROUTER_ENCRYPTION_KEY"]


@pytest.fixture
def etcd():
    with Etcd() as e:
        yield e


def plugin(keys, **fleet):
    f = {"etcd_cluster": "etcd", "prefix": PREFIX, "sync_interval_ms": 200, "timeout_ms": 300,
         "degraded_after_ms": 1000, "local_share": "0.5", **fleet}
    return plugin_with_keys(keys, prices=PRICES, fleet=f,
                            budgets=[{"id": "daily", "window": "day", "limit": "100"}])


def start(start_envoy, mock, etcd, node, plugin_cfg, env):
    e = start_envoy(mock, plugin=plugin_cfg, env=env, host_env_keys=ENV_KEYS, edit=with_etcd(etcd, node))
    wait_until(lambda: syncs(e) > 0, timeout=10, what=f"{node}'s first sync with etcd")
    return e


def syncs(e):
    """The instance's finished syncs with etcd (GET health answers 503 when
    no key is usable, as after the deletion below: still read)."""
    _, _, body = e.admin_api("GET", "health")
    return json.loads(body)["fleet"]["syncs"]


def keys_of(e):
    status, _, body = e.admin_api("GET", "keys")
    assert status == 200, body
    return {k["id"]: k for k in json.loads(body)["keys"]}


def admin(e, method, path, body=None):
    status, _, answer = e.admin_api(method, path, body)
    assert RUNTIME_SECRET.encode() not in answer
    return status, json.loads(answer)


def after_two_syncs(e):
    start = syncs(e)
    wait_until(lambda: syncs(e) >= start + 2, timeout=10, what="two more syncs")


def skipped_lines(e, key):
    return [l for l in e.logs().splitlines() if "fleet: skipped" in l and key in l]


def test_runtime_key_limit_and_key_state_reach_the_other_instance_survive_a_restart_and_are_encrypted_in_etcd(
        start_envoy, start_mock, etcd):
    keys = secrets(1)
    mock = start_mock(keys + [RUNTIME_SECRET])
    fernet_key = Fernet.generate_key().decode()
    env = {"APIKEYROUTER_ENCRYPTION_KEY": fernet_key}
    # Written by someone who can reach etcd but holds no encryption key: a
    # plaintext runtime key of theirs, and garbage.
    forged = {"id": "evil", "provider": "openai", "secret": "sk-attacker-owned", "weight": 1,
              "metadata": {}, "deleted": False, "at_ms": 1}
    etcd.put(f"{PREFIX}/k/evil", json.dumps(forged))
    etcd.put(f"{PREFIX}/k/junk", "\x00not a record")
    cfg = plugin(keys)
    gw1 = start(start_envoy, mock, etcd, "gw-1", cfg, env)
    gw2 = start(start_envoy, mock, etcd, "gw-2", cfg, env)
    baseline = wasm_failure_stats(gw2)

    status, added = admin(gw1, "POST", "keys", {"id": "r1", "provider": "openai", "key_material": RUNTIME_SECRET})
    assert status == 201 and added["source"] == "runtime", added
    assert added["persistence"].startswith("pending"), added
    status, limited = admin(gw1, "PATCH", "budgets/daily", {"limit": "50"})
    assert (status, limited["limit"], limited["persistence"][:7]) == (200, "50", "pending"), limited
    status, disabled = admin(gw1, "PATCH", "keys/k1", {"state": "disabled", "reason": "rotating"})
    assert (status, disabled["state"]) == (200, "disabled"), disabled

    # etcd holds the key and the limit, the material only as ciphertext that
    # the standard Fernet opens with the same key.
    wait_until(lambda: etcd.get(f"{PREFIX}/k/r1") and etcd.get(f"{PREFIX}/l/daily"), timeout=10,
               what="the runtime key and the limit in etcd")
    stored = etcd.range_prefix(PREFIX + "/")
    assert not any(RUNTIME_SECRET in v for v in stored.values()), stored
    record = stored[f"{PREFIX}/k/r1"]
    assert record.startswith("fernet:gAAAA"), record
    opened = json.loads(Fernet(fernet_key.encode()).decrypt(record[len("fernet:"):].encode()))
    assert (opened["id"], opened["secret"], opened["deleted"]) == ("r1", RUNTIME_SECRET, False), opened.keys()
    limit = json.loads(Fernet(fernet_key.encode()).decrypt(stored[f"{PREFIX}/l/daily"][len("fernet:"):].encode()))
    assert (limit["budget"], limit["limit"]) == ("daily", "50"), limit

    # The other instance has all three, and routes to the runtime key with
    # its material: k1 is disabled, so r1 is the only key left.
    def has_everything(e):
        k = keys_of(e)
        return ("r1" in k and k["r1"]["source"] == "runtime" and k["k1"]["state"] == "disabled"
                and budget(e, "daily")["limit"] == "50")
    wait_until(lambda: has_everything(gw2), timeout=10, what="gw-2 to take the admin's changes")
    assert keys_of(gw2)["r1"]["fingerprint"] == added["fingerprint"]
    status, _, body = chat(gw2.url)
    assert status == 200, body
    assert mock.stats()[RUNTIME_SECRET]["requests"] == 1, mock.stats()

    # A restart of gw-1 (its shared data gone) finds them all in etcd.
    gw1.stop()
    gw1 = start(start_envoy, mock, etcd, "gw-1", cfg, env)
    wait_until(lambda: has_everything(gw1), timeout=10, what="the restarted gw-1 to load the admin's changes")
    status, _, body = chat(gw1.url)
    assert status == 200, body
    assert mock.stats()[RUNTIME_SECRET]["requests"] == 2

    # A deletion on gw-2 reaches the restarted gw-1, and etcd keeps it as a
    # deletion without material (so that no instance writes the key back).
    status, deleted = admin(gw2, "DELETE", "keys/r1")
    assert (status, deleted["deleted"], deleted["persistence"][:7]) == (200, True, "pending"), deleted
    wait_until(lambda: "r1" not in keys_of(gw1), timeout=10, what="the deletion to reach gw-1")
    tomb = json.loads(Fernet(fernet_key.encode()).decrypt(etcd.get(f"{PREFIX}/k/r1")[len("fernet:"):].encode()))
    assert (tomb["deleted"], tomb["secret"]) == (True, ""), tomb
    after_two_syncs(gw1)
    assert "r1" not in keys_of(gw1) and "r1" not in keys_of(gw2)

    # The admin's "available" on the restarted gw-1 is newer than the
    # "disabled" it loaded: it wins on gw-2 too.
    status, enabled = admin(gw1, "PATCH", "keys/k1", {"state": "available"})
    assert (status, enabled["state"]) == (200, "available"), enabled
    wait_until(lambda: keys_of(gw2)["k1"]["state"] == "available", timeout=10, what="k1 available on gw-2")

    # The forged and the damaged records were skipped: never listed, each
    # logged once per instance however many syncs read them, and counted.
    for e in (gw1, gw2):
        assert "evil" not in keys_of(e)
        assert len(skipped_lines(e, f"{PREFIX}/k/evil")) == 1, skipped_lines(e, "evil")
        assert "is not encrypted" in skipped_lines(e, f"{PREFIX}/k/evil")[0]
        assert len(skipped_lines(e, f"{PREFIX}/k/junk")) == 1
        assert int(e.stats("fleet.values_dropped").get("wasmcustom.apikeyrouter.fleet.values_dropped", 0)) >= 2
        assert RUNTIME_SECRET not in e.logs() and "sk-attacker-owned" not in e.logs()
    assert etcd.get(f"{PREFIX}/k/evil") is not None, "another's record is skipped, not removed"
    assert_no_trap(gw2, baseline)


def test_without_an_encryption_key_fleet_mode_refuses_runtime_keys_unless_plaintext_is_allowed(
        start_envoy, start_mock, etcd):
    keys = secrets(1)
    mock = start_mock(keys + [RUNTIME_SECRET])
    new_key = {"id": "r1", "provider": "openai", "key_material": RUNTIME_SECRET}
    strict = start(start_envoy, mock, etcd, "gw-1", plugin(keys), {})
    status, refused = admin(strict, "POST", "keys", new_key)
    assert (status, refused["error"]["code"]) == (409, "runtime_keys_not_durable"), refused
    after_two_syncs(strict)
    assert etcd.get(f"{PREFIX}/k/r1") is None and "r1" not in keys_of(strict)
    strict.stop()

    # Allowed explicitly: kept in etcd in plain text (as documented), and a
    # second instance gets it.
    cfg = plugin(keys, plaintext_runtime_keys=True)
    gw1 = start(start_envoy, mock, etcd, "gw-1", cfg, {})
    gw2 = start(start_envoy, mock, etcd, "gw-2", cfg, {})
    assert "plain text" in gw1.logs()
    status, added = admin(gw1, "POST", "keys", new_key)
    assert status == 201, added
    wait_until(lambda: "r1" in keys_of(gw2), timeout=10, what="gw-2 to take the plaintext runtime key")
    assert json.loads(etcd.get(f"{PREFIX}/k/r1"))["secret"] == RUNTIME_SECRET
