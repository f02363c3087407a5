"""The base view every FHIR endpoint derives from.

Shared behaviour lives here once: reading and size-checking bodies (FHIR JSON, or FHIR XML
read into the same JSON), If-Match and Prefer headers, the response headers of a version
(ETag, Last-Modified, Location), and turning a write result into the answer
``Prefer: return=…`` asks for. Concrete views only declare what differs.
"""

from __future__ import annotations

import re
from typing import Any

from django.http import HttpResponse, StreamingHttpResponse
from django.utils.http import http_date
from rest_framework.request import Request
from rest_framework.views import APIView

from fhirservice.access.policy import AccessControlledView
from fhirservice.conf import fhir_settings
from fhirservice.errors import (
    BadRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
    information_outcome,
    operation_outcome,
)
from fhirservice.fhir.xml import parse_resource_xml
from fhirservice.rest import limits
from fhirservice.rest.negotiation import XML_BODY_TYPES, current_format
from fhirservice.rest.renderers import FhirJsonRenderer, FhirXmlRenderer
from fhirservice.rest.rendering import Body, is_streamed, reformat, render_resource
from fhirservice.store import json
from fhirservice.store.handlers import WriteContext, handler_for
from fhirservice.store.services import WriteResult

JSON_BODY_TYPES = {"application/fhir+json", "application/json", "application/json+fhir"}
RESOURCE_MEDIA_TYPES = JSON_BODY_TYPES | XML_BODY_TYPES
PATCH_MEDIA_TYPES = {"application/json-patch+json"}
ETAG_RE = re.compile(r'\s*(W/)?"?(\d+)"?\s*')

MSG_MEDIA_TYPE = "Content-Type {found!r} is not accepted here; send {expected}"
MSG_FHIRPATH_PATCH = (
    "FHIRPath Patch (Parameters) and XML Patch are not supported; "
    "send a JSON Patch as application/json-patch+json"
)
MSG_BODY_TOO_LARGE = "The body has {size} bytes; the limit is {limit}"
MSG_BAD_IF_MATCH = 'If-Match must name a version as W/"n": {value!r}'
MSG_WRITTEN_WITHOUT_BODY = "{key} version {version} was written; it cannot be shown now: {reason}"


def base_url(request: Request) -> str:
    """The absolute URL of the FHIR base, without a trailing slash."""
    return request.build_absolute_uri(f"/{fhir_settings.BASE_PATH}")


def version_headers(row: Any) -> dict[str, str]:
    """ETag and Last-Modified of a stored version."""
    return {
        "ETag": f'W/"{row.version_id}"',
        "Last-Modified": http_date(row.last_updated.timestamp()),
    }


def fhir_http_response(
    body: Body | None, *, status: int = 200, headers: dict[str, str] | None = None
) -> HttpResponse:
    """A response carrying a FHIR body (JSON, converted to the request's format); chunk
    iterators are streamed."""
    chosen = current_format()
    content_type = f"{chosen.media_type}; charset=utf-8"
    if body is not None and (chosen.xml or chosen.pretty):
        body = reformat(body, chosen)
    if body is None:
        response = HttpResponse(status=status)
    elif is_streamed(body):
        response = StreamingHttpResponse(body, status=status, content_type=content_type)
    else:
        response = HttpResponse(body, status=status, content_type=content_type)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


