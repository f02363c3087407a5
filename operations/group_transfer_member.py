"""``Group/$transfer-member``: move a member between two Groups atomically.

The member leaves the source and joins the target in one serializable transaction, with its
membership content (period, inactive) unchanged: whatever runs concurrently, it is never in
both Groups or in neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhirservice.errors import BadRequest
from fhirservice.fhir.operation_definition import OperationDef, ParamDef
from fhirservice.rest.parameters import exactly_one, output
from fhirservice.store.handlers import WriteContext
from groups.services import RosterDelta, group_members_change
from operations.patients import patient_by_identifier
from operations.roster import current_member
from operations.transactions import Region, run_region

MSG_SAME_GROUP = "source and target must be different Groups"

OPERATION = OperationDef(
    code="transfer-member",
    resource="Group",
    type=True,
    affects_state=True,
    title="Transfer member",
    description="Moves a member from the source Group to the target Group atomically.",
    parameters=(
        ParamDef(
            "source", "in", 1, "1", "Reference", "The Group the member leaves", target=("Group",)
        ),
        ParamDef(
            "target", "in", 1, "1", "Reference", "The Group the member joins", target=("Group",)
        ),
        ParamDef("identifier", "in", 0, "1", "Identifier", "Identifier of the member Patient"),
        ParamDef("member", "in", 0, "1", "Reference", "The member as a reference"),
        ParamDef("sourceVersion", "in", 0, "1", "string", "The source version the client read"),
        ParamDef("targetVersion", "in", 0, "1", "string", "The target version the client read"),
        ParamDef("sourceVersion", "out", 1, "1", "string", "The source's version afterwards"),
        ParamDef("targetVersion", "out", 1, "1", "string", "The target's version afterwards"),
    ),
)


@dataclass(frozen=True)
class TransferParams:
    """Typed inputs of $transfer-member."""

    source: str
    target: str
    identifier: dict[str, Any] | None
    member: dict[str, Any] | None
    source_version: str | None
    target_version: str | None

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> TransferParams:
        """Build from checked Parameters values."""
        exactly_one(values, "identifier", "member")
        source = values["source"]["reference"].split("/")[-1]
        target = values["target"]["reference"].split("/")[-1]
        if source == target:
            raise BadRequest(MSG_SAME_GROUP, detail_code="MSG_BAD_FORMAT")
        return cls(
            source,
            target,
            values["identifier"],
            values["member"],
            values["sourceVersion"],
            values["targetVersion"],
        )


def handle(
    *, values: dict[str, Any], resource_id: str | None, context: WriteContext
) -> dict[str, Any]:
    """Run $transfer-member."""
    params = TransferParams.from_values(values)

    def region(tx: Region) -> tuple[int, int]:
        # A fixed order (by id) of the two Group writes keeps concurrent transfers in
        # opposite directions from deadlocking each other.
        source = tx.read("Group", params.source)
        target = tx.read("Group", params.target)
        tx.expect(source, params.source_version)
        tx.expect(target, params.target_version)
        ref = (
            patient_by_identifier(params.identifier)
            if params.identifier is not None
            else params.member["reference"]
        )
        member = current_member(source, ref)
        versions = {}
        for group, delta in sorted(
            [(source, RosterDelta(removes=[member.ref])), (target, RosterDelta(puts=[member]))],
            key=lambda pair: pair[0].key,
        ):
            result = group_members_change(
                group_id=group.resource_id, delta=delta, context=context, if_match=group.version_id
            )
            tx.wrote(group.key, result.row.version_id)
            versions[group.key] = result.row.version_id
        return versions[source.key], versions[target.key]

    source_version, target_version = run_region(region, context=context)
    return output(
        ("sourceVersion", "valueString", str(source_version)),
        ("targetVersion", "valueString", str(target_version)),
    )
