"""The Operation API framework: routing, the method rule, Parameters checking, definitions.

Parameters are checked against the operation's definition before any operation code runs:
an unknown name answers 400 ``MSG_PARAM_UNKNOWN``; a wrong value type, shape or cardinality
400 ``MSG_BAD_FORMAT``; and a rejected call changes nothing. GET is allowed only for
operations without side effects whose inputs are all primitive (else 405). The definitions
are served as OperationDefinition resources, listed in the CapabilityStatement, and parse
with fhirclient's strict R4 models (every body ``FhirClient`` receives is checked).
"""

from __future__ import annotations

from typing import Any

import pytest

from fhirservice import plugins
from fhirservice.fhir.operation_definition import OperationDef, ParamDef
from fhirservice.rest.parameters import output
from tests.fhir_check import parse_strict_r4
from tests.operations.conftest import (
    assert_error,
    create_group,
    create_patient,
    diagnostics,
    group_body,
    group_version,
    ident,
    new_identifier,
    parameters,
    ref,
    text,
)

# The contract of issue 5 (written out, not read from the code):
# id → (resource, level, affectsState, {(name, use): (min, max, type)})
CONTRACT: dict[str, tuple[str, str, bool, dict[tuple[str, str], tuple[int, str, str]]]] = {
    "Group-add-member": (
        "Group",
        "instance",
        True,
        {
            ("patient", "in"): (0, "1", "Patient"),
            ("identifier", "in"): (0, "1", "Identifier"),
            ("period", "in"): (0, "1", "Period"),
            ("groupVersion", "in"): (0, "1", "string"),
            ("member", "out"): (1, "1", "Reference"),
            ("groupVersion", "out"): (1, "1", "string"),
        },
    ),
    "Group-remove-member": (
        "Group",
        "instance",
        True,
        {
            ("identifier", "in"): (0, "1", "Identifier"),
            ("member", "in"): (0, "1", "Reference"),
            ("mode", "in"): (0, "1", "code"),
            ("groupVersion", "in"): (0, "1", "string"),
            ("groupVersion", "out"): (1, "1", "string"),
        },
    ),
    "Group-transfer-member": (
        "Group",
        "type",
        True,
        {
            ("source", "in"): (1, "1", "Reference"),
            ("target", "in"): (1, "1", "Reference"),
            ("identifier", "in"): (0, "1", "Identifier"),
            ("member", "in"): (0, "1", "Reference"),
            ("sourceVersion", "in"): (0, "1", "string"),
            ("targetVersion", "in"): (0, "1", "string"),
            ("sourceVersion", "out"): (1, "1", "string"),
            ("targetVersion", "out"): (1, "1", "string"),
        },
    ),
    "Group-create-roster": (
        "Group",
        "type",
        True,
        {
            ("group", "in"): (1, "1", "Group"),
            ("identifier", "in"): (0, "*", "Identifier"),
            ("group", "out"): (1, "1", "Reference"),
            ("groupVersion", "out"): (1, "1", "string"),
            ("created", "out"): (1, "1", "integer"),
        },
    ),
    "Patient-group-memberships": (
        "Patient",
        "instance",
        False,
        {("return", "out"): (1, "1", "Bundle")},
    ),
}
# Served and listed too; registered by the groups app with a view of its own ($members is GET
# with paging).
ALSO_SERVED = {
    "Group-members": ("Group", "members"),
    # Bulk Data export (operations/export, tests/operations/test_export.py).
    "System-export": (None, "export"),
    "Patient-export": ("Patient", "export"),
    "Group-export": ("Group", "export"),
    "System-export-poll-status": (None, "export-poll-status"),
    "System-export-file": (None, "export-file"),
}


# --- OperationDefinitions ------------------------------------------------------------------


