"""Search execution: parse FHIR search parameters into ORM filters and page the results.

Every parameter of the official R4 definitions (``fhirservice.search.extract``) is searched
with its type's semantics (http://hl7.org/fhir/R4/search.html): a filter on
``StoredResource`` selecting the keys whose ``SearchToken`` rows match. Commas OR values,
repeated parameters AND.

Public API for other search modules (chaining, ``_has``, ``_include``):
:func:`param_filter` (one parameter, its modifier and raw value → a ``Q`` on
StoredResource) and :func:`reference_targets` (the types a reference parameter points to).

Paging is keyset-based: a page link carries the sort values of the last row it served
(``_cursor``), never an offset, so rows inserted or deleted by other writers neither repeat
nor vanish between pages, whatever the ``_sort``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

import orjson
from django.db import connection
from django.db.models import F, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce

from fhirservice.access.boundaries import visible_q
from fhirservice.conf import fhir_settings
from fhirservice.errors import BadRequest
from fhirservice.fhir.resource_types import R4_RESOURCE_TYPES, is_resource_type
from fhirservice.models import SearchToken, StoredResource, minute_of
from fhirservice.plugins import search_param
from fhirservice.search.chain import chain_filter, is_chain
from fhirservice.search.dates import Box, boxes_q, date_rows, index_ranges, prefix_boxes
from fhirservice.search.extract import (
    EARLIEST,
    UNSUPPORTED_PARAMS,
    Component,
    Param,
    local_reference,
    search_params,
)
from fhirservice.search.include import INCLUDE_PARAMS, Include, parse_include
from fhirservice.search.values import MAX_VALUE, date_range, normalize_string

MSG_UNKNOWN_PARAM = "Unknown search parameter {name!r} for {type}"
MSG_BAD_VALUE = "Bad value for search parameter {name!r}: {value!r}"
MSG_BAD_MODIFIER = "Search parameter {name!r} does not support the modifier {modifier!r}"
MSG_MODIFIER_NOT_SUPPORTED = "The modifier {modifier!r} of {name!r} is not supported"
MSG_PARAM_NOT_SUPPORTED = "The search parameter {name!r} is not supported"
MSG_BAD_CURSOR = "The paging cursor is not valid"

RESULT_PARAMS = {
    "_count",
    "_sort",
    "_total",
    "_summary",
    "_elements",
    "_cursor",
    "_format",
    "_pretty",
}
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
# Kept for callers that parse dates with this module (AuditEvent search).
DATE_PREFIXES = PREFIXES
COLUMN_SORTS = {"_id": "key", "_lastUpdated": "last_updated"}
# The stored rows' index of time holds ``last_updated`` cut to the minute (see
# StoredResource.updated_minute): a ``_lastUpdated`` range or sort bounds and orders by it
# too, which changes no answer (the minute never decreases as the instant grows) and reads
# the index. The prefixes whose instants are at or after the range's low (high) end:
_LOWER_BOUND = {"eq": 0, "ap": 0, "ge": 0, "gt": 1, "sa": 1}
# The prefixes whose instants are before the range's low (high) end:
_UPPER_BOUND = {"eq": 1, "ap": 1, "le": 1, "lt": 0, "eb": 0}
_MINUTE = "updated_minute"
SORTABLE_TYPES = {"string", "token", "reference", "date", "number", "quantity", "uri"}
# Token modifiers the spec defines that need terminology services.
TERMINOLOGY_MODIFIERS = {"in", "not-in", "above", "below"}
_MODIFIERS = {
    "string": {"", "exact", "contains"},
    "token": {"", "not", "text", "of-type"},
    "uri": {"", "below", "above"},
    "reference": {""},
    "date": {""},
    "number": {""},
    "quantity": {""},
    "composite": {""},
}
# The pseudo-type of a search of all types (``GET [base]?…``): its parameters are Resource's,
# matched on the index rows of every type (fhirservice.search.system).
ANY_TYPE = "Resource"
# Every type, in one order: the index's first column, listed, keeps an all-types search on it.
_ALL_TYPES = sorted(R4_RESOURCE_TYPES)
# Bounds of a value a number search compares to: its implicit precision range.
_APPROX = 0.1


class SearchNotSupported(BadRequest):
    """A parameter or modifier the spec defines and this server does not implement."""

    code = "not-supported"
    detail_code = "MSG_PARAM_NOT_SUPPORTED"


@dataclass
class SearchSpec:
    """A parsed search: filters, order, page size and result options."""

    resource_type: str
    filters: list[Q] = field(default_factory=list)
    sort: list[tuple[str, bool]] = field(default_factory=lambda: [("_id", False)])
    count: int = 50
    cursor: list[Any] | None = None
    total: str | None = None  # _total as asked; None: not asked (counted up to a bound)
    summary: str | None = None
    elements: list[str] | None = None
    ignored: list[str] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)
    includes: list[Include] = field(default_factory=list)  # _include and _revinclude


@dataclass
class SearchPage:
    """One page of results."""

    rows: list[StoredResource]
    total: int | None
    next_cursor: str | None


# --- value syntax ---------------------------------------------------------------------------


def _split(raw: str, separator: str) -> list[str]:
    """Split at unescaped ``separator``; escapes of other characters stay for later splits."""
    parts, current, escaped = [], [], False
    for char in raw:
        if escaped:
            if char != separator:
                current.append("\\")
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return parts


def _unescape(value: str) -> str:
    out, escaped = [], False
    for char in value:
        if escaped or char != "\\":
            out.append(char)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def _split_values(raw: str) -> list[str]:
    """The comma-separated alternatives of a parameter value (``\\,`` escapes a comma)."""
    return [_unescape(v) for v in _split(raw, ",")]


def _bad(name: str, value: str) -> BadRequest:
    return BadRequest(MSG_BAD_VALUE.format(name=name, value=value), detail_code="MSG_PARAM_INVALID")


def _prefixed(name: str, raw: str) -> tuple[str, str]:
    if raw[:2] in PREFIXES and len(raw) > 2 and not raw[2:3].isalpha():
        return raw[:2], raw[2:]
    if raw[:2].isalpha() and raw[:2].islower():
        raise _bad(name, raw)
    return "eq", raw


# --- one value of each type: a filter on SearchToken ------------------------------------------


def _string_q(name: str, value: str, modifier: str) -> Q:
    if modifier == "exact":
        return Q(system=value[:MAX_VALUE])
    norm = normalize_string(value)
    if modifier == "contains":
        return Q(value__contains=norm)
    return Q(value__startswith=norm)


def _token_q(name: str, value: str, modifier: str) -> Q:
    if modifier == "text":
        return Q(text__startswith=normalize_string(_unescape(value)))
    if modifier == "of-type":
        pieces = [_unescape(p) for p in _split(value, "|")]
        if len(pieces) != 3 or not all(pieces[1:]):
            raise _bad(name, value)
        return Q(param=f"{name}:of-type", system=pieces[0], value=pieces[1], text=pieces[2])
    pieces = [_unescape(p) for p in _split(value, "|")]
    if len(pieces) == 1:
        return Q(value=pieces[0][:MAX_VALUE])
    if len(pieces) != 2 or not any(pieces):
        raise _bad(name, value)
    system, code = pieces
    q = Q(system=system[:MAX_VALUE])
    if code:
        q &= Q(value=code[:MAX_VALUE])
    return q


def _reference_q(name: str, value: str, modifier: str) -> Q:
    value = _unescape(value)
    if modifier:
        if "/" in value:
            if not value.startswith(f"{modifier}/"):
                raise _bad(name, value)
            return Q(value=value[:MAX_VALUE])
        return Q(value=f"{modifier}/{value}"[:MAX_VALUE])
    if "://" in value or value.startswith("urn:"):
        local = local_reference(value)
        if local is not None:
            return Q(value=local)
        url, _, version = value.partition("|")
        q = Q(value=url[:MAX_VALUE])
        return q & Q(system=version) if version else q
    if "/" in value:
        return Q(value=value[:MAX_VALUE])
    if "|" in value:
        url, _, version = value.partition("|")
        return Q(value=url[:MAX_VALUE], system=version)
    # A bare id: of any target type (the index keeps the id alone for this).
    return Q(text=value[:MAX_VALUE]) & ~Q(system="")


def _parse_date(name: str, raw: str) -> tuple[str, datetime, datetime]:
    prefix, text = _prefixed(name, raw)
    covered = date_range(text)
    if covered is None:
        raise _bad(name, raw)
    return prefix, covered[0], covered[1]


def _last_updated_q(prefix: str, low: datetime, high: datetime) -> Q:
    """``_lastUpdated`` is an instant: the search range either holds it or not."""
    inside = Q(last_updated__gte=low, last_updated__lt=high)
    return {
        "eq": inside,
        "ap": inside,
        "ne": ~inside,
        "gt": Q(last_updated__gte=high),
        "sa": Q(last_updated__gte=high),
        "lt": Q(last_updated__lt=low),
        "eb": Q(last_updated__lt=low),
        "ge": Q(last_updated__gte=low),
        "le": Q(last_updated__lt=high),
    }[prefix]


def _number_q(name: str, raw: str) -> Q:
    prefix, text = _prefixed(name, raw)
    try:
        number = Decimal(text)
    except InvalidOperation as exc:
        raise _bad(name, raw) from exc
    if not number.is_finite():
        raise _bad(name, raw)
    # The implicit range of the value as written: 100 is [99.5, 100.5), 1.50 is ±0.005.
    exponent = number.as_tuple().exponent
    half = float(Decimal(5).scaleb(int(exponent) - 1))  # type: ignore[arg-type]
    value = float(number)
    low, high = value - half, value + half
    # The value itself too: past 15 significant digits the range is below a float's step.
    equal = Q(number__gte=low, number__lt=high) | Q(number=value)
    if prefix == "eq":
        return equal
    if prefix == "ne":
        return ~equal
    if prefix in ("gt", "sa"):
        return Q(number__gt=value)
    if prefix in ("lt", "eb"):
        return Q(number__lt=value)
    if prefix == "ge":
        return Q(number__gte=value)
    if prefix == "le":
        return Q(number__lte=value)
    spread = max(abs(value) * _APPROX, half)  # ap: within 10 %
    return Q(number__gte=value - spread, number__lte=value + spread)


def _quantity_q(name: str, raw: str) -> Q:
    pieces = [_unescape(p) for p in _split(raw, "|")]
    if len(pieces) not in (1, 3) or not pieces[0]:
        raise _bad(name, raw)
    q = _number_q(name, pieces[0])
    if len(pieces) == 3:
        system, code = pieces[1], pieces[2]
        if system:
            q &= Q(system=system[:MAX_VALUE])
        if code:
            q &= Q(value=code[:MAX_VALUE]) if system else Q(value=code) | Q(text=code)
    return q


def _uri_q(name: str, value: str, modifier: str) -> Q:
    value = _unescape(value)[:MAX_VALUE]
    if modifier == "below":
        return Q(value__startswith=value)
    if modifier == "above":
        # Every URI that the value is "below": its prefixes at path boundaries.
        pieces = value.split("/")
        return Q(value__in=["/".join(pieces[:n]) for n in range(1, len(pieces) + 1)])
    return Q(value=value)


def _typed_q(name: str, kind: str, value: str, modifier: str) -> Q:
    if kind == "string":
        return _string_q(name, _unescape(value), modifier)
    if kind == "token":
        return _token_q(name, value, modifier)
    if kind == "reference":
        return _reference_q(name, value, modifier)
    if kind == "date":
        return boxes_q(prefix_boxes(*_parse_date(name, _unescape(value))))
    if kind == "number":
        return _number_q(name, _unescape(value))
    if kind == "quantity":
        return _quantity_q(name, value)
    if kind == "uri":
        return _uri_q(name, value, modifier)
    raise SearchNotSupported(MSG_PARAM_NOT_SUPPORTED.format(name=name))


def _index_rows(resource_type: str, **condition: Any) -> QuerySet[SearchToken]:
    """The index rows of a type (of every type for ANY_TYPE) that meet ``condition``."""
    if resource_type == ANY_TYPE:
        return SearchToken.objects.filter(resource_type__in=_ALL_TYPES, **condition)
    return SearchToken.objects.filter(resource_type=resource_type, **condition)


def _composite_keys(resource_type: str, param: Param, value: str) -> QuerySet[SearchToken]:
    pieces = _split(value, "$")
    if len(pieces) != len(param.components) or not all(pieces):
        raise _bad(param.name, value)
    rows = _index_rows(resource_type, param=param.name)
    groups = None
    for index in range(len(pieces) - 1, -1, -1):
        component: Component = param.components[index]
        matching = rows.filter(_typed_q(param.name, component.type, pieces[index], ""), part=index)
        if groups is not None:
            matching = matching.filter(group__in=groups)
        groups = matching.values("group")
    assert groups is not None
    return matching.values("resource_key")


# --- one parameter: a filter on StoredResource ------------------------------------------------


def _check_modifier(resource_type: str, param: Param, modifier: str) -> None:
    if modifier in ("", "missing") or modifier in _MODIFIERS.get(param.type, {""}):
        return
    if param.type == "reference" and is_resource_type(modifier):
        if param.target and modifier not in param.target:
            raise BadRequest(
                MSG_BAD_MODIFIER.format(name=param.name, modifier=modifier),
                detail_code="MSG_PARAM_MODIFIER_INVALID",
            )
        return
    if (param.type == "token" and modifier in TERMINOLOGY_MODIFIERS) or (
        param.type == "reference" and modifier == "identifier"
    ):
        raise SearchNotSupported(
            MSG_MODIFIER_NOT_SUPPORTED.format(name=param.name, modifier=modifier),
            detail_code="MSG_PARAM_MODIFIER_NOT_SUPPORTED",
        )
    raise BadRequest(
        MSG_BAD_MODIFIER.format(name=param.name, modifier=modifier),
        detail_code="MSG_PARAM_MODIFIER_INVALID",
    )


def _missing_q(resource_type: str, name: str, raw: str) -> Q:
    if raw not in ("true", "false"):
        raise _bad(name, raw)
    having = _index_rows(resource_type, param=name)
    present = Q(key__in=having.values("resource_key"))
    return ~present if raw == "true" else present


def _id_q(resource_type: str, raw: str, modifier: str) -> Q:
    if modifier == "missing":
        return _missing_column(raw, "_id")
    if modifier not in ("", "not"):
        raise BadRequest(
            MSG_BAD_MODIFIER.format(name="_id", modifier=modifier),
            detail_code="MSG_PARAM_MODIFIER_INVALID",
        )
    q = Q(key__in=[f"{resource_type}/{v}" for v in _split_values(raw)])
    return ~q if modifier == "not" else q


def _missing_column(raw: str, name: str) -> Q:
    if raw not in ("true", "false"):
        raise _bad(name, raw)
    return Q(pk__in=[]) if raw == "true" else Q()


def _last_updated_filter(raw: str, modifier: str) -> Q:
    if modifier == "missing":
        return _missing_column(raw, "_lastUpdated")
    if modifier:
        raise BadRequest(
            MSG_BAD_MODIFIER.format(name="_lastUpdated", modifier=modifier),
            detail_code="MSG_PARAM_MODIFIER_INVALID",
        )
    alternatives = Q()
    for value in _split_values(raw):
        prefix, low, high = _parse_date("_lastUpdated", value)
        alternatives |= _last_updated_q(prefix, low, high) & _minute_q(prefix, (low, high))
    return alternatives


def _minute_q(prefix: str, ends: tuple[datetime, datetime]) -> Q:
    """The minutes (``updated_minute``) of the instants a ``_lastUpdated`` range holds."""
    condition = Q()
    if prefix in _LOWER_BOUND:
        condition &= Q(**{f"{_MINUTE}__gte": minute_of(ends[_LOWER_BOUND[prefix]])})
    if prefix in _UPPER_BOUND:
        condition &= Q(**{f"{_MINUTE}__lt": ends[_UPPER_BOUND[prefix]]})
    return condition


def _date_condition(name: str, raw: str) -> list[Box]:
    """One date parameter's comma-separated values: the union of their boxes."""
    boxes = []
    for value in _split(raw, ","):
        if not value:
            raise _bad(name, raw)
        boxes.extend(prefix_boxes(*_parse_date(name, _unescape(value))))
    return boxes


