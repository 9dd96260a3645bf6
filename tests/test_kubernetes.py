"""The Kubernetes manifests (deploy/kubernetes/, and deploy/istio/'s too),
validated offline: built-in kinds against Kubernetes 1.37's schemas (the
kubernetes-validate package, strict: unknown fields are errors), custom
resources (ServiceMonitor, PodMonitor, PrometheusRule, Istio's) against their
CRDs' OpenAPI schemas (tests/fixtures/crds/, from prometheus-operator and
istio), with unknown fields refused where the API server would silently drop
them. Then the wiring: the ConfigMap is envoy/openai.yaml, passes
`envoy --mode validate` and the shipped-config checks; probes and the
ServiceMonitor hit the health listener; the Secret feeds every variable the
plugin reads; the module is mounted by digest where Envoy loads it; and every
metric the alerts use is served by a real Envoy running that ConfigMap."""

import copy
import importlib.util
import json
import os
import re
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from harness import ROOT, envoy_bin, free_port, http, listener, validate, wait_until
import test_shipped_configs as shipped
from test_oci import stop_process

K8S = ROOT / "deploy" / "kubernetes"
ISTIO = ROOT / "deploy" / "istio"
CRDS = ROOT / "tests" / "fixtures" / "crds"
K8S_VERSION = "1.37.0"
MANIFESTS = sorted(K8S.glob("*.yaml")) + sorted(ISTIO.glob("*.yaml"))


def documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(path):
    return {(d["kind"], d["metadata"]["name"]): d for d in documents(path)}


def strict(schema):
    """A CRD's structural schema as JSON Schema that refuses unknown fields
    (the API server would prune them without a word) and allows null where
    the schema says nullable."""
    s = copy.deepcopy(schema)

    def walk(n):
        if isinstance(n, dict):
            if n.get("type") == "object" and "properties" in n and not n.get("x-kubernetes-preserve-unknown-fields") \
                    and "additionalProperties" not in n:
                n["additionalProperties"] = False
            if n.get("nullable") and "type" in n:
                n["type"] = [n["type"], "null"]
            if n.get("x-kubernetes-int-or-string"):
                n.pop("type", None)
                n["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            for v in list(n.values()):
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)
    walk(s)
    return s


def crd_schema(doc):
    group, version = doc["apiVersion"].split("/")
    path = CRDS / f"{group}_{version}_{doc['kind']}.json"
    assert path.exists(), f"no CRD schema for {doc['apiVersion']} {doc['kind']}"
    return strict(json.loads(path.read_text()))


@pytest.mark.parametrize("path", MANIFESTS, ids=[f"{p.parent.name}/{p.name}" for p in MANIFESTS])
def test_every_manifest_validates_against_its_schema(path):
    docs = documents(path)
    assert docs
    for d in docs:
        where = f"{path.name}: {d['kind']} {d['metadata']['name']}"
        if "." in d["apiVersion"].split("/")[0] and not d["apiVersion"].startswith(("apps/", "policy/")):
            body = {k: v for k, v in d.items() if k not in ("apiVersion", "kind", "metadata")}
            errors = sorted(jsonschema.Draft7Validator(crd_schema(d)).iter_errors(body), key=str)
            assert not errors, f"{where}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])
        else:
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{where}: {e}") from None


