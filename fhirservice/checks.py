"""Django system checks for the backend configuration (``manage.py check``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks

from fhirservice.clickhouse.migrations import MSG_CHDB_CLUSTER, on_cluster_clause
from fhirservice.conf import valid_clickhouse_url

SUPPORTED_ENGINES = {
    "django.db.backends.sqlite3": "SQLite",
    "django.db.backends.postgresql": "PostgreSQL",
    # What settings put in place of Django's PostgreSQL backend (its health check differs).
    "fhirservice.pgbackend": "PostgreSQL",
    "django_mongodb_backend": "MongoDB",
}


@checks.register(checks.Tags.database)
def check_metadata_store(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The metadata store must be one of the backends we test against."""
    engine = settings.DATABASES["default"]["ENGINE"]
    if engine not in SUPPORTED_ENGINES:
        return [
            checks.Error(
                f"DATABASE_URL selects {engine}, which this service does not support",
                hint="Use sqlite:///path, postgres://user:pass@host:port/db or set MONGODB_URI",
                id="fhirservice.E001",
            )
        ]
    if engine == "django.db.backends.sqlite3" and settings.DATABASES["default"]["NAME"] in (
        ":memory:",
        "",
    ):
        return [
            checks.Warning("SQLite in memory loses every resource at exit", id="fhirservice.W001")
        ]
    return []


@checks.register()
def check_clickhouse_url(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """CLICKHOUSE_URL must name chdb (an absolute path) or a ClickHouse server."""
    url = getattr(settings, "CLICKHOUSE_URL", "")
    if valid_clickhouse_url(url):
        return []
    return [
        checks.Error(
            f"CLICKHOUSE_URL {url!r} is neither chdb:///abs/path nor clickhouse://host:port/db",
            id="fhirservice.E002",
        )
    ]


@checks.register()
def check_clickhouse_cluster(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """CLICKHOUSE_CLUSTER, when set, is a plain cluster name on a ClickHouse server."""
    cluster = getattr(settings, "CLICKHOUSE_CLUSTER", None)
    if not cluster:
        return []
    try:
        on_cluster_clause(cluster)
    except ValueError as exc:
        return [checks.Error(f"CLICKHOUSE_CLUSTER: {exc}", id="fhirservice.E004")]
    if getattr(settings, "CLICKHOUSE_URL", "").startswith("chdb://"):
        return [checks.Error(MSG_CHDB_CLUSTER, id="fhirservice.E004")]
    return []


@checks.register()
def check_embedded_workers(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """chdb allows one process per data path: several gunicorn workers would fail to start."""
    import os

    url = getattr(settings, "CLICKHOUSE_URL", "")
    workers = os.environ.get("WEB_CONCURRENCY", "1")
    if url.startswith("chdb://") and workers.isdigit() and int(workers) > 1:
        return [
            checks.Error(
                "chdb (embedded ClickHouse) allows one worker process per path",
                hint="Set WEB_CONCURRENCY=1 or use a ClickHouse server",
                id="fhirservice.E003",
            )
        ]
    backend = settings.CACHES.get("default", {}).get("BACKEND", "")
    if workers.isdigit() and int(workers) > 1 and backend.endswith(".LocMemCache"):
        return [
            checks.Warning(
                "Each worker process counts throttled requests in its own local-memory cache",
                hint="Share one: CACHE_URL=dbcache://fhir_cache and manage.py createcachetable",
                id="fhirservice.W002",
            )
        ]
    return []
