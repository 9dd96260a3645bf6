"""Usage by model through real Envoy (issue 22, point 7): requests, tokens
and spend in /stats/prometheus carry a `model` label that is the price
table's entry for the request's model (an exact name, dots and all, or a
`prefix*` entry), and `other` for a model the table does not name; the
access-log outcome names the model and adds the cached and reasoning tokens
the provider reported and the admission's estimate."""

import json
from decimal import Decimal

from harness import PRICE_IN, PRICE_OUT, PRICES, http, plugin_with_keys, secrets, wait_until
from test_charging import outcome
from test_metric_values import micros, prometheus
from test_budget_scopes import usage_for

MAX_TOKENS = 16


def body(model, content, **extra):
    return json.dumps({"model": model, "max_tokens": MAX_TOKENS,
                       "messages": [{"role": "user", "content": content}], **extra}).encode()


def cost(b):
    u = usage_for(json.loads(b))
    return (Decimal(u["prompt_tokens"]) * PRICE_IN + Decimal(u["completion_tokens"]) * PRICE_OUT) / 10**6


def send(e, b):
    """POSTs b; returns the request id Envoy gave it."""
    status, headers, raw = http("POST", e.url + "/v1/chat/completions", b, {"content-type": "application/json"})
    assert status == 200, raw
    return headers["x-request-id"]


def test_requests_tokens_and_spend_are_labelled_by_price_table_entry_and_other(mock3, start_envoy):
    prices = {**PRICES, "gpt-4.1": PRICES["gpt-4o-mini*"]}
    plugin = plugin_with_keys(secrets(3), prices=prices, unknown_model="zero")
    # One worker: its counters are written together on its tick.
    e = start_envoy(mock3, plugin=plugin, concurrency=1)
    sent = {"gpt-4o-mini*": [body("gpt-4o-mini", "one"), body("gpt-4o-mini-2024-07-18", "two, longer")],
            "gpt-4.1": [body("gpt-4.1", "three")],
            "other": [body("llama-unpriced-70b", "four"), body("mistral-unpriced", "five")]}
    for label, bodies in sent.items():
        for b in bodies:
            send(e, b)
    want = {}
    for label, bodies in sent.items():
        tag = f'{{model="{label}"}}'
        want["apikeyrouter_model_requests" + tag] = len(bodies)
        want["apikeyrouter_model_input_tokens" + tag] = sum(usage_for(json.loads(b))["prompt_tokens"] for b in bodies)
        want["apikeyrouter_model_output_tokens" + tag] = sum(usage_for(json.loads(b))["completion_tokens"]
                                                             for b in bodies)
        if label != "other":
            want["apikeyrouter_model_spend_micros" + tag] = sum(micros(cost(b)) for b in bodies)
    requests = {k: v for k, v in want.items() if k.startswith("apikeyrouter_model_requests")}
    wait_until(lambda: {k: prometheus(e).get(k) for k in requests} == requests, timeout=15,
               what="every request in the model metrics")
    got = prometheus(e)
    assert {k: got.get(k) for k in want} == want, [k for k in got if "model" in k]
    names = [k for k in prometheus(e) if k.startswith("apikeyrouter_model_")]
    assert not [k for k in names if "unpriced" in k or "2024" in k], names
    # Unpriced models spend nothing: no spend sample for `other`.
    assert len(names) == len(want), names


def test_the_access_log_outcome_names_the_model_its_cached_and_reasoning_tokens_and_the_estimate(
        mock3, start_envoy):
    e = start_envoy(mock3, plugin=plugin_with_keys(secrets(3), prices=PRICES), concurrency=1)
    b = body("gpt-4o-mini", "cache me", mock_cached_tokens=3, mock_reasoning_tokens=4)
    o = outcome(e, send(e, b))
    assert o["model"] == "gpt-4o-mini"
    u = usage_for(json.loads(b))
    assert (o["input_tokens"], o["output_tokens"]) == (u["prompt_tokens"], u["completion_tokens"])
    assert (o["cached_input_tokens"], o["reasoning_tokens"]) == (3, 4)
    # The admission's bound: every body byte a prompt token, max_tokens out.
    assert (o["estimated_input_tokens"], o["estimated_output_tokens"]) == (len(b), MAX_TOKENS)
    estimate = (Decimal(len(b)) * PRICE_IN + Decimal(MAX_TOKENS) * PRICE_OUT) / 10**6
    assert Decimal(o["estimate"]) == estimate
