"""Recording a write's member events in the outbox, inside the write's own transaction.

The rows commit with the Group version (nothing acknowledged is lost: ADR 0004); once the
transaction commits, ``groups.outbox.background.after_commit`` has them shipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from django.utils import timezone

from fhirservice import db
from fhirservice.conf import fhir_settings
from fhirservice.store.handlers import VersionWrite
from fhirservice.store.rows import insert_rows
from groups.digest import digests
from groups.models import MemberOutbox
from groups.outbox import background


def member_events_record(
    *, write: VersionWrite, roster: str, events: Sequence[list[Any]], recount: bool = False
) -> list[str]:
    """Store a version's member events in the outbox (inside its transaction) and ship them
    after commit. Returns the outbox keys.

    A write of one outbox row hands it to ``write.rows``: ``write_version`` stores it with
    the version. Larger writes insert their rows here, one at a time."""
    if not events:
        return []
    size = fhir_settings.MEMBER_BATCH_SIZE
    moment = timezone.now()
    context = write.context
    chunks = [events[start : start + size] for start in range(0, len(events), size)]
    keys = []
    for chunk, part in enumerate(chunks):
        row = MemberOutbox(
            key=f"{roster}/{write.version_id}/{chunk}",
            roster_key=roster,
            group_id=write.resource_id,
            version=write.version_id,
            chunk=chunk,
            event_count=len(part),
            events=orjson.dumps(list(part)).decode(),  # a list: events may make theirs
            recorded_at=moment,
            request_id=context.request_id,
            source=context.source,
            actor=context.actor,
            recount=recount,
        )
        keys.append(row.key)
        if len(chunks) == 1:
            # The one row of a small write (every member PATCH and operation) is stored
            # with the version's rows: on PostgreSQL in the statement of its UPDATE and
            # history row (``rows.update_row``), one round trip instead of three.
            write.rows.append((MemberOutbox, [row]))
        else:
            # One INSERT per row, not bulk_create: on PostgreSQL, Django 5.2 bulk-inserts
            # through UNNEST(array), and psycopg escapes array elements in Python (a regex
            # substitution per quote character): 4 s for one 10^5-member create's 6 MB of
            # events, 0.2 s this way. Each row's JSON goes once it is stored (a 10^6-member
            # create's is ~67 MB). Through the statement compiled once per process
            # (``rows.insert_rows``): the ORM's ``save`` was ~7% of a served PATCH +1's CPU.
            insert_rows(MemberOutbox, [row])
    digests.note_write(roster, write.version_id, events)
    known = None
    if len(events) >= size:
        # Shipped before the answer (see background.after_commit): from the events in hand,
        # not read back and decoded from the outbox (~1 s of a 10^6-member create).
        known = dict(zip(keys, chunks, strict=True))
    db.on_commit(lambda: background.after_commit(roster, keys, events=len(events), known=known))
    return keys