def test_schema_check_is_not_vacuous():
    # A misspelt field is refused, in a built-in kind and in a CRD.
    dep = copy.deepcopy(by_kind(K8S / "apikeyrouter.yaml")[("Deployment", "apikeyrouter")])
    dep["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    sm = copy.deepcopy(by_kind(K8S / "apikeyrouter.yaml")[("ServiceMonitor", "apikeyrouter")])
    sm["spec"]["endpoints"][0]["pth"] = "/stats/prometheus"
    assert list(jsonschema.Draft7Validator(crd_schema(sm)).iter_errors({"spec": sm["spec"]}))


def load_configmap_module():
    spec = importlib.util.spec_from_file_location("k8s_configmap", K8S / "configmap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def envoy_config_text():
    return by_kind(K8S / "configmap.yaml")[("ConfigMap", "apikeyrouter-envoy")]["data"]["envoy.yaml"]


def test_configmap_is_the_shipped_openai_config():
    gen = load_configmap_module()
    assert (K8S / "configmap.yaml").read_text() == gen.configmap(), \
        "configmap.yaml is stale: run python3 deploy/kubernetes/configmap.py"
    assert envoy_config_text() == gen.envoy_yaml()


@pytest.fixture
def configmap_envoy(tmp_path):
    """The ConfigMap's envoy.yaml with the module path pointed at the build."""
    path = tmp_path / "envoy.yaml"
    path.write_text(envoy_config_text().replace("/opt/apikeyrouter/plugin.wasm", "/etc/envoy/apikeyrouter.wasm"))
    return path


def test_configmap_envoy_config_validates_and_passes_the_operator_checks(configmap_envoy, tmp_path):
    out = tmp_path / "concrete.yaml"
    out.write_text(shipped.load(configmap_envoy)[1])
    code, log = validate(out, shipped.SHIPPED_ENV)
    assert code == 0, log[-3000:]
    for check in (shipped.test_every_tls_cluster_checks_the_providers_name,
                  shipped.test_routes_let_streams_run_but_not_hang,
                  shipped.test_retries_follow_the_filters_verdict_and_never_resend_what_the_provider_may_have_billed,
                  shipped.test_retries_are_limited_by_a_budget,
                  shipped.test_overload_manager_bounds_heap_and_connections,
                  shipped.test_every_http_listener_has_a_request_headers_timeout,
                  shipped.test_upstream_connections_have_tcp_keepalive,
                  shipped.test_health_listener_serves_only_ready_and_prometheus_from_the_admin_api,
                  shipped.test_access_log_says_what_an_operator_needs):
        check(configmap_envoy)


def test_deployment_wiring():
    k = by_kind(K8S / "apikeyrouter.yaml")
    dep = k[("Deployment", "apikeyrouter")]
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    cfg = yaml.safe_load(envoy_config_text())
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    listeners = {l["name"]: l["address"]["socket_address"] for l in cfg["static_resources"]["listeners"]}
    assert ports["http"] == listeners["gateway"]["port_value"]
    assert ports["health"] == listeners["health"]["port_value"] and listeners["health"]["address"] == "0.0.0.0"
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/ready", "port": "health"}, probe
    # Readiness asks the filter whether a key can serve: the management
    # listener's health probe, through the health listener.
    assert c["readinessProbe"]["httpGet"] == {"path": "/apikeyrouter/health", "port": "health"}
    [management] = shipped_wasm_configs(listener(cfg, "management"))
    assert json.loads(management["configuration"]["value"])["admin"]["probe_path"] == "/apikeyrouter/health"
    # Config and module where Envoy reads them.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert c["args"][:2] == ["-c", mounts["config"] + "/envoy.yaml"]
    assert vols["config"]["configMap"]["name"] == "apikeyrouter-envoy"
    codes = {json.dumps(wf["vm_config"]["code"]) for wf in shipped_wasm_configs(cfg)}
    assert codes == {json.dumps({"local": {"filename": mounts["module"] + "/plugin.wasm"}})}
    assert vols["module"]["image"]["reference"] == "${REGISTRY}/apikeyrouter@sha256:${IMAGE_DIGEST}", \
        "the module is pulled by digest"
    # Every variable the plugin reads comes from the Secret, which has it.
    secret = k[("Secret", "apikeyrouter-keys")]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    needed = set()
    for wf in shipped_wasm_configs(cfg):
        plugin = json.loads(wf["configuration"]["value"])
        needed |= {key["secret_env"] for p in plugin["providers"] for key in p["keys"]}
        if "admin" in plugin:
            needed.add(plugin["admin"]["token_env"])
    assert needed <= set(env), needed - set(env)
    assert all(ref["name"] == "apikeyrouter-keys" and ref["key"] in secret["stringData"] for ref in env.values())
    # The Service and the ServiceMonitor scrape the health listener.
    svc = k[("Service", "apikeyrouter")]
    sports = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}
    assert sports["metrics"] == "health" and sports["http"] == "http"
    [ep] = k[("ServiceMonitor", "apikeyrouter")]["spec"]["endpoints"]
    assert ep["port"] == "metrics" and ep["path"] == "/stats/prometheus"
    selector = dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["selector"] == selector == k[("ServiceMonitor", "apikeyrouter")]["spec"]["selector"]["matchLabels"]
    # The memory limit is above the overload manager's heap ceiling.
    heap = [m for m in cfg["overload_manager"]["resource_monitors"]
            if m["name"] == "envoy.resource_monitors.fixed_heap"][0]["typed_config"]["max_heap_size_bytes"]
    assert c["resources"]["limits"]["memory"] == "1Gi" and heap < 1 << 30


def shipped_wasm_configs(cfg):
    from harness import wasm_filter_configs
    return list(wasm_filter_configs(cfg))


def alert_metrics():
    rule = by_kind(K8S / "apikeyrouter.yaml")[("PrometheusRule", "apikeyrouter")]
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    names = set()
    for e in exprs:
        names |= {n for n in re.findall(r"\b(apikeyrouter_[a-z_]+)\b", e)}
    return exprs, names


def test_every_metric_the_alerts_use_is_served_by_the_configmaps_envoy(configmap_envoy, tmp_path):
    """Envoy with the ConfigMap's config (ports moved to loopback; the provider's
    DNS need not resolve) serves, on its health listener, every series the
    alerts and the ServiceMonitor read, with the labels the alerts group by."""
    cfg = yaml.safe_load(shipped.load(configmap_envoy)[1])
    ports = {}
    cfg["admin"]["address"]["socket_address"]["port_value"] = ports.setdefault("admin", free_port())
    for l in cfg["static_resources"]["listeners"]:
        l["address"]["socket_address"].update(address="127.0.0.1", port_value=ports.setdefault(l["name"], free_port()))
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == "envoy_admin":
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
                "port_value"] = ports["admin"]
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(cfg))
    log = open(tmp_path / "envoy.log", "w")
    proc = subprocess.Popen([envoy_bin(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **shipped.SHIPPED_ENV})
    try:
        base = f"http://127.0.0.1:{ports['health']}"
        wait_until(lambda: http("GET", base + "/ready", timeout=2)[0] == 200, timeout=30,
                   what="the ConfigMap's Envoy", errors=(OSError,))
        exprs, names = alert_metrics()
        assert names >= {"apikeyrouter_key_state", "apikeyrouter_no_key", "apikeyrouter_budget_refused",
                         "apikeyrouter_budget_spent_micros"}

        def served():
            text = http("GET", base + "/stats/prometheus")[2].decode()
            got = set(re.findall(r"^(apikeyrouter_[a-z_]+)\{", text, re.M))
            return text if names <= got else None
        wait_until(served, timeout=20, what="every alerted metric on the health listener")
        text = served()
        assert re.search(r'^apikeyrouter_key_state\{provider="openai",key="openai-1"\} 0$', text, re.M), \
            "key state with the provider and key labels the alerts group by"
        assert re.search(r'^apikeyrouter_budget_spent_micros\{budget="daily"\} ', text, re.M)
        vm = re.compile(r"envoy_wasm_.*apikeyrouter.*_vm_reload(_failure)?")
        assert any(vm.fullmatch(n) for n in re.findall(r"^([a-z_]+)\{", text, re.M)), \
            "the VM-reload alert's metric exists"
    finally:
        stop_process(proc)
        log.close()
