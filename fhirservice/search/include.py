"""``_include`` and ``_revinclude``: the resources a search page refers to, or that refer to it.

Forms: ``Source:param``, ``Source:param:Target``, ``Source:*`` and (``_include`` only) ``*``;
``:iterate`` (R3's ``:recurse`` too) applies a directive to included resources as well, up to
``INCLUDE_ITERATE_DEPTH`` rounds.

Includes are resolved per page, after the matches: each directive is one query over the
page's keys (the reference rows of the index joined to the stored resources), never one per
row. What comes back is cut to what the caller may see: its organization boundary, and only
types its scopes let it read. Resources already in the Bundle are not repeated.

Group rosters are not in the index: ``Group:member`` asks the groups app (through the
plug-in registry) for members of the page's Groups, and ``_revinclude=Group:member`` for the
Groups that hold the page's resources. A page carries at most ``INCLUDE_MAX`` included
resources; beyond that the Bundle says so in a warning OperationOutcome entry (a roster of
10^6 members is not an include; page it with ``$members``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

from django.db.models import Q

from fhirservice.access import current
from fhirservice.access.boundaries import visible_q
from fhirservice.conf import fhir_settings
from fhirservice.errors import BadRequest
from fhirservice.fhir.resource_types import R4_RESOURCE_TYPES, is_resource_type
from fhirservice.models import SearchToken, StoredResource
from fhirservice.plugins import SearchParam, search_param, search_params
from fhirservice.search.chain import (
    UnknownChainParam,
    indexed_reference_params,
    is_indexed_reference,
    reference_targets,
    referring,
)

MSG_INCLUDE_FORM = "{name} takes Type:parameter, Type:parameter:TargetType or Type:*, not {value!r}"
MSG_INCLUDE_UNKNOWN = "{name}={value!r}: {type} has no reference search parameter {param!r}"
MSG_INCLUDE_TARGET = "{name}={value!r}: {type}.{param} does not refer to {target}"
MSG_REVINCLUDE_ANY = "_revinclude=* is not supported: name the type (Type:*)"
MSG_INCLUDE_MODIFIER = "{name} takes the modifier :iterate only, not {modifier!r}"
MSG_INCLUDES_CAPPED = (
    "Included resources were cut at {limit} for this page (INCLUDE_MAX); search the "
    "included type itself, or page a Group's roster with $members, for the rest"
)

INCLUDE_PARAMS = ("_include", "_revinclude")
ITERATE_MODIFIERS = ("iterate", "recurse")
ANY = "*"


@dataclass(frozen=True)
class Include:
    """One ``_include`` or ``_revinclude`` directive."""

    reverse: bool
    iterate: bool
    source: str | None  # the type holding the reference; None only for ``_include=*``
    param: str  # a reference parameter of ``source``, or ``*``
    target: str | None = None  # only references to this type


@dataclass
class Included:
    """What a page's directives added: resources in include order, and whether cut."""

    rows: list[StoredResource] = field(default_factory=list)
    capped: bool = False


def parse_include(name: str, modifier: str, raw: str, *, strict: bool) -> Include | None:
    """One directive from its query parameter; None when ignored (lenient handling of an
    unknown parameter). 400 for malformed ones."""
    if modifier and modifier not in ITERATE_MODIFIERS:
        raise BadRequest(
            MSG_INCLUDE_MODIFIER.format(name=name, modifier=modifier),
            detail_code="MSG_PARAM_MODIFIER_INVALID",
        )
    reverse = name == "_revinclude"
    iterate = bool(modifier)
    if raw == ANY:
        if reverse:
            raise BadRequest(MSG_REVINCLUDE_ANY, detail_code="MSG_PARAM_INVALID")
        return Include(reverse, iterate, None, ANY)
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not all(parts) or not is_resource_type(parts[0]):
        raise BadRequest(
            MSG_INCLUDE_FORM.format(name=name, value=raw), detail_code="MSG_PARAM_INVALID"
        )
    source, param = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if param == ANY:
        if target is not None and not is_resource_type(target):
            raise BadRequest(
                MSG_INCLUDE_FORM.format(name=name, value=raw), detail_code="MSG_PARAM_INVALID"
            )
        return Include(reverse, iterate, source, ANY, target)
    unknown = BadRequest(
        MSG_INCLUDE_UNKNOWN.format(name=name, value=raw, type=source, param=param),
        detail_code="MSG_PARAM_UNKNOWN",
    )
    try:
        targets = reference_targets(source, param)
    except UnknownChainParam as exc:
        if strict:
            raise unknown from exc
        return None
    if targets is None:
        raise unknown  # a parameter of another type: a mistake, whatever the handling
    if not _includable(source, param):
        if strict:
            raise unknown
        return None
    if target is not None and target not in targets:
        raise BadRequest(
            MSG_INCLUDE_TARGET.format(
                name=name, value=raw, type=source, param=param, target=target
            ),
            detail_code="MSG_PARAM_INVALID",
        )
    return Include(reverse, iterate, source, param, target)


def _app_param(source: str, param: str) -> SearchParam | None:
    """An app-answered reference parameter that can list the references it holds."""
    custom = search_param(source, param)
    return custom if custom is not None and custom.references is not None else None