def _is_date_param(resource_type: str, name: str, modifier: str) -> bool:
    """Whether ``name`` is a plain date search of the index (repeats of it are merged)."""
    if modifier or name in COLUMN_SORTS or search_param(resource_type, name) is not None:
        return False
    param = known_param(resource_type, name)
    return param is not None and param.type == "date" and name not in UNSUPPORTED_PARAMS


def known_param(resource_type: str, name: str) -> Param | None:
    """The definition of a search parameter of ``resource_type``, if it has one."""
    return search_params(resource_type).get(name)


def reference_targets(resource_type: str, name: str) -> list[str]:
    """The resource types reference parameter ``name`` of ``resource_type`` points to.

    Empty for a parameter that is not a reference; every target the definition names
    (a parameter such as ``Observation.subject`` names several).
    """
    param = known_param(resource_type, name)
    if param is None or param.type != "reference":
        return []
    return list(param.target)


def param_filter(resource_type: str, name: str, modifier: str, raw: str) -> Q:
    """A filter on StoredResource for one search parameter with its (comma-separated) values.

    ``modifier`` is the text after ``:`` (empty for none); ``resource_type`` ANY_TYPE
    searches a common parameter on every type's rows. Raises BadRequest for an unknown
    parameter, a bad modifier or a malformed value, SearchNotSupported (400, not-supported)
    for what the spec defines and this server does not do (``_text``, ``:in`` …).
    """
    if name == "_id":
        return _id_q(resource_type, raw, modifier)
    if name == "_lastUpdated":
        return _last_updated_filter(raw, modifier)
    custom = search_param(resource_type, name)
    if custom is not None:
        # answered by an app outside the metadata store (Group?member=: ClickHouse)
        return custom.build(_split_values(raw), modifier)
    param = known_param(resource_type, name)
    if param is None:
        raise BadRequest(
            MSG_UNKNOWN_PARAM.format(name=name, type=resource_type),
            detail_code="MSG_PARAM_UNKNOWN",
        )
    if name in UNSUPPORTED_PARAMS or param.type == "special":
        raise SearchNotSupported(MSG_PARAM_NOT_SUPPORTED.format(name=name))
    _check_modifier(resource_type, param, modifier)
    if modifier == "missing":
        return _missing_q(resource_type, name, raw)
    if param.type == "date":
        return Q(key__in=date_rows(resource_type, name, [_date_condition(name, raw)]))
    rows = _index_rows(resource_type, param=name)
    if param.type == "composite":
        condition = Q(pk__in=[])
        for value in _split(raw, ","):
            if not value:
                raise _bad(name, raw)
            condition |= Q(key__in=_composite_keys(resource_type, param, value))
        return condition
    alternatives = Q()
    for value in _split(raw, ","):
        if not value:
            raise _bad(name, raw)
        alternatives |= _typed_q(name, param.type, value, modifier)
    if modifier == "of-type":
        # of-type rows live under their own name (extract.py), the filter names it.
        rows = _index_rows(resource_type)
    keys = rows.filter(alternatives).values("resource_key")
    if modifier == "not":
        return ~Q(key__in=keys)
    return Q(key__in=keys)


