"""JSON encoding used everywhere a resource is stored or served (orjson: fast, ordered)."""

from __future__ import annotations

from typing import Any

import orjson

from fhirservice.errors import BadRequest

MSG_MALFORMED_JSON = "The body is not valid JSON: {error}"


def dumps(value: Any) -> bytes:
    """Encode a JSON value as UTF-8 bytes, keeping key order."""
    return orjson.dumps(value)


def dumps_str(value: Any) -> str:
    """Encode a JSON value as text (for TextField storage)."""
    return orjson.dumps(value).decode()


def loads(data: bytes | str) -> Any:
    """Decode JSON; malformed input becomes a 400 OperationOutcome."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            MSG_MALFORMED_JSON.format(error=exc), detail_code="MSG_JSON_PARSE"
        ) from exc
