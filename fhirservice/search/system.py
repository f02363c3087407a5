"""System-level search: ``GET [base]?_type=Patient,Observation&…`` and ``GET [base]?…``.

http://hl7.org/fhir/R4/search.html#all: a search across types takes the parameters that every
type searched defines (with ``_type`` the listed types, each searched with its own definition
of the parameter; without it every type, so the parameters of ``Resource``: ``_id`` and
``_lastUpdated`` on the stored rows, ``_tag``, ``_profile``, ``_security`` and ``_source`` on
the index rows of every type, and ``_has``, whose references name their targets). A
parameter some listed type lacks is a 400 naming the types (ignored under
``Prefer: handling=lenient``); so are ``_text``, ``_content``, ``_query`` and ``_filter``
without ``_type``. Results are sorted by ``_id`` (the key ``Type/id``) or ``_lastUpdated``
and keyset-paged like a type search; ``_include``/``_revinclude`` and chains are per type
and are refused here. ``_has`` with ``_type`` is searched on each listed type (400 when the
reference cannot point at one of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db.models import Q, QuerySet

from fhirservice.access.boundaries import visible_q
from fhirservice.conf import fhir_settings
from fhirservice.errors import BadRequest
from fhirservice.fhir.resource_types import is_resource_type
from fhirservice.models import StoredResource
from fhirservice.search.chain import HAS, is_chain
from fhirservice.search.extract import UNSUPPORTED_PARAMS, search_params
from fhirservice.search.include import INCLUDE_PARAMS
from fhirservice.search.query import (
    ANY_TYPE,
    COLUMN_SORTS,
    RESULT_PARAMS,
    SearchNotSupported,
    SearchPage,
    SearchSpec,
    bounded_total,
    known_param,
    page_of,
    parse_search,
    result_param,
    total_bound,
)
from fhirservice.search.values import MAX_VALUE

MSG_TYPE_UNKNOWN = "_type names {value!r}, which is not a resource type"
MSG_PARAM_NOT_COMMON = (
    "Search parameter {name!r} is not defined for {types}; a search of several types takes "
    "the parameters every type searched defines"
)
MSG_ALL_TYPES_PARAM = (
    "A search of all types takes _id, _lastUpdated, _tag, _profile, _security, _source and "
    "_has; {name!r} needs _type naming the types"
)
MSG_SEVERAL_TYPES_UNSUPPORTED = "{name} is not supported in a search of several types"
MSG_SEVERAL_TYPES_SORT = "A search of several types sorts by _id or _lastUpdated: {value!r}"


@dataclass
class SystemSearch:
    """A parsed system search: the types (None: all), one filter, paging and options."""

    types: list[str] | None
    spec: SearchSpec
    condition: Q = field(default_factory=Q)


def parse_types(raw: list[str]) -> list[str] | None:
    """The types of ``_type`` (repeats and commas joined, in order); None when absent."""
    if not raw:
        return None
    types: list[str] = []
    for value in raw:
        for name in value.split(","):
            name = name.strip()
            if not is_resource_type(name):
                raise BadRequest(
                    MSG_TYPE_UNKNOWN.format(value=name), detail_code="MSG_PARAM_INVALID"
                )
            if name not in types:
                types.append(name)
    return types


def _base_name(name_mod: str) -> str:
    return name_mod.partition(":")[0]


def common_params() -> set[str]:
    """The parameters of ``Resource`` a search of all types answers (besides ``_has``): the
    columns and the indexed ones (``_tag``, ``_profile``, ``_security``, ``_source``)."""
    return set(COLUMN_SORTS) | {
        name
        for name, param in search_params(ANY_TYPE).items()
        if param.parts and param.type != "special" and name not in UNSUPPORTED_PARAMS
    }


def _check_param(name_mod: str, types: list[str] | None) -> str | None:
    """None when ``name_mod`` can be searched across ``types``; else the 400's text (or
    raises for what is refused whatever the handling)."""
    name = _base_name(name_mod)
    reverse_chain = name_mod.startswith(HAS)
    if name in INCLUDE_PARAMS or (is_chain(name_mod) and not reverse_chain):
        raise SearchNotSupported(MSG_SEVERAL_TYPES_UNSUPPORTED.format(name=name_mod))
    if reverse_chain:
        # Each listed type is searched with it (400 for a type its reference cannot reach).
        return None
    if types is None:
        if name in common_params():
            return None
        return MSG_ALL_TYPES_PARAM.format(name=name)
    missing = [t for t in types if name not in COLUMN_SORTS and known_param(t, name) is None]
    if missing:
        return MSG_PARAM_NOT_COMMON.format(name=name, types=", ".join(missing))
    return None


def parse_system_search(pairs: list[tuple[str, str]], *, strict: bool) -> SystemSearch:
    """Turn a system search's query pairs into one filter over StoredResource."""
    types = parse_types([raw for name, raw in pairs if name == "_type"])
    spec = SearchSpec(resource_type="", count=fhir_settings.DEFAULT_COUNT)
    criteria: list[tuple[str, str]] = []
    for name_mod, raw in pairs:
        name = _base_name(name_mod)
        if name == "_type":
            continue
        if name in RESULT_PARAMS:
            if name == "_sort" and any(
                item.lstrip("-") not in COLUMN_SORTS for item in raw.split(",")
            ):
                raise BadRequest(
                    MSG_SEVERAL_TYPES_SORT.format(value=raw), detail_code="MSG_SORT_UNKNOWN"
                )
            result_param(spec, name, raw)
            continue
        problem = _check_param(name_mod, types)
        if problem is not None:
            if strict:
                raise BadRequest(problem, detail_code="MSG_PARAM_UNKNOWN")
            spec.ignored.append(name_mod)
            continue
        criteria.append((name_mod, raw))
        spec.used.append((name_mod, raw))
    if types is None:
        condition = _all_types_condition(criteria, spec, strict=strict)
    else:
        condition = Q(pk__in=[])
        for resource_type in types:
            typed = parse_search(resource_type, criteria, strict=True)
            matches = Q(resource_type=resource_type)
            for part in typed.filters:
                matches &= part
            condition |= matches
    return SystemSearch(types=types, spec=spec, condition=condition)