# --- the query string ---------------------------------------------------------------------------


def parse_count(raw: str) -> int:
    """``_count``: a whole number, at most the largest page (400 otherwise)."""
    try:
        count = int(raw)
    except ValueError as exc:
        raise _bad("_count", raw) from exc
    if count < 0:
        raise _bad("_count", raw)
    return min(count, fhir_settings.MAX_COUNT)


def encode_cursor(values: list[Any]) -> str:
    """Opaque page cursor from the last row's sort values."""
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode().rstrip("=")


def decode_cursor(raw: str) -> list[Any]:
    """The sort values a cursor carries; 400 when it was tampered with."""
    try:
        values = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise BadRequest(MSG_BAD_CURSOR, detail_code="MSG_PARAM_INVALID") from exc
    if not isinstance(values, list):
        raise BadRequest(MSG_BAD_CURSOR, detail_code="MSG_PARAM_INVALID")
    return values


def parse_search(resource_type: str, pairs: list[tuple[str, str]], *, strict: bool) -> SearchSpec:
    """Turn query pairs into a SearchSpec; unknown parameters are ignored or (strict) 400."""
    spec = SearchSpec(resource_type=resource_type, count=fhir_settings.DEFAULT_COUNT)
    # Repeats of a date parameter are searched together (fhirservice.search.dates).
    dated: dict[str, list[list[Box]]] = {}
    for name_mod, raw in pairs:
        name, _, modifier = name_mod.partition(":")
        if _is_date_param(resource_type, name, modifier):
            dated.setdefault(name, []).append(_date_condition(name, raw))
            spec.used.append((name_mod, raw))
            continue
        # --- chains, _has, _include/_revinclude (fhirservice.search.chain, .include) ---
        if name in INCLUDE_PARAMS:
            include = parse_include(name, modifier, raw, strict=strict)
            if include is None:
                spec.ignored.append(name_mod)
            else:
                spec.includes.append(include)
            continue
        if is_chain(name_mod):
            condition = chain_filter(resource_type, name_mod, raw, strict=strict)
            if condition is None:
                spec.ignored.append(name_mod)
            else:
                spec.filters.append(condition)
                spec.used.append((name_mod, raw))
            continue
        # --- end of chains and includes ---
        if name in RESULT_PARAMS:
            result_param(spec, name, raw)
            continue
        try:
            spec.filters.append(param_filter(resource_type, name, modifier, raw))
        except BadRequest as error:
            # Lenient handling skips parameters, never a modifier it cannot apply.
            if strict or error.detail_code not in ("MSG_PARAM_UNKNOWN", "MSG_PARAM_NOT_SUPPORTED"):
                raise
            spec.ignored.append(name_mod)
            continue
        spec.used.append((name_mod, raw))
    for name, conditions in dated.items():
        spec.filters.append(Q(key__in=date_rows(resource_type, name, conditions)))
    return spec


