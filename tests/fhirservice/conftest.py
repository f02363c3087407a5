"""Fixtures of the core's tests: stores that cannot be reached."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from django.test import override_settings


def closed_port() -> int:
    """A loopback port where nothing listens (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def clickhouse_unreachable() -> Any:
    """ClickHouse on a loopback port where nothing listens (connections refused)."""
    url = f"clickhouse://default@127.0.0.1:{closed_port()}/fhir_test?connect_timeout=1"
    return override_settings(CLICKHOUSE_URL=url)