@pytest.mark.parametrize("op_id", sorted(CONTRACT))
def test_definition_is_served_with_the_contract(api, op_id):
    resource, level, affects_state, params = CONTRACT[op_id]
    response = api.get(f"/OperationDefinition/{op_id}")
    assert response.status == 200, response
    body = response.body
    assert body["resourceType"] == "OperationDefinition"
    assert body["id"] == op_id
    assert body["kind"] == "operation"
    assert body["status"] == "active"
    assert body["code"] == op_id.split("-", 1)[1]
    assert body["resource"] == [resource]
    assert body["affectsState"] is affects_state
    assert {lvl: body[lvl] for lvl in ("system", "type", "instance")} == {
        lvl: lvl == level for lvl in ("system", "type", "instance")
    }
    served = {(p["name"], p["use"]): (p["min"], p["max"], p["type"]) for p in body["parameter"]}
    assert served == params
    assert len(body["parameter"]) == len(params)
    assert body["url"] == f"urn:fhirservice:OperationDefinition:{op_id}"
    # FhirClient checks every body; here the parse is explicit, as the contract asks.
    model = parse_strict_r4(body)
    assert type(model).__name__ == "OperationDefinition"
    assert [(p.name, p.use, p.min, p.max, p.type) for p in model.parameter] == [
        (p["name"], p["use"], p["min"], p["max"], p["type"]) for p in body["parameter"]
    ]


def test_members_definition_is_served(api):
    response = api.get("/OperationDefinition/Group-members")
    assert response.status == 200, response
    assert response.body["code"] == "members"
    assert response.body["affectsState"] is False
    assert response.body["instance"] is True


def test_reference_outputs_name_their_target(api):
    body = api.get("/OperationDefinition/Group-add-member").body
    member = next(p for p in body["parameter"] if p["name"] == "member")
    assert member["targetProfile"] == ["http://hl7.org/fhir/StructureDefinition/Patient"]
    body = api.get("/OperationDefinition/Group-transfer-member").body
    source = next(p for p in body["parameter"] if p["name"] == "source")
    assert source["targetProfile"] == ["http://hl7.org/fhir/StructureDefinition/Group"]


def test_every_definition_is_listed_in_the_capability_statement(api):
    response = api.get("/metadata")
    assert response.status == 200, response
    listed = {
        (entry["type"], op["name"]): op["definition"]
        for entry in response.body["rest"][0]["resource"]
        for op in entry.get("operation", [])
    }
    expected = {
        (resource, op_id.split("-", 1)[1]): f"urn:fhirservice:OperationDefinition:{op_id}"
        for op_id, (resource, *_) in CONTRACT.items()
    }
    expected[("Group", "members")] = "urn:fhirservice:OperationDefinition:Group-members"
    assert {k: v for k, v in listed.items() if k in expected} == expected
    # Each listed definition URL is the url of the definition served under its id.
    for (_, _), url in expected.items():
        op_id = url.rsplit(":", 1)[1]
        assert api.get(f"/OperationDefinition/{op_id}").body["url"] == url


def test_operation_definition_history_is_the_generic_type_history(api):
    response = api.get("/OperationDefinition/_history?_count=0")
    assert response.status == 200, response
    assert response.body["type"] == "history"


def test_unknown_definition_is_404(api):
    response = api.get("/OperationDefinition/Group-no-such-op")
    assert_error(response, 404, "not-found", "MSG_NO_EXIST")


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_built_in_definitions_cannot_be_changed(api, method):
    body = api.get("/OperationDefinition/Group-add-member").body
    response = api.request(method, "/OperationDefinition/Group-add-member", body)
    assert_error(response, 405, "not-supported", "MSG_METHOD_NOT_ALLOWED")
    assert api.get("/OperationDefinition/Group-add-member").body == body


# --- routing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/Group/{gid}/$no-such-operation",
        "/Group/$add-member",  # add-member is instance level only
        "/$add-member",
        "/Group/{gid}/$transfer-member",  # transfer-member is type level only
        "/Group/{gid}/$create-roster",
        "/Patient/{gid}/$add-member",  # a Group operation on another type
        "/Patient/$group-memberships",  # instance level only
    ],
)
def test_unknown_operation_is_404(api, path):
    gid = create_group(api)
    response = api.post(path.format(gid=gid), parameters())
    assert_error(response, 404, "not-found", "MSG_OPERATION_UNKNOWN")


