"""Stateful APIs behind rotating keys (issue 21), through real Envoy (two
workers) against a mock that, like OpenAI, keeps objects per project and
answers 404 for another project's id: a Responses conversation stays with
the project that holds it, a batch finds its file, one client cannot reach
or list another's objects, and in fleet mode a second instance knows what
the first recorded."""

import json
import uuid
from collections import Counter

import pytest

from harness import Etcd, http, plugin_with_keys, secrets, sha256_hex, wait_until
from test_fleet import with_etcd

KEYS = secrets(4, prefix="sk-proj")
# k1, k2 belong to project A; k3, k4 to project B.
PROJECTS = {KEYS[0]: "proj_a", KEYS[1]: "proj_a", KEYS[2]: "proj_b", KEYS[3]: "proj_b"}
CLIENTS = {"alice": "vk-alice-0123456789", "bob": "vk-bob-0123456789"}


def plugin(**extra):
    cfg = plugin_with_keys(KEYS, **extra)
    for i, k in enumerate(cfg["providers"][0]["keys"]):
        k["group"] = "proj-a" if i < 2 else "proj-b"
    cfg["clients"] = [{"id": c, "key_sha256": sha256_hex(v), "allowed_endpoints": ["*"]} for c, v in CLIENTS.items()]
    return cfg


@pytest.fixture
def projects(start_mock):
    mock = start_mock(KEYS)
    mock.control("/_mock/projects", PROJECTS)
    return mock


def call(e, who, method, path, body=None, headers=None):
    h = {"authorization": f"Bearer {CLIENTS[who]}", **(headers or {})}
    status, hdrs, data = http(method, e.url + path, body, h)
    return status, hdrs, json.loads(data) if data else None


def upload(e, who, content=b'{"custom_id":"1"}\n'):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return call(e, who, "POST", "/v1/files", body, {"content-type": f"multipart/form-data; boundary={boundary}"})


def project_of(mock, oid):
    """The project the mock keeps an object in."""
    owners = [p for p, ids in mock.control("/_mock/objects").items() if oid in ids]
    assert len(owners) == 1, (oid, owners)
    return owners[0]


def metric(e, name):
    """A counter of the filter's (`apikeyrouter.objects.<name>`)."""
    full = f"wasmcustom.apikeyrouter.objects.{name}"
    return int(e.stats(full).get(full, -1))


def keys_used(mock, path_part):
    return Counter(r["key"] for r in mock.received() if path_part in r["path"])


def test_twenty_turn_conversations_across_four_keys_in_two_groups_never_see_a_404(projects, start_envoy):
    e = start_envoy(projects, plugin=plugin())
    # Two conversations in each project (rotation spreads the first turns).
    last, starts = {}, 0
    while Counter(project_of(projects, ids[0]) for ids in last.values()) != {"proj_a": 2, "proj_b": 2}:
        starts += 1
        assert starts <= 20, "rotation never reached both projects"
        status, _, r = call(e, "alice", "POST", "/v1/responses", {"model": "gpt-4o", "input": f"start {starts}"})
        assert status == 200, r
        if Counter(project_of(projects, ids[0]) for ids in last.values())[project_of(projects, r["id"])] < 2:
            last[f"c{starts}"] = [r["id"]]
    for turn in range(20):
        for conv, ids in last.items():
            body = {"model": "gpt-4o", "input": f"turn {turn}", "previous_response_id": ids[-1]}
            status, _, r = call(e, "alice", "POST", "/v1/responses", body)
            assert status == 200, (conv, turn, r)
            assert r["previous_response_id"] == ids[-1]
            ids.append(r["id"])
    # Each conversation stayed in the project of its first response, and
    # rotation went on inside it.
    for conv, ids in last.items():
        assert {project_of(projects, i) for i in ids} == {project_of(projects, ids[0])}, conv
    statuses = Counter(r["status"] for r in projects.received())
    assert statuses == {200: 80 + starts}, statuses
    used = keys_used(projects, "/v1/responses")
    assert len(used) == 4, f"all four keys served: {used}"
    wait_until(lambda: metric(e, "affinity_hits") == 80, what="80 affinity hits counted")
    assert (metric(e, "recorded"), metric(e, "affinity_misses")) == (80 + starts, 0)
    # The admin API shows the groups and the records (no content).
    status, _, body = e.admin_api("GET", "keys")
    assert [k["group"] for k in json.loads(body)["keys"]] == ["proj-a", "proj-a", "proj-b", "proj-b"]
    status, _, body = e.admin_api("GET", "objects?client=alice&kind=response&limit=500")
    listed = json.loads(body)
    assert status == 200 and listed["total"] == 80 + starts, listed
    one = listed["objects"][0]
    assert set(one) == {"id", "kind", "provider", "group", "owner", "created_ms", "expires_ms", "from_fleet"}
    assert one["owner"] == "alice" and one["group"] in ("proj-a", "proj-b")
    assert json.loads(e.admin_api("GET", "objects?client=bob")[2])["total"] == 0


