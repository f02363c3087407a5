"""Chained search, ``_has``, ``_include`` and ``_revinclude`` through the HTTP API.

One small world of Organizations, a Practitioner, Patients, a Group (its roster in
ClickHouse) and Observations; chains of one to three levels, ``:Type`` where a reference
has several targets, ``_has`` plain and nested, includes with and without ``:iterate``,
``*``, reverse includes, ``Group:member`` both ways with the per-page cap, organization
boundaries and scopes, de-duplication, paging, the CapabilityStatement and bad input.
"""

from __future__ import annotations

from typing import Any

import pytest

from fhirservice.search.chain import MSG_AMBIGUOUS, MSG_BAD_TARGET, MSG_NOT_REFERENCE
from fhirservice.search.include import MSG_INCLUDES_CAPPED
from tests.access.conftest import make_client
from tests.fhirservice.test_api_errors import assert_outcome
from tests.fhirservice.test_api_search import next_link

STRICT = {"Prefer": "handling=strict"}
LENIENT = {"Prefer": "handling=lenient"}
LOINC = "http://loinc.org"


def _post(api: Any, body: dict[str, Any]) -> str:
    response = api.post(f"/{body['resourceType']}", body)
    assert response.status == 201, response
    return response.body["id"]


def build_world(api: Any) -> dict[str, str]:
    """The test world: name -> id."""
    ids: dict[str, str] = {}
    ids["acme"] = _post(api, {"resourceType": "Organization", "name": "Acme"})
    ids["lab"] = _post(
        api,
        {
            "resourceType": "Organization",
            "name": "Acme Lab",
            "partOf": {"reference": f"Organization/{ids['acme']}"},
        },
    )
    ids["who"] = _post(api, {"resourceType": "Practitioner", "name": [{"family": "Who"}]})
    ids["peter"] = _post(
        api,
        {
            "resourceType": "Patient",
            "name": [{"family": "Chalmers", "given": ["Peter"]}],
            "generalPractitioner": [{"reference": f"Practitioner/{ids['who']}"}],
            "managingOrganization": {"reference": f"Organization/{ids['lab']}"},
        },
    )
    ids["anna"] = _post(
        api,
        {
            "resourceType": "Patient",
            "name": [{"family": "Müller", "given": ["Anna"]}],
            "managingOrganization": {"reference": f"Organization/{ids['acme']}"},
        },
    )
    ids["cohort"] = _post(
        api,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "name": "Cohort",
            "member": [
                {"entity": {"reference": f"Patient/{ids['peter']}"}},
                {"entity": {"reference": f"Patient/{ids['anna']}"}},
            ],
        },
    )

    def observation(subject: str, code: str, **extra: Any) -> str:
        return _post(
            api,
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": LOINC, "code": code}]},
                "subject": {"reference": subject},
                **extra,
            },
        )

    ids["o-peter"] = observation(
        f"Patient/{ids['peter']}",
        "8867-4",
        performer=[{"reference": f"Practitioner/{ids['who']}"}],
    )
    ids["o-peter-2"] = observation(f"Patient/{ids['peter']}", "2339-0")
    ids["o-anna"] = observation(f"Patient/{ids['anna']}", "2339-0")
    ids["o-cohort"] = observation(f"Group/{ids['cohort']}", "8867-4")
    return ids


@pytest.fixture
def world(api: Any) -> dict[str, str]:
    return build_world(api)


def search(api: Any, query: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = api.get(query, headers=headers or {})
    assert response.status == 200, response
    assert response.body["type"] == "searchset"
    return response.body


def entries(bundle: dict[str, Any], mode: str) -> list[str]:
    """``Type/id`` of the entries with this search mode, in Bundle order."""
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == mode
    ]


