"""Index the Patient compartments of resources stored before the export app existed."""

from typing import Any

import orjson
from django.db import migrations

from operations.export.compartment import patient_compartment, patient_links

BATCH = 1000


def index_existing(apps: Any, schema_editor: Any) -> None:
    """Links of every live resource of a compartment type, a batch at a time."""
    stored = apps.get_model("fhirservice", "StoredResource")
    link = apps.get_model("export", "CompartmentLink")
    for resource_type in sorted(patient_compartment()):
        after = ""
        while True:
            rows = list(
                stored.objects.filter(resource_type=resource_type, deleted=False, key__gt=after)
                .order_by("key")
                .values_list("key", "body")[:BATCH]
            )
            if not rows:
                break
            links = [
                link(key=f"{key}>{patient}", resource_key=key, resource_type=resource_type,
                     patient_id=patient)
                for key, body in rows
                for patient in sorted(patient_links(resource_type, orjson.loads(body)))
            ]
            link.objects.bulk_create(links)
            after = rows[-1][0]


class Migration(migrations.Migration):
    dependencies = [("export", "0001_initial"), ("fhirservice", "0002_organization")]

    operations = [migrations.RunPython(index_existing, migrations.RunPython.noop)]
