"""Roster reads: GET (streamed), subsetting, vread and history, ``$members`` and ``Group?member=``.

Every read is checked with the batches pending in the outbox and with them shipped to
ClickHouse (``any_api``), and once with a mix of both, because reads merge the two stores.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

import orjson
import pytest

from fhirservice.errors import MSG_VERSION_NOT_FOUND
from groups.outbox.ship import member_batches_ship
from groups.search import MSG_BAD_MEMBER
from groups.views import MSG_BAD_PARAM
from tests.fhirservice.test_api_errors import assert_outcome
from tests.groups.conftest import (
    add,
    clickhouse_roster,
    create_group,
    current_key,
    group,
    member,
    member_page,
    outbox_rows,
    page_refs,
    page_value,
    patched,
    patients,
    read,
    refs_of,
    remove_ref,
    search_ids,
    version_of,
)

A, B, C, D = "Patient/a", "Patient/b", "Patient/c", "Patient/d"
BASE = "http://testserver/4_0_0"


def follow(api, url: str):
    """GET an absolute URL the server handed out."""
    assert url.startswith(BASE), url
    response = api.get(url[len(BASE) :])
    assert response.status == 200, response
    return response


def all_pages(api, gid: str, query: str) -> list[list[str]]:
    """The member references of every ``$members`` page, following ``next``."""
    response = member_page(api, gid, query)
    assert response.status == 200, response
    pages = [page_refs(response.body)]
    while (url := page_value(response.body, "next")) is not None:
        response = follow(api, url)
        pages.append(page_refs(response.body))
    return pages


# --- GET -----------------------------------------------------------------------------------


def test_get_streams_the_whole_roster_in_reference_order(any_api):
    refs = patients(40) + [f"Device/d{i}" for i in range(5)] + ["Group/g1", "Practitioner/x"]
    inactive = set(refs[::7])
    sent = group()
    sent["member"] = [member(r, inactive=True) if r in inactive else member(r) for r in refs]
    random.Random(3).shuffle(sent["member"])
    gid = any_api.post("/Group", sent).body["id"]
    response = any_api.get(f"/Group/{gid}")
    assert response.status == 200, response
    assert response.raw.streaming
    assert response.etag == 'W/"1"'
    body = response.body
    assert refs_of(body) == sorted(refs)
    assert [m.get("inactive", False) for m in body["member"]] == [
        r in inactive for r in sorted(refs)
    ]
    assert body["quantity"] == len(refs) - len(inactive)
    key = current_key(gid)
    assert clickhouse_roster(key) == (sorted(refs) if any_api.shipped else [])


def test_get_of_an_empty_roster_has_no_member_element(any_api):
    gid = create_group(any_api, [A])
    body = patched(any_api, gid, [remove_ref(A)])
    assert "member" not in body
    assert body["quantity"] == 0
    assert read(any_api, gid) == body


def test_member_content_round_trips_through_reads(any_api):
    rich = {
        "id": "m-1",
        "extension": [{"url": "http://example.org/why", "valueString": "referral"}],
        "entity": {"reference": B, "display": "B. Smith"},
        "period": {"start": "2020-01-01T08:00:00+01:00", "end": "2024"},
        "inactive": True,
    }
    sent = group([A])
    sent["member"].append(rich)
    gid = any_api.post("/Group", sent).body["id"]
    assert read(any_api, gid)["member"] == [member(A), rich]
    response = member_page(any_api, gid)
    parts = response.body["parameter"][1]["part"]
    assert parts == [
        {"name": "entity", "valueReference": {"reference": B}},
        {"name": "period", "valuePeriod": {"start": "2020-01-01T08:00:00+01:00", "end": "2024"}},
        {"name": "inactive", "valueBoolean": True},
    ]


@pytest.mark.parametrize(
    "query",
    ["?_summary=true", "?_elements=type,actual,quantity", "?_elements=quantity,type,actual,name"],
)
def test_subsets_without_member_skip_the_roster(any_api, clickhouse_down, query):
    gid = create_group(any_api, [A, B], name="n")
    with clickhouse_down():
        assert_outcome(any_api.get(f"/Group/{gid}"), 503, "MSG_MEMBER_STORE_DOWN")
        body = read(any_api, gid, query)  # the roster is never read: no ClickHouse needed
    assert "member" not in body
    assert body["quantity"] == 2
    assert body["meta"]["tag"][-1]["code"] == "SUBSETTED"


@pytest.mark.parametrize(
    "query", ["?_elements=member,type,actual", "?_summary=data", "?_summary=false"]
)
def test_subsets_with_member_carry_the_roster(any_api, query):
    gid = create_group(any_api, [B, A])
    assert refs_of(read(any_api, gid, query)) == [A, B]


# --- vread and history ---------------------------------------------------------------------


def build_versions(api) -> tuple[str, dict[int, list[dict]]]:
    """A Group through six versions; the expected roster of each."""
    gid = create_group(api, [A, B])
    patched(api, gid, [add(C)])
    patched(api, gid, [remove_ref(A)])
    patched(api, gid, [add(B, inactive=True)])
    patched(api, gid, [{"op": "add", "path": "/name", "value": "renamed"}])
    patched(api, gid, [add(A, period={"start": "2021"}), remove_ref(C)])
    expected = {
        1: [member(A), member(B)],
        2: [member(A), member(B), member(C)],
        3: [member(B), member(C)],
        4: [member(B, inactive=True), member(C)],
        5: [member(B, inactive=True), member(C)],
        6: [member(A, period={"start": "2021"}), member(B, inactive=True)],
    }
    return gid, expected


def active_count(members: list[dict]) -> int:
    return sum(1 for m in members if not m.get("inactive"))


def test_vread_gives_the_roster_as_of_that_version(any_api):
    gid, expected = build_versions(any_api)
    for version, members in expected.items():
        response = any_api.get(f"/Group/{gid}/_history/{version}")
        assert response.status == 200, response
        assert response.etag == f'W/"{version}"'
        assert response.body["member"] == members, version
        assert response.body["quantity"] == active_count(members), version
    assert read(any_api, gid)["member"] == expected[6]


def test_history_gives_each_version_with_its_roster(any_api):
    gid, expected = build_versions(any_api)
    bundle = any_api.get(f"/Group/{gid}/_history").body
    assert bundle["total"] == 6
    served = {version_of(e["resource"]): e["resource"]["member"] for e in bundle["entry"]}
    assert served == expected


def test_vread_of_a_deleted_version_is_410_and_earlier_ones_keep_their_roster(any_api):
    gid = create_group(any_api, [A, B])
    assert any_api.delete(f"/Group/{gid}").status == 204
    assert_outcome(any_api.get(f"/Group/{gid}/_history/2"), 410, "MSG_DELETED")
    assert refs_of(read(any_api, gid, "/_history/1")) == [A, B]


def test_reads_merge_shipped_and_pending_batches(live_api, no_shipping):
    gid = create_group(live_api, [A, B, C])  # committed; its shipping "crashed"
    key = current_key(gid)
    # Ship version 1 by hand, so that ClickHouse holds it and the next write stays pending.
    report = member_batches_ship(roster_keys=[key])
    assert report.batches == 1
    assert clickhouse_roster(key) == [A, B, C]
    patched(live_api, gid, [remove_ref(B), add(D), add(A, inactive=True)])
    assert [r.shipped_at is None for r in outbox_rows(gid)] == [False, True]
    assert [call["keys"] for call in no_shipping] == [[r.key] for r in outbox_rows(gid)]

    def answers():
        body = read(live_api, gid)
        return (
            body["member"],
            body["quantity"],
            all_pages(live_api, gid, "?_count=1"),
            all_pages(live_api, gid, "?active=true"),
            refs_of(read(live_api, gid, "/_history/1")),
            search_ids(live_api, f"member={B}")[0],
            search_ids(live_api, f"member={D}")[0],
        )

    expected = (
        [member(A, inactive=True), member(C), member(D)],
        2,
        [[A], [C], [D]],
        [[C, D]],
        [A, B, C],
        [],
        [gid],
    )
    assert answers() == expected
    assert member_batches_ship(roster_keys=[key]).batches == 1
    assert clickhouse_roster(key) == [A, C, D]
    assert answers() == expected


# --- $members ------------------------------------------------------------------------------


def test_members_pages_cover_the_roster_once(any_api):
    refs = patients(7)
    gid = create_group(any_api, list(reversed(refs)))
    response = member_page(any_api, gid, "?_count=3")
    assert response.status == 200, response
    assert response.etag == 'W/"1"'
    assert page_value(response.body, "groupVersion") == "1"
    assert page_value(response.body, "quantity") == 7
    assert all_pages(any_api, gid, "?_count=3") == [refs[:3], refs[3:6], refs[6:]]
    assert all_pages(any_api, gid, "") == [refs]
    last = member_page(any_api, gid, "?_count=7").body
    assert page_value(last, "next") is None


def test_members_paging_is_stable_under_concurrent_writes(any_api):
    refs = patients(10)
    gid = create_group(any_api, refs)
    first = member_page(any_api, gid, "?_count=4").body
    assert page_refs(first) == refs[:4]
    patched(
        any_api,
        gid,
        [
            add("Patient/p0001x"),  # before the cursor: not served on later pages
            add("Patient/p0005x"),  # after the cursor: served in its place
            remove_ref(refs[4]),  # after the cursor: never served
            remove_ref(refs[0]),  # already served
        ],
    )
    second = follow(any_api, page_value(first, "next")).body
    assert page_refs(second) == [refs[5], "Patient/p0005x", refs[6], refs[7]]
    assert page_value(second, "groupVersion") == "2"
    third = follow(any_api, page_value(second, "next")).body
    assert page_refs(third) == refs[8:]
    assert page_value(third, "next") is None


def test_members_count_zero_serves_no_member_but_the_total(any_api):
    refs = patients(3)
    gid = create_group(any_api, refs)
    patched(any_api, gid, [add(refs[1], inactive=True)])
    for query in ("?_count=0", "?_count=0&active=false", "?_count=0&version=1"):
        response = member_page(any_api, gid, query)
        assert response.status == 200, response
        assert page_refs(response.body) == [], query
        assert page_value(response.body, "next") is None, query
        expected = (3, "1") if "version=1" in query else (2, "2")
        assert (
            page_value(response.body, "quantity"),
            page_value(response.body, "groupVersion"),
        ) == expected


def test_members_as_of_a_version_ignore_later_writes(any_api):
    refs = patients(6)
    gid = create_group(any_api, refs)
    first = member_page(any_api, gid, "?_count=2&version=1").body
    patched(any_api, gid, [remove_ref(refs[3]), add("Patient/p0002x"), add(refs[4], inactive=True)])
    pages = [page_refs(first)]
    response = first
    while (url := page_value(response, "next")) is not None:
        assert "version=1" in url
        response = follow(any_api, url).body
        pages.append(page_refs(response))
        assert page_value(response, "groupVersion") == "1"
        assert page_value(response, "quantity") == 6
    assert pages == [refs[:2], refs[2:4], refs[4:]]
    current = all_pages(any_api, gid, "?_count=100")
    assert current == [[*refs[:3], "Patient/p0002x", *refs[4:]]]
    assert all_pages(any_api, gid, "?version=2&active=false") == [[refs[4]]]


def test_members_filter_by_activity(any_api):
    refs = patients(6)
    gid = create_group(any_api, refs)
    patched(any_api, gid, [add(refs[1], inactive=True), add(refs[4], inactive=True)])
    assert all_pages(any_api, gid, "?active=true&_count=2") == [
        [refs[0], refs[2]],
        [refs[3], refs[5]],
    ]
    assert all_pages(any_api, gid, "?active=false&_count=1") == [[refs[1]], [refs[4]]]
    assert all_pages(any_api, gid, "?active=false&version=1") == [[]]


@pytest.mark.parametrize(
    ("query", "name", "value"),
    [
        ("?active=maybe", "active", "maybe"),
        ("?_count=ten", "_count", "ten"),
        ("?_count=-1", "_count", "-1"),
        ("?_cursor=%21%21%21", "_cursor", "!!!"),
        ("?_cursor=UGF0aWVudC9i%21", "_cursor", "UGF0aWVudC9i!"),
        ("?_cursor=_w", "_cursor", "_w"),  # not UTF-8
    ],
)
def test_members_bad_parameters_are_400(api, query, name, value):
    gid = create_group(api, [A])
    issue = assert_outcome(member_page(api, gid, query), 400, "MSG_PARAM_INVALID")
    assert issue["diagnostics"] == MSG_BAD_PARAM.format(name=name, value=value)


def test_members_of_unknown_deleted_or_missing_versions(api):
    assert_outcome(member_page(api, "nope"), 404, "MSG_NO_EXIST")
    gid = create_group(api, [A])
    issue = assert_outcome(member_page(api, gid, "?version=9"), 404, "MSG_NO_EXIST")
    assert issue["diagnostics"] == MSG_VERSION_NOT_FOUND.format(type="Group", id=gid, version=9)
    assert api.delete(f"/Group/{gid}").status == 204
    assert_outcome(member_page(api, gid), 410, "MSG_DELETED")
    assert_outcome(member_page(api, gid, "?version=2"), 410, "MSG_DELETED")
    assert page_refs(member_page(api, gid, "?version=1").body) == [A]


# --- Group?member= ---------------------------------------------------------------------------


@pytest.fixture
def tag() -> str:
    """A prefix that makes this test's member references unique in ClickHouse."""
    return uuid.uuid4().hex[:10]


