"""Starting the mock provider and a real Envoy with the built filter.

Used by the real-Envoy tests and by `make run`. Every server listens on
127.0.0.1 on a port picked at run time.
"""

import asyncio
import copy
import hashlib
from decimal import Decimal
import http.client as httpclient
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "apikeyrouter.wasm"
DEMO_CONFIG = ROOT / "envoy" / "demo.yaml"
MOCK = ROOT / "mock" / "mock_provider.py"
DIALECTS = ROOT / "mock" / "dialects.py"

DEMO_KEYS = {"DEMO_KEY_1": "sk-demo-1", "DEMO_KEY_2": "sk-demo-2", "DEMO_KEY_3": "sk-demo-3"}
ADMIN_TOKEN = "demo-admin-token-change-me"
# The demo config's one client: its virtual key (the config holds only its SHA-256).
DEMO_CLIENT_KEY = "sk-gateway-demo-key-0001"


def envoy_bin():
    return os.environ.get("ENVOY_BIN") or str(ROOT / ".venv" / "bin" / "envoy")


def free_port(preferred=None):
    for candidate in ([preferred] if preferred else []) + [0]:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", candidate))
            return s.getsockname()[1]
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port")


def _polls(pred, timeout, what, errors):
    """Calls pred until it returns true, yielding between calls; after
    `timeout` seconds raises TimeoutError naming `what` and the last error.
    An exception from pred of a type in `errors` means "not yet"; any other
    is raised at once."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            if pred():
                return
        except errors as e:
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}"
                               + (f"; last error: {last!r}" if last else ""))
        yield


def wait_until(pred, timeout=20.0, interval=0.05, what="condition", errors=Exception):
    """Polls pred() every `interval` seconds until it returns true; fails
    with a TimeoutError naming `what` after `timeout` seconds. Exceptions
    from pred of the types in `errors` (by default any) count as not yet."""
    for _ in _polls(pred, timeout, what, errors):
        time.sleep(interval)


async def wait_until_async(pred, timeout=20.0, interval=0.05, what="condition", errors=Exception):
    """wait_until inside a coroutine: other tasks run between the polls."""
    for _ in _polls(pred, timeout, what, errors):
        await asyncio.sleep(interval)


def wait_recorded(envoy, attempts, timeout=15.0):
    """Waits until the key counters (admin API) record `attempts` upstream
    attempts in all; returns the counters by key id."""
    wait_until(lambda: sum(k["counters"]["requests"] for k in envoy.key_counters().values()) == attempts,
               timeout=timeout, what=f"{attempts} attempts recorded")
    return {kid: k["counters"] for kid, k in envoy.key_counters().items()}


def http(method, url, body=None, headers=None, timeout=30, context=None):
    """A plain HTTP/1.1 request (HTTPS with the ssl.SSLContext `context`);
    returns (status, headers dict, body bytes)."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        if isinstance(data, str):
            data = data.encode()
        hdrs.setdefault("content-type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


class Mock:
    """A mock provider in a subprocess: mock/mock_provider.py, or with
    script=DIALECTS the mock that speaks each provider's dialect."""

    def __init__(self, keys=None, rate_limited=(), port=None, script=MOCK, tls=None):
        """tls: (certificate, key, CA) files: the mock serves HTTPS only with
        that certificate, and the test's own calls trust the CA."""
        import ssl
        self.port = port or free_port()
        self.keys = list(keys or DEMO_KEYS.values())
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.context = None
        args = [sys.executable, str(script), "--port", str(self.port), "--keys", ",".join(self.keys)]
        if rate_limited:
            args += ["--rate-limited", ",".join(rate_limited)]
        if tls:
            cert, key, ca = tls
            args += ["--tls-cert", str(cert), "--tls-key", str(key)]
            self.context = ssl.create_default_context(cafile=str(ca))
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: http("GET", self.url + "/_mock/health", context=self.context)[0] == 200,
                   what=f"mock provider {Path(script).name}")

    def control(self, path, body=None):
        status, _, data = http("POST" if body is not None else "GET", self.url + path, body,
                               context=self.context)
        assert status == 200, (path, status, data)
        return json.loads(data)

    def behavior(self, key, **kw):
        return self.control("/_mock/behavior", {"key": key, **kw})

    def received(self):
        return self.control("/_mock/received")["received"]

    def stats(self):
        return self.control("/_mock/stats")

    def reset(self):
        return self.control("/_mock/reset", {})

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def fill(text, values):
    """Replaces ${NAME} placeholders; refuses to leave any unfilled."""
    for name, value in values.items():
        text = text.replace("${%s}" % name, str(value))
    if "${" in text:
        raise ValueError("unfilled placeholder in config: " + text[text.index("${"):][:40])
    return text


