"""The Group type handler: the store's hooks, answered by the roster storage strategy.

With ``GROUP_ROSTER_STORAGE = "clickhouse"`` the metadata store keeps the Group without
``member``; the roster is written as member events and streamed into reads from ClickHouse.
With ``"inline"`` a Group is stored whole, like any resource. ``groups.storage`` holds both.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fhirservice.store.handlers import ResourceHandler, VersionWrite
from groups.services import group_post_save
from groups.session import Replace
from groups.storage import roster_storage


class GroupHandler(ResourceHandler):
    """Group: roster split off (clickhouse mode) and validated on the fast path."""

    @property
    def external_element(self) -> str | None:  # type: ignore[override]
        """``member`` in clickhouse mode."""
        return roster_storage().external_element

    def decode(self, data: bytes) -> Any:
        """The Group as sent; its roster as the storage mode reads it."""
        return roster_storage().decode(data)

    def prepare(self, body: dict[str, Any]) -> tuple[dict[str, Any], Replace]:
        """The Group to store and its incoming roster (the write's roster change)."""
        return roster_storage().prepare(body)

    def patch(self, draft: VersionWrite, ops: list[dict[str, Any]]) -> None:
        """JSON Patch, member ops included, as the storage mode applies it."""
        roster_storage().patch(draft, ops)

    def external_chunks(
        self, row: Any, *, current: bool, in_bundle: bool
    ) -> Iterator[bytes] | None:
        """The roster as JSON member elements, streamed in reference order."""
        return roster_storage().chunks(row, current=current)


def on_resource_saved(sender: Any, write: VersionWrite, **kwargs: Any) -> None:
    """resource_saved receiver: the roster change of every Group write."""
    if write.resource_type == "Group":
        group_post_save(write)
