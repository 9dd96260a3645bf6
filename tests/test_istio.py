"""The Istio recipe (deploy/istio/) proven without a cluster.

What runs here, on loopback:
1. The manifests are read: both stages are full Envoy wasm configs with one
   vm_id, one vm_config, one configuration and allow_on_headers_stop_iteration;
   the module comes by digest from an oci:// URL, never from a file path;
   every patch is for the dedicated gateway only.
2. An Envoy bootstrap shaped like the one Istio gives that gateway: istio-agent's
   own bootstrap (istio/istio pkg/bootstrap/testdata/default_golden.json, vendored
   in tests/fixtures/istio/ with its stats tags and stats inclusion list, runtime,
   overload manager, the :15090 Prometheus and :15021 health listeners) plus what
   istiod sends a gateway for gateway.yaml, built the way pilot builds it:
   the listener 0.0.0.0_8080 and its HTTP connection manager
   (pilot/pkg/networking/core/listener_builder.go, buildHTTPConnectionManager:
   grpc_stats, fault, cors, router; stream_idle_timeout 0s), the route
   configuration http.8080 (shape of istioctl/pkg/writer/envoy/configdump/
   testdata/routes/istio-gateway-http-route-prefix/configdump.json, with the
   VirtualService's retries converted as pilot/pkg/networking/core/route/retry/
   retry.go does) and the cluster outbound|443||api.openai.com (default circuit
   breakers of cluster_traffic_policy.go). Istio-proxy's own filters
   (istio.alpn, istio.stats) are not in upstream Envoy and are left out.
3. The EnvoyFilter patches are applied with Istio's semantics
   (pilot/pkg/networking/core/envoyfilter/: listener_patch.go INSERT_BEFORE and
   MERGE, cluster_patch.go, rc_patch.go, extension_configuration_patch.go),
   then istio-agent's part (pkg/wasm/convert.go, cache.go, imagefetcher.go): the
   image is pushed with skopeo to a docker-registry started here, pulled by
   the manifest digest, checked, plugin.wasm cached, and the ECDS resources
   rewritten to the local file; the ADS config sources become files.
4. Real Envoy runs that, in front of the mock provider: keys rotate on a 429,
   retries run, budgets are charged, an admin change reaches key choice (one VM
   for both stages), and the metric labels come out of the PodMonitor's
   relabeling applied to what :15090 serves.
5. A wrong digest: the agent's fallback (a deny-all RBAC filter in place of
   each stage) refuses every request; nothing reaches the provider. Envoy's
   own remote fetch (vm_config.code.remote over HTTP with sha256) loads the
   module, and on a wrong sha256 never opens the listener.

What is not run: istiod, istio-agent, the ADS stream, istio-proxy's build,
TLS origination and SAN check by the DestinationRule, the AuthorizationPolicy,
gateway injection, Prometheus itself. README's Deploying section says so."""

import copy
import hashlib
import json
import os
import re
import subprocess
import tempfile
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from harness import (ROOT, WASM, Mock, envoy_bin, free_port, http, secrets, wait_until)
from test_oci import Registry, plugin_wasm_like_istio, skopeo, stop_process
import oci

ISTIO = ROOT / "deploy" / "istio"
GOLDEN = ROOT / "tests" / "fixtures" / "istio" / "default_golden.json"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
PROVIDER_CLUSTER = "outbound|443||api.openai.com"
ADMIN_TOKEN = "istio-admin-token-0123456789"


def docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def envoy_filter():
    [ef] = [d for d in docs(ISTIO / "envoyfilter.yaml") if d["kind"] == "EnvoyFilter"]
    return ef


def gateway_docs():
    return {(d["kind"], d["metadata"]["name"]): d for d in docs(ISTIO / "gateway.yaml")}


def extension_configs(ef):
    return {p["patch"]["value"]["name"]: p["patch"]["value"] for p in ef["spec"]["configPatches"]
            if p["applyTo"] == "EXTENSION_CONFIG"}


# --- 1. The manifests ---------------------------------------------------------


def test_both_stages_share_one_vm_one_config_and_read_bodies():
    ecs = extension_configs(envoy_filter())
    assert set(ecs) == {"apikeyrouter-ingress", "apikeyrouter-attempt"}
    ingress = ecs["apikeyrouter-ingress"]["typed_config"]
    attempt = ecs["apikeyrouter-attempt"]["typed_config"]
    assert ingress["@type"] == attempt["@type"] == WASM_TYPE
    i, a = ingress["config"], attempt["config"]
    assert (i["root_id"], a["root_id"]) == ("apikeyrouter_ingress", "apikeyrouter_attempt")
    assert i["vm_config"] == a["vm_config"] and i["vm_config"]["vm_id"] == "apikeyrouter"
    assert i["configuration"] == a["configuration"]
    json.loads(i["configuration"]["value"])
    for c in (i, a):
        assert c["allow_on_headers_stop_iteration"] is True
        assert c["failure_policy"] == "FAIL_RELOAD"


