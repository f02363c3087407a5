"""Patients as data-transfer objects: matched by identifier, created by the server.

Clients never build references: an operation names a Patient by an Identifier, or sends a
Patient DTO that the server matches by its identifiers (or creates). Literal references
inside a DTO are not trusted: elements holding a ``reference`` are dropped before the
Patient is stored (``strip_references`` returns the dropped paths for logging).

Matching only ever sees Patients inside the caller's organization boundary: a Patient of
another organization is never matched, so a DTO creates one of the caller's own.
"""

from __future__ import annotations

import uuid
from functools import cache
from typing import Any

from django.db import connections, router
from django.db.models import OuterRef, Subquery

from fhirservice import access
from fhirservice.access.boundaries import visible_keys, with_organization
from fhirservice.errors import BadRequest, Conflict, NotFound
from fhirservice.models import ResourceVersion, SearchToken, StoredResource, minute_of
from fhirservice.search.extract import extract_rows
from fhirservice.store import json
from fhirservice.store.handlers import WriteContext
from fhirservice.store.rows import SQL_VENDORS, insert_values, prepared_cursor
from fhirservice.store.services import format_instant, now, resource_create

MSG_NO_PATIENT = "No Patient has the identifier {system}|{value}"
MSG_AMBIGUOUS = "{count} Patients match the identifier(s) {identifiers}; the match must be unique"
MSG_DTO_NO_IDENTIFIER = "The patient DTO needs at least one identifier to be matched by"
BULK_CHUNK = 1000
# Where the identifier lookup, compiled once, binds a call's value and system.
VALUE_SLOT = "\x00value"
SYSTEM_SLOT = "\x00system"


def _token(identifier: dict[str, Any]) -> tuple[str | None, str]:
    return identifier.get("system"), identifier["value"]


def patient_keys(identifier: dict[str, Any]) -> list[str]:
    """Keys of current Patients carrying an identifier (any system when none is given) that
    the caller may see.

    On SQL backends one statement compiled once per process (prepared on PostgreSQL): the
    Patients' keys with the organization of each one's current row. The tokens' query and
    ``visible_keys``' query of those rows, each built and compiled by the ORM per call, were
    two round trips and most of the lookup's Python time in every ``$add-member``.
    """
    system, value = _token(identifier)
    connection = connections[router.db_for_read(SearchToken)]
    if connection.vendor not in SQL_VENDORS:
        tokens = SearchToken.objects.filter(
            resource_type="Patient", param="identifier", value=value
        )
        if system:
            tokens = tokens.filter(system=system)
        return visible_keys(sorted(set(tokens.values_list("resource_key", flat=True))))
    caller = access.current()
    sql, slots = _identifier_lookup(connection.alias, bool(system), caller.restricted)
    bound = {VALUE_SLOT: value, SYSTEM_SLOT: system}
    with prepared_cursor(connection) as cursor:
        cursor.execute(sql, [bound.get(slot, slot) for slot in slots])
        rows = cursor.fetchall()
    if not caller.restricted:
        return sorted({key for (key,) in rows})
    # As visible_keys: a restricted caller sees a key whose current row it may see (a token
    # without a current row has no organization, which no restricted caller sees).
    return sorted({key for key, organization in rows if caller.sees(organization)})


@cache
def _identifier_lookup(
    alias: str, with_system: bool, restricted: bool
) -> tuple[str, tuple[Any, ...]]:
    """The identifier lookup's SQL on ``alias`` and its parameters, ``VALUE_SLOT`` and
    ``SYSTEM_SLOT`` where a call's value and system go: the Patient key of each token, and
    for a ``restricted`` caller the organization of its current row (or NULL).

    An unrestricted caller's lookup reads no current row, as ``visible_keys`` reads none for
    it: the join read the current rows' key index for nothing (and in a serializable region
    held predicate locks on its pages).
    """
    tokens = SearchToken.objects.using(alias).filter(
        resource_type="Patient", param="identifier", value=VALUE_SLOT
    )
    if with_system:
        tokens = tokens.filter(system=SYSTEM_SLOT)
    if restricted:
        organization = StoredResource.objects.filter(key=OuterRef("resource_key")).values(
            "organization"
        )[:1]
        query = tokens.annotate(organization=Subquery(organization)).values_list(
            "resource_key", "organization"
        )
    else:
        query = tokens.values_list("resource_key")
    return query.query.get_compiler(using=alias).as_sql()


def patient_by_identifier(identifier: dict[str, Any]) -> str:
    """The one existing Patient with this identifier: 404 when none, 409 when several."""
    keys = patient_keys(identifier)
    if not keys:
        raise NotFound(
            MSG_NO_PATIENT.format(system=identifier.get("system", ""), value=identifier["value"]),
            detail_code="MSG_PATIENT_NOT_FOUND",
        )
    if len(keys) > 1:
        raise Conflict(
            MSG_AMBIGUOUS.format(count=len(keys), identifiers=identifier["value"]),
            detail_code="MSG_PATIENT_AMBIGUOUS",
        )
    return keys[0]


