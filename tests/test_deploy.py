"""The shipped deployment files: every Envoy config validates, every one uses
FAIL_RELOAD and lets more than 3 retries run at once, the Istio manifests
hang together, and Fernet-encrypted key material works in real Envoy (and a
wrong encryption key is refused)."""

import json
import os
import tempfile

import pytest
import yaml
from cryptography.fernet import Fernet

from harness import (DEMO_CONFIG, ROOT, SHIPPED_ENV, chat, nodes, plugin_with_keys, render, scalars,
                     shipped_text, validate, wasm_filter_configs)

CONFIGS = sorted((ROOT / "envoy").glob("*.yaml"))


def concrete(path):
    """The config with its placeholders filled and the files it reads pointed at this machine's."""
    return shipped_text(path)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_envoy_config_validates(path):
    d = tempfile.mkdtemp()
    out_path = os.path.join(d, path.name)
    with open(out_path, "w") as f:
        f.write(concrete(path))
    code, out = validate(out_path, SHIPPED_ENV)
    assert code == 0, out[-3000:]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_wasm_filter_in_shipped_configs_fails_by_reloading(path):
    # FAIL_OPEN would skip the filter when its VM fails: the request would go
    # to the provider with the caller's own credential and no key chosen.
    assert DEMO_CONFIG in CONFIGS
    doc = yaml.safe_load(concrete(path))
    found = list(wasm_filter_configs(doc))
    assert len(found) >= 2, f"{path.name}: expected the ingress and attempt stages"
    for cfg in found:
        assert cfg.get("failure_policy") == "FAIL_RELOAD", f"{path.name}: {cfg.get('name')} {cfg.get('failure_policy')}"
        assert "fail_open" not in cfg, f"{path.name}: {cfg.get('name')} sets the deprecated fail_open"
        assert cfg["vm_config"]["vm_id"] == "apikeyrouter"
    assert "FAIL_OPEN" not in scalars(doc), path.name
    assert "FAIL_OPEN" not in path.read_text().replace("never FAIL_OPEN", "")


def test_every_shipped_config_lets_more_than_3_retries_run_at_once():
    # Envoy's default circuit breaker allows 3 retries in flight per cluster;
    # past that a 429 goes to the client untried (see
    # test_shipped_config_retries_429s_under_concurrency). The shipped
    # configs use a retry budget instead: a share of the requests in flight,
    # never fewer than min_retry_concurrency.
    for path in CONFIGS:
        cfg = yaml.safe_load(concrete(path))
        retried = {n["cluster"] for n in nodes(cfg) if isinstance(n, dict) and "cluster" in n and "retry_policy" in n}
        assert retried, path.name
        for cluster in cfg["static_resources"]["clusters"]:
            if cluster["name"] not in retried:
                continue
            thresholds = (cluster.get("circuit_breakers") or {}).get("thresholds") or [{}]
            default = [t for t in thresholds if t.get("priority", "DEFAULT") == "DEFAULT"] or [{}]
            budget = default[0].get("retry_budget")
            if budget is None:
                assert default[0].get("max_retries", 3) > 3, f"{path.name}: cluster {cluster['name']}"
            else:
                assert budget.get("min_retry_concurrency", 3) > 3, f"{path.name}: cluster {cluster['name']}"


# The Istio manifests' stages, vm_id and failure policy: tests/test_istio.py.


def test_fernet_encrypted_key_material_reaches_the_provider_decrypted(start_mock, start_envoy):
    key = Fernet.generate_key()
    secret = "sk-decrypted-from-fernet-001"
    token = Fernet(key).encrypt(secret.encode()).decode()
    mock = start_mock([secret])
    plugin = plugin_with_keys([f"fernet:{token}"])
    env_keys = ["APIKEYROUTER_ADMIN_TOKEN", "APIKEYROUTER_ENCRYPTION_KEY"]
    e = start_envoy(mock, plugin=plugin, host_env_keys=env_keys,
                    env={"APIKEYROUTER_ENCRYPTION_KEY": key.decode()})
    assert chat(e.url)[0] == 200
    assert mock.received()[-1]["headers"]["authorization"] == f"Bearer {secret}"
    assert token not in e.logs() and secret not in e.logs()


def test_a_wrong_encryption_key_is_refused_naming_the_key(tmp_path):
    token = Fernet(Fernet.generate_key()).encrypt(b"sk-whatever").decode()
    plugin = plugin_with_keys([f"fernet:{token}"])
    cfg = render(DEMO_CONFIG.read_text(), 1, 2, 3, plugin=plugin,
                 host_env_keys=["APIKEYROUTER_ADMIN_TOKEN", "APIKEYROUTER_ENCRYPTION_KEY"])
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(cfg))
    code, out = validate(path, {"APIKEYROUTER_ADMIN_TOKEN": "an-admin-token-of-some-length",
                                "APIKEYROUTER_ENCRYPTION_KEY": Fernet.generate_key().decode()})
    assert code != 0
    assert "providers[0].keys[0].secret: key k1: cannot decrypt its fernet token" in out
