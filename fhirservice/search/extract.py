"""Index extraction: the search values of a resource, as typed SearchToken rows.

The parameters are the official R4 SearchParameters (``fhirservice.fhir.definitions``): each
parameter's FHIRPath expression is evaluated on every written resource, walked over the JSON
when it is a member path (``fhirservice.search.paths``: all but 3 of R4's 2,295), else by the
compiled expression of the engine (``fhirpathpy``, R4 model). Both report the FHIR type of
each value found, and the value is indexed by that type into the columns of ``SearchToken``
(the rows are plain tuples, inserted without model instances):

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
from dataclasses import dataclass, field
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
from fhirservice.search.dates import SEVERAL, span_class
from fhirservice.search.paths import Walker, walker
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
OF_TYPE = ":of-type"


@dataclass(frozen=True)
class Part:
    """One FHIRPath expression of a parameter, and the reference types it keeps (if any)."""

    expression: str
    resolve_types: frozenset[str] | None
    # The resource's top-level element the expression starts from, when it is a plain path:
    # a resource without that element has no value for it, so the engine is not asked.
    first: str | None
    # The expression walked without the engine, when it is a member path.
    walk: Walker | None = field(default=None, compare=False, repr=False)


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
        walk=walker(resource_type, expression),
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


# --- typed values -------------------------------------------------------------------------

# The columns a value fills: (param suffix, system, value, text, low, high, number); the
# suffix is ":of-type" for the typed identifier rows of a token parameter, else "".
Cells = tuple[str, str, str, str, datetime | None, datetime | None, float | None]


def _clip(text: str) -> str:
    return text[:MAX_VALUE]


def _string_cells(type_name: str, data: Any) -> list[Cells]:
    if isinstance(data, str):
        return [("", _clip(data), normalize_string(data), "", None, None, None)]
    if not isinstance(data, dict):
        return []
    if type_name == "HumanName" or "family" in data or "given" in data:
        texts = [data.get("text"), data.get("family")]
        for key in ("given", "prefix", "suffix"):
            texts.extend(data.get(key) or [])
    elif type_name == "Address" or "line" in data or "city" in data:
        texts = [data.get("text"), *(data.get("line") or [])]
        texts += [data.get(k) for k in ("city", "district", "state", "postalCode", "country")]
    else:
        texts = [data.get("text"), data.get("value"), data.get("display")]
    return [
        ("", _clip(text), normalize_string(text), "", None, None, None)
        for text in texts
        if isinstance(text, str) and text
    ]


def _coding_cells(coding: Any) -> Cells | None:
    if not isinstance(coding, dict):
        return None
    code = coding.get("code")
    display = coding.get("display")
    if not isinstance(code, str) and not isinstance(display, str):
        return None
    return (
        "",
        _clip(str(coding.get("system") or "")),
        _clip(code if isinstance(code, str) else ""),
        normalize_string(display) if isinstance(display, str) else "",
        None,
        None,
        None,
    )


def _token_cells(type_name: str, data: Any) -> list[Cells]:
    if isinstance(data, bool):
        return [("", "", "true" if data else "false", "", None, None, None)]
    if isinstance(data, str | int | float | Decimal):
        return [("", "", _clip(str(data)), "", None, None, None)]
    if not isinstance(data, dict):
        return []
    if type_name == "CodeableConcept" or "coding" in data:
        cells = [c for c in map(_coding_cells, data.get("coding") or []) if c is not None]
        text = data.get("text")
        if isinstance(text, str) and text:
            cells.append(("", "", "", normalize_string(text), None, None, None))
        return cells
    if type_name == "Identifier" or (type_name == "" and "value" in data and "use" in data):
        return _identifier_cells(data)
    if type_name == "ContactPoint":
        value = data.get("value")
        if not isinstance(value, str):
            return []
        return [("", _clip(str(data.get("system") or "")), _clip(value), "", None, None, None)]
    if type_name in ("Coding", "code") or "code" in data:
        cells = _coding_cells(data)
        return [cells] if cells else []
    value = data.get("value")
    if isinstance(value, str):
        return [("", _clip(str(data.get("system") or "")), _clip(value), "", None, None, None)]
    return []


def _identifier_cells(data: dict[str, Any]) -> list[Cells]:
    value = data.get("value")
    if not isinstance(value, str):
        return []
    kind = data.get("type") or {}
    type_text = kind.get("text")
    cells: list[Cells] = [
        (
            "",
            _clip(str(data.get("system") or "")),
            _clip(value),
            normalize_string(type_text) if isinstance(type_text, str) else "",
            None,
            None,
            None,
        )
    ]
    for coding in kind.get("coding") or []:
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            system = _clip(str(coding.get("system") or ""))
            cells.append((OF_TYPE, system, _clip(coding["code"]), _clip(value), None, None, None))
    return cells


def _reference_cells(data: Any, resolve_types: frozenset[str] | None) -> list[Cells]:
    if isinstance(data, str):  # canonical or uri
        url, _, version = data.partition("|")
        return [("", _clip(version), _clip(url), "", None, None, None)]
    if not isinstance(data, dict):
        return []
    reference = data.get("reference")
    if not isinstance(reference, str) or reference.startswith("#"):
        return []
    target_type, target_id = reference_parts(reference)
    if resolve_types is not None and target_type not in resolve_types:
        return []
    value = local_reference(reference) or reference
    return [("", target_type, _clip(value), _clip(target_id), None, None, None)]


def local_reference(url: str) -> str | None:
    """``Type/id`` of an absolute URL on this server's FHIR base (``…/<BASE_PATH>/Type/id``).

    The host a client used is not known when a resource is written, so the base path alone
    marks a reference as local; such references are indexed, and searched, as ``Type/id``.
    """
    if "://" not in url:
        return None
    marker = f"/{fhir_settings.BASE_PATH}/"
    if marker not in url:
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


def _date_cells(data: Any) -> list[Cells]:
    if isinstance(data, str):
        covered = date_range(data)
        return [("", "", "", "", covered[0], covered[1], None)] if covered else []
    if isinstance(data, dict) and ("start" in data or "end" in data):
        start = date_range(data["start"]) if isinstance(data.get("start"), str) else None
        end = date_range(data["end"]) if isinstance(data.get("end"), str) else None
        if start or end:
            low = start[0] if start else EARLIEST
            return [("", "", "", "", low, end[1] if end else LATEST, None)]
    return []


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


def _number_cells(data: Any) -> list[Cells]:
    number = _number(data.get("value") if isinstance(data, dict) else data)
    return [] if number is None else [("", "", "", "", None, None, number)]


def _quantity_cells(data: Any) -> list[Cells]:
    if not isinstance(data, dict):
        return []
    number = _number(data.get("value"))
    if number is None:
        return []
    unit = data.get("unit") if isinstance(data.get("unit"), str) else ""
    code = data.get("code") if isinstance(data.get("code"), str) else unit
    system = _clip(str(data.get("system") or ""))
    return [("", system, _clip(code), _clip(unit), None, None, number)]


def _uri_cells(data: Any) -> list[Cells]:
    return [("", "", _clip(data), "", None, None, None)] if isinstance(data, str) else []


def typed_cells(
    param_type: str, value: tuple[Any, ...], resolve_types: frozenset[str] | None = None
) -> list[Cells]:
    """The index columns of one value found (``(type, json, …)``), by the parameter's type."""
    type_name, data = value[0], value[1]
    if param_type == "token":
        return _token_cells(type_name, data)
    if param_type == "reference":
        return _reference_cells(data, resolve_types)
    if param_type == "string":
        return _string_cells(type_name, data)
    if param_type == "date":
        return _date_cells(data)
    if param_type == "quantity":
        return _quantity_cells(data)
    if param_type == "uri":
        return _uri_cells(data)
    if param_type == "number":
        return _number_cells(data)
    return []


