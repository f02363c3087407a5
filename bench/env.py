"""Django set-up for the benchmark, and what it prints about backends and machine."""

from __future__ import annotations

import io
import os
import platform
import sys


def setup(*, migrate: bool = True) -> None:
    """``django.setup()`` (unless already done) and both stores' migrations."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fhirservice.settings")
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()
    if migrate:
        from django.core.management import call_command

        call_command("migrate", interactive=False, verbosity=0)
        call_command("migrate_clickhouse", verbosity=0, stdout=io.StringIO())


def metadata_backend() -> str:
    """The metadata store: vendor, version and where (no password)."""
    from django.conf import settings
    from django.db import connection

    config = settings.DATABASES["default"]
    vendor = connection.vendor
    if vendor == "sqlite":
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version} ({config['NAME']})"
    if vendor == "postgresql":
        connection.ensure_connection()
        version = connection.pg_version
        major, minor = version // 10000, version % 10000
        where = f"{config.get('HOST') or 'localhost'}:{config.get('PORT') or 5432}/{config['NAME']}"
        return f"PostgreSQL {major}.{minor} ({where})"
    return f"{vendor} ({config.get('NAME')})"


def member_backend() -> str:
    """The member event store: chdb or server, version and URL (no password)."""
    from fhirservice.clickhouse import get_clickhouse
    from fhirservice.clickhouse.backends import ChdbClient

    client = get_clickhouse()
    kind = "chdb (embedded)" if isinstance(client, ChdbClient) else "ClickHouse server"
    version = ".".join(str(part) for part in client.server_version)
    return f"{kind} {version} ({client.url_for_logs})"


def machine() -> str:
    """CPUs, load average and Python: the context every number needs on a shared box."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        f"(1/5/15 min), Python {platform.python_version()} on {sys.platform}"
    )


def load_average() -> float:
    """The 1-minute load average (nan where unknown)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def database_url() -> str | None:
    """The metadata database this process really uses, as a ``DATABASE_URL`` for the server.

    Under pytest that is the test database, not the one the environment names. None for
    MongoDB (the server reads ``MONGODB_URI`` as this process does).
    """
    from urllib.parse import quote

    from django.db import connection

    config = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{config['NAME']}"
    if connection.vendor == "postgresql":
        user = quote(config.get("USER") or "", safe="")
        password = quote(config.get("PASSWORD") or "", safe="")
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = config.get("HOST") or "localhost"
        port = f":{config['PORT']}" if config.get("PORT") else ""
        return f"postgres://{auth}{host}{port}/{config['NAME']}"
    return None
