"""Service settings: one namespaced dict, ``settings.FHIR_SERVICE``, over a table of defaults.

Read values through ``fhir_settings.NAME``. Every value is validated when first read; a bad
value raises ``ImproperlyConfigured`` naming the key, so a misconfigured server never starts
serving. The core's keys are below; an app declares its own with :func:`register` from a
``conf`` module that its ``apps`` module imports, so they exist before any ``ready()``
validates the namespace (the groups app: ``groups/conf.py``). The member store's
``CLICKHOUSE_URL`` and ``CLICKHOUSE_CLUSTER`` are read and validated here too (``TOP_LEVEL``).
Tests change values with ``override_settings(FHIR_SERVICE={...})``; the cache is dropped on
``setting_changed``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

DEFAULTS: dict[str, Any] = {
    # URL prefix of the FHIR API, without slashes.
    "BASE_PATH": "4_0_0",
    # Largest request body accepted (bytes); larger bodies answer 413.
    "MAX_BODY_BYTES": 512 * 1024 * 1024,
    # PUT on an unknown id creates the resource with that id (FHIR "update as create").
    "UPDATE_CREATE": True,
    # Conditional delete (DELETE [type]?[search]) when several resources match: "single"
    # answers 412, "multiple" deletes them all, at most CONDITIONAL_DELETE_MAX in one request
    # (more answer 412 and delete nothing). Declared in the CapabilityStatement.
    "CONDITIONAL_DELETE": "multiple",
    "CONDITIONAL_DELETE_MAX": 100,
    # Default and largest page size for searches and history.
    "DEFAULT_COUNT": 50,
    "MAX_COUNT": 1000,
    # How many times a write retries after losing a version race before answering 409.
    "WRITE_RETRIES": 100,
    # Most operations one JSON Patch (of any resource) may carry; more answer 400 too-costly.
    "MAX_PATCH_OPS": 100_000,
    # Hardening (fhirservice.rest.limits). Deepest nesting of JSON arrays/objects in a body.
    "MAX_JSON_DEPTH": 100,
    # Most query parameters per request, and the longest decoded query value (characters).
    "MAX_QUERY_PARAMS": 100,
    "MAX_QUERY_VALUE_LENGTH": 4096,
    # Most entries in a Bundle body (transaction, batch or stored).
    "MAX_BUNDLE_ENTRIES": 10_000,
    # Per resource (fhirservice.rest.limits): the largest resource body in bytes (a create
    # or update, each resource of a Bundle), and the most items in any one of its arrays (or
    # added to one by a JSON Patch). Group.member, the roster, is exempt from both. The
    # defaults admit every official R4 example (the largest: a 29.7 MB Bundle of definitions,
    # an ImplementationGuide listing 28,517 pages).
    "MAX_RESOURCE_BYTES": 32 * 1024 * 1024,
    "MAX_ARRAY_ITEMS": 50_000,
    # Requests per client and period ("600/min"; s, min, hour, day); None: no throttle.
    "THROTTLE_RATE": None,
    # Access control (env FHIR_AUTH=on/off): bearer tokens, SMART system scopes and
    # organization boundaries on every FHIR request. Off serves everyone as unrestricted.
    "AUTH": True,
    # Failed client authentications per minute at the token endpoints, per client id and per
    # remote address, before they answer 429 slow_down (fhirservice.access.oauth); 0: off.
    "TOKEN_FAILURES_PER_MINUTE": 20,
    # Retry-After (seconds) of a 503: a backing store is down, stopped or locked.
    "UNAVAILABLE_RETRY_AFTER": 5,
    # Seconds between two log lines of 503 answers (fhirservice.errorlog): an outage under
    # load logs its first 503 at once, then one line per interval with a count; 0: every one.
    "UNAVAILABLE_LOG_INTERVAL": 10.0,
    # _include/_revinclude (fhirservice.search.include): most included resources per search
    # page (more are cut, with a warning entry), and rounds of :iterate after the first.
    "INCLUDE_MAX": 1000,
    "INCLUDE_ITERATE_DEPTH": 3,
    # A search that does not ask for _total counts its matches only up to this many
    # (fhirservice.search.query): Bundle.total when there are no more, none when there are.
    # Counting 10^5 matches costs more than reading their first page; _total=accurate (or
    # estimate), _summary=count and _count=0 always count them all.
    "SEARCH_TOTAL_BOUND": 1000,
    # Writes must respect R4's required value-set bindings (fhirservice.fhir.bindings).
    # Off only to load data written before the rule; manage.py report_binding_violations
    # lists what stored data breaks it.
    "REQUIRED_BINDINGS": True,
    # SMART Backend Services (fhirservice.access.jwks): how long a client's JWKS fetched from
    # its JWKS URL is reused (seconds), how long a fetch may take (seconds), and whether
    # http:// JWKS URLs on a loopback host (127.0.0.1, ::1, localhost) are allowed besides
    # https:// (for tests and local development only).
    "JWKS_CACHE_SECONDS": 300,
    "JWKS_FETCH_TIMEOUT": 5.0,
    "JWKS_ALLOW_HTTP_LOOPBACK": False,
}

_CHECKS: dict[str, Callable[[Any], bool]] = {
    "BASE_PATH": lambda v: (
        isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*", v)
    ),
    "MAX_BODY_BYTES": lambda v: isinstance(v, int) and v > 0,
    "UPDATE_CREATE": lambda v: isinstance(v, bool),
    "CONDITIONAL_DELETE": lambda v: v in ("single", "multiple"),
    "CONDITIONAL_DELETE_MAX": lambda v: type(v) is int and v > 0,
    "DEFAULT_COUNT": lambda v: isinstance(v, int) and v > 0,
    "MAX_COUNT": lambda v: isinstance(v, int) and v > 0,
    "WRITE_RETRIES": lambda v: isinstance(v, int) and v >= 0,
    "MAX_PATCH_OPS": lambda v: isinstance(v, int) and v > 0,
    "MAX_JSON_DEPTH": lambda v: type(v) is int and 1 <= v <= 500,
    "MAX_QUERY_PARAMS": lambda v: type(v) is int and v > 0,
    "MAX_QUERY_VALUE_LENGTH": lambda v: type(v) is int and v > 0,
    "MAX_BUNDLE_ENTRIES": lambda v: type(v) is int and v > 0,
    "MAX_RESOURCE_BYTES": lambda v: type(v) is int and v > 0,
    "MAX_ARRAY_ITEMS": lambda v: type(v) is int and v > 0,
    "THROTTLE_RATE": lambda v: (
        v is None
        or (isinstance(v, str) and re.fullmatch(r"[1-9][0-9]*/(s|sec|min|minute|hour|day)", v))
    ),
    "AUTH": lambda v: isinstance(v, bool),
    "TOKEN_FAILURES_PER_MINUTE": lambda v: type(v) is int and v >= 0,
    "UNAVAILABLE_RETRY_AFTER": lambda v: type(v) is int and v >= 0,
    "UNAVAILABLE_LOG_INTERVAL": lambda v: type(v) in (int, float) and v >= 0,
    "INCLUDE_MAX": lambda v: type(v) is int and v >= 0,
    "INCLUDE_ITERATE_DEPTH": lambda v: type(v) is int and 0 <= v <= 10,
    "SEARCH_TOTAL_BOUND": lambda v: type(v) is int and v >= 0,
    "REQUIRED_BINDINGS": lambda v: isinstance(v, bool),
    "JWKS_CACHE_SECONDS": lambda v: type(v) is int and v >= 0,
    "JWKS_FETCH_TIMEOUT": lambda v: type(v) in (int, float) and 0 < v <= 60,
    "JWKS_ALLOW_HTTP_LOOPBACK": lambda v: isinstance(v, bool),
}


def register(defaults: dict[str, Any], checks: dict[str, Callable[[Any], bool]]) -> None:
    """Add an app's keys (their defaults and checks) to the namespace."""
    if set(defaults) != set(checks):
        raise ImproperlyConfigured(f"Settings without both a default and a check: {defaults}")
    clash = set(defaults) & set(DEFAULTS)
    if clash:
        raise ImproperlyConfigured(f"FHIR_SERVICE keys declared twice: {sorted(clash)}")
    DEFAULTS.update(defaults)
    _CHECKS.update(checks)