# --- rows of a resource -------------------------------------------------------------------

# The columns of a SearchToken row, in the model's field order: the tuples extract_rows
# gives are inserted as they are (fhirservice.store.rows.insert_values).
COLUMNS = (
    "key",
    "resource_key",
    "resource_type",
    "param",
    "system",
    "value",
    "text",
    "low",
    "high",
    "span",
    "number",
    "group",
    "part",
)
Row = tuple[Any, ...]


class _Evaluator:
    """FHIRPath results for one resource, each expression evaluated once per value.

    Parameters share expressions (``Observation.code`` feeds ``code``, ``combo-code`` and
    four composites). Member paths are walked without the engine
    (``fhirservice.search.paths``) unless ``reference`` asks for the engine's answer
    throughout; for the engine, a resource lacking an expression's first element skips
    evaluation. A value found is ``(type, json)`` when walked, ``(type, json, node)`` when
    the engine found it.
    """

    def __init__(self, body: dict[str, Any], *, reference: bool) -> None:
        self.body = body
        self.root: tuple[Any, ...] = (body["resourceType"], body)
        self.reference = reference
        self.parts: dict[str, list[tuple[Any, ...]]] = {}
        self.cache: dict[tuple[int, str], list[tuple[Any, ...]]] = {}

    def part_values(self, part: Part) -> list[tuple[Any, ...]]:
        """What a parameter's expression selects from the resource."""
        values = self.parts.get(part.expression)
        if values is None:
            if part.walk is not None and not self.reference:
                values = part.walk(self.body)
            else:
                values = self._evaluate(self.root, part.expression, part.first)
            self.parts[part.expression] = values
        return values

    def values(
        self, found: tuple[Any, ...], expression: str, first: str | None
    ) -> list[tuple[Any, ...]]:
        key = (id(found), expression)
        values = self.cache.get(key)
        if values is None:
            values = self.cache[key] = self._evaluate(found, expression, first)
        return values

    def _evaluate(
        self, found: tuple[Any, ...], expression: str, first: str | None
    ) -> list[tuple[Any, ...]]:
        if len(found) == 2 and not self.reference:
            walk = walker(found[0], expression)
            if walk is not None:
                return walk(found[1])
        data = found[1]
        if first is not None and isinstance(data, dict) and not _present(data, first):
            return []
        if found is self.root:
            node = self.body
        elif len(found) == 3:
            node = found[2]
        else:
            node = ResourceNode.create_node(data, found[0])
        return [(_type_name(n), _data(n), n) for n in _nodes(node, expression)]