def test_module_comes_by_digest_from_an_oci_url_never_a_file_path():
    text = (ISTIO / "envoyfilter.yaml").read_text()
    assert "/var/lib/istio" not in text and "filename" not in text
    for ec in extension_configs(envoy_filter()).values():
        remote = ec["typed_config"]["config"]["vm_config"]["code"]["remote"]
        uri = remote["http_uri"]["uri"]
        assert uri == "oci://${REGISTRY}/apikeyrouter@sha256:${IMAGE_DIGEST}"
        assert remote["sha256"] == "${IMAGE_DIGEST}"


def test_every_patch_is_for_the_dedicated_gateway_only():
    ef = envoy_filter()
    assert ef["spec"]["workloadSelector"]["labels"] == {"istio": "llm-gateway"}
    gw = gateway_docs()
    assert gw[("Gateway", "llm-gateway")]["spec"]["selector"] == {"istio": "llm-gateway"}
    assert gw[("Deployment", "llm-gateway")]["spec"]["template"]["metadata"]["labels"]["istio"] == "llm-gateway"
    for p in ef["spec"]["configPatches"]:
        if p["applyTo"] != "EXTENSION_CONFIG":
            assert p["match"]["context"] == "GATEWAY", p
    # The gateway's only routes go to the provider.
    vs = gw[("VirtualService", "llm-gateway")]["spec"]
    assert vs["gateways"] == ["llm-gateway"]
    assert {r["destination"]["host"] for h in vs["http"] for r in h["route"]} == {"api.openai.com"}
    # The key variables reach the istio-proxy container from a Secret.
    [c] = gw[("Deployment", "llm-gateway")]["spec"]["template"]["spec"]["containers"]
    assert c["name"] == "istio-proxy"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"]}
    host_env = extension_configs(ef)["apikeyrouter-ingress"]["typed_config"]["config"]["vm_config"][
        "environment_variables"]["host_env_keys"]
    assert set(host_env) <= set(env) and set(env.values()) == {"apikeyrouter-keys"}


def test_destination_rule_checks_the_providers_name():
    tls = gateway_docs()[("DestinationRule", "openai")]["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]
    assert tls == {"mode": "SIMPLE", "sni": "api.openai.com", "subjectAltNames": ["api.openai.com"]}


# --- 2. An Istio-shaped gateway bootstrap ------------------------------------------


def convert_retries(r):
    """pilot/pkg/networking/core/route/retry/retry.go, ConvertPolicy + parseRetryOn."""
    words, codes = [], []
    for part in (p.strip() for p in r["retryOn"].split(",")):
        (codes if part.isdigit() else words).append(int(part) if part.isdigit() else part)
    on = ",".join(words)
    if codes and "retriable-status-codes" not in on:
        on += ",retriable-status-codes"
    return {"retry_on": on, "num_retries": r["attempts"], "retriable_status_codes": codes,
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
            "host_selection_retry_max_attempts": "5"}


def gateway_route_config():
    """http.8080 as istiod sends it for gateway.yaml's VirtualService."""
    vs = gateway_docs()[("VirtualService", "llm-gateway")]
    routes = []
    for h in vs["spec"]["http"]:
        [dest] = h["route"]
        routes.append({
            "name": h["name"],
            "match": {"prefix": h["match"][0]["uri"]["prefix"], "case_sensitive": True},
            "route": {"cluster": f"outbound|{dest['destination']['port']['number']}||{dest['destination']['host']}",
                      "timeout": h["timeout"], "retry_policy": convert_retries(h["retries"]),
                      "host_rewrite_literal": h["rewrite"]["authority"], "max_grpc_timeout": "0s"},
            "metadata": {"filter_metadata": {"istio": {
                "config": "/apis/networking.istio.io/v1/namespaces/llm-gateway/virtual-service/llm-gateway"}}},
            "decorator": {"operation": f"{dest['destination']['host']}:443{h['match'][0]['uri']['prefix']}*"}})
    return {"name": "http.8080", "validate_clusters": False, "ignore_port_in_host_matching": True,
            "max_direct_response_body_size_bytes": 1048576,
            "virtual_hosts": [{"name": "*:80", "domains": ["*"], "routes": routes,
                               "include_request_attempt_count": True}]}


def istio_gateway_bootstrap():
    """Istio's golden bootstrap with the gateway's LDS/RDS/CDS inlined as static resources."""
    b = json.loads(GOLDEN.read_text())
    b.pop("dynamic_resources")
    b["node"]["id"] = "router~10.1.2.3~llm-gateway-5d8f9c7b4-x2x9k.llm-gateway~llm-gateway.svc.cluster.local"
    b["node"]["cluster"] = "llm-gateway.llm-gateway"
    b["static_resources"]["clusters"] = [c for c in b["static_resources"]["clusters"]
                                          if c["name"] in ("prometheus_stats", "agent")]
    hcm = {
        "@type": HCM_TYPE, "stat_prefix": "outbound_0.0.0.0_8080", "codec_type": "AUTO",
        "use_remote_address": True, "normalize_path": True, "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "stream_idle_timeout": "0s", "upgrade_configs": [{"upgrade_type": "websocket"}], "access_log": [],
        "request_id_extension": {"typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
            "use_request_id_for_trace_sampling": True}},
        "route_config": gateway_route_config(),
        "http_filters": [
            {"name": "envoy.filters.http.grpc_stats", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                "emit_filter_state": True, "stats_for_all_methods": False}},
            {"name": "envoy.filters.http.fault", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
            {"name": "envoy.filters.http.cors", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}},
        ]}
    b["static_resources"]["listeners"].append({
        "name": "0.0.0.0_8080",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 8080}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}]})
    b["static_resources"]["clusters"].append({
        "name": PROVIDER_CLUSTER, "type": "STATIC", "connect_timeout": "5s",
        "circuit_breakers": {"thresholds": [{"max_connections": 4294967295, "max_pending_requests": 4294967295,
                                             "max_requests": 4294967295, "max_retries": 4294967295,
                                             "track_remaining": True}]},
        "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 60, "keepalive_interval": 15,
                                                          "keepalive_probes": 4}},
        "load_assignment": {"cluster_name": PROVIDER_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "api.openai.com", "port_value": 443}}}}]}]}})
    return b