def outcome_issues(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    found = [e for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"]
    return found[0]["resource"]["issue"] if found else []


# --- chains ---------------------------------------------------------------------------------


def test_chain_one_level_with_type(api, world) -> None:
    bundle = search(api, "/Observation?subject:Patient.name=peter")
    assert sorted(entries(bundle, "match")) == sorted(
        [f"Observation/{world['o-peter']}", f"Observation/{world['o-peter-2']}"]
    )
    bundle = search(api, "/Observation?subject:Patient.name=peter&code=8867-4")
    assert entries(bundle, "match") == [f"Observation/{world['o-peter']}"]
    bundle = search(api, "/Observation?patient.given=pet&code=8867-4")  # patient: Patient only
    assert entries(bundle, "match") == [f"Observation/{world['o-peter']}"]


def test_chain_two_and_three_levels(api, world) -> None:
    # general-practitioner refers to Practitioner, Organization or PractitionerRole; only
    # Practitioner has `family`, so the chain needs no :Type there.
    bundle = search(api, "/Observation?subject:Patient.general-practitioner.family=who")
    assert sorted(entries(bundle, "match")) == sorted(
        [f"Observation/{world['o-peter']}", f"Observation/{world['o-peter-2']}"]
    )
    bundle = search(api, "/Observation?subject:Patient.organization.partof.name=acme")
    assert len(entries(bundle, "match")) == 2  # Peter's: his Lab is part of Acme
    bundle = search(api, "/Patient?organization.name=acme lab")
    assert entries(bundle, "match") == [f"Patient/{world['peter']}"]
    bundle = search(api, "/Observation?subject:Patient.organization.partof.name=nobody")
    assert entries(bundle, "match") == []


def test_chain_through_several_targets_must_name_the_type(api, world) -> None:
    # Observation.subject refers to Device, Group, Location or Patient: all but Device have
    # `name`.
    issue = assert_outcome(api.get("/Observation?subject.name=peter"), 400, "MSG_PARAM_INVALID")
    assert issue["diagnostics"] == MSG_AMBIGUOUS.format(
        type="Observation",
        name="subject",
        targets="Group, Location, Patient",
        first="Group",
        rest="name",
    )
    issue = assert_outcome(
        api.get("/Observation?subject:Encounter.name=x"), 400, "MSG_PARAM_INVALID"
    )
    assert issue["diagnostics"] == MSG_BAD_TARGET.format(
        target="Encounter", type="Observation", name="subject", chain="subject:Encounter.name"
    )


def test_chain_bad_input(api, world) -> None:
    issue = assert_outcome(api.get("/Observation?code.name=x"), 400, "MSG_PARAM_INVALID")
    assert issue["diagnostics"] == MSG_NOT_REFERENCE.format(
        name="code", type="Observation", chain="code.name"
    )
    for query in (
        "/Observation?subject:Patient.bogus=x",
        "/Observation?bogus:Patient.name=x",
        "/Observation?subject:Patient.organization.bogus=x",
        "/Patient?_has:Observation:bogus:code=x",
        "/Patient?_has:Observation:subject:bogus=x",
    ):
        assert_outcome(api.get(query, headers=STRICT), 400, "MSG_PARAM_UNKNOWN")
        lenient = search(api, query, headers=LENIENT)  # ignored, and said so
        assert [i["code"] for i in outcome_issues(lenient)] == ["not-supported"]
        assert all("bogus" not in link["url"] for link in lenient["link"])
    for query in (
        "/Observation?subject:Patient.=x",
        "/Patient?_has:Observation:subject=x",
        "/Patient?_has:Nothing:subject:code=x",
        "/Organization?_has:Observation:subject:code=x",  # subject never refers to one
        "/Group?member:Patient.name=x",  # the roster is not in the index
        "/Observation?subject:Patient.organization.partof.partof.partof.name=x",
    ):
        assert_outcome(api.get(query, headers=LENIENT), 400, "MSG_PARAM_INVALID")


# --- _has -----------------------------------------------------------------------------------


def test_has_and_nested_has(api, world) -> None:
    bundle = search(api, f"/Patient?_has:Observation:subject:code={LOINC}|8867-4")
    assert entries(bundle, "match") == [f"Patient/{world['peter']}"]
    bundle = search(api, "/Patient?_has:Observation:patient:code=8867-4")
    assert entries(bundle, "match") == [f"Patient/{world['peter']}"]
    assert entries(search(api, "/Group?_has:Observation:patient:code=8867-4"), "match") == []
    bundle = search(api, "/Patient?_has:Observation:subject:code=2339-0")
    assert sorted(entries(bundle, "match")) == sorted(
        [f"Patient/{world['peter']}", f"Patient/{world['anna']}"]
    )
    bundle = search(api, "/Group?_has:Observation:subject:code=8867-4")
    assert entries(bundle, "match") == [f"Group/{world['cohort']}"]
    nested = "/Practitioner?_has:Patient:general-practitioner:_has:Observation:subject:code"
    assert entries(search(api, nested + "=8867-4"), "match") == [f"Practitioner/{world['who']}"]
    assert entries(search(api, nested + "=0000-0"), "match") == []
    # a chain inside _has
    bundle = search(api, "/Organization?_has:Patient:organization:general-practitioner.family=who")
    assert entries(bundle, "match") == [f"Organization/{world['lab']}"]


# --- _include / _revinclude -----------------------------------------------------------------


def test_include_subject(api, world) -> None:
    bundle = search(api, "/Observation?code=8867-4&_include=Observation:subject")
    assert sorted(entries(bundle, "match")) == sorted(
        [f"Observation/{world['o-peter']}", f"Observation/{world['o-cohort']}"]
    )
    assert sorted(entries(bundle, "include")) == sorted(
        [f"Patient/{world['peter']}", f"Group/{world['cohort']}"]
    )
    group = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Group")
    assert "member" not in group["resource"]  # a search entry never carries the roster
    typed = search(api, "/Observation?code=8867-4&_include=Observation:subject:Patient")
    assert entries(typed, "include") == [f"Patient/{world['peter']}"]
    assert bundle["total"] == 2  # includes are not counted


def test_include_leaves_out_deleted_resources_and_counts(api, world) -> None:
    assert api.delete(f"/Patient/{world['anna']}").status == 204
    bundle = search(api, "/Observation?code=2339-0&_include=Observation:subject")
    assert len(entries(bundle, "match")) == 2
    assert entries(bundle, "include") == [f"Patient/{world['peter']}"]
    counted = search(api, "/Observation?code=2339-0&_include=Observation:subject&_summary=count")
    assert counted["total"] == 2
    assert "entry" not in counted


def test_include_dedupes(api, world) -> None:
    # Two of Peter's Observations: Peter once.
    bundle = search(api, "/Observation?subject:Patient.name=peter&_include=Observation:subject")
    assert entries(bundle, "include") == [f"Patient/{world['peter']}"]
    # Acme is part of the matches already: not included again.
    bundle = search(api, "/Organization?_include=Organization:partof")
    assert len(entries(bundle, "match")) == 2
    assert entries(bundle, "include") == []


def test_include_iterate(api, world, settings) -> None:
    base = f"/Observation?_id={world['o-peter']}&_include=Observation:subject"
    plain = search(api, base + "&_include=Patient:organization")
    assert entries(plain, "include") == [f"Patient/{world['peter']}"]
    once = search(api, base + "&_include:iterate=Patient:organization")
    assert entries(once, "include") == [
        f"Patient/{world['peter']}",
        f"Organization/{world['lab']}",
    ]
    twice = search(
        api, base + "&_include:iterate=Patient:organization&_include:iterate=Organization:partof"
    )
    assert entries(twice, "include") == [
        f"Patient/{world['peter']}",
        f"Organization/{world['lab']}",
        f"Organization/{world['acme']}",
    ]
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "INCLUDE_ITERATE_DEPTH": 1}
    bounded = search(
        api, base + "&_include:iterate=Patient:organization&_include:iterate=Organization:partof"
    )
    assert entries(bounded, "include") == [
        f"Patient/{world['peter']}",
        f"Organization/{world['lab']}",
    ]


def test_include_wildcard(api, world) -> None:
    bundle = search(api, f"/Observation?_id={world['o-peter']}&_include=*")
    assert sorted(entries(bundle, "include")) == sorted(
        [f"Patient/{world['peter']}", f"Practitioner/{world['who']}"]
    )
    bundle = search(api, f"/Observation?_id={world['o-peter']}&_include=Observation:*:Practitioner")
    assert entries(bundle, "include") == [f"Practitioner/{world['who']}"]


def test_revinclude(api, world) -> None:
    bundle = search(api, f"/Patient?_id={world['peter']}&_revinclude=Observation:subject")
    assert entries(bundle, "match") == [f"Patient/{world['peter']}"]
    assert sorted(entries(bundle, "include")) == sorted(
        [f"Observation/{world['o-peter']}", f"Observation/{world['o-peter-2']}"]
    )
    bundle = search(
        api,
        f"/Practitioner?_id={world['who']}&_revinclude=Patient:general-practitioner"
        "&_revinclude:iterate=Observation:subject",
    )
    assert sorted(entries(bundle, "include")) == sorted(
        [
            f"Patient/{world['peter']}",
            f"Observation/{world['o-peter']}",
            f"Observation/{world['o-peter-2']}",
        ]
    )


def test_group_member_include_and_revinclude(api, world) -> None:
    bundle = search(api, f"/Group?_id={world['cohort']}&_include=Group:member")
    assert entries(bundle, "include") == sorted(
        [f"Patient/{world['peter']}", f"Patient/{world['anna']}"]
    )
    assert outcome_issues(bundle) == []
    bundle = search(api, f"/Patient?_id={world['anna']}&_revinclude=Group:member")
    assert entries(bundle, "include") == [f"Group/{world['cohort']}"]


def test_group_member_includes_with_inline_rosters(api, settings) -> None:
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "GROUP_ROSTER_STORAGE": "inline"}
    world = build_world(api)
    bundle = search(api, f"/Group?_id={world['cohort']}&_include=Group:member")
    assert entries(bundle, "include") == sorted(
        [f"Patient/{world['peter']}", f"Patient/{world['anna']}"]
    )
    bundle = search(api, f"/Patient?_id={world['peter']}&_revinclude=Group:member")
    assert entries(bundle, "include") == [f"Group/{world['cohort']}"]


