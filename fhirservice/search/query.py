"""Search execution: parse FHIR search parameters into ORM filters and page the results.

Paging is keyset-based: a page link carries the sort values of the last row it served
(``_cursor``), never an offset, so rows inserted or deleted by other writers neither repeat
nor vanish between pages of the default (``_id``) order.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

import orjson
from django.db.models import Q, QuerySet

from fhirservice.access.boundaries import visible_q
from fhirservice.conf import fhir_settings
from fhirservice.errors import BadRequest
from fhirservice.models import SearchToken, StoredResource
from fhirservice.plugins import search_param
from fhirservice.search.extract import PARAMS, Param
from fhirservice.search.values import MAX_VALUE, date_range, normalize_string

MSG_UNKNOWN_PARAM = "Unknown search parameter {name!r} for {type}"
MSG_BAD_VALUE = "Bad value for search parameter {name!r}: {value!r}"
MSG_BAD_MODIFIER = "Search parameter {name!r} does not support the modifier {modifier!r}"
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
COMMON_PARAMS = {"_id", "_lastUpdated"}
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
SORTS = {"_id": "key", "_lastUpdated": "last_updated"}


@dataclass
class SearchSpec:
    """A parsed search: filters, order, page size and result options."""

    resource_type: str
    filters: list[Q] = field(default_factory=list)
    sort: list[tuple[str, bool]] = field(default_factory=lambda: [("_id", False)])
    count: int = 50
    cursor: list[Any] | None = None
    total: str = "accurate"
    summary: str | None = None
    elements: list[str] | None = None
    ignored: list[str] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class SearchPage:
    """One page of results."""

    rows: list[StoredResource]
    total: int | None
    next_cursor: str | None


def _split_values(raw: str) -> list[str]:
    parts, current, escaped = [], [], False
    for char in raw:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _string_q(param: Param, value: str, modifier: str) -> Q:
    norm = normalize_string(value)
    if modifier == "exact":
        return Q(system=value[:MAX_VALUE])
    if modifier == "contains":
        return Q(value__contains=norm)
    return Q(value__startswith=norm)


def _token_q(param: Param, value: str, modifier: str) -> Q:
    if "|" in value:
        system, code = value.split("|", 1)
        q = Q(system=system)
        if code:
            q &= Q(value=code)
        return q
    return Q(value=value)


def _reference_q(param: Param, value: str, modifier: str) -> Q:
    if "/" in value:
        return Q(value=value) | Q(value__endswith="/" + value)
    if modifier:
        return Q(value=f"{modifier}/{value}")
    return Q(value__endswith="/" + value)


def _parse_date(name: str, raw: str) -> tuple[str, datetime, datetime]:
    prefix = raw[:2] if raw[:2] in DATE_PREFIXES else "eq"
    text = raw[2:] if raw[:2] in DATE_PREFIXES else raw
    covered = date_range(text)
    if covered is None:
        raise BadRequest(
            MSG_BAD_VALUE.format(name=name, value=raw), detail_code="MSG_PARAM_INVALID"
        )
    return prefix, covered[0], covered[1]


def _range_q(prefix: str, low: datetime, high: datetime, lo: str, hi: str) -> Q:
    """Match rows whose range [lo, hi) relates to the search range [low, high) by prefix."""
    inside = Q(**{f"{lo}__gte": low, f"{hi}__lte": high})
    if prefix in ("eq", "ap"):
        return inside
    if prefix == "ne":
        return ~inside
    if prefix == "gt":
        return Q(**{f"{hi}__gt": high})
    if prefix == "lt":
        return Q(**{f"{lo}__lt": low})
    if prefix == "ge":
        return Q(**{f"{hi}__gt": high}) | inside
    if prefix == "le":
        return Q(**{f"{lo}__lt": low}) | inside
    if prefix == "sa":
        return Q(**{f"{lo}__gte": high})
    return Q(**{f"{hi}__lte": low})  # eb


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


def _uri_q(param: Param, value: str, modifier: str) -> Q:
    return Q(value=value[:MAX_VALUE])


_TOKEN_BUILDERS = {
    "string": _string_q,
    "token": _token_q,
    "uri": _uri_q,
    "reference": _reference_q,
}
_MODIFIERS = {
    "string": {"", "exact", "contains"},
    "token": {""},
    "uri": {""},
    "reference": {""},
    "date": {""},
}


def _param_q(resource_type: str, param: Param, modifier: str, raw: str) -> Q:
    allowed = _MODIFIERS[param.type]
    if modifier not in allowed and not (param.type == "reference" and modifier.isalpha()):
        raise BadRequest(
            MSG_BAD_MODIFIER.format(name=param.name, modifier=modifier),
            detail_code="MSG_PARAM_MODIFIER_INVALID",
        )
    alternatives = Q()
    for value in _split_values(raw):
        if not value:
            raise BadRequest(
                MSG_BAD_VALUE.format(name=param.name, value=raw), detail_code="MSG_PARAM_INVALID"
            )
        if param.type == "date":
            prefix, low, high = _parse_date(param.name, value)
            token_q = _range_q(prefix, low, high, "low", "high")
        else:
            token_q = _TOKEN_BUILDERS[param.type](param, value, modifier)
        alternatives |= token_q
    keys = SearchToken.objects.filter(
        Q(resource_type=resource_type, param=param.name) & alternatives
    ).values("resource_key")
    return Q(key__in=keys)


def parse_count(raw: str) -> int:
    """``_count``: a whole number, at most the largest page (400 otherwise)."""
    try:
        count = int(raw)
    except ValueError as exc:
        raise BadRequest(
            MSG_BAD_VALUE.format(name="_count", value=raw), detail_code="MSG_PARAM_INVALID"
        ) from exc
    if count < 0:
        raise BadRequest(
            MSG_BAD_VALUE.format(name="_count", value=raw), detail_code="MSG_PARAM_INVALID"
        )
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
    known = PARAMS.get(resource_type, {})
    for name_mod, raw in pairs:
        name, _, modifier = name_mod.partition(":")
        if name in RESULT_PARAMS:
            _result_param(spec, name, raw)
            continue
        if name == "_id":
            spec.filters.append(Q(key__in=[f"{resource_type}/{v}" for v in _split_values(raw)]))
        elif name == "_lastUpdated":
            alternatives = Q()
            for value in _split_values(raw):
                alternatives |= _last_updated_q(*_parse_date(name, value))
            spec.filters.append(alternatives)
        elif (custom := search_param(resource_type, name)) is not None:
            # answered by an app outside the metadata store (Group?member=: ClickHouse)
            spec.filters.append(custom.build(_split_values(raw), modifier))
        elif name in known:
            spec.filters.append(_param_q(resource_type, known[name], modifier, raw))
        else:
            if strict:
                raise BadRequest(
                    MSG_UNKNOWN_PARAM.format(name=name, type=resource_type),
                    detail_code="MSG_PARAM_UNKNOWN",
                )
            spec.ignored.append(name_mod)
            continue
        spec.used.append((name_mod, raw))
    return spec


def _result_param(spec: SearchSpec, name: str, raw: str) -> None:
    if name == "_count":
        spec.count = parse_count(raw)
    elif name == "_cursor":
        spec.cursor = decode_cursor(raw)
    elif name == "_sort":
        sort = []
        for item in _split_values(raw):
            descending = item.startswith("-")
            field_name = item.lstrip("-")
            if field_name not in SORTS:
                raise BadRequest(
                    MSG_BAD_VALUE.format(name="_sort", value=raw), detail_code="MSG_SORT_UNKNOWN"
                )
            sort.append((field_name, descending))
        if all(f != "_id" for f, _ in sort):
            sort.append(("_id", sort[-1][1] if sort else False))
        spec.sort = sort
    elif name == "_total":
        if raw not in ("none", "estimate", "accurate"):
            raise BadRequest(
                MSG_BAD_VALUE.format(name="_total", value=raw), detail_code="MSG_PARAM_INVALID"
            )
        spec.total = raw
    elif name == "_summary":
        if raw not in ("true", "false", "text", "data", "count"):
            raise BadRequest(
                MSG_BAD_VALUE.format(name="_summary", value=raw), detail_code="MSG_PARAM_INVALID"
            )
        spec.summary = raw
    elif name == "_elements":
        spec.elements = [e.strip() for e in raw.split(",") if e.strip()]


def _base_queryset(spec: SearchSpec) -> QuerySet[StoredResource]:
    # Only what the caller's organization boundary lets it see (fhirservice.access): search,
    # conditional create/update and conditional references all start here.
    queryset = StoredResource.objects.filter(
        visible_q(), resource_type=spec.resource_type, deleted=False
    )
    for condition in spec.filters:
        queryset = queryset.filter(condition)
    return queryset


def _sort_value(row: StoredResource, field_name: str) -> Any:
    value = getattr(row, SORTS[field_name])
    return value.isoformat() if isinstance(value, datetime) else value


def _after_cursor(spec: SearchSpec, cursor: list[Any]) -> Q:
    """Rows strictly after the cursor in the spec's order (lexicographic keyset condition)."""
    if len(cursor) != len(spec.sort):
        raise BadRequest(MSG_BAD_CURSOR, detail_code="MSG_PARAM_INVALID")
    condition = Q(pk__in=[])
    equal = Q()
    for (field_name, descending), value in zip(spec.sort, cursor, strict=True):
        column = SORTS[field_name]
        if column == "last_updated":
            try:
                value = datetime.fromisoformat(value)
            except (TypeError, ValueError) as exc:
                raise BadRequest(MSG_BAD_CURSOR, detail_code="MSG_PARAM_INVALID") from exc
        step = Q(**{f"{column}__{'lt' if descending else 'gt'}": value})
        condition |= equal & step
        equal &= Q(**{column: value})
    return condition


