"""Search parameter types as http://hl7.org/fhir/R4/search.html defines them, by hand.

Each modifier and prefix of string, token, reference, date, number, quantity, uri and
composite parameters, the common ``_tag``/``_profile``/``_security``/``_source``, ``:missing``,
OR by comma and AND by repetition, date range boundaries (a day, a month, a Period open at one
end), ``_sort`` by a parameter across pages, and the 400s of bad input and of what the server
does not implement.
"""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from tests.fhirservice.test_api_errors import assert_outcome

SERVER = "http://testserver/4_0_0"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
STRICT = {"Prefer": "handling=strict"}


def observation(**fields) -> dict:
    """An Observation with a status and a LOINC code, plus ``fields``."""
    body = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "8867-4", "display": "Heart rate"}]},
    }
    body.update(fields)
    return body


OBSERVATIONS = {
    "hr": observation(
        subject={"reference": "Patient/p1"},
        effectiveDateTime="2024-01-15T10:30:00Z",
        valueQuantity={"value": 72, "unit": "beats/min", "system": UCUM, "code": "/min"},
        identifier=[
            {
                "system": "urn:lab",
                "value": "A-1",
                "type": {"coding": [{"system": "urn:types", "code": "FILL"}]},
            }
        ],
        meta={
            "tag": [{"system": "urn:tags", "code": "research"}],
            "profile": ["http://example.org/StructureDefinition/vitals"],
            "security": [{"system": "urn:sec", "code": "N"}],
            "source": "http://example.org/lab#1",
        },
    ),
    "weight": observation(
        code={"coding": [{"system": LOINC, "code": "29463-7"}], "text": "Body weight"},
        subject={"reference": f"{SERVER}/Patient/p2"},
        effectivePeriod={"start": "2024-01-01", "end": "2024-01-31"},
        valueQuantity={"value": 80.5, "unit": "kg", "system": UCUM, "code": "kg"},
        status="amended",
    ),
    "note": observation(
        code={"coding": [{"system": "urn:local", "code": "note"}]},
        subject={"reference": "http://other.example/fhir/Patient/p1"},
        effectivePeriod={"start": "2023-06-01T00:00:00Z"},
        valueString="Müller reported dizziness",
        status="preliminary",
    ),
    "bp": observation(
        code={"coding": [{"system": LOINC, "code": "85354-9"}]},
        subject={"reference": "Group/g1"},
        effectiveDateTime="2024-02",
        component=[
            {
                "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                "valueQuantity": {"value": 120, "system": UCUM, "code": "mm[Hg]"},
            },
            {
                "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                "valueQuantity": {"value": 80, "system": UCUM, "code": "mm[Hg]"},
            },
        ],
    ),
}


@pytest.fixture
def stored(api) -> dict[str, str]:
    """The Observations above, by name and by id."""
    ids = {}
    for name, body in OBSERVATIONS.items():
        rid = api.post("/Observation", body).body["id"]
        ids[name], ids[rid] = rid, name
    return ids


