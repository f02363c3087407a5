"""Required value-set bindings (fhirservice.fhir.bindings) on every write, and the report command.

A code outside the value set of a required binding answers 400 with one ``code-invalid``
issue per violation, naming the element (FHIRPath-like, with indexes), the value and the
value set, and nothing is stored: on create, update, PATCH, batch and transaction entries.
The checker descends into datatypes, backbone elements (also those reused by
``contentReference``), choice types, extensions and contained resources. All official R4
examples keep passing. With ``FHIR_SERVICE["REQUIRED_BINDINGS"]`` off such writes are stored,
and ``manage.py report_binding_violations`` finds them.
"""

from __future__ import annotations

import orjson
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.test import override_settings

from fhirservice.conf import fhir_settings
from fhirservice.fhir.bindings import (
    MSG_CODE_NOT_IN_VALUE_SET,
    MSG_CODING_NOT_IN_VALUE_SET,
    MSG_NO_CODING,
    binding_issues,
)
from fhirservice.management.commands.report_binding_violations import (
    EXIT_VIOLATIONS,
    MSG_FOUND,
    MSG_NONE,
)
from tests.external import r4_examples
from tests.fhirservice.test_api_bundles import post, put
from tests.fhirservice.test_api_errors import assert_outcome, row_counts
from tests.support import backend_independent, bundle, patient

GENDER = "http://hl7.org/fhir/ValueSet/administrative-gender"
CONTACT_SYSTEM = "http://hl7.org/fhir/ValueSet/contact-point-system"
OBSERVATION_STATUS = "http://hl7.org/fhir/ValueSet/observation-status"
COMPARATOR = "http://hl7.org/fhir/ValueSet/quantity-comparator"
CONDITION_CLINICAL = "http://hl7.org/fhir/ValueSet/condition-clinical"
CLINICAL_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-clinical"
ITEM_TYPE = "http://hl7.org/fhir/ValueSet/item-type"
GROUP_TYPE = "http://hl7.org/fhir/ValueSet/group-type"


def bad_code(expression: str, value: str, value_set: str) -> tuple[str, str]:
    """(expression, diagnostics) of a code outside its value set."""
    message = MSG_CODE_NOT_IN_VALUE_SET.format(value=repr(value), value_set=value_set)
    return expression, f"{expression}: {message}"


def observation(**extra) -> dict:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "weight"}, **extra}


def condition(clinical_status: dict) -> dict:
    return {
        "resourceType": "Condition",
        "clinicalStatus": clinical_status,
        "subject": {"reference": "Patient/p"},
    }


def assert_refused(response, *violations: tuple[str, str]) -> None:
    """400 code-invalid, one issue per violation in document order."""
    first = assert_outcome(response, 400, "MSG_CODE_INVALID")
    issues = response.body["issue"]
    assert [(i["code"], i["expression"], i["diagnostics"]) for i in issues] == [
        ("code-invalid", [expression], diagnostics) for expression, diagnostics in violations
    ], response
    assert first["severity"] == "error"


# --- rejected writes, nothing stored ------------------------------------------------------

REFUSED = [
    pytest.param(
        patient(gender="banana"),
        [bad_code("Patient.gender", "banana", GENDER)],
        id="code",
    ),
    pytest.param(
        patient(
            telecom=[{"system": "phone", "value": "1"}, {"system": "pigeon", "value": "2"}],
            contact=[{"gender": "female"}, {"gender": "F", "telecom": [{"system": "fax2"}]}],
        ),
        [
            bad_code("Patient.telecom[1].system", "pigeon", CONTACT_SYSTEM),
            bad_code("Patient.contact[1].gender", "F", GENDER),
            bad_code("Patient.contact[1].telecom[0].system", "fax2", CONTACT_SYSTEM),
        ],
        id="datatype-and-backbone",
    ),
    pytest.param(
        observation(status="done"),
        [bad_code("Observation.status", "done", OBSERVATION_STATUS)],
        id="observation-status",
    ),
    pytest.param(
        observation(valueQuantity={"value": 80, "comparator": "~"}),
        [bad_code("Observation.valueQuantity.comparator", "~", COMPARATOR)],
        id="choice-type",
    ),
    pytest.param(
        patient(
            extension=[{"url": "urn:x", "valueContactPoint": {"system": "telegram", "value": "@p"}}]
        ),
        [bad_code("Patient.extension[0].valueContactPoint.system", "telegram", CONTACT_SYSTEM)],
        id="extension-value",
    ),
    pytest.param(
        observation(contained=[patient(id="p1", gender="m")], subject={"reference": "#p1"}),
        [bad_code("Observation.contained[0].gender", "m", GENDER)],
        id="contained",
    ),
    pytest.param(
        condition({"coding": [{"system": CLINICAL_SYSTEM, "code": "cured"}]}),
        [
            (
                "Condition.clinicalStatus",
                "Condition.clinicalStatus: "
                + MSG_CODING_NOT_IN_VALUE_SET.format(
                    value_set=CONDITION_CLINICAL, found=f"{CLINICAL_SYSTEM}|cured"
                ),
            )
        ],
        id="codeable-concept-code",
    ),
    pytest.param(
        condition({"coding": [{"system": "urn:other", "code": "active"}]}),
        [
            (
                "Condition.clinicalStatus",
                "Condition.clinicalStatus: "
                + MSG_CODING_NOT_IN_VALUE_SET.format(
                    value_set=CONDITION_CLINICAL, found="urn:other|active"
                ),
            )
        ],
        id="codeable-concept-system",
    ),
    pytest.param(
        condition({"text": "active"}),
        [
            (
                "Condition.clinicalStatus",
                "Condition.clinicalStatus: " + MSG_NO_CODING.format(value_set=CONDITION_CLINICAL),
            )
        ],
        id="codeable-concept-text-only",
    ),
    pytest.param(
        {
            "resourceType": "Questionnaire",
            "status": "draft",
            "item": [{"linkId": "1", "type": "group", "item": [{"linkId": "1.1", "type": "txt"}]}],
        },
        [bad_code("Questionnaire.item[0].item[0].type", "txt", ITEM_TYPE)],
        id="content-reference",
    ),
    pytest.param(
        {"resourceType": "Group", "type": "people", "actual": True},
        [bad_code("Group.type", "people", GROUP_TYPE)],
        id="group",
    ),
]