def test_includes_are_capped_per_page(api, world, settings) -> None:
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "INCLUDE_MAX": 1}
    bundle = search(api, f"/Group?_id={world['cohort']}&_include=Group:member")
    assert len(entries(bundle, "include")) == 1
    issues = outcome_issues(bundle)
    assert [(i["severity"], i["code"]) for i in issues] == [("warning", "too-costly")]
    assert issues[0]["diagnostics"] == MSG_INCLUDES_CAPPED.format(limit=1)
    bundle = search(api, "/Observation?code=2339-0&_include=Observation:subject")
    assert len(entries(bundle, "include")) == 1
    assert len(outcome_issues(bundle)) == 1


def test_paging_with_includes(api, world) -> None:
    query = "/Observation?code=2339-0&_count=1&_include=Observation:subject"
    seen = []
    while query:
        bundle = search(api, query)
        (match,) = entries(bundle, "match")
        seen.append(match)
        (included,) = entries(bundle, "include")
        subject = api.get(f"/{match}").body["subject"]["reference"]
        assert included == subject
        query = next_link(bundle)
        if query:
            assert "_include=Observation%3Asubject" in query
    assert sorted(seen) == sorted(
        [f"Observation/{world['o-peter-2']}", f"Observation/{world['o-anna']}"]
    )