def test_operation_on_unknown_resource_type_is_404(api):
    response = api.post("/NoSuchType/$add-member", parameters())
    assert_error(response, 404, "not-found", "MSG_UNKNOWN_TYPE")


# --- the method rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/Group/{gid}/$add-member",
        "/Group/{gid}/$remove-member",
        "/Group/$transfer-member",
        "/Group/$create-roster",
    ],
)
def test_get_on_a_state_changing_operation_is_405(api, path):
    gid = create_group(api)
    response = api.get(path.format(gid=gid) + "?groupVersion=1")
    assert_error(response, 405, "not-supported", "MSG_METHOD_NOT_ALLOWED")
    assert group_version(api, gid) == 1


def test_get_on_a_read_only_operation_is_allowed(api):
    pid = create_patient(api).split("/")[1]
    response = api.get(f"/Patient/{pid}/$group-memberships")
    assert response.status == 200, response
    assert response.body["type"] == "searchset"


def test_get_allowed_only_without_side_effects_and_with_primitive_inputs():
    def op(affects_state: bool, *types: str) -> OperationDef:
        params = tuple(ParamDef(f"p{i}", "in", 0, "1", t, "") for i, t in enumerate(types))
        return OperationDef("x", None, "X", "", affects_state, system=True, parameters=params)

    assert op(False).get_allowed
    assert op(False, "string", "integer", "boolean", "code").get_allowed
    assert not op(True).get_allowed
    assert not op(True, "string").get_allowed
    assert not op(False, "string", "Identifier").get_allowed
    assert not op(False, "Reference").get_allowed
    assert not op(False, "Patient").get_allowed


# A read-only system-level operation registered for these tests only: it echoes its inputs,
# so Parameters and query checking are observable apart from any business logic.
ECHO = OperationDef(
    code="test-echo",
    resource=None,
    system=True,
    affects_state=False,
    title="Echo",
    description="Echoes its inputs (tests only).",
    parameters=(
        ParamDef("count", "in", 0, "1", "integer", ""),
        ParamDef("flag", "in", 0, "1", "boolean", ""),
        ParamDef("tag", "in", 0, "*", "code", ""),
        ParamDef("name", "in", 1, "1", "string", ""),
    ),
)
ECHO_COMPLEX = OperationDef(
    code="test-echo-identifier",
    resource=None,
    system=True,
    affects_state=False,
    title="Echo identifier",
    description="Echoes an Identifier (tests only).",
    parameters=(ParamDef("identifier", "in", 0, "1", "Identifier", ""),),
)


def _echo(*, values: dict[str, Any], resource_id: str | None, context: Any) -> dict[str, Any]:
    return output(
        ("count", "valueInteger", values.get("count")),
        ("flag", "valueBoolean", values.get("flag")),
        *[("tag", "valueCode", tag) for tag in values.get("tag", [])],
        ("name", "valueString", values.get("name")),
        ("identifier", "valueIdentifier", values.get("identifier")),
    )


@pytest.fixture
def echo(monkeypatch):
    """Register the echo operations for one test."""
    monkeypatch.setitem(plugins.OPERATIONS, ECHO.id, plugins.Operation(ECHO, _echo))
    monkeypatch.setitem(plugins.OPERATIONS, ECHO_COMPLEX.id, plugins.Operation(ECHO_COMPLEX, _echo))


def _echoed(response) -> list[tuple[str, Any]]:
    return [
        (p["name"], next(v for k, v in p.items() if k.startswith("value")))
        for p in response.body["parameter"]
    ]


def test_get_parses_typed_query_parameters(api, echo):
    response = api.get("/$test-echo?count=3&flag=false&tag=a&tag=b&name=x&_format=json")
    assert response.status == 200, response
    assert _echoed(response) == [
        ("count", 3),
        ("flag", False),
        ("tag", "a"),
        ("tag", "b"),
        ("name", "x"),
    ]