@pytest.mark.parametrize(("resource", "violations"), REFUSED)
def test_a_create_breaking_a_required_binding_is_refused(api, resource, violations):
    before = row_counts()
    assert_refused(api.post(f"/{resource['resourceType']}", resource), *violations)
    assert row_counts() == before


@pytest.mark.parametrize(("resource", "violations"), REFUSED)
def test_an_update_breaking_a_required_binding_is_refused(api, resource, violations):
    before = row_counts()
    path = f"/{resource['resourceType']}/bound"
    assert_refused(api.put(path, {**resource, "id": "bound"}), *violations)
    assert row_counts() == before
    assert api.get(path).status == 404


ACCEPTED = [
    pytest.param(patient(gender="other", contact=[{"gender": "unknown"}]), id="codes"),
    pytest.param(
        condition(
            {
                "coding": [
                    {"system": "urn:local", "code": "A"},
                    {"system": CLINICAL_SYSTEM, "code": "remission"},
                ],
                "text": "in remission",
            }
        ),
        id="one-coding-from-the-set",
    ),
    pytest.param(patient(_gender={"extension": [{"url": "urn:x", "valueString": "?"}]}), id="ext"),
]


@pytest.mark.parametrize("resource", ACCEPTED)
def test_codes_from_the_value_sets_are_accepted(api, resource):
    response = api.post(f"/{resource['resourceType']}", resource)
    assert response.status == 201, response


def test_an_update_is_checked_against_the_stored_resource_unchanged(api):
    created = api.post("/Patient", patient(gender="male")).body
    path = f"/Patient/{created['id']}"
    assert_refused(
        api.put(path, {**created, "gender": "banana"}),
        bad_code("Patient.gender", "banana", GENDER),
    )
    assert api.get(path).body == created


def test_a_patch_introducing_a_bad_code_is_refused_and_changes_nothing(api):
    created = api.post("/Patient", patient(gender="male")).body
    path = f"/Patient/{created['id']}"
    before = row_counts()
    ops = [
        {"op": "replace", "path": "/gender", "value": "banana"},
        {"op": "add", "path": "/telecom", "value": [{"system": "pigeon"}]},
    ]
    assert_refused(
        api.patch(path, ops),
        bad_code("Patient.gender", "banana", GENDER),
        bad_code("Patient.telecom[0].system", "pigeon", CONTACT_SYSTEM),
    )
    assert row_counts() == before
    current = api.get(path)
    assert current.etag == 'W/"1"'
    assert current.body == created


def test_a_transaction_with_a_bad_code_in_one_entry_writes_nothing(api):
    before = row_counts()
    response = api.post(
        "",
        bundle(
            "transaction",
            post(patient(gender="female")),
            put(patient(id="tx-bound", gender="male")),
            post(observation(status="finished")),
        ),
    )
    issue = assert_outcome(response, 400, "MSG_TRANSACTION_FAILED")
    assert issue["code"] == "code-invalid"
    assert issue["expression"] == ["Bundle.entry[2]"]
    assert "Observation.status" in issue["diagnostics"]
    assert row_counts() == before
    assert api.get("/Patient/tx-bound").status == 404


def test_a_batch_refuses_only_the_entry_with_a_bad_code(api):
    response = api.post(
        "",
        bundle("batch", post(patient(gender="banana")), put(patient(id="ok", gender="male"))),
    )
    assert response.status == 200, response
    first, second = response.body["entry"]
    assert first["response"]["status"].startswith("400")
    outcome = first["response"]["outcome"]["issue"][0]
    assert (outcome["code"], outcome["expression"]) == ("code-invalid", ["Patient.gender"])
    assert second["response"]["status"].startswith("201")