def run_search(spec: SearchSpec) -> SearchPage:
    """Execute a SearchSpec: one page of rows, the total, and the next page's cursor."""
    queryset = _base_queryset(spec)
    total = None
    if spec.total != "none" or spec.summary == "count":
        total = queryset.count()
    if spec.summary == "count" or spec.count == 0:
        return SearchPage(rows=[], total=total, next_cursor=None)
    ordering = [("-" if desc else "") + SORTS[name] for name, desc in spec.sort]
    paged = queryset.order_by(*ordering)
    if spec.cursor is not None:
        paged = paged.filter(_after_cursor(spec, spec.cursor))
    rows = list(paged[: spec.count + 1])
    next_cursor = None
    if len(rows) > spec.count:
        rows = rows[: spec.count]
        last = rows[-1]
        next_cursor = encode_cursor([_sort_value(last, name) for name, _ in spec.sort])
    return SearchPage(rows=rows, total=total, next_cursor=next_cursor)


def search_keys(resource_type: str, query: str, *, limit: int) -> list[str]:
    """Keys of resources matching a query string (conditional create/references), strictly."""
    pairs = parse_qsl(query.lstrip("?"), keep_blank_values=True)
    spec = parse_search(resource_type, pairs, strict=True)
    if not spec.filters:
        raise BadRequest(
            MSG_BAD_VALUE.format(name="condition", value=query), detail_code="MSG_PARAM_INVALID"
        )
    return list(_base_queryset(spec).order_by("key").values_list("key", flat=True)[:limit])
