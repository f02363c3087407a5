"""Index the Patients stored with a ``link`` before Patient joined the compartment index.

``Patient.link.other`` puts a Patient in the linked Patient's compartment (the R4 Patient
CompartmentDefinition); the index left Patient out until now. Resources that already have
rows (indexed by 0002 on a database that had none of the app's tables) are skipped.
"""

from typing import Any

import orjson
from django.db import migrations

from operations.export.compartment import patient_links

BATCH = 1000


def index_patient_links(apps: Any, schema_editor: Any) -> None:
    """Rows of every live Patient whose body names ``link``, a batch at a time."""
    stored = apps.get_model("fhirservice", "StoredResource")
    link = apps.get_model("export", "CompartmentLink")
    after = ""
    while True:
        rows = list(
            stored.objects.filter(resource_type="Patient", deleted=False, key__gt=after)
            .filter(body__contains='"link"')
            .order_by("key")
            .values_list("key", "body")[:BATCH]
        )
        if not rows:
            break
        after = rows[-1][0]
        indexed = set(
            link.objects.filter(resource_key__in=[key for key, _ in rows]).values_list(
                "resource_key", flat=True
            )
        )
        new = []
        for key, body in rows:
            patients = patient_links("Patient", orjson.loads(body))
            if key in indexed or not patients:
                continue
            new.extend(
                link(
                    key=f"{key}>{patient}",
                    resource_key=key,
                    resource_type="Patient",
                    patient_id=patient,
                    shared=len(patients) > 1,
                )
                for patient in sorted(patients)
            )
        link.objects.bulk_create(new)


class Migration(migrations.Migration):
    dependencies = [("export", "0003_compartment_link_shared")]

    operations = [migrations.RunPython(index_patient_links, migrations.RunPython.noop)]
