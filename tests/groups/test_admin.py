"""The Django admin of Groups and of the generic store (``groups.admin``, ``fhirservice.admin``).

Driven through Django's test client as a logged-in superuser (``admin_client``); writes go
through the FHIR API and commit (transactional tests), so their batches ship to ClickHouse
as in production. Every test uses Groups of its own, and pages are checked for the facts an
operator needs: which groups a member is in, who changed a roster and when, and whether the
copies agree.
"""

from __future__ import annotations

import re
import uuid

import orjson
import pytest
from django.contrib.admin.utils import quote
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from fhirservice.models import StoredResource
from fhirservice.store.handlers import WriteContext
from fhirservice.store.services import resource_patch
from groups.maintenance.common import wait_for_mutations
from groups.maintenance.repair import roster_rebuild
from groups.models import MemberOutbox
from groups.repository import MemberEventRepository
from tests.groups.conftest import (
    add,
    clickhouse_roster,
    create_group,
    current_key,
    patched,
    patients,
    read,
    refs_of,
    remove_ref,
)
from tests.groups.test_maintenance import bogus_state, inline_group
from tests.support import patient

pytestmark = pytest.mark.django_db(transaction=True)

LIST = "/admin/groups/groupresource/"


def page_url(gid: str, query: str = "") -> str:
    """The admin page of a Group."""
    return f"{LIST}{quote(f'Group/{gid}')}/change/{query}"


def html(response) -> str:
    """A 200 response's text."""
    assert response.status_code == 200, (response.status_code, response.content[:400])
    return response.content.decode()


def listed_ids(response) -> list[str]:
    """Group ids in a change list page, in page order."""
    return re.findall(r'<th class="field-group_id"><a href="[^"]*">([^<]+)</a>', html(response))


def roster_refs(text: str) -> list[str]:
    """Member references in the roster table of a Group page."""
    table = text.split('id="roster-table"', 1)[1].split("</table>", 1)[0]
    return re.findall(
        r'<td class="mono">(?:<a href="[^"]*">)?([A-Za-z]+/[^<]+?)(?:</a>)?</td>', table
    )


def unship(gid: str) -> None:
    """Mark a Group's batches unshipped, as if ClickHouse had been down."""
    MemberOutbox.objects.filter(group_id=gid).update(shipped_at=None)


# --- who gets in ---------------------------------------------------------------------------


def test_only_staff_users_get_in(live_api):
    gid = create_group(live_api, ["Patient/s1"])
    anonymous = Client()
    response = anonymous.get(LIST)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    User = get_user_model()
    User.objects.create_user("plain", password="pw-plain-123")
    plain = Client()
    plain.login(username="plain", password="pw-plain-123")
    assert plain.get(page_url(gid)).status_code == 302
    User.objects.create_user("staff", password="pw-staff-123", is_staff=True)
    staff = Client()
    staff.login(username="staff", password="pw-staff-123")
    assert staff.get(LIST).status_code == 403
    assert staff.get(page_url(gid)).status_code == 403


# --- the Group list ------------------------------------------------------------------------


def test_the_list_shows_each_groups_facts(admin_client, live_api):
    gid = create_group(
        live_api, ["Patient/l1", "Patient/l2"], name="Diabetes cohort", type="animal", actual=False
    )
    unship(gid)
    text = html(admin_client.get(LIST))
    row = text.split(f">{gid}</a>", 1)[1].split("</tr>", 1)[0]
    assert "Diabetes cohort" in row
    assert '<td class="field-group_type">animal</td>' in row
    assert '<td class="field-quantity">2</td>' in row
    assert '<td class="field-version_id">1</td>' in row
    assert '<td class="field-pending">1</td>' in row
    assert 'alt="False"' in row  # actual


def test_search_by_member_reference_answers_from_the_reverse_table(admin_client, live_api):
    tag = uuid.uuid4().hex[:8]
    a, b, c = f"Patient/{tag}a", f"Patient/{tag}b", f"Patient/{tag}c"
    g1 = create_group(live_api, [a, b])
    g2 = create_group(live_api, [b])
    g3 = create_group(live_api, [c])
    assert sorted(listed_ids(admin_client.get(LIST, {"q": b}))) == sorted([g1, g2])
    assert listed_ids(admin_client.get(LIST, {"q": c})) == [g3]
    patched(live_api, g3, [remove_ref(c)])
    assert listed_ids(admin_client.get(LIST, {"q": c})) == []
    # A member still pending in the outbox is found too: reads merge unshipped batches.
    patched(live_api, g2, [add(c)])
    unship(g2)
    assert listed_ids(admin_client.get(LIST, {"q": c})) == [g2]


