//! Falling over to the next provider (issue 20), as far as the fake host
//! can show it: which provider the ingress stage sends a request to. The
//! internal redirect itself is Envoy's: `tests/test_fallover.py`.

use super::fake::Exchange;
use super::host::{Map, Next};
use super::lifecycle_tests::Gateway;

/// OpenAI (k1, with a budget of its own) and Azure both serve gpt-4o.
fn two_providers(k1_cap: &str) -> String {
    format!(
        r#"{{"providers":[{{"id":"openai","keys":[{{"id":"k1","secret":"sk-one"}}]}},
              {{"id":"az","kind":"azure","keys":[{{"id":"z1","secret":"az-one"}}]}}],
            "models":{{"gpt-4o":[{{"provider":"openai"}},{{"provider":"az","model":"gpt4o-prod"}}]}},
            "prices":{{"gpt-4o":{{"input":"2.50","output":"10"}}}},
            "budgets":[{{"id":"k1-cap","limit":"{k1_cap}","scope":{{"key":"k1"}}}}]}}"#
    )
}

fn provider_chosen_for_gpt_4o(gw: &Gateway) -> Option<String> {
    let headers = [(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json")];
    let body = r#"{"model":"gpt-4o","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut x = Exchange::new(&gw.world, &gw.ingress, &headers, body.as_bytes());
    assert_eq!(x.send_request(usize::MAX, false), Next::Continue, "{:?}", x.replied());
    x.downstream.get(Map::RequestHeaders, "x-apikeyrouter-provider")
}

#[test]
fn a_provider_whose_keys_own_budgets_have_no_room_passes_the_request_to_the_next_provider() {
    // Room for the request at k1: OpenAI serves it.
    assert_eq!(provider_chosen_for_gpt_4o(&Gateway::new(&two_providers("10"))).as_deref(), Some("openai"));
    // No room at its only key: the request goes to Azure before any attempt.
    assert_eq!(provider_chosen_for_gpt_4o(&Gateway::new(&two_providers("0.000001"))).as_deref(), Some("az"));
}
