"""Content negotiation: FHIR JSON or FHIR XML, chosen by ``_format``, then ``Accept``, then
the request body's format (http://hl7.org/fhir/R4/http.html#mime-type: a request that names
no format is answered in the format it was sent in; an ``Accept`` of only ``*/*``, which many
HTTP clients send by default, names none).

The choice is made once per request by :class:`FormatMiddleware` (outermost, so refusals of
other middleware and Django's error handlers are answered in the same format) and held in a
context variable for the duration of the request; ``fhir_http_response`` and the DRF
renderer read it. JSON is the default and the fast path: nothing is converted unless XML
was asked for. A request that accepts neither format gets 406, an OperationOutcome in JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from django.http import HttpRequest, HttpResponse
from rest_framework.negotiation import BaseContentNegotiation

from fhirservice.conf import fhir_settings
from fhirservice.errors import NotAcceptable

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"

# ``_format`` values (https://hl7.org/fhir/R4/http.html#mime-type) and the media type each means.
FORMAT_VALUES = {
    "json": FHIR_JSON,
    "application/json": FHIR_JSON,
    "application/fhir+json": FHIR_JSON,
    "application/json+fhir": FHIR_JSON,
    "xml": FHIR_XML,
    "text/xml": FHIR_XML,
    "application/xml": FHIR_XML,
    "application/fhir+xml": FHIR_XML,
    "application/xml+fhir": FHIR_XML,
}
# Accept values; wildcards and browsers' text/html get JSON, the default.
ACCEPT_VALUES = {
    **FORMAT_VALUES,
    "*/*": FHIR_JSON,
    "application/*": FHIR_JSON,
    "text/html": FHIR_JSON,
    "text/plain": FHIR_JSON,
    "text/*": FHIR_JSON,
}
# Request bodies read as FHIR XML (PATCH bodies stay JSON Patch).
XML_BODY_TYPES = frozenset(
    {"application/fhir+xml", "application/xml", "text/xml", "application/xml+fhir"}
)

MSG_FORMAT_UNSUPPORTED = "_format={value} is not supported; use json or xml"
MSG_ACCEPT_UNSUPPORTED = (
    "Cannot produce {accepted}; use application/fhir+json or application/fhir+xml"
)


@dataclass(frozen=True)
class OutputFormat:
    """How a response body is written: media type and ``_pretty``."""

    media_type: str = FHIR_JSON
    pretty: bool = False

    @property
    def xml(self) -> bool:
        """Whether the body is FHIR XML."""
        return self.media_type == FHIR_XML


DEFAULT_FORMAT = OutputFormat()
# Attribute of the Django request: the format FormatMiddleware negotiated (absent when the
# request accepts none we write: the view then answers 406).
NEGOTIATED_ATTR = "fhir_output_format"
_CURRENT: ContextVar[OutputFormat] = ContextVar("fhir_output_format", default=DEFAULT_FORMAT)


def current_format() -> OutputFormat:
    """The output format of the request being served (JSON outside of one)."""
    return _CURRENT.get()


def _accept_ranges(header: str) -> list[tuple[float, int, str]]:
    """(q, specificity, media type) of each Accept range, best first; q=0 ranges left out."""
    ranges = []
    for position, part in enumerate(header.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        media = media.lower()
        if not media:
            continue
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 1.0
        if quality > 0:
            ranges.append((quality, 0 if "*" in media else 1, -position, media))
    ranges.sort(reverse=True)
    return [(q, s, m) for q, s, _, m in ranges]


def _format_params(query_string: str) -> dict[str, str]:
    """``_format`` and ``_pretty`` from the raw query string (the first of each).

    Not ``request.GET``: this middleware runs before the query limits
    (``fhirservice.middleware.RequestLimitsMiddleware``), and Django's QueryDict raises on
    more fields than DATA_UPLOAD_MAX_NUMBER_FIELDS, which would turn their clear
    OperationOutcome into a generic 400.
    """
    found: dict[str, str] = {}
    for pair in query_string.split("&"):
        name, _, value = pair.partition("=")
        if name in ("_format", "_pretty") and name not in found:
            found[name] = unquote_plus(value)
    return found


def _body_media_type(request: HttpRequest) -> str:
    """The media type of the request body (lower case, without parameters); empty if none."""
    return request.META.get("CONTENT_TYPE", "").split(";")[0].strip().lower()


def negotiate(request: HttpRequest) -> OutputFormat:
    """The output format a request asks for; NotAcceptable if it accepts none we write."""
    if getattr(request, "fhir_bundle_entry", False):
        # A batch/transaction entry: its answer is assembled into the Bundle as JSON.
        return DEFAULT_FORMAT
    query = _format_params(request.META.get("QUERY_STRING", ""))
    pretty = query.get("_pretty", "").lower() == "true"
    wanted = query.get("_format")
    if wanted is not None:
        # An unescaped "+" in a query string reads as a space (application/fhir xml).
        media_type = FORMAT_VALUES.get(wanted.strip().lower().replace(" ", "+"))
        if media_type is None:
            raise NotAcceptable(MSG_FORMAT_UNSUPPORTED.format(value=wanted))
        return OutputFormat(media_type, pretty)
    header = request.META.get("HTTP_ACCEPT", "").strip() or "*/*"
    if header == "*/*" and _body_media_type(request) in XML_BODY_TYPES:
        return OutputFormat(FHIR_XML, pretty)
    ranges = _accept_ranges(header)
    for _, _, media in ranges:
        media_type = ACCEPT_VALUES.get(media)
        if media_type is not None:
            return OutputFormat(media_type, pretty)
    accepted = ", ".join(media for _, _, media in ranges) or header
    raise NotAcceptable(MSG_ACCEPT_UNSUPPORTED.format(accepted=accepted))


def _is_fhir_path(path: str) -> bool:
    base = f"/{fhir_settings.BASE_PATH}"
    return path == base or path.startswith(base + "/")


class FormatMiddleware:
    """Sets the output format of a FHIR request for everything that answers it."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Negotiate (406 is left to the view, which answers it in JSON), then serve."""
        if not _is_fhir_path(request.path):
            return self.get_response(request)
        try:
            chosen = negotiate(request)
        except NotAcceptable:
            chosen = DEFAULT_FORMAT
        else:
            setattr(request, NEGOTIATED_ATTR, chosen)  # the renderer's choice, negotiated once
        token = _CURRENT.set(chosen)
        try:
            return self.get_response(request)
        finally:
            _CURRENT.reset(token)


class FhirContentNegotiation(BaseContentNegotiation):
    """DRF's hook: the renderer of the negotiated format, or 406."""

    def select_parser(self, request: Any, parsers: list[Any]) -> Any:
        """Bodies are read by the views themselves (see FhirView.read_json)."""
        return None

    def select_renderer(self, request: Any, renderers: list[Any], format_suffix: str | None = None):
        """The renderer and media type for the response."""
        chosen = getattr(request._request, NEGOTIATED_ATTR, None) or negotiate(request._request)
        for renderer in renderers:
            if renderer.media_type == chosen.media_type:
                return renderer, renderer.media_type
        return renderers[0], renderers[0].media_type
