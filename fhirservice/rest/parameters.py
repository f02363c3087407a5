"""FHIR ``Parameters`` in, checked against an OperationDefinition; ``Parameters`` out.

Checks names (unknown → 400 ``MSG_PARAM_UNKNOWN``), cardinality and value types (→ 400
``MSG_BAD_FORMAT``) before any operation code runs, so a handler sees only well-formed input.
"""

from __future__ import annotations

import re
from typing import Any

from fhirservice.errors import BadRequest
from fhirservice.fhir.operation_definition import OperationDef, ParamDef
from fhirservice.fhir.validation import DATETIME_RE
from fhirservice.search.values import date_range

MSG_NOT_PARAMETERS = "The body must be a Parameters resource"
MSG_PARAM_UNKNOWN = "Unknown parameter {name!r} for ${code}"
MSG_PARAM_SHAPE = "Parameter {name!r}: {problem}"
MSG_PARAM_COUNT = "Parameter {name!r} occurs {count} times; allowed {min}..{max}"
MSG_EXACTLY_ONE = "Give exactly one of {names}"

CODE_RE = re.compile(r"[^\s]+(\s[^\s]+)*")
PRIMITIVE_CHECKS = {
    "string": lambda v: isinstance(v, str) and v != "",
    "code": lambda v: isinstance(v, str) and bool(CODE_RE.fullmatch(v)),
    "id": lambda v: isinstance(v, str) and bool(re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", v)),
    "uri": lambda v: isinstance(v, str) and v != "" and " " not in v,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "dateTime": lambda v: isinstance(v, str) and bool(DATETIME_RE.fullmatch(v)),
}


def _bad(name: str, problem: str) -> BadRequest:
    return BadRequest(
        MSG_PARAM_SHAPE.format(name=name, problem=problem),
        detail_code="MSG_BAD_FORMAT",
        expression=f"Parameters.parameter({name})",
    )


def _check_complex(param: ParamDef, value: Any) -> Any:
    if not isinstance(value, dict) or not value:
        raise _bad(param.name, f"value{param.type} must be a non-empty object")
    if param.type == "Identifier":
        if not isinstance(value.get("value"), str) or not value["value"]:
            raise _bad(param.name, "an Identifier needs a value")
        if "system" in value and (not isinstance(value["system"], str) or not value["system"]):
            raise _bad(param.name, "Identifier.system must be a non-empty string")
    elif param.type == "Reference":
        reference = value.get("reference")
        if not isinstance(reference, str) or not re.fullmatch(
            r"(?:[A-Za-z][A-Za-z0-9]*/[A-Za-z0-9\-.]{1,64}|.+/[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})",
            reference,
        ):
            raise _bad(param.name, "a Reference needs reference Type/id")
        if param.target and reference.split("/")[-2] not in param.target:
            raise _bad(param.name, f"the reference must point to {' or '.join(param.target)}")
    elif param.type == "Period":
        for bound in ("start", "end"):
            if bound in value and (
                not isinstance(value[bound], str) or not DATETIME_RE.fullmatch(value[bound])
            ):
                raise _bad(param.name, f"Period.{bound} must be a dateTime")
        if set(value) - {"start", "end"}:
            raise _bad(param.name, "a Period has only start and end")
        if "start" in value and "end" in value:
            # FHIR per-1; [low, high) ranges compare partial dates ("2021" is after "2020").
            start, end = date_range(value["start"]), date_range(value["end"])
            if start is None or end is None or start[0] >= end[1]:
                raise _bad(param.name, "Period.start is after Period.end")
    return value


def _value(param: ParamDef, item: dict[str, Any]) -> Any:
    value_keys = [k for k in item if k.startswith("value")]
    if param.is_resource:
        resource = item.get("resource")
        if value_keys or not isinstance(resource, dict):
            raise _bad(param.name, f"expected a {param.type} resource in 'resource'")
        if resource.get("resourceType") != param.type:
            raise _bad(param.name, f"expected resourceType {param.type}")
        return resource
    expected = "value" + param.type[0].upper() + param.type[1:]
    if "resource" in item or "part" in item or value_keys != [expected]:
        raise _bad(param.name, f"expected {expected}")
    value = item[expected]
    if param.type in PRIMITIVE_CHECKS:
        if not PRIMITIVE_CHECKS[param.type](value):
            raise _bad(param.name, f"{expected} is not a valid {param.type}")
        return value
    return _check_complex(param, value)


def parse_parameters(definition: OperationDef, body: Any) -> dict[str, Any]:
    """Values by parameter name: a single value for max 1, a list otherwise (absent: None/[])."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest(MSG_NOT_PARAMETERS, detail_code="MSG_BAD_FORMAT")
    items = body.get("parameter", [])
    if not isinstance(items, list):
        raise BadRequest(MSG_NOT_PARAMETERS, detail_code="MSG_BAD_FORMAT")
    inputs = definition.inputs()
    collected: dict[str, list[Any]] = {name: [] for name in inputs}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(MSG_NOT_PARAMETERS, detail_code="MSG_BAD_FORMAT")
        name = item["name"]
        if name not in inputs:
            raise BadRequest(
                MSG_PARAM_UNKNOWN.format(name=name, code=definition.code),
                detail_code="MSG_PARAM_UNKNOWN",
                expression=f"Parameters.parameter({name})",
            )
        collected[name].append(_value(inputs[name], item))
    return _apply_cardinality(definition, collected)


def parse_query(definition: OperationDef, query: dict[str, list[str]]) -> dict[str, Any]:
    """Parameters of a GET call from the query string (primitive inputs only)."""
    inputs = definition.inputs()
    collected: dict[str, list[Any]] = {name: [] for name in inputs}
    for name, values in query.items():
        if name.startswith("_"):
            continue
        if name not in inputs:
            raise BadRequest(
                MSG_PARAM_UNKNOWN.format(name=name, code=definition.code),
                detail_code="MSG_PARAM_UNKNOWN",
            )
        param = inputs[name]
        for raw in values:
            value: Any = raw
            if param.type == "integer":
                value = int(raw) if re.fullmatch(r"-?\d+", raw) else raw
            elif param.type == "boolean":
                value = {"true": True, "false": False}.get(raw, raw)
            if not PRIMITIVE_CHECKS[param.type](value):
                raise _bad(name, f"not a valid {param.type}")
            collected[name].append(value)
    return _apply_cardinality(definition, collected)


def _apply_cardinality(definition: OperationDef, collected: dict[str, list[Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, param in definition.inputs().items():
        values = collected[name]
        limit = param.max_count
        if len(values) < param.min or (limit is not None and len(values) > limit):
            raise BadRequest(
                MSG_PARAM_COUNT.format(name=name, count=len(values), min=param.min, max=param.max),
                detail_code="MSG_BAD_FORMAT",
                expression=f"Parameters.parameter({name})",
            )
        result[name] = values if limit != 1 else (values[0] if values else None)
    return result


def exactly_one(values: dict[str, Any], *names: str) -> str:
    """The one name among ``names`` that has a value; 400 unless exactly one has."""
    given = [name for name in names if values.get(name) not in (None, [])]
    if len(given) != 1:
        raise BadRequest(
            MSG_EXACTLY_ONE.format(names=" or ".join(names)), detail_code="MSG_BAD_FORMAT"
        )
    return given[0]


def output(*pairs: tuple[str, str, Any]) -> dict[str, Any]:
    """An output Parameters resource from (name, value[x] key or 'resource', value)."""
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": name, key: value} for name, key, value in pairs if value is not None
        ],
    }
