"""Shared fixtures: the FHIR client, and which backend pair this run tests."""

from __future__ import annotations

import os

import pytest

from tests.support import FhirClient


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name the backend pair in the test run's header."""
    return [
        f"backends: DATABASE_URL={os.environ.get('DATABASE_URL', 'sqlite (default)')} "
        f"CLICKHOUSE_URL={os.environ.get('CLICKHOUSE_URL', 'chdb (default)')}"
    ]


@pytest.fixture
def api(db: None) -> FhirClient:
    """A FHIR client against a fresh database (each test in a rolled-back transaction)."""
    return FhirClient()


@pytest.fixture
def live_api(transactional_db: None) -> FhirClient:
    """A FHIR client whose writes really commit (for threads and on-commit hooks)."""
    return FhirClient()
