"""Django settings, read from the environment (django-environ).

Backends are chosen by URL:

- ``DATABASE_URL``: the metadata store. ``sqlite:///path`` (embedded default) or
  ``postgres://user:pass@host:port/db``. ``MONGODB_URI`` switches to MongoDB through
  django-mongodb-backend instead.
- ``CLICKHOUSE_URL``: the member event store. ``chdb:///path`` (embedded default) or
  ``clickhouse://user:pass@host:port/db``. ``CLICKHOUSE_CLUSTER`` (a server's
  ``remote_servers`` name) makes ``migrate_clickhouse`` build replicated tables behind
  Distributed ones on every node of that cluster.

``FHIR_AUTH`` (``on``/``off``, default on) switches access control: OAuth2 bearer tokens with
SMART system scopes and per-organization data boundaries (``fhirservice.access``).

Service options live in the ``FHIR_SERVICE`` dict; see ``fhirservice.conf`` for the table of
defaults and how each value is validated.
"""

from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(environ.Env().str("FHIR_VAR_DIR", default=str(BASE_DIR / "var")))

env = environ.Env()

SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="insecure-development-key-change-me")
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "testserver"])

# TLS deployments: FHIR_HSTS_SECONDS > 0 sends Strict-Transport-Security on HTTPS answers and
# marks the admin's cookies Secure; FHIR_TLS_PROXY says a proxy terminates TLS and sets
# X-Forwarded-Proto (only behind a proxy that overwrites that header).
SECURE_HSTS_SECONDS = env.int("FHIR_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = SECURE_HSTS_SECONDS > 0
if env.bool("FHIR_TLS_PROXY", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_REFERRER_POLICY = "same-origin"  # no-referrer breaks the admin's CSRF (Origin: null)
X_FRAME_OPTIONS = "DENY"

MONGODB_URI = env.str("MONGODB_URI", default="")
USE_MONGODB = bool(MONGODB_URI)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "oauth2_provider",
    "fhirservice.access.apps.AccessConfig",
    "fhirservice.apps.FhirServiceConfig",
    "groups.apps.GroupsConfig",
    "operations.apps.OperationsConfig",
    "operations.export.apps.ExportConfig",
]

MIDDLEWARE = [
    # Outermost: the output format (JSON or XML) of FHIR answers, so that every answer below,
    # refusals and error pages included, is written in it.
    "fhirservice.rest.negotiation.FormatMiddleware",
    # Then security headers, and OperationOutcome bodies on every FHIR error answer
    # (Django's own error pages included), whatever fails inside.
    "fhirservice.middleware.HardeningMiddleware",
    # Request metrics (django-prometheus; see fhirservice.metrics), then the request id and
    # the request's log line, so both cover every answer, refusals included.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "fhirservice.middleware.RequestIdMiddleware",
    # Query limits before anything parses the query.
    "fhirservice.middleware.RequestLimitsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Serves STATIC_ROOT (the admin's CSS and scripts, gathered by collectstatic) from the
    # app server itself: gunicorn has no static file handler and no proxy is assumed.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "groups.middleware.GroupMemberEventsMiddleware",
    "django.middleware.common.CommonMiddleware",
    # SESSION_MIDDLEWARE below, which FHIR requests without a session cookie skip.
    "fhirservice.middleware.BrowserSessionMiddleware",
    # Innermost: latency and status by route, and the FHIR write counter.
    "fhirservice.metrics.RouteMetricsMiddleware",
]

# Browser sessions: the admin, and a staff user calling the API from its session. Run by
# fhirservice.middleware.BrowserSessionMiddleware in this order, as if listed in MIDDLEWARE.
SESSION_MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Django's, for the admin only (FHIR requests neither add nor show messages).
    "fhirservice.middleware.AdminMessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# The admin's check that its middleware is in MIDDLEWARE: fhirservice.checks E005 checks it
# in SESSION_MIDDLEWARE instead.
SILENCED_SYSTEM_CHECKS = ["admin.E408", "admin.E409", "admin.E410"]

ROOT_URLCONF = "fhirservice.urls"
WSGI_APPLICATION = "fhirservice.wsgi.application"
ASGI_APPLICATION = "fhirservice.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

if USE_MONGODB:
    import django_mongodb_backend

    DATABASES = {
        "default": django_mongodb_backend.parse_uri(
            MONGODB_URI, db_name=env.str("MONGODB_NAME", default="fhirservice")
        )
    }
    DEFAULT_AUTO_FIELD = "django_mongodb_backend.fields.ObjectIdAutoField"
    # django-mongodb-backend needs ObjectId-keyed migrations for Django's contrib apps.
    INSTALLED_APPS[:4] = [
        "fhirservice.mongo_apps.MongoAdminConfig",
        "fhirservice.mongo_apps.MongoAuthConfig",
        "fhirservice.mongo_apps.MongoContentTypesConfig",
        "django.contrib.sessions",
    ]
    MIGRATION_MODULES = {
        "admin": "mongo_migrations.admin",
        "auth": "mongo_migrations.auth",
        "contenttypes": "mongo_migrations.contenttypes",
    }
else:
    DATABASES = {
        "default": env.db_url(
            "DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'fhirservice.sqlite3'}"
        )
    }
    DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
    # Each server thread keeps its connection between requests (gunicorn's threads live as
    # long as the worker), checked before reuse. Opened and closed per request (Django's
    # default 0), it was 40% of a Patient create as served on SQLite (closing the last
    # connection checkpoints the write-ahead log) and a new session per request on
    # PostgreSQL. FHIR_DB_CONN_MAX_AGE=0 restores that.
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("FHIR_DB_CONN_MAX_AGE", default=600)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        # Django's, with a health check that polls the socket instead of sending SELECT 1
        # before each request's first query (a round trip per request).
        DATABASES["default"]["ENGINE"] = "fhirservice.pgbackend"
        # The per-request lookups as prepared statements, planned once per connection, at
        # their first run (the request threads' warm-up runs them; Django's own cursors
        # never prepare); off behind a transaction-mode pooler that cannot keep them
        # (pgbackend.base).
        if env.bool("FHIR_DB_PREPARED", default=True):
            DATABASES["default"].setdefault("OPTIONS", {}).setdefault("prepare_threshold", 0)
    if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
        # Writers wait for the lock instead of failing at once; WAL lets readers run beside
        # the single writer.
        DATABASES["default"].setdefault("OPTIONS", {}).update(
            {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            }
        )
        # A file, not Django's shared in-memory default: threads in tests then see real
        # SQLite locking, as a server would.
        DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test.sqlite3")}

CLICKHOUSE_URL = env.str("CLICKHOUSE_URL", default=f"chdb:///{VAR_DIR / 'chdb'}")
CLICKHOUSE_CLUSTER = env.str("CLICKHOUSE_CLUSTER", default="") or None

# The default cache holds the throttles' counts (failed token requests, per-client request
# rates). Local memory is per process: several app processes (gunicorn workers, instances)
# share counts through CACHE_URL=dbcache://fhir_cache (after `manage.py createcachetable`;
# PostgreSQL or SQLite) or a Redis/Memcached URL.
CACHES = {"default": env.cache_url("CACHE_URL", default="locmemcache://")}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Filled by ``manage.py collectstatic`` (scripts/serve.sh, the Docker image) and served by
# WhiteNoise. Beside the code, not under FHIR_VAR_DIR: the image builds it, and a volume
# mounted on the data directory would hide it.
STATIC_ROOT = BASE_DIR / "staticfiles"

# Django's default storages, plus "exports": where $export writes its NDJSON files (the file
# system under FHIR_VAR_DIR; an S3-compatible bucket through django-storages, see
# docs/export.md). The service serves the files itself, so the storage needs no public URL.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "exports": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(VAR_DIR / "exports")},
    },
}

