"""Request limits: JSON depth, body size, query size, ``_count``, patch ops, Bundle entries.

Each limit answers a 4xx OperationOutcome with a stable detail code and stores nothing.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from django.test import Client

from fhirservice.errors import DETAIL_SYSTEM
from fhirservice.rest.limits import (
    MSG_ARRAY_ADDS,
    MSG_ARRAY_TOO_LONG,
    MSG_JSON_TOO_DEEP,
    MSG_LENGTH_REQUIRED,
    MSG_PARAM_TOO_LONG,
    MSG_RESOURCE_TOO_LARGE,
    MSG_SERVER_OWNED_PATH,
    MSG_TOO_MANY_ENTRIES,
    MSG_TOO_MANY_PARAMS,
    MSG_TOO_MANY_PATCH_OPS,
    json_depth_exceeds,
)
from tests.hardening.stores import store_state
from tests.support import BASE, FhirResponse, patient


def assert_outcome(response: FhirResponse, status: int, detail: str, text: str | None = None):
    """An error OperationOutcome with this status and detail code (and diagnostics)."""
    assert response.status == status, response
    assert response.body["resourceType"] == "OperationOutcome", response
    issue = response.body["issue"][0]
    assert issue["details"]["coding"] == [{"system": DETAIL_SYSTEM, "code": detail}], response
    if text is not None:
        assert issue["diagnostics"] == text


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    """``depth`` levels of objects and arrays around ``leaf``."""
    opening = b'{"a":[' * (depth // 2) + (b"[" if depth % 2 else b"")
    closing = (b"]" if depth % 2 else b"") + b"]}" * (depth // 2)
    return opening + leaf + closing


# --- JSON depth, measured on the raw bytes -------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 50, 99, 100, 101, 200, 1023, 1025, 5000])
def test_depth_measure_agrees_with_the_parser(depth):
    data = nested(depth)
    assert json_depth_exceeds(data, 100) is (depth > 100)


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b'{"a": "[[[[[[", "b": [[1]]}', 3),
        (b'{"a": "]]]]]]}}}", "b": [[[[1]]]]}', 5),
        (b'{"a": "\\"[[[[", "b": [[1]]}', 3),
        (b'{"a": "\\\\", "b": [[[1]]]}', 4),
        (b'{"a": "\\\\\\"[[[", "b": {"c": {}}}', 3),
        (b'["", "", "[", "]", [[]]]', 3),
        (b'[{"": [{"":[]}]}]', 5),
        (b"[]", 1),
        (b"7", 0),
    ],
)
def test_depth_ignores_brackets_in_strings(text, depth):
    orjson.loads(text)
    assert json_depth_exceeds(text, depth) is False
    assert json_depth_exceeds(text, depth - 1) is (depth > 0)


def _deep_bodies(pid: str, gid: str, depth: int) -> list[tuple[str, str, bytes, str]]:
    inner = nested(depth)
    fhir, patch = "application/fhir+json", "application/json-patch+json"
    return [
        ("POST", "/Patient", b'{"resourceType":"Patient","extension":' + inner + b"}", fhir),
        (
            "PUT",
            f"/Patient/{pid}",
            b'{"resourceType":"Patient","id":"' + pid.encode() + b'","x":' + inner + b"}",
            fhir,
        ),
        ("PATCH", f"/Patient/{pid}", b'[{"op":"add","path":"/x","value":' + inner + b"}]", patch),
        (
            "PATCH",
            f"/Group/{gid}",
            b'[{"op":"add","path":"/member/-","value":' + inner + b"}]",
            patch,
        ),
        (
            "POST",
            "",
            b'{"resourceType":"Bundle","type":"transaction","entry":[{"resource":'
            b'{"resourceType":"Patient","x":' + inner + b'},"request":{"method":"POST",'
            b'"url":"Patient"}}]}',
            fhir,
        ),
        (
            "POST",
            f"/Group/{gid}/$add-member",
            b'{"resourceType":"Parameters","parameter":[{"name":"patient","resource":'
            b'{"resourceType":"Patient","x":' + inner + b"}}]}",
            fhir,
        ),
    ]


@pytest.mark.parametrize("depth", [101, 950, 1000, 1_000_000])
def test_deep_bodies_are_400_everywhere(api, depth):
    pid = api.post("/Patient", patient()).body["id"]
    gid = api.post("/Group", {"resourceType": "Group", "type": "person", "actual": True}).body["id"]
    before = store_state(gid)
    for method, path, body, content_type in _deep_bodies(pid, gid, depth):
        response = api.request(method, path, raw=body, content_type=content_type)
        assert_outcome(response, 400, "MSG_JSON_TOO_DEEP", MSG_JSON_TOO_DEEP.format(limit=100))
    assert store_state(gid) == before


def test_depth_limit_is_a_setting(api, limits):
    body = b'{"resourceType":"Patient","name":[{"family":"F","given":["G"]}]}'
    limits(MAX_JSON_DEPTH=3)
    assert_outcome(
        api.request("POST", "/Patient", raw=body),
        400,
        "MSG_JSON_TOO_DEEP",
        MSG_JSON_TOO_DEEP.format(limit=3),
    )
    limits(MAX_JSON_DEPTH=4)
    assert api.request("POST", "/Patient", raw=body).status == 201


# --- body size -----------------------------------------------------------------------------


def test_body_limit_holds_for_every_body_route(api, limits):
    gid = api.post("/Group", {"resourceType": "Group", "type": "person", "actual": True}).body["id"]
    pid = api.post("/Patient", patient()).body["id"]
    before = store_state(gid)
    limits(MAX_BODY_BYTES=200)
    big = patient(family="x" * 300)
    cases = [
        ("POST", "/Patient", big),
        ("PUT", f"/Patient/{pid}", {**big, "id": pid}),
        ("POST", "", {"resourceType": "Bundle", "type": "transaction", "entry": [big]}),
        ("POST", f"/Group/{gid}/$add-member", {"resourceType": "Parameters", "x": "y" * 300}),
        ("POST", "/Group/$create-roster", {"resourceType": "Parameters", "x": "y" * 300}),
    ]
    for method, path, body in cases:
        assert_outcome(api.request(method, path, body), 413, "MSG_BODY_TOO_LARGE")
    ops = [{"op": "add", "path": "/name/0/family", "value": "y" * 300}]
    assert_outcome(api.patch(f"/Patient/{pid}", ops), 413, "MSG_BODY_TOO_LARGE")
    assert store_state(gid) == before


def test_chunked_body_without_length_is_411(api):
    client = Client()
    before = store_state()
    response = FhirResponse(
        client.generic(
            "POST",
            f"{BASE}/Patient",
            data=orjson.dumps(patient()),
            content_type="application/fhir+json",
            headers={"Transfer-Encoding": "chunked"},
            CONTENT_LENGTH="",
        )
    )
    assert_outcome(response, 411, "MSG_LENGTH_REQUIRED", MSG_LENGTH_REQUIRED)
    assert store_state() == before


def test_body_without_length_reads_as_empty(api):
    response = FhirResponse(
        Client().generic(
            "POST",
            f"{BASE}/Patient",
            data=orjson.dumps(patient()),
            content_type="application/fhir+json",
            CONTENT_LENGTH="",
        )
    )
    assert_outcome(response, 400, "MSG_JSON_PARSE")


# --- query strings -------------------------------------------------------------------------


def test_too_many_query_parameters(api, limits):
    query = "&".join(f"name=a{i}" for i in range(101))
    for path in ("/Patient", "/metadata", "/_history", "/Patient/x/$members"):
        assert_outcome(
            api.get(f"{path}?{query}"),
            400,
            "MSG_TOO_MANY_PARAMS",
            MSG_TOO_MANY_PARAMS.format(count=101, limit=100),
        )
    assert api.get("/Patient?" + "&".join(f"name=a{i}" for i in range(100))).status == 200
    limits(MAX_QUERY_PARAMS=2)
    assert_outcome(api.get("/Patient?a=1&b=2&c=3"), 400, "MSG_TOO_MANY_PARAMS")


def test_django_field_limit_is_never_reached(api, limits):
    limits(MAX_QUERY_PARAMS=5000)
    query = "&".join(f"a{i}=1" for i in range(1500))
    assert_outcome(api.get(f"/Patient?{query}"), 400, "MSG_TOO_MANY_PARAMS")


def test_query_value_length(api, limits):
    assert api.get("/Patient?name=" + "a" * 4096).status == 200
    assert_outcome(
        api.get("/Patient?name=" + "a" * 4097),
        400,
        "MSG_PARAM_TOO_LONG",
        MSG_PARAM_TOO_LONG.format(name="name", length=4097, limit=4096),
    )
    # Percent-encoding does not count: 2000 encoded characters are 2000 characters.
    assert api.get("/Patient?name=" + "%C3%A4" * 2000).status == 200
    limits(MAX_QUERY_VALUE_LENGTH=10)
    assert_outcome(api.get("/Group?name=" + "b" * 11), 400, "MSG_PARAM_TOO_LONG")


# --- _count --------------------------------------------------------------------------------


def _count_routes(api: Any) -> list[str]:
    pid = api.post("/Patient", patient()).body["id"]
    for _ in range(3):
        api.post("/Patient", patient())
    for family in ("A", "B", "C"):
        api.put(f"/Patient/{pid}", {**patient(family=family), "id": pid})
    return ["/Patient", "/_history", "/Patient/_history", f"/Patient/{pid}/_history"]


@pytest.mark.parametrize("raw", ["-1", "abc", "1e3", "", "1.5", "0x10", "--1"])
def test_bad_count_is_400_on_every_route(api, raw):
    gid = api.post("/Group", {"resourceType": "Group", "type": "person", "actual": True}).body["id"]
    for path in [*_count_routes(api), f"/Group/{gid}/$members"]:
        response = api.get(f"{path}?_count={raw}")
        assert_outcome(response, 400, "MSG_PARAM_INVALID")


@pytest.mark.parametrize("raw", ["3", "1000", "99999999999999999999999999"])
def test_count_is_capped_at_max_count(api, limits, raw):
    routes = _count_routes(api)
    limits(MAX_COUNT=2)
    for path in routes:
        response = api.get(f"{path}?_count={raw}")
        assert response.status == 200, response
        assert len(response.body.get("entry", [])) == 2, (path, response)


def test_members_page_is_capped(api):
    refs = [f"Patient/m{i}" for i in range(3)]
    gid = api.post(
        "/Group",
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": r}} for r in refs],
        },
    ).body["id"]
    for raw, served in (("1", 1), ("99999999999999999999999", 3), ("0", 0)):
        response = api.get(f"/Group/{gid}/$members?_count={raw}")
        assert response.status == 200, response
        members = [p for p in response.body["parameter"] if p["name"] == "member"]
        assert len(members) == served


# --- JSON Patch ops and Bundle entries -----------------------------------------------------


def test_patch_op_limit_holds_for_every_type(api, limits):
    pid = api.post("/Patient", patient()).body["id"]
    gid = api.post("/Group", {"resourceType": "Group", "type": "person", "actual": True}).body["id"]
    before = store_state(gid)
    limits(MAX_PATCH_OPS=3)
    ops = [{"op": "add", "path": "/active", "value": True}] * 4
    assert_outcome(
        api.patch(f"/Patient/{pid}", ops),
        400,
        "MSG_TOO_MANY_OPERATIONS",
        MSG_TOO_MANY_PATCH_OPS.format(count=4, limit=3),
    )
    members = [{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "P/1"}}}] * 4
    assert_outcome(api.patch(f"/Group/{gid}", members), 400, "MSG_TOO_MANY_OPERATIONS")
    assert store_state(gid) == before
    assert api.patch(f"/Patient/{pid}", ops[:3]).status == 200


SERVER_OWNED = ["/meta/versionId", "/meta/lastUpdated", "/meta/versionId/x"]


@pytest.mark.parametrize("path", SERVER_OWNED)
@pytest.mark.parametrize("op", ["add", "replace", "remove", "move", "copy"])
def test_server_owned_meta_cannot_be_patched(api, op, path):
    pid = api.post("/Patient", patient()).body["id"]
    before = store_state()
    operation: dict[str, Any] = {"op": op, "path": path, "value": "7"}
    if op in ("move", "copy"):
        operation = {"op": op, "from": "/id", "path": path}
    assert_outcome(
        api.patch(f"/Patient/{pid}", [operation]),
        422,
        "MSG_PATCH_FAILED",
        MSG_SERVER_OWNED_PATH.format(index=0, op=op, path=path),
    )
    assert store_state() == before


def test_test_op_on_version_id_is_a_precondition(api):
    pid = api.post("/Patient", patient()).body["id"]
    ops = [
        {"op": "test", "path": "/meta/versionId", "value": "1"},
        {"op": "add", "path": "/active", "value": True},
    ]
    assert api.patch(f"/Patient/{pid}", ops).status == 200
    assert api.patch(f"/Patient/{pid}", ops).status == 422


HOSTILE_PATHS = [
    "/id",
    "/resourceType",
    "/~2",
    "/~",
    "/name/~01",
    "/member/999999999999",
    "/member/-1",
    "/member/-/entity",
    "/name/-/family",
    "/name/999999999999999999999",
    "/-",
    "",
    "/",
    "no-slash",
    "/name/0/family/-",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
@pytest.mark.parametrize("resource", ["Patient", "Group"])
def test_hostile_patch_paths_are_4xx_and_store_nothing(api, resource, path):
    body = (
        patient()
        if resource == "Patient"
        else {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": "Patient/m1"}}],
        }
    )
    rid = api.post(f"/{resource}", body).body["id"]
    before = store_state(rid if resource == "Group" else None)
    for op in (
        {"op": "add", "path": path, "value": {"x": 1}},
        {"op": "replace", "path": path, "value": "x"},
        {"op": "remove", "path": path},
        {"op": "move", "from": path, "path": "/x"},
        {"op": "copy", "from": "/meta", "path": path},
    ):
        response = api.patch(f"/{resource}/{rid}", [op])
        assert 400 <= response.status < 500, (op, response)
        assert response.body["resourceType"] == "OperationOutcome"
    assert store_state(rid if resource == "Group" else None) == before


def test_bundle_entry_limit(api, limits):
    limits(MAX_BUNDLE_ENTRIES=2)
    entry = {"resource": patient(), "request": {"method": "POST", "url": "Patient"}}
    before = store_state()
    for kind in ("transaction", "batch"):
        bundle = {"resourceType": "Bundle", "type": kind, "entry": [entry] * 3}
        assert_outcome(
            api.post("", bundle),
            400,
            "MSG_TOO_MANY_ENTRIES",
            MSG_TOO_MANY_ENTRIES.format(count=3, limit=2),
        )
    assert store_state() == before
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry] * 2}
    assert api.post("", bundle).status == 200


# --- control characters --------------------------------------------------------------------


@pytest.mark.parametrize("escape", [b"\\u0000", b"\\u001F", b"\\u000b", b"\\b", b"\\f"])
def test_control_characters_in_bodies_are_400(api, escape):
    before = store_state()
    body = b'{"resourceType":"Patient","name":[{"family":"a' + escape + b'b"}]}'
    assert_outcome(api.request("POST", "/Patient", raw=body), 400, "MSG_CONTROL_CHARACTER")
    assert store_state() == before


def test_allowed_whitespace_and_escaped_backslashes_pass(api):
    body = b'{"resourceType":"Patient","name":[{"family":"a\\t\\n\\r\\u0009\\\\u0000\\\\b"}]}'
    assert api.request("POST", "/Patient", raw=body).status == 201


@pytest.mark.parametrize("query", ["name=a%00b", "_count=%00", "name=%1F", "a%00=1"])
def test_control_characters_in_queries_are_400(api, query):
    assert_outcome(api.get(f"/Patient?{query}"), 400, "MSG_CONTROL_CHARACTER")


# --- per-resource size and per-array items (issue 16, D5) -----------------------------------


def identifiers(n: int) -> list[dict[str, str]]:
    return [{"system": "urn:oid:1.2.36.146.595", "value": str(i)} for i in range(n)]


def test_a_million_identifiers_are_refused_fast(api):
    """The Patient of issue 16 (~40 MB): accepted after 105 s with 10^6 search rows before;
    now refused on its Content-Length, before the body is read (defaults)."""
    before = store_state()
    body = orjson.dumps({**patient(), "identifier": identifiers(1_000_000)})
    response = api.request("POST", "/Patient", raw=body)
    assert_outcome(
        response,
        413,
        "MSG_RESOURCE_TOO_LARGE",
        MSG_RESOURCE_TOO_LARGE.format(what="Patient", size=len(body), limit=32 * 1024 * 1024),
    )
    assert store_state() == before


def test_resource_size_limit_holds_per_resource(api, limits):
    pid = api.post("/Patient", patient()).body["id"]
    before = store_state()
    limits(MAX_RESOURCE_BYTES=300)
    big = patient(family="x" * 300)
    assert_outcome(api.post("/Patient", big), 413, "MSG_RESOURCE_TOO_LARGE")
    assert_outcome(api.put(f"/Patient/{pid}", {**big, "id": pid}), 413, "MSG_RESOURCE_TOO_LARGE")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": big, "request": {"method": "POST", "url": "Patient"}}],
    }
    response = api.post("", bundle)
    assert_outcome(response, 413, "MSG_RESOURCE_TOO_LARGE")
    assert "Patient of Bundle.entry[0]" in response.body["issue"][0]["diagnostics"]
    assert store_state() == before
    # A Group's roster is exempt: its members are member events, not search rows.
    refs = [{"entity": {"reference": f"Patient/{i:04d}"}} for i in range(20)]
    group = {"resourceType": "Group", "type": "person", "actual": True, "member": refs}
    assert api.post("/Group", group).status == 201


def test_array_item_limit_holds_in_bodies_bundles_and_patches(api, limits):
    pid = api.post("/Patient", patient()).body["id"]
    gid = api.post("/Group", {"resourceType": "Group", "type": "person", "actual": True}).body["id"]
    before = store_state(gid)
    limits(MAX_ARRAY_ITEMS=3)
    many = {**patient(), "identifier": identifiers(4)}
    assert_outcome(
        api.post("/Patient", many),
        400,
        "MSG_ARRAY_TOO_LONG",
        MSG_ARRAY_TOO_LONG.format(path="Patient.identifier", count=4, limit=3),
    )
    nested = {**patient(), "name": [{"given": ["a", "b", "c", "d"]}]}
    assert_outcome(api.post("/Patient", nested), 400, "MSG_ARRAY_TOO_LONG")
    entry = {"resource": many, "request": {"method": "POST", "url": "Patient"}}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}
    assert_outcome(api.post("", bundle), 400, "MSG_ARRAY_TOO_LONG")
    whole = [{"op": "add", "path": "/identifier", "value": identifiers(4)}]
    assert_outcome(api.patch(f"/Patient/{pid}", whole), 400, "MSG_ARRAY_TOO_LONG")
    one_by_one = [{"op": "add", "path": "/identifier/-", "value": i} for i in identifiers(4)]
    assert_outcome(
        api.patch(f"/Patient/{pid}", one_by_one),
        400,
        "MSG_ARRAY_TOO_LONG",
        MSG_ARRAY_ADDS.format(count=4, path="/identifier", limit=3),
    )
    assert store_state(gid) == before
    # Group.member is the roster: exempt in a body, a Bundle and a patch.
    refs = [{"entity": {"reference": f"Patient/{i:04d}"}} for i in range(5)]
    group = {"resourceType": "Group", "type": "person", "actual": True, "member": refs}
    assert api.post("/Group", group).status == 201
    entry = {"resource": group, "request": {"method": "POST", "url": "Group"}}
    assert (
        api.post("", {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}).status
        == 200
    )
    adds = [{"op": "add", "path": "/member/-", "value": ref} for ref in refs]
    assert api.patch(f"/Group/{gid}", adds).status == 200
    assert api.post("/Patient", {**patient(), "identifier": identifiers(3)}).status == 201
