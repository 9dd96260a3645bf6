"""Charging what was served, through real Envoy (issue 16, points 1 and 2;
the rules are in README, "Budgets", and src/charge.rs): a caller that hangs
up mid-stream is charged its prompt estimate plus the text it was sent / 4;
a 2xx without usage is charged its reservation; a model priced per request
costs exactly its price; a background response is charged once, at its
creation, and its polls are not. Each amount is computed from what the mock
provider sent or billed and compared to the last decimal."""

import json
from decimal import Decimal

from harness import (PRICE_IN, PRICE_OUT, PRICES, budget_of, expected_spend, http, open_stream, plugin_with_keys,
                     secrets, wait_until)

PER_IMAGE = Decimal("0.04")
DEFAULT_MAX_TOKENS = 100


def plugin(keys, **extra):
    """gpt-4o-mini and tts-1 at the harness prices, dall-e-3 per request,
    unpriced models refused, 100 output tokens assumed when a request sets no
    cap, and a roomy hard budget `b`."""
    prices = {**PRICES, "tts-1": PRICES["gpt-4o-mini*"], "dall-e-3": {"per_request": str(PER_IMAGE)}}
    return plugin_with_keys(keys, prices=prices, unknown_model="refuse",
                            estimate={"default_max_tokens": DEFAULT_MAX_TOKENS},
                            budgets=[{"id": "b", "window": "day", "limit": "100"}], **extra)


def tokens_cost(input_tokens, output_tokens):
    return (Decimal(input_tokens) * PRICE_IN + Decimal(output_tokens) * PRICE_OUT) / 10**6


def reservation(raw_body, max_tokens):
    """The admission upper bound: every body byte a prompt token, every
    allowed output token."""
    return tokens_cost(len(raw_body), max_tokens)


def post(e, path, body):
    raw = json.dumps(body)
    status, headers, data = http("POST", e.url + path, raw)
    return raw, status, headers, data


def settled(e, requests):
    """Waits until budget b has charged `requests` requests and holds
    nothing; returns its record."""
    wait_until(lambda: budget_of(e, "b")["requests"] == requests and budget_of(e, "b")["reserved"] == "0",
               what=f"{requests} requests charged, nothing reserved")
    return budget_of(e, "b")


def outcome(e, request_id):
    """The filter's outcome in the access-log line of `request_id`."""
    found = {}

    def logged():
        for line in e.logs().splitlines():
            if line.startswith("{") and request_id in line:
                entry = json.loads(line)
                if entry.get("request_id") == request_id and entry.get("apikeyrouter") not in (None, "-"):
                    found["o"] = json.loads(entry["apikeyrouter"])
                    return True
        return False

    wait_until(logged, what=f"access log of {request_id}")
    return found["o"]


def decision(e, request_id):
    def mine():
        status, _, body = e.admin_api("GET", "decisions?limit=1000")
        return [d for d in json.loads(body)["decisions"] if d["request_id"] == request_id]

    wait_until(mine, what=f"decision record of {request_id}")
    return mine()[0]