def _sortable(resource_type: str, name: str) -> bool:
    if name in COLUMN_SORTS:
        return True
    param = known_param(resource_type, name)
    return param is not None and param.type in SORTABLE_TYPES and param.parts != ()


def result_param(spec: SearchSpec, name: str, raw: str) -> None:
    """Apply one result parameter (``_count``, ``_sort``, ``_total`` …) to ``spec``."""
    if name == "_count":
        spec.count = parse_count(raw)
    elif name == "_cursor":
        spec.cursor = decode_cursor(raw)
    elif name == "_sort":
        sort = []
        for item in _split_values(raw):
            descending = item.startswith("-")
            field_name = item[1:] if descending else item
            if not _sortable(spec.resource_type, field_name):
                raise BadRequest(
                    MSG_BAD_VALUE.format(name="_sort", value=raw), detail_code="MSG_SORT_UNKNOWN"
                )
            sort.append((field_name, descending))
        if all(f != "_id" for f, _ in sort):
            sort.append(("_id", sort[-1][1] if sort else False))
        spec.sort = sort
    elif name == "_total":
        if raw not in ("none", "estimate", "accurate"):
            raise _bad("_total", raw)
        spec.total = raw
    elif name == "_summary":
        if raw not in ("true", "false", "text", "data", "count"):
            raise _bad("_summary", raw)
        spec.summary = raw
    elif name == "_elements":
        spec.elements = [e.strip() for e in raw.split(",") if e.strip()]