def test_include_bad_input(api, world) -> None:
    for query in ("/Observation?_include=Observation:bogus", "/Observation?_revinclude=Foo:x"):
        response = api.get(query, headers=STRICT)
        assert response.status == 400, response
    assert_outcome(
        api.get("/Observation?_include=Observation:bogus", headers=STRICT),
        400,
        "MSG_PARAM_UNKNOWN",
    )
    lenient = search(api, "/Observation?_include=Observation:bogus", headers=LENIENT)
    assert [i["code"] for i in outcome_issues(lenient)] == ["not-supported"]
    for query in (
        "/Observation?_include=Observation",
        "/Observation?_include=Observation:subject:Encounter",
        "/Observation?_include=Observation:code",
        "/Observation?_include:deep=Observation:subject",
        "/Patient?_revinclude=*",
    ):
        response = api.get(query, headers=LENIENT)
        assert response.status == 400, (query, response)


def test_capability_statement_lists_includes(api) -> None:
    statement = api.get("/metadata").body
    by_type = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert "Observation:subject" in by_type["Observation"]["searchInclude"]
    assert "*" in by_type["Observation"]["searchInclude"]
    assert "Group:member" in by_type["Group"]["searchInclude"]
    assert {"Patient:general-practitioner", "Observation:performer", "Group:member"} <= set(
        by_type["Practitioner"]["searchRevInclude"]
    )
    assert {"Observation:subject", "Group:member"} <= set(by_type["Patient"]["searchRevInclude"])