def test_a_caller_that_hangs_up_mid_stream_is_charged_its_prompt_and_the_text_it_was_sent(mock3, start_envoy):
    e = start_envoy(mock3, plugin=plugin(secrets(3)))
    # Each stream sends three chunks, then waits: the caller reads them and hangs up.
    mock3.control("/_mock/stream", {"chunks": 8, "gate": True, "gate_after": 3})
    ids, raws = [], []
    try:
        for n in range(4):
            body = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 50,
                    "messages": [{"role": "user", "content": f"hang up {n}"}]}
            conn, resp = open_stream(e.url, body)
            assert resp.status == 200
            read = 0
            while read < 3:
                read += resp.readline().startswith(b"data: ")
            ids.append(resp.getheader("x-request-id"))
            raws.append(json.dumps(body))
            conn.close()
            settled(e, n + 1)
        # Read before the gate opens: what each stream had sent when its caller left.
        sent = [r["sent_text"] for r in mock3.received()]
    finally:
        mock3.control("/_mock/release", {})
    assert sent == ["tok0 tok1 tok2 "] * 4
    # The rule: the prompt estimate (its bytes) + ceil(characters / 4) output tokens.
    charges = [tokens_cost(len(raw), -(-len(text) // 4)) for raw, text in zip(raws, sent)]
    assert all(0 < c <= reservation(raw, 50) for c, raw in zip(charges, raws))
    assert Decimal(budget_of(e, "b")["spent"]) == sum(charges)
    assert expected_spend(mock3) == 0, "the provider reported no usage for streams cut short"
    for rid, charge in zip(ids, charges):
        o = outcome(e, rid)
        assert o.get("charged") == "partial", o
        assert (Decimal(o["cost"]), o["output_tokens"]) == (charge, 4), o
        assert decision(e, rid)["charged"] == "partial"


def test_a_2xx_without_usage_is_charged_its_reservation(mock3, start_envoy):
    e = start_envoy(mock3, plugin=plugin(secrets(3)))
    mock3.behavior("*", fault="no_usage")
    expected = []
    for stream in (False, True):
        raw, status, headers, data = post(e, "/v1/chat/completions",
                                          {"model": "gpt-4o-mini", "max_tokens": 50, "stream": stream,
                                           "messages": [{"role": "user", "content": "no usage, please"}]})
        assert status == 200 and b'"usage"' not in data
        expected.append(reservation(raw, 50))
        if not stream:
            assert Decimal(headers["x-apikeyrouter-cost"]) == expected[-1]
        assert outcome(e, headers["x-request-id"])["charged"] == "reservation"
    mock3.reset()
    raw, status, headers, data = post(e, "/v1/audio/speech", {"model": "tts-1", "input": "Hello", "voice": "alloy"})
    assert status == 200 and headers["content-type"] == "audio/mpeg"
    expected.append(reservation(raw, DEFAULT_MAX_TOKENS))
    assert Decimal(settled(e, 3)["spent"]) == sum(expected)
    o = outcome(e, headers["x-request-id"])
    assert (o["charged"], Decimal(o["cost"])) == ("reservation", expected[-1])


def test_a_model_priced_per_request_is_charged_exactly_its_price_per_2xx(mock3, start_envoy):
    keys = secrets(3)
    e = start_envoy(mock3, plugin=plugin(keys))
    for n in range(3):
        raw, status, headers, data = post(e, "/v1/images/generations",
                                          {"model": "dall-e-3", "prompt": f"a cat, take {n}"})
        assert status == 200 and json.loads(data)["data"][0]["url"]
        assert Decimal(headers["x-apikeyrouter-cost"]) == PER_IMAGE
        o = outcome(e, headers["x-request-id"])
        assert (o["charged"], o["cost"]) == ("per_request", "0.04")
    # Priced, not unknown: an unpriced model is still refused.
    _, status, _, data = post(e, "/v1/images/generations", {"model": "dall-e-2", "prompt": "a cat"})
    assert status == 400 and json.loads(data)["error"]["code"] == "model_not_priced"
    served = sum(s["statuses"].get("200", 0) for s in mock3.stats().values())
    assert served == 3
    assert Decimal(settled(e, 3)["spent"]) == PER_IMAGE * served


def test_a_background_response_is_charged_once_at_creation_and_its_polls_are_not(mock3, start_envoy):
    e = start_envoy(mock3, plugin=plugin(secrets(3)))
    raw, status, headers, data = post(e, "/v1/responses",
                                      {"model": "gpt-4o-mini", "background": True, "input": "Write a poem."})
    created = json.loads(data)
    assert status == 200 and created["status"] == "queued" and created["usage"] is None
    charged = reservation(raw, DEFAULT_MAX_TOKENS)
    assert Decimal(settled(e, 1)["spent"]) == charged
    assert outcome(e, headers["x-request-id"])["charged"] == "reservation"
    # The provider billed its usage once; the reservation covers it.
    assert 0 < expected_spend(mock3) <= charged
    for _ in range(2):
        status, headers, data = http("GET", e.url + f"/v1/responses/{created['id']}")
        assert status == 200 and json.loads(data)["usage"]["total_tokens"] > 0
        o = outcome(e, headers["x-request-id"])
        assert "charged" not in o and "cost" not in o, o
    assert len(mock3.received()) == 3
    b = budget_of(e, "b")
    assert (Decimal(b["spent"]), b["requests"], b["reserved"]) == (charged, 1, "0"), "polls are not charged"
