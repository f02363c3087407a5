"""Admin pages of export jobs: state, progress, files and errors; cancel from the list."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from operations.export.models import ExportFile, ExportJob
from operations.export.services import ACTIVE, export_job_cancel


class ExportFileInline(admin.TabularInline):
    """The parts a job wrote (its current attempt's are in its manifest)."""

    model = ExportFile
    fields = ("attempt", "kind", "resource_type", "name", "count", "size")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Files are written by workers only."""
        return False


@admin.register(ExportJob)
class ExportJobAdmin(admin.ModelAdmin):
    """Read-only job pages; the one change is the cancel action."""

    list_display = ("id", "level", "state", "client_id", "progress", "resources", "created")
    list_filter = ("state", "level")
    search_fields = ("id", "client_id", "group_id")
    ordering = ("-created",)
    inlines = [ExportFileInline]
    actions = ["cancel"]
    readonly_fields = [field.name for field in ExportJob._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Jobs start with a kick-off request only."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Jobs are shown, not edited (cancel is an action)."""
        return False

    @admin.action(description="Cancel the selected exports (and delete their files)")
    def cancel(self, request: HttpRequest, queryset: QuerySet[ExportJob]) -> None:
        """Cancel queued, running or finished jobs: a running worker stops at its next
        report; the files go now."""
        jobs = list(queryset.exclude(state=ExportJob.State.CANCELLED))
        for job in jobs:
            export_job_cancel(job=job)
        active = sum(job.state in ACTIVE for job in jobs)
        self.message_user(
            request, f"Cancelled {len(jobs)} exports ({active} queued or running)", messages.SUCCESS
        )