def test_member_search_or_and_combinations(any_api, tag):
    x, y, z, w = (f"Patient/{tag}-{n}" for n in "xyzw")
    g1 = create_group(any_api, [x, y])
    g2 = create_group(any_api, [y])
    patched(any_api, g2, [add(z, inactive=True)])
    g3 = create_group(any_api, [w])
    g4 = create_group(any_api, [x], name="other")
    assert search_ids(any_api, f"member={x}") == (sorted([g1, g4]), 2)
    assert search_ids(any_api, f"member={x},{z}") == (sorted([g1, g2, g4]), 3)  # OR
    assert search_ids(any_api, f"member={x}&member={y}") == ([g1], 1)  # AND
    assert search_ids(any_api, f"member={x}&name=other") == ([g4], 1)
    assert search_ids(any_api, f"member={w}&name=other") == ([], 0)
    assert search_ids(any_api, f"member:Patient={tag}-w") == ([g3], 1)
    assert search_ids(any_api, f"member={z}") == ([g2], 1)  # inactive members match too
    assert search_ids(any_api, f"member=Patient/{tag}-none") == ([], 0)


def test_member_search_follows_removals_and_deletes(any_api, tag):
    x = f"Patient/{tag}-x"
    g1 = create_group(any_api, [x, A])
    g2 = create_group(any_api, [x])
    patched(any_api, g1, [remove_ref(x)])
    assert search_ids(any_api, f"member={x}") == ([g2], 1)
    patched(any_api, g1, [add(x)])
    assert search_ids(any_api, f"member={x}") == (sorted([g1, g2]), 2)
    assert any_api.delete(f"/Group/{g2}").status == 204
    assert search_ids(any_api, f"member={x}") == ([g1], 1)