def _includable(source: str, param: str) -> bool:
    return is_indexed_reference(source, param) or _app_param(source, param) is not None


def include_page(includes: list[Include], rows: list[StoredResource]) -> Included:
    """Resolve a page's directives: up to ``INCLUDE_MAX`` resources not already in ``rows``."""
    result = Included()
    if not includes or not rows:
        return result
    limit = fhir_settings.INCLUDE_MAX
    seen = {row.key for row in rows}
    frontier = rows
    for depth in range(fhir_settings.INCLUDE_ITERATE_DEPTH + 1):
        directives = includes if depth == 0 else [i for i in includes if i.iterate]
        added: list[StoredResource] = []
        for include in directives:
            room = limit - len(result.rows) - len(added)
            found = _resolve(include, frontier, _Window(seen, room + 1))
            if len(found) > room:
                found = found[:room]
                result.capped = True
            seen.update(r.key for r in found)
            added.extend(found)
            if result.capped:
                break
        result.rows.extend(added)
        if result.capped or not added:
            break
        frontier = added
    return result


def _readable(types: Iterable[str]) -> list[str]:
    """The types among ``types`` the caller's scopes let it read."""
    scopes = current().scopes
    return [t for t in types if scopes.allows(t, "r")]


@dataclass(frozen=True)
class _Window:
    """Which resources a directive may still add: not ``seen``, at most ``limit``."""

    seen: set[str]
    limit: int


def _stored(condition: Q, types: list[str], window: _Window) -> list[StoredResource]:
    """Visible current resources of ``types`` matching ``condition`` that are not in the
    Bundle yet, at most the window's limit, in key order."""
    if not types or window.limit <= 0:
        return []
    query = StoredResource.objects.filter(
        visible_q(), condition, resource_type__in=types, deleted=False
    ).exclude(key__in=list(window.seen))
    return list(query.order_by("key")[: window.limit])


def _resolve(
    include: Include, frontier: list[StoredResource], window: _Window
) -> list[StoredResource]:
    if include.reverse:
        return _reverse(include, frontier, window)
    return _forward(include, frontier, window)


def _forward(
    include: Include, frontier: list[StoredResource], window: _Window
) -> list[StoredResource]:
    """What the frontier's resources of the source type refer to (one query)."""
    sources = [r for r in frontier if include.source in (None, r.resource_type)]
    if not sources:
        return []
    if include.param != ANY and (custom := _app_param(sources[0].resource_type, include.param)):
        refs = custom.references(sources, window.limit + len(window.seen))
        targets = _targets(include, sources[0].resource_type)
        return _stored(Q(key__in=refs), _readable(targets), window)
    by_type: dict[str, list[str]] = {}
    for row in sources:
        by_type.setdefault(row.resource_type, []).append(row.key)
    rows_q = Q(pk__in=[])
    targets: set[str] = set()
    for source, keys in by_type.items():
        names = indexed_reference_params(source) if include.param == ANY else [include.param]
        if not names:
            continue
        rows_q |= Q(resource_type=source, param__in=names, resource_key__in=keys)
        for name in names:
            targets.update(_targets(include, source, name))
    values = SearchToken.objects.filter(rows_q).values("value")
    return _stored(Q(key__in=values), _readable(sorted(targets)), window)


def _reverse(
    include: Include, frontier: list[StoredResource], window: _Window
) -> list[StoredResource]:
    """The source type's resources that refer to the frontier's resources (one query)."""
    source = include.source
    assert source is not None  # parse_include refuses _revinclude=*
    keys = [r.key for r in frontier if include.target in (None, r.resource_type)]
    if not keys or not _readable([source]):
        return []
    if include.param != ANY and (custom := _app_param(source, include.param)):
        return _stored(custom.build(keys, ""), [source], window)
    names = indexed_reference_params(source) if include.param == ANY else [include.param]
    if not names:
        return []
    return _stored(Q(key__in=referring(source, names, keys)), [source], window)


def _targets(include: Include, source: str, name: str | None = None) -> list[str]:
    """The types a forward directive can include from ``source``."""
    if include.target is not None:
        return [include.target]
    return reference_targets(source, name or include.param) or []


# --- CapabilityStatement ------------------------------------------------------------------


def search_includes(resource_type: str) -> list[str]:
    """``searchInclude`` of a type: its includable reference parameters, and ``*``."""
    return [f"{resource_type}:{name}" for name in _includable_params(resource_type)] + [ANY]


def search_revincludes(resource_type: str) -> list[str]:
    """``searchRevInclude`` of a type: every includable parameter that can refer to it."""
    return _revincludes().get(resource_type, [])


def _includable_params(resource_type: str) -> list[str]:
    names = set(indexed_reference_params(resource_type))
    names.update(p.name for p in search_params(resource_type) if p.references is not None)
    return sorted(names)


@cache
def _revincludes() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for source in sorted(R4_RESOURCE_TYPES):
        for name in _includable_params(source):
            for target in reference_targets(source, name) or []:
                found.setdefault(target, []).append(f"{source}:{name}")
    return found
