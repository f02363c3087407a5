"""Fixtures of the hardening tests: access control off, the member event tables present.

These tests throw hostile requests at the API itself; who may send them is the access
tests' business (``tests/access``), so they run with ``AUTH`` off.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.cache import cache

from fhirservice.clickhouse import get_clickhouse
from fhirservice.clickhouse import migrations as ch_migrations
from fhirservice.conf import DEFAULTS


@pytest.fixture(scope="session", autouse=True)
def hardening_clickhouse_schema(django_db_blocker: Any) -> None:
    """The member event tables exist (chdb migrates itself; a server is migrated here)."""
    with django_db_blocker.unblock():
        ch_migrations.apply(get_clickhouse())


@pytest.fixture(autouse=True)
def service_settings(settings: Any) -> dict[str, Any]:
    """``FHIR_SERVICE`` with access control off; tests add their limits to it."""
    service = dict(settings.FHIR_SERVICE)
    if "AUTH" in DEFAULTS:
        service["AUTH"] = False
    settings.FHIR_SERVICE = service
    cache.clear()
    return service


@pytest.fixture
def limits(settings: Any, service_settings: dict[str, Any]) -> Any:
    """``limits(MAX_COUNT=2, …)`` sets service settings for the rest of the test."""

    def apply(**values: Any) -> None:
        settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, **values}

    return apply
