"""envoy/grafana-dashboard.json: instance, provider and key variables that
every per-key query follows; key and capacity states shown by name; spend in
a currency; and every series it queries served by a real Envoy, the VM-health
panel's under the shipped configs' plugin names and an Istio WasmPlugin's
(<namespace>.<name>) alike."""

import json
import re

from harness import PRICES, ROOT, chat, http, plugin_with_keys, secrets, wait_until

DASHBOARD = ROOT / "envoy" / "grafana-dashboard.json"


def dashboard():
    return json.loads(DASHBOARD.read_text())


def targets(d):
    return [(p, t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def test_variables_are_instance_provider_and_key_and_every_query_follows_them():
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert {"datasource", "instance", "provider", "key"} <= set(variables)
    for name in ("instance", "provider", "key"):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"] and v["allValue"] == ".*"
    assert "$instance" in variables["provider"]["query"]["query"]
    assert "$provider" in variables["key"]["query"]["query"]
    for p, expr in targets(d):
        assert 'instance=~"$instance"' in expr, (p["title"], expr)
        if "apikeyrouter_key_" in expr:
            assert 'provider=~"$provider"' in expr and 'key=~"$key"' in expr, (p["title"], expr)
        assert p["datasource"]["uid"] == "${datasource}"


def test_states_are_shown_by_name():
    d = dashboard()
    want = {"apikeyrouter_key_state": ["available", "throttled", "exhausted", "disabled"],
            "apikeyrouter_key_capacity": ["abundant", "constrained", "critical", "exhausted"]}
    seen = set()
    for p, expr in targets(d):
        for metric, names in want.items():
            if metric in expr:
                assert p["type"] == "state-timeline", p["title"]
                [m] = p["fieldConfig"]["defaults"]["mappings"]
                assert {k: v["text"] for k, v in m["options"].items()} == {str(i): n for i, n in enumerate(names)}
                seen.add(metric)
    assert seen == set(want)


def test_spend_is_in_a_currency():
    spend = [p for p, expr in targets(dashboard()) if "spend_micros" in expr or "spent_micros" in expr]
    assert len(spend) >= 2
    for p in spend:
        assert p["fieldConfig"]["defaults"]["unit"].startswith("currency"), p["title"]


def metric_names(expr):
    """The metric names an expression selects by name (not by __name__ regex)."""
    names = set(re.findall(r"\b((?:apikeyrouter|envoy)_[a-z0-9_]+)\s*(?:\{|\[|\))", expr))
    return {n for n in names if not n.endswith("_bucket")} | (
        {n[:-len("_bucket")] + "_bucket" for n in names if n.endswith("_bucket")})


def test_every_series_the_dashboard_queries_is_served_by_envoy(mock3, start_envoy):
    keys = secrets(3)
    plugin = plugin_with_keys(keys, prices=PRICES, budgets=[{"id": "b", "window": "day", "limit": "100"}])
    e = start_envoy(mock3, plugin=plugin)
    mock3.behavior(keys[0], status=429, times=1)
    for _ in range(4):
        assert chat(e.url)[0] == 200

    def served():
        text = http("GET", e.admin_url + "/stats/prometheus")[2].decode()
        return {m.group(1): m.group(2) or "" for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", text, re.M)}
    wait_until(lambda: "apikeyrouter_key_spend_micros" in served() and "apikeyrouter_key_rate_limited" in served(),
               timeout=15, what="the filter's metrics")
    have = served()
    d = dashboard()
    for p, expr in targets(d):
        for name in metric_names(expr):
            assert name in have, f"{p['title']}: {name} is not served"
        for by in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in by.split(",")):
                if label in ("instance", "le"):
                    continue   # instance comes from Prometheus; le from the histogram
                names = metric_names(expr)
                assert any(f'{label}="' in have.get(n, "") for n in names), (p["title"], label)
    # The VM-health panel's regex matches this Envoy's plugin stats and an
    # Istio WasmPlugin's (<namespace>.<name> -> envoy_wasm_<ns>_<name>_vm_reload).
    [vm] = [p for p in d["panels"] if p["title"].startswith("Wasm VM health")]
    regexes = [re.search(r'__name__=~"([^"]+)"', t["expr"]).group(1) for t in vm["targets"] if "__name__" in t["expr"]]
    assert regexes
    for rx in regexes:
        assert [n for n in have if re.fullmatch(rx, n)], rx
        suffix = rx.split("apikeyrouter.*")[1]    # _vm_reload or _vm_reload_failure, literal
        assert re.fullmatch(rx, "envoy_wasm_llm_gateway_apikeyrouter_ingress" + suffix), rx
    assert "envoy_wasm_envoy_wasm_runtime_v8_active" in have