# --- running it ---------------------------------------------------------------------------------


def _base_queryset(spec: SearchSpec) -> QuerySet[StoredResource]:
    # Only what the caller's organization boundary lets it see (fhirservice.access): search,
    # conditional create/update and conditional references all start here.
    queryset = StoredResource.objects.filter(
        visible_q(), resource_type=spec.resource_type, deleted=False
    )
    index_sets = [keys for c in spec.filters if (keys := _index_keys(c)) is not None]
    if len(index_sets) > 1:
        # Several sets of index rows are intersected among themselves first (small index
        # scans joined on resource_key) rather than each joined to StoredResource.
        queryset = queryset.filter(key__in=_intersection(index_sets))
    for condition in spec.filters:
        if len(index_sets) <= 1 or _index_keys(condition) is None:
            queryset = queryset.filter(condition)
    return queryset


def _intersection(index_sets: list[QuerySet[SearchToken]]) -> QuerySet[SearchToken]:
    keys = index_sets[0]
    for other in index_sets[1:]:
        keys = keys.filter(resource_key__in=other)
    return keys


def _sort_column(resource_type: str, name: str, descending: bool) -> tuple[str, Any]:
    """The column a sort key reads and, for a parameter, the subquery annotating it.

    A resource with several values sorts by its least (ascending) or greatest (descending);
    one without any sorts first ascending, last descending (the coalesced floor value).
    """
    if name in COLUMN_SORTS:
        return COLUMN_SORTS[name], None
    param = known_param(resource_type, name)
    assert param is not None
    if param.type == "date":
        column, floor = ("high" if descending else "low"), Value(EARLIEST)
    elif param.type in ("number", "quantity"):
        column, floor = "number", Value(-1e308)
    else:
        column, floor = "value", Value("")
    values = (
        SearchToken.objects.filter(
            resource_key=OuterRef("key"), resource_type=resource_type, param=name
        )
        .order_by(f"-{column}" if descending else column)
        .values(column)[:1]
    )
    return f"sort_{name.replace('-', '_')}", Coalesce(Subquery(values), floor)


