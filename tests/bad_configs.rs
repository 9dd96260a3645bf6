//! Every invalid configuration of `tests/fixtures/bad_configs.json` is
//! refused by the compiler with one line that names the field and echoes no
//! key material: the same check `envoy --mode validate` makes through
//! `on_configure` (tests/test_bad_config.py runs representatives through
//! Envoy itself).

use apikeyrouter::config::compile;
use serde_json::Value;
use std::collections::HashMap;

const CORPUS: &str = include_str!("fixtures/bad_configs.json");

fn corpus() -> Value {
    let v: Value = serde_json::from_str(CORPUS).unwrap_or(Value::Null);
    assert!(v["configs"].is_array(), "tests/fixtures/bad_configs.json is not the corpus");
    v
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

fn map(v: &Value) -> HashMap<String, String> {
    v.as_object().into_iter().flatten().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string()))).collect()
}

#[test]
fn every_invalid_config_is_refused_with_one_line_naming_the_field() {
    let doc = corpus();
    let visible = strings(&doc["host_env_keys"]);
    let secrets = strings(&doc["secrets"]);
    let configs = doc["configs"].as_array().cloned().unwrap_or_default();
    assert!(configs.len() >= 46, "the corpus is all there: {}", configs.len());
    for c in &configs {
        let id = c["id"].as_str().unwrap_or("?");
        let mut env = map(&doc["base_env"]);
        env.extend(map(&c["env"]));
        // The VM sees only the variables Envoy passes through host_env_keys.
        let lookup = |name: &str| visible.iter().any(|v| v == name).then(|| env.get(name).cloned()).flatten();
        let plugin = c["plugin"].as_str().unwrap_or_else(|| panic!("{id}: plugin must be JSON text"));
        let err = match compile(plugin.as_bytes(), &lookup) {
            Ok(_) => panic!("{id}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(!err.contains('\n'), "{id}: more than one line: {err}");
        let message = err
            .strip_prefix("invalid apikeyrouter config: ")
            .unwrap_or_else(|| panic!("{id}: not the config error line: {err}"));
        let (field, reason) = message.split_once(": ").unwrap_or_else(|| panic!("{id}: no field: {message}"));
        assert_eq!(field, c["field"].as_str().unwrap_or_default(), "{id}: {message}");
        let want = c["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(want), "{id}: {reason:?} does not say {want:?}");
        for s in &secrets {
            assert!(!message.contains(s.as_str()), "{id}: the refusal echoes key material");
        }
    }
}
