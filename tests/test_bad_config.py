"""A corpus of invalid configurations, each refused by `envoy --mode
validate` with one line that names the field and echoes no key material."""

import json

import pytest

from harness import ADMIN_TOKEN, DEMO_CONFIG, hcm, render, validate


def _p(keys='{"id": "k1", "secret": "sk-a"}', **extra):
    """A plugin config (as JSON text) with one provider and these keys, plus extra top-level fields."""
    cfg = json.loads('{"providers": [{"id": "openai", "keys": [%s]}]}' % keys)
    cfg.update(extra)
    return json.dumps(cfg)


SHA = "0" * 64
# (id, plugin config text, extra environment, expected field, a fragment of the reason)
BAD_CONFIGS = [
    ("not-json", '{"providers": [', {}, "(root)", "not valid JSON"),
    ("root-not-object", '["providers"]', {}, "(root)", "expected an object"),
    ("no-providers", "{}", {}, "providers", "required"),
    ("providers-empty", '{"providers": []}', {}, "providers", "at least one provider"),
    ("provider-id-charset", '{"providers": [{"id": "open ai", "keys": [{"id": "k1", "secret": "s"}]}]}', {},
     "providers[0].id", "must be 1-64 characters"),
    ("provider-id-duplicate", '{"providers": [{"id": "p", "keys": [{"id": "a", "secret": "s"}]},'
                              ' {"id": "p", "keys": [{"id": "b", "secret": "s"}]}]}', {},
     "providers[1].id", "duplicate provider id"),
    ("provider-kind", '{"providers": [{"id": "p", "kind": "anthropic-ish", "keys": [{"id": "a", "secret": "s"}]}]}',
     {}, "providers[0].kind", "unknown provider kind"),
    ("keys-empty", _p(keys=""), {}, "providers[0].keys", "at least one key"),
    ("key-id-duplicate", _p(keys='{"id": "k1", "secret": "a"}, {"id": "k1", "secret": "b"}'), {},
     "providers[0].keys[1].id", "duplicate key id"),
    ("key-no-secret", _p(keys='{"id": "k1"}'), {}, "providers[0].keys[0]", "one of secret_env or secret"),
    ("key-both-secrets", _p(keys='{"id": "k1", "secret": "a", "secret_env": "DEMO_KEY_1"}'), {},
     "providers[0].keys[0]", "not both"),
    ("secret-env-not-passed-to-vm", _p(keys='{"id": "k1", "secret_env": "NOT_IN_HOST_ENV_KEYS"}'),
     {"NOT_IN_HOST_ENV_KEYS": "sk-set-but-not-listed"}, "providers[0].keys[0].secret_env", "is not set"),
    ("secret-env-empty", _p(keys='{"id": "k1", "secret_env": "DEMO_KEY_1"}'), {"DEMO_KEY_1": ""},
     "providers[0].keys[0].secret_env", "is empty"),
    ("secret-with-space", _p(keys='{"id": "k1", "secret": "sk-has space"}'), {},
     "providers[0].keys[0].secret", "printable ASCII"),
    ("weight-zero", _p(keys='{"id": "k1", "secret": "a", "weight": 0}'), {},
     "providers[0].keys[0].weight", "from 1 to 10000"),
    ("weight-string", _p(keys='{"id": "k1", "secret": "a", "weight": "3"}'), {},
     "providers[0].keys[0].weight", "found a string"),
    ("key-unknown-field", _p(keys='{"id": "k1", "secret": "a", "wieght": 3}'), {},
     "providers[0].keys[0].wieght", "unknown field"),
    ("key-cost-not-decimal", _p(keys='{"id": "k1", "secret": "a", "cost_per_1k": "cheap"}'), {},
     "providers[0].keys[0].cost_per_1k", "decimal"),
    ("cooldown-default-above-max", _p(cooldown={"default_seconds": 120, "max_seconds": 60}), {},
     "cooldown.default_seconds", "must not exceed"),
    ("cooldown-max-zero", _p(cooldown={"max_seconds": 0}), {}, "cooldown.max_seconds", "from 1 to 604800"),
    ("inject-stream-usage-string", _p(inject_stream_usage="yes"), {}, "inject_stream_usage", "true or false"),
    ("objective-unknown", _p(routing={"objective": "cheapest"}), {}, "routing.objective", "cheapest"),
    ("stats-refresh-too-fast", _p(routing={"stats_refresh_ms": 1}), {}, "routing.stats_refresh_ms", "from 10"),
    ("capacity-thresholds-crossed", _p(routing={"capacity": {"constrained_below": 0.2, "critical_below": 0.3}}), {},
     "routing.capacity.critical_below", "must not exceed constrained_below"),
    ("status-action-not-an-error", _p(status_actions={"200": "cooldown"}), {},
     "status_actions.200", "HTTP status from 400 to 599"),
    ("status-action-unknown", _p(status_actions={"429": "explode"}), {}, "status_actions.429", "cooldown"),
    ("error-code-action-unknown", _p(error_code_actions={"insufficient_quota": "shrug"}), {},
     "error_code_actions.insufficient_quota", "cooldown"),
    ("decisions-ring-too-big", _p(decisions={"ring_size": 100001}), {}, "decisions.ring_size", "from 0 to 100000"),
    ("max-transitions-negative", _p(max_transitions=-1), {}, "max_transitions", "from 0 to 100000"),
    ("price-not-decimal", _p(prices={"gpt-4o": {"input": "two", "output": "1"}}), {},
     "prices.gpt-4o.input", "decimal"),
    ("price-output-missing", _p(prices={"gpt-4o": {"input": "1"}}), {}, "prices.gpt-4o.output", "required"),
    ("refuse-unknown-model-without-prices", _p(unknown_model="refuse"), {}, "unknown_model", "needs a price table"),
    ("estimate-bytes-per-token-zero", _p(estimate={"prompt_bytes_per_token": 0}), {},
     "estimate.prompt_bytes_per_token", "from 1 to 16"),
    ("budget-limit-zero", _p(budgets=[{"id": "b", "limit": "0"}]), {}, "budgets[0].limit", "positive decimal"),
    ("budget-window-week", _p(budgets=[{"id": "b", "limit": "1", "window": "week"}]), {},
     "budgets[0].window", "minute, hour, day, month or total"),
    ("budget-scope-unknown-key", _p(budgets=[{"id": "b", "limit": "1", "scope": {"key": "k9"}}]), {},
     "budgets[0].scope.key", "no key with id"),
    ("budget-id-duplicate", _p(budgets=[{"id": "b", "limit": "1"}, {"id": "b", "limit": "2"}]), {},
     "budgets[1].id", "duplicate budget id"),
    ("admin-token-env-missing", _p(admin={}), {}, "admin.token_env", "required"),
    ("admin-token-too-short", _p(admin={"token_env": "APIKEYROUTER_ADMIN_TOKEN"}),
     {"APIKEYROUTER_ADMIN_TOKEN": "short"}, "admin.token_env", "at least 16 characters"),
    ("admin-prefix-under-v1", _p(admin={"token_env": "APIKEYROUTER_ADMIN_TOKEN", "prefix": "/v1/admin/"}), {},
     "admin.prefix", "must not overlap"),
    ("client-key-in-the-clear", _p(clients=[{"id": "app", "key_sha256": "sk-gateway-plain-key"}]), {},
     "clients[0].key_sha256", "64 hex digits"),
    ("client-team-unknown", _p(clients=[{"id": "app", "team": "red", "key_sha256": SHA}]), {},
     "clients[0].team", "no team"),
    ("client-expiry-not-rfc3339", _p(clients=[{"id": "app", "expires_at": "next week", "key_sha256": SHA}]), {},
     "clients[0].expires_at", "RFC 3339"),
    ("team-rpm-zero", _p(teams=[{"id": "t", "rpm": 0}]), {}, "teams[0].rpm", "from 1"),
    ("team-provider-unknown", _p(teams=[{"id": "t", "allowed_providers": ["azure"]}]), {},
     "teams[0].allowed_providers", "no provider"),
    ("top-level-typo", _p(colldown={"default_seconds": 5}), {}, "colldown", "unknown field"),
]


@pytest.mark.parametrize("plugin,env,field,reason", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_invalid_config_is_refused_with_one_line_naming_the_field(tmp_path, plugin, env, field, reason):
    cfg = render(DEMO_CONFIG.read_text(), 1, 2, 3, plugin=plugin)
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(cfg))
    full_env = {"DEMO_KEY_1": "sk-a", "DEMO_KEY_2": "sk-b", "DEMO_KEY_3": "sk-c",
                "APIKEYROUTER_ADMIN_TOKEN": ADMIN_TOKEN, **env}
    code, out = validate(path, full_env)
    assert code != 0, out[-2000:]
    lines = [l for l in out.splitlines() if "invalid apikeyrouter config:" in l]
    assert len(lines) == 1, lines or out[-2000:]
    message = lines[0].split("invalid apikeyrouter config: ", 1)[1]
    got_field, _, got_reason = message.partition(": ")
    assert got_field == field, message
    assert reason in got_reason, message
    for secret in ("sk-a", "sk-has space", "sk-set-but-not-listed", "sk-gateway-plain-key", ADMIN_TOKEN):
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
