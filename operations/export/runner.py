"""What one export job writes: NDJSON parts per resource type, from the metadata store.

The job runs as its client (``fhirservice.access.acting_as``), so every read stays inside the
client's organization boundary exactly as its searches do. It reads the data **as of the
kick-off's transactionTime**: a resource changed later is written in the version current
then (from its history), one deleted later is still written, one created later is not.

- A system export walks each type's rows in id order, a chunk at a time.
- A Patient or Group export walks the Patients a chunk at a time (a Group: its roster as of
  the Group version current at kick-off, read from the member store page by page, never
  whole, or from that version's body when it holds its roster, ``GROUP_ROSTER_STORAGE=
  inline``; a Patient export: every Patient; either cut down by ``patient``), writes those
  Patients, then the resources in their compartments (``CompartmentLink``), and last the
  Patients whose ``link`` names one of them (in their compartments too) that are not
  exported Patients themselves; a Patient export without ``patient`` writes every Patient
  anyway.

``_typeFilter`` runs the service's search, which reads the current search index: for a
resource unchanged since the kick-off that is its state then, so the filter applies as of
transactionTime. A resource changed or deleted after the kick-off is written in its version
then, but its filter ran on its current state (a deleted one matches nothing); each such
resource gets a warning OperationOutcome in the manifest's ``error`` files
(:data:`MSG_TYPE_FILTER_CURRENT`), so the client knows which lines to check.

``_since`` keeps resources changed since then, except on a Group export for members who
joined the Group after ``_since`` (not in the roster of the Group version current at
``_since``): all of their data is written, as if they were new to the client. Deletions
since ``_since`` go to ``deleted`` as transaction Bundles with one ``DELETE`` entry each.

Parts are temporary files until full (``EXPORT_FILE_MAX_BYTES``) or the job's end, then
saved to the ``exports`` storage and recorded. An interrupted attempt is not resumed: the
next claim deletes its parts and starts again (docs/adr/0008-export-jobs.md).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import IO, Any, NamedTuple

from django.core.files import File
from django.db import connection
from django.db.models import Case, F, IntegerField, Lookup, Q, Value, When

from fhirservice.access import Access, acting_as
from fhirservice.access.boundaries import visible_q
from fhirservice.conf import fhir_settings
from fhirservice.models import ResourceVersion, StoredResource, minute_of
from fhirservice.rest.rendering import render_resource
from fhirservice.search.query import search_keys
from fhirservice.store.json import dumps
from fhirservice.store.selectors import resource_vread
from groups.selectors import iter_roster_as_of, row_roster_key
from groups.storage import inline_roster, roster_storage
from operations.export.models import CompartmentLink, ExportFile, ExportJob
from operations.export.parameters import ExportRequest
from operations.export.services import (
    export_file_name,
    export_file_record,
    export_job_report,
    export_storage,
)

MSG_TYPE_FILTER_CURRENT = (
    "{key} changed after the kick-off: _typeFilter was evaluated on its current state, "
    "not on the version as of transactionTime ({outcome})"
)
MSG_TYPE_FILTER_WRITTEN = "written in its version then"
MSG_TYPE_FILTER_LEFT_OUT = "left out"


# Where a version's lastUpdated falls for the job: inside its window, before ``_since``,
# after ``_until``, or after the kick-off (then the version current at kick-off is written).
IN_RANGE, BEFORE_SINCE, AFTER_UNTIL, AFTER_KICK_OFF = range(4)


class Row(NamedTuple):
    """One version as the export reads it: the columns it needs, without a model instance
    (building 10^5 model instances was a third of an export's time). ``when``: where its
    lastUpdated falls (IN_RANGE …), decided by the database for current rows rather than
    by parsing a timestamp per row (4 of the 9 ms of CPU a 1,000-row chunk query cost on
    PostgreSQL). ``current``: read from the current rows (a Group's roster then comes as
    current), else from the history."""

    resource_type: str
    resource_id: str
    version_id: int
    incarnation: int
    deleted: bool
    body: str
    when: int
    current: bool


COLUMNS = (
    "resource_type",
    "resource_id",
    "version_id",
    "incarnation",
    "deleted",
    "body",
)


# Separates the values of one_of's single text parameter: a control character, which no id
# or key holds (values with it fall back to the array below).
_SEPARATOR = "\x1f"


class _AnyOf(Lookup):
    """``field = ANY(…)``: the values as one parameter (PostgreSQL). Joined into one text
    split by ``string_to_array``: psycopg quoted each element of a list parameter in
    Python (15% of the worker's CPU after the change to ``= ANY``)."""

    lookup_name = "export_any_of"
    prepare_rhs = False

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, list[Any]]:
        """The condition and its parameters."""
        lhs, params = self.process_lhs(compiler, connection)
        values = list(self.rhs)
        if any(_SEPARATOR in value for value in values):
            return f"{lhs} = ANY(%s)", [*params, values]
        return (
            f"{lhs} = ANY(string_to_array(%s, %s))",
            [*params, _SEPARATOR.join(values), _SEPARATOR],
        )


def one_of(field: str, values: list[str]) -> Q | Lookup:
    """``field IN values``; on PostgreSQL ``field = ANY`` of one parameter: psycopg binds
    parameters on the client, and with 1,000 placeholders it parsed the query's text and
    quoted each value on every chunk (a fifth of an export's CPU, bench.export)."""
    if connection.vendor == "postgresql":
        return _AnyOf(F(field), values)
    return Q(**{f"{field}__in": values})


class WorkerStopping(Exception):
    """The worker's process is stopping: the job goes back to the queue."""


class Part:
    """The NDJSON part being filled for one (kind, type); saved when full or at the end."""

    def __init__(self, job: ExportJob, kind: str, resource_type: str) -> None:
        self.job, self.kind, self.resource_type = job, kind, resource_type
        self.number = 0
        self.file: IO[bytes] | None = None
        self.count = self.size = 0
        self.max_bytes = fhir_settings.EXPORT_FILE_MAX_BYTES

    def write(self, chunks: bytes | Iterator[bytes]) -> None:
        """Append one resource as one line."""
        if self.file is None:
            self.file = tempfile.TemporaryFile()
            self.count = self.size = 0
        if isinstance(chunks, bytes):
            line = chunks + b"\n"  # one write call per line: most lines are one chunk
            self.file.write(line)
            self.size += len(line)
        else:
            for chunk in chunks:
                self.file.write(chunk)
                self.size += len(chunk)
            self.file.write(b"\n")
            self.size += 1
        self.count += 1
        if self.size >= self.max_bytes:
            self.save()

    def save(self) -> None:
        """Save the part to the storage and record it (nothing when it is empty)."""
        if self.file is None:
            return
        self.number += 1
        prefix = {ExportFile.Kind.DELETED: "deleted.", ExportFile.Kind.ERROR: "error."}.get(
            self.kind, ""
        )
        name = f"{prefix}{self.resource_type}.{self.number}.ndjson"
        self.file.seek(0)
        export_storage().save(export_file_name(job=self.job, name=name), File(self.file))
        export_file_record(
            job=self.job,
            kind=self.kind,
            resource_type=self.resource_type,
            name=name,
            count=self.count,
            size=self.size,
        )
        self.file.close()
        self.file = None


@dataclass
class Writer:
    """Every part of a job, the resources written, and the lease reports."""

    job: ExportJob
    request: ExportRequest
    stopping: threading.Event | None = None
    parts: dict[tuple[str, str], Part] = field(default_factory=dict)
    written: int = 0

    def _part(self, kind: str, resource_type: str) -> Part:
        key = (kind, resource_type)
        if key not in self.parts:
            self.parts[key] = Part(self.job, kind, resource_type)
        return self.parts[key]

    def resource(self, row: Row) -> None:
        """Write one resource (``_elements`` applied)."""
        elements = self.request.elements_for(row.resource_type)
        body = render_resource(row, current=row.current, elements=elements)
        self._part(ExportFile.Kind.OUTPUT, row.resource_type).write(body)
        self.written += 1

    def deletion(self, row: Row) -> None:
        """Write one deletion (a transaction Bundle with a DELETE entry)."""
        url = f"{row.resource_type}/{row.resource_id}"
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"request": {"method": "DELETE", "url": url}}],
        }
        self._part(ExportFile.Kind.DELETED, "Bundle").write(dumps(bundle))

    def warning(self, text: str) -> None:
        """Write one warning (an OperationOutcome line of the manifest's ``error`` files)."""
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "warning", "code": "informational", "diagnostics": text}],
        }
        self._part(ExportFile.Kind.ERROR, "OperationOutcome").write(dumps(outcome))

    def report(self, progress: str) -> None:
        """Renew the lease (raises JobLost when the job is no longer this attempt's, and
        WorkerStopping when this worker was told to stop)."""
        if self.stopping is not None and self.stopping.is_set():
            raise WorkerStopping(self.job.pk)
        export_job_report(job=self.job, resources=self.written, progress=progress)

    def close(self) -> None:
        """Save every part still open."""
        for part in self.parts.values():
            part.save()


