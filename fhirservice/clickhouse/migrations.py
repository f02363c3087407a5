"""Versioned, idempotent schema migrations for the ClickHouse member event store.

Django's migration framework does not reach ClickHouse, so apps declare their ClickHouse
schema here. An installed app may have a module ``<app>/clickhouse_migrations.py``::

    from fhirservice.clickhouse.migrations import Migration, ServedTable

    MIGRATIONS = [
        Migration("groups", "0001_member_events", [
            ServedTable("Group_4_0_0_MemberEvents", "roster_key String, ...",
                        "ReplacingMergeTree", "(roster_key, version, seq)",
                        "cityHash64(roster_key)"),
            "ALTER TABLE x{on_cluster} ...",
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
- Tables that serve reads and writes are declared as ``ServedTable`` and their materialized
  views as ``MaterializedView`` rather than as SQL text, because their DDL depends on the
  layout. On a single node (the optional Django setting ``CLICKHOUSE_CLUSTER`` unset, the
  default) a served table is a plain MergeTree-family table of its name. With
  ``CLICKHOUSE_CLUSTER`` naming a cluster (servers' ``remote_servers``), every node gets a
  ``Replicated…`` table ``<name>_local`` (coordinated by ZooKeeper, path
  ``/clickhouse/tables/{shard}/<database>/<name>``, the ``{shard}`` and ``{replica}`` macros
  from each server's config) and a ``Distributed`` table ``<name>`` over them, sharded by
  the table's ``shard_by``; reads and writes go through ``<name>`` unchanged, mutations and
  ``system`` tables name ``local_table(<name>)``. A view reads the local source and writes
  the local target, so each replica's insert feeds the replicated states next to it.
  Names are qualified with the database on a cluster: a distributed DDL runs on the other
  nodes in their default database otherwise. The layout is chosen when a database is first
  migrated: a database migrated on one node does not become a cluster's by setting
  ``CLICKHOUSE_CLUSTER`` later (its migrations are recorded as done).
- ``{on_cluster}`` in a plain statement becomes `` ON CLUSTER `name` `` with a cluster, and
  ``''`` without one; no other braces are touched, so statements need no escaping.

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

from fhirservice.conf import CLUSTER_NAME, fhir_settings

from . import ClickHouseClient

RECORD_TABLE = "fhir_schema_migrations"
MODULE_NAME = "clickhouse_migrations"
ON_CLUSTER = "{on_cluster}"
LOCAL_SUFFIX = "_local"

_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

MSG_CHDB_CLUSTER = "CLICKHOUSE_CLUSTER needs a ClickHouse server: chdb is one process on one node"


@dataclass(frozen=True)
class Layout:
    """Where the schema goes: one node (``cluster`` None) or every node of a cluster,
    in ``database``."""

    cluster: str | None = None
    database: str = "default"

    def __post_init__(self) -> None:
        on_cluster_clause(self.cluster)  # validates the name
        if not _PLAIN_NAME.fullmatch(self.database):
            raise ValueError(f"Not a plain ClickHouse database name: {self.database!r}")

    @property
    def on_cluster(self) -> str:
        """`` ON CLUSTER `name` ``, or ``''`` on a single node."""
        return on_cluster_clause(self.cluster)

    def qualified(self, table: str) -> str:
        """``table`` as DDL names it: qualified with the database on a cluster."""
        return f"`{self.database}`.`{table}`" if self.cluster else table


@dataclass(frozen=True)
class ServedTable:
    """A table that reads and writes name: plain on one node, replicated behind a
    ``Distributed`` table on a cluster (see the module docstring).

    ``engine`` is a MergeTree-family engine without arguments (``ReplacingMergeTree``);
    ``columns`` the column list without its parentheses; ``shard_by`` the sharding
    expression of the Distributed table (rows that are aggregated together must share it).
    """

    name: str
    columns: str
    engine: str
    order_by: str
    shard_by: str

    def sql(self, layout: Layout) -> list[str]:
        """The statements that create this table in ``layout``."""
        if not layout.cluster:
            return [
                f"CREATE TABLE IF NOT EXISTS {self.name} ({self.columns}) "
                f"ENGINE = {self.engine} ORDER BY {self.order_by}"
            ]
        local = f"{self.name}{LOCAL_SUFFIX}"
        path = f"/clickhouse/tables/{{shard}}/{layout.database}/{self.name}"
        return [
            f"CREATE TABLE IF NOT EXISTS {layout.qualified(local)}{layout.on_cluster} "
            f"({self.columns}) ENGINE = Replicated{self.engine}('{path}', '{{replica}}') "
            f"ORDER BY {self.order_by}",
            f"CREATE TABLE IF NOT EXISTS {layout.qualified(self.name)}{layout.on_cluster} "
            f"AS {layout.qualified(local)} ENGINE = Distributed(`{layout.cluster}`, "
            f"`{layout.database}`, `{local}`, {self.shard_by})",
        ]


@dataclass(frozen=True)
class MaterializedView:
    """A view fed by inserts into served table ``source`` that writes served table
    ``target``: ``AS SELECT <select> FROM <source> GROUP BY <group_by>``."""

    name: str
    target: str
    source: str
    select: str
    group_by: str

    def sql(self, layout: Layout) -> list[str]:
        """The statement that creates this view in ``layout``."""
        target, source = self.target, self.source
        if layout.cluster:
            target, source = target + LOCAL_SUFFIX, source + LOCAL_SUFFIX
        # Every part comes from code (declared schema), none from a request.
        return [
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {layout.qualified(self.name)}"  # noqa: S608
            f"{layout.on_cluster} TO {layout.qualified(target)} AS SELECT {self.select} "
            f"FROM {layout.qualified(source)} GROUP BY {self.group_by}"
        ]


Statement = str | ServedTable | MaterializedView

_RECORD_TABLE = ServedTable(
    RECORD_TABLE,
    "app String, name String, applied_at DateTime",
    "MergeTree",
    "(app, name)",
    "cityHash64(app)",
)


@dataclass(frozen=True)
class Migration:
    """One named step of an app's ClickHouse schema: statements run in order.

    A statement is SQL text (``{on_cluster}`` filled in), a ``ServedTable`` or a
    ``MaterializedView``.
    """

    app: str
    name: str
    statements: list[Statement] = field(hash=False)

    def __post_init__(self) -> None:
        if not self.app or not self.name:
            raise ValueError("A ClickHouse migration needs an app and a name")
        if not self.statements or not all(
            isinstance(statement, ServedTable | MaterializedView)
            or (isinstance(statement, str) and statement.strip())
            for statement in self.statements
        ):
            raise ValueError(f"Migration {self.key} needs a non-empty list of SQL statements")

    @property
    def key(self) -> tuple[str, str]:
        """The (app, name) pair recorded when the migration has run."""
        return (self.app, self.name)

    def sql(self, cluster: str | Layout | None = None) -> list[str]:
        """The SQL of every statement for a layout (or a cluster name in ``default``)."""
        layout = cluster if isinstance(cluster, Layout) else Layout(cluster)
        rendered: list[str] = []
        for statement in self.statements:
            if isinstance(statement, str):
                rendered.append(statement.replace(ON_CLUSTER, layout.on_cluster))
            else:
                rendered.extend(statement.sql(layout))
        return rendered


def on_cluster_clause(cluster: str | None) -> str:
    """`` ON CLUSTER `name` `` for a cluster name, or ``''`` without one."""
    if not cluster:
        return ""
    if not CLUSTER_NAME.fullmatch(cluster):
        raise ValueError(f"Not a ClickHouse cluster name: {cluster!r}")
    return f" ON CLUSTER `{cluster}`"


def local_table(name: str, cluster: str | None = None) -> str:
    """The table holding a served table's rows on the connected node: ``<name>_local`` on a
    cluster (default: ``CLICKHOUSE_CLUSTER``), ``name`` itself on a single node.

    Mutations (``ALTER TABLE … DELETE``) and ``system.mutations`` / ``system.parts`` need it:
    a Distributed table has neither. A mutation of a replicated table reaches every replica
    of the node's shard through ZooKeeper.
    """
    if cluster is None:
        cluster = configured_cluster()
    return f"{name}{LOCAL_SUFFIX}" if cluster else name


def configured_cluster() -> str | None:
    """``CLICKHOUSE_CLUSTER`` when Django is configured, else ``None``."""
    from django.conf import settings

    if not settings.configured:
        return None
    return fhir_settings.CLICKHOUSE_CLUSTER or None


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
    table (and on a cluster the database on every node) is created when missing. With
    ``dry_run`` nothing is created or run: the result lists what would run. A failing
    statement stops the run; the migrations before it stay recorded.
    """
    if cluster is None:
        cluster = configured_cluster()
    if cluster and client.in_process:
        raise ValueError(MSG_CHDB_CLUSTER)
    layout = Layout(cluster or None, getattr(client, "database", "default"))
    if dry_run:
        return pending(client, migrations)
    if layout.cluster:
        client.command(f"CREATE DATABASE IF NOT EXISTS `{layout.database}`{layout.on_cluster}")
    for statement in _RECORD_TABLE.sql(layout):
        client.command(statement)
    to_run = pending(client, migrations)
    for migration in to_run:
        for statement in migration.sql(layout):
            client.command(statement)
        client.insert(
            RECORD_TABLE,
            ["app", "name", "applied_at"],
            [(migration.app, migration.name, dt.datetime.now(dt.UTC))],
        )
    return to_run
