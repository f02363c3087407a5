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

from django.db import connections, router
from django.db.models import Model

# Backends whose cursors take one "%s"-style INSERT with several VALUES rows.
SQL_VENDORS = frozenset({"sqlite", "postgresql"})


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
    batch = connection.ops.bulk_batch_size(fields, rows) or len(rows)
    with connection.cursor() as cursor:
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            params = [
                field.get_db_prep_save(getattr(row, field.attname), connection)
                for row in chunk
                for field in fields
            ]
            head, row_sql = _statement(model, connection.alias)
            cursor.execute(head + ", ".join([row_sql] * len(chunk)), params)


@cache
def _statement(model: type[Model], alias: str) -> tuple[str, str]:
    """``INSERT INTO table (columns) VALUES `` and one row's ``(%s, ...)``."""
    quote = connections[alias].ops.quote_name
    fields = model._meta.concrete_fields
    columns = ", ".join(quote(field.column) for field in fields)
    # Names from the model's own metadata, quoted; every value is a bound parameter.
    head = f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES "  # noqa: S608
    return head, "(" + ", ".join(["%s"] * len(fields)) + ")"
