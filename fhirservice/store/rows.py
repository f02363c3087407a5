"""The rows of a write, and the current row of a read: SQL the ORM compiles once per process.

Every write inserts its version, its history row and its search values (a plain Patient
has ~20). ``Model.objects.create`` and ``bulk_create`` compile each value through the
insert compiler (placeholders, pre-save hooks, expression checks): for the search rows alone
that was ~30% of a plain create's Python time as served. The models written here have no
database defaults, expressions or auto fields, so on SQL backends the statement's text is
built once per model and each value goes only through its field's ``get_db_prep_save``, the
conversion the ORM applies too. Other backends (MongoDB) take ``bulk_create``.

:func:`row_by_key` reads one row by primary key the same way: building and compiling
``filter(pk=...)[:1]`` per call was about a third of a plain read's Django time, more than
running the statement. The ORM compiles it once (so the SQL, columns and locking clause are
its own) and each call binds the key and applies the backend's converters to the values.
:func:`update_row` is the compare-and-set UPDATE of a new version: ``filter().update()``
compiled per call was ~8% of a served Group PATCH's CPU. On PostgreSQL the version's other
rows (history, outbox) go in the UPDATE's statement.

:func:`row_by_key_with` reads such a row in the statement of another one-row lookup (a
read's current row with its bearer token's lookup): one round trip instead of two.

The key lookups run on :func:`prepared_cursor`: on PostgreSQL the server plans such a
statement once per connection instead of once per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.db import connections, router
from django.db.models import Model

from fhirservice import db

# Backends whose cursors take one "%s"-style INSERT with several VALUES rows.
SQL_VENDORS = frozenset({"sqlite", "postgresql"})
# Fields whose database value is the Python value itself (``get_db_prep_save`` of a value
# of the field's type returns it unchanged).
PLAIN_TYPES = frozenset(
    {
        "CharField",
        "TextField",
        "FloatField",
        "IntegerField",
        "BigIntegerField",
        "SmallIntegerField",
        "PositiveIntegerField",
        "PositiveSmallIntegerField",
        "PositiveBigIntegerField",
        "BooleanField",
    }
)
# Where a connection keeps the value converters of the key lookups' columns.
CONVERTERS_ATTR = "fhir_lookup_converters"
# SQLite's conflict clause of a transaction's inserts when nothing follows them in it.
ROLLBACK_ON_CONFLICT = "OR ROLLBACK"
# Compiles a key lookup once; any value would do as long as it comes back as the one parameter.
KEY_SLOT = "key"
MSG_LOOKUP_COMPILED = "The lookup of {model} compiled with parameters {params!r}, not one key"
MSG_LOCK_OUTSIDE_TRANSACTION = "A locking read of {model} needs a transaction"
# The combined lookup of row_by_key_with: a row of ``one`` whether or not either lookup finds
# its row; "present" tells a found first row from the LEFT JOIN's nulls.
JOINED_SQL = (
    'SELECT * FROM (SELECT 1 AS "one") AS "one"'
    ' LEFT JOIN (SELECT 1 AS "present", "q".* FROM ({first}) AS "q") AS "a" ON 1 = 1'
    ' LEFT JOIN ({lookup}) AS "b" ON 1 = 1'
)


@dataclass(frozen=True)
class ReadAhead:
    """A current row read before the code that uses it asked (None: there is none), with the
    key it was read by."""

    key: str
    row: Model | None


def prepared_cursor(connection: Any) -> Any:
    """A cursor of ``connection`` for a statement the ORM compiled once and a request runs
    every time: on PostgreSQL one that binds on the server, so the statement is prepared
    at its first run (``prepare_threshold`` 0 in the settings; ``fhirservice.pgbackend``);
    elsewhere the usual cursor."""
    make = getattr(connection, "prepared_cursor", None)
    return make() if make is not None else connection.cursor()


def insert_rows(model: type[Model], rows: Sequence[Model]) -> None:
    """INSERT ``rows`` (new instances of ``model``, primary keys set) in as few statements as
    the backend's parameter limit allows (SQLite's: 83 rows of 12 columns per statement)."""
    if not rows:
        return
    connection = connections[router.db_for_write(model)]
    if connection.vendor not in SQL_VENDORS:
        model.objects.bulk_create(rows)
        return
    _execute(model, connection, _instance_values(model, connection, rows))


def _instance_values(model: type[Model], connection: Any, rows: Sequence[Model]) -> list[list]:
    """The database values of new instances, in the model's field order."""
    fields = model._meta.concrete_fields
    return [
        [field.get_db_prep_save(getattr(row, field.attname), connection) for field in fields]
        for row in rows
    ]


