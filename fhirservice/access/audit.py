"""``[base]/AuditEvent``: the audit trail, read-only, synthesised from the version history.

Every write is a ``ResourceVersion`` row that records when, what (``Type/id/_history/n``),
how (POST, PUT, PATCH, DELETE), who (the actor: ``client:<client_id>`` or
``staff:<username>``) and through which request (its X-Request-ID). This search serves those
rows as R4 ``AuditEvent`` resources, newest first, keyset-paged; nothing is stored twice.

Search parameters: ``date`` or ``_lastUpdated`` (with ge/gt/le/lt/eq prefixes), ``altid``
(the actor, exactly),
``entity`` (``Type/id`` or ``Type/id/_history/n``), ``entity-type`` (a resource type),
``action`` (C, U or D), ``_count``, ``_cursor``. Unknown parameters answer 400.

Who may read it: callers with a scope that names AuditEvent (``system/AuditEvent.rs``;
``system/*.*`` does not cover it) and staff users. Organization boundaries hold here too: a
client sees the audit of its own organization's (and shared) resources only. Writes answer
405: the trail is the server's own record.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from django.db.models import Q
from django.http import HttpResponse
from rest_framework.request import Request

from fhirservice.access.boundaries import visible_q
from fhirservice.conf import fhir_settings
from fhirservice.errors import BadRequest, MethodNotAllowed
from fhirservice.models import ResourceVersion
from fhirservice.rest.base import FhirView, base_url, fhir_http_response
from fhirservice.rest.rendering import bundle_body
from fhirservice.search.query import (
    _last_updated_q,
    _parse_date,
    decode_cursor,
    encode_cursor,
    parse_count,
)
from fhirservice.store import json
from fhirservice.store.services import format_instant

ACTOR_SYSTEM = "https://fhirservice.example/actor"
AUDIT_ID_NAMESPACE = uuid.UUID("0b5f0a0e-6d8c-4a52-9a4c-0f1e5d3c2a71")
ACTIONS = {"POST": "C", "PUT": "U", "PATCH": "U", "DELETE": "D"}
INTERACTIONS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
IGNORED_PARAMS = {"_format", "_pretty"}
MSG_AUDIT_READ_ONLY = "AuditEvent is the server's own record: search it, it cannot be written"
MSG_AUDIT_SEARCH_ONLY = "AuditEvents are served by search only: GET [base]/AuditEvent?…"
MSG_AUDIT_UNKNOWN_PARAM = "Unknown AuditEvent search parameter {name!r}"
MSG_AUDIT_BAD_VALUE = "Bad value for AuditEvent search parameter {name!r}: {value!r}"


def audit_id(row: ResourceVersion) -> str:
    """A stable id for the AuditEvent of a version (a UUID derived from its key)."""
    return str(uuid.uuid5(AUDIT_ID_NAMESPACE, row.key))


def audit_event(row: ResourceVersion) -> dict[str, Any]:
    """The AuditEvent resource describing one version."""
    action = ACTIONS.get(row.method, "U")
    if row.method == "PUT" and row.version_id == row.incarnation and not row.deleted:
        action = "C"  # update as create
    agent: dict[str, Any] = {"requestor": True}
    if row.actor:
        agent["who"] = {"identifier": {"system": ACTOR_SYSTEM, "value": row.actor}}
        agent["altId"] = row.actor
    else:
        agent["who"] = {"display": "anonymous (FHIR_AUTH=off)"}
    entity: dict[str, Any] = {
        "what": {"reference": f"{row.resource_type}/{row.resource_id}/_history/{row.version_id}"},
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
            "code": "2",
            "display": "System Object",
        },
    }
    if row.request_id:
        entity["detail"] = [{"type": "request-id", "valueString": row.request_id}]
    return {
        "resourceType": "AuditEvent",
        "id": audit_id(row),
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [
            {
                "system": "http://hl7.org/fhir/restful-interaction",
                "code": INTERACTIONS.get(row.method, "update"),
            }
        ],
        "action": action,
        "recorded": format_instant(row.last_updated),
        "outcome": "0",
        "agent": [agent],
        "source": {"observer": {"display": "fhirservice"}},
        "entity": [entity],
    }


SEARCH_PARAMS = (
    ("date", "date", "When the version was written (ge/gt/le/lt/eq prefixes)"),
    ("_lastUpdated", "date", "The same as date"),
    ("altid", "token", "The actor, exactly: client:<client_id> or staff:<username>"),
    ("entity", "reference", "The resource (Type/id) or one version (Type/id/_history/n)"),
    ("entity-type", "token", "The resource type of the entity"),
    ("action", "token", "C (create), U (update, patch) or D (delete)"),
)


def capability_entry() -> dict[str, Any]:
    """The CapabilityStatement.rest.resource entry of AuditEvent: search only."""
    return {
        "type": "AuditEvent",
        "interaction": [{"code": "search-type"}],
        "searchParam": [
            {
                "name": name,
                "type": kind,
                "documentation": doc,
                "definition": f"http://hl7.org/fhir/SearchParameter/AuditEvent-{name}"
                if not name.startswith("_")
                else "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
            }
            for name, kind, doc in SEARCH_PARAMS
        ],
    }


def _filter(name: str, value: str) -> Q:
    if name in ("date", "_lastUpdated"):
        prefix, low, high = _parse_date(name, value)
        return _last_updated_q(prefix, low, high)
    if name == "altid":
        return Q(actor=value)
    if name == "action":
        code = value.rsplit("|", 1)[-1]
        return Q(method__in=[m for m, action in ACTIONS.items() if action == code])
    if name == "entity-type":
        return Q(resource_type=value)
    if name == "entity":
        parts = value.split("/")
        if len(parts) == 2 and all(parts):
            return Q(resource_type=parts[0], resource_id=parts[1])
        if len(parts) == 4 and parts[2] == "_history" and parts[3].isdigit():
            return Q(key=value)
        raise BadRequest(
            MSG_AUDIT_BAD_VALUE.format(name=name, value=value), detail_code="MSG_PARAM_INVALID"
        )
    raise BadRequest(MSG_AUDIT_UNKNOWN_PARAM.format(name=name), detail_code="MSG_PARAM_UNKNOWN")


class AuditEventView(FhirView):
    """``[base]/AuditEvent``: search (GET); every write answers 405."""

    access_rule = "audit"
    access_resource_type = "AuditEvent"

    def get(self, request: Request) -> HttpResponse:
        """A searchset Bundle of AuditEvents, newest first."""
        flat = [(k, v) for k, values in request.query_params.lists() for v in values]
        queryset = ResourceVersion.objects.filter(visible_q())
        count = fhir_settings.DEFAULT_COUNT
        cursor = None
        for name, value in flat:
            if name == "_count":
                count = parse_count(value)
            elif name == "_cursor":
                cursor = value
            elif name not in IGNORED_PARAMS:
                queryset = queryset.filter(_filter(name, value))
        total = queryset.count()
        ordered = queryset.order_by("-last_updated", "-key")
        if cursor:
            values = decode_cursor(cursor)
            try:
                moment, key = datetime.fromisoformat(values[0]), str(values[1])
            except (IndexError, TypeError, ValueError) as exc:
                raise BadRequest(
                    "The paging cursor is not valid", detail_code="MSG_PARAM_INVALID"
                ) from exc
            ordered = ordered.filter(
                Q(last_updated__lt=moment) | Q(last_updated=moment, key__lt=key)
            )
        rows = list(ordered[: count + 1]) if count else []
        base = base_url(request)
        query = [(k, v) for k, v in flat if k != "_cursor"]
        links = [
            {
                "relation": "self",
                "url": f"{base}/AuditEvent" + (f"?{urlencode(flat)}" if flat else ""),
            }
        ]
        if len(rows) > count:
            rows = rows[:count]
            last = rows[-1]
            query.append(("_cursor", encode_cursor([last.last_updated.isoformat(), last.key])))
            links.append({"relation": "next", "url": f"{base}/AuditEvent?{urlencode(query)}"})
        header = {"resourceType": "Bundle", "type": "searchset", "total": total, "link": links}
        entries = [
            (
                {"fullUrl": f"{base}/AuditEvent/{audit_id(row)}", "search": {"mode": "match"}},
                json.dumps(audit_event(row)),
            )
            for row in rows
        ]
        return fhir_http_response(bundle_body(header, entries))

    def refuse(self, request: Request, *args: Any, **kwargs: Any) -> HttpResponse:
        """Writes are refused: 405."""
        raise MethodNotAllowed(MSG_AUDIT_READ_ONLY, detail_code="MSG_AUDIT_READ_ONLY")

    post = put = patch = delete = refuse


class AuditEventInstanceView(FhirView):
    """``[base]/AuditEvent/[id]``: AuditEvents are served by search only (405 for all)."""

    access_rule = "authenticated"

    def refuse(self, request: Request, *args: Any, **kwargs: Any) -> HttpResponse:
        """405 for every method."""
        detail = MSG_AUDIT_SEARCH_ONLY if request.method in ("GET", "HEAD") else MSG_AUDIT_READ_ONLY
        raise MethodNotAllowed(detail, detail_code="MSG_AUDIT_READ_ONLY")

    get = head = post = put = patch = delete = refuse
