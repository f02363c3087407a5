"""FHIR R4 content validation: the R4 type set, the element tables, and valid/invalid content.

The yardsticks are not ours: the R4 StructureDefinitions and the official examples of the npm
package hl7.fhir.r4.examples 4.0.1 (tests.external), the R4B models of fhir.resources, and
fhirclient's strict R4 models (tests.fhir_check) for the OperationOutcomes we produce.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from fhirservice.errors import InvalidResource
from fhirservice.fhir import validation
from fhirservice.fhir.resource_types import (
    R4_RESOURCE_TYPES,
    R4_SPEC_STRUCTURES,
    is_resource_type,
)
from fhirservice.fhir.validation import MAX_ISSUES, element_definitions, validate_resource
from tests.external import r4_examples
from tests.fhir_check import assert_strict_r4

# Types of FHIR 4.0.1 that fhir.resources' R4B models do not have.
R4_ONLY = {
    "EffectEvidenceSynthesis",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "RiskEvidenceSynthesis",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
}
# Types R4B (4.3.0) added; an R4 server does not know them.
R4B_ONLY = {
    "AdministrableProductDefinition",
    "Citation",
    "ClinicalUseDefinition",
    "EvidenceReport",
    "Ingredient",
    "ManufacturedItemDefinition",
    "MedicinalProductDefinition",
    "NutritionProduct",
    "PackagedProductDefinition",
    "RegulatedAuthorization",
    "SubscriptionStatus",
    "SubscriptionTopic",
    "SubstanceDefinition",
}
# The one official example that breaks a rule we keep: its id has 67 characters, R4 allows
# 64 (https://hl7.org/fhir/R4/datatypes.html#id), and resource ids are stored in 64.
ID_TOO_LONG = (
    "SearchParameter-questionnaireresponse-extensions-QuestionnaireResponse-item-subject.json"
)

FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
XHTML = '<div xmlns="http://www.w3.org/1999/xhtml">text</div>'
DROP = object()  # as a builder argument: leave the element out


def changed(body: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``body`` with ``changes`` applied; DROP removes an element, None makes it JSON null."""
    body = {**body, **changes}
    return {k: v for k, v in body.items() if v is not DROP}


@pytest.fixture(scope="module")
def examples() -> list[tuple[str, dict]]:
    return r4_examples()


@pytest.fixture(scope="module")
def structure_definitions(examples) -> dict[str, dict]:
    """The base StructureDefinitions of R4 resources and complex datatypes, by type."""
    return {
        body["type"]: body
        for _, body in examples
        if body["resourceType"] == "StructureDefinition"
        and body.get("derivation") == "specialization"
        and body["kind"] in ("resource", "complex-type")
        and not body.get("abstract")
    }


def patient(**changes: Any) -> dict[str, Any]:
    body = {
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
        "text": {"status": "generated", "div": XHTML},
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}],
        "active": True,
        "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}],
        "telecom": [{"system": "phone", "value": "(03) 5555 6473", "use": "work"}],
        "gender": "male",
        "birthDate": "1974-12-25",
        "address": [{"line": ["534 Erewhon St"], "city": "PleasantVille", "postalCode": "3999"}],
        "multipleBirthInteger": 1,
    }
    return changed(body, changes)


def observation(**changes: Any) -> dict[str, Any]:
    body = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2024-03-01T10:00:00+01:00",
        "valueQuantity": {
            "value": 72.5,
            "unit": "kg",
            "system": "http://unitsofmeasure.org",
            "code": "kg",
        },
    }
    return changed(body, changes)


def medicinal_product(**changes: Any) -> dict[str, Any]:
    """An R4-only resource (dropped in R4B)."""
    body = {
        "resourceType": "MedicinalProduct",
        "id": "mp1",
        "type": {"text": "medicinal product"},
        "name": [
            {
                "productName": "Equilidem 2.5 mg film-coated tablets",
                "namePart": [{"part": "Equilidem", "type": {"code": "INV"}}],
            }
        ],
        "marketingStatus": [
            {
                "country": {"text": "EU"},
                "status": {"text": "active"},
                "dateRange": {"start": "2015-02-07"},
            }
        ],
    }
    return changed(body, changes)