def insert_values(model: type[Model], rows: Sequence[tuple[Any, ...]]) -> None:
    """INSERT ``rows`` given as tuples of field values in the model's field order, as
    :func:`insert_rows` does (the search index: no model instance per row).

    The values must already have their fields' Python types (str for a CharField, int, float
    or None): those go to the database as they are, which is what ``get_db_prep_save``
    would give; the other fields (dates) are converted as the ORM converts them.
    """
    if not rows:
        return
    connection = connections[router.db_for_write(model)]
    if connection.vendor not in SQL_VENDORS:
        model.objects.bulk_create([model(*row) for row in rows])
        return
    _execute(model, connection, _tuple_values(model, connection, rows))


def _tuple_values(
    model: type[Model], connection: Any, rows: Sequence[tuple[Any, ...]]
) -> Sequence[Sequence[Any]]:
    """The database values of rows given as tuples (see :func:`insert_values`)."""
    converted = _converted_fields(model)
    if not converted:
        return rows
    values = [list(row) for row in rows]
    for row in values:
        for index, field in converted:
            if row[index] is not None:
                row[index] = field.get_db_prep_save(row[index], connection)
    return values


def insert_all(
    batches: Sequence[tuple[type[Model], Sequence[Model] | Sequence[tuple[Any, ...]]]],
    *,
    alone: bool = False,
) -> None:
    """INSERT each batch, in order: ``(model, rows)``, the rows new instances
    (:func:`insert_rows`) or tuples of field values (:func:`insert_values`).

    ``alone``: the caller's transaction does nothing after these inserts (the caller's
    atomic block is the outermost and ends when they are done). On PostgreSQL, when nothing
    ran in that transaction before either, the batches go as one statement, each but the
    last a data-modifying ``WITH`` part, sent as a transaction of its own
    (``pgbackend.base.DatabaseWrapper.run_alone``): a statement is atomic by itself, so the
    server sees neither BEGIN nor COMMIT, and the write is one round trip instead of five
    (BEGIN, three INSERTs, COMMIT). Anything else inserts batch by batch inside the
    transaction; on SQLite, when ``alone``, as ``INSERT OR ROLLBACK``: a failing insert
    then rolls the whole transaction back at once, as the caller's block would, so SQLite
    keeps no statement journal to undo just that statement. The search rows' insert
    touches ~100 pages, past the 64 KiB a statement journal keeps in memory: each create
    wrote it to a temporary file, deleted again at the statement's end (~0.5 ms of CPU).
    """
    batches = [(model, rows) for model, rows in batches if rows]
    if not batches:
        return
    connection = connections[router.db_for_write(batches[0][0])]
    alone_statement = getattr(connection, "run_alone", None) if alone else None
    if alone_statement is not None and len(batches) > 1 and connection.transaction_unbegun():
        parts, params = [], []
        for model, rows in batches:
            values = _batch_values(model, connection, rows)
            head, row_sql = _statement(model, connection.alias)
            parts.append(head + ", ".join([row_sql] * len(values)))
            params.extend(value for row in values for value in row)
        *ahead, last = parts
        # Statements built from the models' metadata; every value is a bound parameter.
        ahead_sql = ", ".join(f'"w{index}" AS ({part})' for index, part in enumerate(ahead))
        alone_statement(f"WITH {ahead_sql} {last}", params)
        return
    if alone and connection.vendor == "sqlite":
        for model, rows in batches:
            values = _batch_values(model, connection, rows)
            _execute(model, connection, values, conflict=ROLLBACK_ON_CONFLICT)
        return
    for model, rows in batches:
        if isinstance(rows[0], Model):
            insert_rows(model, rows)
        else:
            insert_values(model, rows)


def _batch_values(
    model: type[Model], connection: Any, rows: Sequence[Model] | Sequence[tuple[Any, ...]]
) -> Sequence[Sequence[Any]]:
    """The database values of a batch of :func:`insert_all`."""
    if isinstance(rows[0], Model):
        return _instance_values(model, connection, rows)
    return _tuple_values(model, connection, rows)


