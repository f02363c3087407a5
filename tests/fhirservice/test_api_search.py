"""Search through the HTTP API: searchset Bundles, result parameters, paging, parameters.

Common parameters (_id, _lastUpdated with every prefix), result parameters (_count, _sort,
_total, _summary, _elements), the Patient and Group parameters, lenient versus strict
handling of unknown parameters, and keyset paging that stays correct while others write.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import urlencode

import pytest
from django.test import override_settings

from fhirservice.models import StoredResource, minute_of
from fhirservice.search.query import MSG_UNKNOWN_PARAM
from fhirservice.store.services import format_instant, now
from tests.fhirservice.test_api_errors import assert_outcome
from tests.support import patient

# Groups are stored here: their rosters need the ClickHouse tables.

SERVER = "http://testserver/4_0_0"
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}

PEOPLE = {
    "peter": {
        "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
        "gender": "male",
        "birthDate": "1974-12-25",
        "identifier": [{"system": "urn:mrn", "value": "12345"}],
        "maritalStatus": {"text": "married"},
        "text": {
            "status": "generated",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml">Peter</div>',
        },
    },
    "anna": {
        "name": [{"family": "Müller", "given": ["Anna"], "prefix": ["Dr."]}],
        "gender": "female",
        "birthDate": "1980-03",
        "identifier": [{"system": "urn:mrn", "value": "555"}, {"value": "no-system"}],
    },
    "bob": {
        "name": [{"family": "Chalmers-Smith", "given": ["Bob"]}],
        "gender": "male",
        "birthDate": "2001",
        "identifier": [{"system": "urn:other", "value": "12345"}],
    },
    "carl": {"name": [{"text": "Carl Xu"}], "gender": "other"},
}


def local(url: str) -> str:
    """A link of the API as a path below the FHIR base."""
    assert url.startswith(SERVER), url
    return url[len(SERVER) :]


def next_link(bundle: dict) -> str | None:
    nexts = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
    return local(nexts[0]) if nexts else None


@pytest.fixture
def people(api) -> dict[str, str]:
    """The PEOPLE stored as Patients: name -> id (and id -> name)."""
    ids = {}
    for key, fields in PEOPLE.items():
        rid = api.post("/Patient", {"resourceType": "Patient", **fields}).body["id"]
        ids[key] = rid
        ids[rid] = key
    return ids


def search(api, people, resource_type="Patient", params=(), **kwargs) -> list[str]:
    """The names of the matches, in the order served (one page)."""
    response = api.get(f"/{resource_type}?{urlencode(list(params))}", **kwargs)
    assert response.status == 200, response
    bundle = response.body
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    matches = [e for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
    for entry in matches:
        resource = entry["resource"]
        assert entry["fullUrl"] == f"{SERVER}/{resource['resourceType']}/{resource['id']}"
    return [people.get(e["resource"]["id"], e["resource"]["id"]) for e in matches]


def found(api, people, *params, resource_type="Patient") -> set[str]:
    return set(search(api, people, resource_type, params))


# --- common parameters -------------------------------------------------------------------


def test_search_without_parameters_finds_every_current_resource(api, people):
    api.delete(f"/Patient/{people['carl']}")
    api.post("/Observation", {"resourceType": "Observation", "status": "final", "code": {}})
    bundle = api.get("/Patient").body
    assert bundle["total"] == 3
    assert {people[e["resource"]["id"]] for e in bundle["entry"]} == {"peter", "anna", "bob"}
    assert all(e["search"] == {"mode": "match"} for e in bundle["entry"])
    assert bundle["link"] == [{"relation": "self", "url": f"{SERVER}/Patient"}]


def test_search_by_id(api, people):
    assert found(api, people, ("_id", people["anna"])) == {"anna"}
    assert found(api, people, ("_id", f"{people['anna']},{people['bob']}")) == {"anna", "bob"}
    assert found(api, people, ("_id", "nobody")) == set()
    assert found(api, people, ("_id", people["anna"]), resource_type="Observation") == set()


def test_search_by_last_updated_with_every_prefix(api):
    stamps, ids = [], {}
    for key in ("a", "b", "c"):
        body = api.post("/Patient", patient(family=key)).body
        ids[body["id"]] = key
        stamps.append(body["meta"]["lastUpdated"])
        time.sleep(0.005)
    a, b, c = stamps
    assert a < b < c

    def at(*values):
        return found(api, ids, *[("_lastUpdated", v) for v in values])

    assert at(f"eq{b}") == at(b) == {"b"}
    zoned = datetime.fromisoformat(b).astimezone(timezone(timedelta(hours=2)))
    assert at(f"eq{zoned.isoformat(timespec='milliseconds')}") == {"b"}  # same instant, +02:00
    assert at(f"ne{b}") == {"a", "c"}
    assert at(f"gt{a}") == {"b", "c"}
    assert at(f"sa{a}") == {"b", "c"}
    assert at(f"ge{b}") == {"b", "c"}
    assert at(f"lt{c}") == {"a", "b"}
    assert at(f"eb{c}") == {"a", "b"}
    assert at(f"le{b}") == {"a", "b"}
    assert at(f"ge{a}", f"le{b}") == {"a", "b"}  # repeated parameter: AND
    assert at(f"{a},{c}") == {"a", "c"}  # comma: OR
    assert at(f"ge{a}", f"lt{a}") == set()
    assert at("ge2000-01-01") == {"a", "b", "c"}
    assert at("lt2000") == set()
    if a[:10] == c[:10]:  # not across midnight: the day holds all three
        assert at(a[:10]) == {"a", "b", "c"}


def test_search_by_last_updated_follows_updates(api, people):
    time.sleep(0.005)
    edge = format_instant(now())
    time.sleep(0.005)
    api.patch(f"/Patient/{people['bob']}", [{"op": "add", "path": "/active", "value": True}])
    assert found(api, people, ("_lastUpdated", f"gt{edge}")) == {"bob"}
    assert found(api, people, ("_lastUpdated", f"lt{edge}")) == {"peter", "anna", "carl"}


def test_last_updated_within_and_across_minutes(api):
    # The index of time holds the minute (StoredResource.updated_minute); a range that starts
    # or ends inside a minute, and a sort over several, still go by the instant.
    at = {
        "a": datetime(2026, 1, 1, 10, 0, 50, tzinfo=UTC),
        "b": datetime(2026, 1, 1, 10, 1, 10, tzinfo=UTC),
        "c": datetime(2026, 1, 1, 10, 1, 40, tzinfo=UTC),
        "d": datetime(2026, 1, 1, 10, 2, 5, tzinfo=UTC),
    }
    ids = {}
    for name, moment in at.items():
        rid = api.post("/Patient", patient(family=name)).body["id"]
        StoredResource.objects.filter(key=f"Patient/{rid}").update(
            last_updated=moment, updated_minute=minute_of(moment)
        )
        ids[rid] = name

    def matching(*values):
        return found(api, ids, *[("_lastUpdated", v) for v in values])

    assert matching("ge2026-01-01T10:01:20Z") == {"c", "d"}
    assert matching("gt2026-01-01T10:01:10Z") == {"c", "d"}
    assert matching("sa2026-01-01T10:00:50Z") == {"b", "c", "d"}
    assert matching("lt2026-01-01T10:01:40Z") == {"a", "b"}
    assert matching("le2026-01-01T10:01:40Z") == {"a", "b", "c"}
    assert matching("eb2026-01-01T10:02:05Z") == {"a", "b", "c"}
    assert matching("2026-01-01T10:01:10Z") == {"b"}
    assert matching("ne2026-01-01T10:01:10Z") == {"a", "c", "d"}
    assert matching("ge2026-01-01T10:00:55Z", "lt2026-01-01T10:02:00Z") == {"b", "c"}
    for sort, order in (("_lastUpdated", "abcd"), ("-_lastUpdated", "dcba")):
        served, url = [], f"/Patient?_sort={sort}&_count=1"
        while url is not None:
            bundle = api.get(url).body
            served.extend(ids[e["resource"]["id"]] for e in bundle.get("entry", []))
            url = next_link(bundle)
        assert "".join(served) == order


@pytest.mark.parametrize("value", ["yesterday", "gt", "xx2020", "2020-02-30", "ge2020-1-1"])
def test_a_malformed_last_updated_is_400(api, value):
    assert_outcome(
        api.get(f"/Patient?{urlencode({'_lastUpdated': value})}"), 400, "MSG_PARAM_INVALID"
    )


# --- result parameters -------------------------------------------------------------------


def test_count_pages_through_everything_once_in_id_order(api, people):
    pages, seen, url = 0, [], "/Patient?_count=3"
    while url:
        bundle = api.get(url).body
        assert bundle["total"] == 4
        seen.extend(e["resource"]["id"] for e in bundle.get("entry", []))
        assert len(bundle.get("entry", [])) <= 3
        url = next_link(bundle)
        pages += 1
    assert pages == 2
    assert seen == sorted(people[k] for k in PEOPLE)


def test_count_zero_gives_the_total_only(api, people):
    bundle = api.get("/Patient?_count=0").body
    assert bundle["total"] == 4
    assert "entry" not in bundle


@pytest.mark.parametrize("value", ["ten", "-1", "1.5", ""])
def test_a_malformed_count_is_400(api, value):
    assert_outcome(api.get(f"/Patient?_count={value}"), 400, "MSG_PARAM_INVALID")


def test_count_is_capped_by_max_count_and_defaults_to_default_count(api, people):
    with override_settings(FHIR_SERVICE={"MAX_COUNT": 2, "DEFAULT_COUNT": 1}):
        assert len(api.get("/Patient?_count=100").body["entry"]) == 2
        default = api.get("/Patient").body
        assert len(default["entry"]) == 1
        assert next_link(default) is not None


@pytest.mark.parametrize(
    ("sort", "key"),
    [
        ("_id", lambda e: e["id"]),
        ("-_id", lambda e: e["id"]),
        ("_lastUpdated", lambda e: (e["meta"]["lastUpdated"], e["id"])),
        ("-_lastUpdated", lambda e: (e["meta"]["lastUpdated"], e["id"])),
    ],
)
def test_sort(api, sort, key):
    for index in range(6):
        api.post("/Patient", patient(family=f"P{index}"))
        if index % 2:
            time.sleep(0.003)  # some share a millisecond, some do not
    descending = sort.startswith("-")
    bundle = api.get(f"/Patient?_sort={sort}").body
    resources = [e["resource"] for e in bundle["entry"]]
    assert len(resources) == 6
    assert resources == sorted(resources, key=key, reverse=descending)
    # The same order across pages.
    paged, url = [], f"/Patient?_sort={sort}&_count=4"
    while url:
        page = api.get(url).body
        paged.extend(e["resource"] for e in page.get("entry", []))
        url = next_link(page)
    assert paged == resources


def test_sort_by_last_updated_then_id(api, people):
    api.patch(f"/Patient/{people['anna']}", [{"op": "add", "path": "/active", "value": True}])
    assert search(api, people, params=[("_sort", "-_lastUpdated")])[0] == "anna"
    assert search(api, people, params=[("_sort", "_lastUpdated")])[-1] == "anna"
    both = search(api, people, params=[("_sort", "_lastUpdated,-_id")])
    assert both[-1] == "anna"


@pytest.mark.parametrize("value", ["bogus", "-", "_id,bogus", "_content", "--name"])
def test_an_unknown_sort_is_400(api, value):
    assert_outcome(api.get(f"/Patient?_sort={value}"), 400, "MSG_SORT_UNKNOWN")


def test_total(api, people):
    assert "total" not in api.get("/Patient?_total=none").body
    assert api.get("/Patient?_total=estimate").body["total"] == 4
    assert api.get("/Patient?_total=accurate&gender=male").body["total"] == 2
    assert_outcome(api.get("/Patient?_total=some"), 400, "MSG_PARAM_INVALID")


def test_summary_count(api, people):
    bundle = api.get("/Patient?_summary=count&gender=male").body
    assert bundle["total"] == 2
    assert "entry" not in bundle
    assert api.get("/Patient?_summary=count&_total=none").body["total"] == 4


def test_summary_true_keeps_summary_elements(api, people):
    bundle = api.get(f"/Patient?_id={people['peter']}&_summary=true").body
    resource = bundle["entry"][0]["resource"]
    assert set(resource) == {
        "resourceType",
        "id",
        "meta",
        "name",
        "gender",
        "birthDate",
        "identifier",
    }
    assert SUBSETTED in resource["meta"]["tag"]
    assert resource["meta"]["versionId"] == "1"


def test_summary_text_and_data(api, people):
    query = f"/Patient?_id={people['peter']}"
    text = api.get(f"{query}&_summary=text").body["entry"][0]["resource"]
    assert set(text) == {"resourceType", "id", "meta", "text"}
    data = api.get(f"{query}&_summary=data").body["entry"][0]["resource"]
    assert "text" not in data and data["maritalStatus"] == {"text": "married"}
    assert SUBSETTED in text["meta"]["tag"] and SUBSETTED in data["meta"]["tag"]
    full = api.get(f"{query}&_summary=false").body["entry"][0]["resource"]
    assert "tag" not in full["meta"] and "text" in full
    assert_outcome(api.get(f"{query}&_summary=yes"), 400, "MSG_PARAM_INVALID")


def test_elements(api, people):
    bundle = api.get("/Patient?_elements=gender,birthDate&_sort=_id").body
    for entry in bundle["entry"]:
        resource = entry["resource"]
        assert set(resource) <= {"resourceType", "id", "meta", "gender", "birthDate"}
        assert resource["gender"] == PEOPLE[people[resource["id"]]]["gender"]
        assert SUBSETTED in resource["meta"]["tag"]
    read = api.get(f"/Patient/{people['anna']}?_elements=name").body
    assert set(read) == {"resourceType", "id", "meta", "name"}
    assert SUBSETTED in read["meta"]["tag"]


def test_elements_keep_mandatory_elements(api):
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "weight"},
        "valueString": "heavy",
        "issued": "2024-01-01T00:00:00Z",
    }
    rid = api.post("/Observation", obs).body["id"]
    # The client checks every body with the strict R4 models, which need status and code.
    resource = api.get("/Observation?_elements=issued").body["entry"][0]["resource"]
    assert set(resource) == {"resourceType", "id", "meta", "status", "code", "issued"}
    text = api.get(f"/Observation/{rid}?_summary=text").body
    assert set(text) == {"resourceType", "id", "meta", "status", "code"}


# --- Patient parameters ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([("identifier", "urn:mrn|12345")], {"peter"}),
        ([("identifier", "12345")], {"peter", "bob"}),
        ([("identifier", "urn:mrn|")], {"peter", "anna"}),
        ([("identifier", "|no-system")], {"anna"}),
        ([("identifier", "|555")], set()),
        ([("identifier", "urn:mrn|555,urn:other|12345")], {"anna", "bob"}),
        ([("name", "chal")], {"peter", "bob"}),
        ([("name", "CHALMERS")], {"peter", "bob"}),
        ([("name", "james")], {"peter"}),
        ([("name", "dr")], {"anna"}),
        ([("name", "muller")], {"anna"}),
        ([("name", "Müll")], {"anna"}),
        ([("name", "carl xu")], {"carl"}),
        ([("name", "halmers")], set()),
        ([("name:contains", "halmers")], {"peter", "bob"}),
        ([("name:contains", "smith")], {"bob"}),
        ([("name:exact", "Chalmers")], {"peter"}),
        ([("name:exact", "chalmers")], set()),
        ([("name:exact", "Muller")], set()),
        ([("name:exact", "Müller")], {"anna"}),
        ([("family", "chalmers")], {"peter", "bob"}),
        ([("family:exact", "Chalmers-Smith")], {"bob"}),
        ([("family", "peter")], set()),
        ([("given", "peter")], {"peter"}),
        ([("given", "jam,bo")], {"peter", "bob"}),
        ([("birthdate", "1974-12-25")], {"peter"}),
        ([("birthdate", "1974")], {"peter"}),
        ([("birthdate", "1980-03")], {"anna"}),
        ([("birthdate", "1980-03-15")], set()),
        ([("birthdate", "ge1980")], {"anna", "bob"}),
        ([("birthdate", "lt1980")], {"peter"}),
        ([("birthdate", "gt1980-03")], {"bob"}),
        ([("birthdate", "le2001")], {"peter", "anna", "bob"}),
        ([("birthdate", "ne1974-12-25")], {"anna", "bob"}),
        ([("birthdate", "sa1980-03-31")], {"bob"}),
        ([("birthdate", "eb1980")], {"peter"}),
        ([("birthdate", "ge1970"), ("birthdate", "lt1990")], {"peter", "anna"}),
        ([("gender", "male")], {"peter", "bob"}),
        ([("gender", "female,other")], {"anna", "carl"}),
        ([("gender", "unknown")], set()),
        ([("family", "chalmers"), ("gender", "male"), ("birthdate", "ge1990")], {"bob"}),
    ],
)
def test_patient_parameters(api, people, params, expected):
    assert found(api, people, *params) == expected


def test_the_index_follows_updates_and_deletes(api, people):
    rid = people["peter"]
    api.patch(f"/Patient/{rid}", [{"op": "replace", "path": "/gender", "value": "female"}])
    assert found(api, people, ("gender", "male")) == {"bob"}
    assert found(api, people, ("gender", "female")) == {"anna", "peter"}
    api.delete(f"/Patient/{rid}")
    assert found(api, people, ("gender", "female")) == {"anna"}
    assert found(api, people, ("_id", rid)) == set()
    api.put(f"/Patient/{rid}", {"resourceType": "Patient", "id": rid, "gender": "other"})
    assert found(api, people, ("gender", "other")) == {"carl", "peter"}


# --- Group parameters --------------------------------------------------------------------


@pytest.fixture
def groups(api) -> dict[str, str]:
    bodies = {
        "ward": {
            "identifier": [{"system": "urn:groups", "value": "g-1"}],
            "name": "Ward Seven",
            "type": "person",
            "actual": True,
            "code": {"coding": [{"system": "urn:kinds", "code": "ward"}]},
            "managingEntity": {"reference": "Organization/org-1"},
        },
        "study": {
            "identifier": [{"system": "urn:groups", "value": "g-2"}],
            "name": "Diabetes study",
            "type": "person",
            "actual": False,
            "code": {"coding": [{"system": "urn:kinds", "code": "study"}]},
            "managingEntity": {"reference": "Practitioner/org-1"},
        },
        "devices": {
            "name": "Pumps",
            "type": "device",
            "actual": True,
            "managingEntity": {"reference": "Organization/org-2"},
        },
    }
    ids = {}
    for key, fields in bodies.items():
        rid = api.post("/Group", {"resourceType": "Group", **fields}).body["id"]
        ids[key] = rid
        ids[rid] = key
    return ids


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([("identifier", "urn:groups|g-1")], {"ward"}),
        ([("identifier", "g-2")], {"study"}),
        ([("name", "ward")], {"ward"}),
        ([("name:contains", "study")], {"study"}),
        ([("type", "person")], {"ward", "study"}),
        ([("type", "device")], {"devices"}),
        ([("actual", "true")], {"ward", "devices"}),
        ([("actual", "false")], {"study"}),
        ([("code", "urn:kinds|ward")], {"ward"}),
        ([("code", "study")], {"study"}),
        ([("code", "other|ward")], set()),
        ([("managing-entity", "Organization/org-1")], {"ward"}),
        ([("managing-entity", "org-1")], {"ward", "study"}),
        ([("managing-entity:Organization", "org-1")], {"ward"}),
        ([("managing-entity", "Organization/org-2,Practitioner/org-1")], {"devices", "study"}),
        ([("type", "person"), ("actual", "true")], {"ward"}),
    ],
)
def test_group_parameters(api, groups, params, expected):
    assert found(api, groups, *params, resource_type="Group") == expected


# --- unknown and malformed parameters ----------------------------------------------------


def test_unknown_parameters_are_ignored_and_reported_under_lenient_handling(api, people):
    for headers in ({"Prefer": "handling=lenient"},):
        response = api.get("/Patient?gender=male&shoe-size=42&colour=red", headers=headers)
        bundle = response.body
        matches = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
        assert {people[e["resource"]["id"]] for e in matches} == {"peter", "bob"}
        assert bundle["total"] == 2
        outcomes = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
        assert len(outcomes) == 1
        outcome = outcomes[0]["resource"]
        assert outcome["resourceType"] == "OperationOutcome"
        assert [(i["severity"], i["code"], i["diagnostics"]) for i in outcome["issue"]] == [
            ("warning", "not-supported", "Unknown search parameter 'shoe-size' was ignored"),
            ("warning", "not-supported", "Unknown search parameter 'colour' was ignored"),
        ]
        assert bundle["link"][0] == {"relation": "self", "url": f"{SERVER}/Patient?gender=male"}


@pytest.mark.parametrize(
    ("resource_type", "query", "name"),
    [
        ("Patient", "shoe-size=42", "shoe-size"),
        ("Patient", "gender=male&shoe-size=42", "shoe-size"),
        ("Observation", "shoe-size=1234", "shoe-size"),
        ("Group", "colour=red", "colour"),
    ],
)
@pytest.mark.parametrize("headers", [{}, {"Prefer": "handling=strict"}])
def test_unknown_parameters_are_400_unless_lenient(api, resource_type, query, name, headers):
    response = api.get(f"/{resource_type}?{query}", headers=headers)
    issue = assert_outcome(response, 400, "MSG_PARAM_UNKNOWN")
    assert issue["diagnostics"] == MSG_UNKNOWN_PARAM.format(name=name, type=resource_type)


def test_known_parameters_pass_strict_handling(api, people):
    response = api.get(
        "/Patient?gender=male&_count=5&_sort=_id&_total=accurate&_elements=gender",
        headers={"Prefer": "handling=strict"},
    )
    assert response.status == 200
    assert response.body["total"] == 2


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("gender:exact=male", "MSG_PARAM_MODIFIER_INVALID"),
        ("name:text=x", "MSG_PARAM_MODIFIER_INVALID"),
        ("birthdate:above=2000", "MSG_PARAM_MODIFIER_INVALID"),
        ("birthdate=last-tuesday", "MSG_PARAM_INVALID"),
        ("birthdate=zz2000", "MSG_PARAM_INVALID"),
        ("gender=", "MSG_PARAM_INVALID"),
        ("gender=male,", "MSG_PARAM_INVALID"),
        ("_cursor=not-a-cursor", "MSG_PARAM_INVALID"),
    ],
)
def test_malformed_parameters_are_400(api, query, detail):
    assert_outcome(api.get(f"/Patient?{query}"), 400, detail)


def test_a_cursor_from_another_sort_is_400(api, people):
    url = next_link(api.get("/Patient?_count=1&_sort=_lastUpdated").body)
    cursor = url.split("_cursor=")[1]
    assert_outcome(api.get(f"/Patient?_count=1&_cursor={cursor}"), 400, "MSG_PARAM_INVALID")


def test_search_of_an_unknown_type_is_404(api):
    assert_outcome(api.get("/Nothing?name=x"), 404, "MSG_UNKNOWN_TYPE")


# --- paging while others write -----------------------------------------------------------


@pytest.mark.parametrize("sort", ["_id", "-_id", "_lastUpdated", "-_lastUpdated"])
def test_paging_stays_correct_while_others_write(api, sort):
    existing = {api.post("/Patient", patient(family=f"E{i}")).body["id"] for i in range(10)}
    doomed = api.post("/Patient", patient(family="Doomed")).body["id"]
    created = set()
    seen: list[str] = []
    bundle = api.get(f"/Patient?_sort={sort}&_count=3").body
    pages = 1
    while True:
        seen.extend(e["resource"]["id"] for e in bundle.get("entry", []))
        # Others write between page fetches: new resources, and a delete.
        for _ in range(2):
            created.add(api.post("/Patient", patient(family="New")).body["id"])
        if pages == 2:
            api.delete(f"/Patient/{doomed}")
        url = next_link(bundle)
        if url is None:
            break
        bundle = api.get(url).body
        pages += 1
        assert pages < 20
    assert len(seen) == len(set(seen)), "a resource was served twice"
    assert existing <= set(seen), "a resource that existed throughout was skipped"
    assert set(seen) <= existing | created | {doomed}
    if sort == "-_lastUpdated":
        assert not created & set(seen)  # newer ones sort before the first page
    order = [s for s in seen if s in existing]
    if sort.endswith("_id"):
        assert order == sorted(order, reverse=sort.startswith("-"))


def test_next_links_keep_the_search(api, people):
    bundle = api.get("/Patient?gender=male&_count=1&_sort=-_id").body
    url = next_link(bundle)
    assert url.startswith("/Patient?gender=male&_count=1&_sort=-_id&_cursor=")
    second = api.get(url).body
    assert second["link"][0] == {"relation": "self", "url": SERVER + url}
    ids = [bundle["entry"][0]["resource"]["id"], second["entry"][0]["resource"]["id"]]
    assert ids == sorted([people["peter"], people["bob"]], reverse=True)
    assert next_link(second) is None