def _sorted(spec: SearchSpec, queryset: QuerySet[StoredResource]) -> tuple[QuerySet, list[str]]:
    columns = []
    for name, descending in spec.sort:
        column, annotation = _sort_column(spec.resource_type, name, descending)
        if annotation is not None:
            queryset = queryset.annotate(**{column: annotation})
        columns.append(column)
    ordering = []
    for column, (_, desc) in zip(columns, spec.sort, strict=True):
        # Ordered by the minute first (the same order): the minute's index gives it, and
        # only the rows of one minute are sorted by their instant.
        for name in (_MINUTE, column) if column == COLUMN_SORTS["_lastUpdated"] else (column,):
            ordering.append(F(name).desc() if desc else F(name).asc())
    return queryset.order_by(*ordering), columns


def _cursor_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _after_cursor(spec: SearchSpec, columns: list[str], cursor: list[Any]) -> Q:
    """Rows strictly after the cursor in the spec's order (lexicographic keyset condition)."""
    if len(cursor) != len(spec.sort):
        raise BadRequest(MSG_BAD_CURSOR, detail_code="MSG_PARAM_INVALID")
    condition = Q(pk__in=[])
    equal = Q()
    bound = Q()
    for position, (column, (name, descending), value) in enumerate(
        zip(columns, spec.sort, cursor, strict=True)
    ):
        if _is_date_sort(spec, name):
            try:
                value = datetime.fromisoformat(value)
            except (TypeError, ValueError) as exc:
                raise BadRequest(MSG_BAD_CURSOR, detail_code="MSG_PARAM_INVALID") from exc
        if position == 0 and name == "_lastUpdated" and isinstance(value, datetime):
            # Every later row is in this row's minute or beyond it: the index's range.
            bound = Q(**{f"{_MINUTE}__{'lte' if descending else 'gte'}": minute_of(value)})
        step = Q(**{f"{column}__{'lt' if descending else 'gt'}": value})
        condition |= equal & step
        equal &= Q(**{column: value})
    return condition & bound