def _execute(
    model: type[Model], connection: Any, rows: Sequence[Sequence[Any]], *, conflict: str = ""
) -> None:
    head, row_sql = _statement(model, connection.alias)
    if conflict:
        head = head.replace("INSERT INTO", f"INSERT {conflict} INTO", 1)
    batch = connection.ops.bulk_batch_size(model._meta.concrete_fields, rows) or len(rows)
    with connection.cursor() as cursor:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            params = [value for row in chunk for value in row]
            cursor.execute(head + ", ".join([row_sql] * len(chunk)), params)


@cache
def _converted_fields(model: type[Model]) -> tuple[tuple[int, Any], ...]:
    """(position, field) of the fields whose values the database adapter must convert."""
    return tuple(
        (index, field)
        for index, field in enumerate(model._meta.concrete_fields)
        if field.get_internal_type() not in PLAIN_TYPES
    )


@cache
def _statement(model: type[Model], alias: str) -> tuple[str, str]:
    """``INSERT INTO table (columns) VALUES `` and one row's ``(%s, ...)``."""
    quote = connections[alias].ops.quote_name
    fields = model._meta.concrete_fields
    columns = ", ".join(quote(field.column) for field in fields)
    # Names from the model's own metadata, quoted; every value is a bound parameter.
    head = f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES "  # noqa: S608
    return head, "(" + ", ".join(["%s"] * len(fields)) + ")"


def row_by_key(model: type[Model], key: Any, *, lock: bool = False) -> Model | None:
    """The instance of ``model`` whose primary key is ``key``, or None; ``lock``: the row
    locked until the transaction commits where the backend locks rows (``db.lock_rows``)."""
    connection = connections[router.db_for_read(model)]
    if connection.vendor not in SQL_VENDORS:
        queryset = model._default_manager.filter(pk=key)
        return next(iter((db.lock_rows(queryset) if lock else queryset)[:1]), None)
    if lock and connection.get_autocommit():
        # The ORM checks this when it compiles a locking read; the compiled one skips it.
        raise ValueError(MSG_LOCK_OUTSIDE_TRANSACTION.format(model=model.__name__))
    sql, columns = _lookup(model, connection.alias, lock)
    with prepared_cursor(connection) as cursor:
        cursor.execute(sql, [key])
        row = cursor.fetchone()
    if row is None:
        return None
    return _instance(model, connection, columns, row)


def row_by_key_with(
    model: type[Model], key: Any, sql: str, params: Sequence[Any]
) -> tuple[tuple[Any, ...] | None, Model | None]:
    """The row ``sql`` selects (a lookup of at most one row, e.g. ``LIMIT 1``; None when it
    finds none) and the instance of ``model`` whose primary key is ``key`` (or None), read in
    one statement. SQL backends only (``SQL_VENDORS``); ``sql`` for ``model``'s database.
    """
    connection = connections[router.db_for_read(model)]
    lookup, columns = _lookup(model, connection.alias, False)
    # Two statements compiled by the ORM, each a subquery here; values are bound parameters.
    statement = JOINED_SQL.format(first=sql, lookup=lookup)
    with prepared_cursor(connection) as cursor:
        cursor.execute(statement, [*params, key])
        row = cursor.fetchone()
    width = len(row) - 2 - len(columns)
    first = tuple(row[2 : 2 + width]) if row[1] is not None else None
    values = row[2 + width :]
    found = values[_key_position(model, connection.alias)] is not None
    return first, _instance(model, connection, columns, values) if found else None


def _instance(
    model: type[Model], connection: Any, columns: list[tuple[str, Any]], row: Sequence[Any]
) -> Model:
    """The instance of ``model`` from the values of a lookup's ``columns``."""
    values = list(row)
    for position, column, converters in _converters(connection, columns):
        value = values[position]
        for converter in converters:
            value = converter(value, column, connection)
        values[position] = value
    return model.from_db(connection.alias, [name for name, _ in columns], values)


def _converters(connection: Any, columns: list[tuple[str, Any]]) -> list[tuple[int, Any, list]]:
    """(position, column, converters) of the lookup's ``columns`` that have converters
    (SQLite's text timestamps and 0/1 booleans), kept on ``connection``: they are bound to
    this thread's connection, which lives across requests. Asking each column for them on
    every read was ~8% of a plain read's Python time as served."""
    kept = connection.__dict__.setdefault(CONVERTERS_ATTR, {})
    entry = kept.get(id(columns))
    if entry is None or entry[0] is not columns:  # keyed by the lookup's own (cached) list
        found = []
        for position, (_, column) in enumerate(columns):
            converters = connection.ops.get_db_converters(column) + column.get_db_converters(
                connection
            )
            if converters:
                found.append((position, column, converters))
        entry = kept[id(columns)] = (columns, found)
    return entry[1]


