"""FHIR XML (application/fhir+xml) in and out, and content negotiation.

- The XML element order equals the order of every R4 StructureDefinition (resources and
  datatypes, backbone elements included), read from the official package.
- Every official R4 example goes JSON → XML → JSON unchanged (narratives compared as XML,
  canonicalised: XML may spell the same XHTML differently, e.g. ``&quot;`` or ``"``).
- Over HTTP: create, update, batch/transaction and $operation bodies in XML; reads,
  searches, history and every error answered in XML when XML is asked for (``Accept``, with
  q-values, or ``_format``, which wins); 406 in JSON for formats we do not write; malformed
  XML, DOCTYPEs (external entities, billion laughs) refused with 400 and nothing stored; a
  Group's roster streamed as XML.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from django.test import Client
from lxml import etree

from fhirservice.capability import capability_statement
from fhirservice.fhir.resource_types import R4_RESOURCE_TYPES
from fhirservice.fhir.validation import _DATATYPES
from fhirservice.fhir.xml import (
    FHIR_NS,
    MSG_DOCTYPE,
    element_order,
    parse_resource_xml,
    resource_to_xml,
)
from fhirservice.rest.base import MSG_FHIRPATH_PATCH
from fhirservice.rest.negotiation import MSG_FORMAT_UNSUPPORTED
from tests.external import r4_examples, r4_examples_dir
from tests.support import BASE, backend_independent, patient

FHIR_XML = "application/fhir+xml"
XML_CT = f"{FHIR_XML}; charset=utf-8"
JSON_CT = "application/fhir+json; charset=utf-8"
NS = {"f": FHIR_NS}


# --- the mapping, against the specification -------------------------------------------------


def _structure_definitions() -> list[dict[str, Any]]:
    result = []
    for path in sorted(r4_examples_dir().glob("StructureDefinition-*.json")):
        sd = orjson.loads(path.read_bytes())
        if sd.get("derivation") != "specialization" or sd.get("abstract"):
            continue
        if sd["type"] in R4_RESOURCE_TYPES or sd["type"] in _DATATYPES:
            result.append(sd)
    return result


def test_element_order_is_the_structure_definitions_order():
    definitions = _structure_definitions()
    checked = 0
    for sd in definitions:
        type_name = sd["type"]
        children: dict[str, list[str]] = {}
        reused: set[str] = set()
        for element in sd["snapshot"]["element"][1:]:
            parent, _, name = element["path"].rpartition(".")
            if "contentReference" in element:
                reused.add(element["path"])
            children.setdefault(parent, []).append(name)
        for parent, names in children.items():
            if any(parent == r or parent.startswith(r + ".") for r in reused):
                continue
            sub = parent.partition(".")[2]
            assert element_order(type_name, sub) == names, parent
            checked += 1
    # 146 resource types and 39 datatypes, with their backbone elements.
    assert len(definitions) == 146 + len(_DATATYPES)
    assert checked > 600


def _canonical(value: Any) -> Any:
    """Narrative divs as canonical XML; everything else as it is."""
    if isinstance(value, dict):
        return {
            k: _c14n(v) if k == "div" and isinstance(v, str) else _canonical(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def _c14n(div: str) -> bytes:
    return etree.tostring(etree.fromstring(div.encode()), method="c14n")


@backend_independent
def test_every_official_example_round_trips_through_xml():
    examples = r4_examples()
    failures = []
    for name, resource in examples:
        xml = resource_to_xml(resource)
        root = etree.fromstring(xml)
        assert root.tag == f"{{{FHIR_NS}}}{resource['resourceType']}", name
        if _canonical(parse_resource_xml(xml)) != _canonical(resource):
            failures.append(name)
    print(f"\n{len(examples) - len(failures)} of {len(examples)} examples round-trip via XML")
    assert len(examples) == 5306
    assert failures == []


def test_xml_spelling_of_primitives_extensions_and_ids():
    given_extension = {"extension": [{"url": "http://e", "valueString": "x"}]}
    birth_extension = {"extension": [{"url": "http://t", "valueDateTime": "1970-01-01T08:00Z"}]}
    resource = {
        "resourceType": "Patient",
        "id": "p1",
        "active": True,
        "name": [
            {
                "id": "n1",
                "family": 'O"Brien <&>',
                "given": ["A", None],
                "_given": [None, given_extension],
            }
        ],
        "birthDate": "1970-01-01",
        "_birthDate": birth_extension,
        "multipleBirthInteger": 2,
    }
    xml = resource_to_xml(resource)
    root = etree.fromstring(xml)
    assert [etree.QName(c).localname for c in root] == [
        "id", "active", "name", "birthDate", "multipleBirthInteger",
    ]  # fmt: skip
    assert root.find("f:id", NS).get("value") == "p1"
    name = root.find("f:name", NS)
    assert name.get("id") == "n1"
    assert name.find("f:family", NS).get("value") == 'O"Brien <&>'
    given = name.findall("f:given", NS)
    assert given[1].get("value") is None
    assert given[1].find("f:extension", NS).get("url") == "http://e"
    assert root.find("f:birthDate/f:extension/f:valueDateTime", NS) is not None
    assert parse_resource_xml(xml) == resource


def test_newlines_in_values_survive():
    resource = {"resourceType": "Basic", "code": {"text": "a\nb\r\n\tc"}}
    assert parse_resource_xml(resource_to_xml(resource)) == resource


# --- over HTTP -------------------------------------------------------------------------------


class XmlClient:
    """Django's test client sending and receiving raw bodies."""

    def __init__(self) -> None:
        self.client = Client()

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        content_type: str = FHIR_XML,
        accept: str | None = FHIR_XML,
        headers: dict[str, str] | None = None,
    ) -> Any:
        all_headers = dict(headers or {})
        if accept is not None:
            all_headers["Accept"] = accept
        response = self.client.generic(
            method, BASE + path, data=body, content_type=content_type, headers=all_headers
        )
        content = b"".join(response.streaming_content) if response.streaming else response.content
        response.body_bytes = content
        return response


