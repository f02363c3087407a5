"""Versioned, idempotent schema migrations for the ClickHouse member event store.

Django's migration framework does not reach ClickHouse, so apps declare their ClickHouse
schema here. An installed app may have a module ``<app>/clickhouse_migrations.py``::

    from fhirservice.clickhouse.migrations import Migration

    MIGRATIONS = [
        Migration("groups", "0001_member_events", [
            "CREATE TABLE IF NOT EXISTS Group_4_0_0_MemberEvents{on_cluster} (...) "
            "ENGINE = MergeTree ORDER BY (...)",
        ]),
    ]

Rules:

- Migrations run in ``INSTALLED_APPS`` order, and within an app in list order. A migration
  that ran is recorded in ``fhir_schema_migrations`` by (app, name) and never runs again;
  never edit or rename one that has shipped: add a new one.
- Every statement must itself be idempotent (``CREATE TABLE IF NOT EXISTS``,
  ``ALTER TABLE … ADD COLUMN IF NOT EXISTS`` on servers that know it, ``DROP … IF EXISTS``):
  a crash between a statement and the record, or two processes migrating at once, runs the
  statements again.
- Statements follow the SQL subset that also runs on ClickHouse 18.16 (see ``docs/adr``).
- ``{on_cluster}`` in a statement becomes `` ON CLUSTER `name` `` when the optional Django
  setting ``CLICKHOUSE_CLUSTER`` names a cluster (default ``None``: single node, the
  placeholder becomes empty). With a cluster, DDL runs on every node, while the records
  live on the node we are connected to; another node's first ``apply`` re-runs the
  idempotent statements and records them there. No other braces are touched, so statements
  need no escaping.

Chdb stores are migrated automatically on first use (``get_clickhouse``); servers by
``manage.py migrate_clickhouse``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.util
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import ClickHouseClient

RECORD_TABLE = "fhir_schema_migrations"
MODULE_NAME = "clickhouse_migrations"
ON_CLUSTER = "{on_cluster}"

_CLUSTER_NAME = re.compile(r"[A-Za-z0-9_.\-]+")

_RECORD_TABLE_DDL = (
    f"CREATE TABLE IF NOT EXISTS {RECORD_TABLE}{ON_CLUSTER} "
    "(app String, name String, applied_at DateTime) ENGINE = MergeTree ORDER BY (app, name)"
)


@dataclass(frozen=True)
class Migration:
    """One named step of an app's ClickHouse schema: statements run in order."""

    app: str
    name: str
    statements: list[str] = field(hash=False)

    def __post_init__(self) -> None:
        if not self.app or not self.name:
            raise ValueError("A ClickHouse migration needs an app and a name")
        if not self.statements or not all(
            isinstance(statement, str) and statement.strip() for statement in self.statements
        ):
            raise ValueError(f"Migration {self.key} needs a non-empty list of SQL statements")

    @property
    def key(self) -> tuple[str, str]:
        """The (app, name) pair recorded when the migration has run."""
        return (self.app, self.name)

    def sql(self, cluster: str | None = None) -> list[str]:
        """The statements with ``{on_cluster}`` filled in for ``cluster``."""
        return [
            statement.replace(ON_CLUSTER, on_cluster_clause(cluster))
            for statement in self.statements
        ]


def on_cluster_clause(cluster: str | None) -> str:
    """`` ON CLUSTER `name` `` for a cluster name, or ``''`` without one."""
    if not cluster:
        return ""
    if not _CLUSTER_NAME.fullmatch(cluster):
        raise ValueError(f"Not a ClickHouse cluster name: {cluster!r}")
    return f" ON CLUSTER `{cluster}`"


def configured_cluster() -> str | None:
    """``settings.CLICKHOUSE_CLUSTER`` when Django is configured, else ``None``."""
    from django.conf import settings

    if not settings.configured:
        return None
    return getattr(settings, "CLICKHOUSE_CLUSTER", None) or None


def collect() -> list[Migration]:
    """Every installed app's ``MIGRATIONS``, in ``INSTALLED_APPS`` order.

    Raises ``ImproperlyConfigured`` when a module lacks ``MIGRATIONS``, lists something that
    is not a ``Migration``, or repeats an (app, name) pair.
    """
    from django.apps import apps
    from django.core.exceptions import ImproperlyConfigured

    found: list[Migration] = []
    seen: set[tuple[str, str]] = set()
    for app_config in apps.get_app_configs():
        module_path = f"{app_config.name}.{MODULE_NAME}"
        # find_spec tells "no such module" apart from an import error inside the module,
        # which must surface.
        if importlib.util.find_spec(module_path) is None:
            continue
        module = importlib.import_module(module_path)
        declared = getattr(module, "MIGRATIONS", None)
        if not isinstance(declared, list | tuple):
            raise ImproperlyConfigured(f"{module_path} must define a list MIGRATIONS")
        for migration in declared:
            if not isinstance(migration, Migration):
                raise ImproperlyConfigured(f"{module_path}.MIGRATIONS holds {migration!r}")
            if migration.key in seen:
                raise ImproperlyConfigured(
                    f"ClickHouse migration {migration.key} is declared twice"
                )
            seen.add(migration.key)
            found.append(migration)
    return found


def applied(client: ClickHouseClient) -> set[tuple[str, str]]:
    """The (app, name) pairs recorded as applied; empty before the record table exists."""
    if not client.table_exists(RECORD_TABLE):
        return set()
    rows = client.execute("SELECT app, name FROM fhir_schema_migrations")
    return {(app, name) for app, name in rows}


def pending(
    client: ClickHouseClient, migrations: Iterable[Migration] | None = None
) -> list[Migration]:
    """The migrations (default: ``collect()``) that have not been recorded yet."""
    done = applied(client)
    return [m for m in (collect() if migrations is None else migrations) if m.key not in done]


def apply(
    client: ClickHouseClient,
    *,
    dry_run: bool = False,
    migrations: Iterable[Migration] | None = None,
    cluster: str | None = None,
) -> list[Migration]:
    """Run pending migrations in order and record each; return those run (or due).

    ``migrations`` defaults to ``collect()``; ``cluster`` defaults (``None``) to
    ``CLICKHOUSE_CLUSTER``, and ``""`` means no cluster whatever the setting. The record
    table is created when missing. With ``dry_run`` nothing is created or run: the result
    lists what would run. A failing statement stops the run; the migrations before it stay
    recorded.
    """
    if cluster is None:
        cluster = configured_cluster()
    clause = on_cluster_clause(cluster)
    if dry_run:
        return pending(client, migrations)
    client.command(_RECORD_TABLE_DDL.replace(ON_CLUSTER, clause))
    to_run = pending(client, migrations)
    for migration in to_run:
        for statement in migration.sql(cluster):
            client.command(statement)
        client.insert(
            RECORD_TABLE,
            ["app", "name", "applied_at"],
            [(migration.app, migration.name, dt.datetime.now(dt.UTC))],
        )
    return to_run
