"""Backfill: move the rosters of inline Groups into ClickHouse member events.

For databases written with ``GROUP_ROSTER_STORAGE = "inline"`` (the roster inside the Group
body) and now switched to ``"clickhouse"``. Each Group with an inline roster gets one new
version without ``member``; its members become events. A run walks live Groups in key order
and keeps a checkpoint in the metadata store, so an interrupted run resumes after the last
Group it finished; Groups already moved are skipped (idempotent).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from django.db.models import QuerySet
from django.utils import timezone

from fhirservice.conf import fhir_settings
from fhirservice.errors import FhirError
from fhirservice.models import StoredResource
from fhirservice.store.content import without_server_meta
from fhirservice.store.handlers import VersionWrite, WriteContext
from fhirservice.store.json import loads
from fhirservice.store.services import write_version
from groups.maintenance.common import MaintenanceError, Progress, no_progress
from groups.middleware import members_written_mark
from groups.models import BackfillCheckpoint
from groups.outbox.record import member_events_record
from groups.selectors import clickhouse_required, roster_key
from groups.session import RosterSession
from groups.storage import parse_roster

BACKFILL_CHECKPOINT = "backfill_group_members"
INLINE_MARKER = '"member":'

MSG_INLINE_MODE = (
    "GROUP_ROSTER_STORAGE is 'inline': set it to 'clickhouse' before moving rosters there"
)


# -- one Group --------------------------------------------------------------------------------


def group_roster_backfill(*, group_id: str, context: WriteContext) -> int | None:
    """Move one inline Group's roster into member events: one new version of the Group.

    The new version's body has no ``member``; its roster becomes events (via the outbox,
    shipped after commit) and ``quantity`` counts its active members. Returns the number of
    members moved, or None when the Group is deleted or has no inline roster (already moved:
    idempotent). Older versions keep their inline bodies, so vread still shows them.
    """
    if fhir_settings.GROUP_ROSTER_STORAGE != "clickhouse":
        raise MaintenanceError(MSG_INLINE_MODE)
    moved: list[int] = []

    def build(draft: VersionWrite) -> None:
        body = without_server_meta(loads(draft.previous.body))
        if "member" not in body:
            draft.body = body  # identical content: write_version makes no version
            return
        incoming = parse_roster(body["member"])
        del body["member"]
        session = RosterSession(roster_key(draft.resource_id, draft.incarnation))
        # replace_all, not plain adds: ClickHouse may hold an older roster for this key (the
        # Group was written in clickhouse mode before the switch to inline).
        session.replace_all(incoming)
        member_events_record(write=draft, roster=session.roster_key, events=session.events)
        draft.body = {**body, "quantity": sum(not m.inactive for m in incoming.values())}
        draft.changed = True
        members_written_mark(draft.context)
        moved[:] = [len(incoming)]

    row = StoredResource.objects.filter(key=f"Group/{group_id}").first()
    if row is None or row.deleted or INLINE_MARKER not in row.body:
        return None
    with clickhouse_required():
        write_version(
            resource_type="Group",
            resource_id=group_id,
            method="PUT",
            context=context,
            build=build,
            must_exist=True,
        )
    return moved[0] if moved else None


def inline_member_count(group_id: str) -> int | None:
    """Members of a Group's inline roster (None: none stored inline); for dry runs."""
    row = StoredResource.objects.filter(key=f"Group/{group_id}", deleted=False).first()
    if row is None or INLINE_MARKER not in row.body:
        return None
    members = loads(row.body).get("member")
    # Counted, not validated: a dry run reports invalid rosters only when it tries them.
    return len(members) if isinstance(members, list) else None


# -- what is left to do -----------------------------------------------------------------------


def backfill_checkpoint() -> BackfillCheckpoint | None:
    """The stored checkpoint of the backfill, if a run has started."""
    return BackfillCheckpoint.objects.filter(name=BACKFILL_CHECKPOINT).first()


def backfill_checkpoint_reset() -> None:
    """Forget the checkpoint: the next run starts from the first Group."""
    BackfillCheckpoint.objects.filter(name=BACKFILL_CHECKPOINT).delete()


def backfill_remaining(*, after: str = "", group_ids: list[str] | None = None) -> int:
    """Live Groups the backfill still has to look at (after the checkpoint key)."""
    rows = StoredResource.objects.filter(resource_type="Group", deleted=False, key__gt=after)
    if group_ids is not None:
        rows = rows.filter(resource_id__in=group_ids)
    return rows.count()