def _all_types_condition(criteria: list[tuple[str, str]], spec: SearchSpec, *, strict: bool) -> Q:
    """The common parameters on every type: the same filters on every type's rows. A
    ``_has`` naming an unknown parameter is moved to ``spec.ignored`` when lenient."""
    condition = Q()
    for name_mod, raw in criteria:
        name, _, modifier = name_mod.partition(":")
        # Parsed as for one type (the checks and the filter are the same for all), then
        # freed of that type: _id matches the id whatever the type.
        typed = parse_search(ANY_TYPE, [(name_mod, raw)], strict=strict)
        if typed.ignored:
            spec.ignored.append(name_mod)
            spec.used.remove((name_mod, raw))
            continue
        if name == "_id" and modifier in ("", "not"):
            ids = Q(resource_id__in=[v[:MAX_VALUE] for v in raw.split(",")])
            condition &= ~ids if modifier == "not" else ids
        else:
            for part in typed.filters:
                condition &= part
    return condition


def system_queryset(search: SystemSearch) -> QuerySet[StoredResource]:
    """The current, visible resources the search matches."""
    queryset = StoredResource.objects.filter(visible_q(), deleted=False)
    if search.types is not None:
        queryset = queryset.filter(resource_type__in=search.types)
    return queryset.filter(search.condition)


def run_system_search(search: SystemSearch) -> SearchPage:
    """One page of a system search, its total and the next page's cursor."""
    queryset = system_queryset(search)
    spec = search.spec
    total = bounded_total(queryset, total_bound(spec))
    if spec.summary == "count" or spec.count == 0:
        return SearchPage(rows=[], total=total, next_cursor=None)
    return page_of(spec, queryset, total)
