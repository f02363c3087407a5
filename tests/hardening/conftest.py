"""Fixtures of the hardening tests: access control off, the member event tables present.

These tests throw hostile requests at the API itself; who may send them is the access
tests' business (``tests/access``), so they run with ``AUTH`` off.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.core.cache import cache

from fhirservice.conf import DEFAULTS


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