def test_post_parses_the_same_parameters(api, echo):
    body = parameters(
        {"name": "count", "valueInteger": 3},
        {"name": "tag", "valueCode": "a"},
        {"name": "name", "valueString": "x"},
    )
    response = api.post("/$test-echo", body)
    assert response.status == 200, response
    assert _echoed(response) == [("count", 3), ("tag", "a"), ("name", "x")]


@pytest.mark.parametrize(
    "query",
    [
        "count=abc&name=x",
        "count=1.5&name=x",
        "flag=yes&name=x",
        "count=1&count=2&name=x",  # max 1
        "tag=a",  # name is required (min 1)
        "name=",  # an empty string is not a FHIR string
        "tag=two%20%20spaces&name=x",  # not a code
    ],
)
def test_get_with_a_bad_query_value_is_400_bad_format(api, echo, query):
    response = api.get(f"/$test-echo?{query}")
    assert_error(response, 400, "invalid", "MSG_BAD_FORMAT")


def test_get_with_an_unknown_query_parameter_is_400(api, echo):
    response = api.get("/$test-echo?name=x&colour=red")
    assert_error(response, 400, "invalid", "MSG_PARAM_UNKNOWN")
    assert diagnostics(response) == "Unknown parameter 'colour' for $test-echo"


def test_get_on_a_read_only_operation_with_a_complex_input_is_405(api, echo):
    response = api.get("/$test-echo-identifier?identifier=x")
    assert_error(response, 405, "not-supported", "MSG_METHOD_NOT_ALLOWED")
    body = parameters(ident({"system": "urn:s", "value": "v"}))
    response = api.post("/$test-echo-identifier", body)
    assert response.status == 200, response
    assert _echoed(response) == [("identifier", {"system": "urn:s", "value": "v"})]


# --- Parameters checking -------------------------------------------------------------------


def test_unknown_parameter_is_400_param_unknown(api):
    gid = create_group(api)
    identifier = new_identifier()
    create_patient(api, identifier)
    response = api.post(
        f"/Group/{gid}/$add-member", parameters(ident(identifier), text("patientId", "123"))
    )
    assert_error(response, 400, "invalid", "MSG_PARAM_UNKNOWN")
    assert diagnostics(response) == "Unknown parameter 'patientId' for $add-member"
    assert response.body["issue"][0]["expression"] == ["Parameters.parameter(patientId)"]
    assert group_version(api, gid) == 1


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/Group/{gid}/$add-member", "member"),  # an out parameter, not an input
        ("/Group/{gid}/$add-member", "groupversion"),  # names are case sensitive
        ("/Group/{gid}/$remove-member", "period"),
        ("/Group/$transfer-member", "groupVersion"),
        ("/Group/$create-roster", "members"),
    ],
)
def test_parameter_of_another_operation_is_unknown(api, path, name):
    gid = create_group(api)
    response = api.post(path.format(gid=gid), parameters(text(name, "1")))
    assert_error(response, 400, "invalid", "MSG_PARAM_UNKNOWN")


IDENT = {"system": "urn:test:mrn", "value": "x"}

