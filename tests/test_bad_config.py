"""Invalid configurations refused by `envoy --mode validate` with one line
that names the field and echoes no key material.

The whole corpus (tests/fixtures/bad_configs.json) is checked natively by
tests/bad_configs.rs, through the same compiler `on_configure` runs; here a
few representatives go through Envoy itself: JSON Envoy hands over unparsed,
a variable the VM cannot see (Envoy passes only `host_env_keys`), and a
cross-reference between sections."""

import json

import pytest

from harness import ADMIN_TOKEN, DEMO_CONFIG, ROOT, hcm, render, validate

CORPUS = json.loads((ROOT / "tests" / "fixtures" / "bad_configs.json").read_text())
THROUGH_ENVOY = ["not-json", "secret-env-not-passed-to-vm", "budget-scope-unknown-key", "objects-unknown-objects-policy"]
BAD_CONFIGS = [c for c in CORPUS["configs"] if c["id"] in THROUGH_ENVOY]


def test_the_corpus_matches_the_demo_configs_environment():
    assert len(BAD_CONFIGS) == len(THROUGH_ENVOY)
    assert CORPUS["base_env"]["APIKEYROUTER_ADMIN_TOKEN"] == ADMIN_TOKEN
    assert f"host_env_keys: [{', '.join(CORPUS['host_env_keys'])}]" in DEMO_CONFIG.read_text()


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c["id"] for c in BAD_CONFIGS])
def test_invalid_config_is_refused_with_one_line_naming_the_field(tmp_path, case):
    plugin, env, field, reason = case["plugin"], case["env"], case["field"], case["reason"]
    cfg = render(DEMO_CONFIG.read_text(), 1, 2, 3, plugin=plugin)
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(cfg))
    full_env = {**CORPUS["base_env"], **env}
    code, out = validate(path, full_env)
    assert code != 0, out[-2000:]
    lines = [l for l in out.splitlines() if "invalid apikeyrouter config:" in l]
    assert len(lines) == 1, lines or out[-2000:]
    message = lines[0].split("invalid apikeyrouter config: ", 1)[1]
    got_field, _, got_reason = message.partition(": ")
    assert got_field == field, message
    assert reason in got_reason, message
    for secret in CORPUS["secrets"]:
        assert secret not in message, "a refusal never echoes key material"


def test_envoy_config_naming_no_stage_in_root_id_is_refused_naming_root_id(tmp_path):
    cfg = render(DEMO_CONFIG.read_text(), 1, 2, 3)
    hcm(cfg)["http_filters"][0]["typed_config"]["config"]["root_id"] = "apikeyrouter"
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(cfg))
    code, out = validate(path, {"DEMO_KEY_1": "sk-a", "DEMO_KEY_2": "sk-b", "DEMO_KEY_3": "sk-c",
                                "APIKEYROUTER_ADMIN_TOKEN": ADMIN_TOKEN})
    assert code != 0
    lines = [l for l in out.splitlines() if "invalid apikeyrouter config:" in l]
    assert len(lines) == 1 and "invalid apikeyrouter config: root_id: " in lines[0], lines or out[-2000:]
