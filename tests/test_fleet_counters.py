"""The fleet counters by value in /stats/prometheus: apikeyrouter_fleet_syncs,
_sync_failures, _pushes, _push_conflicts, _states_applied and
_instance_conflicts, against a record of every call the instance made to
etcd.

One Envoy talks to a real etcd through EtcdTap, a proxy that forwards each
call and records how it ended. With a sync interval of a minute, syncs
happen only when this test makes them (new spend or a key-state change is
pushed at the next tick), so after each step the system goes quiet and each
counter must equal what the record implies: syncs the range reads etcd
answered, sync_failures the calls made while etcd was down, pushes and
push_conflicts the transactions etcd applied and refused. The test plays the
other instances by writing to etcd itself: a key state (states_applied), a
write that beats the instance's own (push_conflicts), and a marker under the
instance's id from another process life (instance_conflicts)."""

import base64
import http.client as httpclient
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import PRICES, budget_of, chat, plugin_with_keys, secrets, wait_until
from test_fleet import etcd, with_etcd  # noqa: F401 (etcd is a fixture)
from test_metric_values import prometheus

PREFIX = "/akr-counters"
INSTANCE = "gw-1"
COUNTERS = ("syncs", "sync_failures", "pushes", "push_conflicts", "states_applied", "instance_conflicts")


class EtcdTap:
    """An HTTP/1.1 proxy in front of etcd's JSON gateway that counts how each
    call ended: `range_ok` (the sync's range), `objects_ok` (its read of the
    object records) and `txn_ok` / `txn_refused` (etcd answered 200;
    a transaction whose compares failed is refused), `unreachable` (etcd did
    not answer; the caller gets a 503), `other` (any other answer).
    `before_txn(body)`, when set, is called with each transaction before it
    is forwarded; it is cleared once it returns true."""

    def __init__(self, etcd):
        self.etcd = etcd
        self.lock = threading.Lock()
        self.counts = Counter()
        self.in_flight = 0
        self.before_txn = None
        tap = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with tap.lock:
                    tap.in_flight += 1
                try:
                    status, data = tap._forward(self.path, body)
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with tap.lock:
                        tap.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _forward(self, path, body):
        txn = path.endswith("/kv/txn")
        if txn and self.before_txn is not None and self.before_txn(body):
            self.before_txn = None
        try:
            conn = httpclient.HTTPConnection("127.0.0.1", self.etcd.port, timeout=10)
            conn.request("POST", path, body, {"content-type": "application/json"})
            r = conn.getresponse()
            status, data = r.status, r.read()
            conn.close()
        except OSError:
            self._count("unreachable")
            return 503, b'{"error": "etcd unreachable"}'
        if status != 200:
            outcome = "other"
        elif txn:
            outcome = "txn_ok" if json.loads(data).get("succeeded") else "txn_refused"
        elif path.endswith("/kv/range") and base64.b64decode(json.loads(body).get("key", "")).endswith(b"/~o/"):
            # The sync's read of object records (issue 21): no counter of its own.
            outcome = "objects_ok"
        else:
            outcome = "range_ok" if path.endswith("/kv/range") else "other"
        # Counted before the answer leaves, so the instance never acts on an
        # answer the record does not have yet.
        self._count(outcome)
        return status, data

    def _count(self, outcome):
        with self.lock:
            self.counts[outcome] += 1

    def snapshot(self):
        """(counts, calls in flight)."""
        with self.lock:
            return Counter(self.counts), self.in_flight

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tap(etcd):
    t = EtcdTap(etcd)
    yield t
    t.stop()


def fleet_counters(e):
    m = prometheus(e)
    return {c: m.get(f"apikeyrouter_fleet_{c}{{}}") for c in COUNTERS}


def fleet_health(e):
    status, _, body = e.admin_api("GET", "health")
    assert status == 200, body
    return json.loads(body)["fleet"]


