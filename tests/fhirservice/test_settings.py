"""Service settings (``FHIR_SERVICE`` over ``fhirservice.conf.DEFAULTS``), the environment
variables that fill them, the configurable base path, and the backend system checks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, override_settings

import fhirservice.urls
from fhirservice import checks
from fhirservice.conf import DEFAULTS, fhir_settings

REPO = Path(__file__).resolve().parents[2]


# --- FHIR_SERVICE ------------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_set():
    with override_settings(FHIR_SERVICE={}):
        assert fhir_settings.BASE_PATH == "4_0_0"
        assert fhir_settings.MAX_BODY_BYTES == 512 * 1024 * 1024
        assert fhir_settings.UPDATE_CREATE is True
        assert fhir_settings.DEFAULT_COUNT == 50
        assert fhir_settings.MAX_COUNT == 1000
        fhir_settings.validate_all()
        assert {name: getattr(fhir_settings, name) for name in DEFAULTS} == DEFAULTS


def test_overrides_apply_and_are_dropped_afterwards():
    before = fhir_settings.MAX_COUNT
    with override_settings(FHIR_SERVICE={"MAX_COUNT": 7, "UPDATE_CREATE": False}):
        assert fhir_settings.MAX_COUNT == 7
        assert fhir_settings.UPDATE_CREATE is False
        assert fhir_settings.DEFAULT_COUNT == DEFAULTS["DEFAULT_COUNT"]
    assert fhir_settings.MAX_COUNT == before


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("BASE_PATH", "/4_0_0/"),
        ("BASE_PATH", "fhir r4"),
        ("BASE_PATH", ""),
        ("BASE_PATH", 4),
        ("MAX_BODY_BYTES", 0),
        ("MAX_BODY_BYTES", "1024"),
        ("UPDATE_CREATE", "yes"),
        ("UPDATE_CREATE", 1),
        ("DEFAULT_COUNT", 0),
        ("MAX_COUNT", -5),
        ("WRITE_RETRIES", -1),
        ("GROUP_ROSTER_STORAGE", "mongodb"),
        ("GROUP_PUT_KEEPS_ROSTER", None),
        ("MAX_PATCH_OPS", 2.5),
        ("MEMBER_BATCH_SIZE", 0),
    ],
)
def test_a_bad_value_is_improperly_configured_naming_the_key(key, value):
    with override_settings(FHIR_SERVICE={key: value}):
        with pytest.raises(ImproperlyConfigured) as info:
            getattr(fhir_settings, key)
        assert str(info.value) == f"FHIR_SERVICE[{key!r}] has a bad value: {value!r}"
        with pytest.raises(ImproperlyConfigured):
            fhir_settings.validate_all()


def test_an_unknown_key_is_improperly_configured():
    with override_settings(FHIR_SERVICE={"MAX_BODY_SIZE": 10}):
        with pytest.raises(ImproperlyConfigured) as info:
            fhir_settings.validate_all()
        assert str(info.value) == "FHIR_SERVICE has unknown keys: ['MAX_BODY_SIZE']"


def test_reading_an_unknown_setting_is_an_attribute_error():
    with pytest.raises(AttributeError):
        fhir_settings.NO_SUCH_SETTING  # noqa: B018


# --- environment variables ---------------------------------------------------------------


def run_django(tmp_path: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` after django.setup() in a fresh process with its own backends."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("FHIR_", "DATABASE_URL", "CLICKHOUSE_URL", "MONGODB"))
    }
    environment.update(
        {
            "DJANGO_SETTINGS_MODULE": "fhirservice.settings",
            "FHIR_VAR_DIR": str(tmp_path),
            "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
            "CLICKHOUSE_URL": f"chdb:///{tmp_path}/chdb",
            **env,
        }
    )
    script = f"import django\ndjango.setup()\n{code}"
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_environment_variables_fill_fhir_service(tmp_path):
    done = run_django(
        tmp_path,
        "from fhirservice.conf import fhir_settings as s\n"
        "print(s.BASE_PATH, s.MAX_BODY_BYTES, s.UPDATE_CREATE, s.GROUP_ROSTER_STORAGE,"
        " s.MAX_PATCH_OPS, s.DEFAULT_COUNT)",
        FHIR_BASE_PATH="fhir/r4",
        FHIR_MAX_BODY_BYTES="2048",
        FHIR_UPDATE_CREATE="false",
        FHIR_GROUP_ROSTER_STORAGE="inline",
        FHIR_MAX_PATCH_OPS="17",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["fhir/r4", "2048", "False", "inline", "17", "50"]


def test_a_bad_environment_value_stops_the_start(tmp_path):
    done = run_django(tmp_path, "print('started')", FHIR_GROUP_ROSTER_STORAGE="nowhere")
    assert done.returncode != 0
    assert "started" not in done.stdout
    assert "ImproperlyConfigured" in done.stderr
    assert "GROUP_ROSTER_STORAGE" in done.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [("CLICKHOUSE_URL", "mysql://host/db"), ("CLICKHOUSE_CLUSTER", "two words")],
)
def test_a_bad_member_store_setting_stops_the_start(tmp_path, name, value):
    done = run_django(tmp_path, "print('started')", **{name: value})
    assert done.returncode != 0
    assert "started" not in done.stdout
    assert f"ImproperlyConfigured: {name} has a bad value" in done.stderr


def test_backend_urls_choose_the_backends(tmp_path):
    code = (
        "from django.conf import settings as s\n"
        "d = s.DATABASES['default']\n"
        "print(d['ENGINE'], d['NAME'], d.get('HOST', ''), d.get('PORT', ''), s.CLICKHOUSE_URL)"
    )
    sqlite = run_django(tmp_path, code)
    assert sqlite.returncode == 0, sqlite.stderr
    assert sqlite.stdout.split() == [
        "django.db.backends.sqlite3",
        f"{tmp_path}/db.sqlite3",
        f"chdb:///{tmp_path}/chdb",
    ]
    postgres = run_django(
        tmp_path,
        code,
        DATABASE_URL="postgres://user:pw@db.example:5433/fhir",
        CLICKHOUSE_URL="clickhouse://default@ch.example:9000/fhir",
    )
    assert postgres.returncode == 0, postgres.stderr
    assert postgres.stdout.split() == [
        "fhirservice.pgbackend",
        "fhir",
        "db.example",
        "5433",
        "clickhouse://default@ch.example:9000/fhir",
    ]


# --- base path ---------------------------------------------------------------------------


@pytest.fixture
def base_path_urls():
    """The project's URL module built again under BASE_PATH "fhir/r4", as ROOT_URLCONF."""
    name = "fhirservice_urls_fhir_r4"
    with override_settings(FHIR_SERVICE={"BASE_PATH": "fhir/r4"}):
        spec = importlib.util.spec_from_file_location(name, fhirservice.urls.__file__)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
        try:
            with override_settings(ROOT_URLCONF=name):
                yield
        finally:
            del sys.modules[name]


