"""``Group/[id]/$remove-member``: discharge a member, removing or inactivating it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhirservice.errors import BadRequest, UnprocessableEntity
from fhirservice.fhir.operation_definition import OperationDef, ParamDef
from fhirservice.rest.parameters import exactly_one, output
from fhirservice.store.handlers import WriteContext
from groups.services import RosterDelta, group_members_change
from operations.patients import patient_by_identifier
from operations.roster import current_member
from operations.transactions import Region, run_region

MSG_BAD_MODE = "mode must be remove or inactivate, not {mode!r}"

OPERATION = OperationDef(
    code="remove-member",
    resource="Group",
    instance=True,
    affects_state=True,
    title="Remove member",
    description="Removes a member from the Group (mode=remove) or marks it inactive "
    "(mode=inactivate). The member is named by a Patient identifier or by a "
    "reference. One serializable transaction; a stale groupVersion answers 409.",
    parameters=(
        ParamDef("identifier", "in", 0, "1", "Identifier", "Identifier of the member Patient"),
        ParamDef("member", "in", 0, "1", "Reference", "The member as a reference"),
        ParamDef("mode", "in", 0, "1", "code", "remove (default) or inactivate"),
        ParamDef(
            "groupVersion",
            "in",
            0,
            "1",
            "string",
            "The Group version the client read; another current version answers 409",
        ),
        ParamDef("groupVersion", "out", 1, "1", "string", "The Group's version afterwards"),
    ),
)


@dataclass(frozen=True)
class RemoveMemberParams:
    """Typed inputs of $remove-member."""

    identifier: dict[str, Any] | None
    member: dict[str, Any] | None
    mode: str
    group_version: str | None

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> RemoveMemberParams:
        """Build from checked Parameters values."""
        exactly_one(values, "identifier", "member")
        mode = values["mode"] or "remove"
        if mode not in ("remove", "inactivate"):
            raise BadRequest(
                MSG_BAD_MODE.format(mode=mode),
                detail_code="MSG_BAD_FORMAT",
                expression="Parameters.parameter(mode)",
            )
        return cls(values["identifier"], values["member"], mode, values["groupVersion"])


def handle(
    *, values: dict[str, Any], resource_id: str | None, context: WriteContext
) -> dict[str, Any]:
    """Run $remove-member on Group ``resource_id``."""
    params = RemoveMemberParams.from_values(values)

    def region(tx: Region) -> int:
        group = tx.read("Group", resource_id, lock=True)  # first: see Region.read
        tx.expect(group, params.group_version)
        ref = (
            patient_by_identifier(params.identifier)
            if params.identifier is not None
            else params.member["reference"]
        )
        member = current_member(group, ref)
        if params.mode == "remove":
            delta = RosterDelta(removes=[member.ref])
        elif member.inactive:
            raise UnprocessableEntity(
                f"{ref} is already inactive in {group.key}", detail_code="MSG_MEMBER_INACTIVE"
            )
        else:
            delta = RosterDelta(puts=[member._replace(inactive=True)])
        result = group_members_change(
            group_id=group.resource_id,
            delta=delta,
            context=context,
            if_match=group.version_id,
            locked=group,
        )
        tx.wrote(group.key, result.row.version_id)
        return result.row.version_id

    version = run_region(region, context=context)
    return output(("groupVersion", "valueString", str(version)))