# --- 3. Istio's EnvoyFilter semantics --------------------------------------------

# Gateway Service port -> listener port (pilot's GatewayPortMap for gateway.yaml).
GATEWAY_PORT_MAP = {8080: {80}}


def proto_merge(dst, src):
    """proto.Merge on JSON: messages merge field by field, repeated fields
    append, scalars are replaced (envoyfilter.mergePatchValue, util.MergeAnyWithAny)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            if "@type" in v and dst[k].get("@type") not in (None, v["@type"]):
                dst[k] = copy.deepcopy(v)
            else:
                proto_merge(dst[k], v)
        elif isinstance(v, list) and isinstance(dst.get(k), list):
            dst[k] = dst[k] + copy.deepcopy(v)
        else:
            dst[k] = copy.deepcopy(v)


def listener_matches(listener, m):
    lm = m.get("listener") or {}
    if lm.get("name") and lm["name"] != listener["name"]:
        return False
    if lm.get("portNumber") and listener["address"]["socket_address"]["port_value"] != lm["portNumber"]:
        return False
    return True


def apply_envoy_filter(bootstrap, ef, context="GATEWAY"):
    """Applies the patches the way istiod does for a proxy in `context`;
    returns the EXTENSION_CONFIG resources by name (the ECDS output)."""
    patches = ef["spec"]["configPatches"]
    ecds = {}
    for p in patches:
        if p["applyTo"] == "EXTENSION_CONFIG":
            assert p["patch"]["operation"] == "ADD"   # the only operation applied (InsertedExtensionConfigurations)
            ecds[p["patch"]["value"]["name"]] = copy.deepcopy(p["patch"]["value"])
    live = [p for p in patches if p["applyTo"] != "EXTENSION_CONFIG" and p["match"].get("context", "ANY") in (context, "ANY")]
    # Only what istiod generates is patched; the bootstrap's own static
    # listeners and clusters (agent-written) never are.
    golden = json.loads(GOLDEN.read_text())["static_resources"]
    static = {x["name"] for x in golden["listeners"] + golden["clusters"]}
    for listener in bootstrap["static_resources"]["listeners"]:
        if listener["name"] in static:
            continue
        for p in live:
            if p["applyTo"] == "LISTENER" and listener_matches(listener, p["match"]):
                assert p["patch"]["operation"] == "MERGE"
                proto_merge(listener, p["patch"]["value"])
        for fc in listener["filter_chains"]:
            for f in fc["filters"]:
                if f["name"] != "envoy.filters.network.http_connection_manager":
                    continue
                hcm = f["typed_config"]
                for p in live:
                    if p["applyTo"] != "HTTP_FILTER" or not listener_matches(listener, p["match"]):
                        continue
                    sub = p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
                    op = p["patch"]["operation"]
                    if op == "INSERT_BEFORE":
                        i = [h["name"] for h in hcm["http_filters"]].index(sub)
                        hcm["http_filters"].insert(i, copy.deepcopy(p["patch"]["value"]))
                # MERGE runs after the inserts, on every filter of the chain
                for h in hcm["http_filters"]:
                    for p in live:
                        if (p["applyTo"] == "HTTP_FILTER" and p["patch"]["operation"] == "MERGE"
                                and listener_matches(listener, p["match"])
                                and p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == h["name"]):
                            assert p["patch"]["value"]["typed_config"]["@type"] == h["typed_config"]["@type"]
                            proto_merge(h["typed_config"], p["patch"]["value"]["typed_config"])
                rc = hcm.get("route_config")
                if rc:
                    port = int(rc["name"].split(".")[1])
                    for p in live:
                        if p["applyTo"] != "HTTP_ROUTE":
                            continue
                        want = (p["match"].get("routeConfiguration") or {}).get("portNumber")
                        if want and want not in GATEWAY_PORT_MAP.get(port, {port}):
                            continue
                        assert p["patch"]["operation"] == "MERGE" and "vhost" not in p["match"]["routeConfiguration"]
                        for vh in rc["virtual_hosts"]:
                            for r in vh["routes"]:
                                proto_merge(r, p["patch"]["value"])
    for c in bootstrap["static_resources"]["clusters"]:
        if c["name"] in static:
            continue
        for p in live:
            if p["applyTo"] != "CLUSTER":
                continue
            m = p["match"]["cluster"]
            direction, _, subset, host = (c["name"].split("|") + ["", "", "", ""])[:4]
            port = c["name"].split("|")[1] if c["name"].count("|") == 3 else ""
            if m.get("name"):
                ok = m["name"] == c["name"]
            else:
                ok = (c["name"].count("|") == 3 and (not m.get("service") or m["service"] == host)
                      and (not m.get("portNumber") or str(m["portNumber"]) == port))
            if ok:
                proto_merge(c, p["patch"]["value"])
    return ecds


# --- istio-agent's part: pull, check, cache, rewrite ----------------------------


def agent_convert(ecds, registry_host, cache_dir):
    """pkg/wasm/convert.go MaybeConvertWasmExtensionConfig for each ECDS
    resource: pull oci://, check the manifest digest against sha256, cache
    plugin.wasm, point code at the local file; on failure a deny-all RBAC
    filter (failure_policy is not FAIL_OPEN). Returns (resources, errors)."""
    out, errors = {}, []
    for name, ec in ecds.items():
        cfg = copy.deepcopy(ec)
        vm = cfg["typed_config"]["config"]["vm_config"]
        remote = vm["code"]["remote"]
        uri = remote["http_uri"]["uri"]
        try:
            assert uri.startswith("oci://"), uri
            ref = uri[len("oci://"):]
            host, _, rest = ref.partition("/")
            repo, sep, digest = rest.partition("@")   # repo@sha256:<digest>, or repo:<tag>
            if not sep:
                repo, _, digest = rest.rpartition(":")
            assert host == registry_host
            req = f"http://{host}/v2/{repo}/manifests/{digest}"
            status, headers, body = http("GET", req, headers={"accept": "application/vnd.oci.image.manifest.v1+json"})
            assert status == 200, (status, body[:200])
            actual = hashlib.sha256(body).hexdigest()
            if actual != remote["sha256"]:
                raise ValueError(f"module downloaded from {uri} has checksum {actual}, which does not match: {remote['sha256']}")

            def blob(d):
                s, _, b = http("GET", f"http://{host}/v2/{repo}/blobs/{d}")
                assert s == 200
                return b
            module = plugin_wasm_like_istio(json.loads(body), blob)
            assert module[:4] == b"\0asm"
            # getModulePath: <dir>/<sha256(module name)>/<checksum>.wasm
            d = Path(cache_dir) / hashlib.sha256(f"oci://{host}/{repo}".encode()).hexdigest()
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"{actual}.wasm"
            path.write_bytes(module)
            vm["code"] = {"local": {"filename": str(path)}}
        except (AssertionError, ValueError) as e:
            errors.append(f"{name}: {e}")
            cfg = {"name": name, "typed_config": {"@type": RBAC_TYPE, "rules": {},
                                                  "rules_stat_prefix": "wasm-default-deny"}}
        out[name] = {"@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig", **cfg}
    return out, errors


def serve_ecds_from_files(bootstrap, resources, directory):
    """Each config_discovery on ADS reads its resource from a file instead."""
    for name, res in resources.items():
        with open(os.path.join(directory, f"{name}.json"), "w") as f:
            json.dump({"version_info": "1", "resources": [res]}, f)

    def walk(n):
        if isinstance(n, dict):
            cd = n.get("config_discovery")
            if cd is not None:
                assert cd["config_source"].pop("ads") == {}
                cd["config_source"]["path_config_source"] = {"path": os.path.join(directory, f"{n['name']}.json")}
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)
    walk(bootstrap)


def fill_placeholders(ef, registry_host, digest_hex):
    text = yaml.safe_dump(ef)
    return yaml.safe_load(text.replace("${REGISTRY}", registry_host).replace("${IMAGE_DIGEST}", digest_hex))


def bind_loopback(bootstrap):
    """Istio's ports (admin 15000, 15090, 15021, the gateway's 8080) -> free loopback ports."""
    ports = {}
    b = bootstrap
    ports["admin"] = free_port()
    b["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=ports["admin"])
    for l in b["static_resources"]["listeners"]:
        p = free_port()
        ports[l["name"]] = p
        l["address"]["socket_address"].update(address="127.0.0.1", port_value=p)
    for c in b["static_resources"]["clusters"]:
        if c["name"] == "prometheus_stats":
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
                "port_value"] = ports["admin"]
    return ports


class IstioGateway:
    """Envoy running the patched Istio-shaped gateway bootstrap."""

    def __init__(self, bootstrap, env):
        self.dir = tempfile.mkdtemp(prefix="akr-istio-")
        self.ports = bind_loopback(bootstrap)
        self.config = bootstrap
        path = os.path.join(self.dir, "bootstrap.json")
        with open(path, "w") as f:
            json.dump(bootstrap, f, indent=1)
        self.log_path = os.path.join(self.dir, "envoy.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([envoy_bin(), "-c", path, "--concurrency", "2", "--disable-hot-restart",
                                      "-l", "info"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env})
        self.url = f"http://127.0.0.1:{self.ports['0.0.0.0_8080']}"
        self.admin_url = f"http://127.0.0.1:{self.ports['admin']}"
        self.prom_url = f"http://127.0.0.1:{self.ports['0.0.0.0_15090']}/stats/prometheus"

    def wait_ready(self):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError("envoy exited:\n" + self.logs()[-4000:])
            return http("GET", self.admin_url + "/ready", timeout=2)[0] == 200
        try:
            wait_until(ready, timeout=30, what="the Istio-shaped gateway", errors=(OSError,))
        except TimeoutError:
            raise RuntimeError("not ready:\n" + self.logs()[-4000:])
        return self

    def logs(self):
        self.log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def chat(self, headers=None):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
        return http("POST", self.url + "/v1/chat/completions", body,
                    {"authorization": "Bearer caller-key", **(headers or {})})

    def admin(self, method, path, body=None):
        return http(method, self.url + "/apikeyrouter/v1/" + path, body, {"authorization": f"Bearer {ADMIN_TOKEN}"})

    def stop(self):
        stop_process(self.proc)
        self.log.close()


@pytest.fixture
def pushed(tmp_path, started):
    """`make oci`'s image pushed to a registry on loopback; returns (registry host, description)."""
    assert oci.main(["oci.py", str(WASM), str(tmp_path / "dist")]) == 0
    desc = json.loads((tmp_path / "dist" / "oci.json").read_text())
    registry = Registry()
    started.append(registry)
    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'dist' / 'oci'}:{desc['tag']}",
           f"docker://{registry.host}/apikeyrouter:{desc['tag']}")
    return registry.host, desc