def valid_clickhouse_url(url: Any) -> bool:
    """``chdb:///abs/path`` (embedded) or ``clickhouse://…`` (a server)."""
    return isinstance(url, str) and (
        url.startswith("chdb:///")
        or (url.startswith("clickhouse://") and len(url) > len("clickhouse://"))
    )


# A ClickHouse cluster's name as DDL ``ON CLUSTER`` takes it (quoted, never from user input).
CLUSTER_NAME = re.compile(r"[A-Za-z0-9_.\-]+")

# The member store's settings stay top-level Django settings, filled from the environment
# variables of the same names (settings.py): ``override_settings(CLICKHOUSE_URL=…)`` switches
# the store. The namespace reads and validates them like its own keys.
TOP_LEVEL: dict[str, Callable[[Any], bool]] = {
    "CLICKHOUSE_URL": valid_clickhouse_url,
    "CLICKHOUSE_CLUSTER": lambda v: v is None or (isinstance(v, str) and CLUSTER_NAME.fullmatch(v)),
}


class FhirSettings:
    """Attribute access to ``FHIR_SERVICE`` (and ``TOP_LEVEL``) with defaults and validation."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name in TOP_LEVEL:
            return self._top_level(name)
        if name not in DEFAULTS:
            raise AttributeError(f"Unknown FHIR_SERVICE setting: {name!r}")
        if name not in self._cache:
            user = getattr(settings, "FHIR_SERVICE", {}) or {}
            unknown = set(user) - set(DEFAULTS)
            if unknown:
                raise ImproperlyConfigured(f"FHIR_SERVICE has unknown keys: {sorted(unknown)}")
            value = user.get(name, DEFAULTS[name])
            if not _CHECKS[name](value):
                raise ImproperlyConfigured(f"FHIR_SERVICE[{name!r}] has a bad value: {value!r}")
            self._cache[name] = value
        return self._cache[name]

    def _top_level(self, name: str) -> Any:
        if name not in self._cache:
            value = getattr(settings, name, None)
            if not TOP_LEVEL[name](value):
                raise ImproperlyConfigured(f"{name} has a bad value: {value!r}")
            self._cache[name] = value
        return self._cache[name]

    def validate_all(self) -> None:
        """Read every setting once so that a bad value fails at start-up."""
        for name in [*DEFAULTS, *TOP_LEVEL]:
            getattr(self, name)

    def reload(self) -> None:
        """Forget cached values (after settings change in tests)."""
        self._cache.clear()


fhir_settings = FhirSettings()


def _reload(*, setting: str, **_: Any) -> None:
    if setting == "FHIR_SERVICE" or setting in TOP_LEVEL:
        fhir_settings.reload()


setting_changed.connect(_reload)
