"""Organization boundaries: marking, shared data, conditional matching, rosters, audit fields."""

from __future__ import annotations

import pytest

from fhirservice.access.boundaries import ORGANIZATION_SYSTEM
from fhirservice.models import ResourceVersion, StoredResource
from groups.models import MemberOutbox
from groups.repository import MemberEventRepository
from groups.selectors import roster_key
from tests.access.conftest import (
    TokenClient,
    create_group,
    create_patient,
    make_client,
    new_identifier,
    parameters,
)


def org_codings(body: dict) -> list[dict]:
    return [
        c
        for c in body.get("meta", {}).get("security", [])
        if c.get("system") == ORGANIZATION_SYSTEM
    ]


def test_resources_carry_their_organization_and_clients_cannot_forge_it(
    org_a: TokenClient,
) -> None:
    forged = {"system": ORGANIZATION_SYSTEM, "code": "org-b"}
    other = {"system": "urn:other", "code": "kept"}
    created = org_a.post(
        "/Patient", {"resourceType": "Patient", "meta": {"security": [forged, other]}}
    )
    assert created.status == 201
    assert org_codings(created.body) == [{"system": ORGANIZATION_SYSTEM, "code": "org-a"}]
    assert other in created.body["meta"]["security"]
    pid = created.body["id"]
    assert StoredResource.objects.get(key=f"Patient/{pid}").organization == "org-a"
    stripped = org_a.patch(
        f"/Patient/{pid}",
        [
            {"op": "remove", "path": "/meta/security"},
            {"op": "add", "path": "/active", "value": True},
        ],
    )
    assert stripped.status == 200
    assert org_codings(stripped.body) == [{"system": ORGANIZATION_SYSTEM, "code": "org-a"}]
    replaced = org_a.put(
        f"/Patient/{pid}",
        {"resourceType": "Patient", "id": pid, "meta": {"security": [forged]}, "active": True},
    )
    assert replaced.status == 200
    assert org_codings(replaced.body) == [{"system": ORGANIZATION_SYSTEM, "code": "org-a"}]
    assert replaced.body["meta"]["versionId"] == "2"  # the forged coding changed nothing
    assert set(
        ResourceVersion.objects.filter(resource_id=pid).values_list("organization", flat=True)
    ) == {"org-a"}


def test_update_as_create_cannot_take_over_another_organizations_id(
    org_a: TokenClient, org_b: TokenClient
) -> None:
    pid = create_patient(org_a)
    taken = org_b.put(f"/Patient/{pid}", {"resourceType": "Patient", "id": pid})
    assert taken.status == 404
    assert org_a.delete(f"/Patient/{pid}").status == 204
    # Deleted, the id still belongs to org-a: no re-create by org-b, and no 410 either.
    assert org_b.put(f"/Patient/{pid}", {"resourceType": "Patient", "id": pid}).status == 404
    assert org_b.get(f"/Patient/{pid}").status == 404
    assert org_a.get(f"/Patient/{pid}").status == 410
    recreated = org_a.put(f"/Patient/{pid}", {"resourceType": "Patient", "id": pid})
    assert recreated.status == 201


def test_shared_resources_are_seen_by_every_organization(
    org_a: TokenClient, org_b: TokenClient
) -> None:
    # Created by an unrestricted caller (a staff user, a command): no organization.
    operator = make_client(all_organizations=True)
    shared = create_patient(operator)
    assert org_codings(org_a.get(f"/Patient/{shared}").body) == []
    assert org_b.get(f"/Patient/{shared}").status == 200
    # Both organizations put the shared Patient in a Group of their own.
    ga = create_group(org_a, [f"Patient/{shared}"])
    gb = create_group(org_b, [f"Patient/{shared}"])
    for client, own, foreign in ((org_a, ga, gb), (org_b, gb, ga)):
        found = client.get(f"/Group?member=Patient/{shared}")
        assert [e["resource"]["id"] for e in found.body["entry"]] == [own]
        memberships = client.get(f"/Patient/{shared}/$group-memberships")
        assert [e["resource"]["id"] for e in memberships.body["entry"]] == [own]
        assert client.get(f"/Group/{foreign}/$members").status == 404
    # The operator sees both.
    assert operator.get(f"/Group?member=Patient/{shared}").body["total"] == 2


def test_conditional_create_never_matches_another_organizations_resource(
    org_a: TokenClient, org_b: TokenClient
) -> None:
    identifier = new_identifier()
    pid = create_patient(org_a, identifier)
    condition = f"identifier={identifier['system']}|{identifier['value']}"
    body = {"resourceType": "Patient", "identifier": [identifier]}
    again = org_a.post("/Patient", body, headers={"If-None-Exist": condition})
    assert (again.status, again.body["id"]) == (200, pid)
    theirs = org_b.post("/Patient", body, headers={"If-None-Exist": condition})
    assert theirs.status == 201 and theirs.body["id"] != pid


