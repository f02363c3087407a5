"""The search index's secondary indexes, dropped for a load that writes every row and built
again after it.

Writing a SearchToken row costs an entry in each of the table's indexes, most of them
insertions at random places (by parameter and value); a reindex into an emptied index spent
~75% of its time there. A load that writes every row (``reindex_search`` rebuilding, the
benchmarks' seeding) drops those indexes first and builds each again at the end, in one
sorted pass over the table.

Which indexes: the ones the applied migrations define on SearchToken (the migration state,
not a list kept here), so an index a migration adds or changes is dropped and built as that
migration defines it. Kept through the load are the primary key and the indexes led by
``resource_key``: every write finds a resource's rows by it (without it each write's DELETE
would scan the table), and a load in key order appends their entries at the end.

Whether a rebuild is under way is the database's own state, which survives a crash: an index
of the migration state missing from the table. ``build_missing`` creates each missing one
in its own transaction, so a build interrupted halfway is finished by the next.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any

from django.db import connections, transaction
from django.db.migrations.loader import MigrationLoader
from django.db.models import Index

from fhirservice.models import SearchToken

# The column a write finds a resource's rows by: indexes led by it stay through a load.
LOOKUP_COLUMN = "resource_key"
# PostgreSQL memory for sorting an index build in this session (the default 64 MB spills
# a 10^7-row build to disk in several runs).
PG_BUILD_MEMORY = "256MB"
# PostgreSQL sessions building indexes at once (22,000 resources: 5.7-6.8 s in two against
# 7.3-8.0 s in one, each with its parallel workers, 2 cores at load 17).
BUILD_SESSIONS = 2


def _state_model(connection: Any) -> Any:
    """SearchToken as the migrations applied to ``connection``'s database define it."""
    app = SearchToken._meta.app_label
    loader = MigrationLoader(connection)
    applied = [node for node in loader.applied_migrations if node[0] == app]
    return loader.project_state(nodes=applied).apps.get_model(app, SearchToken.__name__)


def _existing(connection: Any, model: Any) -> set[str]:
    with connection.cursor() as cursor:
        return set(connection.introspection.get_constraints(cursor, model._meta.db_table))


def _load_indexes(model: Any) -> list[Index]:
    """The indexes a load that writes every row drops: ``model``'s, but those led by
    ``resource_key``."""
    return [
        index
        for index in model._meta.indexes
        if not (index.fields and index.fields[0].lstrip("-") == LOOKUP_COLUMN)
    ]


def _absent(connection: Any, model: Any) -> list[Index]:
    """``model``'s indexes that the database does not have."""
    present = _existing(connection, model)
    return [index for index in model._meta.indexes if index.name not in present]


def missing(connection: Any) -> list[str]:
    """Names of the migration state's SearchToken indexes absent from the database: a
    rebuild dropped them and has not built them again yet."""
    return [index.name for index in _absent(connection, _state_model(connection))]


def drop(connection: Any) -> list[str]:
    """Drop the load's indexes (those present); their names."""
    model = _state_model(connection)
    present = _existing(connection, model)
    dropped = []
    for index in _load_indexes(model):
        if index.name in present:
            # Plain SQL both backends take (the schema editor's own would need it entered:
            # see ``_editor``).
            with connection.cursor() as cursor:
                cursor.execute(f"DROP INDEX {connection.ops.quote_name(index.name)}")
            dropped.append(index.name)
    return dropped


def build_missing(connection: Any) -> list[str]:
    """Create every index of the migration state missing from the database, each in its own
    transaction (PostgreSQL: with more sort memory, and in ``BUILD_SESSIONS`` sessions at
    once outside a transaction); their names."""
    model = _state_model(connection)
    todo = _absent(connection, model)
    if not todo:
        return []
    if connection.vendor == "postgresql" and not connection.in_atomic_block:
        # Builds of one table run side by side (each takes a SHARE lock, which they share);
        # one build's serial phases (its final merge, writing the index) leave cores idle
        # that another's sort uses. Inside a transaction other sessions would not see its
        # rows (and would wait for its locks), so it builds alone.
        shares = [todo[n::BUILD_SESSIONS] for n in range(BUILD_SESSIONS)]
        with ThreadPoolExecutor(BUILD_SESSIONS) as pool:
            list(pool.map(partial(_build_in_own_session, connection.alias, model), shares))
    else:
        _build(connection, model, todo)
    return [index.name for index in todo]


def _build(connection: Any, model: Any, indexes: list[Index]) -> None:
    editor = _editor(connection)
    with _build_session(connection):
        for index in indexes:
            with transaction.atomic(using=connection.alias):
                editor.execute(index.create_sql(model, editor))


def _build_in_own_session(alias: str, model: Any, indexes: list[Index]) -> None:
    """``_build`` in this thread's own connection (Django's are per thread), closed after."""
    connection = connections[alias]
    try:
        _build(connection, model, indexes)
    finally:
        connection.close()


def _editor(connection: Any) -> Any:
    """The backend's schema editor, for the SQL creating an index and running it. Not
    entered as a context: SQLite's refuses to enter inside a transaction (it may rebuild
    tables with foreign key checks off), which creating an index never does."""
    return connection.schema_editor(atomic=False)


@contextmanager
def _build_session(connection: Any) -> Iterator[None]:
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem TO %s", [PG_BUILD_MEMORY])
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET maintenance_work_mem")


@contextmanager
def built_after(connection: Any, report: Any = None) -> Iterator[None]:
    """Drop the load's indexes, run the load, build them again (even if the load failed);
    ``report``, if given, is called with the seconds the build took."""
    drop(connection)
    try:
        yield
    finally:
        started = time.perf_counter()
        build_missing(connection)
        if report is not None:
            report(time.perf_counter() - started)
