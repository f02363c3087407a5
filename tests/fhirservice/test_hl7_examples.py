"""Every official HL7 FHIR R4 example round-trips through PUT and GET, equal apart from meta.

The examples (npm ``hl7.fhir.r4.examples`` 4.0.1, all 5,306 resources: instance examples,
Bundles, conformance resources) are data we did not write. Each one is stored with
``PUT [base]/{type}/{id}`` and read back; the body must equal the example once the
server-owned ``meta.versionId`` / ``meta.lastUpdated`` are taken off both sides. Other meta
(profile, tag, security, source) must survive unchanged.

``Group.quantity`` is server-owned as well (docs/design.md, invariant 5: the number of active
members, kept exact): the server replaces a declared quantity (Group-101 says 25 and lists no
members), so the example is compared with quantity set to its active member count.

Examples without an id get one. One official example (a SearchParameter) has a 66-character
id, which breaks R4's id rule (at most 64 characters): the service must refuse that id with
400 ``MSG_ID_INVALID``, and the example is then stored under a valid id like the id-less ones.

AuditEvent is the server's own audit trail, synthesised from its versions (docs/access.md):
clients cannot write it, so its official examples must be refused with 405
``MSG_AUDIT_READ_ONLY`` (and validate_resource still accepts them: tests/fhirservice/
test_validation.py).

The round-trip count is printed and, when ``FHIR_TEST_ARTIFACTS`` is set, written to
``hl7-r4-examples.txt`` there together with every failure.

Bodies are compared with the examples instead of being re-parsed with fhirclient: a body
equal to the example parses exactly as the example does, and tests/test_external_data.py
already runs fhirclient over every example (13 official examples lack required elements
and fail that parse; the service must accept them all the same).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from django.test import Client

from tests.external import r4_examples
from tests.support import BASE, FHIR_JSON

# Four examples are Groups: their rosters need the ClickHouse tables.

SERVER_META = ("versionId", "lastUpdated")
INSTANT_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
# R4's id datatype (http://hl7.org/fhir/R4/datatypes.html#id).
FHIR_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def without_server_meta(body: dict[str, Any]) -> dict[str, Any]:
    """The body minus meta.versionId/lastUpdated (and minus meta when nothing else is left)."""
    clean = dict(body)
    meta = {k: v for k, v in (clean.pop("meta", None) or {}).items() if k not in SERVER_META}
    if meta:
        clean["meta"] = meta
    return clean


def as_served(example: dict[str, Any]) -> dict[str, Any]:
    """The example as the server must serve it, apart from meta (see the module docstring)."""
    expected = without_server_meta(example)
    if expected["resourceType"] == "Group":
        members = expected.get("member", [])
        expected["quantity"] = sum(1 for m in members if not m.get("inactive", False))
    return expected


def content(response: Any) -> bytes:
    """The body of a response, streamed (Group rosters) or not."""
    return b"".join(response.streaming_content) if response.streaming else response.content


def round_trip(client: Client, resource: dict[str, Any]) -> str | None:
    """PUT then GET one example; None when it came back equal, else what went wrong."""
    path = f"{BASE}/{resource['resourceType']}/{resource['id']}"
    put = client.put(path, data=orjson.dumps(resource), content_type=FHIR_JSON)
    if put.status_code not in (200, 201):
        return f"PUT {put.status_code}: {content(put)[:400].decode(errors='replace')}"
    got = client.get(path)
    if got.status_code != 200:
        return f"GET {got.status_code}: {content(got)[:400].decode(errors='replace')}"
    body = orjson.loads(content(got))
    meta = body.get("meta") or {}
    if not meta.get("versionId", "").isdigit() or not INSTANT_RE.fullmatch(
        meta.get("lastUpdated", "")
    ):
        return f"server meta missing or malformed: {meta}"
    if got.headers["ETag"] != f'W/"{meta["versionId"]}"':
        return f"ETag {got.headers['ETag']} does not name version {meta['versionId']}"
    if without_server_meta(body) != as_served(resource):
        return "read back differs from the example"
    return None


def refused_id(client: Client, resource: dict[str, Any]) -> str | None:
    """PUT under an id that breaks R4's rule: None when refused as it must be."""
    path = f"{BASE}/{resource['resourceType']}/{resource['id']}"
    put = client.put(path, data=orjson.dumps(resource), content_type=FHIR_JSON)
    detail = orjson.loads(content(put))["issue"][0]["details"]["coding"][0]["code"]
    if (put.status_code, detail) != (400, "MSG_ID_INVALID"):
        return f"invalid id {resource['id']!r} answered {put.status_code} {detail}"
    return None


