"""Batch and transaction Bundles posted to the FHIR base.

Each entry runs as a sub-request through the same middleware and views as a plain REST call,
so validation, If-Match, Prefer and per-request state (such as the Group members-written flag)
behave exactly as they would for a single request. A transaction runs all of its entries in
one metadata transaction: the first failing entry rolls everything back and its
OperationOutcome is the answer. That transaction runs as the single conditional interactions
do (``fhirservice.store.services.run_conditional``): serializable, and run again as a whole
(from the Bundle as posted) when it loses a race, so two transactions that both find no
match for the same conditional create make one resource, not two. Before a transaction runs,
``urn:uuid`` full URLs get server ids (a conditional create or update: the id of its match,
or the one it will create) and conditional references (``Patient?identifier=…``) are
resolved, and every reference in the Bundle is rewritten to the ids the server assigned.
Conditional update, patch and delete entries (``PUT Patient?identifier=…``) run through the
same views as their REST calls.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
from django.core.handlers.base import BaseHandler
from django.core.handlers.wsgi import WSGIRequest
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse

from fhirservice import access, db
from fhirservice.access.policy import require_permission
from fhirservice.conf import fhir_settings
from fhirservice.errors import BadRequest, Conflict, FhirError, PreconditionFailed
from fhirservice.fhir.resource_types import is_resource_type
from fhirservice.search.query import search_keys
from fhirservice.store.services import MSG_CONDITIONAL_MULTIPLE, WriteRace

MSG_NOT_A_BUNDLE = "The body must be a Bundle of type batch or transaction"
MSG_ENTRY_INVALID = "Entry {index}: {problem}"
MSG_ENTRY_FAILED = "Transaction failed at entry {index} ({method} {url}): {diagnostics}"
MSG_CONDITIONAL_REF = "Conditional reference {reference!r} matches {count} resources"
MSG_TRANSACTION_RETRIES = "The transaction kept conflicting with concurrent writes; try again"

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


@dataclass
class Entry:
    """One Bundle entry's request, normalised."""

    index: int
    method: str
    url: str
    resource: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    assigned_id: str | None = None
    full_url: str | None = None


class _SubRequestHandler(BaseHandler):
    """Django's request handler with the project's middleware, loaded once."""

    def __init__(self) -> None:
        super().__init__()
        self.load_middleware()


_handler: _SubRequestHandler | None = None


def _sub_handler() -> _SubRequestHandler:
    global _handler
    if _handler is None:
        _handler = _SubRequestHandler()
    return _handler


def _parse_entries(bundle: Any) -> tuple[str, list[Entry]]:
    if (
        not isinstance(bundle, dict)
        or bundle.get("resourceType") != "Bundle"
        or bundle.get("type") not in ("batch", "transaction")
    ):
        raise BadRequest(MSG_NOT_A_BUNDLE, detail_code="MSG_BUNDLE_TYPE")
    entries = []
    raw_entries = bundle.get("entry") or []
    if not isinstance(raw_entries, list):
        raise BadRequest(MSG_NOT_A_BUNDLE, detail_code="MSG_BUNDLE_TYPE", expression="Bundle.entry")
    for index, raw in enumerate(raw_entries):
        request = raw.get("request") if isinstance(raw, dict) else None
        if not isinstance(request, dict):
            raise BadRequest(
                MSG_ENTRY_INVALID.format(index=index, problem="no request"),
                expression=f"Bundle.entry[{index}].request",
            )
        method = str(request.get("method", "")).upper()
        url = request.get("url")
        if method not in ORDER or not isinstance(url, str) or not url:
            raise BadRequest(
                MSG_ENTRY_INVALID.format(index=index, problem="bad method or url"),
                expression=f"Bundle.entry[{index}].request",
            )
        headers = {}
        for element, header in (
            ("ifMatch", "HTTP_IF_MATCH"),
            ("ifNoneExist", "HTTP_IF_NONE_EXIST"),
            ("ifNoneMatch", "HTTP_IF_NONE_MATCH"),
        ):
            if isinstance(request.get(element), str):
                headers[header] = request[element]
        entries.append(
            Entry(
                index=index,
                method=method,
                url=url.lstrip("/"),
                resource=raw.get("resource"),
                headers=headers,
                full_url=raw.get("fullUrl"),
            )
        )
    return bundle["type"], entries


def _resolve_conditional(reference: str) -> str:
    resource_type, _, query = reference.partition("?")
    if not is_resource_type(resource_type):
        raise BadRequest(MSG_CONDITIONAL_REF.format(reference=reference, count=0))
    # A conditional reference is a search: the caller needs ``s`` on the type, and only
    # resources inside its boundary can match.
    require_permission(access.current(), resource_type, "s")
    keys = search_keys(resource_type, query, limit=2)
    if len(keys) != 1:
        raise PreconditionFailed(
            MSG_CONDITIONAL_REF.format(reference=reference, count=len(keys)),
            detail_code="MSG_CONDITIONAL_REFERENCE",
        )
    return keys[0]


