"""The independent test data loads, and the strict R4 check accepts and rejects what it should.

These tests need no database: they check the tools other tests rely on (tests.external,
tests.fhir_check). The first run fetches the data through npm and pip (~10 s); later runs
read the cache under .cache/.
"""

from __future__ import annotations

import copy
import os

import jsonpatch
import pytest

from tests.external import jsonpatch_cases, r4_examples, r4_examples_dir
from tests.fhir_check import assert_strict_r4, strict_r4_errors, strict_r4_parse_rate


@pytest.fixture(scope="module")
def examples() -> list[tuple[str, dict]]:
    return r4_examples()


def test_r4_examples_are_the_official_package(examples):
    assert len(examples) > 5000
    names = [name for name, _ in examples]
    assert len(set(names)) == len(names)
    assert "Patient-example.json" in names
    assert "package.json" not in names
    by_name = dict(examples)
    assert by_name["Patient-example.json"]["resourceType"] == "Patient"
    assert by_name["Patient-example.json"]["id"] == "example"
    assert (r4_examples_dir() / "package.json").is_file()


def test_r4_examples_cover_the_types_we_serve(examples):
    types = {body["resourceType"] for _, body in examples}
    for rtype in (
        "Group",
        "Patient",
        "Bundle",
        "OperationDefinition",
        "OperationOutcome",
        "SearchParameter",
        "CapabilityStatement",
    ):
        assert rtype in types


def test_jsonpatch_cases_shape():
    cases = jsonpatch_cases()
    assert 75 <= len(cases) <= 85
    errors = [c for c in cases if "error" in c]
    assert 20 <= len(errors) <= 25
    for case in cases:
        assert "doc" in case and isinstance(case["patch"], list)


def test_jsonpatch_cases_mean_what_we_think():
    """The reference implementation agrees with every enabled case (as upstream runs them)."""
    for case in jsonpatch_cases():
        if case.get("disabled"):
            continue
        doc = copy.deepcopy(case["doc"])
        if "error" in case:
            with pytest.raises((jsonpatch.JsonPatchException, jsonpatch.JsonPointerException)):
                jsonpatch.apply_patch(doc, case["patch"])
        else:
            result = jsonpatch.apply_patch(doc, case["patch"])
            if "expected" in case:
                assert result == case["expected"], case.get("comment")


VALID_PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {"versionId": "1", "lastUpdated": "2024-01-02T03:04:05.678Z"},
    "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}],
    "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
    "gender": "male",
    "birthDate": "1974-12-25",
}


def test_assert_strict_r4_accepts_a_valid_patient():
    assert_strict_r4(VALID_PATIENT)


def test_assert_strict_r4_accepts_bundles_and_operation_outcomes():
    assert_strict_r4(
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": 1,
            "entry": [
                {
                    "fullUrl": "http://example.org/4_0_0/Patient/p1",
                    "resource": VALID_PATIENT,
                    "search": {"mode": "match"},
                }
            ],
        }
    )
    assert_strict_r4(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "not-found", "diagnostics": "no such id"}],
        }
    )
    assert_strict_r4(
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "quantity": 1,
            "member": [{"entity": {"reference": "Patient/p1"}, "inactive": False}],
        }
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"gender": 5}, "Patient.gender"),
        ({"shoeSize": 42}, "shoeSize"),
        ({"birthDate": "25.12.1974"}, "Patient.birthDate"),
        ({"name": {"family": "Chalmers"}}, "Patient.name"),
        ({"name": [{"given": ["Peter", 7]}]}, "Patient.name[0].given[1]"),
        ({"gender": None}, "Patient.gender: null"),
        ({"identifier": []}, "Patient.identifier: empty array"),
        ({"name": [{}]}, "Patient.name[0]: empty object"),
        ({"id": ""}, "Patient.id: empty string"),
    ],
)
def test_assert_strict_r4_rejects_invalid_patients(change, expected):
    body = {**VALID_PATIENT, **change}
    with pytest.raises(AssertionError) as info:
        assert_strict_r4(body)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "body",
    [
        {"resourceType": "Group", "type": "person", "actual": True, "quantity": 1.5},
        {"resourceType": "Group", "type": "person", "actual": True, "quantity": True},
        {"resourceType": "Group", "type": "person", "actual": "true"},
        {"resourceType": "Group", "actual": True},  # type is required
        {"resourceType": "OperationOutcome", "issue": [{"severity": "error"}]},  # no code
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": {"resourceType": "Patient", "gender": 5}}],
        },
        {"resourceType": "PatientContact"},  # a backbone element, not a resource
        {"resourceType": "NoSuchThing"},
        {"id": "x"},
        ["not", "an", "object"],
    ],
)
def test_assert_strict_r4_rejects_invalid_bodies(body):
    with pytest.raises(AssertionError):
        assert_strict_r4(body)


def test_null_in_primitive_array_needs_its_extension_twin():
    name = {
        "given": ["Peter", None],
        "_given": [
            None,
            {
                "extension": [
                    {"url": "http://example.org/fhir/StructureDefinition/x", "valueString": "y"}
                ]
            },
        ],
    }
    assert strict_r4_errors({**VALID_PATIENT, "name": [name]}) == []
    assert strict_r4_errors({**VALID_PATIENT, "name": [{"given": ["Peter", None]}]})


def test_official_examples_of_our_core_types_parse_strictly(examples):
    core = [
        (n, b)
        for n, b in examples
        if b["resourceType"]
        in (
            "Patient",
            "Group",
            "OperationOutcome",
            "Parameters",
            "OperationDefinition",
            "CapabilityStatement",
        )
    ]
    ok, total, failures = strict_r4_parse_rate(core)
    assert total > 50
    assert failures == []
    assert ok == total


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FHIR_TEST_PASS") == "servers",
    reason="backend-independent and ~30 s: the embedded pass runs it",
)
def test_official_examples_parse_rate(examples):
    """fhirclient accepts 99.8 % of the official examples (13 lack required elements)."""
    ok, total, failures = strict_r4_parse_rate(examples)
    assert total == len(examples)
    assert ok / total > 0.995, failures[:20]
