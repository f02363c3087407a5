"""SearchToken.span: the width class of a date row that is its parameter's only value in the
resource, SEVERAL for a parameter with several values (fhirservice.search.dates), and the
index that reads date ranges per class. Existing date rows are classified here, a batch of
resources at a time (the same as ``reindex_search`` would write).
"""

from datetime import timedelta

from django.db import migrations, models

# fhirservice.search.dates when this migration was written: classes 0-2 up to these widths,
# 3 wider, 4 (SEVERAL) the rows of a parameter with several values.
SPAN_WIDTHS = (timedelta(days=1), timedelta(days=31), timedelta(days=366))
SEVERAL = len(SPAN_WIDTHS) + 1
BATCH = 5000


def _span(low, high):
    width = high - low
    return next((c for c, bound in enumerate(SPAN_WIDTHS) if width <= bound), len(SPAN_WIDTHS))


def classify(apps, schema_editor):
    SearchToken = apps.get_model("fhirservice", "SearchToken")
    dates = SearchToken.objects.filter(low__isnull=False, high__isnull=False, group="")
    after = ""
    while True:
        # Keyset batches of whole resources (the last one read may be cut: it is read again).
        batch = list(
            dates.filter(resource_key__gt=after)
            .order_by("resource_key")
            .values_list("key", "resource_key", "param", "low", "high")[:BATCH]
        )
        if not batch:
            return
        last = batch[-1][1]
        if len(batch) == BATCH and batch[0][1] != last:
            batch = [row for row in batch if row[1] != last]
        elif len(batch) == BATCH:
            batch = list(
                dates.filter(resource_key=last).values_list(
                    "key", "resource_key", "param", "low", "high"
                )
            )
        values = {}
        for row in batch:
            values.setdefault((row[1], row[2]), []).append(row)
        spans = {}
        for rows in values.values():
            span = _span(rows[0][3], rows[0][4]) if len(rows) == 1 else SEVERAL
            spans.setdefault(span, []).extend(row[0] for row in rows)
        for span, keys in spans.items():
            SearchToken.objects.filter(key__in=keys).update(span=span)
        after = batch[-1][1]


class Migration(migrations.Migration):
    dependencies = [
        ("fhirservice", "0004_search_index_covering"),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name="searchtoken",
            name="tok_type_param_low",
        ),
        migrations.AddField(
            model_name="searchtoken",
            name="span",
            field=models.PositiveSmallIntegerField(blank=True, null=True),
        ),
        migrations.RunPython(classify, migrations.RunPython.noop),
        migrations.AddIndex(
            model_name="searchtoken",
            index=models.Index(
                fields=["resource_type", "param", "span", "low", "high", "resource_key"],
                name="tok_type_param_span_low",
            ),
        ),
    ]