def test_transaction_conditional_references_stay_in_bounds(
    org_a: TokenClient, org_b: TokenClient
) -> None:
    identifier = new_identifier()
    create_patient(org_a, identifier)
    reference = f"Patient?identifier={identifier['system']}|{identifier['value']}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Group",
                    "type": "person",
                    "actual": True,
                    "member": [{"entity": {"reference": reference}}],
                },
                "request": {"method": "POST", "url": "Group"},
            }
        ],
    }
    assert org_a.post("", bundle).status == 200
    assert org_b.post("", bundle).status == 412  # matches nothing org-b can see
    no_search = make_client(organization="org-a", scopes="system/Group.c")
    denied = no_search.post("", bundle)
    assert denied.status == 403
    assert denied.detail_codes() == ["MSG_INSUFFICIENT_SCOPE"]


def test_operations_match_only_visible_patients(org_a: TokenClient, org_b: TokenClient) -> None:
    identifier = new_identifier()
    pid = create_patient(org_a, identifier)
    gb = create_group(org_b, [])
    by_identifier = org_b.post(
        f"/Group/{gb}/$add-member",
        parameters({"name": "identifier", "valueIdentifier": identifier}),
    )
    assert by_identifier.status == 404
    dto = {"resourceType": "Patient", "identifier": [identifier]}
    by_dto = org_b.post(
        f"/Group/{gb}/$add-member", parameters({"name": "patient", "resource": dto})
    )
    assert by_dto.status == 200, by_dto
    member = by_dto.body["parameter"][0]["valueReference"]["reference"]
    assert member != f"Patient/{pid}"
    assert StoredResource.objects.get(key=member).organization == "org-b"


def test_transfer_needs_both_groups_in_bounds(org_a: TokenClient, org_b: TokenClient) -> None:
    pid = create_patient(org_a)
    ga = create_group(org_a, [f"Patient/{pid}"])
    gb = create_group(org_b, [])
    response = org_a.post(
        "/Group/$transfer-member",
        parameters(
            {"name": "source", "valueReference": {"reference": f"Group/{ga}"}},
            {"name": "target", "valueReference": {"reference": f"Group/{gb}"}},
            {"name": "member", "valueReference": {"reference": f"Patient/{pid}"}},
        ),
    )
    assert response.status == 404


def test_system_history_lists_only_types_the_client_may_search(org_a: TokenClient) -> None:
    create_patient(org_a)
    create_group(org_a, [])
    patients_only = make_client(organization="org-a", scopes="system/Patient.rs")
    history = patients_only.get("/_history?_count=1000")
    assert history.status == 200
    types = {e["fullUrl"].split("/")[-2] for e in history.body["entry"]}
    assert types == {"Patient"}


def test_versions_and_outbox_name_the_actor_and_request(org_a: TokenClient) -> None:
    created = org_a.post(
        "/Patient", {"resourceType": "Patient"}, headers={"X-Request-ID": "req-access-1"}
    )
    version = ResourceVersion.objects.get(key=f"Patient/{created.body['id']}/_history/1")
    assert (version.actor, version.request_id) == (org_a.actor, "req-access-1")
    gid = create_group(org_a, [f"Patient/{created.body['id']}"])
    batch = MemberOutbox.objects.filter(roster_key=roster_key(gid, 1)).first()
    assert batch.actor == org_a.actor


def test_transaction_entries_run_as_the_bundles_caller(org_b: TokenClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:4f1c7a52-5b7e-4a43-9a55-3f2b1f1d2c11",
                "resource": {"resourceType": "Patient"},
                "request": {"method": "POST", "url": "Patient"},
            }
        ],
    }
    response = org_b.post("", bundle, headers={"X-Request-ID": "req-bundle-1"})
    assert response.status == 200
    location = response.body["entry"][0]["response"]["location"]
    pid = location.split("/Patient/")[1].split("/")[0]
    version = ResourceVersion.objects.get(key=f"Patient/{pid}/_history/1")
    assert (version.actor, version.organization, version.request_id) == (
        org_b.actor,
        "org-b",
        "req-bundle-1",
    )


@pytest.mark.django_db(transaction=True)
def test_clickhouse_member_events_name_the_actor() -> None:
    client = make_client(organization="org-a")
    gid = create_group(client, ["Patient/ch-actor-1"])
    response = client.patch(
        f"/Group/{gid}",
        [{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/ch-2"}}}],
        headers={"X-Request-ID": "req-member-2"},
    )
    assert response.status == 200
    events = MemberEventRepository().events(roster_key(gid, 1))
    assert {e["actor"] for e in events} == {client.actor}
    assert "req-member-2" in {e["request_id"] for e in events}