# The shipped configs (envoy/*.yaml) on this machine: what they read from
# /etc/envoy (the build's module; for envoy/fleet.yaml's etcd CA any CA
# file will do, as `envoy --mode validate` only reads it) and the
# environment they name in host_env_keys.
SHIPPED_FILES = {"/etc/envoy/apikeyrouter.wasm": str(WASM),
                 "/etc/envoy/etcd-ca.pem": "/etc/ssl/certs/ca-certificates.crt"}


def shipped_certificates():
    """The certificates the egress configs (envoy/egress-mtls.yaml,
    envoy/egress/egress-gateway.yaml) read from /etc/envoy, made once a
    run by make_certs in a temp dir (Envoy loads a certificate with its key,
    so any CA file will not do): {shipped path: file}."""
    global _SHIPPED_CERTS
    if _SHIPPED_CERTS is None:
        c = make_certs(tempfile.mkdtemp(prefix="akr-shipped-certs-"), {"egress": "egress.internal"},
                       {"client": ""})
        _SHIPPED_CERTS = {"/etc/envoy/egress-ca.pem": c["ca.pem"],
                          "/etc/envoy/egress-client.pem": c["client.pem"],
                          "/etc/envoy/egress-client.key": c["client.key"],
                          "/etc/envoy/egress-gateway.pem": c["egress.pem"],
                          "/etc/envoy/egress-gateway.key": c["egress.key"]}
    return _SHIPPED_CERTS


_SHIPPED_CERTS = None
SHIPPED_ENV = {"OPENAI_KEY_1": "sk-a", "OPENAI_KEY_2": "sk-b", "OPENAI_KEY_3": "sk-c",
               "DEMO_KEY_1": "sk-a", "DEMO_KEY_2": "sk-b", "DEMO_KEY_3": "sk-c",
               "AZURE_OPENAI_KEY": "az", "ANTHROPIC_KEY": "sk-ant", "GEMINI_KEY": "gm",
               "APIKEYROUTER_ADMIN_TOKEN": "an-admin-token-of-some-length", "ETCD_PASSWORD": "an-etcd-password"}


def shipped_text(path, files=None):
    """A shipped config's text with the files it reads from /etc/envoy
    swapped for SHIPPED_FILES (updated with `files`) and its ${...}
    placeholders filled with fixed ports."""
    text = path.read_text()
    for old, new in {**SHIPPED_FILES, **shipped_certificates(), **(files or {})}.items():
        text = text.replace(old, str(new))
    if "${" in text:
        text = fill(text, {"GATEWAY_PORT": 10000, "ADMIN_PORT": 9901, "MOCK_PORT": 18080, "WASM_PATH": WASM})
    return text


def listener(cfg, name):
    """A parsed Envoy config's listener of that name."""
    [found] = [l for l in cfg["static_resources"]["listeners"] if l["name"] == name]
    return found


