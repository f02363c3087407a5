"""Limits on what one request may ask of the server, and the per-client throttle.

Every check here answers a 4xx OperationOutcome before the request reaches a service, so
hostile input is refused while it is still cheap: the JSON nesting depth is measured on the
raw bytes before parsing, query strings are counted before Django builds ``request.GET``,
and a JSON Patch's op count and a Bundle's entry count are checked before anything is applied.
The settings are in ``fhirservice.conf`` (``MAX_JSON_DEPTH``, ``MAX_QUERY_PARAMS``,
``MAX_QUERY_VALUE_LENGTH``, ``MAX_PATCH_OPS``, ``MAX_BUNDLE_ENTRIES``, ``THROTTLE_RATE``).
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import unquote_plus

from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle

from fhirservice.conf import fhir_settings
from fhirservice.errors import (
    MSG_TOO_MANY_PATCH_OPS,
    BadRequest,
    FhirError,
    TooCostly,
    UnprocessableEntity,
)

MSG_JSON_TOO_DEEP = "The body nests JSON arrays and objects deeper than {limit} levels"
MSG_TOO_MANY_PARAMS = "The query has {count} parameters; the limit is {limit}"
MSG_PARAM_TOO_LONG = (
    "The query parameter {name!r} is {length} characters long; the limit is {limit}"
)
MSG_TOO_MANY_ENTRIES = "The Bundle has {count} entries; the limit is {limit}"
MSG_SERVER_OWNED_PATH = (
    "op {index} ({op} {path}): {path} is set by the server and cannot be patched"
)
MSG_LENGTH_REQUIRED = "A request body needs a Content-Length header (chunked bodies are not read)"
MSG_THROTTLED = "Too many requests from this client; retry after {wait} seconds"
MSG_CONTROL_CHARACTER = (
    "The {where} contains a control character; FHIR strings allow only tab, CR and LF below U+0020"
)

# Everything but the JSON structure characters and the string delimiter.
_NOT_STRUCTURE = bytes(range(256)).translate(None, b'"[]{}')
# Objects and arrays nest alike: count both as one kind of bracket.
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")
# A JSON escape of a control character other than tab, LF and CR (after "\\\\" pairs are gone).
_CONTROL_ESCAPE = re.compile(rb"\\(?:u00(?:0[0-8bBcCeEfF]|1[0-9a-fA-F])|[bf])")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# JSON Pointers to meta elements the server sets on every version.
_SERVER_OWNED = ("/meta/versionId", "/meta/lastUpdated")


class LengthRequired(FhirError):
    """A body was sent without Content-Length (411)."""

    status = 411
    code = "invalid"
    detail_code = "MSG_LENGTH_REQUIRED"
    default_diagnostics = MSG_LENGTH_REQUIRED


class TooManyRequests(FhirError):
    """The client's request rate is over ``THROTTLE_RATE`` (429, with Retry-After)."""

    status = 429
    code = "throttled"
    detail_code = "MSG_THROTTLED"
    default_diagnostics = "Too many requests"


