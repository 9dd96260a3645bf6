"""What a provider's answer does to its key, through real Envoy: non-default
`status_actions` and `error_code_actions` (the action `none` included), a
401 naming a bad key disabling it under the default actions, and a 403 that
does not blame the key leaving it alone. Each is checked through the key's
state in the admin API and through what the next request gets."""

import calendar
import json
import time

import pytest

from harness import chat, http, ids_by_secret, plugin_with_keys, secrets, wait_recorded, wait_until

NO_KEY = ("No API key of provider 'openai' is available right now: "
          "{throttled} cooling down after rate limits, {disabled} disabled, {exhausted} exhausted.")


def error_body(code, kind="invalid_request_error", message="provider error"):
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def next_utc_midnight_ms(t):
    day = time.gmtime(t)
    return (calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0)) + 86400) * 1000


# id: (plugin fields, the mock's answer, what it does to the key)
#   "none": nothing: the key stays available and the caller gets the
#           provider's own answer, after one attempt (the filter's verdict
#           asks for no other key) or, for a provider failure (500, 502,
#           503), after the route's 4 attempts on the same (only) key;
#   a state: the key leaves the rotation at once: the verdict asks for
#           another key, the retry finds none and gets the attempt stage's
#           429; the next request is refused at ingress without reaching the
#           provider.
CASES = {
    # A status whose default action cools, disables or exhausts: `none`.
    "429-none": ({"status_actions": {"429": "none"}},
                 {"status": 429, "headers": {"retry-after": "30"},
                  "body": error_body("rate_limit_exceeded", "requests", "Rate limit reached")}, "none"),
    "invalid_api_key-none": ({"error_code_actions": {"invalid_api_key": "none"}},
                             {"status": 401, "body": error_body("invalid_api_key")}, "none"),
    "500-none": ({}, {"status": 500, "body": error_body(None, "server_error", "The server had an error")}, "none"),
    "403-disable": ({"status_actions": {"403": "disable"}},
                    {"status": 403, "body": error_body("unsupported_country_region_territory", "request_forbidden")},
                    ("disabled", "provider answered 403")),
    "402-none": ({"status_actions": {"402": "none"}},
                 {"status": 402, "body": error_body("payment_required")}, "none"),
    # Other actions than the defaults.
    "500-cooldown": ({"status_actions": {"500": "cooldown"}},
                     {"status": 500, "headers": {"retry-after": "120"}}, ("throttled", 120)),
    "429-disable": ({"status_actions": {"429": "disable"}},
                    {"status": 429, "headers": {"retry-after": "1"}}, ("disabled", "provider status action")),
    "403-exhaust": ({"status_actions": {"403": "exhaust"}},
                    {"status": 403, "body": error_body("unsupported_country_region_territory", "request_forbidden")},
                    ("exhausted", "provider answered 403")),
    # An error code's action, over the status's.
    "insufficient_quota-cooldown": ({"error_code_actions": {"insufficient_quota": "cooldown"}},
                                    {"status": 429, "headers": {"retry-after": "90"},
                                     "body": error_body("insufficient_quota", "insufficient_quota")},
                                    ("throttled", 90)),
    "code-disable-on-400": ({"error_code_actions": {"organization_deactivated": "disable"}},
                            {"status": 400, "body": error_body("organization_deactivated")},
                            ("disabled", "provider status action")),
    "type-exhaust-on-400": ({"error_code_actions": {"billing_error": "exhaust"}},
                            {"status": 400, "body": {"error": {"message": "billing", "type": "billing_error",
                                                               "param": None, "code": None}}},
                            ("exhausted", "provider status action")),
}


def one_key_gateway(start_mock, start_envoy, fields):
    keys = secrets(1)
    mock = start_mock(keys)
    e = start_envoy(mock, plugin=plugin_with_keys(keys, **fields))
    return mock, e, keys