def found(api, stored, *params: tuple[str, str], resource_type: str = "Observation") -> set:
    """Names of what a strict search finds."""
    response = api.get(f"/{resource_type}?{urlencode(params)}", headers=STRICT)
    assert response.status == 200, response
    return {stored[e["resource"]["id"]] for e in response.body.get("entry", [])}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        # token
        ([("code", "8867-4")], {"hr"}),
        ([("code", f"{LOINC}|29463-7")], {"weight"}),
        ([("code", f"{LOINC}|")], {"hr", "weight", "bp"}),
        ([("code", "|note")], set()),
        ([("code", "urn:local|note")], {"note"}),
        ([("code:not", f"{LOINC}|8867-4")], {"weight", "note", "bp"}),
        ([("code:text", "body")], {"weight"}),
        ([("code:text", "HEART")], {"hr"}),
        ([("status", "final,amended")], {"hr", "weight", "bp"}),
        ([("status", "final"), ("code", "85354-9")], {"bp"}),
        ([("identifier", "urn:lab|A-1")], {"hr"}),
        ([("identifier:of-type", "urn:types|FILL|A-1")], {"hr"}),
        ([("identifier:of-type", "urn:types|FILL|A-2")], set()),
        ([("component-code", "8480-6")], {"bp"}),
        # :missing
        ([("identifier:missing", "true")], {"weight", "note", "bp"}),
        ([("identifier:missing", "false")], {"hr"}),
        ([("value-quantity:missing", "true")], {"note", "bp"}),
        # reference
        ([("subject", "Patient/p1")], {"hr"}),
        ([("subject", "p1")], {"hr", "note"}),
        ([("subject", "Patient/p2")], {"weight"}),
        ([("subject", f"{SERVER}/Patient/p2")], {"weight"}),
        ([("subject", "http://other.example/fhir/Patient/p1")], {"note"}),
        ([("subject:Group", "g1")], {"bp"}),
        ([("subject:Patient", "p1")], {"hr"}),
        ([("patient", "p1")], {"hr", "note"}),
        ([("patient", "g1")], set()),
        # string (value[x] as string: Observation has none; composite below)
        # date: the day 2024-01-15 and the January Period
        ([("date", "2024-01-15")], {"hr"}),
        ([("date", "2024-01")], {"hr", "weight"}),
        ([("date", "eq2024")], {"hr", "weight", "bp"}),
        ([("date", "ne2024-01")], {"note", "bp"}),
        ([("date", "gt2024-01-15")], {"weight", "note", "bp"}),
        ([("date", "lt2024-01-15")], {"weight", "note"}),
        ([("date", "ge2024-01-15")], {"hr", "weight", "note", "bp"}),
        ([("date", "le2024-01-14")], {"weight", "note"}),
        ([("date", "sa2024-01-31")], {"bp"}),
        ([("date", "eb2024-01-01")], set()),
        ([("date", "eb2024-01-02")], set()),
        ([("date", "ap2024-01-20")], {"weight", "note"}),
        ([("date", "2024-01-15T10:30:00Z")], {"hr"}),
        ([("date", "2024-01-15T10:30:01Z")], set()),
        ([("date", "2024-01-15T11:30:00+01:00")], {"hr"}),
        ([("date", "ge2024-01-01"), ("date", "lt2024-02-01")], {"hr", "weight", "note"}),
        ([("date", "2023-06-01"), ("status", "preliminary")], set()),
        ([("date", "ge2030-01-01")], {"note"}),
        # quantity
        ([("value-quantity", "72")], {"hr"}),
        ([("value-quantity", f"72|{UCUM}|/min")], {"hr"}),
        ([("value-quantity", "72||/min")], {"hr"}),
        ([("value-quantity", "72||beats/min")], {"hr"}),
        ([("value-quantity", f"72|{UCUM}|kg")], set()),
        ([("value-quantity", "gt72")], {"weight"}),
        ([("value-quantity", "ge72")], {"hr", "weight"}),
        ([("value-quantity", "lt80.5")], {"hr"}),
        ([("value-quantity", "le80.5")], {"hr", "weight"}),
        ([("value-quantity", "ne72")], {"weight"}),
        ([("value-quantity", "80")], set()),
        ([("value-quantity", "8e1")], {"weight"}),
        ([("value-quantity", "ap85")], {"weight"}),
        ([("value-quantity", "ap79")], {"hr", "weight"}),
        ([("value-quantity", "72.4")], set()),
        ([("component-value-quantity", "120||mm[Hg]")], {"bp"}),
        # composite
        ([("code-value-quantity", f"{LOINC}|8867-4$72")], {"hr"}),
        ([("code-value-quantity", f"{LOINC}|8867-4$80.5")], set()),
        ([("component-code-value-quantity", "8480-6$gt100")], {"bp"}),
        ([("component-code-value-quantity", "8462-4$gt100")], set()),
        ([("component-code-value-quantity", "8462-4$gt100,8462-4$lt100")], {"bp"}),
        ([("code-value-string", "urn:local|note$müller")], {"note"}),
        # common parameters
        ([("_tag", "urn:tags|research")], {"hr"}),
        ([("_tag:not", "research")], {"weight", "note", "bp"}),
        ([("_security", "N")], {"hr"}),
        ([("_profile", "http://example.org/StructureDefinition/vitals")], {"hr"}),
        ([("_source", "http://example.org/lab#1")], {"hr"}),
        ([("_source:below", "http://example.org/")], {"hr"}),
    ],
)
def test_observation_parameters(api, stored, params, expected):
    assert found(api, stored, *params) == expected