def backfill_candidates(*, group_ids: list[str] | None = None) -> tuple[int, int]:
    """(Groups with an inline roster, their members): what a backfill would move."""
    rows = StoredResource.objects.filter(
        resource_type="Group", deleted=False, body__contains=INLINE_MARKER
    )
    if group_ids is not None:
        rows = rows.filter(resource_id__in=group_ids)
    groups = members = 0
    for group_id in rows.order_by("key").values_list("resource_id", flat=True).iterator():
        count = inline_member_count(group_id)
        if count is not None:
            groups += 1
            members += count
    return groups, members


# -- a run ------------------------------------------------------------------------------------


@dataclass
class BackfillReport:
    """``groups_backfill``: Groups moved, skipped and failed, and where the run stopped."""

    moved: int = 0
    members: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    last_key: str = ""
    resumed_from: str = ""
    resumed_groups: int = 0
    resumed_members: int = 0
    finished: bool = False
    seconds: float = 0.0


def _checkpoint_resume(report: BackfillReport) -> None:
    """Continue an unfinished run: start after its last key, keep its counts."""
    checkpoint = backfill_checkpoint()
    if checkpoint is not None and checkpoint.finished_at is None:
        report.resumed_from = report.last_key = checkpoint.last_key
        report.resumed_groups = checkpoint.groups_done
        report.resumed_members = checkpoint.members_done


def _checkpoint_save(report: BackfillReport, *, finished: bool = False) -> None:
    now = timezone.now()
    checkpoint = backfill_checkpoint() or BackfillCheckpoint(
        name=BACKFILL_CHECKPOINT, started_at=now
    )
    checkpoint.last_key = report.last_key
    checkpoint.groups_done = report.resumed_groups + report.moved
    checkpoint.members_done = report.resumed_members + report.members
    checkpoint.updated_at = now
    checkpoint.finished_at = now if finished else None
    checkpoint.save()


def _backfill_one(key: str, report: BackfillReport, actor: str) -> None:
    """Move one Group (by stored key) and count it as moved, skipped or failed."""
    group_id = key.partition("/")[2]
    try:
        moved = group_roster_backfill(
            group_id=group_id, context=WriteContext(actor=actor, source="backfill")
        )
    except FhirError as exc:
        if exc.status == 503:
            raise
        report.failed[group_id] = exc.diagnostics
        moved = None
    if moved is None:
        report.skipped += group_id not in report.failed
    else:
        report.moved += 1
        report.members += moved
    report.last_key = key


def _backfill_batches(
    rows: QuerySet,
    report: BackfillReport,
    *,
    batch_size: int,
    limit: int | None,
    actor: str,
    progress: Progress,
    checkpoint: bool,
) -> None:
    """Walk ``rows`` in key order after ``report.last_key``, a batch per query and save."""
    while True:
        keys = list(
            rows.filter(key__gt=report.last_key)
            .order_by("key")
            .values_list("key", flat=True)[:batch_size]
        )
        if not keys:
            report.finished = True
            return
        for key in keys:
            _backfill_one(key, report, actor)
            progress(1, moved=report.moved, members=report.members)
            if limit is not None and report.moved >= limit:
                if checkpoint:
                    _checkpoint_save(report)
                return
        if checkpoint:
            _checkpoint_save(report)


def groups_backfill(
    *,
    group_ids: list[str] | None = None,
    batch_size: int = 100,
    limit: int | None = None,
    actor: str = "backfill_group_members",
    progress: Progress = no_progress,
) -> BackfillReport:
    """Move the rosters of inline Groups into ClickHouse events, one version per Group.

    Walks live Groups in key order from the checkpoint (none when ``group_ids`` names the
    Groups: then exactly those are done and the checkpoint is left alone), ``batch_size``
    keys per query, and saves the checkpoint after every batch and when stopped by an
    error. ``limit`` stops after that many Groups moved. Groups whose roster is invalid are
    reported and skipped; ClickHouse being down stops the run.
    """
    if fhir_settings.GROUP_ROSTER_STORAGE != "clickhouse":
        raise MaintenanceError(MSG_INLINE_MODE)
    started = time.monotonic()
    report = BackfillReport()
    use_checkpoint = group_ids is None
    if use_checkpoint:
        _checkpoint_resume(report)
    progress(
        total=backfill_remaining(after=report.last_key, group_ids=group_ids),
        desc="backfill",
        unit="group",
    )
    rows = StoredResource.objects.filter(resource_type="Group", deleted=False)
    if group_ids is not None:
        rows = rows.filter(resource_id__in=group_ids)
    try:
        _backfill_batches(
            rows,
            report,
            batch_size=batch_size,
            limit=limit,
            actor=actor,
            progress=progress,
            checkpoint=use_checkpoint,
        )
    except BaseException:
        if use_checkpoint:
            _checkpoint_save(report)
        raise
    if use_checkpoint and report.finished:
        _checkpoint_save(report, finished=True)
    report.seconds = time.monotonic() - started
    return report