class Ledger:
    """What each counter must read, from the counters and the tap's record at
    a quiet moment (the baseline) plus what the tap recorded since and the
    states and id clashes this test caused."""

    def __init__(self, e, tap):
        self.e, self.tap = e, tap
        self.states_applied = 0
        self.clash_from = None  # the tap's range_ok count when the clash began
        self.base_counts, self.base = self._quiet(lambda counts, m: m["syncs"] == fleet_health(e)["syncs"])

    def _quiet(self, ok, what="the instance quiet"):
        """Waits until no call is in flight, the tap's record does not move
        while the counters are read, and ok(record, counters) holds."""
        seen = {}

        def check():
            counts, busy = self.tap.snapshot()
            m = fleet_counters(self.e)
            again, busy2 = self.tap.snapshot()
            seen.update(counts=dict(counts), counters=m)
            return not busy and not busy2 and counts == again and ok(counts, m)

        try:
            wait_until(check, timeout=20, what=what, errors=())
        except TimeoutError as err:
            raise AssertionError(f"{err}: last seen {seen}") from None
        return seen["counts"], seen["counters"]

    def expected(self, counts):
        d = {k: counts.get(k, 0) - self.base_counts.get(k, 0)
             for k in ("range_ok", "unreachable", "other", "txn_ok", "txn_refused")}
        return {
            "syncs": self.base["syncs"] + d["range_ok"],
            "sync_failures": self.base["sync_failures"] + d["unreachable"] + d["other"],
            "pushes": self.base["pushes"] + d["txn_ok"],
            "push_conflicts": self.base["push_conflicts"] + d["txn_refused"],
            "states_applied": self.base["states_applied"] + self.states_applied,
            "instance_conflicts": self.base["instance_conflicts"]
            + (counts.get("range_ok", 0) - self.clash_from if self.clash_from is not None else 0),
        }

    def check(self, what):
        """Waits for the quiet moment at which every counter reads what the
        record implies (each flush lands within a tick); returns the
        record. Fails naming what it last saw."""
        counts, m = self._quiet(lambda counts, m: m == self.expected(counts), what=what)
        assert m["syncs"] == fleet_health(self.e)["syncs"], "the counter and GET health agree"
        return counts

    def calls(self):
        return self.tap.snapshot()[0]


def wait_calls(tap, before, what, **want):
    """Waits until the tap has recorded exactly `want` more calls of each
    outcome named than `before` (and none in flight)."""
    def done():
        counts, busy = tap.snapshot()
        return not busy and all(counts[k] - before[k] == n for k, n in want.items())
    wait_until(done, timeout=20, what=what)


def state_json(state, at_ms, by, cooldown_until_ms=0):
    """A key state as instances write it to <prefix>/s/<key>."""
    return json.dumps({"cooldown_until_ms": cooldown_until_ms, "state": state, "reason": 0,
                       "exhausted_until_ms": 0, "at_ms": at_ms, "by": by})


