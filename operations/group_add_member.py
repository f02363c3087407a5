"""``Group/[id]/$add-member``: enrol a Patient, named by identifier or sent as a DTO."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhirservice.fhir.operation_definition import OperationDef, ParamDef
from fhirservice.rest.parameters import exactly_one, output
from fhirservice.store.handlers import WriteContext
from groups.members import Member
from groups.services import RosterDelta, group_members_change
from operations.patients import patient_by_identifier, patient_match_or_create
from operations.transactions import Region, run_region

OPERATION = OperationDef(
    code="add-member",
    resource="Group",
    instance=True,
    affects_state=True,
    title="Add member",
    description="Adds a Patient to the Group. The Patient is named by an identifier of an "
    "existing Patient, or sent as a DTO that the server matches by its "
    "identifiers and creates when none matches. Runs as one serializable "
    "transaction; a stale groupVersion answers 409.",
    parameters=(
        ParamDef(
            "patient",
            "in",
            0,
            "1",
            "Patient",
            "Patient DTO, matched by its identifiers; created when none matches",
        ),
        ParamDef("identifier", "in", 0, "1", "Identifier", "Identifier of an existing Patient"),
        ParamDef("period", "in", 0, "1", "Period", "When the membership applies"),
        ParamDef(
            "groupVersion",
            "in",
            0,
            "1",
            "string",
            "The Group version the client read; another current version answers 409",
        ),
        ParamDef(
            "member", "out", 1, "1", "Reference", "The Patient that was added", target=("Patient",)
        ),
        ParamDef("groupVersion", "out", 1, "1", "string", "The Group's version afterwards"),
    ),
)


@dataclass(frozen=True)
class AddMemberParams:
    """Typed inputs of $add-member."""

    patient: dict[str, Any] | None
    identifier: dict[str, Any] | None
    period: dict[str, Any] | None
    group_version: str | None

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> AddMemberParams:
        """Build from checked Parameters values (exactly one of patient and identifier)."""
        exactly_one(values, "patient", "identifier")
        return cls(
            values["patient"], values["identifier"], values["period"], values["groupVersion"]
        )


def handle(
    *, values: dict[str, Any], resource_id: str | None, context: WriteContext
) -> dict[str, Any]:
    """Run $add-member on Group ``resource_id``."""
    params = AddMemberParams.from_values(values)
    period = params.period or {}

    def region(tx: Region) -> tuple[str, int]:
        group = tx.read("Group", resource_id, lock=True)  # first: see Region.read
        tx.expect(group, params.group_version)
        if params.identifier is not None:
            patient = patient_by_identifier(params.identifier)
        else:
            patient, _, _ = patient_match_or_create(params.patient, context=context)
        member = Member(
            ref=patient,
            member_type="Patient",
            period_start=period.get("start", ""),
            period_end=period.get("end", ""),
        )
        result = group_members_change(
            group_id=group.resource_id,
            delta=RosterDelta(puts=[member]),
            context=context,
            if_match=group.version_id,
            locked=group,
        )
        tx.wrote(group.key, result.row.version_id)
        return patient, result.row.version_id

    patient, version = run_region(region, context=context)
    return output(
        ("member", "valueReference", {"reference": patient}),
        ("groupVersion", "valueString", str(version)),
    )