def _is_date_sort(spec: SearchSpec, name: str) -> bool:
    param = known_param(spec.resource_type, name)
    return name == "_lastUpdated" or (param is not None and param.type == "date")


def _index_keys(condition: Q) -> QuerySet[SearchToken] | None:
    """The SearchToken rows of a filter that is exactly ``key IN (index rows)``, else None."""
    if condition.negated or len(condition.children) != 1:
        return None
    child = condition.children[0]
    if (
        isinstance(child, tuple)
        and child[0] == "key__in"
        and isinstance(child[1], QuerySet)
        and child[1].model is SearchToken
    ):
        return child[1]
    return None


def _index_sets(spec: SearchSpec) -> list[QuerySet[SearchToken]] | None:
    """The filters' sets of index rows when they alone decide the matches: every filter is
    one, and the caller sees every organization's data.

    Index rows exist only for the current version of live resources (a delete removes
    them), so such a search needs StoredResource only for the rows it serves.
    """
    sets = [_index_keys(condition) for condition in spec.filters]
    if not sets or None in sets or visible_q() != Q():
        return None
    return sets  # type: ignore[return-value]


def total_bound(spec: SearchSpec) -> int | None:
    """How far a search counts its matches: None (all of them) when the client asked for a
    total (``_total=accurate`` or ``estimate``, ``_summary=count``, ``_count=0``), 0 for
    ``_total=none``, else ``SEARCH_TOTAL_BOUND``. Counting 10^5 matches of a token took
    ~80 ms at 10^6 resources on PostgreSQL while their first page read 51 keys in 0.2 ms
    (bench/README.md), so a first page nobody asked the total of does not pay for it."""
    if spec.summary == "count" or spec.count == 0 or spec.total in ("accurate", "estimate"):
        return None
    if spec.total == "none":
        return 0
    return fhir_settings.SEARCH_TOTAL_BOUND


def bounded_total(counted: QuerySet, bound: int | None) -> int | None:
    """``counted``'s count, or None when it has more than ``bound`` rows (the count then stops
    reading after ``bound + 1`` of them); ``bound`` None counts them all, 0 counts nothing."""
    if bound is None:
        return counted.count()
    if bound == 0:
        return None
    found = counted[: bound + 1].count()
    return found if found <= bound else None


