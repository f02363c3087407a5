"""The member event outbox: member events committed with their Group version.

A write that changes a roster stores its member events here, in the same metadata
transaction as the version itself (one row per ``MEMBER_BATCH_SIZE`` events). After commit
the rows are shipped to ClickHouse and marked shipped. Rows that are not shipped yet (the
ClickHouse server was down, the process died) are shipped by ``ship_member_events`` or the
next write, and roster reads merge them, so a client always reads its own writes.
Shipped rows stay: they are the metadata store's own record of every member event, from
which ``repair_group_members`` can rebuild ClickHouse.
"""

from __future__ import annotations

from django.db import models

from fhirservice.models import StoredResource


class MemberOutbox(models.Model):
    """One batch of member events of one Group version."""

    key = models.CharField(primary_key=True, max_length=200, help_text="roster key/version/chunk")
    roster_key = models.CharField(max_length=120)
    group_id = models.CharField(max_length=64)
    version = models.PositiveBigIntegerField()
    chunk = models.PositiveIntegerField(default=0)
    event_count = models.PositiveIntegerField()
    # [[member_ref, event_type, seq, member_type, period_start, period_end, inactive, extra]]
    events = models.TextField()
    recorded_at = models.DateTimeField()
    request_id = models.CharField(max_length=64, blank=True, default="")
    source = models.CharField(max_length=32, blank=True, default="")
    actor = models.CharField(max_length=200, blank=True, default="")
    # Written while ClickHouse was unreachable: the quantities of this version and of every
    # later one are corrected once ClickHouse answers again (services.roster_quantities_recount).
    recount = models.BooleanField(default=False)
    shipped_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        indexes = [
            models.Index(fields=["roster_key", "shipped_at"], name="outbox_roster_shipped"),
            models.Index(fields=["shipped_at", "recorded_at"], name="outbox_pending"),
            models.Index(fields=["group_id", "version"], name="outbox_group_version"),
            # The relay looks for versions still to recount on every round.
            models.Index(fields=["recount", "roster_key"], name="outbox_recount"),
        ]

    def __str__(self) -> str:
        state = "shipped" if self.shipped_at else "pending"
        return f"{self.key} ({self.event_count} events, {state})"


class BackfillCheckpoint(models.Model):
    """Where a roster backfill (inline Groups into ClickHouse events) got to.

    ``last_key`` is the highest ``Group/id`` whose roster is known to be moved; a resumed
    run starts after it. Losing the checkpoint costs time only: a Group already moved has no
    ``member`` in its body and is skipped.
    """

    name = models.CharField(primary_key=True, max_length=64)
    last_key = models.CharField(max_length=160, blank=True, default="")
    groups_done = models.PositiveBigIntegerField(default=0)
    members_done = models.PositiveBigIntegerField(default=0)
    started_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        state = "finished" if self.finished_at else f"after {self.last_key or 'start'}"
        return f"{self.name}: {self.groups_done} groups, {state}"


class GroupResource(StoredResource):
    """The stored Groups, as the admin lists them (rows of ``StoredResource`` of type Group)."""

    class Meta:
        proxy = True
        verbose_name = "FHIR Group"
        verbose_name_plural = "FHIR Groups"

    def __str__(self) -> str:
        return f"Group/{self.resource_id}"