def istio_gateway(tmp_path, started, registry_host, digest_hex, mock):
    ef = fill_placeholders(envoy_filter(), registry_host, digest_hex)
    b = istio_gateway_bootstrap()
    ecds = apply_envoy_filter(b, ef)
    resources, errors = agent_convert(ecds, registry_host, tmp_path / "wasm-cache")
    serve_ecds_from_files(b, resources, str(tmp_path))
    for c in b["static_resources"]["clusters"]:
        if c["name"] == PROVIDER_CLUSTER:   # the mock stands in for api.openai.com (plain HTTP)
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"].update(
                address="127.0.0.1", port_value=mock.port)
    keys = mock.keys
    env = {"OPENAI_KEY_1": keys[0], "OPENAI_KEY_2": keys[1], "OPENAI_KEY_3": keys[2],
           "APIKEYROUTER_ADMIN_TOKEN": ADMIN_TOKEN}
    g = IstioGateway(b, env)
    started.append(g)
    return g, errors


def test_patches_land_where_istio_puts_them(pushed, tmp_path):
    host, desc = pushed
    ef = fill_placeholders(envoy_filter(), host, desc["manifest_digest"].split(":")[1])
    b = istio_gateway_bootstrap()
    apply_envoy_filter(b, ef)
    [gw] = [l for l in b["static_resources"]["listeners"] if l["name"] == "0.0.0.0_8080"]
    assert gw["per_connection_buffer_limit_bytes"] == 16 << 20
    hcm = gw["filter_chains"][0]["filters"][0]["typed_config"]
    names = [h["name"] for h in hcm["http_filters"]]
    assert names == ["envoy.filters.http.grpc_stats", "envoy.filters.http.fault", "envoy.filters.http.cors",
                     "apikeyrouter-ingress", "envoy.filters.http.router"]
    router = hcm["http_filters"][-1]["typed_config"]
    assert [u["name"] for u in router["upstream_http_filters"]] == ["apikeyrouter-attempt",
                                                                    "envoy.filters.http.upstream_codec"]
    [route] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    r = route["route"]
    assert (r["timeout"], r["idle_timeout"], r["retry_policy"]["per_try_idle_timeout"]) == ("0s", "600s", "600s")
    assert r["retry_policy"]["retry_on"] == "retriable-headers,reset-before-request,connect-failure,refused-stream"
    assert r["retry_policy"]["retriable_status_codes"] == []
    assert r["retry_policy"]["retriable_headers"] == [
        {"name": "x-apikeyrouter-retry", "string_match": {"exact": "another-key"}}]
    [cluster] = [c for c in b["static_resources"]["clusters"] if c["name"] == PROVIDER_CLUSTER]
    assert cluster["per_connection_buffer_limit_bytes"] == 16 << 20
    # The other listeners (Prometheus, health) got nothing.
    for l in b["static_resources"]["listeners"]:
        if l["name"] != "0.0.0.0_8080":
            assert "apikeyrouter" not in json.dumps(l)
    # A sidecar (SIDECAR_OUTBOUND) with this EnvoyFilter would get nothing either.
    b2 = istio_gateway_bootstrap()
    apply_envoy_filter(b2, ef, context="SIDECAR_OUTBOUND")
    assert "apikeyrouter" not in json.dumps(b2)


