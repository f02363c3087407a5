"""``Group/$create-roster``: a Group and its whole roster from Patient identifiers.

The server resolves every identifier to a Patient (creating a minimal Patient when none
matches) and creates the Group with those members, all in one serializable transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhirservice.errors import TooCostly
from fhirservice.fhir.operation_definition import OperationDef, ParamDef
from fhirservice.rest.parameters import output
from fhirservice.store.handlers import WriteContext
from fhirservice.store.services import resource_create
from operations.patients import patients_resolve_or_create, strip_references
from operations.transactions import Region, run_region

MAX_IDENTIFIERS = 100_000
MSG_TOO_MANY = "{count} identifiers; at most {limit} per call"

OPERATION = OperationDef(
    code="create-roster",
    resource="Group",
    type=True,
    affects_state=True,
    title="Create roster",
    description="Creates a Group (sent as a DTO without members) whose roster is the "
    "Patients named by the identifiers; unknown identifiers get a minimal "
    "Patient. At most 100,000 identifiers per call.",
    parameters=(
        ParamDef("group", "in", 1, "1", "Group", "The Group DTO (members are ignored)"),
        ParamDef("identifier", "in", 0, "*", "Identifier", "Identifiers of the members"),
        ParamDef("group", "out", 1, "1", "Reference", "The created Group", target=("Group",)),
        ParamDef("groupVersion", "out", 1, "1", "string", "The Group's version"),
        ParamDef("created", "out", 1, "1", "integer", "How many Patients were created"),
    ),
)


@dataclass(frozen=True)
class CreateRosterParams:
    """Typed inputs of $create-roster."""

    group: dict[str, Any]
    identifiers: list[dict[str, Any]]

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> CreateRosterParams:
        """Build from checked Parameters values (at most MAX_IDENTIFIERS identifiers)."""
        identifiers = values["identifier"]
        if len(identifiers) > MAX_IDENTIFIERS:
            raise TooCostly(
                MSG_TOO_MANY.format(count=len(identifiers), limit=MAX_IDENTIFIERS),
                detail_code="MSG_TOO_COSTLY",
            )
        return cls(values["group"], identifiers)


def handle(
    *, values: dict[str, Any], resource_id: str | None, context: WriteContext
) -> dict[str, Any]:
    """Run $create-roster."""
    params = CreateRosterParams.from_values(values)
    dto = {k: v for k, v in params.group.items() if k not in ("id", "meta", "member", "quantity")}
    dto, _ = strip_references(dto, "Group")

    def region(tx: Region) -> tuple[str, int, int]:
        keys, created = patients_resolve_or_create(params.identifiers, context=context)
        members = [{"entity": {"reference": key}} for key in dict.fromkeys(keys)]
        body = {**dto, "member": members} if members else dto
        result = resource_create(resource_type="Group", body=body, context=context)
        tx.wrote(result.row.key, result.row.version_id)
        return result.row.key, result.row.version_id, created

    key, version, created = run_region(region, context=context)
    return output(
        ("group", "valueReference", {"reference": key}),
        ("groupVersion", "valueString", str(version)),
        ("created", "valueInteger", created),
    )