@pytest.fixture
def xml_api(db: None) -> XmlClient:
    return XmlClient()


def xml_of(response: Any) -> dict[str, Any]:
    """The JSON form of an XML response body (which must be FHIR XML)."""
    assert response["Content-Type"] == XML_CT, response["Content-Type"]
    return parse_resource_xml(response.body_bytes)


def outcome_codes(outcome: dict[str, Any]) -> list[str]:
    return [c["code"] for i in outcome["issue"] for c in i.get("details", {}).get("coding", [])]


def without_meta(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "meta"}


def test_create_in_xml_then_read_json_equal(xml_api, api):
    sent = patient(family="Xml", given="Ada")
    sent["birthDate"] = "1970-01-01"
    sent["active"] = True
    created = xml_api.request("POST", "/Patient", resource_to_xml(sent))
    assert created.status_code == 201, created.body_bytes
    as_xml = xml_of(created)
    read = api.get(f"/Patient/{as_xml['id']}")
    assert read.body == as_xml
    assert without_meta(read.body) == {**sent, "id": as_xml["id"]}
    # An update in XML, read back in XML.
    changed = {**read.body, "gender": "female"}
    updated = xml_api.request("PUT", f"/Patient/{as_xml['id']}", resource_to_xml(changed))
    assert updated.status_code == 200, updated.body_bytes
    assert xml_of(updated)["gender"] == "female"
    assert (
        xml_of(xml_api.request("GET", f"/Patient/{as_xml['id']}"))
        == api.get(f"/Patient/{as_xml['id']}").body
    )


@pytest.mark.parametrize("content_type", ["application/fhir+xml", "application/xml", "text/xml"])
def test_xml_body_spellings(xml_api, content_type):
    body = resource_to_xml(patient())
    response = xml_api.request(
        "POST", "/Patient", body, content_type=f"{content_type}; charset=utf-8", accept=None
    )
    assert response.status_code == 201
    # No Accept: answered in the format the body was sent in (R4 http.html#mime-type).
    assert response["Content-Type"] == XML_CT


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/fhir+xml", XML_CT),
        ("application/xml", XML_CT),
        ("text/xml", XML_CT),
        ("xml", XML_CT),
        ("application/fhir+json;q=0.5, application/fhir+xml", XML_CT),
        ("application/fhir+xml;q=0.4, application/fhir+json;q=0.5", JSON_CT),
        ("*/*, application/fhir+xml", XML_CT),
        ("*/*", JSON_CT),
        ("application/fhir+xml;q=0, */*", JSON_CT),
        (None, JSON_CT),
    ],
)
def test_accept_negotiation(xml_api, api, accept, expected):
    path = api.post("/Patient", patient()).headers["Location"].split(BASE, 1)[1]
    response = xml_api.request("GET", path, accept=accept)
    assert response.status_code == 200
    assert response["Content-Type"] == expected