def relabel(samples, rules):
    """Prometheus metric_relabel_configs (action replace) over (name, labels, value)."""
    out = []
    for name, labels, value in samples:
        labels = {"__name__": name, **labels}
        for r in rules:
            src = ";".join(labels.get(s, "") for s in r["sourceLabels"])
            m = re.fullmatch(r["regex"], src)
            if m:
                labels[r["targetLabel"]] = m.expand(r["replacement"].replace("$", "\\"))
        out.append((labels.pop("__name__"), labels, value))
    return out


def prom_samples(text):
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


@pytest.mark.timeout(240)
def test_istio_gateway_rotates_keys_retries_charges_budgets_and_labels_metrics(pushed, tmp_path, started):
    host, desc = pushed
    keys = secrets(3, prefix="sk-istio")
    mock = Mock(keys)
    started.append(mock)
    g, errors = istio_gateway(tmp_path, started, host, desc["manifest_digest"].split(":")[1], mock)
    assert errors == []
    g.wait_ready()
    # Two ECDS filters, one VM per worker: the same count a single inline config makes.
    stats = http("GET", g.admin_url + "/stats?filter=wasm")[2].decode()
    assert "wasm.apikeyrouter_ingress.vm_reload: 0" in stats and "wasm.apikeyrouter_attempt.vm_reload: 0" in stats

    # A body request works (allow_on_headers_stop_iteration), the caller's
    # credential never reaches the provider, a provider key does.
    status, headers, body = g.chat()
    assert status == 200, body
    sent = mock.received()[-1]["headers"]["authorization"]
    assert sent in {f"Bearer {k}" for k in keys}
    first = headers["x-apikeyrouter-key-id"]

    # A 429 on a key: Envoy retries (VirtualService retries) and the attempt
    # stage picks another key.
    for k in keys[:2]:
        mock.behavior(k, status=429, times=1, headers={"retry-after": "30"})
    retried = 0
    for _ in range(3):
        before = len(mock.received())
        status, headers, body = g.chat()
        assert status == 200, body
        attempts = int(headers["x-apikeyrouter-attempts"])
        tried = [r["key"] for r in mock.received()[before:]]
        assert len(tried) == attempts and len(set(tried)) == attempts, "each retry used another key"
        retried += attempts > 1
    assert retried >= 1, "a 429 was retried on another key"
    assert sum(1 for r in mock.received() if r.get("status") == 429) == 2
    status, body = g.admin("GET", "keys")[::2]
    states = {k["id"]: k["state"] for k in json.loads(body)["keys"]}
    assert sorted(states.values()) == ["available", "throttled", "throttled"], states

    # The budget is charged what the provider reported, at the configured prices.
    plugin = json.loads(extension_configs(envoy_filter())["apikeyrouter-ingress"]["typed_config"]["config"][
        "configuration"]["value"])
    price = plugin["prices"]["gpt-4o-mini*"]
    wait_until(lambda: json.loads(g.admin("GET", "budgets/daily")[2])["reserved"] == "0", timeout=10,
               what="reservations settled")
    spent = Decimal(json.loads(g.admin("GET", "budgets/daily")[2])["spent"])
    usage = [s for s in mock.stats().values()]
    want = sum(Decimal(s["prompt_tokens"]) * Decimal(price["input"]) + Decimal(s["completion_tokens"])
               * Decimal(price["output"]) for s in usage) / 10**6
    assert spent > 0 and spent == want, (spent, want)

    # An admin change made through the ingress stage reaches the attempt
    # stage's key choice: same VM, same shared data.
    for kid in states:
        if kid != first:
            assert g.admin("PATCH", f"keys/{kid}", {"state": "disabled", "reason": "test"})[0] == 200
    status, body = g.admin("PATCH", f"keys/{first}", {"state": "available"})[::2]
    assert status == 200, body
    mock.reset()
    for _ in range(4):
        status, headers, _ = g.chat()
        assert status == 200 and headers["x-apikeyrouter-key-id"] == first
    assert {r["key"] for r in mock.received()} == {keys[int(first.split("-")[1]) - 1]}

    # Metrics: Istio's stats inclusion list keeps them; the PodMonitor's
    # relabeling turns the flattened ids into labels.
    rules = gateway_docs()[("PodMonitor", "llm-gateway-envoy")]["spec"]["podMetricsEndpoints"][0]["metricRelabelings"]

    def series():
        return relabel(prom_samples(http("GET", g.prom_url)[2].decode()), rules)
    wait_until(lambda: any(n == "apikeyrouter_key_requests" for n, _, _ in series()), timeout=15,
               what="the filter's metrics on :15090")
    ok = (("key", first.replace("-", "_")), ("provider", "openai"), ("status_class", "2xx"))

    def labelled():
        return {(n, tuple(sorted(l.items()))): v for n, l, v in series() if n.startswith("apikeyrouter_")}
    wait_until(lambda: labelled().get(("apikeyrouter_key_requests", ok), 0) >= 5, timeout=15,
               what="the first key's 2xx count under its labels")
    got = labelled()
    assert sum(v for (n, _), v in got.items() if n == "apikeyrouter_key_rate_limited") == 2
    assert ("apikeyrouter_budget_spent_micros", (("budget", "daily"),)) in got
    assert not [n for n, _ in got if re.match(r"apikeyrouter_(key|budget|client)_.*openai", n)], \
        "every key series was relabeled"
    assert "wasm.envoy.wasm.runtime.v8.active" in http("GET", g.admin_url + "/stats?filter=wasm")[2].decode()