def test_fleet_counters_equal_what_the_calls_to_etcd_imply(mock3, etcd, tap, start_envoy):
    keys = secrets(3)
    plugin = plugin_with_keys(keys, prices=PRICES, budgets=[{"id": "fb", "window": "day", "limit": "1000"}],
                              fleet={"etcd_cluster": "etcd", "prefix": PREFIX, "sync_interval_ms": 60000,
                                     "timeout_ms": 3000})
    # Envoy's cluster `etcd` reaches etcd through the tap (with_etcd takes its port).
    e = start_envoy(mock3, plugin=plugin, edit=with_etcd(tap, INSTANCE))
    wait_until(lambda: fleet_health(e)["syncs"] > 0, what="a first sync with etcd")
    book = Ledger(e, tap)
    assert {c: book.base[c] for c in COUNTERS if c != "syncs"} == {c: 0 for c in COUNTERS if c != "syncs"}
    marker = f"{PREFIX}/m/{INSTANCE}/b/fb"

    # New spend: pushed at the next tick, one range read and one
    # transaction (this instance's marker) per request.
    for i in range(2):
        before = book.calls()
        assert chat(e.url, content=f"spend {i}")[0] == 200
        wait_calls(tap, before, "the spend pushed", range_ok=1, txn_ok=1)
        book.check("syncs and pushes after new spend")
    assert json.loads(etcd.get(marker))["v"] == budget_of(e, "fb")["spent"]

    # A 429 cools a key; before its state reaches etcd, "another instance"
    # writes that key's state: the guarded write is refused, and goes
    # through at the next sync.
    cooled = {}
    keys_ids = ["k1", "k2", "k3"]

    def beat_it(body):
        for c in json.loads(body).get("compare", []):
            for k in keys_ids:
                if c["key"] == base64.b64encode(f"{PREFIX}/s/{k}".encode()).decode():
                    etcd.put(f"{PREFIX}/s/{k}", state_json("available", 0, "gw-other"))
                    cooled["key"] = k
                    return True
        return False

    tap.before_txn = beat_it
    mock3.behavior("*", status=429, times=1, headers={"retry-after": "120"})
    before = book.calls()
    status, headers, _ = chat(e.url, content="one attempt is rate limited")
    assert status == 200 and headers["x-apikeyrouter-attempts"] == "2", headers
    wait_calls(tap, before, "the cooldown's write refused", txn_refused=1)
    book.check("a push conflict")
    k = cooled["key"]
    assert e.key_counters()[k]["state"] == "throttled"
    assert json.loads(etcd.get(f"{PREFIX}/s/{k}"))["by"] == "gw-other"
    before = book.calls()
    assert chat(e.url, content="the next sync retries the state")[0] == 200
    wait_until(lambda: json.loads(etcd.get(f"{PREFIX}/s/{k}"))["by"] == INSTANCE, what="the cooldown written")
    assert json.loads(etcd.get(f"{PREFIX}/s/{k}"))["cooldown_until_ms"] > time.time() * 1000 + 100_000
    book.check("the retried push")
    assert book.calls()["txn_refused"] == before["txn_refused"], "refused once, then applied"

    # Another instance disables a key, then makes it available again: each
    # change applied here is one count.
    other = next(x for x in keys_ids if x != k)
    for state in ("disabled", "available"):
        etcd.put(f"{PREFIX}/s/{other}", state_json(state, int(time.time() * 1000), "gw-other"))
        assert chat(e.url, content=f"a sync that reads {other} {state}")[0] == 200
        wait_until(lambda: e.key_counters()[other]["state"] == state, what=f"{other} {state} by the fleet")
        book.states_applied += 1
        book.check(f"{other} {state} applied")
    status, _, body = e.admin_api("GET", "transitions")
    fleet_made = [t for t in json.loads(body)["transitions"]
                  if t["reason"] == "fleet: reported by instance gw-other"]
    assert [(t["id"], t["to"]) for t in fleet_made] == [(other, "available"), (other, "disabled")], body

    # etcd down: every sync attempted fails, one per request's new spend.
    etcd.kill()
    for i in range(3):
        before = book.calls()
        assert chat(e.url, content=f"spend while etcd is down {i}")[0] == 200
        wait_calls(tap, before, "a sync attempt while etcd is down", unreachable=1, range_ok=0)
    h = fleet_health(e)
    assert h["failures"] == 3 and "503" in h["last_error"], h
    book.check("sync failures while etcd is down")
    assert book.calls()["unreachable"] - book.base_counts.get("unreachable", 0) == 3
    etcd.start()
    before = book.calls()
    assert chat(e.url, content="etcd is back")[0] == 200
    wait_calls(tap, before, "a sync with etcd back", range_ok=1, txn_ok=1)
    assert fleet_health(e)["failures"] == 0
    book.check("syncs again after etcd returned")
    assert json.loads(etcd.get(marker))["v"] == budget_of(e, "fb")["spent"], "the outage's spend pushed"

    # A marker under this instance's id written by another process life:
    # every sync that sees it is an id clash, and the marker is left alone.
    mine = json.loads(etcd.get(marker))
    theirs = dict(mine, life=(mine["life"] + 1) % 2**64, v="0.5", base="0")
    etcd.put(marker, json.dumps(theirs))
    book.clash_from = book.calls()["range_ok"]
    for i in range(2):
        before = book.calls()
        assert chat(e.url, content=f"spend after the clash {i}")[0] == 200
        wait_calls(tap, before, "a sync that finds the clash", range_ok=1, txn_ok=0)
    counts = book.check("instance conflicts")
    assert counts["range_ok"] - book.clash_from == 2
    assert json.loads(etcd.get(marker)) == theirs, "this instance's spend is not pushed over the other's"
    assert e.logs().count(f'fleet: another Envoy process writes as instance "{INSTANCE}"') == 1