# Large Group bodies are streamed by our own views; Django's own form-size guard stays for
# everything else.
DATA_UPLOAD_MAX_MEMORY_SIZE = None

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_RENDERER_CLASSES": [
        "fhirservice.rest.renderers.FhirJsonRenderer",
        "fhirservice.rest.renderers.FhirXmlRenderer",
    ],
    "DEFAULT_PARSER_CLASSES": [],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "fhirservice.rest.negotiation.FhirContentNegotiation",
    "EXCEPTION_HANDLER": "fhirservice.errors.exception_handler",
    # Off unless FHIR_SERVICE["THROTTLE_RATE"] is set (fhirservice.rest.limits).
    "DEFAULT_THROTTLE_CLASSES": ["fhirservice.rest.limits.ClientRateThrottle"],
}

# The token endpoint (/oauth/token/) issues client-credentials tokens only; which scopes a
# client may get comes from its ClientProfile (fhirservice.access.oauth).
OAUTH2_PROVIDER = {
    "ACCESS_TOKEN_EXPIRE_SECONDS": env.int("FHIR_TOKEN_SECONDS", default=3600),
    "SCOPES_BACKEND_CLASS": "fhirservice.access.oauth.ClientScopes",
    "OAUTH2_VALIDATOR_CLASS": "fhirservice.access.oauth.FhirOAuth2Validator",
    "ALLOWED_GRANT_TYPES": ["client_credentials"],
}
# Application is swappable: our ClientProfile migration resolves its dependency by this name.
OAUTH2_PROVIDER_APPLICATION_MODEL = "oauth2_provider.Application"


def _on_off(raw: str | None) -> bool | str | None:
    """``on``/``off`` as a bool; anything else is passed on for conf's validation to refuse."""
    if raw is None:
        return None
    return {"on": True, "off": False}.get(raw.strip().lower(), raw)