def test_member_search_after_re_creating_an_id(any_api, tag):
    x, y = f"Patient/{tag}-x", f"Patient/{tag}-y"
    gid = f"re-{tag}"
    for _ in range(3):  # several dead incarnations that all had x
        assert any_api.put(f"/Group/{gid}", {**group([x]), "id": gid}).status == 201
        assert any_api.delete(f"/Group/{gid}").status == 204
    assert search_ids(any_api, f"member={x}") == ([], 0)
    assert any_api.put(f"/Group/{gid}", {**group([y]), "id": gid}).status == 201
    assert search_ids(any_api, f"member={x}") == ([], 0)
    assert search_ids(any_api, f"member={y}") == ([gid], 1)
    patched(any_api, gid, [add(x)])
    assert search_ids(any_api, f"member={x}") == ([gid], 1)


def test_member_search_total_is_exact_across_pages(any_api, tag):
    x = f"Patient/{tag}-x"
    gids = sorted(create_group(any_api, [x, f"Patient/{tag}-{i}"]) for i in range(3))
    create_group(any_api, [f"Patient/{tag}-other"])
    response = any_api.get(f"/Group?member={x}&_count=1&_total=accurate")
    assert response.status == 200, response
    assert response.body["total"] == 3
    seen = [response.body["entry"][0]["resource"]["id"]]
    next_url = {link["relation"]: link["url"] for link in response.body["link"]}.get("next")
    while next_url:
        page = follow(any_api, next_url).body
        assert page["total"] == 3
        seen.extend(e["resource"]["id"] for e in page["entry"])
        next_url = {link["relation"]: link["url"] for link in page["link"]}.get("next")
    assert seen == gids
    summary = any_api.get(f"/Group?member={x}&_summary=count").body
    assert (summary["total"], summary.get("entry")) == (3, None)


