"""Writes of the versioned resource store: create, update, patch, delete.

Every write goes through :func:`write_version`: one metadata transaction that reads the
current row, lets the caller build the new content, sends ``resource_saved`` and persists the
version with a compare-and-set on ``version_id`` (portable: no row locks). A plain create on
PostgreSQL whose receivers wrote nothing is that transaction as one INSERT statement
(``rows.insert_all``). Losing a race
retries the whole unit against the newer version, a bounded number of times; an ``If-Match``
that names an old version answers 412 at once.

Invariants: versionId is numeric, starts at 1 and rises by exactly 1 per write; an update with
identical content makes no version; delete is a version of its own.

Conditional interactions (create with ``If-None-Exist``, update, patch and delete by search
criteria) find their matches with the search module's ``search_keys`` (inside the caller's
organization boundary) and write through the same functions as the plain interactions; the
match and the writes run as one serializable transaction (:func:`run_conditional`), so two
conditional creates with the same criteria make one resource.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from django.db import IntegrityError, connections, router, transaction
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
from fhirservice.models import ResourceVersion, SearchToken, StoredResource, minute_of
from fhirservice.search.extract import Row, extract_rows
from fhirservice.search.query import search_keys
from fhirservice.store import json
from fhirservice.store.content import parse_patch, without_server_meta
from fhirservice.store.handlers import VersionWrite, WriteContext, handler_for, resource_saved
from fhirservice.store.rows import insert_all, insert_values, row_by_key, update_row

MSG_TYPE_MISMATCH = "The body's resourceType {found!r} does not match the URL's {expected!r}"
MSG_ID_MISMATCH = "The body's id {found!r} does not match the URL's id {expected!r}"
MSG_ID_MISSING = "An update needs the resource id in the body"
MSG_BAD_ID = "Not a valid FHIR id: {id!r}"
MSG_NOT_A_RESOURCE = "The body must be a JSON object with a resourceType"
MSG_CONFLICT_RETRIES = "Too many concurrent writes to {key}; try again"
MSG_CONDITIONAL_MULTIPLE = "The condition matches {count} resources; at most one may match"
MSG_UNKNOWN_TYPE = "Unknown resource type: {type}"
MSG_CONDITION_MISSING = (
    "A conditional {interaction} needs search criteria in the URL: [type]?[search]"
)
MSG_CONDITION_ID_MISMATCH = (
    "The body's id {found!r} is not the id of the resource the condition matches ({matched!r})"
)
MSG_CONDITION_ID_TAKEN = (
    "The body's id {found!r} names an existing {type} that the condition does not match"
)
MSG_CONDITION_NO_MATCH = "No {type} matches the condition {query!r}"
MSG_LOCKED_ROW = "The row of {key} passed as read locked must be read in this transaction"
MSG_CONDITIONAL_DELETE_LIMIT = (
    "The condition matches more than {limit} resources; a conditional delete removes at most "
    "{limit} (setting CONDITIONAL_DELETE_MAX); narrow the criteria"
)

T = TypeVar("T")

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
    fresh: bool = False,
    locked: StoredResource | None = None,
) -> WriteResult:
    """Write one new version of ``Type/id``; ``build`` fills in the draft's body and payload.

    ``build`` runs inside the transaction, once per attempt, and sees ``draft.previous`` (the
    current row, or None). It may raise a FhirError to abort without writing. ``fresh``: the
    id was just generated here (a UUID), so no row can exist and none is read. ``locked``:
    the current row as the caller's own transaction read it with its lock (an operation
    region's first read), so it is not read again; only inside that transaction.
    """
    key = f"{resource_type}/{resource_id}"
    # The unit is the whole transaction (run_write opens it), and persisting is its end.
    alone = not db.in_transaction()
    if locked is not None and (alone or locked.key != key):
        # Outside the caller's transaction a retry would need the row read anew.
        raise ValueError(MSG_LOCKED_ROW.format(key=key))

    def unit() -> WriteResult:
        # A fresh id skips the lookup: it was a statement of its own and ~10% of a create's
        # CPU, and the INSERT's primary key would still refuse a duplicate. A row the caller
        # holds locked cannot have changed since it read it (and the UPDATE's compare-and-set
        # on its version would still refuse a newer one).
        if locked is not None:
            current = locked
        else:
            current = None if fresh else current_row(key, lock=True)
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
            insert_all(draft.rows)  # none, unless a receiver stored rows and left it unchanged
            return WriteResult(row=current, created=False, changed=False)
        row = _persist(draft, current, alone=alone)
        return WriteResult(row=row, created=not exists)

    return run_write(unit, key=key)


def current_row(key: str, *, lock: bool = False) -> StoredResource | None:
    """The current row of ``Type/id`` (locked until commit where the backend can), or None.

    Through a statement compiled once per process (``rows.row_by_key``): the ORM's filter
    and slice, compiled per call, cost more than running the query.
    """
    return row_by_key(StoredResource, key, lock=lock)


def warm_up(**_: Any) -> None:
    """Look up a key no resource has, plain and locked, once on this thread's connection:
    both statements are compiled for the process and a new PostgreSQL session reads the
    table's catalog entries now rather than in a request. A ``request_thread_starting``
    receiver (``fhirservice.serving``)."""
    current_row("")
    if connections[router.db_for_write(StoredResource)].features.has_select_for_update:
        with transaction.atomic():
            current_row("", lock=True)


def _same_content(current: StoredResource, body: dict[str, Any] | None) -> bool:
    if body is None:
        return False
    return without_server_meta(json.loads(current.body)) == without_server_meta(body)


def _persist(draft: VersionWrite, current: StoredResource | None, *, alone: bool) -> StoredResource:
    """The rows of a new version: the current row (inserted, or updated with a compare-and-set
    on its version), the history row and the search values.

    ``alone``: nothing runs after this in the transaction. A first version then inserts its
    three tables through ``rows.insert_all``, which on PostgreSQL sends them as one statement
    outside a transaction when nothing ran in it before (``resource_saved`` receivers wrote
    nothing): a plain create was BEGIN, three INSERTs and COMMIT, five round trips. The
    rows receivers handed to ``draft.rows`` (a roster write's outbox row) go with them, and
    with a later version's UPDATE and history row (``rows.update_row``).
    """
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
    current_fields = {**fields, "updated_minute": minute_of(moment)}
    row = StoredResource(
        key=draft.key,
        resource_type=draft.resource_type,
        resource_id=draft.resource_id,
        **current_fields,
    )
    version = ResourceVersion(
        key=f"{draft.key}/_history/{draft.version_id}",
        resource_type=draft.resource_type,
        resource_id=draft.resource_id,
        method=draft.method,
        request_id=draft.context.request_id,
        actor=draft.context.actor,
        **fields,
    )
    if current is None:
        # A first version has no tokens to replace.
        tokens = extract_rows(draft.key, draft.body) if draft.body is not None else []
        insert_all(
            [
                (StoredResource, [row]),
                (ResourceVersion, [version]),
                (SearchToken, tokens),
                *draft.rows,
            ],
            alone=alone,
        )
        return row
    # The receivers' rows and the history row in the UPDATE's statement on PostgreSQL: a
    # lost compare-and-set raises VersionRace, which rolls them back with the transaction.
    updated = update_row(
        StoredResource,
        draft.key,
        where={"version_id": current.version_id},
        values=current_fields,
        inserts=[*draft.rows, (ResourceVersion, [version])],
    )
    if updated != 1:
        raise VersionRace(draft.key)
    if draft.same_search_values and not draft.deleted and _has_tokens(current):
        return row
    tokens = extract_rows(draft.key, draft.body) if draft.body is not None else []
    if not _same_tokens(current, tokens):
        SearchToken.objects.filter(resource_key=draft.key).delete()
        insert_values(SearchToken, tokens)
    return row


def _has_tokens(current: StoredResource | None) -> bool:
    """Whether the stored search tokens are those of ``current``'s body (a live version)."""
    return current is not None and not current.deleted and bool(current.body)


def _same_tokens(current: StoredResource | None, tokens: list[Row]) -> bool:
    """Whether the stored search tokens already are ``tokens`` (the previous version's).

    Most updates of a Group change only its roster and ``quantity``, which no search
    parameter indexes: rewriting its tokens cost two statements per write (a third of a
    PATCH adding one member on PostgreSQL).
    """
    if not _has_tokens(current):
        return False
    return extract_rows(current.key, json.loads(current.body)) == tokens


def run_conditional(unit: Callable[[], T], *, key: str) -> T:
    """Run a conditional interaction's match and its writes as one serializable transaction.

    On PostgreSQL serializable snapshot isolation catches the predicate conflict of two
    writers that both found no match and both create: one of them fails, runs again, and
    finds the other's resource. SQLite runs writers one after another (``BEGIN IMMEDIATE``).
    Inside an outer transaction (a transaction Bundle) the unit runs at that transaction's
    level, and a lost race becomes a 409 that rolls the whole Bundle back.
    """
    if db.in_transaction():
        with db.atomic():
            return unit()

    def attempt() -> T:
        db.serializable()
        return unit()

    return db.run_retrying(
        attempt,
        races=(VersionRace, WriteRace),
        retries=fhir_settings.WRITE_RETRIES,
        exhausted=Conflict(MSG_CONFLICT_RETRIES.format(key=key)),
    )


def _condition(query: str | None, interaction: str) -> str:
    """The search part of a conditional URL; 400 when there is none."""
    query = (query or "").lstrip("?")
    if not query:
        raise BadRequest(
            MSG_CONDITION_MISSING.format(interaction=interaction),
            detail_code="MSG_CONDITION_MISSING",
        )
    return query


def _single_match(resource_type: str, query: str) -> str | None:
    """The id of the one resource the condition matches, None for none, 412 for several."""
    keys = search_keys(resource_type, query, limit=2)
    if len(keys) > 1:
        raise PreconditionFailed(
            MSG_CONDITIONAL_MULTIPLE.format(count="several"),
            detail_code="MSG_CONDITIONAL_MULTIPLE",
        )
    return keys[0].split("/", 1)[1] if keys else None


def _put_version(
    *,
    resource_type: str,
    resource_id: str,
    stored: dict[str, Any],
    payload: Any,
    context: WriteContext,
    if_match: int | None,
    may_create: bool,
) -> WriteResult:
    """The write of an update (plain or conditional) with a body its handler prepared."""
    body = {**stored, "id": resource_id}

    def build(draft: VersionWrite) -> None:
        draft.body, draft.payload = body, payload

    return write_version(
        resource_type=resource_type,
        resource_id=resource_id,
        method="PUT",
        context=context,
        build=build,
        if_match=if_match,
        may_create=may_create,
    )


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
    resource_id = assigned_id or str(uuid.uuid4())
    stored = {**stored, "id": resource_id}

    def build(draft: VersionWrite) -> None:
        draft.body, draft.payload = stored, payload

    def create() -> WriteResult:
        return write_version(
            resource_type=resource_type,
            resource_id=resource_id,
            method="POST",
            context=context,
            build=build,
            may_create=True,
            fresh=assigned_id is None,
        )

    if if_none_exist is None:
        return create()

    def create_unless_found() -> WriteResult:
        found = _single_match(resource_type, if_none_exist)
        if found is not None:
            row = StoredResource.objects.get(key=f"{resource_type}/{found}")
            return WriteResult(row=row, created=False, changed=False)
        return create()

    return run_conditional(create_unless_found, key=f"{resource_type}?{if_none_exist}")


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
    return _put_version(
        resource_type=resource_type,
        resource_id=resource_id,
        stored=stored,
        payload=payload,
        context=context,
        if_match=if_match,
        may_create=fhir_settings.UPDATE_CREATE,
    )


def resource_conditional_update(
    *,
    resource_type: str,
    query: str | None,
    body: Any,
    context: WriteContext,
    if_match: int | None = None,
    assigned_id: str | None = None,
) -> WriteResult:
    """``PUT [type]?[search]``: update the one match, or create when nothing matches.

    No match: create, under the body's id (update-as-create, when UPDATE_CREATE allows; 400
    when that id exists but does not match) or a new one (``assigned_id`` when a transaction
    Bundle chose it). One match: update it (400 when the body names another id). Several:
    412. Matching and writing are one serializable transaction.
    """
    check_type(resource_type)
    condition = _condition(query, "update")
    check_body(resource_type, body)
    body_id = body.get("id")
    if body_id is not None:
        if not isinstance(body_id, str):
            raise BadRequest(MSG_BAD_ID.format(id=body_id), detail_code="MSG_ID_INVALID")
        check_id(body_id)
    stored, payload = handler_for(resource_type).prepare(without_server_meta(body))
    del body  # see resource_create: a big roster is in ``payload`` now
    new_id = assigned_id or str(uuid.uuid4())

    def update_or_create() -> WriteResult:
        matched = _single_match(resource_type, condition)
        if matched is not None and body_id is not None and body_id != matched:
            raise BadRequest(
                MSG_CONDITION_ID_MISMATCH.format(found=body_id, matched=matched),
                detail_code="MSG_RESOURCE_ID_MISMATCH",
                expression="id",
            )
        if matched is None and body_id is not None:
            existing = StoredResource.objects.filter(key=f"{resource_type}/{body_id}").first()
            if existing is not None and not existing.deleted and is_visible(existing):
                raise BadRequest(
                    MSG_CONDITION_ID_TAKEN.format(found=body_id, type=resource_type),
                    detail_code="MSG_RESOURCE_ID_MISMATCH",
                    expression="id",
                )
        return _put_version(
            resource_type=resource_type,
            resource_id=matched or body_id or new_id,
            stored=stored,
            payload=payload,
            context=context,
            if_match=if_match,
            # A body id with no match is an update-as-create; without one, a create.
            may_create=matched is None and (body_id is None or fhir_settings.UPDATE_CREATE),
        )

    return run_conditional(update_or_create, key=f"{resource_type}?{condition}")


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


def resource_conditional_patch(
    *,
    resource_type: str,
    query: str | None,
    ops: Any,
    context: WriteContext,
    if_match: int | None = None,
) -> WriteResult:
    """``PATCH [type]?[search]``: patch the one match (404 for none, 412 for several)."""
    check_type(resource_type)
    condition = _condition(query, "patch")
    parse_patch(ops)

    def patch_match() -> WriteResult:
        matched = _single_match(resource_type, condition)
        if matched is None:
            raise NotFound(
                MSG_CONDITION_NO_MATCH.format(type=resource_type, query=condition),
                detail_code="MSG_CONDITION_NO_MATCH",
            )
        return resource_patch(
            resource_type=resource_type,
            resource_id=matched,
            ops=ops,
            context=context,
            if_match=if_match,
        )

    return run_conditional(patch_match, key=f"{resource_type}?{condition}")


def resource_conditional_delete(
    *, resource_type: str, query: str | None, context: WriteContext
) -> list[WriteResult]:
    """``DELETE [type]?[search]``: delete what the condition matches; the deletes made.

    ``CONDITIONAL_DELETE`` "single" answers 412 when several resources match; "multiple"
    deletes them all, up to ``CONDITIONAL_DELETE_MAX`` (more: 412, nothing deleted). No
    match deletes nothing. Matching and deleting are one serializable transaction.
    """
    check_type(resource_type)
    condition = _condition(query, "delete")
    multiple = fhir_settings.CONDITIONAL_DELETE == "multiple"
    limit = fhir_settings.CONDITIONAL_DELETE_MAX if multiple else 1

    def delete_matches() -> list[WriteResult]:
        keys = search_keys(resource_type, condition, limit=limit + 1)
        if len(keys) > limit:
            if multiple:
                raise PreconditionFailed(
                    MSG_CONDITIONAL_DELETE_LIMIT.format(limit=limit),
                    detail_code="MSG_CONDITIONAL_DELETE_LIMIT",
                )
            raise PreconditionFailed(
                MSG_CONDITIONAL_MULTIPLE.format(count="several"),
                detail_code="MSG_CONDITIONAL_MULTIPLE",
            )
        deleted = []
        for key in keys:
            result = resource_delete(
                resource_type=resource_type, resource_id=key.split("/", 1)[1], context=context
            )
            if result is not None:
                deleted.append(result)
        return deleted

    return run_conditional(delete_matches, key=f"{resource_type}?{condition}")


def resource_delete(
    *, resource_type: str, resource_id: str, context: WriteContext
) -> WriteResult | None:
    """DELETE: a new version that marks the resource deleted; deleting again changes nothing.

    Returns None when the resource was already deleted. The write's locked read of the
    current row answers an unknown or invisible id (404) and a deleted one (None): a read of
    its own before the transaction was one more statement, planned anew, per delete.
    """
    check_type(resource_type)
    check_id(resource_id)

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
