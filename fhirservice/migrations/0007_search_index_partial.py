"""Fewer index entries per write (issue 17): the search index's date and number indexes hold
only the rows of their kind, and PostgreSQL drops the ``LIKE`` indexes no query uses.

- ``tok_type_param_span_low``, ``tok_type_param_high`` and ``tok_type_param_number`` become
  partial (``span``, ``high``, ``number`` IS NOT NULL). Every search that reads them bounds
  the column (``span = …``/``IN``, ``high > …``, ``number >= …``), which implies it is not
  null on SQLite and PostgreSQL alike, so the same searches read them; a write no longer adds
  an entry for each of its rows of other kinds (a Patient's ~20 rows went into all three).
- Django gives every ``varchar`` primary key and indexed ``varchar`` column on PostgreSQL a
  second index in ``varchar_pattern_ops`` for ``LIKE 'x%'``. No query filters the stored
  rows', versions' or search rows' ``key`` or ``organization`` by a pattern, so those five
  indexes only cost writes (the search rows' one, an entry per row at a random place).

The migration builds the three indexes again over the date and number rows only (not timed
at 10^6: fewer rows than the indexes it replaces, which took minutes there), holding the
table against writes while it does.
"""

from django.db import migrations, models

import fhirservice.models

# (table, column) of the pattern indexes PostgreSQL made and no query reads.
UNUSED_PATTERN_INDEXES = (
    ("fhirservice_searchtoken", "key"),
    ("fhirservice_storedresource", "key"),
    ("fhirservice_storedresource", "organization"),
    ("fhirservice_resourceversion", "key"),
    ("fhirservice_resourceversion", "organization"),
)


def _pattern_indexes(schema_editor):
    """The names of the existing pattern indexes of ``UNUSED_PATTERN_INDEXES``."""
    connection = schema_editor.connection
    names = []
    with connection.cursor() as cursor:
        for table, column in UNUSED_PATTERN_INDEXES:
            constraints = connection.introspection.get_constraints(cursor, table)
            names.extend(
                name
                for name, info in constraints.items()
                if name.endswith("_like") and info["index"] and info["columns"] == [column]
            )
    return names


def drop_pattern_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name in _pattern_indexes(schema_editor):
        schema_editor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(name)}")


def create_pattern_indexes(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table, column in UNUSED_PATTERN_INDEXES:
        model = next(m for m in apps.get_models() if m._meta.db_table == table)
        field = next(f for f in model._meta.local_fields if f.column == column)
        schema_editor.execute(schema_editor._create_like_index_sql(model, field))


class Migration(migrations.Migration):
    dependencies = [
        ("fhirservice", "0006_search_value_prefix"),
    ]

    operations = [
        migrations.RemoveIndex(model_name="searchtoken", name="tok_type_param_high"),
        migrations.RemoveIndex(model_name="searchtoken", name="tok_type_param_number"),
        migrations.RemoveIndex(model_name="searchtoken", name="tok_type_param_span_low"),
        migrations.AddIndex(
            model_name="searchtoken",
            index=fhirservice.models.PartialIndex(
                condition=models.Q(span__isnull=False),
                fields=["resource_type", "param", "span", "low", "high", "resource_key"],
                name="tok_type_param_span_low",
            ),
        ),
        migrations.AddIndex(
            model_name="searchtoken",
            index=fhirservice.models.PartialIndex(
                condition=models.Q(high__isnull=False),
                fields=["resource_type", "param", "high", "resource_key"],
                name="tok_type_param_high",
            ),
        ),
        migrations.AddIndex(
            model_name="searchtoken",
            index=fhirservice.models.PartialIndex(
                condition=models.Q(number__isnull=False),
                fields=["resource_type", "param", "number", "resource_key"],
                name="tok_type_param_number",
            ),
        ),
        migrations.RunPython(drop_pattern_indexes, create_pattern_indexes),
    ]