def distinct_ports(n):
    """n free ports, no two the same."""
    ports = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def shipped_on_loopback(text, gateway_port, management_port, admin_port, mock_port, client_key):
    """A shipped gateway config's text (shipped_text of envoy/openai.yaml or
    envoy/fleet.yaml), parsed and changed only in what ties it to a
    deployment: its listeners on 127.0.0.1 (gateway and management on the
    given ports, health on a port the kernel picks), Envoy's admin API on
    admin_port (and the health listener's cluster to it), the openai cluster
    at the mock over plain HTTP, and the example client's key_sha256 that of
    client_key. Everything else stays as shipped."""
    cfg = yaml.safe_load(text)
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    for name, port in (("gateway", gateway_port), ("management", management_port)):
        listener(cfg, name)["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    # The health listener (/ready, /stats/prometheus) on a port the kernel
    # picks, proxying to this run's Envoy admin.
    listener(cfg, "health")["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    admin_ep = clusters["envoy_admin"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    admin_ep["address"]["socket_address"]["port_value"] = admin_port
    # The health listener's way to the management listener's health probe.
    if "apikeyrouter_management" in clusters:
        ep = clusters["apikeyrouter_management"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ep["address"]["socket_address"]["port_value"] = management_port
    cluster = clusters["openai"]
    del cluster["transport_socket"], cluster["dns_lookup_family"]
    cluster["type"] = "STATIC"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": mock_port}
    # The public plugin config (one YAML anchor for both stages).
    public = next(wasm_filter_configs(listener(cfg, "gateway")))["configuration"]
    plugin = json.loads(public["value"])
    [client] = plugin["clients"]
    client["key_sha256"] = sha256_hex(client_key)
    public["value"] = json.dumps(plugin)
    return cfg


def management(e, path):
    """GET /apikeyrouter/v1/<path> on the management listener of an Envoy
    running a shipped config (its URL is e.management), with the admin
    token; the decoded JSON of its 200."""
    status, _, body = http("GET", e.management + "/apikeyrouter/v1/" + path,
                           headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200, body
    return json.loads(body)


def render(template_text, gateway_port, admin_port, mock_port, plugin=None, host_env_keys=None,
           wasm=WASM):
    """Fills the demo config's placeholders and optionally swaps its plugin
    configuration (a dict or a raw string) and host_env_keys."""
    cfg = yaml.safe_load(fill(template_text, {
        "GATEWAY_PORT": gateway_port, "ADMIN_PORT": admin_port, "MOCK_PORT": mock_port,
        "WASM_PATH": wasm}))
    for wf in wasm_filter_configs(cfg):
        if plugin is not None:
            wf["configuration"]["value"] = plugin if isinstance(plugin, str) else json.dumps(plugin)
        if host_env_keys is not None:
            wf["vm_config"]["environment_variables"]["host_env_keys"] = list(host_env_keys)
    return cfg


# --- Walking a parsed Envoy config (YAML or JSON) ----------------------------

# How the @type of a wasm filter's typed_config ends (HTTP and network).
WASM_FILTER_TYPES = ("filters.http.wasm.v3.Wasm", "filters.network.wasm.v3.Wasm")


def nodes(doc):
    """Every node of a parsed document, depth first in document order: each
    dict, list and scalar, and each dict key."""
    yield doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield k
            yield from nodes(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from nodes(v)


def scalars(doc):
    """Every key and scalar value in a parsed document, as strings."""
    return {str(n) for n in nodes(doc) if not isinstance(n, (dict, list))}


def wasm_filter_configs(doc):
    """The `config` of every wasm filter (HTTP, upstream HTTP or network)
    anywhere in a parsed Envoy config, in document order, once each: a filter
    named envoy.filters.http.wasm (its typed_config.config), or a
    typed_config whose @type is a wasm filter's (its config)."""
    seen = set()
    for n in nodes(doc):
        if not isinstance(n, dict):
            continue
        if n.get("name") == "envoy.filters.http.wasm":
            cfg = n["typed_config"]["config"]
        elif str(n.get("@type", "")).endswith(WASM_FILTER_TYPES):
            cfg = n.get("config", {})
        else:
            continue
        if id(cfg) not in seen:
            seen.add(id(cfg))
            yield cfg


def hcm(cfg):
    """The first listener's HTTP connection manager (its typed_config)."""
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def route(cfg):
    """The first listener's first route's `route` action."""
    return hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]


class EnvoyExited(RuntimeError):
    """Envoy stopped before it was ready."""


class Envoy:
    """A real Envoy running the built filter."""

    def __init__(self, mock_port, plugin=None, env=None, host_env_keys=None, concurrency=2,
                 edit=None, gateway_port=None, admin_port=None, log_level="info"):
        # A port picked free can be taken by another process before Envoy
        # binds it (other test runs share the machine): then start again on
        # new ports, unless the caller chose them.
        for attempt in range(3):
            self._start(mock_port, plugin, env, host_env_keys, concurrency, edit,
                        gateway_port, admin_port, log_level)
            try:
                wait_until(self._ready, timeout=30, what="envoy to become ready", errors=OSError)
                return
            except (TimeoutError, EnvoyExited):
                self.stop()
                log = self.logs()
                if "Address already in use" in log and not (gateway_port or admin_port) and attempt < 2:
                    continue
                raise RuntimeError("envoy did not start:\n" + log[-4000:])

    def _start(self, mock_port, plugin, env, host_env_keys, concurrency, edit, gateway_port, admin_port,
               log_level):
        self.gateway_port = gateway_port or free_port()
        self.admin_port = admin_port or free_port()
        cfg = render(DEMO_CONFIG.read_text(), self.gateway_port, self.admin_port, mock_port,
                     plugin=plugin, host_env_keys=host_env_keys)
        if edit:
            edit(cfg)
        self.dir = tempfile.mkdtemp(prefix="akr-envoy-")
        self.config_path = os.path.join(self.dir, "envoy.json")
        with open(self.config_path, "w") as f:
            json.dump(cfg, f, indent=1)
        self.log_path = os.path.join(self.dir, "envoy.log")
        full_env = dict(os.environ)
        full_env.update(DEMO_KEYS)
        full_env["APIKEYROUTER_ADMIN_TOKEN"] = ADMIN_TOKEN
        full_env.update(env or {})
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [envoy_bin(), "-c", self.config_path, "--concurrency", str(concurrency),
             "--disable-hot-restart", "-l", log_level, "--log-format", "[%Y-%m-%d %T.%e][%l][%n] %v"],
            stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        self.url = f"http://127.0.0.1:{self.gateway_port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"

    def _ready(self):
        if self.proc.poll() is not None:
            raise EnvoyExited("envoy exited:\n" + self.logs()[-4000:])
        status, _, body = http("GET", self.admin_url + "/ready", timeout=2)
        return status == 200 and body.strip() == b"LIVE"

    def logs(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stats(self, filt=""):
        _, _, body = http("GET", self.admin_url + "/stats?filter=" + filt)
        out = {}
        for line in body.decode().splitlines():
            name, _, value = line.partition(": ")
            out[name] = value
        return out

    def admin_api(self, method, path, body=None, token=ADMIN_TOKEN):
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return http(method, self.url + "/apikeyrouter/v1/" + path, body, headers)

    def key_counters(self):
        status, _, body = self.admin_api("GET", "keys")
        assert status == 200, body
        return {k["id"]: k for k in json.loads(body)["keys"]}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def chat(url, content="hello", stream=False, headers=None, extra=None, timeout=30):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    body.update(extra or {})
    return http("POST", url + "/v1/chat/completions", body, headers, timeout=timeout)


def open_stream(url, body, headers=None):
    """Starts a streaming request; returns the http.client response to read from."""
    host, port = url.replace("http://", "").split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"content-type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def validate(config_path, env=None):
    """Runs `envoy --mode validate`; returns (exit code, output)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.run([envoy_bin(), "--mode", "validate", "-c", str(config_path),
                        "--disable-hot-restart"], capture_output=True, text=True, env=full_env,
                       timeout=120)
    return p.returncode, p.stdout + p.stderr


def deep(obj):
    return copy.deepcopy(obj)


def plugin_with_keys(secrets, **extra):
    """A plugin config with one provider and inline keys k1..kN."""
    cfg = {
        "providers": [{"id": "openai", "kind": "openai",
                       "keys": [{"id": f"k{i + 1}", "secret": s} for i, s in enumerate(secrets)]}],
        "cooldown": {"default_seconds": 60},
        "admin": {"token_env": "APIKEYROUTER_ADMIN_TOKEN"},
        # demo.yaml's access log prints the outcome: tests read it.
        "access_log_state": True,
    }
    cfg.update(extra)
    return cfg


def secrets(n, prefix="sk-test"):
    """N distinct fake provider keys."""
    return [f"{prefix}-{i + 1}-{'x' * 8}" for i in range(n)]


def ids_by_secret(keys):
    """The key ids plugin_with_keys gives these secrets."""
    return {s: f"k{i + 1}" for i, s in enumerate(keys)}


# --- Helpers for the fault, concurrency, leak and admin tests -----------------

def wasm_failure_stats(envoy):
    """Envoy's own record of the filter's VMs failing: every
    `wasm.apikeyrouter_*.vm_reload*` stat (a trap makes FAIL_RELOAD reload the
    VM) and the number of V8 VMs created so far."""
    stats = envoy.stats("wasm")
    out = {k: v for k, v in stats.items() if k.startswith("wasm.apikeyrouter_") and ".vm_reload" in k}
    out["created"] = stats.get("wasm.envoy.wasm.runtime.v8.created")
    return out


# Lines Envoy or the filter write when a wasm VM traps or fails at run time.
TRAP_MARKERS = ("failed: Uncaught", "panicked", "RuntimeError", "wasm trap", "Wasm VM failed",
                "Plugin configured to fail", "attempt not recorded")


def assert_no_trap(e, baseline):
    """The VMs never trapped: every vm_reload* stat is 0, no VM was created
    after start-up (baseline is wasm_failure_stats then), and the log has no
    trap or failure line."""
    now = wasm_failure_stats(e)
    assert now == baseline, (baseline, now)
    assert all(v == "0" for k, v in now.items() if k != "created"), now
    bad = [l for l in e.logs().splitlines() if any(m in l for m in TRAP_MARKERS)]
    assert not bad, bad[:5]


def body_of(stream, content="a request the provider will fumble"):
    """A chat completion request body for gpt-4o-mini, streaming or not."""
    b = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
    if stream:
        b["stream"] = True
    return b


def sha256_hex(s):
    """What a client entry's key_sha256 holds for the virtual key s."""
    return hashlib.sha256(s.encode()).hexdigest()


# Prices of the budget tests, per 1M tokens: 0.001 an input token, 0.002 an
# output token.
PRICE_IN = Decimal("1000")
PRICE_OUT = Decimal("2000")
PRICES = {"gpt-4o-mini*": {"input": str(PRICE_IN), "output": str(PRICE_OUT)}}


def expected_spend(mock):
    """What the usage the mock reported costs at PRICE_IN/PRICE_OUT."""
    total = Decimal(0)
    for s in mock.stats().values():
        total += (Decimal(s["prompt_tokens"]) * PRICE_IN + Decimal(s["completion_tokens"]) * PRICE_OUT) / 10**6
    return total


def priced(keys, **extra):
    """plugin_with_keys with a price for gpt-4o-mini (PRICES) and a roomy
    hard budget `b`."""
    return plugin_with_keys(keys, prices=PRICES,
                            budgets=[{"id": "b", "window": "day", "limit": "100"}], **extra)


def budget_of(envoy, budget_id):
    """GET budgets/{id} through the admin API, as a dict."""
    status, _, body = envoy.admin_api("GET", f"budgets/{budget_id}")
    assert status == 200, body
    return json.loads(body)


def raw_request(port, data, timeout=30):
    """Sends raw bytes (one HTTP/1.1 request with Connection: close) to
    127.0.0.1:port and returns everything the server sent back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    return b"".join(chunks)


# --- etcd (the fleet tests' shared store) -----------------------------------

import base64  # noqa: E402


def etcd_bin():
    return os.environ.get("ETCD_BIN") or "etcd"


def _b64(s):
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s):
    return base64.b64decode(s or "").decode()


def prefix_range_end(prefix):
    """etcd's range_end for every key starting with prefix: the prefix with its
    last byte incremented (trailing 0xff bytes dropped; b"\\0" = to the end)."""
    p = bytearray(prefix.encode() if isinstance(prefix, str) else prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\0"
    p[-1] += 1
    return bytes(p)


class Etcd:
    """A single-member etcd on two loopback ports picked at run time; its v3
    JSON gateway is at self.url (POST /v3/kv/range, /v3/kv/put, /v3/kv/txn ...).

    Etcd(data_dir=None): data_dir defaults to a fresh temp dir (removed by
    cleanup() and on leaving a `with` block). start() / stop() / kill() /
    restart(); restart keeps the ports and the data dir, so data persists.
    """

    def __init__(self, data_dir=None):
        self.port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.port:
            self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = tempfile.mkdtemp(prefix="akr-etcd-")
        self._own_data = data_dir is None
        self.data_dir = str(data_dir) if data_dir else os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "etcd.log")
        self.proc = None
        self.log = None
        # The TLS context of the test's own calls to the gateway (TlsEtcd).
        self.context = None

    def command(self):
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [etcd_bin(), "--name", "default", "--data-dir", self.data_dir,
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}",
                "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
                # One member, so a short election timeout only makes (re)starts quick.
                "--heartbeat-interval", "10", "--election-timeout", "100"]

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=20.0):
        if self.running():
            return self
        if self.log is None or self.log.closed:
            self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline, last = time.monotonic() + timeout, None
        while True:
            if self.proc.poll() is not None:
                why = f"it exited with {self.proc.returncode}"
            elif time.monotonic() > deadline:
                why = f"no answer from POST /v3/kv/range in {timeout:g}s" + (f": {last!r}" if last else "")
            else:
                try:
                    status, _, body = http("POST", self.url + "/v3/kv/range", {"key": _b64("\0")},
                                           timeout=1, context=self.context)
                    if status == 200:
                        return self
                    last = (status, body[:200])
                except OSError as e:
                    last = e
                time.sleep(0.05)
                continue
            self.kill()
            raise RuntimeError(f"etcd did not start on {self.url} ({why}); {' '.join(self.command())}\n"
                               f"log {self.log_path}:\n" + self.logs()[-4000:])

    def logs(self):
        if self.log is not None and not self.log.closed:
            self.log.flush()
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def kill(self):
        """SIGKILL, as a crash would; the data dir stays."""
        if self.running():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def stop(self):
        if self.running():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, timeout=20.0):
        """Stops it if it runs, then starts it on the same ports and data dir."""
        self.stop()
        return self.start(timeout=timeout)

    def cleanup(self):
        """Stops it and removes its temp dir (and the data dir if it made it)."""
        import shutil
        self.stop()
        if self.log is not None:
            self.log.close()
        if self._own_data:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    # The JSON gateway: keys and values are base64, int64s are JSON strings.

    def request(self, path, body, token=None):
        """POSTs body (a dict) to /v3/<path>, with etcd's auth token when
        given; returns (status, the decoded JSON answer)."""
        headers = {"authorization": token} if token else {}
        status, _, data = http("POST", f"{self.url}/v3/{path.lstrip('/')}", body, headers, timeout=10,
                               context=self.context)
        return status, json.loads(data or b"{}")

    def call(self, path, body, token=None):
        """request(), raising on a non-200; returns the decoded JSON."""
        status, answer = self.request(path, body, token)
        if status != 200:
            raise RuntimeError(f"etcd {path}: {status} {str(answer)[:500]}")
        return answer

    def enable_auth(self, prefix, user, password, root_password):
        """Enables etcd's authentication through its JSON gateway, as
        `etcdctl user add`, `role add`, `role grant-permission --prefix=true
        readwrite`, `user grant-role` and `auth enable` would: root, and
        `user` with a role of the same name that may read and write only
        the keys under `prefix`/."""
        for path, body in [
            ("auth/user/add", {"name": "root", "password": root_password}),
            ("auth/role/add", {"name": "root"}),
            ("auth/user/grant", {"user": "root", "role": "root"}),
            ("auth/user/add", {"name": user, "password": password}),
            ("auth/role/add", {"name": user}),
            ("auth/role/grant", {"name": user, "perm": {"permType": "READWRITE", "key": _b64(prefix + "/"),
                                                        "range_end": _b64(prefix_range_end(prefix + "/"))}}),
            ("auth/user/grant", {"user": user, "role": user}),
            ("auth/enable", {}),
        ]:
            self.call(path, body)

    def token(self, user, password):
        """etcd's auth token for user (POST /v3/auth/authenticate)."""
        return self.call("auth/authenticate", {"name": user, "password": password})["token"]

    def put(self, key, value):
        return self.call("kv/put", {"key": _b64(key), "value": _b64(value)})

    def kv(self, key):
        """The key's entry, decoded ({key, value, create_revision, mod_revision,
        version} with int revisions), or None."""
        kvs = self.call("kv/range", {"key": _b64(key)}).get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        return {"key": _unb64(kv.get("key")), "value": _unb64(kv.get("value")),
                "create_revision": int(kv.get("create_revision", 0)),
                "mod_revision": int(kv.get("mod_revision", 0)),
                "version": int(kv.get("version", 0))}

    def get(self, key):
        kv = self.kv(key)
        return None if kv is None else kv["value"]

    def range_prefix(self, prefix):
        body = {"key": _b64(prefix), "range_end": _b64(prefix_range_end(prefix))}
        kvs = self.call("kv/range", body).get("kvs") or []
        return {_unb64(kv.get("key")): _unb64(kv.get("value")) for kv in kvs}

    def delete(self, key):
        return self.call("kv/deleterange", {"key": _b64(key)})


class TlsEtcd(Etcd):
    """Etcd serving its client port over TLS only, with the certificate
    certs[server + ".pem"] (and its key) from make_certs; with
    client_cert_auth it also asks each client for a certificate signed by
    the CA (etcd --client-cert-auth). The test's own calls trust the CA and
    show the client certificate."""

    def __init__(self, certs, server="server", client_cert_auth=False):
        import ssl
        super().__init__()
        self.certs, self.server, self.client_cert_auth = certs, server, client_cert_auth
        self.url = self.url.replace("http://", "https://")
        self.context = ssl.create_default_context(cafile=certs["ca.pem"])
        self.context.check_hostname = False     # the certificate may name another host: what the tests vary
        self.context.load_cert_chain(certs["client.pem"], certs["client.key"])

    def command(self):
        c = self.certs
        cmd = super().command() + ["--cert-file", c[self.server + ".pem"], "--key-file", c[self.server + ".key"]]
        if self.client_cert_auth:
            cmd += ["--client-cert-auth", "--trusted-ca-file", c["ca.pem"]]
        return cmd


def make_certs(d, servers, clients=None):
    """Writes into directory d a throwaway CA (ca.pem) and, signed by it (EC
    P-256, valid for two days), for each name: DNS name in `servers` (or
    name: [DNS names]) a server certificate <name>.pem / <name>.key for that
    DNS name (those names) and 127.0.0.1, and for each name: common name in
    `clients` (by default {"client": ""}) a client certificate <name>.pem / <name>.key with that
    subject CN ("": no CN, only a SAN, which is what etcd's JSON gateway
    takes once authentication is on). Server certificates may also
    authenticate a client: etcd's JSON gateway dials etcd's own gRPC server
    with it. Returns {file name: path}."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    d = Path(d)
    out = {}

    def write(name, cert, key):
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{name}.pem"] = str(d / f"{name}.pem")
        if key is not None:
            (d / f"{name}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            out[f"{name}.key"] = str(d / f"{name}.key")

    def issue(cn, key, issuer, signer, extensions):
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
             .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2)))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "akr-test-ca")])
    ca = issue("akr-test-ca", ca_key, ca_name, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       encipher_only=False, decipher_only=False), True)])
    write("ca", ca, None)
    leaf = [(x509.BasicConstraints(ca=False, path_length=None), True)]
    for name, dns in servers.items():
        names = [dns] if isinstance(dns, str) else list(dns)
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, issue(names[0], key, ca_name, ca_key, leaf + [
            (x509.SubjectAlternativeName([x509.DNSName(n) for n in names]
                                         + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)]),
            key)
    for name, cn in (clients if clients is not None else {"client": ""}).items():
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, issue(cn, key, ca_name, ca_key, leaf + [
            # Without a subject, the SAN is what names it (and is critical).
            (x509.SubjectAlternativeName([x509.DNSName("apikeyrouter")]), not cn),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)]), key)
    return out


# --- A forward proxy and a recording relay (the egress tests) ----------------

import threading  # noqa: E402


def tinyproxy_bin():
    return os.environ.get("TINYPROXY_BIN") or "tinyproxy"


class Tinyproxy:
    """Debian's tinyproxy on a loopback port picked at run time, in the
    foreground, admitting only 127.0.0.1 and allowing CONNECT only to the
    ports in connect_ports; its log (LogLevel Connect: one line per
    connection and request) is logs()."""

    def __init__(self, connect_ports):
        self.dir = tempfile.mkdtemp(prefix="akr-tinyproxy-")
        self.log_path = os.path.join(self.dir, "tinyproxy.log")
        self.connect_ports = list(connect_ports)
        self.proc = None
        self.start()

    def start(self):
        self.port = free_port()
        conf = os.path.join(self.dir, "tinyproxy.conf")
        with open(conf, "w") as f:
            f.write("\n".join([f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60", "MaxClients 50",
                               f'LogFile "{self.log_path}"', "LogLevel Connect", "Allow 127.0.0.1",
                               "DisableViaHeader Yes"]
                              + [f"ConnectPort {p}" for p in self.connect_ports]) + "\n")
        self.proc = subprocess.Popen([tinyproxy_bin(), "-d", "-c", conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

        def listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"tinyproxy exited with {self.proc.returncode}:\n{self.logs()[-2000:]}")
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        wait_until(listening, timeout=10, what="tinyproxy to listen", errors=(OSError,))
        return self

    def logs(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def requests(self):
        """The request lines tinyproxy logged ("CONNECT host:port HTTP/1.1", ...)."""
        return [l.split("): ", 1)[1] for l in self.logs().splitlines() if "]: Request (file descriptor" in l]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RecordingRelay:
    """A TCP relay on a loopback port picked at run time that passes every
    connection on to 127.0.0.1:target_port and keeps a copy of the bytes
    that crossed it, each way: what anyone on that hop of the network
    would see. A connection it cannot pass on is closed."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.sent = []          # bytearray per connection, client -> target
        self.answered = []      # bytearray per connection, target -> client
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self):
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                sent, answered = bytearray(), bytearray()
                self.sent.append(sent)
                self.answered.append(answered)
            for src, dst, record in ((client, upstream, sent), (upstream, client, answered)):
                t = threading.Thread(target=self._pump, args=(src, dst, record), daemon=True)
                t.start()

    def _pump(self, src, dst, record):
        src.settimeout(0.2)
        try:
            while not self._stopping.is_set():
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                with self._lock:
                    record.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()         # each pump closes the socket it reads; dst is the other pump's

    def bytes_seen(self):
        """Everything that crossed, both ways, in one bytes object."""
        with self._lock:
            return b"".join(bytes(b) for b in self.sent + self.answered)

    def stop(self):
        self._stopping.set()
        self._server.close()
        for t in self._threads:
            t.join(timeout=2)