BAD_ADD_MEMBER = {
    "identifier as string": [{"name": "identifier", "valueString": "x"}],
    "identifier without value": [{"name": "identifier", "valueIdentifier": {"system": "urn:s"}}],
    "identifier with empty system": [
        {"name": "identifier", "valueIdentifier": {"system": "", "value": "x"}}
    ],
    "identifier value not a string": [
        {"name": "identifier", "valueIdentifier": {"system": "urn:s", "value": 7}}
    ],
    "identifier empty object": [{"name": "identifier", "valueIdentifier": {}}],
    "identifier twice": [ident(IDENT), ident(IDENT)],
    "identifier as a resource": [{"name": "identifier", "resource": IDENT}],
    "two value keys": [{"name": "identifier", "valueIdentifier": IDENT, "valueString": "x"}],
    "identifier with parts": [{"name": "identifier", "part": [text("value", "x")]}],
    "patient as a value": [{"name": "patient", "valueString": "Patient/1"}],
    "patient of another type": [{"name": "patient", "resource": group_body()}],
    "patient and a value": [
        {"name": "patient", "resource": {"resourceType": "Patient"}, "valueString": "x"}
    ],
    "period with unknown element": [
        ident(IDENT),
        {"name": "period", "valuePeriod": {"start": "2020", "foo": 1}},
    ],
    "period start not a dateTime": [
        ident(IDENT),
        {"name": "period", "valuePeriod": {"start": "yesterday"}},
    ],
    "period start after end": [
        ident(IDENT),
        {"name": "period", "valuePeriod": {"start": "2025-01-01", "end": "2020-01-01"}},
    ],
    "period start year after end year": [
        ident(IDENT),
        {"name": "period", "valuePeriod": {"start": "2021", "end": "2020-12-31"}},
    ],
    "period as string": [ident(IDENT), {"name": "period", "valueString": "2020"}],
    "groupVersion as integer": [ident(IDENT), {"name": "groupVersion", "valueInteger": 1}],
    "groupVersion empty": [ident(IDENT), text("groupVersion", "")],
    "both patient and identifier": [
        ident(IDENT),
        {"name": "patient", "resource": {"resourceType": "Patient", "identifier": [IDENT]}},
    ],
    "neither patient nor identifier": [text("groupVersion", "1")],
    "nothing at all": [],
}


@pytest.mark.parametrize("case", sorted(BAD_ADD_MEMBER))
def test_bad_add_member_parameters_are_400_bad_format(api, case):
    gid = create_group(api)
    create_patient(api, IDENT)
    response = api.post(f"/Group/{gid}/$add-member", parameters(*BAD_ADD_MEMBER[case]))
    assert_error(response, 400, "invalid", "MSG_BAD_FORMAT")
    assert group_version(api, gid) == 1


def test_period_start_equal_to_end_is_accepted(api):
    gid = create_group(api)
    identifier = new_identifier()
    create_patient(api, identifier)
    period = {"start": "2020-01-01", "end": "2020-01-01"}
    response = api.post(
        f"/Group/{gid}/$add-member",
        parameters(ident(identifier), {"name": "period", "valuePeriod": period}),
    )
    assert response.status == 200, response


BAD_REMOVE_MEMBER = {
    "mode not remove or inactivate": [ident(IDENT), {"name": "mode", "valueCode": "delete"}],
    "mode as string": [ident(IDENT), {"name": "mode", "valueString": "remove"}],
    "member not a reference": [{"name": "member", "valueReference": {"reference": "nonsense"}}],
    "member as string": [{"name": "member", "valueString": "Patient/1"}],
    "member reference missing": [{"name": "member", "valueReference": {"display": "Peter"}}],
    "identifier and member": [ident(IDENT), ref("Patient/1", "member")],
    "neither identifier nor member": [{"name": "mode", "valueCode": "remove"}],
}


@pytest.mark.parametrize("case", sorted(BAD_REMOVE_MEMBER))
def test_bad_remove_member_parameters_are_400_bad_format(api, case):
    pid = create_patient(api, IDENT)
    gid = create_group(api, [pid])
    response = api.post(f"/Group/{gid}/$remove-member", parameters(*BAD_REMOVE_MEMBER[case]))
    assert_error(response, 400, "invalid", "MSG_BAD_FORMAT")
    assert group_version(api, gid) == 1