@pytest.mark.parametrize("value", ["Observation/1", "nobody", "Patient/", "Patient/a b"])
def test_member_search_with_a_bad_value_is_400(api, value):
    issue = assert_outcome(api.get(f"/Group?member={value}"), 400, "MSG_PARAM_INVALID")
    assert issue["diagnostics"] == MSG_BAD_MEMBER.format(value=value)


RENDER_CASES = [
    ("Patient/a", "", "", 0, ""),
    ("Patient/b", "2020-01-01", "", 0, ""),
    ("Patient/c", "", "2021-02-03T04:05:06Z", 1, ""),
    ("Patient/d", "2020", "2021-02-03T04:05:06.123+01:00", 1, ""),
    ('http://x"y/Patient/e', "", "", 0, ""),  # needs JSON escaping: rendered in Python
    ("http://x\\y/Patient/f", "", "", 0, ""),
    ("http://h\u00e4st/Patient/g", "", "", 0, ""),
    ("Patient/h", "", "", 0, '{"id":"m1","extension":[{"url":"http://e","valueString":"v"}]}'),
    ("Patient/i", "", "", 1, '{"entity":{"display":"x"}}'),
    ("Patient/j", "", "", 0, ""),  # rendered by ClickHouse again, after Python's
]


def test_members_rendered_by_clickhouse_equal_the_python_rendering(monkeypatch):
    """The streamed GET takes member JSON from ClickHouse where it can, runs of members
    joined by commas: byte for byte what members.render_member writes; the other members
    come back as states to render."""
    import groups.repository
    from groups.members import render_member
    from groups.repository import EVENT_COLUMNS, EVENTS, MemberEventRepository

    repository = MemberEventRepository()
    key = f"render-{uuid.uuid4().hex}/1"
    repository.client.insert(
        EVENTS,
        EVENT_COLUMNS,
        [
            (key, ref, "Patient", "added", 1, seq, start, end, inactive, extra)
            + (datetime.now(UTC), "request", "test", "")
            for seq, (ref, start, end, inactive, extra) in enumerate(RENDER_CASES)
        ],
    )
    states = list(repository.iter_roster(key))
    assert len(states) == len(RENDER_CASES)
    expected = b",".join(render_member(*state.rendered()) for state in states)

    def joined(items):
        return b",".join(
            item if type(item) is bytes else render_member(*item.rendered()) for item in items
        )

    rendered = list(repository.iter_roster_json(key))
    assert joined(rendered) == expected
    by_python = [item for item in rendered if type(item) is not bytes]
    assert by_python == [s for s in states if s.ref[-1] in "efghi"]
    # Patient/a-d, then Patient/j after the members rendered in Python.
    assert sum(1 for item in rendered if type(item) is bytes) == 2
    # The embedded engine walks the roster in windows; a window boundary changes nothing.
    monkeypatch.setattr(groups.repository, "ROSTER_WINDOW", 2)
    assert joined(repository.iter_roster_json(key)) == expected


