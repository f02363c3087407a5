"""Export jobs, their files, and the Patient compartment index.

Portable across SQLite, PostgreSQL and MongoDB like the core's models: explicit string
primary keys, and a job is claimed by compare-and-set on ``attempt`` (docs/adr/0008), never
by a row lock.
"""

from __future__ import annotations

from django.db import models


class ExportJob(models.Model):
    """One ``$export`` request, from kick-off until its files expire."""

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Level(models.TextChoices):
        SYSTEM = "system"
        PATIENT = "patient"
        GROUP = "group"

    id = models.CharField(primary_key=True, max_length=32)
    level = models.CharField(max_length=8, choices=Level.choices)
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED)
    # The kick-off as the client sent it (the manifest's ``request``).
    request_url = models.TextField()
    # Who asked: only this client may poll, cancel and download (when FHIR_AUTH is on).
    client_id = models.CharField(max_length=200, blank=True, default="")
    # The data boundary the job reads within (when restricted: the caller had one).
    restricted = models.BooleanField(default=False)
    organization = models.CharField(max_length=64, blank=True, default="")
    actor = models.CharField(max_length=200, blank=True, default="")
    # Group exports: the Group and its version at kick-off (the roster read is as of it).
    group_id = models.CharField(max_length=64, blank=True, default="")
    group_version = models.PositiveBigIntegerField(null=True, blank=True)
    # The checked kick-off parameters (operations.export.parameters.ExportRequest.as_json).
    params = models.JSONField(default=dict)
    transaction_time = models.DateTimeField()
    created = models.DateTimeField(auto_now_add=True)
    finished = models.DateTimeField(null=True, blank=True)
    expires = models.DateTimeField(null=True, blank=True)
    # The claim: the attempt number a worker set when it took the job, and its last report.
    attempt = models.PositiveIntegerField(default=0)
    worker = models.CharField(max_length=200, blank=True, default="")
    heartbeat = models.DateTimeField(null=True, blank=True)
    resources = models.PositiveBigIntegerField(default=0, help_text="Resources written")
    progress = models.CharField(max_length=200, blank=True, default="")
    error_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.TextField(blank=True, default="")

    class Meta:
        indexes = [
            models.Index(fields=["state", "created"], name="export_state_created"),
            models.Index(fields=["client_id", "state"], name="export_client_state"),
        ]

    def __str__(self) -> str:
        return f"$export {self.id} ({self.state})"


class ExportFile(models.Model):
    """One NDJSON part a job wrote (in the ``exports`` storage)."""

    class Kind(models.TextChoices):
        OUTPUT = "output"
        DELETED = "deleted"
        ERROR = "error"

    # "<job>/<attempt>/<name>": the storage name as well.
    id = models.CharField(primary_key=True, max_length=200)
    job = models.ForeignKey(ExportJob, on_delete=models.CASCADE, related_name="files")
    attempt = models.PositiveIntegerField()
    kind = models.CharField(max_length=8, choices=Kind.choices)
    resource_type = models.CharField(max_length=64)
    name = models.CharField(max_length=100, help_text="The file name in the download URL")
    count = models.PositiveBigIntegerField()
    size = models.PositiveBigIntegerField()

    class Meta:
        indexes = [models.Index(fields=["job", "attempt"], name="export_file_job")]

    def __str__(self) -> str:
        return self.id


class CompartmentLink(models.Model):
    """A resource in a Patient's compartment (R4 Patient CompartmentDefinition).

    Written in every write transaction of a compartment type
    (:func:`operations.export.compartment.on_resource_saved`); a delete keeps the links of
    the last live version, so ``_since`` exports can list the deletion.
    """

    key = models.CharField(primary_key=True, max_length=230, help_text="Type/id>patient-id")
    resource_key = models.CharField(max_length=160)
    resource_type = models.CharField(max_length=64)
    patient_id = models.CharField(max_length=64)
    # The resource is in several Patients' compartments: an export meeting it for one of
    # them remembers it, so that it is written once (operations.export.runner).
    shared = models.BooleanField(default=False)

    class Meta:
        indexes = [
            models.Index(fields=["patient_id", "resource_type"], name="export_link_patient"),
            models.Index(fields=["resource_key"], name="export_link_resource"),
        ]

    def __str__(self) -> str:
        return self.key
