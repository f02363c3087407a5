"""Index extraction: the fast path walker agrees with the FHIRPath engine on real data.

``fhirservice.search.paths`` walks plain member paths without the engine; on every HL7 R4
example (all 5,306, Bundles included) and every parameter expression of its type that is
such a path, the index rows it yields must equal the rows of the engine's result.
"""

from __future__ import annotations

from typing import Any

import pytest

from fhirservice.search.extract import _compiled, search_params, typed_rows
from fhirservice.search.paths import Found, plan, walk
from tests.external import r4_examples


def rows(kind: str, nodes: list[Any], name: str, part) -> list[tuple]:
    """The index rows of some values, comparable."""
    out = [
        tuple(sorted((k, str(v)) for k, v in row.items()))
        for node in nodes
        for row in typed_rows(kind, node, name, part)
    ]
    return sorted(out)


@pytest.fixture(scope="module")
def examples() -> list[dict[str, Any]]:
    """Every example resource."""
    return [resource for _, resource in r4_examples()]


def test_the_walker_yields_the_engines_rows(examples):
    compared = 0
    differences = []
    for resource in examples:
        resource_type = resource["resourceType"]
        root = Found(resource_type, resource, resource_type)
        for param in search_params(resource_type).values():
            if param.type in ("composite", "special"):
                continue
            for part in param.parts:
                plans = plan(part.expression)
                walked = walk(root, plans) if plans is not None else None
                if walked is None:
                    continue
                engine = _compiled(part.expression)(resource)
                compared += 1
                fast = rows(param.type, walked, param.name, part)
                slow = rows(param.type, engine, param.name, part)
                if fast != slow:
                    differences.append((resource_type, resource.get("id"), part.expression))
    assert not differences, differences[:10]
    assert compared > 50_000
