"""OperationDefinitions of the built-in operations: read by their documented ids, searched.

Each registered operation's definition is served at ``OperationDefinition/[type]-[code]``
(``System-[code]`` at system level) and ``GET OperationDefinition`` finds it by ``_id``,
``url``, ``code`` or ``name`` (no parameters: all of them), ahead of stored
OperationDefinitions, in one searchset Bundle.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.operations.test_framework import ALSO_SERVED, CONTRACT

BUILT_IN = sorted([*CONTRACT, *ALSO_SERVED])
DOCS = Path(__file__).resolve().parents[2] / "docs" / "development" / "adding-an-operation.md"


def _ids(response) -> list[str]:
    assert response.status == 200, response
    assert response.body["resourceType"] == "Bundle"
    assert response.body["type"] == "searchset"
    return sorted(entry["resource"]["id"] for entry in response.body.get("entry", []))


def test_search_without_parameters_finds_every_built_in_definition(api):
    response = api.get("/OperationDefinition")
    assert _ids(response) == BUILT_IN
    assert response.body["total"] == len(BUILT_IN)
    for entry in response.body["entry"]:
        assert entry["search"]["mode"] == "match"
        assert entry["fullUrl"].endswith(f"/OperationDefinition/{entry['resource']['id']}")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("code=add-member", ["Group-add-member"]),
        ("code=members", ["Group-members"]),
        ("code=add-member,remove-member", ["Group-add-member", "Group-remove-member"]),
        ("_id=Group-transfer-member", ["Group-transfer-member"]),
        (
            "url=urn:fhirservice:OperationDefinition:Patient-group-memberships",
            ["Patient-group-memberships"],
        ),
        ("name=addmember", ["Group-add-member"]),  # string search: case-insensitive prefix
        ("name=Transfer", ["Group-transfer-member"]),
        ("name:exact=Createroster", ["Group-create-roster"]),
        ("code=add-member&name=Remove", []),  # every parameter must match
        ("code=no-such-operation", []),
        ("_id=add-member", []),  # the id names the type: Group-add-member
    ],
)
def test_search_by_id_url_code_or_name(api, query, expected):
    assert _ids(api.get(f"/OperationDefinition?{query}")) == expected


def test_found_definition_is_the_one_read_by_its_id(api):
    found = api.get("/OperationDefinition?code=add-member").body["entry"][0]["resource"]
    assert found == api.get("/OperationDefinition/Group-add-member").body


def test_count_only_and_total(api):
    response = api.get("/OperationDefinition?_summary=count")
    assert response.status == 200, response
    assert response.body["total"] == len(BUILT_IN)
    assert "entry" not in response.body
    response = api.get("/OperationDefinition?code=members&_count=0")
    assert response.body["total"] == 1
    assert "entry" not in response.body


def test_stored_definitions_are_found_after_the_built_in_ones(api):
    stored = {
        "resourceType": "OperationDefinition",
        "id": "stored-echo",
        "url": "urn:test:OperationDefinition:stored-echo",
        "name": "StoredEcho",
        "status": "active",
        "kind": "operation",
        "code": "stored-echo",
        "system": True,
        "type": False,
        "instance": False,
    }
    assert api.put("/OperationDefinition/stored-echo", stored).status == 201
    response = api.get("/OperationDefinition")
    ids = [entry["resource"]["id"] for entry in response.body["entry"]]
    assert ids[-1] == "stored-echo"
    assert sorted(ids[:-1]) == BUILT_IN
    assert response.body["total"] == len(BUILT_IN) + 1
    assert _ids(api.get("/OperationDefinition?code=stored-echo")) == ["stored-echo"]


def test_every_built_in_id_is_documented():
    text = DOCS.read_text()
    for op_id in BUILT_IN:
        assert f"OperationDefinition/{op_id}" in text, op_id
