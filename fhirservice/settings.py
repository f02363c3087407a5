"""Django settings, read from the environment (django-environ).

Backends are chosen by URL:

- ``DATABASE_URL``: the metadata store. ``sqlite:///path`` (embedded default) or
  ``postgres://user:pass@host:port/db``. ``MONGODB_URI`` switches to MongoDB through
  django-mongodb-backend instead.
- ``CLICKHOUSE_URL``: the member event store. ``chdb:///path`` (embedded default) or
  ``clickhouse://user:pass@host:port/db``.

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
    "fhirservice.apps.FhirServiceConfig",
    "groups.apps.GroupsConfig",
    "operations.apps.OperationsConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "fhirservice.middleware.RequestIdMiddleware",
    "groups.middleware.GroupMemberEventsMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

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

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

# Large Group bodies are streamed by our own views; Django's own form-size guard stays for
# everything else.
DATA_UPLOAD_MAX_MEMORY_SIZE = None

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_RENDERER_CLASSES": ["fhirservice.rest.renderers.FhirJsonRenderer"],
    "DEFAULT_PARSER_CLASSES": [],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "fhirservice.rest.negotiation.FhirContentNegotiation",
    "EXCEPTION_HANDLER": "fhirservice.errors.exception_handler",
}

FHIR_SERVICE = {
    key: value
    for key, value in {
        "BASE_PATH": env.str("FHIR_BASE_PATH", default=None),
        "MAX_BODY_BYTES": env.int("FHIR_MAX_BODY_BYTES", default=None),
        "UPDATE_CREATE": env.bool("FHIR_UPDATE_CREATE", default=None),
        "GROUP_ROSTER_STORAGE": env.str("FHIR_GROUP_ROSTER_STORAGE", default=None),
        "GROUP_PUT_KEEPS_ROSTER": env.bool("FHIR_GROUP_PUT_KEEPS_ROSTER", default=None),
        "MAX_PATCH_OPS": env.int("FHIR_MAX_PATCH_OPS", default=None),
    }.items()
    if value is not None
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="WARNING")},
    # The driver logs a traceback per failed connect; ClickHouseUnavailable already says it.
    "loggers": {"clickhouse_driver": {"level": "ERROR"}},
}
