"""PATCH with JSON Patch (RFC 6902) through the HTTP API.

Every op on real FHIR elements, ``If-Match``, and the error cases: a failing ``test``, a bad
path, a malformed patch document, a result that is not valid R4 or changes the resource's
identity. On every error nothing changes: same versionId, same body, same rows.
"""

from __future__ import annotations

import pytest

from fhirservice.errors import MSG_VERSION_MISMATCH
from fhirservice.store.content import MSG_PATCH_CHANGES_IDENTITY
from tests.fhirservice.test_api_errors import assert_outcome, row_counts
from tests.support import patient


@pytest.fixture
def stored(api):
    """A stored Patient with two given names and an identifier, and the rows after storing."""
    body = api.post(
        "/Patient",
        patient(
            given="Peter",
            identifier=[{"system": "urn:sys", "value": "1"}],
            name=[{"family": "Chalmers", "given": ["Peter", "James"]}],
        ),
    ).body
    return {"body": body, "path": f"/Patient/{body['id']}", "counts": row_counts()}


def assert_unchanged(api, stored):
    assert row_counts() == stored["counts"]
    current = api.get(stored["path"])
    assert current.etag == 'W/"1"'
    assert current.body == stored["body"]


def patched(api, stored, ops, **kwargs):
    response = api.patch(stored["path"], ops, **kwargs)
    assert response.status == 200, response
    assert response.etag == 'W/"2"'
    assert response.body["meta"]["versionId"] == "2"
    assert api.get(stored["path"]).body == response.body
    return response.body


# --- the six ops -------------------------------------------------------------------------


def test_add_a_new_element(api, stored):
    body = patched(api, stored, [{"op": "add", "path": "/gender", "value": "female"}])
    assert body["gender"] == "female"
    assert body["name"] == stored["body"]["name"]


def test_add_appends_and_inserts_into_arrays(api, stored):
    body = patched(
        api,
        stored,
        [
            {"op": "add", "path": "/name/0/given/-", "value": "Last"},
            {"op": "add", "path": "/name/0/given/0", "value": "First"},
        ],
    )
    assert body["name"][0]["given"] == ["First", "Peter", "James", "Last"]


def test_remove(api, stored):
    body = patched(api, stored, [{"op": "remove", "path": "/name/0/given/0"}])
    assert body["name"][0]["given"] == ["James"]
    body = api.patch(stored["path"], [{"op": "remove", "path": "/identifier"}]).body
    assert "identifier" not in body


def test_replace(api, stored):
    body = patched(api, stored, [{"op": "replace", "path": "/name/0/family", "value": "Jones"}])
    assert body["name"][0] == {"family": "Jones", "given": ["Peter", "James"]}


def test_move_and_copy(api, stored):
    body = patched(
        api,
        stored,
        [
            {"op": "move", "from": "/name/0/given/0", "path": "/name/0/given/-"},
            {"op": "copy", "from": "/name/0", "path": "/name/-"},
            {"op": "replace", "path": "/name/1/family", "value": "Copy"},
        ],
    )
    assert body["name"] == [
        {"family": "Chalmers", "given": ["James", "Peter"]},
        {"family": "Copy", "given": ["James", "Peter"]},
    ]


def test_passing_tests_guard_the_following_ops(api, stored):
    body = patched(
        api,
        stored,
        [
            {"op": "test", "path": "/name/0/family", "value": "Chalmers"},
            {"op": "test", "path": "/identifier/0", "value": {"value": "1", "system": "urn:sys"}},
            {"op": "add", "path": "/active", "value": True},
        ],
    )
    assert body["active"] is True


def test_replacing_the_whole_document_keeps_identity(api, stored):
    rid = stored["body"]["id"]
    body = patched(
        api,
        stored,
        [{"op": "replace", "path": "", "value": {"resourceType": "Patient", "id": rid}}],
    )
    assert set(body) == {"resourceType", "id", "meta"}


# --- no change, If-Match -----------------------------------------------------------------


@pytest.mark.parametrize(
    "ops",
    [
        [],
        [{"op": "test", "path": "/name/0/family", "value": "Chalmers"}],
        [{"op": "replace", "path": "/name/0/family", "value": "Chalmers"}],
        [
            {"op": "add", "path": "/gender", "value": "male"},
            {"op": "remove", "path": "/gender"},
        ],
    ],
)
def test_a_patch_that_changes_nothing_makes_no_version(api, stored, ops):
    response = api.patch(stored["path"], ops)
    assert response.status == 200
    assert response.etag == 'W/"1"'
    assert response.body == stored["body"]
    assert_unchanged(api, stored)


def test_patch_with_a_matching_if_match(api, stored):
    ops = [{"op": "add", "path": "/gender", "value": "male"}]
    patched(api, stored, ops, headers={"If-Match": 'W/"1"'})


def test_patch_with_a_stale_if_match_is_412_and_changes_nothing(api, stored):
    ops = [{"op": "add", "path": "/gender", "value": "male"}]
    response = api.patch(stored["path"], ops, headers={"If-Match": 'W/"2"'})
    issue = assert_outcome(response, 412, "MSG_VERSION_MISMATCH")
    assert issue["diagnostics"] == MSG_VERSION_MISMATCH.format(expected=2, current=1)
    assert_unchanged(api, stored)


