"""PostgreSQL: drop the outbox key's ``LIKE`` index, which no query reads.

Django gives a ``varchar`` primary key on PostgreSQL a second index in
``varchar_pattern_ops`` for ``LIKE 'x%'``. The outbox is read by ``roster_key``, ``group_id``
and ``version``, ``shipped_at`` and ``recount``, and by key only as ``key IN (...)`` (the
primary key's index); nothing matches its key by a pattern. Every member write inserts an
outbox row, and shipping it updates ``shipped_at``, an indexed column (never a HOT update):
that index took two entries per member write, at places as random as the roster keys'
UUIDs. ``fhirservice`` 0007 dropped the same indexes of the current rows, versions and
search rows.
"""

from django.db import migrations

TABLE, COLUMN = "groups_memberoutbox", "key"


def _pattern_indexes(schema_editor):
    """The names of the outbox key's pattern indexes (Django's ``..._like``)."""
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, TABLE)
    return [
        name
        for name, info in constraints.items()
        if name.endswith("_like") and info["index"] and info["columns"] == [COLUMN]
    ]


def drop_pattern_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for name in _pattern_indexes(schema_editor):
        schema_editor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(name)}")


def create_pattern_index(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    model = apps.get_model("groups", "MemberOutbox")
    field = model._meta.get_field(COLUMN)
    schema_editor.execute(schema_editor._create_like_index_sql(model, field))


class Migration(migrations.Migration):
    dependencies = [
        ("groups", "0003_outbox_recount_index"),
    ]

    operations = [
        migrations.RunPython(drop_pattern_index, create_pattern_index, elidable=True),
    ]