def _type_name(node: Any) -> str:
    path = getattr(node, "path", None)
    return path if isinstance(path, str) else ""


def _data(node: Any) -> Any:
    return getattr(node, "data", node)


@cache
def _indexed_params(resource_type: str) -> tuple[Param, ...]:
    """The parameters of ``resource_type`` whose values are extracted, in name order."""
    return tuple(
        param
        for param in search_params(resource_type).values()
        if param.name not in COLUMN_PARAMS and param.type != "special" and param.parts
    )


def extract_rows(resource_key: str, body: dict[str, Any], *, reference: bool = False) -> list[Row]:
    """The SearchToken rows of one resource version, as tuples of :data:`COLUMNS`.

    ``reference``: every expression evaluated by the FHIRPath engine, none walked (the
    rows must be the same; tests compare the two).
    """
    resource_type = body["resourceType"]
    evaluator = _Evaluator(body, reference=reference)
    rows: list[Row] = []
    for param in _indexed_params(resource_type):
        name = param.name
        if param.type == "composite":
            for group, index, cells in _composite_cells(evaluator, param):
                suffix, system, value, text, low, high, number = cells
                group_key = f"{resource_key}#{group}"
                rows.append(
                    (
                        f"{resource_key}#{len(rows)}",
                        resource_key,
                        resource_type,
                        name,
                        system,
                        value,
                        text,
                        low,
                        high,
                        None,
                        number,
                        group_key,
                        index,
                    )
                )
            continue
        found = [
            cells
            for part in param.parts
            for value in evaluator.part_values(part)
            for cells in typed_cells(param.type, value, part.resolve_types)
        ]
        span = None
        if param.type == "date" and found:
            # Width class of the parameter's only value, SEVERAL on each of several values
            # (fhirservice.search.dates).
            span = span_class(found[0][4], found[0][5]) if len(found) == 1 else SEVERAL
        for suffix, system, value, text, low, high, number in found:
            rows.append(
                (
                    f"{resource_key}#{len(rows)}",
                    resource_key,
                    resource_type,
                    name + suffix if suffix else name,
                    system,
                    value,
                    text,
                    low,
                    high,
                    span,
                    number,
                    "",
                    0,
                )
            )
    return rows


def _composite_cells(evaluator: _Evaluator, param: Param) -> Iterator[tuple[str, int, Cells]]:
    """(occurrence, component position, columns) of a composite parameter's values: an
    occurrence of the parameter's expression counts when every component has a value."""
    occurrence = 0
    for part in param.parts:
        for found in evaluator.part_values(part):
            cells: list[tuple[int, Cells]] = []
            for index, component in enumerate(param.components):
                component_cells = [
                    (index, c)
                    for value in evaluator.values(found, component.expression, component.first)
                    for c in typed_cells(component.type, value)
                    if not c[0]
                ]
                if not component_cells:
                    break
                cells.extend(component_cells)
            else:
                group = f"{param.name}#{occurrence}"
                for index, c in cells:
                    yield group, index, c
            occurrence += 1


def extract_tokens(resource_key: str, body: dict[str, Any]) -> list[SearchToken]:
    """The SearchToken rows of one resource version, as model instances (for
    ``bulk_create``; the write path inserts :func:`extract_rows`' tuples)."""
    return [SearchToken(*row) for row in extract_rows(resource_key, body)]
