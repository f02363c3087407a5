"""Every search parameter of eight core types, tried on the official HL7 R4 examples.

For Patient, Observation, Encounter, Condition, MedicationRequest, Practitioner,
Organization and Group, every example (npm ``hl7.fhir.r4.examples`` 4.0.1) is stored; then
for every search parameter of the type and every example that has a value for it, a search
is built from one of the example's own values (as the index holds it: the text as written,
``system|code``, the reference, an ``ap`` date, ``value|system|code`` for a quantity, the
components joined by ``$``) and must find the example. The search also names the example's
``_id``, so each answer is one small page.

``Group?member=`` is answered from ClickHouse rosters, which rolled-back test transactions
never ship: tests/groups covers it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any
from urllib.parse import urlencode

import pytest

from fhirservice.models import SearchToken
from fhirservice.search.extract import search_params
from tests.external import r4_examples

TYPES = (
    "Patient",
    "Observation",
    "Encounter",
    "Condition",
    "MedicationRequest",
    "Practitioner",
    "Organization",
    "Group",
)
SKIPPED = {("Group", "member")}


def escape(value: str) -> str:
    """A value as a search parameter holds it: ``\\``, ``,``, ``$`` and ``|`` escaped."""
    for char in ("\\", ",", "$", "|"):
        value = value.replace(char, "\\" + char)
    return value


def query_value(kind: str, row: SearchToken) -> tuple[str, str] | None:
    """(modifier, value) of a search that matches ``row``; None where no search can."""
    if kind == "string":
        return "", escape(row.system)
    if kind == "token":
        if row.param.endswith(":of-type"):
            return "of-type", "|".join(escape(v) for v in (row.system, row.value, row.text))
        if row.value:
            return "", f"{escape(row.system)}|{escape(row.value)}"
        return ("text", escape(row.text)) if row.text else None
    if kind == "reference":
        if row.system and not row.text:  # canonical: url|version
            return "", f"{escape(row.value)}|{escape(row.system)}"
        return "", escape(row.value)
    if kind == "date":
        return "", f"ap{row.low.isoformat()}"
    if kind == "number":
        return "", repr(row.number)
    if kind == "quantity":
        return "", f"{row.number!r}|{escape(row.system)}|{escape(row.value)}"
    if kind == "uri":
        return "", escape(row.value)
    return None


def composite_value(resource_type: str, name: str, rows: list[SearchToken]) -> str | None:
    """Components of one occurrence joined by ``$`` (each as its own type searches it)."""
    param = search_params(resource_type)[name]
    parts: dict[int, str] = {}
    for row in rows:
        if row.part in parts:
            continue
        found = query_value(param.components[row.part].type, row)
        if found is not None and not found[0]:
            parts[row.part] = found[1]
    if len(parts) != len(param.components):
        return None
    return "$".join(parts[i] for i in range(len(parts)))


def searches(resource_type: str, resource_id: str) -> list[tuple[str, str]]:
    """(parameter, value) pairs, one per parameter the stored example has values for."""
    rows = SearchToken.objects.filter(resource_key=f"{resource_type}/{resource_id}")
    by_param: dict[str, list[SearchToken]] = defaultdict(list)
    for row in rows.order_by("key"):
        by_param[row.param].append(row)
    params = search_params(resource_type)
    out = []
    for name, found in by_param.items():
        base = name.split(":")[0]
        if (resource_type, base) in SKIPPED:
            continue
        kind = params[base].type
        if kind == "composite":
            groups: dict[str, list[SearchToken]] = defaultdict(list)
            for row in found:
                groups[row.group].append(row)
            value = next(
                (v for g in groups.values() if (v := composite_value(resource_type, name, g))),
                None,
            )
            if value is not None:
                out.append((name, value))
            continue
        for row in found:
            built = query_value(kind, row)
            if built is not None:
                modifier, value = built
                out.append((f"{base}:{modifier}" if modifier else base, value))
                break
    return out


@pytest.fixture(scope="module")
def examples() -> dict[str, list[dict[str, Any]]]:
    """The examples of each type, by type."""
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, resource in r4_examples():
        if resource["resourceType"] in TYPES and resource.get("id"):
            by_type[resource["resourceType"]].append(resource)
    return by_type


@pytest.mark.parametrize("resource_type", TYPES)
def test_every_parameter_finds_the_example_it_was_built_from(api, examples, resource_type):
    stored = []
    for example in examples[resource_type]:
        response = api.put(f"/{resource_type}/{example['id']}", example)
        assert response.status in (200, 201), (example["id"], response)
        stored.append(example["id"])
    tried: set[str] = set()
    failures = []
    for resource_id in stored:
        for name, value in searches(resource_type, resource_id):
            tried.add(name.split(":")[0])
            query = urlencode([("_id", resource_id), (name, value), ("_total", "accurate")])
            response = api.get(f"/{resource_type}?{query}", headers={"Prefer": "handling=strict"})
            if response.status != 200 or response.body.get("total") != 1:
                failures.append((resource_id, name, value, response.status))
    assert not failures, failures[:20]
    # Most of the type's parameters have a value in some example (the rest: none has one).
    assert len(tried) >= len(search_params(resource_type)) // 3, sorted(tried)
