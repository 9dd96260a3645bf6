"""Alerts through real Envoy (issue 22, point 6): a local HTTP server in the
test is the webhook behind an Envoy cluster. A soft budget spent through the
mock by concurrent requests on four workers posts its 50, 80 and 100% events
exactly once each; a webhook that fails first gets the event again and, once
it answers 2xx, never again; a key the provider disables or exhausts posts
one event per change. No event holds key material.

"Exactly once" is checked without waiting for time to pass: every event the
filter queues counts in apikeyrouter.alerts.queued, every one the webhook
acknowledged in apikeyrouter.alerts.sent; once every request is charged
(events are queued in the charge itself) and sent == queued, nothing more
can come."""

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import PRICES, _b64, budget_of, http, plugin_with_keys, prefix_range_end, secrets, wait_until
from test_budget_scopes import cost_of, request_body


class Webhook:
    """A webhook on loopback that records each POST and answers `fail_first`
    of them 503 before answering 204."""

    def __init__(self, fail_first=0):
        self.posts = []  # (status answered, path, headers, parsed body)
        self.fail_first = fail_first
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with hook.lock:
                    status = 503 if len(hook.posts) < hook.fail_first else 204
                    hook.posts.append((status, self.path, dict(self.headers), json.loads(body)))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self, kind=None):
        """The events the webhook acknowledged (2xx), in order."""
        with self.lock:
            return [b for s, _, _, b in self.posts if s < 300 and (kind is None or b["type"] == kind)]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook(started):
    def start(**kw):
        w = Webhook(**kw)
        started.append(w)
        return w
    return start


def with_webhook(hook):
    """A cluster `hooks` for the webhook (HTTP/1.1 on loopback)."""
    def edit(cfg):
        cfg["static_resources"]["clusters"].append({
            "name": "hooks", "type": "STATIC", "connect_timeout": "0.25s",
            "load_assignment": {"cluster_name": "hooks", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": hook.port}}}}]}]},
        })
    return edit


ALERTS = {"cluster": "hooks", "path": "/events", "headers": {"x-hook-token": "hook-token-1"}}
BODY = request_body("spend the budget")
REQUESTS = 20


def counters(e):
    stats = e.stats("apikeyrouter.alerts")
    return {k.rsplit(".", 1)[1]: int(v) for k, v in stats.items() if k.startswith("wasmcustom.apikeyrouter.alerts.")}


def all_sent(e, at_least):
    """Waits until the filter has queued at least `at_least` events and the
    webhook acknowledged every one queued; returns the counters."""
    def done():
        c = counters(e)
        return c.get("queued", 0) >= at_least and c.get("sent") == c.get("queued") and c
    wait_until(done, timeout=30, what=f"{at_least} events queued and sent")
    return counters(e)


def chat(e, body=BODY):
    status, _, raw = http("POST", e.url + "/v1/chat/completions", body, {"content-type": "application/json"})
    return status, raw


def spend(e, n):
    """n requests, eight at a time (spread over the workers); waits until
    budget `daily` has charged them all."""
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: chat(e)[0], range(n)))
    assert statuses == [200] * n
    wait_until(lambda: budget_of(e, "daily")["requests"] == n and budget_of(e, "daily")["reserved"] == "0",
               what=f"{n} requests charged")


def test_budget_thresholds_post_one_event_each_across_four_workers(mock3, start_envoy, webhook):
    hook = webhook()
    keys = secrets(3)
    # The limit is ten requests' cost: 20 requests pass 50, 80 and 100%.
    limit = cost_of(BODY) * 10
    plugin = plugin_with_keys(keys, prices=PRICES, alerts=ALERTS, budgets=[
        {"id": "daily", "window": "day", "limit": str(limit), "enforcement": "soft", "alerts": [0.5, 0.8, 1.0]}])
    e = start_envoy(mock3, plugin=plugin, concurrency=4, edit=with_webhook(hook))
    spend(e, REQUESTS)
    c = all_sent(e, 3)
    assert (c["queued"], c["sent"], c["failed"], c["dropped"]) == (3, 3, 0, 0)
    events = hook.delivered("budget_threshold")
    assert sorted(ev["threshold"] for ev in events) == [0.5, 0.8, 1]
    for ev in events:
        t = Decimal(str(ev["threshold"]))
        assert (ev["budget"], ev["limit"], ev["window"]) == ("daily", format(limit.normalize(), "f"), "day")
        # Posted by the request whose charge reached it: at most one
        # request's cost past the threshold.
        assert t * limit <= Decimal(ev["spend"]) < t * limit + cost_of(BODY), ev
        assert ev["timestamp_ms"] > 0 and "instance" in ev
    _, path, headers, _ = hook.posts[0]
    assert path == "/events" and headers["x-hook-token"] == "hook-token-1"
    assert headers["content-type"] == "application/json"
    assert len(hook.posts) == 3, "nothing but the three events"
    assert not any(k in json.dumps(hook.posts) for k in keys)


def test_a_webhook_that_fails_first_gets_the_event_again_and_once_delivered_never_again(
        mock3, start_envoy, webhook):
    hook = webhook(fail_first=2)
    limit = cost_of(BODY) * 4
    plugin = plugin_with_keys(secrets(3), prices=PRICES, alerts=ALERTS, budgets=[
        {"id": "daily", "window": "day", "limit": str(limit), "enforcement": "soft", "alerts": [0.5]}])
    e = start_envoy(mock3, plugin=plugin, concurrency=2, edit=with_webhook(hook))
    spend(e, 3)
    c = all_sent(e, 1)
    assert (c["queued"], c["sent"], c["failed"]) == (1, 1, 2)
    assert [s for s, _, _, _ in hook.posts] == [503, 503, 204], "refused twice, retried, then delivered once"
    assert [b["threshold"] for b in hook.delivered()] == [0.5]
    assert all(b == hook.posts[0][3] for _, _, _, b in hook.posts), "the same event each time"