@cache
def _key_position(model: type[Model], alias: str) -> int:
    """Where the primary key is among the columns of ``model``'s key lookup."""
    names = [name for name, _ in _lookup(model, alias, False)[1]]
    return names.index(model._meta.pk.attname)


@cache
def _lookup(model: type[Model], alias: str, lock: bool) -> tuple[str, list[tuple[str, Any]]]:
    """The key lookup's SQL on ``alias`` (``%s`` for the key; no ORDER BY: the key is
    unique) and its selected columns as (attribute name, column expression)."""
    queryset = model._default_manager.using(alias).filter(pk=KEY_SLOT)
    if lock:
        queryset = db.lock_rows(queryset)
    compiler = queryset[:1].query.get_compiler(using=alias)
    sql, params = compiler.as_sql()
    if params != (KEY_SLOT,):
        raise ValueError(MSG_LOOKUP_COMPILED.format(model=model.__name__, params=params))
    return sql, [(column.target.attname, column) for column, _, _ in compiler.select]


def update_row(
    model: type[Model],
    key: Any,
    *,
    where: dict[str, Any],
    values: dict[str, Any],
    inserts: Sequence[tuple[type[Model], Sequence[Model]]] = (),
) -> int:
    """``UPDATE`` the row of ``model`` whose primary key is ``key`` and whose fields equal
    ``where`` (a compare-and-set), setting ``values``; the number of rows updated (0 or 1).

    The statement is built once per model and field names; each value goes through its
    field's ``get_db_prep_save`` (``where`` values through ``get_db_prep_value``, as the ORM's
    ``exact`` lookup does; none may be None).

    ``inserts``: batches of new instances, ``(model, rows)``, inserted in the caller's
    transaction whatever the update finds (the caller rolls back when it finds no row). On
    PostgreSQL they are data-modifying ``WITH`` parts of the UPDATE's statement, run on the
    prepared cursor: a Group PATCH's outbox row, UPDATE and history row were three round
    trips and three statements parsed and planned per write. Elsewhere they are inserted
    one batch after another before the update.
    """
    connection = connections[router.db_for_write(model)]
    inserts = [(target, rows) for target, rows in inserts if rows]
    if connection.vendor != "postgresql":
        for target, rows in inserts:
            insert_rows(target, rows)
    if connection.vendor not in SQL_VENDORS:
        return model._default_manager.filter(pk=key, **where).update(**values)
    sql, set_fields, where_fields = _update(model, connection.alias, tuple(values), tuple(where))
    params = (
        [field.get_db_prep_save(values[field.name], connection) for field in set_fields]
        + [key]
        + [field.get_db_prep_value(where[field.name], connection) for field in where_fields]
    )
    if connection.vendor != "postgresql" or not inserts:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount
    parts, ahead = [], []
    for index, (target, rows) in enumerate(inserts):
        head, row_sql = _statement(target, connection.alias)
        parts.append(f'"w{index}" AS ({head}{", ".join([row_sql] * len(rows))})')
        ahead.extend(v for row in _instance_values(target, connection, rows) for v in row)
    # Statements built from the models' metadata; every value is a bound parameter.
    with prepared_cursor(connection) as cursor:
        cursor.execute(f"WITH {', '.join(parts)} {sql}", ahead + params)
        return cursor.rowcount


@cache
def _update(
    model: type[Model], alias: str, names: tuple[str, ...], where: tuple[str, ...]
) -> tuple[str, tuple[Any, ...], tuple[Any, ...]]:
    """``UPDATE table SET ... WHERE pk = %s AND ...`` and the fields of its parameters."""
    quote = connections[alias].ops.quote_name
    meta = model._meta
    set_fields = tuple(meta.get_field(name) for name in names)
    where_fields = tuple(meta.get_field(name) for name in where)
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in set_fields)
    conditions = " AND ".join(
        [f"{quote(meta.pk.column)} = %s"]
        + [f"{quote(field.column)} = %s" for field in where_fields]
    )
    # Names from the model's own metadata, quoted; every value is a bound parameter.
    sql = f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {conditions}"  # noqa: S608
    return sql, set_fields, where_fields