def refused_audit_event(client: Client, resource: dict[str, Any]) -> str | None:
    """PUT of an AuditEvent: None when refused as read-only, as it must be."""
    path = f"{BASE}/AuditEvent/{resource['id']}"
    put = client.put(path, data=orjson.dumps(resource), content_type=FHIR_JSON)
    detail = orjson.loads(content(put))["issue"][0]["details"]["coding"][0]["code"]
    if (put.status_code, detail) != (405, "MSG_AUDIT_READ_ONLY"):
        return f"AuditEvent PUT answered {put.status_code} {detail}, not 405 MSG_AUDIT_READ_ONLY"
    return None


def write_artifact(ok: int, total: int, failures: list[tuple[str, str]], seconds: float) -> None:
    """Record the result under FHIR_TEST_ARTIFACTS (when the test runner sets it)."""
    directory = os.environ.get("FHIR_TEST_ARTIFACTS")
    if not directory:
        return
    lines = [f"HL7 R4 examples: {ok}/{total} round-tripped in {seconds:.1f} s"]
    lines += [f"FAILED {label}: {problem}" for label, problem in failures]
    path = Path(directory) / "hl7-r4-examples.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.slow
def test_every_official_r4_example_round_trips(api):
    examples = r4_examples()
    client = api.client
    failures: list[tuple[str, str]] = []
    renamed = []
    audit_events = 0
    started = time.monotonic()
    for index, (filename, resource) in enumerate(examples):
        problem = None
        if "id" not in resource:
            resource["id"] = f"example-no-id-{index}"
        elif not FHIR_ID_RE.fullmatch(resource["id"]):
            renamed.append(filename)
            problem = refused_id(client, resource)
            resource["id"] = f"example-bad-id-{index}"
        if resource["resourceType"] == "AuditEvent":
            audit_events += 1
            problem = problem or refused_audit_event(client, resource)
        else:
            problem = problem or round_trip(client, resource)
        if problem is not None:
            failures.append((filename, problem))
    seconds = time.monotonic() - started
    total = len(examples)
    ok = total - len(failures)
    print(
        f"HL7 R4 examples: {ok}/{total} as required ({seconds:.1f} s; {audit_events} "
        "AuditEvents refused as read-only, the rest round-tripped)"
    )
    write_artifact(ok, total, failures, seconds)
    assert total > 5000
    assert audit_events == 9
    assert renamed == [
        "SearchParameter-questionnaireresponse-extensions-QuestionnaireResponse-item-subject.json"
    ]
    assert failures == [], f"{len(failures)} examples did not round-trip: {failures[:20]}"


def test_example_meta_other_than_version_survives(api):
    """An example's own profile, tag and security stay; versionId/lastUpdated become ours."""
    by_name = dict(r4_examples())
    tagged = [
        (name, body)
        for name, body in by_name.items()
        if {"profile", "tag", "security"} & set(body.get("meta") or {})
        and body["resourceType"] != "Bundle"
    ]
    assert tagged, "the official examples carry meta.profile/tag/security"
    name, example = tagged[0]
    example["meta"] = {**example["meta"], "versionId": "77", "lastUpdated": "2001-01-01T00:00:00Z"}
    path = f"/{example['resourceType']}/{example['id']}"
    put = api.put(path, example)
    assert put.status == 201, (name, put)
    meta = api.get(path).body["meta"]
    assert meta["versionId"] == "1"
    assert meta["lastUpdated"] != "2001-01-01T00:00:00Z"
    for key in ("profile", "tag", "security"):
        assert meta.get(key) == example["meta"].get(key), name