def _rewrite(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                if item in mapping:
                    item = mapping[item]
                elif "?" in item and is_resource_type(item.split("?", 1)[0]):
                    item = mapping.setdefault(item, _resolve_conditional(item))
            out[key] = _rewrite(item, mapping)
        return out
    if isinstance(value, list):
        return [_rewrite(item, mapping) for item in value]
    return value


def _conditional_target(entry: Entry, resource_type: str, query: str) -> str | None:
    """The key a conditional entry (create with ``ifNoneExist``, update by search) writes to:
    its one match, or None when nothing matches (412 when several do)."""
    keys = search_keys(resource_type, query, limit=2)
    if len(keys) > 1:
        element = "ifNoneExist" if entry.method == "POST" else "url"
        raise PreconditionFailed(
            MSG_CONDITIONAL_MULTIPLE.format(count="several"),
            detail_code="MSG_CONDITIONAL_MULTIPLE",
            expression=f"Bundle.entry[{entry.index}].request.{element}",
        )
    return keys[0] if keys else None


def _prepare_transaction(entries: list[Entry]) -> None:
    """Assign ids to POST entries and rewrite every reference to server ids.

    A conditional update (``PUT [type]?[search]``) with a ``fullUrl`` is resolved here too,
    so references to its ``fullUrl`` point at the resource it updates or creates.
    """
    mapping: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry.resource, dict):
            continue
        resource_type, _, query = entry.url.partition("?")
        if entry.method == "POST":
            existing = None
            if "HTTP_IF_NONE_EXIST" in entry.headers:
                if is_resource_type(resource_type):
                    # A conditional create searches: ``c`` and ``s`` on the type, checked
                    # before the search runs (the entry itself is checked again).
                    require_permission(access.current(), resource_type, "cs", "conditional create")
                existing = _conditional_target(
                    entry, resource_type, entry.headers["HTTP_IF_NONE_EXIST"]
                )
            key = existing or f"{resource_type}/{uuid.uuid4()}"
            if existing is None:
                entry.assigned_id = key.split("/", 1)[1]
        elif entry.method == "PUT" and query and entry.full_url and is_resource_type(resource_type):
            require_permission(access.current(), resource_type, "us", "conditional update")
            key = _conditional_target(entry, resource_type, query)
            if key is None:
                body_id = entry.resource.get("id")
                if isinstance(body_id, str):
                    key = f"{resource_type}/{body_id}"
                else:
                    entry.assigned_id = str(uuid.uuid4())
                    key = f"{resource_type}/{entry.assigned_id}"
        else:
            continue
        if entry.full_url:
            mapping[entry.full_url] = key
    for entry in entries:
        if entry.resource is not None:
            entry.resource = _rewrite(entry.resource, mapping)


def _sub_request(outer: HttpRequest, entry: Entry) -> HttpResponse:
    parts = urlsplit(entry.url)
    body = b""
    content_type = ""
    if entry.method in ("POST", "PUT"):
        body = orjson.dumps(entry.resource)
        content_type = "application/fhir+json"
    elif entry.method == "PATCH":
        if isinstance(entry.resource, dict) and entry.resource.get("resourceType") == "Binary":
            import base64

            body = base64.b64decode(entry.resource.get("data", ""))
            content_type = entry.resource.get("contentType", "application/json-patch+json")
        else:
            body = orjson.dumps(entry.resource)
            content_type = "application/json-patch+json"
    environ = {
        key: value
        for key, value in outer.META.items()
        if not key.startswith(("HTTP_IF_", "CONTENT_", "wsgi.input"))
    }
    environ.update(
        {
            "REQUEST_METHOD": entry.method,
            "PATH_INFO": f"/{fhir_settings.BASE_PATH}/{parts.path}",
            "QUERY_STRING": parts.query,
            "CONTENT_TYPE": content_type,
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
            "HTTP_X_REQUEST_ID": getattr(outer, "request_id", ""),
            **entry.headers,
        }
    )
    sub = WSGIRequest(environ)
    sub.fhir_assigned_id = entry.assigned_id
    # Answered in JSON whatever the Bundle's caller accepts: it is assembled into the Bundle.
    sub.fhir_bundle_entry = True
    sub.user = getattr(outer, "user", None)
    # The entry runs as the Bundle's caller: same actor, boundary and scopes (each entry is
    # scope-checked as the interaction it is), without authenticating again.
    sub.fhir_access = getattr(outer, "access", None)
    return _sub_handler().get_response(sub)


