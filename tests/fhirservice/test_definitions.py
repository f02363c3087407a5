"""The generated R4 definitions agree with the official package they were generated from.

Re-derives the search parameters of a few types straight from the package's SearchParameter
resources (tests.external) and compares; checks the pinned checksum and that every value set
named by a required binding is listed.
"""

from __future__ import annotations

from fhirservice.fhir import definitions
from tests.external import r4_examples


def _official_search_parameters() -> dict[tuple[str, str], dict]:
    found = {}
    for _name, resource in r4_examples():
        if resource.get("resourceType") != "SearchParameter":
            continue
        if not resource.get("url", "").startswith("http://hl7.org/fhir/SearchParameter/"):
            continue
        if resource.get("experimental"):
            continue  # the examples and the extension parameters
        for base in resource.get("base", []):
            found[(base, resource["code"])] = resource
    return found


def test_the_source_is_pinned():
    assert definitions.source().startswith("hl7.fhir.r4.examples@4.0.1 sha256:")


def test_every_parameter_of_common_types_is_generated_with_its_type_and_url():
    official = _official_search_parameters()
    generated = definitions.search_parameters()
    for resource_type in ("Patient", "Observation", "Encounter", "Condition", "Group"):
        codes = {code for (base, code) in official if base == resource_type}
        assert codes <= set(generated[resource_type]), resource_type
        for code in codes:
            assert generated[resource_type][code]["type"] == official[(resource_type, code)]["type"]
            assert generated[resource_type][code]["url"] == official[(resource_type, code)]["url"]


def test_shared_expressions_are_cut_to_the_type():
    observation_code = definitions.search_parameters()["Observation"]["code"]
    assert observation_code["parts"] == [{"expression": "Observation.code"}]
    patient = definitions.search_parameters()["Observation"]["patient"]
    assert patient["parts"] == [{"expression": "Observation.subject", "resolve_types": ["Patient"]}]


def test_required_bindings_and_their_value_sets():
    patient = definitions.bindings()["Patient"]
    gender_set = patient["required"]["gender"]
    assert gender_set == "http://hl7.org/fhir/ValueSet/administrative-gender"
    assert definitions.value_sets()[gender_set] == {
        "http://hl7.org/fhir/administrative-gender": ["female", "male", "other", "unknown"]
    }
    named = {url for entry in definitions.bindings().values() for url in entry["required"].values()}
    assert named == set(definitions.value_sets())


def test_the_patient_compartment():
    patient = definitions.compartments()["Patient"]
    assert patient["Observation"] == ["subject", "performer"]
    assert "Patient" in patient