def test_the_base_path_is_configurable(db, base_path_urls):
    client = Client()
    metadata = client.get("/fhir/r4/metadata")
    assert metadata.status_code == 200
    assert metadata.json()["implementation"]["url"] == "http://testserver/fhir/r4"
    created = client.post(
        "/fhir/r4/Patient", {"resourceType": "Patient"}, content_type="application/fhir+json"
    )
    assert created.status_code == 201
    rid = created.json()["id"]
    assert created["Location"] == f"http://testserver/fhir/r4/Patient/{rid}/_history/1"
    assert client.get(f"/fhir/r4/Patient/{rid}").status_code == 200
    transaction = client.post(
        "/fhir/r4",
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"request": {"method": "GET", "url": f"Patient/{rid}"}}],
        },
        content_type="application/fhir+json",
    )
    assert transaction.status_code == 200, transaction.content
    assert transaction.json()["entry"][0]["resource"]["id"] == rid
    unknown = client.get("/fhir/r4/nothing/here/at/all")
    assert unknown.status_code == 404
    assert unknown.json()["resourceType"] == "OperationOutcome"
    assert client.get("/4_0_0/metadata").status_code == 404


# --- system checks -----------------------------------------------------------------------


def check_ids(messages) -> list[str]:
    return [message.id for message in messages]


