"""Inserting the rows of a write: one statement per table, without the ORM's per-value work.

Every write inserts its version, its history row and its search values (a plain Patient
has ~20). ``Model.objects.create`` and ``bulk_create`` compile each value through the
insert compiler (placeholders, pre-save hooks, expression checks): for the search rows alone
that was ~30% of a plain create's Python time as served. The models written here have no
database defaults, expressions or auto fields, so on SQL backends the statement's text is
built once per model and each value goes only through its field's ``get_db_prep_save``, the
conversion the ORM applies too. Other backends (MongoDB) take ``bulk_create``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from django.db import connections, router
from django.db.models import Model

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


def insert_rows(model: type[Model], rows: Sequence[Model]) -> None:
    """INSERT ``rows`` (new instances of ``model``, primary keys set) in as few statements as
    the backend's parameter limit allows (SQLite's: 83 rows of 12 columns per statement)."""
    if not rows:
        return
    connection = connections[router.db_for_write(model)]
    if connection.vendor not in SQL_VENDORS:
        model.objects.bulk_create(rows)
        return
    fields = model._meta.concrete_fields
    _execute(
        model,
        connection,
        [
            [field.get_db_prep_save(getattr(row, field.attname), connection) for field in fields]
            for row in rows
        ],
    )


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
    converted = _converted_fields(model)
    if converted:
        values = [list(row) for row in rows]
        for row in values:
            for index, field in converted:
                if row[index] is not None:
                    row[index] = field.get_db_prep_save(row[index], connection)
        _execute(model, connection, values)
    else:
        _execute(model, connection, rows)


def _execute(model: type[Model], connection: Any, rows: Sequence[Sequence[Any]]) -> None:
    head, row_sql = _statement(model, connection.alias)
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
