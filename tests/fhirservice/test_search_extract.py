"""Index extraction: the fast path gives exactly the rows of the FHIRPath engine on real data.

``fhirservice.search.paths`` walks member paths (with ``ofType``, ``where(x='…')`` and
unions) without the engine; on every HL7 R4 example (all 5,306, Bundles included) the rows
of ``extract_rows`` must equal those of ``extract_rows(reference=True)``, where the engine
evaluates every expression, composites' components included.
"""

from __future__ import annotations

from typing import Any

import pytest

from fhirservice.models import SearchToken
from fhirservice.search.extract import COLUMNS, _indexed_params, extract_rows
from fhirservice.search.paths import walker
from fhirservice.store.rows import insert_values
from tests.external import r4_examples


@pytest.fixture(scope="module")
def examples() -> list[dict[str, Any]]:
    """Every example resource."""
    return [resource for _, resource in r4_examples()]


def test_the_fast_path_yields_the_engines_rows(examples):
    rows = 0
    differences = []
    for resource in examples:
        key = f"{resource['resourceType']}/{resource.get('id', 'x')}"
        fast = extract_rows(key, resource)
        if fast != extract_rows(key, resource, reference=True):
            differences.append(key)
        rows += len(fast)
    assert not differences, differences[:10]
    assert rows > 140_000


def test_the_walker_covers_the_expressions_of_the_common_types():
    """Every expression of these types is walked (an engine fallback costs ~10× a walk):
    the ``where(system='…')`` of telecoms and ``ofType`` before a member included; only
    ``Patient.deceased.exists() and …`` needs the engine."""
    engine = [
        part.expression
        for resource_type in ("Patient", "Observation", "Group", "Encounter", "Practitioner")
        for param in _indexed_params(resource_type)
        for part in param.parts
        if walker(resource_type, part.expression) is None
    ]
    assert engine == ["Patient.deceased.exists() and Patient.deceased != false"]


def test_rows_are_in_the_models_field_order():
    assert COLUMNS == tuple(field.attname for field in SearchToken._meta.concrete_fields)


def test_inserted_rows_read_back_as_extracted(db):
    """``insert_values`` stores the tuples as the ORM would: dates (text on SQLite, the
    open end of a Period included), numbers, spans, composite groups and parts read back
    equal."""
    body = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}], "text": "Pulse"},
        "subject": {"reference": "Patient/p1"},
        "effectivePeriod": {"start": "2024-03-01T10:30:00+02:00"},
        "valueQuantity": {"value": 72.5, "unit": "/min", "system": "http://unitsofmeasure.org"},
        "component": [{"code": {"coding": [{"code": "a"}]}, "valueString": "x"}],
    }
    rows = extract_rows("Observation/x", body)
    insert_values(SearchToken, rows)
    stored = SearchToken.objects.filter(resource_key="Observation/x").values_list(*COLUMNS)
    assert sorted(stored) == sorted(rows)
    assert {row[3] for row in rows} >= {"date", "value-quantity", "code-value-quantity"}