def test_search_by_id_name_and_identifier(admin_client, live_api):
    tag = uuid.uuid4().hex[:8]
    named = create_group(live_api, name=f"Cardiology {tag} panel")
    identified = create_group(
        live_api, identifier=[{"system": "urn:registry", "value": f"reg-{tag}"}]
    )
    other = create_group(live_api, name="Other")
    assert listed_ids(admin_client.get(LIST, {"q": f"cardiology {tag}"})) == [named]
    assert listed_ids(admin_client.get(LIST, {"q": f"reg-{tag}"})) == [identified]
    assert listed_ids(admin_client.get(LIST, {"q": f"urn:registry|reg-{tag}"})) == [identified]
    assert listed_ids(admin_client.get(LIST, {"q": f"urn:other|reg-{tag}"})) == []
    assert listed_ids(admin_client.get(LIST, {"q": other})) == [other]
    assert listed_ids(admin_client.get(LIST, {"q": other[:8]})) == [other]


def test_filters_type_actual_deleted_and_pending(admin_client, live_api):
    person = create_group(live_api, ["Patient/f1"])
    device = create_group(live_api, type="device", actual=False)
    gone = create_group(live_api)
    assert live_api.delete(f"/Group/{gone}").status == 204
    unship(person)
    assert listed_ids(admin_client.get(LIST, {"type": "device"})) == [device]
    assert listed_ids(admin_client.get(LIST, {"actual": "false"})) == [device]
    assert listed_ids(admin_client.get(LIST, {"deleted__exact": "1"})) == [gone]
    assert listed_ids(admin_client.get(LIST, {"pending": "yes"})) == [person]
    assert sorted(listed_ids(admin_client.get(LIST, {"pending": "no"}))) == sorted([device, gone])


def test_the_list_costs_the_same_queries_for_any_page_size(admin_client, live_api):
    for i in range(3):
        create_group(live_api, [f"Patient/q{i}"])

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            html(admin_client.get(LIST))
        return len(captured)

    few = queries()
    for i in range(12):
        unship(create_group(live_api, [f"Patient/r{i}"]))
    assert queries() == few


# --- the Group page ------------------------------------------------------------------------


@pytest.fixture
def big_group(live_api):
    """A Group of 250 members, then a PATCH by "alice" (one out, one in, a new name).

    The PATCH goes through the store service with an actor: the REST API has no
    authentication, so API writes record no actor (their request id identifies them).
    """
    prefix = uuid.uuid4().hex[:6]
    refs = patients(250, prefix)
    gid = create_group(live_api, refs, name="Before")
    resource_patch(
        resource_type="Group",
        resource_id=gid,
        ops=[
            remove_ref(refs[3]),
            add(f"Patient/{prefix}zzz", inactive=True),
            {"op": "replace", "path": "/name", "value": "After"},
        ],
        context=WriteContext(actor="alice", source="operation"),
    )
    return gid, refs, prefix


def test_the_page_shows_the_resource_without_its_roster(admin_client, big_group):
    gid, _, _ = big_group
    text = html(admin_client.get(page_url(gid)))
    resource = text.split('<pre class="fhir-json">', 1)[1].split("</pre>", 1)[0]
    body = orjson.loads(resource.replace("&quot;", '"'))
    assert body["id"] == gid and body["name"] == "After" and body["quantity"] == 249
    assert "member" not in body
    assert '<dd id="group-quantity">249</dd>' in text


def test_the_roster_is_paged_by_reference(admin_client, big_group):
    gid, refs, prefix = big_group
    current = sorted([r for r in refs if r != refs[3]] + [f"Patient/{prefix}zzz"])
    text = html(admin_client.get(page_url(gid)))
    assert roster_refs(text) == current[:100]
    next_link = re.search(r'href="(\?[^"]+)#roster" id="roster-next"', text).group(1)
    second = html(admin_client.get(page_url(gid, next_link.replace("&amp;", "&"))))
    assert roster_refs(second) == current[100:200]
    assert roster_refs(html(admin_client.get(page_url(gid, "?size=500")))) == current
    assert 'id="roster-next"' not in html(admin_client.get(page_url(gid, "?size=500")))


