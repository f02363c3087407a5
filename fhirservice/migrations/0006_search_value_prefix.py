"""The search index's ``(type, param, value, system, resource_key)`` index with ``value`` in
byte order on PostgreSQL (``varchar_pattern_ops``), so a string search's prefix is a range of
it; other backends build it as before. At 10^6 resources (10.9 million rows) PostgreSQL
builds it in about 3 minutes (2 CPUs, load 12-20).
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("fhirservice", "0005_search_date_span"),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name="searchtoken",
            name="tok_type_param_value",
        ),
        migrations.AddIndex(
            model_name="searchtoken",
            index=models.Index(
                fields=["resource_type", "param", "value", "system", "resource_key"],
                name="tok_type_param_value",
                opclasses=["", "", "varchar_pattern_ops", "", ""],
            ),
        ),
    ]