def evidence_r4(**changes: Any) -> dict[str, Any]:
    """Evidence as R4 defines it (R4B redesigned the type)."""
    body = {
        "resourceType": "Evidence",
        "status": "draft",
        "exposureBackground": {"reference": "EvidenceVariable/background"},
        "topic": [{"text": "topic"}],
    }
    return changed(body, changes)


def problems(body: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The OperationOutcome issues validate_resource reports for ``body`` (must fail)."""
    with pytest.raises(InvalidResource) as caught:
        validate_resource(body, **kwargs)
    outcome = caught.value.outcome()
    assert_strict_r4(outcome)  # what we answer with is itself valid R4
    return outcome["issue"]


# --- the R4 type registry ----------------------------------------------------------------------
def test_registry_is_exactly_the_r4_resource_types(structure_definitions):
    spec_types = {t for t, sd in structure_definitions.items() if sd["kind"] == "resource"}
    assert len(spec_types) == 146
    assert spec_types == R4_RESOURCE_TYPES
    assert is_resource_type("Patient") and is_resource_type("MedicinalProduct")
    assert not is_resource_type("Citation") and not is_resource_type("Resource")


def test_r4_and_r4b_type_sets_differ_as_we_think():
    def in_r4b(name: str) -> bool:
        try:
            get_fhir_model_class(name)
        except ValueError:
            return False
        return True

    assert {t for t in R4_RESOURCE_TYPES if not in_r4b(t)} == R4_ONLY
    assert all(in_r4b(t) for t in R4B_ONLY)
    assert not R4B_ONLY & R4_RESOURCE_TYPES
    # Every R4-only type has a table; so do the two types R4B redesigned.
    assert R4_ONLY | {"Evidence", "EvidenceVariable"} <= set(R4_SPEC_STRUCTURES)


def test_element_tables_equal_the_r4_structure_definitions(structure_definitions):
    """Every element of every R4 resource and datatype, as the walk sees it, is the spec's.

    This proves the R4 deltas on top of the R4B models and the R4_SPEC_STRUCTURES table.
    One deliberate difference: the 4.0.1 snapshots type Resource.id as System.String with
    fhir-type "string", while the spec text (resource.html) and the brief make it an ``id``.
    """
    assert len(structure_definitions) == 185
    mismatches = {}
    for type_name, sd in structure_definitions.items():
        expected = spec_table(sd)
        if type_name in R4_RESOURCE_TYPES:
            expected[f"{type_name}.id"] = (0, "1", frozenset({"id"}))
        actual = element_definitions(type_name)
        diff = {
            p: (expected.get(p), actual.get(p))
            for p in expected.keys() | actual.keys()
            if expected.get(p) != actual.get(p)
        }
        if diff:
            mismatches[type_name] = diff
    assert mismatches == {}


def spec_table(sd: dict) -> dict[str, tuple[int, str, frozenset[str]]]:
    """Path -> (min, max, types) from a snapshot, in the form element_definitions uses.

    A contentReference is spelled out like its target, except where it points at an
    enclosing group (recursion), which stays "@" + the path of that group.
    """
    elements = sd["snapshot"]["element"]
    by_path = {e["path"]: e for e in elements}
    children: dict[str, list[dict]] = {}
    for element in elements[1:]:
        children.setdefault(element["path"].rsplit(".", 1)[0], []).append(element)
    table: dict[str, tuple[int, str, frozenset[str]]] = {}

    def emit(spec_parent: str, parent: str, enclosing: dict[str, str]) -> None:
        for element in children.get(spec_parent, []):
            path = f"{parent}.{element['path'].rsplit('.', 1)[1]}"
            cardinality = (element["min"], "1" if element["max"] == "1" else "*")
            ref = element.get("contentReference", "").lstrip("#")
            if ref and ref in enclosing:
                table[path] = (*cardinality, frozenset({"@" + enclosing[ref]}))
                continue
            source = by_path[ref] if ref else element
            types = frozenset(
                next(
                    (x["valueUrl"] for x in t.get("extension", []) if x["url"] == FHIR_TYPE_EXT),
                    t["code"],
                )
                for t in source["type"]
            )
            table[path] = (*cardinality, types)
            if types & {"BackboneElement", "Element"}:
                emit(source["path"], path, {**enclosing, source["path"]: path})

    emit(sd["type"], sd["type"], {sd["type"]: sd["type"]})
    return table


# --- valid content -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        patient(),
        patient(
            deceasedDateTime="2020-02",
            birthDate="1974",
            multipleBirthBoolean=False,
            multipleBirthInteger=DROP,
        ),
        observation(),
        observation(valueQuantity=DROP, valueString="positive", id="a.B-9"),
        medicinal_product(),
        evidence_r4(),
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "quantity": 1,
            "member": [{"entity": {"reference": "Patient/p1"}, "inactive": False}],
        },
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [
                {
                    "fullUrl": "urn:uuid:6f6a2cd4-54a2-4b8b-9f54-7a6e1c1d1e11",
                    "resource": medicinal_product(),
                },
                {"resource": patient()},
                {"resource": evidence_r4()},
            ],
        },
        {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "when", "valueInstant": "2024-01-01T00:00:00.123Z"},
                {"name": "meta", "valueMeta": {"tag": [{"code": "x"}]}},
                {"name": "thing", "resource": medicinal_product()},
            ],
        },
    ],
    ids=[
        "patient",
        "patient-choices",
        "observation",
        "observation-string",
        "r4-only",
        "evidence-r4",
        "group",
        "bundle",
        "parameters",
    ],
)
def test_valid_r4_content_passes(body):
    validate_resource(body)


def test_r4_json_details_pass():
    """Primitive extensions, null placeholders, Meta in extensions (R4 only), and values
    R4 allows but R4B's models refuse: Unicode spaces in codes, whitespace-only strings,
    leap seconds, UUIDs other than version 4."""
    body = patient(
        birthDate=DROP,
        _birthDate={
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                    "valueCode": "unknown",
                }
            ]
        },
        name=[
            {
                "given": ["Peter", None],
                "_given": [
                    None,
                    {
                        "id": "g2",
                        "extension": [{"url": "http://example.org/initial", "valueBoolean": True}],
                    },
                ],
            }
        ],
        extension=[
            {"url": "http://example.org/a", "valueString": "x", "_valueString": {"id": "v"}},
            {"url": "http://example.org/b", "valueMeta": {"versionId": "3"}},
            {"url": "http://example.org/c", "valueCode": "CHEST\u00a0"},
            {"url": "http://example.org/d", "valueDecimal": 1e-7},
            {"url": "http://example.org/e", "valueTime": "23:59:60"},
            {"url": "http://example.org/f", "valueString": "\u00a0"},
            {
                "url": "http://example.org/g",
                "valueUuid": "urn:uuid:00000000-0000-0000-0000-000000000000",
            },
            {"url": "http://example.org/h", "valueBase64Binary": "YWJj\nZGVm"},
            {"url": "http://example.org/i", "valueDateTime": "2024-02-29T00:00:00Z"},
        ],
    )
    validate_resource(body)


def test_skip_elements_leaves_the_roster_to_the_caller():
    group = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "member": [{"entity": "Patient/1"}, {"bogus": 1}],
    }
    assert {i["expression"][0] for i in problems(group)} == {
        "Group.member[0].entity",
        "Group.member[1].bogus",
        "Group.member[1].entity",
    }
    validate_resource(group, skip_elements=frozenset({"member"}))


def test_example_errata_are_accepted_but_only_those():
    """Four required elements the official examples omit; the others stay required."""
    validate_resource(
        {
            "resourceType": "SearchParameter",
            "url": "http://x.org/sp",
            "name": "author",
            "status": "draft",
            "description": "d",
            "code": "author",
            "type": "string",
        }
    )
    validate_resource(
        {
            "resourceType": "Questionnaire",
            "status": "draft",
            "item": [{"type": "display", "text": "hello"}],
        }
    )
    issues = problems(
        {
            "resourceType": "SearchParameter",
            "url": "http://x.org/sp",
            "name": "author",
            "description": "d",
            "code": "author",
            "type": "string",
        }
    )
    assert [(i["code"], i["expression"]) for i in issues] == [
        ("invalid", ["SearchParameter.status"])
    ]


# --- invalid content ---------------------------------------------------------------------------
INVALID = [
    # wrong JSON kinds of primitives (pydantic's lax mode would coerce these)
    (patient(active="true"), "value", "Patient.active"),
    (patient(active=1), "value", "Patient.active"),
    (patient(multipleBirthInteger="2"), "value", "Patient.multipleBirthInteger"),
    (patient(multipleBirthInteger=2.0), "value", "Patient.multipleBirthInteger"),
    (patient(multipleBirthInteger=2**31), "value", "Patient.multipleBirthInteger"),
    (patient(gender=5), "value", "Patient.gender"),
    (observation(valueQuantity={"value": "72.5"}), "value", "Observation.valueQuantity.value"),
    (observation(valueQuantity={"value": True}), "value", "Observation.valueQuantity.value"),
    # lexical forms
    (patient(birthDate="1974-13-01"), "value", "Patient.birthDate"),
    (patient(birthDate="25.12.1974"), "value", "Patient.birthDate"),
    (patient(birthDate="1974-12-25T10:00:00Z"), "value", "Patient.birthDate"),
    (patient(meta={"lastUpdated": "2024-01-01T00:00:00"}), "value", "Patient.meta.lastUpdated"),
    (observation(effectiveDateTime="2024-03-01T10:00"), "value", "Observation.effectiveDateTime"),
    (patient(birthDate="2023-02-29"), "value", "Patient.birthDate"),
    (
        observation(effectiveDateTime="2024-04-31T10:00:00Z"),
        "value",
        "Observation.effectiveDateTime",
    ),
    (patient(photo=[{"data": "YWJjZA="}]), "value", "Patient.photo[0].data"),
    (patient(gender=" male"), "value", "Patient.gender"),
    (patient(gender="ma  le"), "value", "Patient.gender"),
    (patient(gender=""), "value", "Patient.gender"),
    (patient(id="a b"), "value", "Patient.id"),
    (patient(id="x" * 65), "value", "Patient.id"),
    (patient(identifier=[{"system": "urn:oid:1.2 3"}]), "value", "Patient.identifier[0].system"),
    (patient(text={"status": "generated", "div": "plain text"}), "value", "Patient.text.div"),
    (
        patient(extension=[{"url": "http://x.org", "valuePositiveInt": 0}]),
        "value",
        "Patient.extension[0].valuePositiveInt",
    ),
    (
        observation(valueQuantity=DROP, valuePositiveInt=1),
        "structure",
        "Observation.valuePositiveInt",
    ),
    # unknown elements
    (patient(foo=1), "structure", "Patient.foo"),
    (patient(active__ext={"id": "x"}), "structure", "Patient.active__ext"),
    (patient(fhir_comments=["x"]), "structure", "Patient.fhir_comments"),
    (patient(name=[{"family": "x", "nickname": "y"}]), "structure", "Patient.name[0].nickname"),
    (patient(_foo={"id": "x"}), "structure", "Patient._foo"),
    # cardinality and JSON structure
    (patient(name={"family": "x"}), "structure", "Patient.name"),
    (patient(name=[]), "structure", "Patient.name"),
    (patient(name=[{}]), "structure", "Patient.name[0]"),
    (patient(gender=["male"]), "structure", "Patient.gender"),
    (patient(gender=None), "structure", "Patient.gender"),
    (patient(name=[{"given": ["a", None]}]), "structure", "Patient.name[0].given[1]"),
    (
        patient(deceasedBoolean=True, deceasedDateTime="2020"),
        "structure",
        "Patient.deceasedDateTime",
    ),
    (patient(contained=[{"resourceType": "Basic"}]), "required", "Patient.contained[0].code"),
    # missing required elements
    (observation(status=DROP), "required", "Observation.status"),
    ({"resourceType": "Observation", "status": "final"}, "required", "Observation.code"),
    (patient(link=[{"type": "seealso"}]), "required", "Patient.link[0].other"),
    (patient(extension=[{"valueString": "x"}]), "required", "Patient.extension[0].url"),
    # types: R4B-only inside R4 content, R4B-only elements
    (
        patient(contained=[{"resourceType": "Citation", "status": "active"}]),
        "value",
        "Patient.contained[0].resourceType",
    ),
    (
        {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": {"resourceType": "SubscriptionTopic"}}],
        },
        "value",
        "Bundle.entry[0].resource.resourceType",
    ),
    (
        {
            "resourceType": "ActivityDefinition",
            "status": "draft",
            "subjectCanonical": "http://x.org/g",
        },
        "structure",
        "ActivityDefinition.subjectCanonical",
    ),
    (
        patient(extension=[{"url": "http://x.org", "valueCodeableReference": {}}]),
        "structure",
        "Patient.extension[0].valueCodeableReference",
    ),
    (
        {
            "resourceType": "Evidence",
            "status": "draft",
            "variableDefinition": [{"variableRole": {"text": "population"}}],
        },
        "structure",
        "Evidence.variableDefinition",
    ),
    # an R4-only type, validated from the spec table
    (medicinal_product(name=DROP), "required", "MedicinalProduct.name"),
    (
        medicinal_product(name=[{"namePart": [{"part": "x"}]}]),
        "required",
        "MedicinalProduct.name[0].productName",
    ),
    (medicinal_product(type="tablet"), "structure", "MedicinalProduct.type"),
    (
        medicinal_product(marketingStatus=[{"status": {"text": "active"}}]),
        "required",
        "MedicinalProduct.marketingStatus[0].country",
    ),
    (medicinal_product(color="red"), "structure", "MedicinalProduct.color"),
    (medicinal_product(id="no/slashes"), "value", "MedicinalProduct.id"),
    (evidence_r4(exposureBackground=DROP), "required", "Evidence.exposureBackground"),
]


@pytest.mark.parametrize(
    ("body", "code", "expression"),
    INVALID,
    ids=[f"{i:02d}-{row[2]}" for i, row in enumerate(INVALID)],
)
def test_invalid_r4_content_fails(body, code, expression):
    issues = problems(body)
    found = [(i.get("code"), (i.get("expression") or [""])[0]) for i in issues]
    first_code = "invalid"  # the main issue carries the generic code of InvalidResource
    assert (code, expression) in found or (first_code, expression) == found[0], found


def test_unknown_resource_types_are_rejected():
    for name in ("Citation", "SubscriptionStatus", "Foo", "Resource", "DomainResource"):
        issues = problems({"resourceType": name, "id": "x"})
        assert issues[0]["diagnostics"] == f"Unknown resource type: {name}"
        assert issues[0]["details"]["coding"][0]["code"] == "MSG_UNKNOWN_TYPE"
    assert problems({"id": "x"})[0]["expression"] == ["resourceType"]
    assert problems([patient()])[0]["code"] == "invalid"


def test_one_issue_per_problem_with_a_cap():
    body = patient(active="yes", gender=1, birthDate="1974/12/25", foo=True)
    issues = problems(body)
    assert sorted(i["expression"][0] for i in issues) == [
        "Patient.active",
        "Patient.birthDate",
        "Patient.foo",
        "Patient.gender",
    ]
    assert all(i["severity"] == "error" and i["diagnostics"] for i in issues)
    assert issues[0]["details"]["coding"][0]["code"] == "MSG_INVALID_RESOURCE"

    many = patient(name=[{"family": 1} for _ in range(50)])
    issues = problems(many)
    assert len(issues) == MAX_ISSUES + 1
    assert issues[-1]["severity"] == "information"


def test_deeply_nested_content_is_an_error_not_a_crash():
    item: dict[str, Any] = {"linkId": "x", "type": "group"}
    root = {"resourceType": "Questionnaire", "status": "draft", "item": [item]}
    for _ in range(5000):
        child = {"linkId": "x", "type": "group"}
        item["item"] = [child]
        item = child
    assert problems(root)[0]["code"] == "invalid"


def test_model_pass_runs_when_r4b_can_express_the_content(monkeypatch):
    """The R4B model validates shared-type content again; its errors become issues."""
    with_meta = patient(extension=[{"url": "http://x.org", "valueMeta": {"versionId": "1"}}])
    for body in (patient(), medicinal_product(), with_meta):
        validate_resource(body)  # builds the tables before the model lookup is replaced
    real = validation.get_fhir_model_class
    calls = []

    class Refusing:
        @staticmethod
        def model_validate(data):
            calls.append(data["resourceType"])
            real("Patient").model_validate({"resourceType": "Patient", "birthDate": "1-1"})

    monkeypatch.setattr(validation, "get_fhir_model_class", lambda name: Refusing)
    issues = problems(patient())
    assert issues[0]["expression"] == ["Patient.birthDate"]
    assert calls == ["Patient"]
    validate_resource(medicinal_product())  # R4-only: the walk alone decides
    validate_resource(with_meta)  # Meta in an extension: R4 only
    assert calls == ["Patient"]


# --- the official examples ---------------------------------------------------------------------
@pytest.mark.slow
def test_every_official_r4_example_is_valid(examples):
    started = time.monotonic()
    rejected = {}
    for name, body in examples:
        try:
            validate_resource(body)
        except InvalidResource as exc:
            rejected[name] = exc.outcome()["issue"]
    seconds = time.monotonic() - started
    accepted = len(examples) - len(rejected)
    print(
        f"\nvalidate_resource accepted {accepted}/{len(examples)} official R4 examples "
        f"in {seconds:.1f} s"
    )
    assert len(examples) > 5000
    assert set(rejected) <= {ID_TOO_LONG}, {k: v[:3] for k, v in rejected.items()}
    if ID_TOO_LONG in rejected:
        assert [i["expression"] for i in rejected[ID_TOO_LONG]] == [["SearchParameter.id"]]


def test_r4_only_examples_pass_and_their_mutations_fail(examples):
    """The official examples of the R4-only types, which only the spec tables can check."""
    only = [(n, b) for n, b in examples if b["resourceType"] in R4_ONLY | {"Evidence"}]
    assert len(only) >= 10
    for name, body in only:
        validate_resource(body)
        broken = copy.deepcopy(body)
        broken["status" if "status" in broken else "id"] = 17
        assert problems(broken), name


@pytest.mark.skipif(not os.environ.get("FHIR_VALIDATION_TIMING"), reason="timing on request")
def test_print_validation_cost():
    """Not a timed test: prints µs per Patient (FHIR_VALIDATION_TIMING=1 to run)."""
    body = patient()
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        validate_resource(body)
    print(
        f"\nvalidate_resource: {(time.perf_counter() - started) / rounds * 1e6:.0f} µs "
        "per typical Patient"
    )
