"""Writes of the versioned resource store: create, update, patch, delete.

Every write goes through :func:`write_version`: one metadata transaction that reads the
current row, lets the caller build the new content, sends ``resource_saved`` and persists the
version with a compare-and-set on ``version_id`` (portable: no row locks). Losing a race
retries the whole unit against the newer version, a bounded number of times; an ``If-Match``
that names an old version answers 412 at once.

Invariants: versionId is numeric, starts at 1 and rises by exactly 1 per write; an update with
identical content makes no version; delete is a version of its own.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError
from django.utils import timezone

from fhirservice import access, db
from fhirservice.access.boundaries import is_visible, with_organization
from fhirservice.access.policy import require_permission
from fhirservice.conf import fhir_settings
from fhirservice.errors import (
    MSG_DELETED,
    MSG_NOT_FOUND,
    MSG_VERSION_MISMATCH,
    BadRequest,
    Conflict,
    Gone,
    MethodNotAllowed,
    NotFound,
    PreconditionFailed,
)
from fhirservice.fhir.resource_types import is_resource_type
from fhirservice.models import ResourceVersion, SearchToken, StoredResource
from fhirservice.search.extract import extract_tokens, token_signature
from fhirservice.search.query import search_keys
from fhirservice.store import json
from fhirservice.store.content import parse_patch, without_server_meta
from fhirservice.store.handlers import VersionWrite, WriteContext, handler_for, resource_saved

MSG_TYPE_MISMATCH = "The body's resourceType {found!r} does not match the URL's {expected!r}"
MSG_ID_MISMATCH = "The body's id {found!r} does not match the URL's id {expected!r}"
MSG_ID_MISSING = "An update needs the resource id in the body"
MSG_BAD_ID = "Not a valid FHIR id: {id!r}"
MSG_NOT_A_RESOURCE = "The body must be a JSON object with a resourceType"
MSG_CONFLICT_RETRIES = "Too many concurrent writes to {key}; try again"
MSG_CONDITIONAL_MULTIPLE = "The condition matches {count} resources; at most one may match"
MSG_UNKNOWN_TYPE = "Unknown resource type: {type}"

ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")


class VersionRace(Exception):
    """Another writer changed the row between our read and our compare-and-set."""


class WriteRace(Conflict):
    """A race lost inside an outer transaction: the outer unit may retry as a whole.

    Transaction Bundles answer it as 409; operation regions (``operations.transactions``)
    retry the region.
    """

    detail_code = "MSG_CONCURRENT_WRITE"


@dataclass
class WriteResult:
    """What a write did: the current row afterwards, and whether it created or changed it."""

    row: StoredResource
    created: bool = False
    changed: bool = True


def check_type(resource_type: str) -> None:
    """404 for a type that is not an R4 resource type."""
    if not is_resource_type(resource_type):
        raise NotFound(MSG_UNKNOWN_TYPE.format(type=resource_type), detail_code="MSG_UNKNOWN_TYPE")


def check_id(resource_id: str) -> None:
    """400 for a malformed id."""
    if not ID_RE.fullmatch(resource_id or ""):
        raise BadRequest(MSG_BAD_ID.format(id=resource_id), detail_code="MSG_ID_INVALID")


def now() -> Any:
    """The current instant at the precision we store and serve (milliseconds, UTC)."""
    moment = timezone.now()
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def format_instant(moment: Any) -> str:
    """An instant as FHIR serves it: ``2026-01-02T03:04:05.678Z``."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_body(resource_type: str, body: Any) -> dict[str, Any]:
    """400 unless ``body`` is a resource of ``resource_type``."""
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise BadRequest(MSG_NOT_A_RESOURCE, detail_code="MSG_RESOURCE_TYPE_MISSING")
    if body["resourceType"] != resource_type:
        raise BadRequest(
            MSG_TYPE_MISMATCH.format(found=body["resourceType"], expected=resource_type),
            detail_code="MSG_RESOURCE_TYPE_MISMATCH",
            expression="resourceType",
        )
    return body


def run_write(unit: Callable[[], WriteResult], *, key: str) -> WriteResult:
    """Run ``unit`` in a transaction, retrying it when it loses a version race.

    Inside an outer transaction (a transaction Bundle, an $operation) a race cannot be retried
    here: it becomes a 409 that rolls the outer transaction back.
    """
    if db.in_transaction():
        try:
            with db.atomic():
                return unit()
        except (VersionRace, IntegrityError) as exc:
            raise WriteRace(MSG_CONFLICT_RETRIES.format(key=key)) from exc
    return db.run_retrying(
        unit,
        races=(VersionRace,),
        retries=fhir_settings.WRITE_RETRIES,
        exhausted=Conflict(MSG_CONFLICT_RETRIES.format(key=key)),
    )


