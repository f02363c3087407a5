"""History at instance, type and system level: history Bundles, _count, _since, paging."""

from __future__ import annotations

import time
from urllib.parse import urlencode

import pytest

from fhirservice.models import ResourceVersion
from tests.fhirservice.test_api_errors import assert_outcome
from tests.support import patient

SERVER = "http://testserver/4_0_0"


def local(url: str) -> str:
    """A link of the API as a path below the FHIR base."""
    assert url.startswith(SERVER), url
    return url[len(SERVER) :]


def follow(api, path: str) -> tuple[list[dict], list[dict]]:
    """Every page from ``path`` on through the next links: (pages, entries)."""
    pages, entries = [], []
    url = path
    while url is not None:
        page = api.get(url)
        assert page.status == 200, page
        pages.append(page.body)
        entries.extend(page.body.get("entry", []))
        nexts = [link["url"] for link in page.body["link"] if link["relation"] == "next"]
        url = local(nexts[0]) if nexts else None
        assert len(pages) < 100, "paging does not end"
    return pages, entries


def version_of(entry: dict) -> tuple[str, int]:
    rid = entry["fullUrl"].rsplit("/", 1)[1]
    return rid, int(entry["response"]["etag"][3:-1])


def lifecycle(api) -> str:
    """create, update, patch, delete, re-create: versions 1..5 of one Patient."""
    rid = api.post("/Patient", patient()).body["id"]
    path = f"/Patient/{rid}"
    api.put(path, patient(family="Two", id=rid))
    api.patch(path, [{"op": "add", "path": "/gender", "value": "male"}])
    api.delete(path)
    api.put(path, patient(family="Five", id=rid))
    return rid


def test_instance_history_lists_every_version_newest_first(api):
    rid = lifecycle(api)
    response = api.get(f"/Patient/{rid}/_history")
    bundle = response.body
    assert response.status == 200
    assert bundle["type"] == "history"
    assert bundle["total"] == 5
    assert [version_of(e) for e in bundle["entry"]] == [(rid, v) for v in (5, 4, 3, 2, 1)]
    assert [e["request"]["method"] for e in bundle["entry"]] == [
        "PUT",
        "DELETE",
        "PATCH",
        "PUT",
        "POST",
    ]
    assert bundle["entry"][4]["request"]["url"] == "Patient"
    assert bundle["entry"][3]["request"]["url"] == f"Patient/{rid}"
    deleted = bundle["entry"][1]
    assert "resource" not in deleted
    for entry in bundle["entry"]:
        assert entry["fullUrl"] == f"{SERVER}/Patient/{rid}"
        if "resource" in entry:
            version = entry["response"]["etag"][3:-1]
            assert entry["resource"]["meta"]["versionId"] == version
            assert entry["resource"] == api.get(f"/Patient/{rid}/_history/{version}").body
            assert entry["response"]["lastModified"] == entry["resource"]["meta"]["lastUpdated"]
    assert bundle["entry"][2]["resource"]["gender"] == "male"
    assert bundle["entry"][0]["resource"]["name"][0]["family"] == "Five"
    assert bundle["link"] == [{"relation": "self", "url": f"{SERVER}/Patient/{rid}/_history"}]


def test_type_history_holds_only_that_type(api):
    first = lifecycle(api)
    second = api.post("/Patient", patient()).body["id"]
    api.post("/Observation", {"resourceType": "Observation", "status": "final", "code": {}})
    bundle = api.get("/Patient/_history").body
    assert bundle["type"] == "history"
    assert bundle["total"] == 6
    assert sorted(version_of(e) for e in bundle["entry"]) == sorted(
        [(first, v) for v in range(1, 6)] + [(second, 1)]
    )
    assert all(e["fullUrl"].startswith(f"{SERVER}/Patient/") for e in bundle["entry"])