@pytest.mark.parametrize("window", [1, 2, 3, 1000])
def test_roster_walk_in_windows_equals_one_aggregation(monkeypatch, window):
    """A roster is streamed window by window of the sort key: removed members, updates and
    unmerged parts (one part per insert) on window boundaries change nothing."""
    import groups.repository
    from groups.repository import EVENT_COLUMNS, EVENTS, MemberEventRepository

    repository = MemberEventRepository()
    key = f"walk-{uuid.uuid4().hex}/1"
    refs = [f"Patient/w{i:02d}" for i in range(12)]
    now = datetime.now(UTC)

    def insert(version, changes):
        rows = [
            (key, ref, "Patient", event, version, seq, "", "", inactive, "", now, "r", "test", "")
            for seq, (ref, event, inactive) in enumerate(changes)
        ]
        repository.client.insert(EVENTS, EVENT_COLUMNS, rows)

    insert(1, [(ref, "added", 0) for ref in refs])
    insert(2, [(refs[i], "removed", 0) for i in (0, 1, 2, 5, 6, 11)])
    insert(3, [(refs[1], "added", 0), (refs[7], "updated", 1), (refs[8], "removed", 0)])
    insert(4, [(refs[8], "added", 1), ("Patient/w99", "added", 0)])
    expected = [refs[i] for i in (1, 3, 4, 7, 8, 9, 10)] + ["Patient/w99"]

    monkeypatch.setattr(groups.repository, "ROSTER_WINDOW", window)
    states = list(repository.iter_roster(key))
    assert [s.ref for s in states] == expected
    assert [s.inactive for s in states] == [False, False, False, True, True, False, False, False]
    with_removed = list(repository.iter_roster(key, include_removed=True))
    assert [s.ref for s in with_removed] == [*refs, "Patient/w99"]
    rendered = b",".join(repository.iter_roster_json(key))
    assert [m["entity"]["reference"] for m in orjson.loads(b"[" + rendered + b"]")] == expected
    assert [s.ref for s in repository.iter_roster(key, after=refs[4])] == expected[3:]