def _count(spec: SearchSpec, queryset: QuerySet[StoredResource], bound: int | None) -> int | None:
    """The total of a search up to ``bound`` (:func:`bounded_total`): counted on the index
    alone where it decides the matches (10^5 matches without visiting 10^5 StoredResource
    rows)."""
    sets = _index_sets(spec)
    if sets is None:
        return bounded_total(queryset, bound)
    ranges = _ranges(sets)
    if ranges is not None:
        return bounded_total(_union(ranges), bound)
    return bounded_total(_intersection(sets).distinct(), bound)


def _ranges(sets: list[QuerySet[SearchToken]]) -> list[QuerySet[SearchToken]] | None:
    """The index ranges of a search whose one set of index rows is a date search's
    (fhirservice.search.dates.index_ranges), on PostgreSQL; else None. SQLite reads the OR
    as covering index ranges already (MULTI-INDEX OR: 5.5 ms for the total of a week at
    10^5, bench/README.md); MongoDB keeps its own plan."""
    if len(sets) != 1 or connection.vendor != "postgresql":
        return None
    return index_ranges(sets[0])


def _union(ranges: list[QuerySet[SearchToken]]) -> QuerySet[SearchToken]:
    """The distinct keys of the rows in any of ``ranges``: a UNION, each range read on its own
    (an index-only scan on PostgreSQL)."""
    keys = [one.values_list("resource_key", flat=True) for one in ranges]
    return keys[0].union(*keys[1:]) if len(keys) > 1 else keys[0].distinct()


def _page_by_index(spec: SearchSpec, sets: list[QuerySet[SearchToken]]) -> list[StoredResource]:
    """A page in ``_id`` order read from the index: the first ``count + 1`` distinct keys
    after the cursor, then those rows. A date range's matches come from the index in date
    order; joining all of them to StoredResource to keep 51 cost more than the search."""
    descending = spec.sort[0][1]
    after = Q()
    if spec.cursor is not None:
        if len(spec.cursor) != 1 or not isinstance(spec.cursor[0], str):
            raise BadRequest(MSG_BAD_CURSOR, detail_code="MSG_PARAM_INVALID")
        after = Q(**{f"resource_key__{'lt' if descending else 'gt'}": spec.cursor[0]})
    ranges = _ranges(sets)
    if ranges is not None:
        keys = _union([one.filter(after) for one in ranges])
    else:
        keys = _intersection(sets).filter(after).values_list("resource_key", flat=True).distinct()
    page = list(keys.order_by("-resource_key" if descending else "resource_key")[: spec.count + 1])
    found = StoredResource.objects.filter(
        key__in=page, resource_type=spec.resource_type, deleted=False
    ).in_bulk()
    return [found[key] for key in page if key in found]


def run_search(spec: SearchSpec) -> SearchPage:
    """Execute a SearchSpec: one page of rows, the total, and the next page's cursor."""
    queryset = _base_queryset(spec)
    bound = total_bound(spec)
    total = _count(spec, queryset, bound) if bound != 0 else None
    if spec.summary == "count" or spec.count == 0:
        return SearchPage(rows=[], total=total, next_cursor=None)
    sets = _index_sets(spec) if [name for name, _ in spec.sort] == ["_id"] else None
    if sets is not None:
        return _page(spec, _page_by_index(spec, sets), ["key"], total)
    return page_of(spec, queryset, total)


def page_of(spec: SearchSpec, queryset: QuerySet[StoredResource], total: int | None) -> SearchPage:
    """One page of ``queryset`` in the spec's order, after its cursor (keyset paging)."""
    paged, columns = _sorted(spec, queryset)
    if spec.cursor is not None:
        paged = paged.filter(_after_cursor(spec, columns, spec.cursor))
    return _page(spec, list(paged[: spec.count + 1]), columns, total)


def _page(spec: SearchSpec, rows: list[StoredResource], columns: list[str], total: int | None):
    next_cursor = None
    if len(rows) > spec.count:
        rows = rows[: spec.count]
        last = rows[-1]
        next_cursor = encode_cursor([_cursor_value(getattr(last, c)) for c in columns])
    return SearchPage(rows=rows, total=total, next_cursor=next_cursor)


def search_keys(resource_type: str, query: str, *, limit: int) -> list[str]:
    """Keys of resources matching a query string (conditional create/references), strictly."""
    pairs = parse_qsl(query.lstrip("?"), keep_blank_values=True)
    spec = parse_search(resource_type, pairs, strict=True)
    if not spec.filters:
        raise _bad("condition", query)
    return list(_base_queryset(spec).order_by("key").values_list("key", flat=True)[:limit])
