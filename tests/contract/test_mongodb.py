"""Contract tests for the MongoDB metadata store (django-mongodb-backend).

No MongoDB server installs on our build machines, so this module runs only where
``MONGODB_URI`` points at a replica set (settings then switch the whole session to MongoDB)
and is reported as skipped everywhere else. It exercises the portable core of the store:
compare-and-set versioning, history, search tokens, the outbox in the same transaction, and
all-or-nothing transactions.
"""

from __future__ import annotations

import os

import pytest
from django.db import connection

from tests.support import FhirClient, patient

pytestmark = [
    pytest.mark.mongodb,
    pytest.mark.skipif(
        not os.environ.get("MONGODB_URI"),
        reason="MONGODB_URI is not set: no MongoDB server to test against",
    ),
]


@pytest.fixture
def mongo_api(transactional_db: None) -> FhirClient:
    assert connection.vendor == "mongodb"
    return FhirClient()


def test_versions_history_and_if_match(mongo_api: FhirClient) -> None:
    created = mongo_api.post("/Patient", patient())
    assert created.status == 201 and created.etag == 'W/"1"'
    pid = created.body["id"]
    ops = [{"op": "replace", "path": "/gender", "value": "female"}]
    assert mongo_api.patch(f"/Patient/{pid}", ops, headers={"If-Match": 'W/"1"'}).status == 200
    stale = mongo_api.patch(f"/Patient/{pid}", ops, headers={"If-Match": 'W/"1"'})
    assert stale.status == 412
    history = mongo_api.get(f"/Patient/{pid}/_history")
    assert [e["resource"]["meta"]["versionId"] for e in history.body["entry"]] == ["2", "1"]


def test_search_tokens(mongo_api: FhirClient) -> None:
    mongo_api.post(
        "/Patient", patient(family="Mongo", identifier=[{"system": "urn:t", "value": "m-1"}])
    )
    found = mongo_api.get("/Patient?identifier=urn:t|m-1&family=mon")
    assert found.body["total"] == 1


def test_transaction_is_all_or_nothing(mongo_api: FhirClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient(family="Kept"), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {"resourceType": "Patient", "gender": 5},
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }
    assert mongo_api.post("", bundle).status == 400
    assert mongo_api.get("/Patient?family=kept").body["total"] == 0


def test_group_roster_outbox_commits_with_the_version(mongo_api: FhirClient) -> None:
    group = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": "Patient/c1"}}],
    }
    created = mongo_api.post("/Group", group)
    gid = created.body["id"]
    ops = [{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/c2"}}}]
    assert mongo_api.patch(f"/Group/{gid}", ops).status == 200
    read = mongo_api.get(f"/Group/{gid}")
    assert read.body["quantity"] == 2
    assert [m["entity"]["reference"] for m in read.body["member"]] == ["Patient/c1", "Patient/c2"]