def test_keys_disabled_or_exhausted_by_the_provider_post_one_event_each(mock3, start_envoy, webhook):
    hook = webhook()
    keys = secrets(3)
    plugin = plugin_with_keys(keys, alerts=ALERTS)
    e = start_envoy(mock3, plugin=plugin, concurrency=2, edit=with_webhook(hook))
    # k1 is refused as a bad key, k2 is out of quota; k3 serves.
    mock3.behavior(keys[0], status=401)
    quota = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                       "code": "insufficient_quota"}}
    mock3.behavior(keys[1], status=429, body=quota)
    # Until the key choice has tried both (each request is then served by k3).
    for _ in range(30):
        assert chat(e)[0] == 200
        if {keys[0], keys[1]} <= {r["key"] for r in mock3.received()}:
            break
    c = all_sent(e, 2)
    assert c["queued"] == 2, c
    got = sorted((ev["type"], ev["key"], ev["provider"]) for ev in hook.delivered())
    assert got == [("key_disabled", "k1", "openai"), ("key_exhausted", "k2", "openai")]
    exhausted = hook.delivered("key_exhausted")[0]
    assert exhausted["reason"] == "provider reported insufficient_quota" and exhausted["until"].endswith("T00:00:00Z")
    assert not any(k in json.dumps(hook.posts) for k in keys)


def test_in_fleet_mode_each_threshold_of_a_fleet_wide_budget_is_posted_once_by_one_instance(
        mock3, start_envoy, webhook):
    """Two instances share etcd (with authentication) and one webhook. Each
    crosses 50, 80 and 100% of the fleet-wide budget with its own charge: A
    first, then B once it has read A's spend. Each threshold is claimed in
    etcd before it is posted, so the webhook gets each once; the instance
    that lost a claim counts it in alerts.claimed_elsewhere."""
    from harness import Etcd
    from test_fleet import PREFIX, after_two_syncs, fleet_plugin, health, with_etcd
    from test_fleet_bounds import GW_PW, enable_auth, root_token

    hook = webhook()
    keys = secrets(3)
    limit = cost_of(BODY) * 10
    budgets = [{"id": "daily", "window": "day", "limit": str(limit), "enforcement": "soft",
                "alerts": [0.5, 0.8, 1.0]}]
    with Etcd() as etcd:
        enable_auth(etcd)
        plugin = fleet_plugin(keys, alerts=ALERTS, budgets=budgets,
                              fleet={"username": "gw", "password_env": "ETCD_PASSWORD"})
        env_keys = ["APIKEYROUTER_ADMIN_TOKEN", "ETCD_PASSWORD"]

        def edit(node):
            def both(cfg):
                with_etcd(etcd, node)(cfg)
                with_webhook(hook)(cfg)
            return both

        a, b = (start_envoy(mock3, plugin=plugin, edit=edit(n), env={"ETCD_PASSWORD": GW_PW},
                            host_env_keys=env_keys) for n in ("gw-1", "gw-2"))
        for e in (a, b):
            wait_until(lambda: health(e)["fleet"]["syncs"] > 0, timeout=10, what="a first sync with etcd")
            # A first charge on each, below every threshold (10% each).
            assert chat(e)[0] == 200
        for e in (a, b):
            after_two_syncs(e, "each other's first charge")
        # A alone takes the fleet past 100% (12 of 10 requests' cost)...
        for _ in range(10):
            assert chat(a)[0] == 200
        after_two_syncs(b, "A's spend")
        # ...and B, having read it, crosses 50, 80 and 100% with one charge.
        assert budget_of(b, "daily")["requests"] == 1
        assert chat(b)[0] == 200

        def settled():
            cs = [counters(e) for e in (a, b)]
            return all(c["queued"] >= 3 and c["queued"] == c["sent"] + c["claimed_elsewhere"] for c in cs)
        wait_until(settled, timeout=30, what="every queued event posted or claimed elsewhere")
        ca, cb = (counters(e) for e in (a, b))
        assert (ca["queued"], cb["queued"]) == (3, 3), "each instance crossed every threshold"
        assert ca["sent"] + cb["sent"] == 3 and ca["claimed_elsewhere"] + cb["claimed_elsewhere"] == 3, (ca, cb)
        assert (ca["dropped"], cb["dropped"]) == (0, 0)
        events = hook.delivered("budget_threshold")
        assert sorted(ev["threshold"] for ev in events) == [0.5, 0.8, 1], events
        assert len(hook.posts) == 3, "nothing but the three events"
        # The claims are in etcd, one per threshold, naming who posted it.
        token = root_token(etcd)
        status, answer = etcd.request("kv/range", {"key": _b64(f"{PREFIX}/~a/daily/"),
                                                   "range_end": _b64(prefix_range_end(f"{PREFIX}/~a/daily/"))}, token)
        assert status == 200, answer
        claims = {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"]))
                  for kv in answer.get("kvs", [])}
        # <prefix>/~a/daily/<window start>/<threshold>/<limit>
        assert sorted(k.split("/")[-2] for k in claims) == ["0.5", "0.8", "1"], claims
        assert {k.split("/")[-1] for k in claims} == {format(limit.normalize(), "f")}, claims
        posted_by = sorted(ev["instance"] for ev in events)
        assert posted_by == sorted(c["instance"] for c in claims.values())
        assert not any(k in json.dumps(hook.posts) for k in keys)
