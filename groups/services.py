"""Roster writes: where every Group write reaches its roster.

A Group write carries one roster change (``groups.session.RosterChange``), applied by the
storage strategy (``groups.storage``) inside the write's transaction:

- POST, PUT, transaction Bundle entries and operations reach :func:`group_post_save` (the
  ``resource_saved`` receiver) with a whole roster (``Replace``) or a delta (``RosterDelta``);
- PATCH applies its member ops while building the version (``ClickHouseRosters.patch``) and
  sets the members-written flag (``groups.middleware``), so the post-save path skips it.

Events are stored in the outbox inside the version's transaction and shipped after commit
(``groups.outbox``).
"""

from __future__ import annotations

from typing import Any

from fhirservice.models import StoredResource
from fhirservice.store.content import without_server_meta
from fhirservice.store.handlers import VersionWrite, WriteContext
from fhirservice.store.json import loads
from fhirservice.store.services import WriteResult, write_version
from groups.middleware import members_written
from groups.session import Replace, RosterDelta
from groups.storage import roster_storage


def group_members_change(
    *,
    group_id: str,
    delta: RosterDelta,
    context: WriteContext,
    if_match: int | None = None,
    locked: StoredResource | None = None,
) -> WriteResult:
    """A new Group version that applies ``delta`` to the roster (body otherwise unchanged).

    The delta travels as the write's payload to the post-save path, so its events go through
    the same outbox and shipping as every other roster write. ``locked``: the Group's current
    row as the caller's transaction read it locked (``write_version``).
    """

    def build(draft: VersionWrite) -> None:
        draft.body = without_server_meta(loads(draft.previous.body))
        draft.payload = delta

    return write_version(
        resource_type="Group",
        resource_id=group_id,
        method="PATCH",
        context=context,
        build=build,
        if_match=if_match,
        must_exist=True,
        locked=locked,
    )


def group_post_save(write: VersionWrite) -> None:
    """Apply a write's roster change: the incoming roster (``write.payload``: a ``Replace``,
    whose members are None when the body had no ``member``) or an operation's delta.

    Skipped when the request already wrote its member events (the members-written flag set
    by PATCH). Runs for POST, PUT, transaction Bundle entries, the admin and operations.
    """
    if members_written(write.context) or write.deleted:
        return
    change: Any = write.payload if write.payload is not None else Replace(None)
    roster_storage().write(write, change)
