"""Rows written straight into the metadata store's tables, for benchmarks that seed millions.

The write path is not what those benchmarks measure, and building a model instance per row
for ``bulk_create`` was most of their seeding time.
"""

from __future__ import annotations

from typing import Any


def store_rows(model: Any, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """Insert rows (values in ``columns`` order, as the database takes them) straight into
    ``model``'s table: COPY on PostgreSQL, one ``executemany`` on SQLite, ``bulk_create``
    elsewhere. Building model instances for ``bulk_create`` was most of the seeding's time
    (628-812 s for 1.1·10^6 resources)."""
    from django.db import connection, transaction

    if connection.vendor not in ("postgresql", "sqlite"):
        model.objects.bulk_create([model(**dict(zip(columns, row, strict=True))) for row in rows])
        return
    quote = connection.ops.quote_name
    table = quote(model._meta.db_table)
    names = ", ".join(quote(model._meta.get_field(column).column) for column in columns)
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            with cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join("%s" for _ in columns)
            cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)