FHIR_SERVICE = {
    key: value
    for key, value in {
        "BASE_PATH": env.str("FHIR_BASE_PATH", default=None),
        "MAX_BODY_BYTES": env.int("FHIR_MAX_BODY_BYTES", default=None),
        "UPDATE_CREATE": env.bool("FHIR_UPDATE_CREATE", default=None),
        "CONDITIONAL_DELETE": env.str("FHIR_CONDITIONAL_DELETE", default=None),
        "CONDITIONAL_DELETE_MAX": env.int("FHIR_CONDITIONAL_DELETE_MAX", default=None),
        "GROUP_ROSTER_STORAGE": env.str("FHIR_GROUP_ROSTER_STORAGE", default=None),
        "MEMBER_SHIPPING": env.str("FHIR_MEMBER_SHIPPING", default=None),
        "MEMBER_DIGEST_ENTRIES": env.int("FHIR_MEMBER_DIGEST_ENTRIES", default=None),
        "GROUP_PUT_KEEPS_ROSTER": env.bool("FHIR_GROUP_PUT_KEEPS_ROSTER", default=None),
        "MAX_PATCH_OPS": env.int("FHIR_MAX_PATCH_OPS", default=None),
        "MAX_JSON_DEPTH": env.int("FHIR_MAX_JSON_DEPTH", default=None),
        "MAX_QUERY_PARAMS": env.int("FHIR_MAX_QUERY_PARAMS", default=None),
        "MAX_QUERY_VALUE_LENGTH": env.int("FHIR_MAX_QUERY_VALUE_LENGTH", default=None),
        "MAX_BUNDLE_ENTRIES": env.int("FHIR_MAX_BUNDLE_ENTRIES", default=None),
        "MAX_RESOURCE_BYTES": env.int("FHIR_MAX_RESOURCE_BYTES", default=None),
        "MAX_ARRAY_ITEMS": env.int("FHIR_MAX_ARRAY_ITEMS", default=None),
        "MEMBER_SHIP_INTERVAL": env.float("FHIR_MEMBER_SHIP_INTERVAL", default=None),
        "MEMBER_RELAY_INTERVAL": env.float("FHIR_MEMBER_RELAY_INTERVAL", default=None),
        "MEMBER_RELAY_MAX_INTERVAL": env.float("FHIR_MEMBER_RELAY_MAX_INTERVAL", default=None),
        "MEMBER_SHUTDOWN_WAIT": env.float("FHIR_MEMBER_SHUTDOWN_WAIT", default=None),
        "THROTTLE_RATE": env.str("FHIR_THROTTLE_RATE", default="").strip() or None,
        "AUTH": _on_off(env.str("FHIR_AUTH", default=None)),
        "TOKEN_FAILURES_PER_MINUTE": env.int("FHIR_TOKEN_FAILURES_PER_MINUTE", default=None),
        "UNAVAILABLE_RETRY_AFTER": env.int("FHIR_UNAVAILABLE_RETRY_AFTER", default=None),
        "UNAVAILABLE_LOG_INTERVAL": env.float("FHIR_UNAVAILABLE_LOG_INTERVAL", default=None),
        "REQUIRED_BINDINGS": _on_off(env.str("FHIR_REQUIRED_BINDINGS", default=None)),
        "JWKS_CACHE_SECONDS": env.int("FHIR_JWKS_CACHE_SECONDS", default=None),
        "JWKS_FETCH_TIMEOUT": env.float("FHIR_JWKS_FETCH_TIMEOUT", default=None),
        "JWKS_ALLOW_HTTP_LOOPBACK": env.bool("FHIR_JWKS_ALLOW_HTTP_LOOPBACK", default=None),
    }.items()
    if value is not None
}

# Request lines (fhirservice.requests): one JSON object per line on stderr, at INFO whatever
# LOG_LEVEL says (FHIR_REQUEST_LOG=off drops them); docs/operators.md describes the fields.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "message": {"format": "%(message)s"},
    },
    "filters": {
        "no_traceback": {"()": "fhirservice.middleware.NoTracebackFilter"},
        "store_errors": {"()": "fhirservice.errorlog.StoreErrorLogFilter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        # Written on a thread of its own: the request thread only queues its line.
        "requests": {
            "class": "fhirservice.middleware.BackgroundStreamHandler",
            "formatter": "message",
        },
    },
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="WARNING")},
    "loggers": {
        # The driver logs a traceback per failed connect; ClickHouseUnavailable already says it.
        "clickhouse_driver": {"level": "ERROR"},
        "fhirservice.requests": {
            "handlers": ["requests"],
            "level": "INFO" if env.bool("FHIR_REQUEST_LOG", default=True) else "WARNING",
            "propagate": False,
        },
        # A client's bad Host header: one line, no traceback (the answer is a 400 outcome).
        "django.security.DisallowedHost": {"filters": ["no_traceback"]},
        # A request that met a store down: one line naming it, no traceback, and during an
        # outage at most one such line per FHIR_UNAVAILABLE_LOG_INTERVAL (with a count).
        "django.request": {"filters": ["store_errors"]},
    },
}