@pytest.mark.parametrize(
    ("content_type", "accept", "expected"),
    [
        (FHIR_XML, None, XML_CT),
        (FHIR_XML, "*/*", XML_CT),
        (FHIR_XML, "application/fhir+json", JSON_CT),
        (FHIR_XML, "*/*, application/fhir+json", JSON_CT),
        ("application/fhir+json", None, JSON_CT),
        ("application/fhir+json", "*/*", JSON_CT),
    ],
)
def test_a_request_naming_no_format_is_answered_in_its_body_format(
    xml_api, content_type, accept, expected
):
    body = patient(family="Echo")
    data = resource_to_xml(body) if content_type == FHIR_XML else orjson.dumps(body)
    created = xml_api.request("POST", "/Patient", data, content_type=content_type, accept=accept)
    assert created.status_code == 201, created.body_bytes
    assert created["Content-Type"] == expected
    # Errors too: an invalid resource's OperationOutcome comes back in the body's format.
    bad = {**body, "gender": "banana"}
    data = resource_to_xml(bad) if content_type == FHIR_XML else orjson.dumps(bad)
    refused = xml_api.request("POST", "/Patient", data, content_type=content_type, accept=accept)
    assert refused.status_code == 400, refused.body_bytes
    assert refused["Content-Type"] == expected


@pytest.mark.parametrize(
    ("fmt", "accept", "expected"),
    [
        ("xml", "application/fhir+json", XML_CT),
        ("application/fhir+xml", "application/fhir+json", XML_CT),
        ("application/xml", None, XML_CT),
        ("json", FHIR_XML, JSON_CT),
        ("application/fhir+json", FHIR_XML, JSON_CT),
    ],
)
def test_format_parameter_wins_over_accept(xml_api, fmt, accept, expected):
    response = xml_api.request("GET", f"/metadata?{urlencode({'_format': fmt})}", accept=accept)
    assert response.status_code == 200
    assert response["Content-Type"] == expected


def test_unescaped_plus_in_format(xml_api):
    # "application/fhir+xml" typed into a URL: the "+" arrives as a space.
    response = xml_api.request("GET", "/metadata?_format=application/fhir+xml", accept=None)
    assert response["Content-Type"] == XML_CT


@pytest.mark.parametrize("fmt", ["html", "text/html", "turtle"])
def test_unsupported_format_is_406_in_json(xml_api, fmt):
    response = xml_api.request("GET", f"/metadata?{urlencode({'_format': fmt})}")
    assert response.status_code == 406
    assert response["Content-Type"] == JSON_CT
    outcome = orjson.loads(response.body_bytes)
    assert outcome["issue"][0]["diagnostics"] == MSG_FORMAT_UNSUPPORTED.format(value=fmt)


def test_pretty(xml_api, api):
    path = api.post("/Patient", patient()).headers["Location"].split(BASE, 1)[1]
    compact = xml_api.request("GET", path)
    pretty = xml_api.request("GET", path + "?_pretty=true")
    assert b"\n  <" in pretty.body_bytes and b"\n" not in compact.body_bytes
    assert xml_of(pretty) == xml_of(compact)
    as_json = xml_api.request("GET", path + "?_pretty=true", accept="application/fhir+json")
    assert b'\n  "resourceType"' in as_json.body_bytes


