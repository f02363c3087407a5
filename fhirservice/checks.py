"""Django system checks for the backend configuration and the middleware (``manage.py
check``)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

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


# What the admin needs among the browser-session middleware (Django's own check, admin.E408
# to E410, looks in MIDDLEWARE only and is silenced in settings), in this order.
ADMIN_SESSION_MIDDLEWARE = (
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
)
BROWSER_SESSION_MIDDLEWARE = "fhirservice.middleware.BrowserSessionMiddleware"
MSG_SESSION_MIDDLEWARE = (
    "SESSION_MIDDLEWARE must list {needed} (or a subclass) after {previous}, and MIDDLEWARE "
    "must list fhirservice.middleware.BrowserSessionMiddleware, which runs it: the admin "
    "needs it"
)


@checks.register()
def check_session_middleware(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """The admin's sessions, authentication and messages run, inside
    ``BrowserSessionMiddleware`` (admin.E408-E410 for the middleware it runs)."""
    listed = [import_string(path) for path in getattr(settings, "SESSION_MIDDLEWARE", [])]
    runs = BROWSER_SESSION_MIDDLEWARE in settings.MIDDLEWARE
    position = -1
    previous = "its start"
    for needed in ADMIN_SESSION_MIDDLEWARE:
        cls = import_string(needed)
        found = next(
            (i for i, item in enumerate(listed) if i > position and issubclass(item, cls)), None
        )
        if found is None or not runs:
            text = MSG_SESSION_MIDDLEWARE.format(needed=needed, previous=previous)
            return [checks.Error(text, id="fhirservice.E005")]
        position, previous = found, needed
    return []
