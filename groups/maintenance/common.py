"""What the maintenance jobs share: their error, progress callbacks, roster keys, mutations."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fhirservice.models import StoredResource
from groups.repository import MemberEventRepository

MUTATION_TIMEOUT = 300.0

MSG_NO_GROUP = "No Group with id {id!r}"
MSG_MUTATION_TIMEOUT = (
    "ClickHouse mutations of the member tables are still running after {seconds:.0f} s; "
    "see system.mutations, then run the repair again"
)


class MaintenanceError(Exception):
    """A maintenance step cannot run (unknown Group, wrong mode, mutations stuck)."""


Progress = Callable[..., None]


def no_progress(*_: Any, **__: Any) -> None:
    """Progress sink for callers that show none."""


def split_key(key: str) -> tuple[str, int | None]:
    """(group id, incarnation) of a roster key; incarnation None when malformed."""
    group_id, _, incarnation = key.rpartition("/")
    return group_id, int(incarnation) if incarnation.isdigit() and group_id else None


def group_row(group_id: str) -> StoredResource:
    """The stored row of a Group (deleted ones too); MaintenanceError when there is none."""
    row = StoredResource.objects.filter(key=f"Group/{group_id}").first()
    if row is None:
        raise MaintenanceError(MSG_NO_GROUP.format(id=group_id))
    return row


def wait_for_mutations(
    repository: MemberEventRepository, *, timeout: float = MUTATION_TIMEOUT
) -> float:
    """Block until no mutation of the member tables is running; the seconds waited."""
    started = time.monotonic()
    delay = 0.02
    while repository.pending_mutations():
        waited = time.monotonic() - started
        if waited > timeout:
            raise MaintenanceError(MSG_MUTATION_TIMEOUT.format(seconds=waited))
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return time.monotonic() - started