def strip_references(value: Any, path: str = "Patient") -> tuple[Any, list[str]]:
    """``value`` without any element that holds a literal reference, and the dropped paths."""
    dropped: list[str] = []
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(item, dict) and "reference" in item:
                dropped.append(f"{path}.{key}")
                continue
            cleaned, inner = strip_references(item, f"{path}.{key}")
            dropped.extend(inner)
            if cleaned not in ({}, []):
                out[key] = cleaned
        return out, dropped
    if isinstance(value, list):
        items = []
        for index, item in enumerate(value):
            if isinstance(item, dict) and "reference" in item:
                dropped.append(f"{path}[{index}]")
                continue
            cleaned, inner = strip_references(item, f"{path}[{index}]")
            dropped.extend(inner)
            if _emptied_extension(item, cleaned):
                # An extension whose value was a reference means nothing without it (ext-1).
                continue
            items.append(cleaned)
        return items, dropped
    return value, dropped


def _emptied_extension(before: Any, after: Any) -> bool:
    """Whether stripping left an extension that had a value or sub-extensions with neither."""

    def carries(element: dict[str, Any]) -> bool:
        return any(k == "extension" or k.startswith("value") for k in element)

    return (
        isinstance(before, dict)
        and "url" in before
        and carries(before)
        and isinstance(after, dict)
        and not carries(after)
    )


def patient_match_or_create(
    dto: dict[str, Any], *, context: WriteContext
) -> tuple[str, bool, list[str]]:
    """(Patient key, created?, dropped reference paths) for a Patient DTO."""
    identifiers = [
        i
        for i in dto.get("identifier", [])
        if isinstance(i, dict) and isinstance(i.get("value"), str)
    ]
    if not identifiers:
        raise BadRequest(
            MSG_DTO_NO_IDENTIFIER,
            detail_code="MSG_BAD_FORMAT",
            expression="Parameters.parameter(patient).resource.identifier",
        )
    keys = sorted({key for identifier in identifiers for key in patient_keys(identifier)})
    if len(keys) > 1:
        raise Conflict(
            MSG_AMBIGUOUS.format(
                count=len(keys), identifiers=", ".join(i["value"] for i in identifiers)
            ),
            detail_code="MSG_PATIENT_AMBIGUOUS",
        )
    body, dropped = strip_references({k: v for k, v in dto.items() if k not in ("id", "meta")})
    if keys:
        return keys[0], False, dropped
    result = resource_create(resource_type="Patient", body=body, context=context)
    return result.row.key, True, dropped


def patients_resolve_or_create(
    identifiers: list[dict[str, Any]], *, context: WriteContext
) -> tuple[list[str], int]:
    """Patient keys for many identifiers (creating minimal Patients), in bulk.

    Matching is exact on (system, value). One query per 1,000 identifiers, and missing
    Patients are inserted with bulk writes (version 1, history row, search tokens), so
    10^5 identifiers take seconds, not minutes.
    """
    found: dict[tuple[str, str], str] = {}
    for start in range(0, len(identifiers), BULK_CHUNK):
        chunk = identifiers[start : start + BULK_CHUNK]
        values = {i["value"] for i in chunk}
        wanted = {(i.get("system") or "", i["value"]) for i in chunk}
        rows = list(
            SearchToken.objects.filter(
                resource_type="Patient", param="identifier", value__in=values
            ).values_list("system", "value", "resource_key")
        )
        seen = set(visible_keys(sorted({key for _, _, key in rows})))
        for system, value, key in rows:
            # The query matches values in any system: only the requested tokens must be unique.
            if (system, value) not in wanted or key not in seen:
                continue
            previous = found.setdefault((system, value), key)
            if previous != key:
                raise Conflict(
                    MSG_AMBIGUOUS.format(count=2, identifiers=value),
                    detail_code="MSG_PATIENT_AMBIGUOUS",
                )
    keys: list[str] = []
    missing: dict[tuple[str, str], str] = {}
    for identifier in identifiers:
        token = (identifier.get("system") or "", identifier["value"])
        key = found.get(token) or missing.get(token)
        if key is None:
            key = f"Patient/{uuid.uuid4()}"
            missing[token] = key
        keys.append(key)
    _bulk_create_patients(missing, context=context)
    return keys, len(missing)


def _bulk_create_patients(missing: dict[tuple[str, str], str], *, context: WriteContext) -> None:
    moment = now()
    instant = format_instant(moment)
    organization = access.current().owner
    meta = with_organization({"versionId": "1", "lastUpdated": instant}, organization)
    items = list(missing.items())
    for start in range(0, len(items), BULK_CHUNK):
        current, versions, tokens = [], [], []
        for (system, value), key in items[start : start + BULK_CHUNK]:
            resource_id = key.split("/", 1)[1]
            identifier = {"system": system, "value": value} if system else {"value": value}
            body = {
                "resourceType": "Patient",
                "id": resource_id,
                "meta": meta,
                "identifier": [identifier],
            }
            text = json.dumps_str(body)
            fields = {
                "resource_type": "Patient",
                "resource_id": resource_id,
                "version_id": 1,
                "incarnation": 1,
                "last_updated": moment,
                "deleted": False,
                "body": text,
                "organization": organization,
            }
            current.append(StoredResource(key=key, updated_minute=minute_of(moment), **fields))
            versions.append(
                ResourceVersion(
                    key=f"{key}/_history/1",
                    method="POST",
                    request_id=context.request_id,
                    actor=context.actor,
                    **fields,
                )
            )
            tokens.extend(extract_rows(key, body))
        StoredResource.objects.bulk_create(current)
        ResourceVersion.objects.bulk_create(versions)
        insert_values(SearchToken, tokens)
