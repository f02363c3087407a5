"""The JSON Patch test cases of the ``jsonpatch`` sdist (``tests.js``), held against our PATCH.

The 80 cases are data we did not write (see ``tests.external.jsonpatch_cases``). Each has a
``doc``, a ``patch`` and either the ``expected`` result, an ``error`` (the patch must fail) or
neither (it must apply). How they map onto a FHIR server:

- A resource body is a JSON object whose keys are elements of its type. The cases' documents
  use keys such as ``foo`` and ``baz``, so almost none can be stored as a resource. A case
  *fits a resource body* when ``{"resourceType": "Patient", "id": …, **doc}`` and, for a
  success case, the same around ``expected`` are valid R4 by fhirclient's strict models (an
  independent judge). Those cases run through the HTTP API: PUT the document, PATCH it, and
  compare what the server stores with the case.
- A case whose patch document itself is malformed by RFC 6902 §4 (an unknown op, ``add`` /
  ``replace`` / ``test`` without ``value``, ``move`` / ``copy`` without ``from``) fails the
  same way on any document, so it runs through HTTP against a stored Patient: 400
  ``MSG_PATCH_INVALID`` and nothing changed.
- Every other case whose document is a JSON object runs on the server's patch engine,
  ``fhirservice.store.content.apply_json_patch``, which PATCH applies to the stored body:
  same result as the case, or a 4xx error (422 ``MSG_PATCH_FAILED``) that leaves the input
  document untouched.
- Not applicable: the 3 cases upstream disables, and cases whose document or result is not a
  JSON object (arrays and scalars cannot be resource bodies).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fhirservice.errors import FhirError
from fhirservice.store.content import apply_json_patch
from tests.external import jsonpatch_cases
from tests.fhir_check import strict_r4_errors
from tests.fhirservice.test_api_errors import assert_outcome, row_counts

CASES = jsonpatch_cases()
REQUIRED_MEMBER = {
    "add": "value",
    "replace": "value",
    "test": "value",
    "move": "from",
    "copy": "from",
}


def malformed(patch: list[dict[str, Any]]) -> bool:
    """Whether the patch document breaks RFC 6902 §4 (whatever document it is applied to)."""
    for op in patch:
        name = op.get("op")
        if name not in (*REQUIRED_MEMBER, "remove") or "path" not in op:
            return True
        if name in REQUIRED_MEMBER and REQUIRED_MEMBER[name] not in op:
            return True
    return False


def as_patient(index: int, doc: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"jsonpatch-{index}", **doc}


def fits_a_resource_body(index: int, case: dict[str, Any]) -> bool:
    if not isinstance(case["doc"], dict) or strict_r4_errors(as_patient(index, case["doc"])):
        return False
    expected = case.get("expected", case["doc"])
    return "error" in case or (
        isinstance(expected, dict) and not strict_r4_errors(as_patient(index, expected))
    )


def classify(index: int, case: dict[str, Any]) -> str:
    """How a case runs: http, http-malformed, engine or not-applicable."""
    if case.get("disabled"):
        return "not-applicable"
    if malformed(case["patch"]):
        return "http-malformed"
    if fits_a_resource_body(index, case):
        return "http"
    if isinstance(case["doc"], dict) and isinstance(case.get("expected", {}), dict):
        return "engine"
    return "not-applicable"


KINDS = {index: classify(index, case) for index, case in enumerate(CASES)}


def cases_of(*kinds: str) -> list[Any]:
    return [
        pytest.param(index, id=f"case{index:02d}-{CASES[index].get('comment', '')[:40]}")
        for index, kind in KINDS.items()
        if kind in kinds
    ]


def test_the_cases_split_as_documented():
    counts = {kind: list(KINDS.values()).count(kind) for kind in set(KINDS.values())}
    print(f"jsonpatch tests.js: {len(CASES)} cases, {counts}")
    assert len(CASES) == 80
    assert counts == {"http": 1, "http-malformed": 7, "engine": 43, "not-applicable": 29}
    # 13 of the 22 expected errors apply: 7 malformed patches, 6 failures on object documents.
    assert sum("error" in CASES[i] for i, k in KINDS.items() if k != "not-applicable") == 13


@pytest.mark.parametrize("index", cases_of("engine", "http"))
def test_case_on_the_patch_engine(index):
    case = copy.deepcopy(CASES[index])
    document = copy.deepcopy(case["doc"])
    if "error" in case:
        with pytest.raises(FhirError) as info:
            apply_json_patch(document, case["patch"])
        error = info.value
        assert (error.status, error.detail_code) == (422, "MSG_PATCH_FAILED"), case["error"]
    else:
        result = apply_json_patch(document, case["patch"])
        assert result == case.get("expected", case["doc"]), case.get("comment")
    assert document == case["doc"], "the input document was changed"


@pytest.mark.parametrize("index", cases_of("http-malformed"))
def test_malformed_case_is_400_on_the_engine_and_through_http(api, index):
    case = copy.deepcopy(CASES[index])
    with pytest.raises(FhirError) as info:
        apply_json_patch({"resourceType": "Patient", "id": "x"}, case["patch"])
    assert (info.value.status, info.value.detail_code) == (400, "MSG_PATCH_INVALID")

    path = f"/Patient/jsonpatch-{index}"
    stored = api.put(path, as_patient(index, {"gender": "male"}))
    assert stored.status == 201
    before = row_counts()
    assert_outcome(api.patch(path, case["patch"]), 400, "MSG_PATCH_INVALID")
    assert row_counts() == before
    assert api.get(path).body == stored.body


@pytest.mark.parametrize("index", cases_of("http"))
def test_case_through_http_patch(api, index):
    case = copy.deepcopy(CASES[index])
    path = f"/Patient/jsonpatch-{index}"
    stored = api.put(path, as_patient(index, case["doc"]))
    assert stored.status == 201
    before = row_counts()
    response = api.patch(path, case["patch"])
    if "error" in case:
        assert 400 <= response.status < 500
        assert response.body["resourceType"] == "OperationOutcome"
        assert row_counts() == before
        assert api.get(path).body == stored.body
        return
    assert response.status == 200, response
    expected = as_patient(index, case.get("expected", case["doc"]))
    body = {k: v for k, v in response.body.items() if k != "meta"}
    assert body == expected
    changed = expected != as_patient(index, case["doc"])
    assert response.etag == ('W/"2"' if changed else 'W/"1"')
    assert api.get(path).body == response.body