def json_depth_exceeds(data: bytes, limit: int) -> bool:
    """Whether JSON text nests arrays/objects deeper than ``limit``, read without parsing.

    Escapes go first (so every remaining ``"`` delimits a string), then every byte that is
    not a bracket or a quote; string contents are dropped, and each pass removes one level of
    innermost empty brackets. All steps are bytes methods running in C: about 4 ms per MB,
    a tenth of what parsing costs. Invalid JSON may measure wrongly; the parser refuses it.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    skeleton = (
        data.replace(b"\\\\", b"")
        .replace(b'\\"', b"")
        .translate(None, _NOT_STRUCTURE)
        # Adjacent quotes: an empty string, or one string's end and the next one's start
        # with only punctuation between; either way nothing but string content is dropped.
        .replace(b'""', b"")
    )
    if b'"' in skeleton:
        parts = skeleton.split(b'"')
        skeleton = b"".join(parts[::2])
    skeleton = skeleton.translate(_ONE_BRACKET)
    for _ in range(limit):
        if not skeleton:
            return False
        skeleton = skeleton.replace(b"[]", b"")
    return bool(skeleton)


def check_json_depth(data: bytes) -> None:
    """400 when the body nests deeper than ``MAX_JSON_DEPTH``.

    orjson stops at 1024 levels by itself, but the services walk documents recursively, and
    a few hundred levels would exhaust Python's stack there (a 500).
    """
    limit = fhir_settings.MAX_JSON_DEPTH
    if json_depth_exceeds(data, limit):
        raise BadRequest(MSG_JSON_TOO_DEEP.format(limit=limit), detail_code="MSG_JSON_TOO_DEEP")


def check_control_characters(data: bytes) -> None:
    """400 when a JSON string holds a control character FHIR forbids (NUL among them: the
    metadata store could not even store it)."""
    if b"\\" in data and _CONTROL_ESCAPE.search(data.replace(b"\\\\", b"")):
        raise BadRequest(
            MSG_CONTROL_CHARACTER.format(where="body"), detail_code="MSG_CONTROL_CHARACTER"
        )


def check_document(value: Any, *, patch: bool) -> None:
    """Op-count and shape limits of a decoded body: a JSON Patch or a Bundle."""
    if patch:
        if isinstance(value, list):
            check_patch(value)
        return
    if isinstance(value, dict) and value.get("resourceType") == "Bundle":
        entries = value.get("entry")
        limit = fhir_settings.MAX_BUNDLE_ENTRIES
        if isinstance(entries, list) and len(entries) > limit:
            raise TooCostly(
                MSG_TOO_MANY_ENTRIES.format(count=len(entries), limit=limit),
                detail_code="MSG_TOO_MANY_ENTRIES",
            )


def check_patch(ops: list[Any]) -> None:
    """A JSON Patch of any resource: at most ``MAX_PATCH_OPS`` ops, none writing server meta."""
    limit = fhir_settings.MAX_PATCH_OPS
    if len(ops) > limit:
        raise TooCostly(
            MSG_TOO_MANY_PATCH_OPS.format(count=len(ops), limit=limit),
            detail_code="MSG_TOO_MANY_OPERATIONS",
        )
    for index, op in enumerate(ops):
        if not isinstance(op, dict) or op.get("op") == "test":
            continue
        for key in ("path", "from"):
            path = op.get(key)
            if isinstance(path, str) and _is_server_owned(path):
                raise UnprocessableEntity(
                    MSG_SERVER_OWNED_PATH.format(index=index, op=op.get("op"), path=path),
                    detail_code="MSG_PATCH_FAILED",
                    expression=f"[{index}].{key}",
                )


def _is_server_owned(path: str) -> bool:
    if not path.startswith("/meta"):  # the common case, cheap for 10^5 member ops
        return False
    return any(path == owned or path.startswith(owned + "/") for owned in _SERVER_OWNED)


def check_query_string(query_string: str) -> None:
    """400 when a query has too many parameters or an over-long value (before parsing it)."""
    if not query_string:
        return
    pairs = [pair for pair in query_string.split("&") if pair]
    limit = fhir_settings.MAX_QUERY_PARAMS
    django_limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
    if django_limit is not None:
        # Django itself fails (500) when it parses more fields than this.
        limit = min(limit, django_limit)
    if len(pairs) > limit:
        raise TooCostly(
            MSG_TOO_MANY_PARAMS.format(count=len(pairs), limit=limit),
            detail_code="MSG_TOO_MANY_PARAMS",
        )
    if _CONTROL_CHARACTER.search(unquote_plus(query_string)):
        raise BadRequest(
            MSG_CONTROL_CHARACTER.format(where="query"), detail_code="MSG_CONTROL_CHARACTER"
        )
    max_length = fhir_settings.MAX_QUERY_VALUE_LENGTH
    for pair in pairs:
        # Percent-encoding triples a value's length: decode only the suspects.
        if len(pair) <= max_length:
            continue
        name, _, value = pair.partition("=")
        decoded = unquote_plus(value)
        if len(decoded) > max_length:
            raise TooCostly(
                MSG_PARAM_TOO_LONG.format(
                    name=unquote_plus(name)[:100], length=len(decoded), limit=max_length
                ),
                detail_code="MSG_PARAM_TOO_LONG",
            )


class ClientRateThrottle(SimpleRateThrottle):
    """At most ``THROTTLE_RATE`` requests per client (off when the setting is None).

    The client is the OAuth client of the request's access (``request.access.client_id``)
    when access control identified one, else the remote address. Counts live in Django's
    default cache: per process with the local-memory cache, shared with Redis/Memcached.
    """

    scope = "fhir-client"

    def get_rate(self) -> str | None:
        """The rate from the service settings, not DRF's THROTTLE_RATES."""
        return fhir_settings.THROTTLE_RATE

    def get_cache_key(self, request: Any, view: Any) -> str:
        """One bucket per OAuth client, or per remote address without one."""
        access = getattr(request, "access", None)
        client_id = getattr(access, "client_id", None)
        ident = f"client:{client_id}" if client_id else f"addr:{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}

    def allow_request(self, request: Any, view: Any) -> bool:
        """Count the request; over the rate, answer 429 with Retry-After at once."""
        if super().allow_request(request, view):
            return True
        wait = max(1, math.ceil(self.wait() or 1))
        raise TooManyRequests(MSG_THROTTLED.format(wait=wait), headers={"Retry-After": str(wait)})
