"""Index extraction: the search values of a resource, as typed SearchToken rows.

The parameters are the official R4 SearchParameters (``fhirservice.fhir.definitions``): each
parameter's FHIRPath expression is compiled once (``fhirpathpy``, R4 model) and evaluated on
every written resource. The engine reports the FHIR type of each value it finds, and the
value is indexed by that type into the columns of ``SearchToken``:

- string: ``value`` normalised (lower-case, accent-free) for plain and ``:contains``
  search, ``system`` the text as written for ``:exact``;
- token: ``system`` and ``value`` (the code), ``text`` the normalised display or text
  (``:text``); an Identifier with a type also gets a ``<code>:of-type`` row
  (``system|value`` = the type's coding, ``text`` = the identifier's value);
- reference: ``value`` ``Type/id`` for a relative reference (kept queryable as such), the
  URL for an absolute one; ``text`` the id alone; ``system`` the target type. Canonical
  references: ``value`` the URL without ``|version``, ``system`` the version;
- uri: ``value``; date: the instant range ``[low, high)`` a date, dateTime, instant or
  Period covers, and ``span`` its width class when it is the parameter's only value
  (``fhirservice.search.dates``); number: ``number``; quantity: ``number``, ``system``
  and ``value`` the unit's code (``text`` the unit as written);
- composite: one row per component, rows of one occurrence sharing ``group``, ``part``
  numbering the component.

FHIRPath has no ``resolve()`` at write time, so ``.where(resolve() is T)`` in a definition
became ``resolve_types`` there, applied here to the reference's type.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

import fhirpathpy
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as fhirpath_models

from fhirservice.conf import fhir_settings
from fhirservice.fhir.definitions import search_parameters
from fhirservice.models import SearchToken
from fhirservice.search.dates import mark_spans
from fhirservice.search.paths import Found, plan, walk
from fhirservice.search.values import MAX_VALUE, date_range, normalize_string

logger = logging.getLogger(__name__)
# Ranges open at one end reach the smallest or largest instant the databases all store.
EARLIEST = datetime(1, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
# Common parameters answered from StoredResource's own columns, or not at all.
COLUMN_PARAMS = {"_id", "_lastUpdated"}
UNSUPPORTED_PARAMS = {"_text", "_content", "_filter", "_query"}
# Parameters this server adds to the official ones (kept from before the definitions were
# used: Group rosters are found by name in every deployment).
LOCAL_DEFINITIONS: dict[str, dict[str, dict[str, Any]]] = {
    "Group": {
        "name": {
            "type": "string",
            "url": "https://fhirservice.example/SearchParameter/Group-name",
            "description": "The group's name",
            "parts": [{"expression": "Group.name"}],
        }
    }
}
_FIRST_ELEMENT = re.compile(r"^\(?\s*[A-Z][A-Za-z]*\.([a-z][A-Za-z0-9]*)")
_FIRST_RELATIVE = re.compile(r"^\(?\s*([a-z][A-Za-z0-9]*)")
_AS_OPERATOR = re.compile(r"\(\s*([A-Za-z][\w.]*(?:\([^()]*\)[\w.]*)*)\s+as\s+([A-Za-z]+)\s*\)")
_OPTIONS = {"returnRawData": True}


@dataclass(frozen=True)
class Part:
    """One FHIRPath expression of a parameter, and the reference types it keeps (if any)."""

    expression: str
    resolve_types: frozenset[str] | None
    # The resource's top-level element the expression starts from, when it is a plain path:
    # a resource without that element has no value for it, so the engine is not asked.
    first: str | None


@dataclass(frozen=True)
class Component:
    """One component of a composite parameter: its type and its expression (relative)."""

    type: str
    expression: str
    # As Part.first, within the element the parameter's expression selects.
    first: str | None


@dataclass(frozen=True)
class Param:
    """A search parameter of one resource type, from the official definitions."""

    name: str
    type: str  # string token reference date number quantity uri composite special
    url: str
    description: str
    parts: tuple[Part, ...]
    target: tuple[str, ...]
    components: tuple[Component, ...]


def _part(resource_type: str, raw: dict[str, Any]) -> Part:
    expression = raw["expression"]
    # The common parameters are written against ``Resource``, which the engine does not
    # match to a concrete resource; FHIRPath's ``DateTime`` type is spelled ``dateTime``.
    if expression.startswith("Resource."):
        expression = resource_type + expression[len("Resource") :]
    expression = _lenient_casts(expression)
    match = _FIRST_ELEMENT.match(expression)
    resolve = raw.get("resolve_types")
    return Part(
        expression=expression,
        resolve_types=frozenset(resolve) if resolve else None,
        first=match.group(1) if match and "|" not in expression else None,
    )


def _lenient_casts(expression: str) -> str:
    """``x as T`` and ``x.as(T)`` rewritten as ``x.ofType(T)``.

    The engine follows FHIRPath in refusing ``as`` on a collection of several items
    (``Group.characteristic.value as Quantity`` on a Group of three characteristics), where
    the definitions mean "the values of type T" (which ``ofType`` is); FHIRPath spells the
    type ``dateTime``, one definition ``DateTime``.
    """
    expression = _AS_OPERATOR.sub(r"\1.ofType(\2)", expression).replace(".as(", ".ofType(")
    return expression.replace("ofType(DateTime)", "ofType(dateTime)")


def _component(kind: str, expression: str) -> Component:
    expression = _lenient_casts(expression)
    match = _FIRST_RELATIVE.match(expression)
    first = match.group(1) if match and "|" not in expression else None
    return Component(type=kind, expression=expression, first=first)


@cache
def _types_by_url() -> dict[str, str]:
    return {p["url"]: p["type"] for params in search_parameters().values() for p in params.values()}


@cache
def search_params(resource_type: str) -> dict[str, Param]:
    """The search parameters of ``resource_type``: its own and the common ones."""
    definitions = search_parameters()
    merged = {
        **definitions.get("Resource", {}),
        **definitions.get(resource_type, {}),
        **LOCAL_DEFINITIONS.get(resource_type, {}),
    }
    if resource_type in ("Resource", "DomainResource") or resource_type not in definitions:
        merged = dict(definitions.get("Resource", {}))
    types = _types_by_url()
    return {
        name: Param(
            name=name,
            type=raw["type"],
            url=raw["url"],
            description=raw.get("description", ""),
            parts=tuple(_part(resource_type, part) for part in raw.get("parts", [])),
            target=tuple(sorted(raw.get("target", []))),
            components=tuple(
                _component(types.get(c["definition"], "token"), c["expression"])
                for c in raw.get("component", [])
            ),
        )
        for name, raw in sorted(merged.items())
    }


@cache
def _compiled(expression: str) -> Callable[..., list[Any]]:
    return fhirpathpy.compile(expression, model=fhirpath_models["r4"], options=_OPTIONS)


def _present(body: dict[str, Any], first: str) -> bool:
    if first in body:
        return True
    # A choice element (``effective[x]``) is stored as effectiveDateTime, effectivePeriod, …
    return any(k.startswith(first) and k[len(first) : len(first) + 1].isupper() for k in body)


def _nodes(body: Any, expression: str) -> list[Any]:
    try:
        return _compiled(expression)(body)
    except Exception:  # noqa: BLE001 - one unusable expression must not fail the write
        # The value is left out of the index (the resource is valid, the engine or the
        # definition is at fault); the log names the expression so it can be fixed.
        logger.warning("search extraction failed for %r", expression, exc_info=True)
        return []


def _type_name(node: Any) -> str:
    path = getattr(node, "path", None)
    return path if isinstance(path, str) else ""


def _data(node: Any) -> Any:
    return getattr(node, "data", node)


# --- typed values -------------------------------------------------------------------------

Row = dict[str, Any]


def _clip(text: str) -> str:
    return text[:MAX_VALUE]


def _string_rows(type_name: str, data: Any) -> Iterator[Row]:
    if isinstance(data, str):
        yield {"system": _clip(data), "value": normalize_string(data)}
    elif isinstance(data, dict):
        if type_name == "HumanName" or "family" in data or "given" in data:
            texts = [data.get("text"), data.get("family")]
            for key in ("given", "prefix", "suffix"):
                texts.extend(data.get(key) or [])
        elif type_name == "Address" or "line" in data or "city" in data:
            texts = [data.get("text"), *(data.get("line") or [])]
            texts += [data.get(k) for k in ("city", "district", "state", "postalCode", "country")]
        else:
            texts = [data.get("text"), data.get("value"), data.get("display")]
        for text in texts:
            if isinstance(text, str) and text:
                yield {"system": _clip(text), "value": normalize_string(text)}


def _coding_row(coding: Any, text: str = "") -> Row | None:
    if not isinstance(coding, dict):
        return None
    code = coding.get("code")
    display = coding.get("display")
    if not isinstance(code, str) and not isinstance(display, str):
        return None
    return {
        "system": _clip(str(coding.get("system") or "")),
        "value": _clip(code if isinstance(code, str) else ""),
        "text": normalize_string(display if isinstance(display, str) else text),
    }


def _token_rows(type_name: str, data: Any, name: str) -> Iterator[Row]:
    if isinstance(data, bool):
        yield {"value": "true" if data else "false"}
    elif isinstance(data, str | int | float | Decimal):
        yield {"value": _clip(str(data))}
    elif not isinstance(data, dict):
        return
    elif type_name == "CodeableConcept" or "coding" in data:
        text = data.get("text") if isinstance(data.get("text"), str) else ""
        for coding in data.get("coding") or []:
            row = _coding_row(coding)
            if row:
                yield row
        if text:
            yield {"text": normalize_string(text)}
    elif type_name == "Identifier" or (type_name == "" and "value" in data and "use" in data):
        value = data.get("value")
        if isinstance(value, str):
            type_text = (data.get("type") or {}).get("text")
            yield {
                "system": _clip(str(data.get("system") or "")),
                "value": _clip(value),
                "text": normalize_string(type_text) if isinstance(type_text, str) else "",
            }
            for coding in (data.get("type") or {}).get("coding") or []:
                if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                    yield {
                        "param": f"{name}:of-type",
                        "system": _clip(str(coding.get("system") or "")),
                        "value": _clip(coding["code"]),
                        "text": _clip(value),
                    }
    elif type_name == "ContactPoint":
        if isinstance(data.get("value"), str):
            yield {"value": _clip(data["value"]), "system": _clip(str(data.get("system") or ""))}
    elif type_name in ("Coding", "code") or "code" in data:
        row = _coding_row(data)
        if row:
            yield row
    elif isinstance(data.get("value"), str):
        yield {"system": _clip(str(data.get("system") or "")), "value": _clip(data["value"])}


def _reference_rows(
    type_name: str, data: Any, resolve_types: frozenset[str] | None
) -> Iterator[Row]:
    if isinstance(data, str):  # canonical or uri
        url, _, version = data.partition("|")
        yield {"value": _clip(url), "system": _clip(version)}
        return
    if not isinstance(data, dict):
        return
    reference = data.get("reference")
    if not isinstance(reference, str) or reference.startswith("#"):
        return
    target_type, target_id = reference_parts(reference)
    if resolve_types is not None and target_type not in resolve_types:
        return
    value = local_reference(reference) or reference
    yield {"value": _clip(value), "system": target_type, "text": _clip(target_id)}


def local_reference(url: str) -> str | None:
    """``Type/id`` of an absolute URL on this server's FHIR base (``…/<BASE_PATH>/Type/id``).

    The host a client used is not known when a resource is written, so the base path alone
    marks a reference as local; such references are indexed, and searched, as ``Type/id``.
    """
    marker = f"/{fhir_settings.BASE_PATH}/"
    if "://" not in url or marker not in url:
        return None
    rest = url.rsplit(marker, 1)[1].split("/")
    if len(rest) in (2, 4) and rest[0][:1].isupper() and (len(rest) == 2 or rest[2] == "_history"):
        return f"{rest[0]}/{rest[1]}"
    return None


def reference_parts(reference: str) -> tuple[str, str]:
    """``(type, id)`` of a reference ``Type/id``, ``…/Type/id/_history/v`` or absolute URL."""
    pieces = reference.split("/")
    if len(pieces) >= 4 and pieces[-2] == "_history":
        pieces = pieces[:-2]
    if len(pieces) >= 2 and pieces[-2][:1].isupper():
        return pieces[-2], pieces[-1]
    return "", pieces[-1]


def _date_rows(type_name: str, data: Any) -> Iterator[Row]:
    if isinstance(data, str):
        covered = date_range(data)
        if covered:
            yield {"low": covered[0], "high": covered[1]}
    elif isinstance(data, dict) and ("start" in data or "end" in data):
        start = date_range(data["start"]) if isinstance(data.get("start"), str) else None
        end = date_range(data["end"]) if isinstance(data.get("end"), str) else None
        if start or end:
            yield {"low": start[0] if start else EARLIEST, "high": end[1] if end else LATEST}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | Decimal):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Decimal(value))
        except InvalidOperation:
            return None
    return None


def _number_rows(type_name: str, data: Any) -> Iterator[Row]:
    number = _number(data.get("value") if isinstance(data, dict) else data)
    if number is not None:
        yield {"number": number}


def _quantity_rows(type_name: str, data: Any) -> Iterator[Row]:
    if not isinstance(data, dict):
        return
    number = _number(data.get("value"))
    if number is None:
        return
    unit = data.get("unit") if isinstance(data.get("unit"), str) else ""
    code = data.get("code") if isinstance(data.get("code"), str) else unit
    yield {
        "number": number,
        "system": _clip(str(data.get("system") or "")),
        "value": _clip(code),
        "text": _clip(unit),
    }


def _uri_rows(type_name: str, data: Any) -> Iterator[Row]:
    if isinstance(data, str):
        yield {"value": _clip(data)}


def typed_rows(param_type: str, node: Any, name: str, part: Part | None = None) -> Iterator[Row]:
    """The index columns of one value the engine found, by the parameter's type."""
    type_name, data = _type_name(node), _data(node)
    if param_type == "string":
        yield from _string_rows(type_name, data)
    elif param_type == "token":
        yield from _token_rows(type_name, data, name)
    elif param_type == "reference":
        yield from _reference_rows(type_name, data, part.resolve_types if part else None)
    elif param_type == "date":
        yield from _date_rows(type_name, data)
    elif param_type == "number":
        yield from _number_rows(type_name, data)
    elif param_type == "quantity":
        yield from _quantity_rows(type_name, data)
    elif param_type == "uri":
        yield from _uri_rows(type_name, data)


