"""Property-based fuzzing of every write route with hostile input (hypothesis).

Create, update, patch (Patient and Group), a transaction Bundle and the Group $operations
receive malformed JSON, deep nesting, huge strings, bad references, wrong FHIR types, wrong
content types and hostile JSON Patch paths. Every generated request carries at least one
defect that makes it invalid (a JSON Patch ends in a failing ``test`` op, a transaction holds
a broken entry beside a valid one), so the answer must always be a 4xx OperationOutcome
(``FhirClient`` parses it strictly), never a 5xx, and both stores must be unchanged: rows and
versions of the metadata store, the Group's outbox rows and its events in ClickHouse.

Runs are derandomized (same examples every run) with modest budgets; writes really commit
(``live_api``) so that a leak into ClickHouse after commit would be seen.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening.stores import store_state
from tests.support import PATCH_JSON, FhirClient, patient

FHIR_JSON = "application/fhir+json"
FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- building blocks -----------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
huge_strings = st.sampled_from([50_000, 400_000, 1_500_000]).map(lambda n: "\u00e4x[" * (n // 3))


def nested(depth: int) -> Any:
    value: Any = 1
    for level in range(depth):
        value = [value] if level % 2 else {"a": value}
    return value


# orjson encodes at most 255 levels; deeper bodies are built as bytes (malformed_json,
# test_limits).
deep_values = st.integers(min_value=101, max_value=240).map(nested)
hostile_values = st.one_of(json_values, huge_strings, deep_values)
bad_references = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "Patient/",
            "/Patient/1",
            "Patient/../../admin",
            "Patient/1/_history/x",
            "http://evil.example/Patient/1",
            "#",
            "urn:uuid:not-a-uuid",
            "Patient/\u0000",
            "Patient/" + "9" * 300,
            "Group/$transfer-member",
        ]
    ),
    st.text(max_size=40),
    huge_strings,
    st.integers(),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
wrong_content_types = st.sampled_from(
    [
        "text/plain",
        "application/xml",
        "application/fhir+xml",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "text/html",
        "application/octet-stream",
    ]
)
unknown_keys = st.text(min_size=1, max_size=20).filter(
    lambda k: k not in PATIENT_ELEMENTS and not k.startswith("_")
)
PATIENT_ELEMENTS = {
    "resourceType", "id", "meta", "implicitRules", "language", "text", "contained", "extension",
    "modifierExtension", "identifier", "active", "name", "telecom", "gender", "birthDate",
    "deceasedBoolean", "deceasedDateTime", "address", "maritalStatus", "multipleBirthBoolean",
    "multipleBirthInteger", "photo", "contact", "communication", "generalPractitioner",
    "managingOrganization", "link",
}  # fmt: skip


def malformed_json() -> st.SearchStrategy[bytes]:
    def invalid(data: bytes) -> bool:
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        return False

    truncated = st.integers(min_value=1, max_value=60).map(
        lambda n: orjson.dumps(patient(family="T" * 40))[:n]
    )
    return st.one_of(
        st.binary(max_size=60).filter(invalid),
        truncated,
        st.sampled_from([b"", b" ", b"{'a': 1}", b"\xff\xfe{}", b"[1,]", b'{"a":1}}', b"NaN"]),
        st.sampled_from(
            [
                b'{"resourceType":"Patient","multipleBirthInteger":1e400}',
                b'{"resourceType":"Patient","multipleBirthInteger":123456789012345678901234567890}',
                b'{"resourceType":"Patient","name":[{"family":"\\ud800"}]}',
                b'{"resourceType":"Patient","name":[{"family":"a\\u0000b"}]}',
                b'{"resourceType":"Patient","name":[{"family":"a\\u001Fb"}]}',
                b'{"resourceType":"Patient","name":[{"family":"a\\bb"}]}',
            ]
        ),
        st.integers(min_value=1025, max_value=200_000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n),
    )


@st.composite
def bad_resources(draw: Any, resource_type: str = "Patient") -> dict[str, Any] | Any:
    """A decoded body that is not a valid resource of ``resource_type``."""
    kind = draw(st.sampled_from(["shape", "type", "unknown", "wrong-types", "deep", "reference"]))
    if kind == "shape":
        return draw(json_values.filter(lambda v: not isinstance(v, dict)))
    if kind == "type":
        rtype = draw(
            st.one_of(st.sampled_from([None, 1, [], "", "Patien", "Bundle"]), huge_strings)
        )
        body = {"resourceType": rtype, "name": [{"family": "X"}]}
        return {k: v for k, v in body.items() if v is not None}
    body = {"resourceType": resource_type}
    if kind == "unknown":
        body[draw(unknown_keys)] = draw(hostile_values)
    elif kind == "wrong-types":
        field, value = draw(
            st.sampled_from(
                [
                    ("active", "yes"),
                    ("birthDate", 19700101),
                    ("name", "Peter"),
                    ("gender", 5),
                    ("identifier", {"system": 1}),
                    ("telecom", [{"system": "phone", "value": 5}]),
                    ("deceasedBoolean", "no"),
                    ("birthDate", "1970-13-45"),
                ]
            )
        )
        body[field] = value
        if draw(st.booleans()):
            body["name"] = [{"family": draw(huge_strings)}]
    elif kind == "deep":
        body["extension"] = [{"url": "urn:x", "valueString": "x", "extension": draw(deep_values)}]
    else:
        body["managingOrganization"] = {"reference": draw(bad_references)}
        body["generalPractitioner"] = "not-a-list-of-references"
    return body


@st.composite
def bad_resource_requests(draw: Any) -> tuple[bytes, str]:
    """(body bytes, content type) of a request that must not create or update a Patient."""
    kind = draw(st.sampled_from(["malformed", "resource", "content-type"]))
    if kind == "malformed":
        return draw(malformed_json()), FHIR_JSON
    if kind == "content-type":
        return orjson.dumps(patient()), draw(wrong_content_types)
    return orjson.dumps(draw(bad_resources())), FHIR_JSON


HOSTILE_PATHS = [
    "/id", "/resourceType", "/meta/versionId", "/meta/lastUpdated", "/~2", "/~", "/a~1b~0c",
    "/member/999999999999", "/member/-1", "/member/-/entity", "/member/-", "/member/0/entity",
    "/name/-/family", "/name/99999999999999999999", "/-", "", "/", "no-slash", "/name/0/family/-",
    "/quantity", "/text/div", "/extension/0/extension",
]  # fmt: skip


@st.composite
def hostile_ops(draw: Any) -> dict[str, Any]:
    op = draw(st.sampled_from(["add", "replace", "remove", "move", "copy", "test", "bogus", 7]))
    path = draw(st.one_of(st.sampled_from(HOSTILE_PATHS), st.text(max_size=20)))
    result: dict[str, Any] = {"op": op, "path": path}
    if op in ("move", "copy"):
        result["from"] = draw(st.one_of(st.sampled_from(HOSTILE_PATHS), st.integers()))
    if draw(st.booleans()):
        result["value"] = draw(
            st.one_of(
                hostile_values,
                bad_references.map(lambda r: {"entity": {"reference": r}}),
                st.just({"entity": {"reference": "Patient/x"}, "bogus": 1}),
            )
        )
    return result


FAILING_TEST = {"op": "test", "path": "/id", "value": "certainly-not-this-id"}


@st.composite
def bad_patch_requests(draw: Any) -> tuple[bytes, str]:
    """(body, content type) of a PATCH that must fail."""
    kind = draw(st.sampled_from(["ops", "ops", "ops", "malformed", "shape", "content-type"]))
    if kind == "malformed":
        return draw(malformed_json()), PATCH_JSON
    if kind == "shape":
        value = draw(
            st.one_of(
                json_values.filter(lambda v: not isinstance(v, list)),
                st.lists(json_scalars, min_size=1, max_size=3),
            )
        )
        return orjson.dumps(value), PATCH_JSON
    ops = draw(st.lists(hostile_ops(), max_size=5))
    if kind == "content-type":
        return orjson.dumps(ops), draw(
            st.sampled_from([FHIR_JSON, "application/json", "text/plain"])
        )
    ops.insert(draw(st.integers(min_value=0, max_value=len(ops))), FAILING_TEST)
    return orjson.dumps(ops), PATCH_JSON


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def world(live_api: FhirClient) -> dict[str, Any]:
    """A Patient, a Group with two members and a second Group, all committed and shipped."""
    identifier = {"system": "urn:test:fuzz", "value": f"id-{uuid.uuid4()}"}
    pid = live_api.post("/Patient", patient(identifier=[identifier])).body["id"]
    group = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "member": [
            {"entity": {"reference": f"Patient/{pid}"}},
            {"entity": {"reference": "Patient/m2"}},
        ],
    }
    gid = live_api.post("/Group", group).body["id"]
    other = live_api.post("/Group", {**group, "member": []}).body["id"]
    return {"api": live_api, "pid": pid, "gid": gid, "other": other, "identifier": identifier}


def assert_refused(world: dict[str, Any], method: str, path: str, body: bytes, ct: str) -> None:
    """The request answers a 4xx OperationOutcome and leaves both stores as they were.

    The client asks for JSON: a request naming no format is answered in its body's format
    (an XML Content-Type gets XML), and this checks refusals, not negotiation."""
    before = store_state(world["gid"])
    headers = {"Accept": "application/fhir+json"}
    response = world["api"].request(method, path, raw=body, content_type=ct, headers=headers)
    assert 400 <= response.status < 500, (method, path, body[:300], response)
    assert response.body["resourceType"] == "OperationOutcome", response
    assert store_state(world["gid"]) == before, (method, path, body[:300])


# --- create, update, patch -----------------------------------------------------------------


@FUZZ
@given(request=bad_resource_requests())
def test_create(world, request):
    assert_refused(world, "POST", "/Patient", *request)


@FUZZ
@given(request=bad_resource_requests(), group=st.booleans())
def test_update(world, request, group):
    body, ct = request
    path = f"/Patient/{world['pid']}"
    if group:
        path = f"/Group/{world['gid']}"
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        decoded = None
    if isinstance(decoded, dict) and ct == FHIR_JSON:
        decoded["id"] = path.rsplit("/", 1)[1]
        if group and decoded.get("resourceType") == "Patient":
            decoded["resourceType"] = "Group"
        body = orjson.dumps(decoded)
    assert_refused(world, "PUT", path, body, ct)


@FUZZ
@given(request=bad_patch_requests(), group=st.booleans())
def test_patch(world, request, group):
    path = f"/Group/{world['gid']}" if group else f"/Patient/{world['pid']}"
    assert_refused(world, "PATCH", path, *request)


# --- transaction ---------------------------------------------------------------------------


@st.composite
def broken_entries(draw: Any, pid: str) -> dict[str, Any]:
    kind = draw(st.sampled_from(["post", "put", "patch", "binary-patch", "request", "shape"]))
    if kind == "post":
        resource = draw(bad_resources())
        return {"resource": resource, "request": {"method": "POST", "url": "Patient"}}
    if kind == "put":
        resource = draw(bad_resources())
        if isinstance(resource, dict):
            resource["id"] = pid
        return {"resource": resource, "request": {"method": "PUT", "url": f"Patient/{pid}"}}
    if kind == "patch":
        ops = [*draw(st.lists(hostile_ops(), max_size=3)), FAILING_TEST]
        return {"resource": ops, "request": {"method": "PATCH", "url": f"Patient/{pid}"}}
    if kind == "binary-patch":
        data = draw(
            st.one_of(
                st.just(base64.b64encode(orjson.dumps([FAILING_TEST])).decode()),
                st.text(max_size=20),
                st.integers(),
                st.none(),
                malformed_json().map(lambda b: base64.b64encode(b).decode()),
            )
        )
        binary: dict[str, Any] = {"resourceType": "Binary", "contentType": PATCH_JSON}
        if data is not None:
            binary["data"] = data
        return {"resource": binary, "request": {"method": "PATCH", "url": f"Patient/{pid}"}}
    if kind == "request":
        return {
            "resource": patient(),
            "request": draw(
                st.one_of(
                    st.fixed_dictionaries(
                        {
                            "method": st.sampled_from(["POST", "PUT", "BREW", "", 5]),
                            "url": st.one_of(bad_references, st.sampled_from(["Nope", "../admin"])),
                        }
                    ).filter(lambda r: not (r["method"] == "POST" and r["url"] == "Patient")),
                    json_values,
                )
            ),
        }
    return draw(json_values.filter(lambda v: not isinstance(v, dict)))


@FUZZ
@given(data=st.data())
def test_transaction(world, data):
    good = {
        "fullUrl": "urn:uuid:" + str(uuid.uuid4()),
        "resource": patient(),
        "request": {"method": "POST", "url": "Patient"},
    }
    entries = [good, *data.draw(st.lists(broken_entries(world["pid"]), min_size=1, max_size=3))]
    entries = data.draw(st.permutations(entries))
    bundle: Any = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    ct = FHIR_JSON
    if data.draw(st.integers(min_value=0, max_value=9)) == 0:
        ct = data.draw(wrong_content_types)
    assert_refused(world, "POST", "", orjson.dumps(bundle), ct)


# --- $operations ---------------------------------------------------------------------------


def nobody() -> dict[str, str]:
    return {"system": "urn:test:fuzz", "value": f"nobody-{uuid.uuid4()}"}


@st.composite
def bad_parameter_items(draw: Any) -> Any:
    """A parameter item that is malformed whatever the operation."""
    return draw(
        st.one_of(
            json_scalars,
            st.just({}),
            st.fixed_dictionaries({"name": st.one_of(st.integers(), st.none(), huge_strings)}),
            st.fixed_dictionaries({"name": st.just("identifier"), "valueIdentifier": json_scalars}),
            st.fixed_dictionaries(
                {"name": st.just("identifier"), "valueString": st.text(), "valueCode": st.text()}
            ),
            st.fixed_dictionaries(
                {"name": st.text(min_size=1).map(lambda t: "x-" + t), "valueString": hostile_values}
            ),
            st.fixed_dictionaries({"name": st.just("patient"), "resource": bad_resources()}),
            st.fixed_dictionaries({"name": st.just("group"), "resource": bad_resources("Group")}),
            st.fixed_dictionaries(
                {"name": st.just("member"), "part": deep_values.map(lambda v: [v])}
            ),
        )
    )


@st.composite
def operation_requests(draw: Any, world: dict[str, Any]) -> tuple[str, bytes, str]:
    gid, other = world["gid"], world["other"]
    code = draw(st.sampled_from(["add", "remove", "transfer", "roster"]))
    path = {
        "add": f"/Group/{gid}/$add-member",
        "remove": f"/Group/{gid}/$remove-member",
        "transfer": "/Group/$transfer-member",
        "roster": "/Group/$create-roster",
    }[code]
    kind = draw(st.sampled_from(["malformed", "resource", "content-type", "items", "semantic"]))
    if kind == "malformed":
        return path, draw(malformed_json()), FHIR_JSON
    if kind == "resource":
        return path, orjson.dumps(draw(bad_resources("Parameters"))), FHIR_JSON
    if kind == "content-type":
        body = {
            "resourceType": "Parameters",
            "parameter": [{"name": "identifier", "valueIdentifier": world["identifier"]}],
        }
        return path, orjson.dumps(body), draw(wrong_content_types)
    if kind == "items":
        items = draw(st.lists(bad_parameter_items(), min_size=1, max_size=3))
        return path, orjson.dumps({"resourceType": "Parameters", "parameter": items}), FHIR_JSON
    ref = draw(bad_references)
    semantic = {
        "add": [
            [{"name": "identifier", "valueIdentifier": nobody()}],
            [
                {"name": "identifier", "valueIdentifier": world["identifier"]},
                {
                    "name": "groupVersion",
                    "valueString": draw(st.sampled_from(["999", "0", "-1", "abc", ""])),
                },
            ],
            [
                {
                    "name": "patient",
                    "resource": {"resourceType": "Patient", "identifier": [{"system": 5}]},
                }
            ],
        ],
        "remove": [
            [{"name": "identifier", "valueIdentifier": nobody()}],
            [{"name": "member", "valueReference": {"reference": ref}}],
            [
                {"name": "member", "valueReference": {"reference": "Patient/m2"}},
                {
                    "name": "mode",
                    "valueCode": draw(
                        st.text(max_size=10).filter(lambda t: t not in ("remove", "inactivate"))
                    ),
                },
            ],
        ],
        "transfer": [
            [
                {"name": "source", "valueReference": {"reference": ref}},
                {"name": "target", "valueReference": {"reference": f"Group/{other}"}},
                {"name": "member", "valueReference": {"reference": "Patient/m2"}},
            ],
            [
                {"name": "source", "valueReference": {"reference": f"Group/{gid}"}},
                {"name": "target", "valueReference": {"reference": ref}},
                {"name": "member", "valueReference": {"reference": "Patient/m2"}},
            ],
            [
                {"name": "source", "valueReference": {"reference": f"Group/{gid}"}},
                {"name": "target", "valueReference": {"reference": f"Group/{other}"}},
                {"name": "identifier", "valueIdentifier": nobody()},
            ],
            [
                {"name": "source", "valueReference": {"reference": f"Group/{gid}"}},
                {"name": "target", "valueReference": {"reference": f"Group/{other}"}},
                {"name": "member", "valueReference": {"reference": "Patient/m2"}},
                {"name": "sourceVersion", "valueString": "999"},
            ],
        ],
        "roster": [
            [
                {
                    "name": "group",
                    "resource": {
                        "resourceType": "Group",
                        "type": "person",
                        "actual": True,
                        "bogus": 1,
                    },
                },
                {"name": "identifier", "valueIdentifier": nobody()},
            ],
            [
                {"name": "group", "resource": {"resourceType": "Patient"}},
                {"name": "identifier", "valueIdentifier": nobody()},
            ],
            [{"name": "identifier", "valueIdentifier": nobody()}],
            [
                {
                    "name": "group",
                    "resource": {"resourceType": "Group", "type": "person", "actual": True},
                },
                {"name": "identifier", "valueIdentifier": {"system": ref, "value": 7}},
            ],
        ],
    }[code]
    items = draw(st.sampled_from(semantic))
    return path, orjson.dumps({"resourceType": "Parameters", "parameter": items}), FHIR_JSON


@FUZZ
@given(data=st.data())
def test_operations(world, data):
    path, body, ct = data.draw(operation_requests(world))
    assert_refused(world, "POST", path, body, ct)