def test_a_batch_finds_its_file_and_bob_neither_reaches_nor_lists_alices_files(projects, start_envoy):
    e = start_envoy(projects, plugin=plugin())
    files = {}
    for who in ("alice", "alice", "bob", "alice"):
        status, _, f = upload(e, who)
        assert status == 200, f
        files.setdefault(who, []).append(f["id"])
    for fid in files["alice"]:
        status, _, b = call(e, "alice", "POST", "/v1/batches",
                            {"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        assert status == 200, b
        assert project_of(projects, b["id"]) == project_of(projects, fid)
        status, _, got = call(e, "alice", "GET", f"/v1/batches/{b['id']}")
        assert status == 200 and got["input_file_id"] == fid
    sent_before = len(projects.received())
    # Bob cannot read, delete or batch Alice's file, by path (under any API
    # root, or as a list's page marker) or by body.
    a_file = files["alice"][0]
    for method, path, body in [("GET", f"/v1/files/{a_file}", None), ("DELETE", f"/v1/files/{a_file}", None),
                               ("POST", "/v1/batches", {"input_file_id": a_file, "endpoint": "/v1/chat/completions",
                                                        "completion_window": "24h"}),
                               ("GET", f"/openai/files/{a_file}?api-version=2024-10-21", None),
                               ("GET", f"/v1/files?limit=1&after={a_file}", None)]:
        status, _, err = call(e, "bob", method, path, body)
        assert status == 404 and err["error"]["code"] == "object_not_found", (method, path, err)
    # Nor hide the reference in a body nested too deeply for the gateway.
    deep = ('{"input_file_id":"%s","endpoint":"/v1/chat/completions","completion_window":"24h","x":%s1%s}'
            % (a_file, "[" * 200, "]" * 200))
    status, _, err = call(e, "bob", "POST", "/v1/batches", deep)
    assert status == 400, err
    assert len(projects.received()) == sent_before, "none of bob's tries reached the provider"
    # Lists: each sees only its own, whichever project the list came from.
    for who in ("alice", "bob"):
        seen = set()
        for _ in range(8):
            status, _, page = call(e, who, "GET", "/v1/files")
            assert status == 200, page
            ids = {f["id"] for f in page["data"]}
            assert ids <= set(files[who]), (who, ids)
            seen |= ids
        assert seen == set(files[who]), (who, seen)
    wait_until(lambda: metric(e, "refused") == 5, what="five refusals counted")


def test_a_group_without_a_usable_key_gets_429_with_retry_after_not_another_projects_404(projects, start_envoy):
    e = start_envoy(projects, plugin=plugin())
    status, _, f = upload(e, "alice")
    assert status == 200
    home = [k for k, p in PROJECTS.items() if p == project_of(projects, f["id"])]
    for k in home:
        projects.behavior(k, status=429, headers={"retry-after": "20"}, times=None)
    status, headers, err = call(e, "alice", "GET", f"/v1/files/{f['id']}")
    assert status == 429 and int(headers["retry-after"]) >= 1, (status, err)
    # Both keys of the project cool down: the gateway answers at once.
    status, headers, err = call(e, "alice", "GET", f"/v1/files/{f['id']}")
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 20, (status, err)
    assert err["error"]["code"] == "no_available_key", err
    others = [k for k in KEYS if k not in home]
    assert not any(r["key"] in others for r in projects.received() if f["id"] in r["path"]), \
        "no key of the other project was tried"


@pytest.fixture
def etcd():
    with Etcd() as server:
        yield server


def test_in_fleet_mode_a_second_instance_knows_the_objects_the_first_recorded(projects, start_envoy, etcd):
    fleet = {"etcd_cluster": "etcd", "prefix": "/akr-objects", "sync_interval_ms": 200, "timeout_ms": 300}
    gw1 = start_envoy(projects, plugin=plugin(fleet=fleet), edit=with_etcd(etcd, "gw-1"))
    gw2 = start_envoy(projects, plugin=plugin(fleet=fleet), edit=with_etcd(etcd, "gw-2"))
    status, _, f = upload(gw1, "alice")
    assert status == 200, f
    status, _, r = call(gw1, "alice", "POST", "/v1/responses", {"model": "gpt-4o", "input": "hi"})
    assert status == 200, r

    def known_on_gw2():
        listed = json.loads(gw2.admin_api("GET", "objects?client=alice")[2])["objects"]
        return {o["id"] for o in listed if o["from_fleet"]} == {f["id"], r["id"]}

    wait_until(known_on_gw2, timeout=15, what="gw-2 learns gw-1's objects through etcd")
    status, _, err = call(gw2, "bob", "GET", f"/v1/files/{f['id']}")
    assert status == 404 and err["error"]["code"] == "object_not_found"
    prev = r["id"]
    for turn in range(6):
        status, _, r2 = call(gw2, "alice", "POST", "/v1/responses",
                             {"model": "gpt-4o", "input": f"turn {turn}", "previous_response_id": prev})
        assert status == 200, r2
        prev = r2["id"]
    status, _, b = call(gw2, "alice", "POST", "/v1/batches",
                        {"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert status == 200, b
    assert project_of(projects, b["id"]) == project_of(projects, f["id"])