def test_patch_with_a_malformed_if_match_is_400(api, stored):
    ops = [{"op": "add", "path": "/gender", "value": "male"}]
    response = api.patch(stored["path"], ops, headers={"If-Match": "yesterday"})
    assert_outcome(response, 400, "MSG_BAD_IF_MATCH")
    assert_unchanged(api, stored)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ops",
    [
        pytest.param([{"op": "test", "path": "/name/0/family", "value": "Jones"}], id="test"),
        pytest.param([{"op": "test", "path": "/gender", "value": "male"}], id="test-missing"),
        pytest.param(
            [
                {"op": "add", "path": "/gender", "value": "male"},
                {"op": "test", "path": "/name/0/given", "value": ["James", "Peter"]},
            ],
            id="test-after-add",
        ),
        pytest.param([{"op": "remove", "path": "/birthDate"}], id="remove-missing"),
        pytest.param([{"op": "replace", "path": "/gender", "value": "male"}], id="replace-missing"),
        pytest.param(
            [{"op": "replace", "path": "/name/5/family", "value": "X"}], id="index-too-high"
        ),
        pytest.param([{"op": "add", "path": "/name/9", "value": {"family": "X"}}], id="add-gap"),
        pytest.param([{"op": "add", "path": "/name/x", "value": {"family": "X"}}], id="bad-index"),
        pytest.param([{"op": "add", "path": "/name/-1", "value": {"family": "X"}}], id="negative"),
        pytest.param(
            [{"op": "add", "path": "/name/0/family/x", "value": "X"}], id="into-a-primitive"
        ),
        pytest.param(
            [{"op": "add", "path": "/contact/0/gender", "value": "male"}], id="missing-parent"
        ),
        pytest.param([{"op": "move", "from": "/gender", "path": "/x"}], id="move-missing"),
        pytest.param([{"op": "copy", "from": "/name/3", "path": "/name/-"}], id="copy-missing"),
    ],
)
def test_failing_tests_and_bad_paths_are_422_and_change_nothing(api, stored, ops):
    issue = assert_outcome(api.patch(stored["path"], ops), 422, "MSG_PATCH_FAILED")
    assert issue["code"] == "processing"
    assert issue["diagnostics"].startswith("The patch could not be applied: ")
    assert_unchanged(api, stored)


@pytest.mark.parametrize(
    "ops",
    [
        pytest.param({"op": "add", "path": "/gender", "value": "male"}, id="object"),
        pytest.param("add gender", id="string"),
        pytest.param([["add", "/gender", "male"]], id="array-of-arrays"),
        pytest.param([{"op": "spam", "path": "/gender", "value": "male"}], id="unknown-op"),
        pytest.param([{"path": "/gender", "value": "male"}], id="no-op"),
        pytest.param([{"op": "add", "value": "male"}], id="no-path"),
        pytest.param([{"op": "add", "path": "gender", "value": "male"}], id="relative-path"),
        pytest.param([{"op": "add", "path": "/gender"}], id="add-without-value"),
        pytest.param([{"op": "replace", "path": "/gender"}], id="replace-without-value"),
        pytest.param([{"op": "test", "path": "/gender"}], id="test-without-value"),
        pytest.param([{"op": "copy", "path": "/name/-"}], id="copy-without-from"),
        pytest.param([{"op": "move", "path": "/name/-"}], id="move-without-from"),
        pytest.param(
            [
                {"op": "add", "path": "/gender", "value": "male"},
                {"op": "frobnicate", "path": "/gender"},
            ],
            id="valid-then-invalid",
        ),
    ],
)
def test_a_malformed_patch_document_is_400_and_changes_nothing(api, stored, ops):
    issue = assert_outcome(api.patch(stored["path"], ops), 400, "MSG_PATCH_INVALID")
    assert issue["code"] == "invalid"
    assert issue["diagnostics"].startswith("Not a valid JSON Patch document: ")
    assert_unchanged(api, stored)


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "add", "path": "/gender", "value": 5}],
        [{"op": "add", "path": "/shoeSize", "value": 42}],
        [{"op": "add", "path": "/birthDate", "value": "25.12.1974"}],
        [{"op": "replace", "path": "/name/0/given", "value": "Peter"}],
        [{"op": "add", "path": "/name/0/family", "value": None}],
        [{"op": "remove", "path": "/identifier/0"}],  # leaves an empty array
    ],
)
def test_a_patch_whose_result_is_not_valid_r4_is_400(api, stored, ops):
    issue = assert_outcome(api.patch(stored["path"], ops), 400, "MSG_INVALID_RESOURCE")
    assert issue["code"] in ("invalid", "structure", "required", "value")
    assert_unchanged(api, stored)


@pytest.mark.parametrize(
    "ops",
    [
        [{"op": "replace", "path": "/id", "value": "other"}],
        [{"op": "remove", "path": "/id"}],
        [{"op": "replace", "path": "/resourceType", "value": "Person"}],
        [{"op": "replace", "path": "", "value": {"resourceType": "Patient", "id": "other"}}],
    ],
)
def test_a_patch_must_not_change_identity(api, stored, ops):
    issue = assert_outcome(api.patch(stored["path"], ops), 422, "MSG_PATCH_FAILED")
    assert issue["diagnostics"] == MSG_PATCH_CHANGES_IDENTITY
    assert_unchanged(api, stored)


def test_patch_of_unknown_or_deleted_resources(api, stored):
    ops = [{"op": "add", "path": "/gender", "value": "male"}]
    assert_outcome(api.patch("/Patient/nobody", ops), 404, "MSG_NO_EXIST")
    assert_outcome(api.patch("/Nothing/x", ops), 404, "MSG_UNKNOWN_TYPE")
    assert_outcome(api.patch("/Patient/bad_id", ops), 400, "MSG_ID_INVALID")
    assert api.delete(stored["path"]).status == 204
    before = row_counts()
    assert_outcome(api.patch(stored["path"], ops), 410, "MSG_DELETED")
    assert row_counts() == before
