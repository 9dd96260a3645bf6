"""Tokens per UTC minute (`tpm`) end to end, through real Envoy: a client's
tpm policy refuses once the minute's tokens are used, and a key's tpm quota
moves the choice to another key. Both count the tokens of finished
requests, so each request here waits until the previous one is recorded,
and each scenario is checked to have run inside one UTC minute (a scenario
that straddles a minute boundary is run again on a fresh gateway)."""

import json
import time

from harness import chat, http, plugin_with_keys, secrets, sha256_hex, wait_recorded, wait_until

APP_KEY = "vk-tpm-app-0123456789"
OTHER_KEY = "vk-tpm-other-0123456789"
# The mock reports this many completion tokens when the request asks for it
# (mock_completion_tokens), so one request is a little over 1,000 tokens.
COMPLETION = 1000


def minute():
    return int(time.time() // 60)


def within_one_utc_minute(scenario, tries=3):
    """Runs scenario() (which starts its own gateway) until one run starts
    and ends in the same UTC minute, and returns its result. A run is not
    begun in the last 20 s of a minute."""
    for _ in range(tries):
        if time.time() % 60 > 40:
            start = minute()
            wait_until(lambda: minute() != start, timeout=25, interval=0.2, what="the next UTC minute")
        first = minute()
        result = scenario()
        if minute() == first:
            return result
    raise AssertionError(f"{tries} runs each straddled a UTC minute boundary")


def ask(e, headers=None):
    return chat(e.url, headers=headers, extra={"max_tokens": 10, "mock_completion_tokens": COMPLETION})


def client_tokens_metric(e):
    _, _, body = http("GET", e.admin_url + "/stats/prometheus")
    for line in body.decode().splitlines():
        if line.startswith('apikeyrouter_client_tokens{client="app"} '):
            return int(line.split()[-1])
    return None


def test_a_clients_tpm_refuses_once_the_minutes_tokens_are_used(mock3, start_envoy):
    tpm = 2500
    plugin = plugin_with_keys(secrets(3))
    plugin["clients"] = [{"id": "app", "key_sha256": sha256_hex(APP_KEY), "tpm": tpm},
                         {"id": "other", "key_sha256": sha256_hex(OTHER_KEY), "tpm": tpm}]
    bearer = {"authorization": f"Bearer {APP_KEY}"}

    def scenario():
        mock3.reset()
        e = start_envoy(mock3, plugin=plugin)
        used = []
        while True:
            status, headers, body = ask(e, bearer)
            if status != 200:
                return e, used, (status, headers, body)
            used.append(json.loads(body)["usage"]["total_tokens"])
            assert len(used) <= 3, used
            # Counted when the request finishes: wait until it is (the
            # client's token metric is written in the same step).
            wait_until(lambda: client_tokens_metric(e) == sum(used), timeout=10,
                       what=f"client tokens {sum(used)} recorded")

    e, used, (status, headers, body) = within_one_utc_minute(scenario)
    # Admitted while the minute's tokens were under the limit: 3 requests of
    # a little over 1,000 tokens each against 2,500.
    assert len(used) == 3 and sum(used[:-1]) < tpm <= sum(used), used
    err = json.loads(body)["error"]
    wait = int(headers["retry-after"])
    assert status == 429 and 1 <= wait <= 60, (status, headers)
    assert err == {"message": f"Client 'app' is over its tokens per minute limit; retry in {wait} s.",
                   "type": "rate_limit_error", "param": None, "code": "client_rate_limited"}
    assert len(mock3.received()) == 3, "the refused request never reached the provider"
    assert client_tokens_metric(e) == sum(used)
    # The limit is per client: another client with the same policy is served.
    assert ask(e, {"authorization": f"Bearer {OTHER_KEY}"})[0] == 200


def test_a_keys_tpm_quota_moves_choice_to_another_key(start_mock, start_envoy):
    keys = secrets(2)
    mock = start_mock(keys)
    tpm = 1500
    plugin = plugin_with_keys(keys, routing={"objective": "cost"})
    k1, k2 = plugin["providers"][0]["keys"]
    # k1 is the cheaper: the cost objective takes it while it has room.
    k1.update(cost_per_1k="0.001", limits={"tpm": tpm})
    k2.update(cost_per_1k="0.002")

    def scenario():
        mock.reset()
        e = start_envoy(mock, plugin=plugin)
        served = []
        for n in range(1, 6):
            status, headers, body = ask(e)
            assert status == 200, body
            served.append((headers["x-apikeyrouter-key-id"], headers["x-apikeyrouter-decision"],
                           json.loads(body)["usage"]["total_tokens"]))
            wait_recorded(e, n)
        return e, served, e.key_counters()["k1"]

    e, served, k1_state = within_one_utc_minute(scenario)
    tokens = served[0][2]
    assert 750 <= tokens < 1275, "2 requests use up 1,500 and 1 leaves more than 15%"
    # k1 serves until its minute's tokens reach its tpm, then k2 does.
    assert [kid for kid, _, _ in served] == ["k1", "k1", "k2", "k2", "k2"], served
    for kid, decision, _ in served[:2]:
        assert decision.startswith("objective=cost; key=k1; score=1.000; margin="), decision
        assert decision.endswith("; candidates=2"), "nothing excluded"
    for kid, decision, _ in served[2:]:
        assert decision == ("objective=cost; key=k2; score=1.000; margin=-; confidence=0.000; candidates=1; "
                            "excluded=k1:quota_exhausted"), decision
    assert (k1_state["capacity_state"], k1_state["headroom"], k1_state["headroom_tightest"]) == (
        "exhausted", 0.0, "tpm"), k1_state
    assert k1_state["state"] == "available", "a used-up quota is capacity, not a state change"
    assert k1_state["counters"]["total_tokens"] == 2 * tokens
