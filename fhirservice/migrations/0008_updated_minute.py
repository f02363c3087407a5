"""Current rows that PostgreSQL can update in place (HOT), issue 16.

- ``updated_minute``: ``last_updated`` cut to the minute, filled in for every row; the
  ``(resource_type, updated_minute)`` index replaces ``(resource_type, last_updated)``. No
  index of the table holds ``last_updated`` any more, so an update within the minute of the
  previous version changes no indexed column (``fhirservice.models.StoredResource``).
- PostgreSQL: the table's ``fillfactor`` 90, so that pages filled from now on keep room for a
  new version of their rows (an update is HOT only when the new version fits on the page of
  the old one). Pages already full stay full until they are rewritten (``VACUUM FULL``);
  an update of a row there moves it once, to a page with room.

Filling the column is one UPDATE of every row on SQLite and PostgreSQL (minutes at 10^6
rows, holding the table against writes), a pass in batches on MongoDB.
"""

from datetime import UTC, datetime

from django.db import migrations, models

TABLE = "fhirservice_storedresource"
FILLFACTOR = 90
BATCH = 1000
# PostgreSQL: the minute in UTC (a time zone's offset need not be whole minutes: LMT).
POSTGRESQL_FILL = (
    f"UPDATE {TABLE} SET updated_minute = "
    "date_trunc('minute', last_updated AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
)
# SQLite keeps Django's text form, 'YYYY-MM-DD HH:MM:SS[.ffffff]' in UTC; a whole minute has
# no fraction.
SQLITE_FILL = f"UPDATE {TABLE} SET updated_minute = strftime('%Y-%m-%d %H:%M:00', last_updated)"


def fill_minutes(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor == "postgresql":
        schema_editor.execute(POSTGRESQL_FILL)
        return
    if connection.vendor == "sqlite":
        schema_editor.execute(SQLITE_FILL)
        return
    model = apps.get_model("fhirservice", "StoredResource")
    rows = model.objects.only("key", "last_updated").order_by("key").iterator(chunk_size=BATCH)
    batch = []
    for row in rows:
        row.updated_minute = row.last_updated.replace(second=0, microsecond=0)
        batch.append(row)
        if len(batch) == BATCH:
            model.objects.bulk_update(batch, ["updated_minute"])
            batch = []
    model.objects.bulk_update(batch, ["updated_minute"])


def set_fillfactor(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE {TABLE} SET (fillfactor = {FILLFACTOR})")


def reset_fillfactor(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE {TABLE} RESET (fillfactor)")


class Migration(migrations.Migration):
    dependencies = [
        ("fhirservice", "0007_search_index_partial"),
    ]

    operations = [
        migrations.AddField(
            model_name="storedresource",
            name="updated_minute",
            field=models.DateTimeField(default=datetime(1970, 1, 1, tzinfo=UTC)),
            preserve_default=False,
        ),
        migrations.RunPython(fill_minutes, migrations.RunPython.noop),
        migrations.RemoveIndex(model_name="storedresource", name="res_type_updated"),
        migrations.AddIndex(
            model_name="storedresource",
            index=models.Index(fields=["resource_type", "updated_minute"], name="res_type_minute"),
        ),
        migrations.RunPython(set_fillfactor, reset_fillfactor),
    ]