@pytest.mark.parametrize("fields,answer,effect", list(CASES.values()), ids=list(CASES))
def test_a_configured_action_is_what_the_answer_does_to_the_key(start_mock, start_envoy, fields, answer, effect):
    mock, e, keys = one_key_gateway(start_mock, start_envoy, fields)
    mock.behavior(keys[0], **answer)
    # A provider failure is worth another attempt whatever the key's state.
    failed = answer["status"] in (500, 502, 503, 529)
    before = time.time()
    status, headers, body = chat(e.url)
    after = time.time()
    k1 = e.key_counters()["k1"]
    if effect == "none":
        attempts = 4 if failed else 1
        # Every attempt used k1 and got the provider's answer, which the
        # caller then got as it was.
        assert (status, headers["x-apikeyrouter-attempts"]) == (answer["status"], str(attempts)), body
        assert json.loads(body) == answer["body"]
        assert len(mock.received()) == attempts
        counters = wait_recorded(e, attempts)["k1"]
        k1 = e.key_counters()["k1"]
        assert (k1["state"], k1["state_reason"], k1["cooldown_until_ms"]) == ("available", None, None), k1
        assert counters["cooldowns"] == 0
        assert counters["rate_limited"] == (attempts if answer["status"] == 429 else 0)
        # The next request reaches the provider again.
        assert chat(e.url)[0] == answer["status"]
        assert len(mock.received()) == 2 * attempts
        return
    state, detail = effect
    assert len(mock.received()) == 1, "the key was used once, then left the rotation"
    # The verdict asked for another key; Envoy's retry found none left: the
    # attempt stage's own 429.
    assert (status, headers["x-apikeyrouter-attempts"]) == (429, "2"), body
    assert json.loads(body)["error"]["code"] == "no_available_key"
    assert k1["state"] == state, k1
    if state == "throttled":
        # The provider's retry-after, not cooldown.default_seconds (60).
        assert 60_000 < k1["cooldown_remaining_ms"] <= detail * 1000, k1
        assert k1["counters"]["cooldowns"] == 1
        assert k1["state_reason"] is None
    else:
        assert k1["state_reason"] == detail, k1
        assert k1["cooldown_until_ms"] is None
        if state == "exhausted":
            # No monthly quota: back at the next UTC midnight.
            assert k1["state_until_ms"] in {next_utc_midnight_ms(before), next_utc_midnight_ms(after)}, k1
        else:
            assert k1["state_until_ms"] is None
    # The next request is refused at ingress, naming the key's state.
    status, headers, body = chat(e.url)
    assert status == 429 and int(headers["retry-after"]) >= 1
    counts = {"throttled": 0, "disabled": 0, "exhausted": 0, state: 1}
    assert json.loads(body)["error"] == {"message": NO_KEY.format(**counts), "type": "rate_limit_error",
                                         "param": None, "code": "no_available_key"}
    assert len(mock.received()) == 1


def test_an_error_code_set_to_none_wins_over_its_status(start_mock, start_envoy):
    mock, e, keys = one_key_gateway(start_mock, start_envoy,
                                    {"status_actions": {"403": "disable"},
                                     "error_code_actions": {"unsupported_country_region_territory": "none"}})
    mock.behavior(keys[0], status=403, body=error_body("unsupported_country_region_territory", "request_forbidden"))
    status, headers, _ = chat(e.url)
    assert (status, headers.get("x-apikeyrouter-attempts"), headers.get("x-apikeyrouter-retry")) == (403, "1", None)
    assert e.key_counters()["k1"]["state"] == "available"


def test_a_403_that_does_not_blame_the_key_goes_back_to_the_caller_and_every_key_stays(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys))
    forbidden = error_body("unsupported_country_region_territory", "request_forbidden",
                           "Country, region, or territory not supported")
    mock3.behavior(keys[0], status=403, body=forbidden, times=1)
    status, headers, body = chat(e.url)
    # One attempt: the verdict asks for no other key, and the caller gets
    # the provider's answer as it was.
    assert (status, headers["x-apikeyrouter-attempts"], json.loads(body)) == (403, "1", forbidden)
    assert "x-apikeyrouter-retry" not in headers
    assert {k: c["state"] for k, c in e.key_counters().items()} == {
        "k1": "available", "k2": "available", "k3": "available"}
    served = {chat(e.url)[1]["x-apikeyrouter-key-id"] for _ in range(6)}
    assert served == {"k1", "k2", "k3"}


def test_a_401_naming_a_bad_key_disables_it_and_the_next_requests_use_the_others(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin_with_keys(keys))
    mock3.behavior(keys[0], status=401,
                   body=error_body("invalid_api_key", "invalid_request_error", "Incorrect API key provided"))
    id_of = ids_by_secret(keys)
    served = []
    for _ in range(12):
        status, headers, body = chat(e.url)
        assert status == 200, body
        served.append(headers["x-apikeyrouter-key-id"])
    used = [id_of[r["key"]] for r in mock3.received()]
    # k1 answered 401 once; that request was retried on another key.
    assert used.count("k1") == 1 and len(used) == 13, used
    assert "k1" not in served and set(served) == {"k2", "k3"}
    k1 = e.key_counters()["k1"]
    assert (k1["state"], k1["state_reason"], k1["state_until_ms"]) == ("disabled", "provider answered 401", None)
    assert k1["counters"]["client_errors"] == 1
    # Every decision after the 401 says why k1 was left out.
    status, headers, _ = chat(e.url)
    assert status == 200 and "excluded=k1:disabled" in headers["x-apikeyrouter-decision"]
    status, _, body = e.admin_api("GET", "transitions?limit=10")
    moves = [(t["id"], t["to"], t["reason"]) for t in json.loads(body)["transitions"] if t["kind"] == "key"]
    assert moves == [("k1", "disabled/abundant", "provider answered 401")], moves

    def gauge():
        _, _, text = http("GET", e.admin_url + "/stats/prometheus")
        return 'apikeyrouter_key_state{provider="openai",key="k1"} 3' in text.decode()

    wait_until(gauge, timeout=10, what="k1's state gauge at 3 (disabled)")
