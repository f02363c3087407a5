"""The read-only AuditEvent search over the version history."""

from __future__ import annotations

from tests.access.conftest import TokenClient, create_patient, make_client


def test_the_wildcard_scope_does_not_read_the_audit_trail(org_a: TokenClient) -> None:
    response = org_a.get("/AuditEvent")
    assert response.status == 403
    assert 'scope="system/AuditEvent.s"' in response.headers["WWW-Authenticate"]


def test_audit_events_name_who_did_what_and_stay_in_bounds(
    org_a: TokenClient, org_b: TokenClient
) -> None:
    pid = create_patient(org_a)
    assert org_a.patch(f"/Patient/{pid}", [{"op": "add", "path": "/active", "value": True}])
    assert org_a.delete(f"/Patient/{pid}").status == 204
    create_patient(org_b)
    auditor_a = make_client(organization="org-a", scopes="system/AuditEvent.rs")
    trail = auditor_a.get(f"/AuditEvent?entity=Patient/{pid}")
    assert trail.status == 200
    events = [e["resource"] for e in trail.body["entry"]]
    assert [e["action"] for e in events] == ["D", "U", "C"]  # newest first
    assert {e["agent"][0]["altId"] for e in events} == {org_a.actor}
    assert events[0]["entity"][0]["what"]["reference"] == f"Patient/{pid}/_history/3"
    # org-a's auditor sees nothing of org-b; an operator sees both.
    by_b = auditor_a.get(f"/AuditEvent?altid={org_b.actor}")
    assert by_b.body["total"] == 0
    operator = make_client(all_organizations=True, scopes="system/AuditEvent.s")
    assert operator.get(f"/AuditEvent?altid={org_b.actor}").body["total"] == 1
    deletes = operator.get(f"/AuditEvent?altid={org_a.actor}&action=D")
    assert deletes.body["total"] == 1


def test_audit_search_pages_and_filters_by_date(org_a: TokenClient) -> None:
    for _ in range(3):
        create_patient(org_a)
    auditor = make_client(organization="org-a", scopes="system/AuditEvent.s")
    first = auditor.get(f"/AuditEvent?altid={org_a.actor}&_count=2")
    assert first.body["total"] == 3 and len(first.body["entry"]) == 2
    next_url = next(link["url"] for link in first.body["link"] if link["relation"] == "next")
    second = auditor.get(next_url.split("/4_0_0", 1)[1])
    assert len(second.body["entry"]) == 1
    ids = {e["resource"]["id"] for e in first.body["entry"] + second.body["entry"]}
    assert len(ids) == 3
    assert auditor.get("/AuditEvent?date=lt2000-01-01").body["total"] == 0
    assert auditor.get("/AuditEvent?bogus=1").status == 400


def test_the_audit_trail_cannot_be_written(org_a: TokenClient) -> None:
    writer = make_client(organization="org-a", scopes="system/*.* system/AuditEvent.cruds")
    body = {
        "resourceType": "AuditEvent",
        "type": {"code": "rest"},
        "recorded": "2026-01-01T00:00:00Z",
        "agent": [{"requestor": True}],
        "source": {"observer": {"display": "x"}},
    }
    assert writer.post("/AuditEvent", body).status == 405
    assert writer.put("/AuditEvent/x", {**body, "id": "x"}).status == 405
    assert writer.delete("/AuditEvent/x").status == 405
    assert org_a.post("/AuditEvent", body).status == 405
    assert TokenClient(None).post("/AuditEvent", body).status == 401
