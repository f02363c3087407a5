"""Service settings: one namespaced dict, ``settings.FHIR_SERVICE``, over a table of defaults.

Read values through ``fhir_settings.NAME``. Every value is validated when first read; a bad
value raises ``ImproperlyConfigured`` naming the key, so a misconfigured server never starts
serving. Tests change values with ``override_settings(FHIR_SERVICE={...})``; the cache is
dropped on ``setting_changed``.
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
    # Default and largest page size for searches and history.
    "DEFAULT_COUNT": 50,
    "MAX_COUNT": 1000,
    # How many times a write retries after losing a version race before answering 409.
    "WRITE_RETRIES": 100,
    # Where Group rosters live: "clickhouse" (member event stream) or "inline" (in the body).
    "GROUP_ROSTER_STORAGE": "clickhouse",
    # PUT of a Group without `member` keeps its roster (seed-system clients) instead of
    # emptying it (the FHIR rule).
    "GROUP_PUT_KEEPS_ROSTER": False,
    # Most operations one JSON Patch (of any resource) may carry; more answer 400 too-costly.
    "MAX_PATCH_OPS": 100_000,
    # Hardening (fhirservice.rest.limits). Deepest nesting of JSON arrays/objects in a body.
    "MAX_JSON_DEPTH": 100,
    # Most query parameters per request, and the longest decoded query value (characters).
    "MAX_QUERY_PARAMS": 100,
    "MAX_QUERY_VALUE_LENGTH": 4096,
    # Most entries in a Bundle body (transaction, batch or stored).
    "MAX_BUNDLE_ENTRIES": 10_000,
    # Requests per client and period ("600/min"; s, min, hour, day); None: no throttle.
    "THROTTLE_RATE": None,
    # Events per outbox row and per ClickHouse insert.
    "MEMBER_BATCH_SIZE": 50_000,
    # Access control (env FHIR_AUTH=on/off): bearer tokens, SMART system scopes and
    # organization boundaries on every FHIR request. Off serves everyone as unrestricted.
    "AUTH": True,
    # Failed client authentications per minute at the token endpoints, per client id and per
    # remote address, before they answer 429 slow_down (fhirservice.access.oauth); 0: off.
    "TOKEN_FAILURES_PER_MINUTE": 20,
    # Who ships a write's member events after commit: "background" (a thread per process;
    # the response does not wait for ClickHouse) or "request" (the request, before answering).
    "MEMBER_SHIPPING": "background",
    # Roster digests (groups.digest): references kept per process, over all rosters, so that
    # writes skip the ClickHouse lookup of members a roster certainly does not hold (8 bytes
    # each; 0: off), and the largest roster digested inside a write (larger: in background).
    "MEMBER_DIGEST_ENTRIES": 4_000_000,
    "MEMBER_DIGEST_SYNC_MAX": 20_000,
    # The outbox relay of each server process (groups.shipping.Relay): seconds between its
    # rounds (0: none; run ``ship_member_events --loop`` instead), and the longest wait
    # between rounds while they fail (ClickHouse down), the wait doubling up to it.
    "MEMBER_RELAY_INTERVAL": 5.0,
    "MEMBER_RELAY_MAX_INTERVAL": 60.0,
}

_CHECKS: dict[str, Callable[[Any], bool]] = {
    "BASE_PATH": lambda v: (
        isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*", v)
    ),
    "MAX_BODY_BYTES": lambda v: isinstance(v, int) and v > 0,
    "UPDATE_CREATE": lambda v: isinstance(v, bool),
    "DEFAULT_COUNT": lambda v: isinstance(v, int) and v > 0,
    "MAX_COUNT": lambda v: isinstance(v, int) and v > 0,
    "WRITE_RETRIES": lambda v: isinstance(v, int) and v >= 0,
    "GROUP_ROSTER_STORAGE": lambda v: v in ("clickhouse", "inline"),
    "GROUP_PUT_KEEPS_ROSTER": lambda v: isinstance(v, bool),
    "MAX_PATCH_OPS": lambda v: isinstance(v, int) and v > 0,
    "MAX_JSON_DEPTH": lambda v: type(v) is int and 1 <= v <= 500,
    "MAX_QUERY_PARAMS": lambda v: type(v) is int and v > 0,
    "MAX_QUERY_VALUE_LENGTH": lambda v: type(v) is int and v > 0,
    "MAX_BUNDLE_ENTRIES": lambda v: type(v) is int and v > 0,
    "THROTTLE_RATE": lambda v: (
        v is None
        or (isinstance(v, str) and re.fullmatch(r"[1-9][0-9]*/(s|sec|min|minute|hour|day)", v))
    ),
    "MEMBER_BATCH_SIZE": lambda v: isinstance(v, int) and v > 0,
    "AUTH": lambda v: isinstance(v, bool),
    "TOKEN_FAILURES_PER_MINUTE": lambda v: type(v) is int and v >= 0,
    "MEMBER_SHIPPING": lambda v: v in ("background", "request"),
    "MEMBER_DIGEST_ENTRIES": lambda v: type(v) is int and v >= 0,
    "MEMBER_DIGEST_SYNC_MAX": lambda v: type(v) is int and v >= 0,
    "MEMBER_RELAY_INTERVAL": lambda v: isinstance(v, int | float) and v >= 0,
    "MEMBER_RELAY_MAX_INTERVAL": lambda v: isinstance(v, int | float) and v > 0,
}


class FhirSettings:
    """Attribute access to ``FHIR_SERVICE`` with defaults and validation."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
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

    def validate_all(self) -> None:
        """Read every setting once so that a bad value fails at start-up."""
        for name in DEFAULTS:
            getattr(self, name)

    def reload(self) -> None:
        """Forget cached values (after settings change in tests)."""
        self._cache.clear()


fhir_settings = FhirSettings()


def _reload(*, setting: str, **_: Any) -> None:
    if setting == "FHIR_SERVICE":
        fhir_settings.reload()


setting_changed.connect(_reload)