def test_the_roster_searches_members_by_reference_prefix(admin_client, big_group):
    gid, refs, prefix = big_group
    text = html(admin_client.get(page_url(gid, f"?member=Patient/{prefix}002")))
    assert roster_refs(text) == [r for r in refs if r.startswith(f"Patient/{prefix}002")]
    text = html(admin_client.get(page_url(gid, f"?member={refs[3]}")))
    assert roster_refs(text) == []
    # A whole reference also narrows the timeline to that member's events.
    timeline = text.split('id="timeline-table"', 1)[1].split("</table>", 1)[0]
    assert timeline.count("<tr>") == 3  # header, added in v1, removed in v2
    assert "removed" in timeline and "added" in timeline


def test_the_roster_as_of_an_older_version(admin_client, big_group):
    gid, refs, _ = big_group
    text = html(admin_client.get(page_url(gid, "?as_of=1&size=500")))
    assert roster_refs(text) == refs
    assert "Roster as of version 1" in text
    bad = html(admin_client.get(page_url(gid, "?as_of=7")))
    assert "There is no version 7 of this roster: choose 1–2" in bad


def test_as_of_a_version_shows_that_versions_header_and_resource(admin_client, big_group):
    gid, _, _ = big_group
    text = html(admin_client.get(page_url(gid, "?as_of=1")))
    resource = text.split('<pre class="fhir-json">', 1)[1].split("</pre>", 1)[0]
    body = orjson.loads(resource.replace("&quot;", '"'))
    assert body["name"] == "Before" and body["meta"]["versionId"] == "1"
    assert body["quantity"] == 250
    assert '<dd id="group-quantity">250</dd>' in text
    assert '<dd id="group-version">1 <span class="fhir-note">(shown as of this version' in text
    assert "Resource as of version 1 (without its roster)" in text
    current = html(admin_client.get(page_url(gid)))
    assert '<dd id="group-version">2</dd>' in current
    assert "Resource (without its roster)" in current


def test_writes_without_an_actor_say_access_control_was_off(admin_client, big_group):
    gid, _, _ = big_group
    text = html(admin_client.get(page_url(gid)))
    history = text.split('id="history-table"', 1)[1].split("</table>", 1)[0]
    # Version 1 came through the API with FHIR_AUTH off: no caller, so no actor.
    assert "access control off" in history and "alice" in history
    older = html(admin_client.get(page_url(gid, "?ev=2.0")))
    timeline = older.split('id="timeline-table"', 1)[1].split("</table>", 1)[0]
    assert "access control off" in timeline


