"""Organization boundaries: which stored resources a caller may see, and how they are marked.

Every resource is recorded under the organization of the client that created it
(``StoredResource.organization`` and ``ResourceVersion.organization``); the organization is
fixed for the life of the id (updates, deletes and re-creates keep it). Resources created
by unrestricted callers (staff, commands, ``FHIR_AUTH=off``) carry none and are shared.

The served resource shows the organization as a ``meta.security`` Coding with system
:data:`ORGANIZATION_SYSTEM`. It is server-owned: whatever a client sends under that system
is dropped before storing, and the server adds its own.

A caller sees resources of its own organization and shared ones. Out-of-bounds resources
answer exactly as unknown ones do (404), so ids do not leak across organizations.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Q

from fhirservice.access import current
from fhirservice.models import StoredResource

ORGANIZATION_SYSTEM = "https://fhirservice.example/organization"


def visible_q(field_name: str = "organization") -> Q:
    """The ORM filter of what the current caller sees (an empty Q when unrestricted)."""
    access = current()
    if not access.restricted:
        return Q()
    return Q(**{f"{field_name}__in": ["", access.organization]})


def is_visible(row: Any) -> bool:
    """Whether the current caller sees a stored row (StoredResource or ResourceVersion)."""
    return current().sees(getattr(row, "organization", ""))


def visible_keys(keys: list[str]) -> list[str]:
    """The subset of ``Type/id`` keys of current resources the caller sees, order kept.

    The boundary is checked in Python on the rows of the keys, not in SQL: beside ``key IN``
    (10 keys or more), ``organization IN`` made SQLite's planner walk the organization index,
    every row of the table when one organization owns the data."""
    access = current()
    if not access.restricted or not keys:
        return keys
    rows = StoredResource.objects.filter(key__in=list(keys)).values_list("key", "organization")
    seen = {key for key, organization in rows if access.sees(organization)}
    return [key for key in keys if key in seen]


def without_organization(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` minus any ``meta.security`` Coding of :data:`ORGANIZATION_SYSTEM`."""
    meta = body.get("meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("security"), list):
        return body
    kept = [
        coding
        for coding in meta["security"]
        if not (isinstance(coding, dict) and coding.get("system") == ORGANIZATION_SYSTEM)
    ]
    if len(kept) == len(meta["security"]):
        return body
    rest = {k: v for k, v in meta.items() if k != "security"}
    if kept:
        rest["security"] = kept
    clean = {k: v for k, v in body.items() if k != "meta"}
    if rest:
        clean["meta"] = rest
    return clean


def organization_coding(organization: str) -> dict[str, str]:
    """The ``meta.security`` Coding that marks a resource's organization."""
    return {"system": ORGANIZATION_SYSTEM, "code": organization}


def with_organization(meta: dict[str, Any], organization: str) -> dict[str, Any]:
    """``meta`` with the organization Coding appended (unchanged when there is none)."""
    if not organization:
        return meta
    security = [*meta.get("security", []), organization_coding(organization)]
    return {**meta, "security": security}