class FhirView(AccessControlledView, APIView):
    """Base of all FHIR endpoints (authenticated and scope-checked: ``fhirservice.access``)."""

    # JSON first: DRF falls back to the first renderer when negotiation fails (406 in JSON).
    renderer_classes = [FhirJsonRenderer, FhirXmlRenderer]
    # No OPTIONS: DRF would answer it with a metadata dict that is not a FHIR resource.
    http_method_names = ["get", "post", "put", "patch", "delete", "head"]

    def write_context(self) -> WriteContext:
        """Who is writing, for versions and member events."""
        return WriteContext.from_request(self.request._request)

    def read_body(self, *, patch: bool = False) -> bytes:
        """The raw body after content-type and size checks (415, 413)."""
        request = self.request
        media = (request.content_type or "").split(";")[0].strip().lower()
        allowed = PATCH_MEDIA_TYPES if patch else RESOURCE_MEDIA_TYPES
        if media not in allowed:
            # A FHIRPath Patch (Parameters, in JSON or XML) or an XML Patch: not supported.
            if patch and (media in RESOURCE_MEDIA_TYPES or media == "application/xml-patch+xml"):
                raise UnsupportedMediaType(MSG_FHIRPATH_PATCH)
            raise UnsupportedMediaType(
                MSG_MEDIA_TYPE.format(found=media or "none", expected=" or ".join(sorted(allowed)))
            )
        limit = fhir_settings.MAX_BODY_BYTES
        declared = request.META.get("CONTENT_LENGTH") or "0"
        size = int(declared) if declared.isdigit() else 0
        if size > limit:
            raise PayloadTooLarge(MSG_BODY_TOO_LARGE.format(size=size, limit=limit))
        resource_type = self.kwargs.get("resource_type")
        checks_size = resource_type and not patch and request.method in ("POST", "PUT")
        xml = media in XML_BODY_TYPES
        if checks_size and not xml:
            limits.check_resource_bytes(resource_type, size)  # before reading it
        data = request._request.body
        if len(data) > limit:
            raise PayloadTooLarge(MSG_BODY_TOO_LARGE.format(size=len(data), limit=limit))
        if xml:
            # Read into the JSON the service stores; every check below sees JSON. The
            # resource limit counts the JSON, so it means the same in either format.
            data = json.dumps(parse_resource_xml(data))
            if checks_size:
                limits.check_resource_bytes(resource_type, len(data))
        return data

    def read_json(self, *, patch: bool = False) -> Any:
        """The decoded JSON body (400 when malformed, nested too deeply or over an op limit)."""
        data = self.read_body(patch=patch)
        limits.check_json_depth(data)
        limits.check_control_characters(data)
        value = json.loads(data)
        limits.check_document(value, patch=patch, resource_type=self.kwargs.get("resource_type"))
        return value

    def read_resource(self) -> Any:
        """The resource body of a create or update, as ``read_json`` checks it, decoded by
        its type's handler (a Group's plain roster is read from the text, not decoded)."""
        data = self.read_body()
        limits.check_json_depth(data)
        limits.check_control_characters(data)
        resource_type = self.kwargs.get("resource_type")
        value = handler_for(resource_type).decode(data) if resource_type else json.loads(data)
        limits.check_document(value, patch=False, resource_type=resource_type)
        return value

    def if_match(self) -> int | None:
        """The version an If-Match header names, or None."""
        raw = self.request.META.get("HTTP_IF_MATCH")
        if raw is None:
            return None
        match = ETAG_RE.fullmatch(raw)
        if not match:
            raise BadRequest(MSG_BAD_IF_MATCH.format(value=raw), detail_code="MSG_BAD_IF_MATCH")
        return int(match.group(2))

    def prefer(self, name: str) -> str | None:
        """A token of the Prefer header, e.g. prefer("return") → "minimal"."""
        for part in self.request.META.get("HTTP_PREFER", "").split(","):
            key, _, value = part.strip().partition("=")
            if key.strip().lower() == name:
                return value.strip().strip('"')
        return None

    def strict(self) -> bool:
        """Unknown or unsupported search parameters are errors (400) unless the client asks
        for ``Prefer: handling=lenient`` (then they are ignored, and left out of the ``self``
        link)."""
        return self.prefer("handling") != "lenient"

    def summary_params(self) -> tuple[str | None, list[str] | None]:
        """The ``_summary`` and ``_elements`` query parameters."""
        params = self.request.query_params
        summary = params.get("_summary")
        if summary is not None and summary not in ("true", "false", "text", "data"):
            raise BadRequest(
                f"Bad value for _summary: {summary!r}", detail_code="MSG_PARAM_INVALID"
            )
        raw = params.get("_elements")
        elements = [e.strip() for e in raw.split(",") if e.strip()] if raw else None
        return summary, elements

    def location(self, row: Any) -> str:
        """The versioned URL of a stored version."""
        return (
            f"{base_url(self.request)}/{row.resource_type}/{row.resource_id}"
            f"/_history/{row.version_id}"
        )

    def write_response(self, result: WriteResult, *, status: int | None = None) -> HttpResponse:
        """The answer to a write, shaped by ``Prefer: return``."""
        row = result.row
        status = status or (201 if result.created else 200)
        headers = version_headers(row)
        headers["Location" if result.created else "Content-Location"] = self.location(row)
        preferred = self.prefer("return")
        if preferred == "minimal":
            return fhir_http_response(None, status=status, headers=headers)
        if preferred == "OperationOutcome":
            text = (
                "Created"
                if result.created
                else ("Updated" if result.changed else "No change: the content is identical")
            )
            return fhir_http_response(
                json.dumps(
                    information_outcome(
                        f"{text}: {row.resource_type}/{row.resource_id} version {row.version_id}"
                    )
                ),
                status=status,
                headers=headers,
            )
        try:
            body = render_resource(row, current=True)
        except ServiceUnavailable as exc:
            # The version is committed: a 503 would make the client take the write for a
            # failure (and retry it). Acknowledge it; say why the representation is missing.
            outcome = operation_outcome(
                [
                    {
                        "severity": "warning",
                        "code": "transient",
                        "diagnostics": MSG_WRITTEN_WITHOUT_BODY.format(
                            key=f"{row.resource_type}/{row.resource_id}",
                            version=row.version_id,
                            reason=exc.diagnostics,
                        ),
                    }
                ]
            )
            return fhir_http_response(json.dumps(outcome), status=status, headers=headers)
        return fhir_http_response(body, status=status, headers=headers)