def test_roster_json_is_one_chunk_per_window(monkeypatch):
    """A streamed GET's members come one window of the sort key per chunk on both engines
    (one row of text per window from ClickHouse, not one row per member), and a batch
    inserted twice next to a later update in one window renders each member once, newest
    state first."""
    import groups.repository
    from groups.repository import EVENT_COLUMNS, EVENTS, MemberEventRepository

    repository = MemberEventRepository()
    key = f"chunks-{uuid.uuid4().hex}/1"
    refs = [f"Patient/c{i:02d}" for i in range(12)]
    now = datetime.now(UTC)

    def rows(version, changes):
        return [
            (key, ref, "Patient", event, version, seq, start, "", 0, "", now, "r", "test", "")
            for seq, (ref, event, start) in enumerate(changes)
        ]

    repository.client.insert(EVENTS, EVENT_COLUMNS, rows(1, [(ref, "added", "") for ref in refs]))
    monkeypatch.setattr(groups.repository, "ROSTER_WINDOW", 3)
    chunks = list(repository.iter_roster_json(key))
    members = [orjson.loads(b"[" + chunk + b"]") for chunk in chunks]
    assert [len(chunk) for chunk in members] == [3, 3, 3, 3]
    assert [m["entity"]["reference"] for chunk in members for m in chunk] == refs

    later = rows(2, [(refs[1], "updated", "2020"), (refs[2], "removed", "")])
    for batch in (later, later, rows(3, [(refs[1], "updated", "2021")])):
        repository.client.insert(EVENTS, EVENT_COLUMNS, batch)
    monkeypatch.setattr(groups.repository, "ROSTER_WINDOW", 1000)
    rendered = orjson.loads(b"[" + b",".join(repository.iter_roster_json(key)) + b"]")
    assert [m["entity"]["reference"] for m in rendered] == refs[:2] + refs[3:]
    assert rendered[1] == {"entity": {"reference": refs[1]}, "period": {"start": "2021"}}


def test_read_ahead_keeps_order_raises_in_order_and_stops_on_close():
    """The window being read ahead: items come in order, a failure reaches the caller after
    the items before it, closing the stream early fetches nothing more, and streams share
    the process's helper threads (kept between streams, so their CPU stays visible)."""
    import threading

    from groups.repository import _read_ahead

    fetched: list[int] = []

    def items(fail_at=None):
        for i in range(5):
            if i == fail_at:
                raise RuntimeError("ClickHouse went away")
            fetched.append(i)
            yield str(i).encode()

    assert list(_read_ahead(items())) == [b"0", b"1", b"2", b"3", b"4"]
    got = []
    with pytest.raises(RuntimeError, match="went away"):
        for item in _read_ahead(items(fail_at=3)):
            got.append(item)
    assert got == [b"0", b"1", b"2"]
    fetched.clear()
    stream = _read_ahead(items())
    assert next(stream) == b"0"
    stream.close()
    assert fetched == [0, 1]  # the one read ahead, no more

    def helpers():
        return {t for t in threading.enumerate() if t.name.startswith("roster-read-ahead")}

    for _ in range(20):
        assert len(list(_read_ahead(items()))) == 5
    assert 1 <= len(helpers()) <= 8  # kept between streams, never more than the pool's