@pytest.mark.parametrize(
    ("engine", "name", "expected"),
    [
        ("django.db.backends.sqlite3", "/var/db.sqlite3", []),
        ("django.db.backends.sqlite3", ":memory:", ["fhirservice.W001"]),
        ("django.db.backends.postgresql", "fhir", []),
        ("fhirservice.pgbackend", "fhir", []),
        ("django_mongodb_backend", "fhir", []),
        ("django.db.backends.mysql", "fhir", ["fhirservice.E001"]),
        ("django.db.backends.oracle", "fhir", ["fhirservice.E001"]),
    ],
)
def test_metadata_store_check(monkeypatch, engine, name, expected):
    database = {**settings.DATABASES["default"], "ENGINE": engine, "NAME": name}
    monkeypatch.setattr(settings, "DATABASES", {"default": database})
    assert check_ids(checks.check_metadata_store()) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("chdb:///var/chdb", []),
        ("clickhouse://default@127.0.0.1:9000/fhir", []),
        ("chdb://relative/path", ["fhirservice.E002"]),
        ("clickhouse://", ["fhirservice.E002"]),
        ("mysql://host/db", ["fhirservice.E002"]),
        ("", ["fhirservice.E002"]),
    ],
)
def test_clickhouse_url_check(url, expected):
    with override_settings(CLICKHOUSE_URL=url):
        assert check_ids(checks.check_clickhouse_url()) == expected


LOCMEM = "django.core.cache.backends.locmem.LocMemCache"
DBCACHE = "django.core.cache.backends.db.DatabaseCache"


@pytest.mark.parametrize(
    ("url", "workers", "cache", "expected"),
    [
        ("chdb:///var/chdb", "1", LOCMEM, []),
        ("chdb:///var/chdb", "4", LOCMEM, ["fhirservice.E003"]),
        ("clickhouse://default@127.0.0.1:9000/fhir", "4", DBCACHE, []),
        # Each worker would count throttled requests on its own.
        ("clickhouse://default@127.0.0.1:9000/fhir", "4", LOCMEM, ["fhirservice.W002"]),
        ("clickhouse://default@127.0.0.1:9000/fhir", "1", LOCMEM, []),
    ],
)
def test_embedded_workers_check(monkeypatch, url, workers, cache, expected):
    monkeypatch.setenv("WEB_CONCURRENCY", workers)
    caches = {"default": {"BACKEND": cache, "LOCATION": "fhir_cache"}}
    with override_settings(CLICKHOUSE_URL=url, CACHES=caches):
        assert check_ids(checks.check_embedded_workers()) == expected


def test_manage_py_check_passes_on_the_defaults(tmp_path):
    done = run_django(
        tmp_path,
        "from django.core.management import call_command\n"
        "call_command('check', fail_level='WARNING')",
    )
    assert done.returncode == 0, done.stderr


SESSIONS = "django.contrib.sessions.middleware.SessionMiddleware"
AUTHENTICATION = "django.contrib.auth.middleware.AuthenticationMiddleware"
MESSAGES = "fhirservice.middleware.AdminMessageMiddleware"


@pytest.mark.parametrize(
    ("session_middleware", "runs", "expected"),
    [
        ([SESSIONS, AUTHENTICATION, MESSAGES], True, []),
        # The admin's needs, wherever they are listed: Django's own check looks in MIDDLEWARE.
        ([AUTHENTICATION, MESSAGES], True, ["fhirservice.E005"]),
        ([AUTHENTICATION, SESSIONS, MESSAGES], True, ["fhirservice.E005"]),
        ([SESSIONS, AUTHENTICATION], True, ["fhirservice.E005"]),
        ([SESSIONS, AUTHENTICATION, MESSAGES], False, ["fhirservice.E005"]),
    ],
)
def test_session_middleware_check(session_middleware, runs, expected):
    middleware = [
        item for item in settings.MIDDLEWARE if runs or item != checks.BROWSER_SESSION_MIDDLEWARE
    ]
    with override_settings(SESSION_MIDDLEWARE=session_middleware, MIDDLEWARE=middleware):
        assert check_ids(checks.check_session_middleware()) == expected
