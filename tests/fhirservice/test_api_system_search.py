"""System-level search (fhirservice.search.system): ``GET [base]?_type=…&…`` and ``GET [base]``
with the parameters common to all types (R4 search.html#all).

A parameter not defined for every type searched is a 400 OperationOutcome naming the types
that lack it (ignored, with a warning, under ``Prefer: handling=lenient``); results of
several types come in ``_id`` order, keyset-paged.
"""

from __future__ import annotations

import uuid

import pytest

from fhirservice.search.system import (
    MSG_ALL_TYPES_PARAM,
    MSG_PARAM_NOT_COMMON,
    MSG_SEVERAL_TYPES_SORT,
    MSG_SEVERAL_TYPES_UNSUPPORTED,
    MSG_TYPE_UNKNOWN,
)
from tests.fhirservice.test_api_errors import assert_outcome
from tests.support import patient

SERVER = "http://testserver/4_0_0"
LENIENT = {"Prefer": "handling=lenient"}


def found(response) -> list[str]:
    assert response.status == 200, response
    assert response.body["type"] == "searchset"
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in response.body.get("entry", [])
        if e["search"]["mode"] == "match"
    ]


@pytest.fixture
def made(api) -> dict[str, str]:
    """A Patient and an Observation sharing an identifier, and an Encounter, by type."""
    value = f"s-{uuid.uuid4()}"
    identifier = [{"system": "urn:sys", "value": value}]
    keys = {"value": value}
    for body in (
        patient(identifier=identifier, gender="female"),
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "x"},
            "identifier": identifier,
        },
        {"resourceType": "Encounter", "status": "planned", "class": {"code": "AMB"}},
    ):
        created = api.post(f"/{body['resourceType']}", body).body
        keys[body["resourceType"]] = f"{body['resourceType']}/{created['id']}"
    return keys


def test_type_list_searches_each_type_with_its_own_definition(api, made):
    response = api.get(f"?_type=Patient,Observation&identifier=urn:sys|{made['value']}")
    assert found(response) == sorted([made["Patient"], made["Observation"]])
    assert response.body["total"] == 2
    everything = api.get("?_type=Patient,Observation,Encounter&_count=100")
    assert set(found(everything)) >= {made["Patient"], made["Observation"], made["Encounter"]}


def test_a_parameter_some_listed_type_lacks_is_a_400_naming_the_type(api, made):
    response = api.get("?_type=Patient,Observation&gender=female")
    issue = assert_outcome(response, 400, "MSG_PARAM_UNKNOWN")
    assert issue["diagnostics"] == MSG_PARAM_NOT_COMMON.format(name="gender", types="Observation")
    lenient = api.get("?_type=Patient,Observation&gender=female&_count=100", headers=LENIENT)
    assert set(found(lenient)) >= {made["Patient"], made["Observation"]}
    outcome = lenient.body["entry"][-1]
    assert outcome["search"]["mode"] == "outcome"
    assert "gender=" not in lenient.body["link"][0]["url"]


def test_without_type_the_common_parameters_search_every_type(api, made):
    for key in (made["Patient"], made["Encounter"]):
        rid = key.split("/")[1]
        assert found(api.get(f"?_id={rid}")) == [key]
    others = found(api.get(f"?_id:not={made['Patient'].split('/')[1]}&_count=100"))
    assert made["Patient"] not in others and made["Encounter"] in others
    recent = api.get("?_lastUpdated=ge2000-01-01&_count=100")
    assert set(found(recent)) >= {made["Patient"], made["Observation"], made["Encounter"]}
    issue = assert_outcome(api.get("?gender=female"), 400, "MSG_PARAM_UNKNOWN")
    assert issue["diagnostics"] == MSG_ALL_TYPES_PARAM.format(name="gender")


def test_pages_of_several_types_follow_in_id_order(api, made):
    url, keys = "?_type=Patient,Observation,Encounter&_count=1", []
    while url:
        page = api.get(url)
        keys.extend(found(page))
        assert page.body["total"] >= 3
        nxt = [link["url"] for link in page.body["link"] if link["relation"] == "next"]
        url = nxt[0].replace(SERVER, "") if nxt else None
    assert keys == sorted(keys) and set(keys) >= {made["Patient"], made["Encounter"]}
    newest = found(api.get("?_type=Patient,Encounter&_sort=-_lastUpdated&_count=1"))
    assert newest == [made["Encounter"]]


@pytest.mark.parametrize(
    ("query", "detail", "text"),
    [
        ("?_type=Nope", "MSG_PARAM_INVALID", MSG_TYPE_UNKNOWN.format(value="Nope")),
        (
            "?_type=Patient,Observation&_sort=identifier",
            "MSG_SORT_UNKNOWN",
            MSG_SEVERAL_TYPES_SORT.format(value="identifier"),
        ),
        (
            "?_type=Patient&_include=Patient:organization",
            "MSG_PARAM_NOT_SUPPORTED",
            MSG_SEVERAL_TYPES_UNSUPPORTED.format(name="_include"),
        ),
    ],
)
def test_bad_system_searches_are_400(api, query, detail, text):
    issue = assert_outcome(api.get(query), 400, detail)
    assert issue["diagnostics"] == text