def test_the_timeline_says_who_changed_the_roster_and_when(admin_client, big_group):
    gid, refs, prefix = big_group
    text = html(admin_client.get(page_url(gid)))
    timeline = text.split('id="timeline-table"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", timeline, re.S)[1:]
    assert len(rows) == 50
    first = re.findall(r"<td[^>]*>(.*?)</td>", rows[0], re.S)
    assert first[:4] == ["2", "1", "added", f"Patient/{prefix}zzz"]
    assert first[5] == "inactive" and first[6] == "alice" and first[7] == "operation"
    second = re.findall(r"<td[^>]*>(.*?)</td>", rows[1], re.S)
    assert second[:4] == ["2", "0", "removed", refs[3]]
    older = re.search(r'href="(\?[^"]+)#timeline" id="timeline-next"', text).group(1)
    page2 = html(admin_client.get(page_url(gid, older.replace("&amp;", "&"))))
    timeline2 = page2.split('id="timeline-table"', 1)[1].split("</table>", 1)[0]
    assert re.findall(r"<tr>\s*<td>1</td><td>201</td>", timeline2)


def test_the_history_says_what_each_version_changed(admin_client, big_group):
    gid, _, _ = big_group
    text = html(admin_client.get(page_url(gid)))
    history = text.split('id="history-table"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", history, re.S)[1:]
    assert len(rows) == 2
    assert "replace /name = &quot;After&quot;" in rows[0]
    assert "replace /quantity = 249" in rows[0]
    assert "1 added" in rows[0] and "1 removed" in rows[0] and "alice" in rows[0]
    assert "created" in rows[1] and "250 added" in rows[1]


def test_pending_batches_are_shown_and_shipped_by_the_button(admin_client, live_api):
    gid = create_group(live_api, ["Patient/b1", "Patient/b2"])
    unship(gid)
    text = html(admin_client.get(page_url(gid)))
    assert 'id="pending"' in text and "Ship pending batches (1)" in text
    response = admin_client.post(f"{LIST}{quote(f'Group/{gid}')}/ship/", follow=True)
    text = html(response)
    assert "Shipped 1 batches (2 events, 1 already in ClickHouse)" in text
    assert not MemberOutbox.objects.filter(group_id=gid, shipped_at__isnull=True).exists()
    assert 'id="pending"' not in text


def test_verify_button_reports_consistency_and_damage(admin_client, live_api):
    gid = create_group(live_api, ["Patient/v1", "Patient/v2"])
    verify = f"{LIST}{quote(f'Group/{gid}')}/verify/"
    text = html(admin_client.get(verify))
    assert "Consistent: the outbox, the ClickHouse event log" in text
    bogus_state(current_key(gid), "Patient/ghost", present=1)
    text = html(admin_client.get(verify))
    assert "1 problem found" in text and "MemberState" in text


def test_rebuild_asks_first_then_rebuilds(admin_client, live_api):
    gid = create_group(live_api, ["Patient/r1"])
    key = current_key(gid)
    bogus_state(key, "Patient/ghost", present=1)
    rebuild = f"{LIST}{quote(f'Group/{gid}')}/rebuild/"
    text = html(admin_client.get(rebuild))
    assert "will be deleted and derived again from their event log" in text
    assert clickhouse_roster(key) == ["Patient/ghost", "Patient/r1"]
    text = html(admin_client.post(rebuild, {"confirmed": "yes"}, follow=True))
    assert f"rebuilt roster {key} from its event log (1 members" in text
    assert clickhouse_roster(key) == ["Patient/r1"]


def test_list_actions_ship_verify_and_rebuild(admin_client, live_api):
    g1 = create_group(live_api, ["Patient/a1"])
    g2 = create_group(live_api, ["Patient/a2"])
    unship(g1)
    bogus_state(current_key(g2), "Patient/ghost", present=1)
    keys = [f"Group/{g1}", f"Group/{g2}"]
    text = html(
        admin_client.post(LIST, {"action": "verify_rosters", "_selected_action": keys}, follow=True)
    )
    assert text.count('class="fhir-bad verify-result"') == 2  # pending; bad state
    text = html(
        admin_client.post(LIST, {"action": "ship_pending", "_selected_action": keys}, follow=True)
    )
    assert "Shipped 1 batches" in text
    text = html(admin_client.post(LIST, {"action": "rebuild_rosters", "_selected_action": keys}))
    assert "Rebuild roster state?" in text
    text = html(
        admin_client.post(
            LIST,
            {"action": "rebuild_rosters", "_selected_action": keys, "confirmed": "yes"},
            follow=True,
        )
    )
    assert text.count("from its event log") == 2
    assert clickhouse_roster(current_key(g2)) == ["Patient/a2"]
    text = html(
        admin_client.post(LIST, {"action": "verify_rosters", "_selected_action": keys}, follow=True)
    )
    assert text.count('class="fhir-ok verify-result"') == 2


def test_an_inline_roster_is_shown_from_the_body(admin_client, live_api):
    gid = inline_group(live_api, ["Patient/i2", "Patient/i1"])
    text = html(admin_client.get(page_url(gid)))
    assert "still stored inline" in text
    assert roster_refs(text) == ["Patient/i1", "Patient/i2"]


def test_a_deleted_group_shows_its_history(admin_client, live_api):
    gid = create_group(live_api, ["Patient/d1"])
    live_api.delete(f"/Group/{gid}")
    text = html(admin_client.get(page_url(gid)))
    assert "The Group is deleted; see its history." in text
    history = text.split('id="history-table"', 1)[1]
    assert "deleted" in history and "DELETE" in history


def test_the_page_survives_clickhouse_being_down(admin_client, live_api, clickhouse_down):
    gid = create_group(live_api, ["Patient/c1"])
    with clickhouse_down():
        text = html(admin_client.get(page_url(gid)))
        assert text.count("The member store (ClickHouse) is unavailable") >= 2
        text = html(admin_client.get(LIST, {"q": "Patient/c1"}, follow=True))
        assert "Member search unavailable" in text


def test_a_page_never_reads_more_of_the_roster_than_it_shows(admin_client, live_api, monkeypatch):
    gid = create_group(live_api, patients(400, "n"))
    read_states = []
    real = MemberEventRepository._page

    def counting(self, *args, **kwargs):
        rows = real(self, *args, **kwargs)
        read_states.extend(rows)
        return rows

    monkeypatch.setattr(MemberEventRepository, "_page", counting)
    text = html(admin_client.get(page_url(gid, "?size=25")))
    assert len(roster_refs(text)) == 25
    assert len(read_states) == 26  # the API's page query: the page and one more


def test_djangos_permission_groups_are_not_listed_beside_fhir_groups(admin_client):
    index = html(admin_client.get("/admin/"))
    assert "FHIR Groups" in index
    assert "/admin/auth/group/" not in index and "/admin/auth/user/" in index
    assert admin_client.get("/admin/auth/group/").status_code == 404


# --- the generic store ---------------------------------------------------------------------


def test_other_resources_are_listed_read_only(admin_client, live_api):
    pid = live_api.post("/Patient", patient("Zed")).body["id"]
    gid = create_group(live_api)
    text = html(admin_client.get("/admin/fhirservice/storedresource/"))
    assert f"Patient/{pid}" in text and f"Group/{gid}" not in text
    assert "Add stored resource" not in text
    text = html(admin_client.get("/admin/fhirservice/storedresource/", {"q": pid}))
    assert f"Patient/{pid}" in text
    assert admin_client.get("/admin/fhirservice/storedresource/add/").status_code == 403


def test_a_resource_page_shows_json_and_history(admin_client, live_api):
    pid = live_api.post("/Patient", patient("Zed")).body["id"]
    ops = [{"op": "replace", "path": "/name/0/family", "value": "Zorro"}]
    assert live_api.patch(f"/Patient/{pid}", ops).status == 200
    url = f"/admin/fhirservice/storedresource/{quote(f'Patient/{pid}')}/change/"
    text = html(admin_client.get(url))
    assert "Zorro" in text.split('id="resource-json"', 1)[1]
    assert "replace /name/0/family = &quot;Zorro&quot;" in text
    assert "created" in text and "access control off" in text
    assert admin_client.post(url, {}).status_code in (200, 403)
    assert StoredResource.objects.get(key=f"Patient/{pid}").version_id == 2


def test_member_links_lead_to_the_member_and_its_groups(admin_client, live_api):
    pid = live_api.post("/Patient", patient("Linked")).body["id"]
    gid = create_group(live_api, [f"Patient/{pid}"])
    text = html(admin_client.get(page_url(gid)))
    member_page = f"/admin/fhirservice/storedresource/{quote(f'Patient/{pid}')}/change/"
    assert f'href="{member_page}"' in text
    assert f"{LIST}?q=Patient/{pid}" in text.replace("%2F", "/")
    assert refs_of(read(live_api, gid)) == [f"Patient/{pid}"]


def test_as_of_a_version_when_the_roster_was_much_smaller(admin_client, live_api):
    early = ["Patient/zz1", "Patient/zz2", "Patient/zz3"]
    gid = create_group(live_api, early)
    patched(live_api, gid, [add(ref) for ref in patients(600, "a")] + [remove_ref(early[1])])
    # Every member window of the state table ahead of zz1 holds only later members: the
    # page falls back to reading the log as of the version.
    assert roster_refs(html(admin_client.get(page_url(gid, "?as_of=1&size=25")))) == early
    current = roster_refs(html(admin_client.get(page_url(gid, "?as_of=2&size=1000"))))
    assert current == patients(600, "a") + ["Patient/zz1", "Patient/zz3"]


def test_as_of_merges_batches_not_yet_shipped(admin_client, live_api):
    gid = create_group(live_api, ["Patient/m1"])
    patched(live_api, gid, [add("Patient/m2")])
    patched(live_api, gid, [remove_ref("Patient/m1")])
    MemberOutbox.objects.filter(group_id=gid, version__gte=2).update(shipped_at=None)
    repository = MemberEventRepository()
    for version in (2, 3):
        repository.delete_events(current_key(gid), version=version)
    wait_for_mutations(repository)
    roster_rebuild(roster_key=current_key(gid))
    assert roster_refs(html(admin_client.get(page_url(gid, "?as_of=2")))) == [
        "Patient/m1",
        "Patient/m2",
    ]
    assert roster_refs(html(admin_client.get(page_url(gid, "?as_of=3")))) == ["Patient/m2"]
    assert roster_refs(html(admin_client.get(page_url(gid)))) == ["Patient/m2"]


def test_a_roster_of_mostly_removed_members_pages_right(admin_client, live_api):
    gid = create_group(live_api, [*patients(300, "a"), "Patient/zz", "Patient/zz2"])
    patched(live_api, gid, [remove_ref(ref) for ref in patients(300, "a")])
    assert roster_refs(html(admin_client.get(page_url(gid, "?size=25")))) == [
        "Patient/zz",
        "Patient/zz2",
    ]
    text = html(admin_client.get(page_url(gid, "?size=25")))
    assert roster_refs(text) == ["Patient/zz", "Patient/zz2"]
    text = html(admin_client.get(page_url(gid, "?size=25&as_of=1")))
    assert roster_refs(text) == patients(25, "a")