def test_string_search_is_prefix_case_and_accent_insensitive(api):
    made = {}
    for family in ("Müller", "Muller-Lüdenscheid", "Smith"):
        rid = api.post("/Patient", {"resourceType": "Patient", "name": [{"family": family}]})
        made[rid.body["id"]] = family
    made.update({v: k for k, v in list(made.items())})

    def names(*params):
        return found(api, made, *params, resource_type="Patient")

    assert names(("family", "muller")) == {"Müller", "Muller-Lüdenscheid"}
    assert names(("family", "MÜLL")) == {"Müller", "Muller-Lüdenscheid"}
    assert names(("family:exact", "Müller")) == {"Müller"}
    assert names(("family:exact", "muller")) == set()
    assert names(("family:contains", "LUDEN")) == {"Muller-Lüdenscheid"}
    assert names(("family", "smith,muller-l")) == {"Smith", "Muller-Lüdenscheid"}
    assert names(("name", "smi")) == {"Smith"}
    assert names(("family:missing", "false")) == {"Müller", "Muller-Lüdenscheid", "Smith"}


def test_uri_above_and_below_and_canonical_versions(api):
    made = {}
    for url, version in (
        ("http://example.org/fhir/ValueSet/a", "1.0"),
        ("http://example.org/fhir/ValueSet/a/b", "2.0"),
        ("http://other.org/ValueSet/c", "1.0"),
    ):
        body = {"resourceType": "ValueSet", "status": "active", "url": url, "version": version}
        made[api.post("/ValueSet", body).body["id"]] = url
    made.update({v: k for k, v in list(made.items())})
    a, ab, c = (
        "http://example.org/fhir/ValueSet/a",
        "http://example.org/fhir/ValueSet/a/b",
        "http://other.org/ValueSet/c",
    )

    def urls(*params, resource_type="ValueSet"):
        return found(api, made, *params, resource_type=resource_type)

    assert urls(("url", a)) == {a}
    assert urls(("url:below", "http://example.org/fhir/")) == {a, ab}
    assert urls(("url:above", f"{ab}/c")) == {a, ab}
    assert urls(("url", c), ("version", "1.0")) == {c}
    # A canonical reference with |version (PlanDefinition.definition is canonical).
    plan = {
        "resourceType": "PlanDefinition",
        "status": "active",
        "action": [{"definitionCanonical": "http://example.org/fhir/ActivityDefinition/x|3"}],
    }
    pid = api.post("/PlanDefinition", plan).body["id"]
    made[pid] = "plan"
    canonical = "http://example.org/fhir/ActivityDefinition/x"
    for value, expected in (
        (canonical, {"plan"}),
        (f"{canonical}|3", {"plan"}),
        (f"{canonical}|4", set()),
    ):
        assert urls(("definition", value), resource_type="PlanDefinition") == expected


def test_number_prefixes_and_implicit_precision(api):
    made = {}
    for prob in (0.5, 0.55, 1, 100):
        body = {
            "resourceType": "RiskAssessment",
            "status": "final",
            "subject": {"reference": "Patient/x"},
            "prediction": [{"probabilityDecimal": prob}],
        }
        made[api.post("/RiskAssessment", body).body["id"]] = prob
    made.update({v: k for k, v in list(made.items())})

    def probs(value):
        return found(api, made, ("probability", value), resource_type="RiskAssessment")

    assert probs("0.5") == {0.5}  # [0.45, 0.55): 0.55 is its upper bound, outside
    assert probs("0.6") == {0.55}
    assert probs("0.550") == {0.55}
    assert probs("1") == {0.5, 0.55, 1}  # [0.5, 1.5)
    assert probs("1.0") == {1}
    assert probs("1e2") == {100}
    assert probs("gt0.5") == {0.55, 1, 100}
    assert probs("le1") == {0.5, 0.55, 1}
    assert probs("ne100") == {0.5, 0.55, 1}


def test_sort_by_parameters_pages_stably(api, stored):
    bundle = api.get("/Observation?_sort=-date&_count=10").body
    order = [stored[e["resource"]["id"]] for e in bundle["entry"]]
    # Descending by the end of each range: the Period open at its end comes first.
    assert order == ["note", "bp", "weight", "hr"]
    paged, url = [], "/Observation?_sort=status,date&_count=1"
    while url:
        page = api.get(url).body
        paged.extend(stored[e["resource"]["id"]] for e in page.get("entry", []))
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        url = nxt[0].replace(SERVER, "") if nxt else None
    assert paged == ["weight", "hr", "bp", "note"]
    quantities = api.get("/Observation?_sort=value-quantity").body
    assert [stored[e["resource"]["id"]] for e in quantities["entry"]][-2:] == ["hr", "weight"]