def write_version(
    *,
    resource_type: str,
    resource_id: str,
    method: str,
    context: WriteContext,
    build: Callable[[VersionWrite], None],
    if_match: int | None = None,
    may_create: bool = False,
    must_exist: bool = False,
) -> WriteResult:
    """Write one new version of ``Type/id``; ``build`` fills in the draft's body and payload.

    ``build`` runs inside the transaction, once per attempt, and sees ``draft.previous`` (the
    current row, or None). It may raise a FhirError to abort without writing.
    """
    key = f"{resource_type}/{resource_id}"

    def unit() -> WriteResult:
        current = db.lock_rows(StoredResource.objects.filter(key=key)).first()
        if current is not None and not is_visible(current):
            # Another organization's id (even a deleted one) answers as an unknown one, and
            # update-as-create cannot take it over.
            raise NotFound(MSG_NOT_FOUND.format(type=resource_type, id=resource_id))
        exists = current is not None and not current.deleted
        if if_match is not None and (not exists or current.version_id != if_match):
            found = current.version_id if current is not None else "none"
            raise PreconditionFailed(MSG_VERSION_MISMATCH.format(expected=if_match, current=found))
        if not exists:
            if must_exist:
                if current is None:
                    raise NotFound(MSG_NOT_FOUND.format(type=resource_type, id=resource_id))
                raise Gone(
                    MSG_DELETED.format(
                        type=resource_type, id=resource_id, version=current.version_id
                    )
                )
            if not may_create:
                raise MethodNotAllowed(f"{key} does not exist and updates do not create here")
            if method == "PUT":
                # Update-as-create creates: it needs ``c`` as well as the ``u`` of the route.
                require_permission(access.current(), resource_type, "cu", "update-as-create")
        version = current.version_id + 1 if current is not None else 1
        draft = VersionWrite(
            resource_type=resource_type,
            resource_id=resource_id,
            version_id=version,
            incarnation=current.incarnation if exists else version,
            method=method,
            context=context,
            previous=current,
            body=None,
        )
        build(draft)
        resource_saved.send(sender=VersionWrite, write=draft)
        if exists and not draft.changed and _same_content(current, draft.body):
            return WriteResult(row=current, created=False, changed=False)
        row = _persist(draft, current)
        return WriteResult(row=row, created=not exists)

    return run_write(unit, key=key)


def _same_content(current: StoredResource, body: dict[str, Any] | None) -> bool:
    if body is None:
        return False
    return without_server_meta(json.loads(current.body)) == without_server_meta(body)


def _persist(draft: VersionWrite, current: StoredResource | None) -> StoredResource:
    moment = now()
    text = ""
    # An id keeps the organization of its first creator for life.
    organization = current.organization if current is not None else access.current().owner
    if draft.body is not None:
        body = without_server_meta(draft.body)
        meta = with_organization(
            {
                "versionId": str(draft.version_id),
                "lastUpdated": format_instant(moment),
                **body.get("meta", {}),
            },
            organization,
        )
        served = {"resourceType": draft.resource_type, "id": draft.resource_id, "meta": meta}
        served.update((k, v) for k, v in body.items() if k not in served)
        draft.body = served
        text = json.dumps_str(served)
    fields = {
        "version_id": draft.version_id,
        "incarnation": draft.incarnation,
        "last_updated": moment,
        "deleted": draft.deleted,
        "body": text,
        "organization": organization,
    }
    if current is None:
        row = StoredResource.objects.create(
            key=draft.key,
            resource_type=draft.resource_type,
            resource_id=draft.resource_id,
            **fields,
        )
    else:
        updated = StoredResource.objects.filter(
            key=draft.key, version_id=current.version_id
        ).update(**fields)
        if updated != 1:
            raise VersionRace(draft.key)
        row = StoredResource(
            key=draft.key,
            resource_type=draft.resource_type,
            resource_id=draft.resource_id,
            **fields,
        )
    ResourceVersion.objects.create(
        key=f"{draft.key}/_history/{draft.version_id}",
        resource_type=draft.resource_type,
        resource_id=draft.resource_id,
        method=draft.method,
        request_id=draft.context.request_id,
        actor=draft.context.actor,
        **fields,
    )
    tokens = extract_tokens(draft.key, draft.body) if draft.body is not None else []
    if not _same_tokens(current, tokens):
        if current is not None:  # a first version has no tokens to replace
            SearchToken.objects.filter(resource_key=draft.key).delete()
        SearchToken.objects.bulk_create(tokens)
    return row