def test_a_conditional_update_or_patch_with_a_bad_code_changes_nothing(api):
    identifier = [{"system": "urn:bound", "value": "conditional"}]
    created = api.post("/Patient", patient(gender="male", identifier=identifier)).body
    before = row_counts()
    query = "/Patient?identifier=urn:bound|conditional"
    banana = bad_code("Patient.gender", "banana", GENDER)
    assert_refused(api.put(query, patient(gender="banana", identifier=identifier)), banana)
    assert_refused(
        api.patch(query, [{"op": "replace", "path": "/gender", "value": "banana"}]), banana
    )
    assert row_counts() == before
    assert api.get(f"/Patient/{created['id']}").body == created


def test_an_operation_writing_a_resource_with_a_bad_code_writes_nothing(api):
    before = row_counts()
    group = {"resourceType": "Group", "type": "people", "actual": True}
    identifier = {"system": "urn:bound", "value": "roster-1"}
    response = api.post(
        "/Group/$create-roster",
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "group", "resource": group},
                {"name": "identifier", "valueIdentifier": identifier},
            ],
        },
    )
    assert_refused(response, bad_code("Group.type", "people", GROUP_TYPE))
    assert row_counts() == before


# --- the official examples ----------------------------------------------------------------


@backend_independent
def test_no_official_r4_example_breaks_a_required_binding():
    """All 5,306 HL7 R4 examples respect their required bindings (174k coded values)."""
    broken = {
        name: found for name, resource in r4_examples() if (found := binding_issues(resource))
    }
    assert broken == {}


# --- the switch and the report command ----------------------------------------------------


def test_the_switch_is_a_validated_boolean():
    assert fhir_settings.REQUIRED_BINDINGS is True
    with override_settings(FHIR_SERVICE={"REQUIRED_BINDINGS": "off"}):
        with pytest.raises(ImproperlyConfigured):
            fhir_settings.REQUIRED_BINDINGS  # noqa: B018


def test_with_the_switch_off_a_bad_code_is_stored(api):
    with override_settings(FHIR_SERVICE={"REQUIRED_BINDINGS": False}):
        response = api.post("/Patient", patient(gender="banana"))
    assert response.status == 201, response
    assert api.get(f"/Patient/{response.body['id']}").body["gender"] == "banana"


def test_with_the_switch_off_violations_are_stored_and_the_command_reports_them(api, tmp_path):
    with override_settings(FHIR_SERVICE={"REQUIRED_BINDINGS": False}):
        bad = api.post("/Patient", patient(gender="banana", contact=[{"gender": "x"}])).body
        also_bad = api.post("/Observation", observation(status="done")).body
    good = api.post("/Patient", patient(gender="male")).body
    deleted = api.post("/Patient", patient(gender="female")).body
    api.delete(f"/Patient/{deleted['id']}")
    output = tmp_path / "violations.jsonl"

    with pytest.raises(CommandError) as info:
        call_command("report_binding_violations", output=str(output), batch_size=1, verbosity=0)

    assert info.value.returncode == EXIT_VIOLATIONS
    assert str(info.value) == MSG_FOUND.format(violations=3, resources=2, count=3)
    lines = [orjson.loads(line) for line in output.read_text().splitlines()]
    assert sorted((line["key"], line["expression"]) for line in lines) == sorted(
        [
            (f"Patient/{bad['id']}", "Patient.gender"),
            (f"Patient/{bad['id']}", "Patient.contact[0].gender"),
            (f"Observation/{also_bad['id']}", "Observation.status"),
        ]
    )
    assert {line["versionId"] for line in lines} == {"1"}
    assert all("is not in the required value set" in line["diagnostics"] for line in lines)
    assert good["id"] not in output.read_text()

    # Limited to one type; after the bad ones are fixed, nothing is left.
    with pytest.raises(CommandError) as info:
        call_command("report_binding_violations", types=["Observation"], verbosity=0)
    assert str(info.value) == MSG_FOUND.format(violations=1, resources=1, count=1)
    api.put(f"/Patient/{bad['id']}", {**bad, "gender": "other", "contact": [{"gender": "male"}]})
    api.put(f"/Observation/{also_bad['id']}", {**also_bad, "status": "amended"})
    call_command("report_binding_violations", verbosity=0)  # no error: exit status 0


def test_the_command_prints_the_summary(api, capsys):
    with override_settings(FHIR_SERVICE={"REQUIRED_BINDINGS": False}):
        api.post("/Patient", patient(gender="banana"))
    with pytest.raises(CommandError):
        call_command("report_binding_violations", verbosity=0)
    out = capsys.readouterr().out
    assert "1  Patient.gender" in out
    assert "v1: Patient.gender: the code 'banana'" in out


def test_the_command_with_no_resources_reports_none(db, capsys):
    call_command("report_binding_violations", verbosity=0)
    assert capsys.readouterr().out.strip() == MSG_NONE.format(count=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"types": ["Patient", "Banana"]}, "--type Banana is not an R4 resource type"),
        ({"batch_size": 0}, "--batch-size must be a positive whole number, not 0"),
    ],
)
def test_the_command_refuses_bad_arguments(db, options, message):
    with pytest.raises(CommandError) as info:
        call_command("report_binding_violations", verbosity=0, **options)
    assert str(info.value) == message
