"""Limits on what one request may ask of the server, and the per-client throttle.

Every check here answers a 4xx OperationOutcome before the request reaches a service, so
hostile input is refused while it is still cheap: the JSON nesting depth is measured on the
raw bytes before parsing, query strings are counted before Django builds ``request.GET``,
and a JSON Patch's op count and a Bundle's entry count are checked before anything is applied.
The settings are in ``fhirservice.conf`` (``MAX_JSON_DEPTH``, ``MAX_QUERY_PARAMS``,
``MAX_QUERY_VALUE_LENGTH``, ``MAX_PATCH_OPS``, ``MAX_BUNDLE_ENTRIES``, ``MAX_RESOURCE_BYTES``,
``MAX_ARRAY_ITEMS``, ``THROTTLE_RATE``).

The per-resource limits bound what one resource costs to store: every array item may become
a search row (a Patient with 10^6 identifiers wrote 10^6 rows, 508 MB, in 105 s). A resource
body is refused on its Content-Length before it is read (that 40 MB Patient: at once);
arrays are counted in the decoded body, in each resource of a Bundle, and in what a JSON
Patch adds. ``Group.member`` is the roster, stored as member events, and is exempt from
both (as are ``Bundle.entry`` and an operation's ``Parameters.parameter``, which have limits
of their own).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any
from urllib.parse import unquote_plus

import orjson
from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle

from fhirservice.conf import fhir_settings
from fhirservice.errors import (
    MSG_TOO_MANY_PATCH_OPS,
    BadRequest,
    FhirError,
    PayloadTooLarge,
    TooCostly,
    UnprocessableEntity,
)

MSG_JSON_TOO_DEEP = "The body nests JSON arrays and objects deeper than {limit} levels"
MSG_TOO_MANY_PARAMS = "The query has {count} parameters; the limit is {limit}"
MSG_PARAM_TOO_LONG = (
    "The query parameter {name!r} is {length} characters long; the limit is {limit}"
)
MSG_TOO_MANY_ENTRIES = "The Bundle has {count} entries; the limit is {limit}"
MSG_RESOURCE_TOO_LARGE = "The {what} has {size} bytes; the limit is {limit} per resource"
MSG_ARRAY_TOO_LONG = "{path} has {count} items; the limit is {limit} per array"
MSG_ARRAY_ADDS = "The patch adds {count} items to {path}; the limit is {limit} per array"
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
# Arrays whose length another limit bounds: only their items are checked here.
_COUNTED_ELSEWHERE = {("Bundle", "entry"), ("Parameters", "parameter")}
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


def check_resource_bytes(resource_type: str, size: int) -> None:
    """413 when a resource body (create, update) is over ``MAX_RESOURCE_BYTES``; Groups are
    exempt (their roster may hold millions of members)."""
    limit = fhir_settings.MAX_RESOURCE_BYTES
    if size > limit and resource_type != "Group":
        raise PayloadTooLarge(
            MSG_RESOURCE_TOO_LARGE.format(what=resource_type, size=size, limit=limit),
            detail_code="MSG_RESOURCE_TOO_LARGE",
        )


def check_document(value: Any, *, patch: bool, resource_type: str | None = None) -> None:
    """Op-count, shape and size limits of a decoded body: a JSON Patch of ``resource_type``,
    a resource, or a Bundle (whose entries' resources are checked one by one)."""
    if patch:
        if isinstance(value, list):
            check_patch(value, resource_type=resource_type)
        return
    if not isinstance(value, dict):
        return
    if value.get("resourceType") == "Bundle":
        entries = value.get("entry")
        limit = fhir_settings.MAX_BUNDLE_ENTRIES
        if isinstance(entries, list) and len(entries) > limit:
            raise TooCostly(
                MSG_TOO_MANY_ENTRIES.format(count=len(entries), limit=limit),
                detail_code="MSG_TOO_MANY_ENTRIES",
            )
        _check_bundle_resources(entries if isinstance(entries, list) else [])
    _check_arrays(value, _resource_name(value))


def _resource_name(value: dict[str, Any]) -> str:
    kind = value.get("resourceType")
    return kind if isinstance(kind, str) else "Resource"


def _check_bundle_resources(entries: list[Any]) -> None:
    """Each entry's resource: at most ``MAX_RESOURCE_BYTES`` as JSON (Groups exempt)."""
    limit = fhir_settings.MAX_RESOURCE_BYTES
    for index, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") == "Group":
            continue
        size = len(orjson.dumps(resource))
        if size > limit:
            what = f"{_resource_name(resource)} of Bundle.entry[{index}]"
            raise PayloadTooLarge(
                MSG_RESOURCE_TOO_LARGE.format(what=what, size=size, limit=limit),
                detail_code="MSG_RESOURCE_TOO_LARGE",
            )


def _check_arrays(value: Any, path: str) -> None:
    """400 when an array in ``value`` (found at ``path``) holds over ``MAX_ARRAY_ITEMS``
    items. A Group's ``member`` is not walked (the roster); a Bundle's ``entry`` and the
    ``parameter`` of an operation's Parameters are walked but not counted (bounded by
    ``MAX_BUNDLE_ENTRIES`` and by each operation)."""
    limit = fhir_settings.MAX_ARRAY_ITEMS
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, list):
            if len(node) > limit:
                raise TooCostly(
                    MSG_ARRAY_TOO_LONG.format(path=where, count=len(node), limit=limit),
                    detail_code="MSG_ARRAY_TOO_LONG",
                    expression=where,
                )
            stack.extend((item, where) for item in node if isinstance(item, dict | list))
            continue
        kind = node.get("resourceType")
        kind = kind if isinstance(kind, str) else None  # any JSON: validation comes later
        for key, child in node.items():
            if not isinstance(child, dict | list) or (kind == "Group" and key == "member"):
                continue
            if (kind, key) in _COUNTED_ELSEWHERE and isinstance(child, list):
                stack.extend((item, f"{where}.{key}") for item in child if isinstance(item, dict))
            else:
                stack.append((child, f"{where}.{key}"))


def check_patch(ops: list[Any], *, resource_type: str | None = None) -> None:
    """A JSON Patch of any resource: at most ``MAX_PATCH_OPS`` ops, none writing server
    meta, none adding an array over ``MAX_ARRAY_ITEMS`` or that many items to one array
    (the roster of a Group excepted)."""
    limit = fhir_settings.MAX_PATCH_OPS
    if len(ops) > limit:
        raise TooCostly(
            MSG_TOO_MANY_PATCH_OPS.format(count=len(ops), limit=limit),
            detail_code="MSG_TOO_MANY_OPERATIONS",
        )
    adds: Counter[str] = Counter()
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
        path = op.get("path")
        if not isinstance(path, str) or (
            resource_type == "Group" and (path == "/member" or path.startswith("/member/"))
        ):
            continue
        if isinstance(op.get("value"), dict | list):
            _check_arrays(op["value"], f"[{index}].value")
        array, _, position = path.rpartition("/")
        if op.get("op") in ("add", "copy", "move") and (position == "-" or position.isdigit()):
            adds[array] += 1
    items = fhir_settings.MAX_ARRAY_ITEMS
    for array, count in adds.items():
        if count > items:
            raise TooCostly(
                MSG_ARRAY_ADDS.format(count=count, path=array, limit=items),
                detail_code="MSG_ARRAY_TOO_LONG",
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
