"""Content rules shared by the store and the type handlers: server-owned meta, JSON Patch."""

from __future__ import annotations

from typing import Any

import jsonpatch

from fhirservice.errors import BadRequest, UnprocessableEntity

MSG_PATCH_INVALID = "Not a valid JSON Patch document: {error}"
MSG_PATCH_FAILED = "The patch could not be applied: {error}"
MSG_PATCH_CHANGES_IDENTITY = "A patch must not change resourceType or id"

SERVER_META = ("versionId", "lastUpdated")


def without_server_meta(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` minus the server-owned meta elements (versionId, lastUpdated)."""
    meta = body.get("meta")
    if not isinstance(meta, dict) or not any(k in meta for k in SERVER_META):
        return body
    clean = dict(body)
    rest = {k: v for k, v in meta.items() if k not in SERVER_META}
    if rest:
        clean["meta"] = rest
    else:
        del clean["meta"]
    return clean


def parse_patch(ops: Any) -> jsonpatch.JsonPatch:
    """400 unless ``ops`` is a well-formed JSON Patch document (RFC 6902)."""
    if not isinstance(ops, list) or not all(isinstance(op, dict) for op in ops):
        raise BadRequest(
            MSG_PATCH_INVALID.format(error="expected an array of operations"),
            detail_code="MSG_PATCH_INVALID",
        )
    try:
        patch = jsonpatch.JsonPatch(ops)
        for op in patch._ops:  # noqa: SLF001  (jsonpatch validates lazily; force it now)
            op.pointer  # noqa: B018
    except (
        jsonpatch.JsonPatchException,
        jsonpatch.JsonPointerException,
        KeyError,
        TypeError,
    ) as exc:
        raise BadRequest(
            MSG_PATCH_INVALID.format(error=exc), detail_code="MSG_PATCH_INVALID"
        ) from exc
    for index, op in enumerate(ops):
        if op.get("op") not in ("add", "remove", "replace", "move", "copy", "test"):
            raise BadRequest(
                MSG_PATCH_INVALID.format(error=f"unknown op {op.get('op')!r}"),
                detail_code="MSG_PATCH_INVALID",
                expression=f"[{index}].op",
            )
        if "value" not in op and op["op"] in ("add", "replace", "test"):
            raise BadRequest(
                MSG_PATCH_INVALID.format(error=f"op {index} has no value"),
                detail_code="MSG_PATCH_INVALID",
                expression=f"[{index}].value",
            )
        if "from" not in op and op["op"] in ("move", "copy"):
            raise BadRequest(
                MSG_PATCH_INVALID.format(error=f"op {index} has no from"),
                detail_code="MSG_PATCH_INVALID",
                expression=f"[{index}].from",
            )
    return patch


def apply_json_patch(document: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """Apply JSON Patch ops to a document; a failing test or a bad path answers 422."""
    patch = parse_patch(ops)
    try:
        result = patch.apply(document)
    except (
        jsonpatch.JsonPatchException,
        jsonpatch.JsonPointerException,
        TypeError,
        IndexError,
        KeyError,
    ) as exc:
        raise UnprocessableEntity(
            MSG_PATCH_FAILED.format(error=exc), detail_code="MSG_PATCH_FAILED"
        ) from exc
    if not isinstance(result, dict):
        raise UnprocessableEntity(
            MSG_PATCH_FAILED.format(error="the result is not an object"),
            detail_code="MSG_PATCH_FAILED",
        )
    if result.get("resourceType") != document.get("resourceType") or result.get(
        "id"
    ) != document.get("id"):
        raise UnprocessableEntity(MSG_PATCH_CHANGES_IDENTITY, detail_code="MSG_PATCH_FAILED")
    return result