def test_system_history_holds_every_type(api):
    lifecycle(api)
    obs = api.post(
        "/Observation", {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    ).body["id"]
    bundle = api.get("/_history").body
    assert bundle["type"] == "history"
    assert bundle["total"] == 6 == ResourceVersion.objects.count()
    assert bundle["entry"][0]["fullUrl"] == f"{SERVER}/Observation/{obs}"
    types = {e["fullUrl"].split("/")[-2] for e in bundle["entry"]}
    assert types == {"Patient", "Observation"}


def test_history_count_zero_gives_the_total_only(api):
    rid = lifecycle(api)
    bundle = api.get(f"/Patient/{rid}/_history?_count=0").body
    assert bundle["total"] == 5
    assert "entry" not in bundle


@pytest.mark.parametrize("level", ["instance", "type", "system"])
def test_following_next_links_gives_every_version_exactly_once(api, level):
    ids = [lifecycle(api) for _ in range(3)]
    for rid in ids[:2]:
        api.patch(f"/Patient/{rid}", [{"op": "add", "path": "/active", "value": True}])
    api.post("/Observation", {"resourceType": "Observation", "status": "final", "code": {}})
    path = {"instance": f"/Patient/{ids[0]}", "type": "/Patient", "system": ""}[level]
    queryset = ResourceVersion.objects.all()
    if level != "system":
        queryset = queryset.filter(resource_type="Patient")
    if level == "instance":
        queryset = queryset.filter(resource_id=ids[0])
    expected = sorted((row.resource_id, row.version_id) for row in queryset)
    pages, entries = follow(api, f"{path}/_history?_count=4")
    got = [version_of(e) for e in entries]
    assert sorted(got) == expected
    assert len(set(got)) == len(got)
    assert [len(p.get("entry", [])) for p in pages[:-1]] == [4] * (len(pages) - 1)
    assert all(p["total"] == len(expected) for p in pages)
    assert len(pages) == -(-len(expected) // 4)
    stamps = [e["response"]["lastModified"] for e in entries]
    assert stamps == sorted(stamps, reverse=True)


def test_paging_history_while_others_write(api):
    ids = [api.post("/Patient", patient()).body["id"] for _ in range(9)]
    existing = {(rid, 1) for rid in ids}
    page = api.get("/Patient/_history?_count=3").body
    seen = [version_of(e) for e in page["entry"]]
    while True:
        # Newer versions go to the front of the newest-first order: they must not shift what
        # the next link serves.
        api.patch(f"/Patient/{ids[0]}", [{"op": "add", "path": "/active", "value": True}])
        api.post("/Patient", patient())
        nexts = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nexts:
            break
        page = api.get(local(nexts[0])).body
        seen.extend(version_of(e) for e in page.get("entry", []))
    assert len(seen) == len(set(seen))
    assert set(seen) == existing


def test_since_keeps_versions_from_that_instant_on(api):
    rid = api.post("/Patient", patient()).body["id"]
    time.sleep(0.01)
    second = api.put(f"/Patient/{rid}", patient(family="Two", id=rid)).body
    time.sleep(0.01)
    api.put(f"/Patient/{rid}", patient(family="Three", id=rid))
    since = second["meta"]["lastUpdated"]
    for path in (f"/Patient/{rid}/_history", "/Patient/_history", "/_history"):
        bundle = api.get(f"{path}?{urlencode({'_since': since})}").body
        assert bundle["total"] == 2
        assert [version_of(e)[1] for e in bundle["entry"]] == [3, 2]
    future = api.get(f"/_history?{urlencode({'_since': '2999-01-01T00:00:00Z'})}").body
    assert future["total"] == 0
    assert "entry" not in future
    past = api.get("/_history?_since=2000-01-01").body
    assert past["total"] == 3


def test_since_and_count_survive_in_next_links(api):
    for _ in range(5):
        api.post("/Patient", patient())
    bundle = api.get("/Patient/_history?_count=2&_since=2000-01-01T00:00:00Z").body
    nexts = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    assert "_count=2" in nexts[0] and "_since=2000-01-01T00%3A00%3A00Z" in nexts[0]
    pages, entries = follow(api, local(nexts[0]))
    assert len(entries) == 3


@pytest.mark.parametrize(
    "query",
    ["_since=yesterday", "_since=2024-13-01", "_count=ten", "_count=-1", "_cursor=%%%"],
)
def test_bad_history_parameters_are_400(api, query):
    api.post("/Patient", patient())
    for path in ("/_history", "/Patient/_history"):
        assert_outcome(api.get(f"{path}?{query}"), 400, "MSG_PARAM_INVALID")


def test_history_of_unknown_things_is_404(api):
    assert_outcome(api.get("/Patient/nobody/_history"), 404, "MSG_NO_EXIST")
    assert_outcome(api.get("/Nothing/_history"), 404, "MSG_UNKNOWN_TYPE")
    assert_outcome(api.get("/Nothing/x/_history"), 404, "MSG_UNKNOWN_TYPE")


def test_history_of_a_deleted_resource_is_served(api):
    rid = api.post("/Patient", patient()).body["id"]
    api.delete(f"/Patient/{rid}")
    bundle = api.get(f"/Patient/{rid}/_history").body
    assert [(e["request"]["method"], version_of(e)[1]) for e in bundle["entry"]] == [
        ("DELETE", 2),
        ("POST", 1),
    ]
