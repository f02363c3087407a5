"""``Patient/[id]/$group-memberships``: the Groups a Patient is an active member of.

Only Groups inside the caller's organization boundary are listed.

Read-only (GET allowed), answered from the reverse member table's sort key.
"""

from __future__ import annotations

from typing import Any

from fhirservice.access.boundaries import is_visible
from fhirservice.fhir.operation_definition import OperationDef, ParamDef
from fhirservice.models import StoredResource
from fhirservice.store.handlers import WriteContext
from fhirservice.store.selectors import resource_read
from groups.storage import roster_storage

OPERATION = OperationDef(
    code="group-memberships",
    resource="Patient",
    instance=True,
    affects_state=False,
    title="Group memberships",
    description="A searchset Bundle of the Groups the Patient is an active member of.",
    parameters=(ParamDef("return", "out", 1, "1", "Bundle", "searchset Bundle of Groups"),),
)


def handle(
    *, values: dict[str, Any], resource_id: str | None, context: WriteContext
) -> list[StoredResource]:
    """The Group rows; the view renders them as a searchset Bundle."""
    patient = resource_read(resource_type="Patient", resource_id=resource_id)
    keys = roster_storage().groups_with([patient.key], active_only=True)
    # The boundary in Python, as visible_keys does (SQLite's planner and organization IN).
    rows = StoredResource.objects.filter(key__in=keys, deleted=False).order_by("key")
    return [row for row in rows if is_visible(row)]