class Export:
    """One attempt at one job."""

    def __init__(self, job: ExportJob, stopping: threading.Event | None = None) -> None:
        self.job = job
        self.request = ExportRequest.from_json(job.params)
        self.writer = Writer(job, self.request, stopping)
        self.chunk = fhir_settings.EXPORT_CHUNK
        # Resources in the compartments of several Patients already written: only these can
        # come up again in a later chunk (CompartmentLink.shared), so only these are kept.
        self.shared: set[str] = set()
        moment = job.transaction_time
        until = self.request.until
        self.until = min(until, moment) if until else moment
        organization = job.organization if job.restricted else None
        self.access = Access(client_id=job.client_id, organization=organization, actor=job.actor)
        self._sees = self.access.sees
        # _when's classification of a current row's lastUpdated, computed by the database.
        whens = [
            When(last_updated__gt=moment, then=Value(AFTER_KICK_OFF)),
            When(last_updated__gt=self.until, then=Value(AFTER_UNTIL)),
        ]
        if self.request.since is not None:
            whens.append(When(last_updated__lt=self.request.since, then=Value(BEFORE_SINCE)))
        self._when_sql = Case(*whens, default=Value(IN_RANGE), output_field=IntegerField())

    def run(self) -> int:
        """Write the whole export; the number of resources written."""
        with acting_as(self.access):
            if self.job.level == ExportJob.Level.SYSTEM:
                self._system()
            else:
                self._patients()
        self.writer.close()
        return self.writer.written

    # --- what is written of a batch of rows ------------------------------------------------

    def _when(self, last_updated: datetime) -> int:
        """Where a lastUpdated falls (the database's _when_sql, for history rows)."""
        if last_updated > self.job.transaction_time:
            return AFTER_KICK_OFF
        if last_updated > self.until:
            return AFTER_UNTIL
        if self.request.since is not None and last_updated < self.request.since:
            return BEFORE_SINCE
        return IN_RANGE

    def _as_of(self, rows: list[Row]) -> list[Row]:
        """Each row as it was at transactionTime (rows changed since: their version then;
        rows created since: left out)."""
        out: list[Row] = []
        for row in rows:
            if row.when != AFTER_KICK_OFF:
                out.append(row)
                continue
            then = (
                ResourceVersion.objects.filter(
                    resource_type=row.resource_type,
                    resource_id=row.resource_id,
                    last_updated__lte=self.job.transaction_time,
                )
                .order_by("-version_id")
                .values_list(*COLUMNS, "last_updated")
                .first()
            )
            if then is not None:
                out.append(Row(*then[:-1], when=self._when(then[-1]), current=False))
        return out

    def _emit(self, rows: list[Row], *, all_data: set[str] | None = None) -> None:
        """Write rows as of transactionTime, within ``_since``/``_until`` (keys in
        ``all_data`` ignore ``_since``), through the type's ``_typeFilter``."""
        live: list[Row] = []
        for row in self._as_of(rows):
            if row.when == AFTER_UNTIL:
                continue
            if row.when == BEFORE_SINCE and (
                f"{row.resource_type}/{row.resource_id}" not in (all_data or ())
            ):
                continue
            if row.deleted:
                if self.request.since is not None:
                    self.writer.deletion(row)
                continue
            live.append(row)
        for row in self._filtered(live):
            self.writer.resource(row)

    def _filtered(self, rows: list[Row]) -> list[Row]:
        """The rows that match any of their type's ``_typeFilter`` queries (all, without).
        Rows read from the history (changed since the kick-off) are matched on their
        current state, and a warning says so."""
        if not rows:
            return rows
        queries = self.request.type_filters.get(rows[0].resource_type)
        if not queries:
            return rows
        ids = ",".join(row.resource_id for row in rows)
        matched: set[str] = set()
        for query in queries:
            # The service's own search, restricted to this batch by _id.
            matched.update(
                search_keys(rows[0].resource_type, f"{query}&_id={ids}", limit=len(rows))
            )
        kept: list[Row] = []
        for row in rows:
            key = f"{row.resource_type}/{row.resource_id}"
            if key in matched:
                kept.append(row)
            if not row.current:
                outcome = MSG_TYPE_FILTER_WRITTEN if key in matched else MSG_TYPE_FILTER_LEFT_OUT
                self.writer.warning(MSG_TYPE_FILTER_CURRENT.format(key=key, outcome=outcome))
        return kept

    def _fetch(
        self, base: Q | Lookup, *, order: str, limit: int | None = None
    ) -> list[tuple[Row, str]]:
        """The rows of a batch query with their organizations, inside the client's boundary
        or not: live ones, plus tombstones where they matter (deleted since ``_since``, or
        after transactionTime).

        The boundary is applied by the caller, in Python, not in SQL: beside ``key IN``
        (1000 keys), ``organization IN`` made SQLite's planner pick the organization index,
        which holds every row when one organization owns the data: 2.7 s per chunk instead
        of 8 ms (1.1·10^6 rows, bench.export with access control on)."""
        rows = StoredResource.objects.filter(base)
        if self.request.since is None:
            rows = rows.filter(Q(deleted=False) | Q(last_updated__gt=self.job.transaction_time))
        values = (
            rows.annotate(export_when=self._when_sql)
            .order_by(order)
            .values_list(*COLUMNS, "export_when", "organization")
        )
        if limit is not None:
            values = values[:limit]
        return [(Row(*columns[:-1], current=True), columns[-1]) for columns in values]

    def _rows(self, base: Q | Lookup, *, order: str) -> list[Row]:
        """The rows of a batch query the client may see (see :meth:`_fetch`)."""
        return [
            row for row, organization in self._fetch(base, order=order) if self._sees(organization)
        ]

    # --- system level ----------------------------------------------------------------------

    def _system_types(self) -> list[str]:
        if self.request.types is not None:
            return sorted(self.request.types)
        present = StoredResource.objects.filter(visible_q()).values_list("resource_type", flat=True)
        return sorted(set(present.distinct()))

    def _system(self) -> None:
        since = self.request.since
        for resource_type in self._system_types():
            after = ""
            while True:
                query = Q(resource_type=resource_type, resource_id__gt=after)
                if since is not None:
                    # The minute too: the index of time holds it (StoredResource.updated_minute).
                    query &= Q(last_updated__gte=since, updated_minute__gte=minute_of(since))
                fetched = self._fetch(query, order="resource_id", limit=self.chunk)
                if not fetched:
                    break
                self._emit([row for row, organization in fetched if self._sees(organization)])
                after = fetched[-1][0].resource_id
                self.writer.report(f"{resource_type}: {self.writer.written} resources written")

    # --- Patient and Group level -----------------------------------------------------------

    def _patients(self) -> None:
        types = self.request.types or []
        compartment_types = [t for t in types if t != "Patient"]
        # Patients linked to exported ones (Patient.link puts them in their compartments):
        # key → all of its data. Not needed when every Patient is exported anyway.
        linked: dict[str, bool] | None = None
        if "Patient" in types and (
            self.job.level == ExportJob.Level.GROUP or self.request.patients is not None
        ):
            linked = {}
        done = 0
        for chunk in self._patient_chunks():
            ids = [patient_id for patient_id, _ in chunk]
            joined = {patient_id for patient_id, new in chunk if new}
            if "Patient" in types:
                patient_keys = [f"Patient/{i}" for i in ids]
                rows = self._rows(one_of("key", patient_keys), order="key")
                self._emit(rows, all_data={f"Patient/{i}" for i in joined})
            # One query for the compartments and the linked Patients (a second one per chunk
            # was a tenth of an export's time).
            link_types = compartment_types if linked is None else [*compartment_types, "Patient"]
            links = CompartmentLink.objects.filter(
                one_of("patient_id", ids), resource_type__in=link_types
            ).values_list("resource_type", "resource_key", "patient_id", "shared")
            members = {f"Patient/{i}" for i in ids} if linked is not None else set()
            by_type: dict[str, dict[str, bool]] = {}
            for resource_type, key, patient_id, shared in links:
                if resource_type == "Patient":
                    # A Patient whose link names one of ids (but not among them).
                    if linked is not None and key not in members:
                        linked[key] = linked.get(key, False) or patient_id in joined
                    continue
                keys = by_type.setdefault(resource_type, {})
                if key not in keys and shared:
                    if key in self.shared:
                        continue  # written for a Patient of an earlier chunk
                    self.shared.add(key)
                keys[key] = keys.get(key, False) or patient_id in joined
            for resource_type in sorted(by_type):
                keys = sorted(by_type[resource_type])
                for start in range(0, len(keys), self.chunk):
                    batch = keys[start : start + self.chunk]
                    rows = self._rows(one_of("key", batch), order="key")
                    self._emit(rows, all_data={k for k in batch if by_type[resource_type][k]})
            done += len(ids)
            self.writer.report(f"{done} patients, {self.writer.written} resources written")
        if linked:
            self._linked_patients(linked)

    def _linked_patients(self, linked: dict[str, bool]) -> None:
        """Write the linked Patients that are not exported Patients themselves (found by a
        second walk of the Patients exported: the first keeps no list of them)."""
        for chunk in self._patient_chunks():
            for patient_id, _ in chunk:
                linked.pop(f"Patient/{patient_id}", None)
            if not linked:
                return
            self.writer.report(f"linked Patients: {self.writer.written} resources written")
        keys = sorted(linked)
        for start in range(0, len(keys), self.chunk):
            batch = keys[start : start + self.chunk]
            rows = self._rows(one_of("key", batch), order="key")
            self._emit(rows, all_data={key for key in batch if linked[key]})
        self.writer.report(f"linked Patients: {self.writer.written} resources written")

    def _patient_chunks(self) -> Iterator[list[tuple[str, bool]]]:
        """The Patients to export, a chunk at a time: (id, all of its data)."""
        wanted = set(self.request.patients) if self.request.patients is not None else None
        if self.job.level == ExportJob.Level.GROUP:
            yield from self._roster_chunks(wanted)
        elif wanted is not None:
            ordered = sorted(wanted)
            for start in range(0, len(ordered), self.chunk):
                yield [(i, False) for i in ordered[start : start + self.chunk]]
        else:
            after = ""
            while True:
                # The boundary in Python, as in _fetch (the same planner trap).
                page = list(
                    StoredResource.objects.filter(resource_type="Patient", resource_id__gt=after)
                    .order_by("resource_id")
                    .values_list("resource_id", "organization")[: self.chunk]
                )
                if not page:
                    return
                ids = [i for i, organization in page if self._sees(organization)]
                if ids:
                    yield [(i, False) for i in ids]
                after = page[-1][0]

    def _roster_chunks(self, wanted: set[str] | None) -> Iterator[list[tuple[str, bool]]]:
        """The Group's active Patient members as of its kick-off version, in reference
        order, with whether each joined after ``_since`` (a merge with the roster of the
        version current at ``_since``, read alongside in the same order)."""
        group = resource_vread(
            resource_type="Group",
            resource_id=self.job.group_id,
            version_id=str(self.job.group_version),
        )
        earlier = self._members_at_since(group)
        previous = next(earlier, None) if earlier is not None else None
        for page in self._roster_pages(group):
            chunk: list[tuple[str, bool]] = []
            for ref in page:
                if not ref.startswith("Patient/"):
                    continue
                patient_id = ref.removeprefix("Patient/")
                if wanted is not None and patient_id not in wanted:
                    continue
                new = True
                if earlier is not None:
                    while previous is not None and previous < ref:
                        previous = next(earlier, None)
                    new = previous != ref
                elif self.request.since is None:
                    new = False
                chunk.append((patient_id, new))
            if chunk:
                yield chunk

    def _members_at_since(self, group: ResourceVersion) -> Iterator[str] | None:
        """The active member references of the Group version current at ``_since``, in
        order (None without ``_since``; empty when the Group did not exist then)."""
        since = self.request.since
        if since is None:
            return None
        then = (
            ResourceVersion.objects.filter(
                resource_type="Group",
                resource_id=group.resource_id,
                incarnation=group.incarnation,
                last_updated__lte=since,
            )
            .order_by("-version_id")
            .first()
        )
        if then is None or then.deleted:
            return iter(())
        return (ref for page in self._roster_pages(then) for ref in page)

    def _roster_pages(self, version: ResourceVersion) -> Iterator[list[str]]:
        """The active member references of a Group version, a page at a time in reference
        order: from the version's body when it holds its roster (``GROUP_ROSTER_STORAGE=
        inline``, or written so and not backfilled yet), else from ClickHouse as of that
        version. With inline storage, a version without ``member`` has no members."""
        storage = roster_storage()
        roster = inline_roster(version)
        if roster is None and storage.external_element is None:
            roster = {}
        if roster is not None:
            # The body is in memory already: its roster is sorted once, then paged.
            refs = sorted(ref for ref, member in roster.items() if not member.inactive)
            for start in range(0, len(refs), self.chunk):
                yield refs[start : start + self.chunk]
            return
        # From ClickHouse, a window of the state table's sort key at a time: paging with
        # roster_page read and aggregated every event after the cursor for each page
        # (quadratic in the roster's size).
        states = iter_roster_as_of(row_roster_key(version), as_of=version.version_id)
        active = (state.ref for state in states if state.active)
        while page := list(islice(active, self.chunk)):
            yield page


def export_run(job: ExportJob, stopping: threading.Event | None = None) -> int:
    """Run one claimed job to its end (or until ``stopping`` is set: WorkerStopping); the
    number of resources written."""
    return Export(job, stopping).run()