# --- rows of a resource -------------------------------------------------------------------


class _Evaluator:
    """FHIRPath results for one resource, each expression evaluated once per node.

    Parameters share expressions (``Observation.code`` feeds ``code``, ``combo-code`` and
    four composites); a resource lacking an expression's first element skips evaluation, and
    plain member paths are walked without the engine (``fhirservice.search.paths``).
    """

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.root = Found(body["resourceType"], body, body["resourceType"])
        self.cache: dict[tuple[int, str], list[Any]] = {}

    def nodes(self, node: Any, expression: str, first: str | None) -> list[Any]:
        data = _data(node)
        if first is not None and isinstance(data, dict) and not _present(data, first):
            return []
        key = (id(node), expression)
        found = self.cache.get(key)
        if found is None:
            found = self.cache[key] = self._evaluate(node, expression)
        return found

    def _evaluate(self, node: Any, expression: str) -> list[Any]:
        plain = plan(expression)
        if isinstance(node, Found):
            if plain is not None:
                walked = walk(node, plain)
                if walked is not None:
                    return walked
            node = (
                node.data if node is self.root else ResourceNode.create_node(node.data, node.model)
            )
        return _nodes(node, expression)


def _param_rows(evaluator: _Evaluator, param: Param) -> Iterator[Row]:
    occurrence = 0
    for part in param.parts:
        nodes = evaluator.nodes(evaluator.root, part.expression, part.first)
        if param.type != "composite":
            for node in nodes:
                yield from typed_rows(param.type, node, param.name, part)
            continue
        for node in nodes:
            rows: list[Row] = []
            for index, component in enumerate(param.components):
                found = [
                    {**row, "part": index}
                    for value in evaluator.nodes(node, component.expression, component.first)
                    for row in typed_rows(component.type, value, param.name)
                    if "param" not in row
                ]
                if not found:
                    break
                rows.extend(found)
            else:
                for row in rows:
                    yield {**row, "group": f"{param.name}#{occurrence}"}
            occurrence += 1


def extract_tokens(resource_key: str, body: dict[str, Any]) -> list[SearchToken]:
    """The SearchToken rows of one resource version."""
    resource_type = body["resourceType"]
    tokens: list[SearchToken] = []
    evaluator = _Evaluator(body)
    for param in search_params(resource_type).values():
        if param.name in COLUMN_PARAMS or param.type == "special" or not param.parts:
            continue
        for row in _param_rows(evaluator, param):
            group = row.pop("group", "")
            tokens.append(
                SearchToken(
                    key=f"{resource_key}#{len(tokens)}",
                    resource_key=resource_key,
                    resource_type=resource_type,
                    param=row.pop("param", param.name),
                    group=f"{resource_key}#{group}" if group else "",
                    **row,
                )
            )
    mark_spans(tokens)
    return tokens


def token_signature(tokens: list[SearchToken]) -> list[tuple[Any, ...]]:
    """What makes two extractions equal (the store skips rewriting equal rows)."""
    return [
        (
            t.key,
            t.param,
            t.system,
            t.value,
            t.text,
            t.low,
            t.high,
            t.span,
            t.number,
            t.group,
            t.part,
        )
        for t in tokens
    ]