def test_every_error_is_an_xml_outcome_when_xml_is_asked(xml_api, api):
    stored = api.post("/Patient", patient()).body
    cases = [
        ("GET", "/Patient/nope", b"", FHIR_XML, 404, "MSG_NO_EXIST"),
        ("GET", "/NoSuchType/1", b"", FHIR_XML, 404, None),
        ("GET", "/Patient?family=" + "x" * 5000, b"", FHIR_XML, 400, None),
        ("DELETE", "/metadata", b"", FHIR_XML, 405, "MSG_METHOD_NOT_ALLOWED"),
        ("POST", "/Patient", b"<Patient", FHIR_XML, 400, "MSG_XML_PARSE"),
        ("POST", "/Patient", b"{}", "text/plain", 415, "MSG_UNSUPPORTED_MEDIA_TYPE"),
        ("PATCH", f"/Patient/{stored['id']}", b"<Parameters/>", FHIR_XML, 415, None),
        (
            "POST",
            "/Patient",
            b'<Patient xmlns="http://hl7.org/fhir"><active value="yes"/></Patient>',
            FHIR_XML,
            400,
            "MSG_INVALID_RESOURCE",
        ),
        (
            "POST",
            "/Patient",
            b'<Patient xmlns="http://hl7.org/fhir"><colour value="red"/></Patient>',
            FHIR_XML,
            400,
            "MSG_XML_STRUCTURE",
        ),
        ("POST", "/Patient", b"<Observation/>", FHIR_XML, 400, "MSG_XML_ROOT"),
        (
            "POST",
            "/Patient",
            b'<Patient xmlns="http://hl7.org/fhir"><active value="true"/>text</Patient>',
            FHIR_XML,
            400,
            "MSG_XML_STRUCTURE",
        ),
    ]
    for method, path, body, content_type, status, code in cases:
        response = xml_api.request(method, path, body, content_type=content_type)
        assert response.status_code == status, (method, path, response.body_bytes)
        outcome = xml_of(response)
        assert outcome["resourceType"] == "OperationOutcome", (method, path)
        if code:
            assert code in outcome_codes(outcome), (method, path, outcome)
    patch = xml_api.request(
        "PATCH", f"/Patient/{stored['id']}", b"<Parameters/>", content_type=FHIR_XML
    )
    assert xml_of(patch)["issue"][0]["diagnostics"] == MSG_FHIRPATH_PATCH
    assert api.get(f"/Patient/{stored['id']}").body == stored


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE Patient [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<Patient xmlns="http://hl7.org/fhir"><name><family value="&secret;"/></name></Patient>"""
LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
        for i in range(1, 10)
    )
    + b']><Patient xmlns="http://hl7.org/fhir"><name><family value="&lol9;"/></name></Patient>'
)


@pytest.mark.parametrize("body", [XXE, LAUGHS], ids=["external-entity", "billion-laughs"])
def test_doctype_is_refused(xml_api, api, body):
    before = api.get("/Patient?_summary=count").body["total"]
    response = xml_api.request("POST", "/Patient", body)
    assert response.status_code == 400
    outcome = xml_of(response)
    assert outcome["issue"][0]["diagnostics"] == MSG_DOCTYPE
    assert b"root:" not in response.body_bytes
    assert api.get("/Patient?_summary=count").body["total"] == before


def test_search_and_history_bundles_in_xml(xml_api, api):
    ids = [api.post("/Patient", patient(family=f"Bundle{i}")).body["id"] for i in range(3)]
    query = "/Patient?family=Bundle&_count=2"
    as_json = api.get(query).body
    response = xml_api.request("GET", query)
    bundle = xml_of(response)
    assert bundle["type"] == "searchset"
    assert bundle["total"] == as_json["total"] == 3
    assert bundle["entry"] == as_json["entry"]
    root = etree.fromstring(response.body_bytes)
    first = root.find("f:entry", NS)
    assert [etree.QName(c).localname for c in first] == ["fullUrl", "resource", "search"]
    assert first.find("f:resource/f:Patient", NS) is not None
    history = xml_of(xml_api.request("GET", f"/Patient/{ids[0]}/_history"))
    assert history["entry"] == api.get(f"/Patient/{ids[0]}/_history").body["entry"]


def test_transaction_in_xml(xml_api, api):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
                "resource": patient(family="Transacted"),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "weight"},
                    "subject": {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    response = xml_api.request("POST", "", resource_to_xml(bundle))
    assert response.status_code == 200, response.body_bytes
    result = xml_of(response)
    assert result["type"] == "transaction-response"
    assert [e["response"]["status"][:3] for e in result["entry"]] == ["201", "201"]
    observation = result["entry"][1]["resource"]
    assert observation["subject"]["reference"].startswith("Patient/")
    assert api.get(f"/Observation/{observation['id']}").body == observation


def test_operation_parameters_in_xml(xml_api, api):
    group = api.post("/Group", {"resourceType": "Group", "type": "person", "actual": True}).body
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "patient",
                "resource": patient(
                    family="Operated", identifier=[{"system": "urn:test:xml", "value": "op-1"}]
                ),
            }
        ],
    }
    response = xml_api.request(
        "POST", f"/Group/{group['id']}/$add-member", resource_to_xml(parameters)
    )
    assert response.status_code == 200, response.body_bytes
    out = xml_of(response)
    names = [p["name"] for p in out["parameter"]]
    assert "member" in names
    assert api.get(f"/Group/{group['id']}").body["quantity"] == 1


def test_group_roster_streams_as_xml(xml_api, api):
    pids = [api.post("/Patient", patient(family=f"M{i}")).body["id"] for i in range(5)]
    members = [{"entity": {"reference": f"Patient/{pid}"}} for pid in pids]
    group = {"resourceType": "Group", "type": "person", "actual": True, "member": members}
    gid = api.post("/Group", group).body["id"]
    response = xml_api.request("GET", f"/Group/{gid}")
    assert response.streaming
    as_xml = xml_of(response)
    assert as_xml == api.get(f"/Group/{gid}").body
    assert len(as_xml["member"]) == 5
    root = etree.fromstring(response.body_bytes)
    assert etree.QName(root[-1]).localname == "member"
    # A history Bundle carrying the roster streams as well.
    history = xml_api.request("GET", f"/Group/{gid}/_history")
    assert xml_of(history)["entry"][0]["resource"]["member"] == as_xml["member"]


def test_capability_statement_lists_xml():
    statement = capability_statement("http://example.org/4_0_0", "2026-01-01T00:00:00Z")
    assert {"application/fhir+xml", "xml"} <= set(statement["format"])


def test_resources_built_in_code_are_served_as_xml(xml_api, api):
    """Answers the server composes itself (operation outputs, definitions, the audit trail,
    write outcomes) convert like stored resources."""
    pid = api.post("/Patient", patient(family="Built")).body["id"]
    members = [{"entity": {"reference": f"Patient/{pid}"}}]
    gid = api.post(
        "/Group", {"resourceType": "Group", "type": "person", "actual": True, "member": members}
    ).body["id"]
    for path in (
        "/OperationDefinition/Group-add-member",
        "/OperationDefinition?code=add-member",
        f"/Group/{gid}/$members",
        f"/Patient/{pid}/$group-memberships",
        "/AuditEvent?_count=5",
        "/metadata",
    ):
        as_json = api.get(path)
        response = xml_api.request("GET", path)
        assert response.status_code == as_json.status, (path, response.body_bytes[:300])
        converted = xml_of(response)
        if converted["resourceType"] == "Bundle" or path == "/metadata":
            converted.pop("link", None), as_json.body.pop("link", None)
            converted.pop("date", None), as_json.body.pop("date", None)
        assert converted == as_json.body, path
    outcome = xml_api.request(
        "POST",
        "/Patient",
        resource_to_xml(patient()),
        headers={"Prefer": "return=OperationOutcome"},
    )
    assert outcome.status_code == 201
    assert xml_of(outcome)["issue"][0]["severity"] == "information"


def unlinked(body: dict[str, Any]) -> dict[str, Any]:
    """A body without its Bundle links (the self link repeats ``_pretty``)."""
    return {k: v for k, v in body.items() if k != "link"}


def test_pretty_streamed_bodies(xml_api, api):
    # A Group read streams its roster; its history Bundle streams too: both follow _pretty
    # in either format, and say the same as the compact body. A search Bundle as well.
    pids = [api.post("/Patient", patient(family=f"Pretty{i}")).body["id"] for i in range(3)]
    members = [{"entity": {"reference": f"Patient/{pid}"}} for pid in pids]
    group = {"resourceType": "Group", "type": "person", "actual": True, "member": members}
    gid = api.post("/Group", group).body["id"]
    for path in (f"/Group/{gid}", f"/Group/{gid}/_history", "/Patient?family=Pretty"):
        join = "&" if "?" in path else "?"
        for accept in (FHIR_XML, "application/fhir+json"):
            compact = xml_api.request("GET", path, accept=accept)
            pretty = xml_api.request("GET", path + join + "_pretty=true", accept=accept)
            assert pretty.status_code == compact.status_code == 200
            assert b"\n" not in compact.body_bytes, (path, accept)
            if accept == FHIR_XML:
                assert b"\n  <" in pretty.body_bytes, (path, accept)
                assert unlinked(xml_of(pretty)) == unlinked(xml_of(compact))
                # Every line is indented by its depth: an element's start tag is indented
                # two spaces deeper than its parent's.
                lines = pretty.body_bytes.decode().split("\n")
                assert all(line.startswith("  ") for line in lines[1:-1]), (path, lines)
            else:
                assert b'\n  "resourceType"' in pretty.body_bytes, (path, accept)
                # Indented exactly as the whole body indented at once would be.
                assert pretty.body_bytes == orjson.dumps(
                    orjson.loads(pretty.body_bytes), option=orjson.OPT_INDENT_2
                ), path
                assert unlinked(orjson.loads(pretty.body_bytes)) == unlinked(
                    orjson.loads(compact.body_bytes)
                )
        if path.startswith("/Group"):
            assert xml_api.request("GET", path + join + "_pretty=true").streaming
