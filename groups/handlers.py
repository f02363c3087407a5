"""The Group type handler: the roster leaves the stored body and comes back streamed.

With ``GROUP_ROSTER_STORAGE = "clickhouse"`` the metadata store keeps the Group without
``member``; the roster is written as member events (see ``groups.services``) and streamed
into reads from ClickHouse. With ``"inline"`` a Group is stored whole, like any resource.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain
from typing import Any

from fhirservice.conf import fhir_settings
from fhirservice.errors import BadRequest
from fhirservice.fhir.validation import validate_resource
from fhirservice.store.handlers import ResourceHandler, VersionWrite
from groups.members import Member, parse_members, render_member
from groups.selectors import clickhouse_required, iter_members_for_render, row_roster_key
from groups.services import MSG_ROSTER_NOT_LIST, group_patch, group_post_save

# Members per chunk of a streamed roster.
RENDER_BATCH = 1000


def clickhouse_rosters() -> bool:
    """Whether Group rosters live in ClickHouse (the default) rather than inline."""
    return fhir_settings.GROUP_ROSTER_STORAGE == "clickhouse"


def parse_roster(members: Any) -> dict[str, Member]:
    """Validate Group.member on the fast path; a set keyed by reference (last one wins)."""
    if not isinstance(members, list):
        raise BadRequest(
            MSG_ROSTER_NOT_LIST, expression="Group.member", detail_code="MSG_MEMBER_INVALID"
        )
    return parse_members(members, "Group.member")


class GroupHandler(ResourceHandler):
    """Group: roster split off (clickhouse mode) and validated on the fast path."""

    @property
    def external_element(self) -> str | None:  # type: ignore[override]
        """``member`` in clickhouse mode."""
        return "member" if clickhouse_rosters() else None

    def prepare(self, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The Group without its roster (validated by the models) and the parsed roster."""
        members = body.get("member")
        rest = {k: v for k, v in body.items() if k != "member"}
        roster = parse_roster(members) if members is not None else None
        validate_resource(rest)
        if not clickhouse_rosters():
            return body, None
        rest.pop("quantity", None)  # server-computed from the roster
        return rest, roster

    def patch(self, draft: VersionWrite, ops: list[dict[str, Any]]) -> None:
        """Member ops become events; other ops change the body (clickhouse mode)."""
        if not clickhouse_rosters():
            super().patch(draft, ops)
            return
        group_patch(draft, ops, validate=validate_resource)

    def external_chunks(
        self, row: Any, *, current: bool, in_bundle: bool
    ) -> Iterator[bytes] | None:
        """The roster as JSON member elements, streamed in reference order.

        The first member is fetched before returning, so an unreachable ClickHouse answers
        503 before the response starts.
        """
        key = row_roster_key(row)
        with clickhouse_required():
            stream = iter_members_for_render(key, as_of=None if current else row.version_id)
            first = next(stream, None)
        if first is None:
            return iter(())

        def chunks() -> Iterator[bytes]:
            # Members go out RENDER_BATCH at a time, comma-joined: one chunk per member
            # cost more in the response machinery than rendering it.
            batch: list[str] = []
            with clickhouse_required():
                for item in chain([first], stream):
                    if type(item) is str:
                        batch.append(item)
                    else:
                        batch.append(render_member(*item.rendered()).decode())
                    if len(batch) == RENDER_BATCH:
                        yield ",".join(batch).encode()
                        batch = []
            if batch:
                yield ",".join(batch).encode()

        return chunks()


def on_resource_saved(sender: Any, write: VersionWrite, **kwargs: Any) -> None:
    """resource_saved receiver: Group roster processing (clickhouse mode only)."""
    if write.resource_type == "Group" and clickhouse_rosters():
        group_post_save(write)
