"""``Patient/[id]/$group-memberships``: the Groups a Patient is an active member of.

Read-only, so GET is allowed (POST with a Parameters body too). The answer is a searchset
Bundle of the current Groups where the Patient is present and not inactive, whether the
member events are still pending in the outbox or already shipped to ClickHouse.
"""

from __future__ import annotations

from tests.operations.conftest import (
    add_member,
    assert_error,
    create_group,
    create_patient,
    ident,
    new_identifier,
    parameters,
    ref,
    remove_member,
    text,
    transfer,
)


def memberships(api, pid: str, method: str = "GET"):
    """The ``$group-memberships`` response (200 required)."""
    path = f"/{pid}/$group-memberships"
    response = api.get(path) if method == "GET" else api.post(path, parameters())
    assert response.status == 200, response
    return response


def group_ids(response) -> list[str]:
    """Ids of the Groups in a memberships Bundle, in served order."""
    return [e["resource"]["id"] for e in response.body.get("entry", [])]


def test_groups_of_a_patient(any_api):
    api = any_api
    pid, other = create_patient(api), create_patient(api)
    a = create_group(api, [pid, other], name="A")
    b = create_group(api, [pid], name="B")
    create_group(api, [other], name="C")
    response = memberships(api, pid)
    body = response.body
    assert body["resourceType"] == "Bundle"
    assert body["type"] == "searchset"
    assert body["total"] == 2
    assert sorted(group_ids(response)) == sorted([a, b])
    assert group_ids(response) == sorted([a, b])
    for entry in body["entry"]:
        assert entry["search"] == {"mode": "match"}
        assert entry["fullUrl"] == f"http://testserver/4_0_0/Group/{entry['resource']['id']}"
        assert entry["resource"]["resourceType"] == "Group"
        assert entry["resource"]["meta"]["versionId"] == "1"


def test_post_gives_the_same_answer(any_api):
    api = any_api
    pid = create_patient(api)
    gid = create_group(api, [pid])
    assert group_ids(memberships(api, pid, "POST")) == [gid]


def test_patient_in_no_group(api):
    pid = create_patient(api)
    create_group(api, [create_patient(api)])
    response = memberships(api, pid)
    assert response.body == {"resourceType": "Bundle", "type": "searchset", "total": 0}


def test_follows_operations(any_api):
    api = any_api
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    a, b = create_group(api), create_group(api)
    assert add_member(api, a, ident(identifier)).status == 200
    assert group_ids(memberships(api, pid)) == [a]
    assert transfer(api, a, b, ident(identifier)).status == 200
    assert group_ids(memberships(api, pid)) == [b]
    assert remove_member(api, b, ident(identifier)).status == 200
    assert group_ids(memberships(api, pid)) == []


def test_inactive_membership_is_not_listed(any_api):
    api = any_api
    pid = create_patient(api)
    a, b = create_group(api, [pid]), create_group(api, [pid])
    inactivated = remove_member(
        api, a, ref(pid, "member"), {"name": "mode", "valueCode": "inactivate"}
    )
    assert inactivated.status == 200, inactivated
    assert group_ids(memberships(api, pid)) == [b]


def test_deleted_group_is_not_listed(any_api):
    api = any_api
    pid = create_patient(api)
    a, b = create_group(api, [pid]), create_group(api, [pid])
    assert api.delete(f"/Group/{a}").status == 204
    assert group_ids(memberships(api, pid)) == [b]


def test_recreated_group_with_an_empty_roster_is_not_listed(any_api):
    api = any_api
    pid = create_patient(api)
    gid = create_group(api, [pid])
    assert api.delete(f"/Group/{gid}").status == 204
    recreated = api.put(
        f"/Group/{gid}", {"resourceType": "Group", "id": gid, "type": "person", "actual": True}
    )
    assert recreated.status == 201, recreated
    assert group_ids(memberships(api, pid)) == []


def test_unknown_patient_is_404(api):
    response = api.get("/Patient/no-such-patient/$group-memberships")
    assert_error(response, 404, "not-found", "MSG_NO_EXIST")


def test_deleted_patient_is_410(api):
    pid = create_patient(api)
    assert api.delete(f"/{pid}").status == 204
    response = api.get(f"/{pid}/$group-memberships")
    assert_error(response, 410, "deleted", "MSG_DELETED")


def test_unknown_query_parameter_is_400(api):
    pid = create_patient(api)
    response = api.get(f"/{pid}/$group-memberships?active=true")
    assert_error(response, 400, "invalid", "MSG_PARAM_UNKNOWN")


def test_unknown_body_parameter_is_400(api):
    pid = create_patient(api)
    response = api.post(f"/{pid}/$group-memberships", parameters(text("active", "true")))
    assert_error(response, 400, "invalid", "MSG_PARAM_UNKNOWN")
