"""``_summary`` and ``_elements``: the parts of a resource a client asked for.

Which elements belong to the summary is read from the R4B models' field metadata
(``summary_element_property``), so it follows the specification instead of a hand-kept list.
A subsetted resource carries the ``SUBSETTED`` tag, as FHIR requires, and keeps the
top-level mandatory elements of its type (taken from the R4 element tables of
``fhirservice.fhir.validation``): FHIR asks servers to return them whatever the client chose,
and without them the body would not be a valid resource.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from fhirservice.fhir.validation import element_definitions

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
ALWAYS = ("resourceType", "id", "meta")


@functools.cache
def mandatory_elements(resource_type: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """Top-level elements a type requires: (plain names, stems of required choices)."""
    names, stems = set(), []
    for path, (minimum, _, _) in element_definitions(resource_type).items():
        parts = path.split(".")
        if len(parts) != 2 or minimum < 1:
            continue
        if parts[1].endswith("[x]"):
            stems.append(parts[1][:-3])
        else:
            names.add(parts[1])
    return frozenset(names), tuple(stems)


def _mandatory_keys(body: dict[str, Any]) -> set[str]:
    names, stems = mandatory_elements(body["resourceType"])
    keep = set()
    for key in body:
        bare = key.lstrip("_")
        if bare in names or any(
            bare.startswith(stem) and bare[len(stem) : len(stem) + 1].isupper() for stem in stems
        ):
            keep.add(key)
    return keep


@functools.cache
def summary_elements(resource_type: str) -> frozenset[str] | None:
    """JSON names of the summary elements of a type, or None when no model describes it."""
    try:
        module = importlib.import_module(f"fhir.resources.R4B.{resource_type.lower()}")
        model = getattr(module, resource_type)
    except (ImportError, AttributeError):
        return None
    names = set()
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra or {}
        if isinstance(extra, dict) and extra.get("summary_element_property"):
            alias = info.alias or name
            names.add(alias)
            names.add("_" + alias)
    return frozenset(names)


def _tagged(body: dict[str, Any]) -> dict[str, Any]:
    meta = dict(body.get("meta") or {})
    tags = [t for t in meta.get("tag", []) if t.get("code") != "SUBSETTED"]
    meta["tag"] = [*tags, SUBSETTED]
    return {**body, "meta": meta}


def subset(
    body: dict[str, Any], *, summary: str | None, elements: list[str] | None
) -> tuple[dict[str, Any], bool]:
    """The subset of ``body`` to serve, and whether it was subsetted at all."""
    if elements:
        keep = set(ALWAYS) | set(elements) | {"_" + e for e in elements} | _mandatory_keys(body)
        reduced = {k: v for k, v in body.items() if k in keep}
        return _tagged(reduced), True
    if summary in (None, "false"):
        return body, False
    if summary == "text":
        keep = {*ALWAYS, "text", *_mandatory_keys(body)}
        return _tagged({k: v for k, v in body.items() if k in keep}), True
    if summary == "data":
        return _tagged({k: v for k, v in body.items() if k != "text"}), True
    names = (summary_elements(body["resourceType"]) or frozenset(body)) | _mandatory_keys(body)
    return _tagged({k: v for k, v in body.items() if k in names or k in ALWAYS}), True


def wants_element(
    name: str, *, summary: str | None, elements: list[str] | None, resource_type: str
) -> bool:
    """Whether a subset request includes a top-level element (e.g. Group.member)."""
    if elements:
        return name in elements
    if summary in (None, "false", "data"):
        return True
    if summary == "text":
        return False
    return name in (summary_elements(resource_type) or ())