def test_without_type_the_indexed_common_parameters_search_every_type(api):
    # _tag, _profile, _security and _source are defined for Resource, so for every type:
    # a search of all types finds them on any type (R4 search.html#all).
    mark = uuid.uuid4().hex
    meta = {
        "tag": [{"system": "urn:tags", "code": mark}],
        "profile": [f"http://example.org/StructureDefinition/p-{mark}"],
        "security": [{"system": "urn:labels", "code": f"L{mark}"}],
        "source": f"urn:source:{mark}",
    }
    tagged = [
        patient(meta=meta),
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "meta": meta},
        {"resourceType": "Basic", "code": {"text": "b"}, "meta": {"tag": meta["tag"]}},
    ]
    keys = []
    for body in tagged:
        created = api.post(f"/{body['resourceType']}", body).body
        keys.append(f"{body['resourceType']}/{created['id']}")
    untagged = api.post(
        "/Encounter", {"resourceType": "Encounter", "status": "planned", "class": {"code": "AMB"}}
    ).body["id"]
    assert found(api.get(f"?_tag=urn:tags|{mark}")) == sorted(keys)
    assert found(api.get(f"?_tag={mark}&_type=Patient,Basic")) == sorted([keys[0], keys[2]])
    both = sorted(keys[:2])
    assert found(api.get(f"?_profile=http://example.org/StructureDefinition/p-{mark}")) == both
    assert found(api.get(f"?_security=urn:labels|L{mark}")) == both
    assert found(api.get(f"?_source=urn:source:{mark}")) == both
    # Combined with the columns and each other (AND), with modifiers as for one type.
    assert found(api.get(f"?_tag={mark}&_source=urn:source:{mark}&_id={untagged}")) == []
    assert found(api.get(f"?_tag={mark}&_profile:missing=true")) == [keys[2]]
    not_tagged = found(api.get(f"?_tag:not=urn:tags|{mark}&_id={untagged}"))
    assert not_tagged == [f"Encounter/{untagged}"]
    assert api.get(f"?_tag={mark}&_summary=count").body["total"] == 3
    # A malformed value is a 400 as for one type.
    assert_outcome(api.get("?_tag=a|b|c"), 400, "MSG_PARAM_INVALID")


def test_without_type_has_finds_what_matching_resources_refer_to(api):
    mark = uuid.uuid4().hex
    pid = api.post("/Patient", patient()).body["id"]
    other = api.post("/Patient", patient()).body["id"]
    group = {"resourceType": "Group", "type": "person", "actual": False}
    gid = api.post("/Group", group).body["id"]
    for subject in (f"Patient/{pid}", f"Group/{gid}"):
        api.post(
            "/Observation",
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "urn:codes", "code": mark}]},
                "subject": {"reference": subject},
            },
        )
    api.post(
        "/Observation",
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "other"},
            "subject": {"reference": f"Patient/{other}"},
        },
    )
    assert found(api.get(f"?_has:Observation:subject:code=urn:codes|{mark}")) == sorted(
        [f"Group/{gid}", f"Patient/{pid}"]
    )
    # An unknown parameter inside _has: 400 naming it, ignored when lenient.
    query = f"?_has:Observation:subject:nope={mark}&_id={pid}"
    assert_outcome(api.get(query), 400, "MSG_PARAM_UNKNOWN")
    lenient = api.get(query, headers=LENIENT)
    assert found(lenient) == [f"Patient/{pid}"]
    assert "_has" not in lenient.body["link"][0]["url"]
    # With _type each listed type is searched with it; a type the reference cannot reach
    # (Observation.subject never points at a Basic) is a 400.
    typed = api.get(f"?_type=Patient,Group&_has:Observation:subject:code=urn:codes|{mark}")
    assert found(typed) == sorted([f"Group/{gid}", f"Patient/{pid}"])
    only = api.get(f"?_type=Group&_has:Observation:subject:code=urn:codes|{mark}")
    assert found(only) == [f"Group/{gid}"]
    assert_outcome(
        api.get(f"?_type=Patient,Basic&_has:Observation:subject:code={mark}"),
        400,
        "MSG_PARAM_INVALID",
    )


@pytest.mark.parametrize("name", ["_text", "_content", "_query", "_filter", "gender"])
def test_without_type_other_parameters_are_400_naming_them(api, name):
    issue = assert_outcome(api.get(f"?{name}=x"), 400, "MSG_PARAM_UNKNOWN")
    assert issue["diagnostics"] == MSG_ALL_TYPES_PARAM.format(name=name)
    lenient = api.get(f"?{name}=x&_count=1", headers=LENIENT)
    assert lenient.body["entry"][-1]["search"]["mode"] == "outcome"