@pytest.mark.parametrize("how", ["unknown-digest", "tag-with-wrong-sha256"])
def test_a_wrong_digest_refuses_every_request_and_reaches_no_provider(pushed, tmp_path, started, how):
    host, desc = pushed
    keys = secrets(3, prefix="sk-istio")
    mock = Mock(keys)
    started.append(mock)
    digest = desc["manifest_digest"].split(":")[1]
    wrong = "0" * 64
    if how == "unknown-digest":
        # The URL names an image the registry does not have.
        g, errors = istio_gateway(tmp_path, started, host, wrong, mock)
        assert len(errors) == 2 and all("MANIFEST_UNKNOWN" in e for e in errors), errors
    else:
        # The URL names a tag; the image it resolves to is not the pinned one.
        real = envoy_filter

        def tagged():
            ef = real()
            for p in ef["spec"]["configPatches"]:
                if p["applyTo"] == "EXTENSION_CONFIG":
                    remote = p["patch"]["value"]["typed_config"]["config"]["vm_config"]["code"]["remote"]
                    remote["http_uri"]["uri"] = "oci://${REGISTRY}/apikeyrouter:" + desc["tag"]
                    remote["sha256"] = wrong
            return ef
        globals()["envoy_filter"] = tagged
        try:
            g, errors = istio_gateway(tmp_path, started, host, digest, mock)
        finally:
            globals()["envoy_filter"] = real
        assert len(errors) == 2 and all(f"has checksum {digest}, which does not match: {wrong}" in e
                                        for e in errors), errors
    g.wait_ready()
    for _ in range(3):
        status, _, body = g.chat()
        assert status == 403 and b"RBAC" in body, (status, body)
    assert mock.received() == []