def _entry_response(entry: Entry, response: HttpResponse) -> tuple[dict[str, Any], bytes | None]:
    content = b"".join(response) if response.streaming else response.content
    status = response.status_code
    fields: dict[str, Any] = {"status": f"{status} {response.reason_phrase}"}
    for header, element in (
        ("Location", "location"),
        ("Content-Location", "location"),
        ("ETag", "etag"),
    ):
        if response.has_header(header):
            fields[element] = response[header]
    if response.has_header("Last-Modified"):
        from email.utils import parsedate_to_datetime

        fields["lastModified"] = parsedate_to_datetime(response["Last-Modified"]).isoformat()
    resource = None
    if content:
        if status >= 400:
            fields["outcome"] = orjson.loads(content)
        else:
            resource = content
    return {"response": fields}, resource


class EntryFailed(Exception):
    """A transaction entry failed: roll back and answer with its outcome."""

    def __init__(self, entry: Entry, response: HttpResponse) -> None:
        self.entry = entry
        self.response = response


class TransactionRace(Exception):
    """An entry failed because the transaction lost a race: run the whole Bundle again."""


class _RaceWatch:
    """Notes a lost race in any statement of the transaction's entries.

    The entries run as sub-requests, whose views turn every error into a response (a
    serialization failure into a 503), so the Bundle sees only a failed entry; this
    database-level hook tells a lost race from an entry that is wrong. (A race the store
    services see themselves, such as a duplicate key, comes back as a WriteRace 409.)
    """

    def __init__(self) -> None:
        self.lost = False

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        try:
            return execute(sql, params, many, context)
        except DatabaseError as exc:
            self.lost = self.lost or db.is_transient(exc)
            raise


def _run_transaction(request: HttpRequest, bundle: Any) -> dict[int, Any]:
    """The entries' results of a transaction; EntryFailed when an entry fails."""
    # PostgreSQL accepts SET TRANSACTION only as a transaction's first statement: inside a
    # caller's atomic block (a test case's) the Bundle runs at that block's level.
    outermost = not db.in_transaction()

    def attempt() -> dict[int, Any]:
        if outermost:
            db.serializable()
        # Parsed again on each attempt: preparing rewrites the entries' references to the ids
        # this attempt found or assigned.
        _, entries = _parse_entries(bundle)
        results: dict[int, Any] = {}
        watch = _RaceWatch()
        with connection.execute_wrapper(watch):
            _prepare_transaction(entries)
            for entry in sorted(entries, key=lambda e: (ORDER[e.method], e.index)):
                response = _sub_request(request, entry)
                if response.status_code >= 400:
                    if watch.lost or _lost_race(response):
                        raise TransactionRace
                    raise EntryFailed(entry, response)
                results[entry.index] = _entry_response(entry, response)
        return results

    return db.run_retrying(
        attempt,
        races=(TransactionRace,),
        retries=fhir_settings.WRITE_RETRIES,
        exhausted=Conflict(MSG_TRANSACTION_RETRIES, detail_code=WriteRace.detail_code),
    )


def _lost_race(response: HttpResponse) -> bool:
    """Whether a failed entry's outcome is a race lost inside the transaction (WriteRace)."""
    if response.status_code != Conflict.status:
        return False
    outcome = orjson.loads(response.content or b"{}")
    codes = [
        coding.get("code")
        for issue in outcome.get("issue", [])
        for coding in (issue.get("details") or {}).get("coding", [])
    ]
    return WriteRace.detail_code in codes


def process_bundle(request: HttpRequest, bundle: Any) -> tuple[dict[str, Any], list]:
    """Run a batch or transaction; returns (response Bundle header, entries in input order)."""
    kind, entries = _parse_entries(bundle)
    results: dict[int, tuple[dict[str, Any], bytes | None]] = {}
    if kind == "batch":
        for entry in entries:
            try:
                results[entry.index] = _entry_response(entry, _sub_request(request, entry))
            except FhirError as exc:
                results[entry.index] = (
                    {"response": {"status": str(exc.status), "outcome": exc.outcome()}},
                    None,
                )
    else:
        try:
            results = _run_transaction(request, bundle)
        except EntryFailed as failed:
            content = failed.response.content
            outcome = orjson.loads(content) if content else {}
            diagnostics = "; ".join(i.get("diagnostics", "") for i in outcome.get("issue", []))
            error = FhirError(
                MSG_ENTRY_FAILED.format(
                    index=failed.entry.index,
                    method=failed.entry.method,
                    url=failed.entry.url,
                    diagnostics=diagnostics,
                ),
                expression=f"Bundle.entry[{failed.entry.index}]",
            )
            error.status = failed.response.status_code
            error.code = (outcome.get("issue") or [{}])[0].get("code", "processing")
            error.detail_code = "MSG_TRANSACTION_FAILED"
            raise error from None
    header = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": f"{kind}-response"}
    return header, [results[e.index] for e in entries]