# --- boundaries and scopes ------------------------------------------------------------------


@pytest.fixture
def auth_on(settings: Any) -> None:
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": True}


def test_other_organizations_are_never_included_nor_chained(db, auth_on) -> None:
    org_a, org_b = make_client(organization="org-a"), make_client(organization="org-b")
    theirs = _post(org_b, {"resourceType": "Patient", "name": [{"family": "Secret"}]})
    ours = _post(org_a, {"resourceType": "Patient", "name": [{"family": "Open"}]})
    mine = _post(
        org_a,
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"code": "x"}]},
            "subject": {"reference": f"Patient/{theirs}"},
        },
    )
    _post(
        org_b,
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"code": "x"}]},
            "subject": {"reference": f"Patient/{ours}"},
        },
    )
    group = _post(
        org_b,
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": {"reference": f"Patient/{ours}"}}],
        },
    )
    bundle = search(org_a, f"/Observation?_id={mine}&_include=Observation:subject")
    assert entries(bundle, "match") == [f"Observation/{mine}"]
    assert entries(bundle, "include") == []
    bundle = search(org_a, "/Observation?subject:Patient.family=secret")
    assert entries(bundle, "match") == []
    bundle = search(
        org_a,
        f"/Patient?_id={ours}&_revinclude=Observation:subject&_revinclude=Group:member",
    )
    assert entries(bundle, "include") == []
    assert entries(search(org_a, "/Patient?_has:Observation:subject:code=x"), "match") == []
    # org-b sees its own Group and Observation reach org-a's Patient, but not the Patient
    bundle = search(org_b, f"/Group?_id={group}&_include=Group:member")
    assert entries(bundle, "include") == []


def test_types_the_token_cannot_read_are_left_out_and_cannot_be_chained_through(
    db, auth_on
) -> None:
    writer = make_client(organization="org-a")
    world = build_world(writer)
    reader = make_client(organization="org-a", scopes="system/Observation.rs")
    bundle = search(reader, f"/Observation?_id={world['o-peter']}&_include=*")
    assert entries(bundle, "match") == [f"Observation/{world['o-peter']}"]
    assert entries(bundle, "include") == []
    # chains and _has search the types they go through: that needs the search scope
    assert_outcome(
        reader.get("/Observation?subject:Patient.name=peter"), 403, "MSG_INSUFFICIENT_SCOPE"
    )
    patients = make_client(organization="org-a", scopes="system/Patient.rs")
    assert_outcome(
        patients.get("/Patient?_has:Observation:subject:code=8867-4"),
        403,
        "MSG_INSUFFICIENT_SCOPE",
    )
    both = make_client(organization="org-a", scopes="system/Patient.rs system/Observation.rs")
    bundle = search(both, "/Patient?_has:Observation:subject:code=8867-4")
    assert entries(bundle, "match") == [f"Patient/{world['peter']}"]
