"""Transactional regions: ACID and serializable, with version checks and bounded retries.

A region runs in one metadata transaction:

- PostgreSQL runs it at ``SERIALIZABLE`` isolation: its serializable snapshot isolation also
  catches predicate conflicts ("no Patient with this identifier yet, so both create one").
- SQLite takes the write lock at ``BEGIN IMMEDIATE`` (see settings): regions run one after
  another, which is serializable by construction.
- MongoDB runs it as a multi-document transaction (snapshot isolation, write conflicts
  abort); reads are version-checked at commit so a changed read aborts the region too.

Every resource the region reads is recorded with its version; every write names the version
it read (compare-and-set), and reads are re-checked before commit. A lost race or a
serialization failure rolls the region back and runs it again, up to ``WRITE_RETRIES``
times. A version the *client* named that is not current is not retried: it answers 409
``MSG_VERSION_AWARE_CONFLICT`` with both versions in the diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fhirservice import db
from fhirservice.conf import fhir_settings
from fhirservice.errors import Conflict, VersionConflict
from fhirservice.models import StoredResource
from fhirservice.store.handlers import WriteContext
from fhirservice.store.selectors import resource_read
from fhirservice.store.services import WriteRace

T = TypeVar("T")

MSG_STALE_VERSION = (
    "{key}: the client named version {client}, but the server's current version is {server}"
)
MSG_REGION_RETRIES = "The operation kept conflicting with concurrent changes; try again"


class RegionRace(Exception):
    """A resource the region read changed before the region committed."""


class Region:
    """The reads and writes of one attempt of a transactional region."""

    def __init__(self, context: WriteContext) -> None:
        self.context = context
        self.read_versions: dict[str, int] = {}
        self.written: dict[str, int] = {}

    def read(self, resource_type: str, resource_id: str, *, lock: bool = False) -> StoredResource:
        """Read a current resource (404/410 as usual) and remember its version.

        ``lock``: the row is locked until commit (PostgreSQL ``FOR UPDATE``), for the one
        resource a region writes, read first. A serializable transaction's snapshot starts
        at its first statement: read unlocked, the row could be changed by a concurrent
        writer (a PATCH) while the region looks up its Patient, and the region's write then
        failed ("could not serialize access due to concurrent update") and ran again from
        the start. Locked first, such a writer waits for the region instead, and a region
        that waited and lost is retried having spent one statement. Its write takes the
        row as read (``group_members_change(locked=...)``) instead of reading it again.
        """
        row = resource_read(resource_type=resource_type, resource_id=resource_id, lock=lock)
        self.read_versions.setdefault(row.key, row.version_id)
        return row

    def expect(self, row: StoredResource, client_version: str | None) -> None:
        """409 MSG_VERSION_AWARE_CONFLICT when the client named another version."""
        if client_version is not None and client_version != str(row.version_id):
            raise VersionConflict(
                MSG_STALE_VERSION.format(key=row.key, client=client_version, server=row.version_id)
            )

    def wrote(self, key: str, version: int) -> None:
        """Record that the region itself produced ``version`` of ``key``.

        Its write was a compare-and-set on the version it replaced, and the row stays the
        region's until commit (PostgreSQL's row lock, SQLite's one writer, MongoDB's write
        conflicts), so :meth:`verify` does not read it again.
        """
        self.written[key] = version

    def verify(self) -> None:
        """Re-check every version read and not written since; raise RegionRace when one
        changed. A region that only read what it wrote sends no statement: re-reading its
        own write was a statement per $add-member, and one more read that PostgreSQL's
        serializable isolation tracks against every concurrent writer."""
        keys = [key for key in self.read_versions if key not in self.written]
        if not keys:
            return
        current = dict(StoredResource.objects.filter(key__in=keys).values_list("key", "version_id"))
        for key in keys:
            if current.get(key) != self.read_versions[key]:
                raise RegionRace(key)


def run_region(body: Callable[[Region], T], *, context: WriteContext) -> T:
    """Run ``body`` as a serializable, version-checked transaction, retried on races."""
    # PostgreSQL accepts SET TRANSACTION only before a transaction's first query: a region
    # nested in a caller's atomic block (e.g. a test case's) runs at that block's level.
    outermost = not db.in_transaction()

    def attempt() -> T:
        region = Region(context)
        if outermost:
            db.serializable()
        # Every error leaves the region and rolls it back whole (or runs it again): a
        # savepoint around each write in it (``store.services.run_write``) was two more round
        # trips per write that nothing ever rolled back to.
        with db.no_savepoints():
            result = body(region)
            region.verify()
        return result

    return db.run_retrying(
        attempt,
        races=(WriteRace, RegionRace),
        retries=fhir_settings.WRITE_RETRIES,
        exhausted=Conflict(MSG_REGION_RETRIES, detail_code="MSG_CONCURRENT_WRITE"),
    )