def test_count_zero_answers_the_total_only(api, stored):
    bundle = api.get("/Observation?code=http://loinc.org|&_count=0").body
    assert bundle["total"] == 3 and "entry" not in bundle


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("date=2024-13-01", "MSG_PARAM_INVALID"),
        ("date=xx2024", "MSG_PARAM_INVALID"),
        ("date=ge", "MSG_PARAM_INVALID"),
        ("value-quantity=abc", "MSG_PARAM_INVALID"),
        ("value-quantity=1|2", "MSG_PARAM_INVALID"),
        ("code-value-quantity=8867-4", "MSG_PARAM_INVALID"),
        ("code-value-quantity=8867-4$1$2", "MSG_PARAM_INVALID"),
        ("code=a|b|c", "MSG_PARAM_INVALID"),
        ("identifier:of-type=urn:types|FILL", "MSG_PARAM_INVALID"),
        ("code:missing=maybe", "MSG_PARAM_INVALID"),
        ("code:exact=x", "MSG_PARAM_MODIFIER_INVALID"),
        ("subject:Practitioner=x", "MSG_PARAM_MODIFIER_INVALID"),
        ("subject:Nonsense=x", "MSG_PARAM_MODIFIER_INVALID"),
        ("date:below=2024", "MSG_PARAM_MODIFIER_INVALID"),
        ("subject:Patient=Group/g1", "MSG_PARAM_INVALID"),
        ("code:in=http://hl7.org/fhir/ValueSet/x", "MSG_PARAM_MODIFIER_NOT_SUPPORTED"),
        ("code:below=8867", "MSG_PARAM_MODIFIER_NOT_SUPPORTED"),
        ("subject:identifier=urn:x|1", "MSG_PARAM_MODIFIER_NOT_SUPPORTED"),
        ("_sort=identifier:of-type", "MSG_SORT_UNKNOWN"),
    ],
)
def test_bad_input_is_400_under_any_handling(api, query, detail):
    for headers in ({}, STRICT):
        assert_outcome(api.get(f"/Observation?{query}", headers=headers), 400, detail)


@pytest.mark.parametrize("name", ["_text", "_content", "_filter", "_query"])
def test_unsupported_parameters_are_400_strict_and_skipped_lenient(api, stored, name):
    issue = assert_outcome(
        api.get(f"/Observation?{name}=x", headers=STRICT), 400, "MSG_PARAM_NOT_SUPPORTED"
    )
    assert issue["code"] == "not-supported"
    bundle = api.get(f"/Observation?{name}=x&status=final", headers={"Prefer": "handling=lenient"})
    assert bundle.status == 200
    assert bundle.body["link"][0]["url"] == f"{SERVER}/Observation?status=final"
    assert bundle.body["total"] == 2
    assert api.get("/Location?near=1|2|3", headers=STRICT).status == 400


def test_post_search_takes_a_form_body(api, stored):
    form = urlencode([("code", f"{LOINC}|"), ("date", "ge2024-01-10"), ("_count", "1")]).encode()
    response = api.post(
        "/Observation/_search?status=final",
        raw=form,
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status == 200, response
    assert response.body["total"] == 2  # hr and bp: final, LOINC, from 2024-01-10
    nxt = [link["url"] for link in response.body["link"] if link["relation"] == "next"][0]
    assert nxt.startswith(f"{SERVER}/Observation?status=final&code=")
    second = api.get(nxt.replace(SERVER, "")).body
    ids = {e["resource"]["id"] for e in response.body["entry"] + second["entry"]}
    assert {stored[i] for i in ids} == {"hr", "bp"}
    assert_outcome(
        api.post("/Observation/_search", {"resourceType": "Parameters"}),
        415,
        "MSG_UNSUPPORTED_MEDIA_TYPE",
    )
    bad = api.post(
        "/Observation/_search", raw=b"date=xx1", content_type="application/x-www-form-urlencoded"
    )
    assert_outcome(bad, 400, "MSG_PARAM_INVALID")


def test_totals_leave_out_deleted_resources(api, stored):
    assert api.delete(f"/Observation/{stored['hr']}").status == 204
    assert api.get(f"/Observation?code={LOINC}|&_total=accurate").body["total"] == 2
    assert api.get(f"/Observation?code={LOINC}|&status=final").body["total"] == 1
    assert api.get("/Observation?subject=Patient/p1").body["total"] == 0