BAD_TRANSFER = {
    "no target": [ref("Group/{a}", "source"), ident(IDENT)],
    "no source": [ref("Group/{b}", "target"), ident(IDENT)],
    "two sources": [
        ref("Group/{a}", "source"),
        ref("Group/{b}", "source"),
        ref("Group/{b}", "target"),
        ident(IDENT),
    ],
    "source is a Patient": [
        ref("Patient/{a}", "source"),
        ref("Group/{b}", "target"),
        ident(IDENT),
    ],
    "target is not a reference": [
        ref("Group/{a}", "source"),
        {"name": "target", "valueString": "Group/{b}"},
        ident(IDENT),
    ],
    "source equals target": [ref("Group/{a}", "source"), ref("Group/{a}", "target"), ident(IDENT)],
    "no member": [ref("Group/{a}", "source"), ref("Group/{b}", "target")],
    "sourceVersion as integer": [
        ref("Group/{a}", "source"),
        ref("Group/{b}", "target"),
        ident(IDENT),
        {"name": "sourceVersion", "valueInteger": 1},
    ],
}


def _fill(items: list[dict[str, Any]], **ids: str) -> list[dict[str, Any]]:
    out = []
    for item in items:
        item = dict(item)
        if "valueReference" in item:
            item["valueReference"] = {
                "reference": item["valueReference"]["reference"].format(**ids)
            }
        if "valueString" in item:
            item["valueString"] = item["valueString"].format(**ids)
        out.append(item)
    return out


@pytest.mark.parametrize("case", sorted(BAD_TRANSFER))
def test_bad_transfer_parameters_are_400_bad_format(api, case):
    pid = create_patient(api, IDENT)
    a, b = create_group(api, [pid]), create_group(api)
    response = api.post("/Group/$transfer-member", parameters(*_fill(BAD_TRANSFER[case], a=a, b=b)))
    assert_error(response, 400, "invalid", "MSG_BAD_FORMAT")
    assert (group_version(api, a), group_version(api, b)) == (1, 1)


BAD_CREATE_ROSTER = {
    "no group": [ident(IDENT)],
    "two groups": [{"name": "group", "resource": group_body()}] * 2,
    "group of another type": [{"name": "group", "resource": {"resourceType": "Patient"}}],
    "group as a reference": [ref("Group/1", "group")],
    "identifier as string": [
        {"name": "group", "resource": group_body()},
        {"name": "identifier", "valueString": "x"},
    ],
}


@pytest.mark.parametrize("case", sorted(BAD_CREATE_ROSTER))
def test_bad_create_roster_parameters_are_400_bad_format(api, case):
    response = api.post("/Group/$create-roster", parameters(*BAD_CREATE_ROSTER[case]))
    assert_error(response, 400, "invalid", "MSG_BAD_FORMAT")


@pytest.mark.parametrize(
    "body",
    [
        {"resourceType": "Patient"},
        {"resourceType": "Parameters", "parameter": {"name": "identifier"}},
        {"resourceType": "Parameters", "parameter": [{"valueString": "x"}]},
        {"resourceType": "Parameters", "parameter": ["identifier"]},
        [{"name": "identifier"}],
    ],
    ids=["not Parameters", "parameter not a list", "item without name", "item not object", "array"],
)
def test_body_that_is_not_parameters_is_400_bad_format(api, body):
    gid = create_group(api)
    response = api.post(f"/Group/{gid}/$add-member", body)
    assert_error(response, 400, "invalid", "MSG_BAD_FORMAT")


def test_body_that_is_not_json_is_400(api):
    gid = create_group(api)
    response = api.post(f"/Group/{gid}/$add-member", raw=b"{not json")
    assert_error(response, 400, "invalid", "MSG_JSON_PARSE")


# --- the resource an instance operation runs on ---------------------------------------------


def test_instance_operation_on_unknown_group_is_404(api):
    identifier = new_identifier()
    create_patient(api, identifier)
    response = api.post("/Group/no-such-group/$add-member", parameters(ident(identifier)))
    assert_error(response, 404, "not-found", "MSG_NO_EXIST")


def test_instance_operation_on_deleted_group_is_410(api):
    identifier = new_identifier()
    create_patient(api, identifier)
    gid = create_group(api)
    assert api.delete(f"/Group/{gid}").status == 204
    response = api.post(f"/Group/{gid}/$add-member", parameters(ident(identifier)))
    assert_error(response, 410, "deleted", "MSG_DELETED")