def _same_tokens(current: StoredResource | None, tokens: list[SearchToken]) -> bool:
    """Whether the stored search tokens already are ``tokens`` (the previous version's).

    Most updates of a Group change only its roster and ``quantity``, which no search
    parameter indexes: rewriting its tokens cost two statements per write (a third of a
    PATCH adding one member on PostgreSQL).
    """
    if current is None or current.deleted or not current.body:
        return False
    previous = extract_tokens(current.key, json.loads(current.body))
    return token_signature(previous) == token_signature(tokens)


def resource_create(
    *,
    resource_type: str,
    body: Any,
    context: WriteContext,
    if_none_exist: str | None = None,
    assigned_id: str | None = None,
) -> WriteResult:
    """POST: store a new resource under a server-assigned UUID (conditional with If-None-Exist).

    ``assigned_id`` is for server code that chose the id beforehand (transaction Bundles).
    """
    check_type(resource_type)
    check_body(resource_type, body)
    stored, payload = handler_for(resource_type).prepare(without_server_meta(body))
    # Freed before the write when the caller kept no reference (the REST view): a Group's
    # roster is in ``payload`` by now, and its JSON objects (~0.5 GB at 10^6 members) were
    # held through the whole write, adding to the memory the events and shipping need.
    del body
    if if_none_exist is not None:
        keys = search_keys(resource_type, if_none_exist, limit=2)
        if len(keys) > 1:
            raise PreconditionFailed(
                MSG_CONDITIONAL_MULTIPLE.format(count="several"),
                detail_code="MSG_CONDITIONAL_MULTIPLE",
            )
        if keys:
            return WriteResult(
                row=StoredResource.objects.get(key=keys[0]), created=False, changed=False
            )
    resource_id = assigned_id or str(uuid.uuid4())
    stored = {**stored, "id": resource_id}

    def build(draft: VersionWrite) -> None:
        draft.body, draft.payload = stored, payload

    return write_version(
        resource_type=resource_type,
        resource_id=resource_id,
        method="POST",
        context=context,
        build=build,
        may_create=True,
    )


def resource_update(
    *,
    resource_type: str,
    resource_id: str,
    body: Any,
    context: WriteContext,
    if_match: int | None = None,
) -> WriteResult:
    """PUT: replace the resource's content (creates it when UPDATE_CREATE allows)."""
    check_type(resource_type)
    check_id(resource_id)
    check_body(resource_type, body)
    if "id" not in body:
        raise BadRequest(MSG_ID_MISSING, detail_code="MSG_RESOURCE_ID_MISSING", expression="id")
    if body["id"] != resource_id:
        raise BadRequest(
            MSG_ID_MISMATCH.format(found=body["id"], expected=resource_id),
            detail_code="MSG_RESOURCE_ID_MISMATCH",
            expression="id",
        )
    stored, payload = handler_for(resource_type).prepare(without_server_meta(body))

    def build(draft: VersionWrite) -> None:
        draft.body, draft.payload = stored, payload

    return write_version(
        resource_type=resource_type,
        resource_id=resource_id,
        method="PUT",
        context=context,
        build=build,
        if_match=if_match,
        may_create=fhir_settings.UPDATE_CREATE,
    )


def resource_patch(
    *,
    resource_type: str,
    resource_id: str,
    ops: Any,
    context: WriteContext,
    if_match: int | None = None,
) -> WriteResult:
    """PATCH with JSON Patch, applied to the current version inside the write transaction."""
    check_type(resource_type)
    check_id(resource_id)
    parse_patch(ops)
    handler = handler_for(resource_type)

    def build(draft: VersionWrite) -> None:
        handler.patch(draft, ops)

    return write_version(
        resource_type=resource_type,
        resource_id=resource_id,
        method="PATCH",
        context=context,
        build=build,
        if_match=if_match,
        must_exist=True,
    )


def resource_delete(
    *, resource_type: str, resource_id: str, context: WriteContext
) -> WriteResult | None:
    """DELETE: a new version that marks the resource deleted; deleting again changes nothing.

    Returns None when the resource was already deleted.
    """
    check_type(resource_type)
    check_id(resource_id)
    key = f"{resource_type}/{resource_id}"
    current = StoredResource.objects.filter(key=key).first()
    if current is None or not is_visible(current):
        raise NotFound(MSG_NOT_FOUND.format(type=resource_type, id=resource_id))
    if current.deleted:
        return None

    def build(draft: VersionWrite) -> None:
        draft.deleted = True
        draft.changed = True

    try:
        return write_version(
            resource_type=resource_type,
            resource_id=resource_id,
            method="DELETE",
            context=context,
            build=build,
            must_exist=True,
        )
    except Gone:
        return None