# --- 5. Envoy's own fetch by sha256 (bare Envoy) ------------------------------------


class ModuleServer:
    """python -m http.server on loopback serving the build as apikeyrouter.wasm."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="akr-modules-")
        os.symlink(WASM, os.path.join(self.dir, "apikeyrouter.wasm"))
        self.port = free_port()
        self.proc = subprocess.Popen(["python3", "-m", "http.server", str(self.port), "--bind", "127.0.0.1"],
                                     cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/apikeyrouter.wasm"
        wait_until(lambda: http("GET", self.url)[0] == 200, timeout=10, what="module server", errors=(OSError,))

    def stop(self):
        stop_process(self.proc)


def remote_module(port, digest):
    def edit(cfg):
        from harness import wasm_filter_configs
        for wf in wasm_filter_configs(cfg):
            wf["vm_config"]["code"] = {"remote": {
                "http_uri": {"uri": f"http://127.0.0.1:{port}/apikeyrouter.wasm", "cluster": "wasm_modules",
                             "timeout": "10s"},
                "sha256": digest, "retry_policy": {"num_retries": 3}}}
        cfg["static_resources"]["clusters"].append({
            "name": "wasm_modules", "type": "STATIC", "connect_timeout": "2s",
            "load_assignment": {"cluster_name": "wasm_modules", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})
    return edit


def test_envoy_loads_the_module_over_http_by_sha256(mock, start_envoy, started):
    server = ModuleServer()
    started.append(server)
    digest = hashlib.sha256(WASM.read_bytes()).hexdigest()
    e = start_envoy(mock, edit=remote_module(server.port, digest))
    from harness import DEMO_CLIENT_KEY, chat
    status, headers, _ = chat(e.url, headers={"authorization": f"Bearer {DEMO_CLIENT_KEY}"})
    assert status == 200 and headers["x-apikeyrouter-key-id"]
    assert e.stats("wasm.remote_load_fetch_successes")["wasm.remote_load_fetch_successes"] != "0"


def test_envoy_refuses_a_module_whose_sha256_is_wrong(mock, started):
    server = ModuleServer()
    started.append(server)
    from harness import DEMO_CONFIG, render
    gw, admin = free_port(), free_port()
    cfg = render(DEMO_CONFIG.read_text(), gw, admin, mock.port)
    remote_module(server.port, "0" * 64)(cfg)
    d = tempfile.mkdtemp(prefix="akr-remote-")
    path = os.path.join(d, "envoy.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    log = open(os.path.join(d, "envoy.log"), "w")
    proc = subprocess.Popen([envoy_bin(), "-c", path, "--concurrency", "1", "--disable-hot-restart"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "DEMO_KEY_1": "a", "DEMO_KEY_2": "b", "DEMO_KEY_3": "c",
                                 "APIKEYROUTER_ADMIN_TOKEN": "demo-admin-token-change-me"})

    class Stop:
        def stop(self):
            stop_process(proc)
            log.close()
    started.append(Stop())
    # Each filter's fetch is retried, then given up: Envoy goes LIVE with the
    # plugin failed closed (a few seconds after the first failure), so the
    # listener answers 503 and nothing reaches the provider.
    from harness import wasm_filter_configs
    filters = len(list(wasm_filter_configs(cfg)))

    def given_up():
        line = http("GET", f"http://127.0.0.1:{admin}/stats?filter=remote_load_fetch_failures")[2].decode().strip()
        return (int(line.rpartition(": ")[2] or 0) >= filters
                and http("GET", f"http://127.0.0.1:{admin}/ready")[2].strip() == b"LIVE")
    wait_until(given_up, timeout=30, what="every fetch to fail and Envoy to start without the module",
               errors=(OSError, ValueError))
    assert "Plugin configured to fail closed failed to load" in open(os.path.join(d, "envoy.log")).read()
    status, _, _ = http("POST", f"http://127.0.0.1:{gw}/v1/chat/completions", {"model": "x"}, timeout=5)
    assert status == 503
    assert mock.received() == []
