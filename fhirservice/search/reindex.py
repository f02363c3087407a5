"""Re-extraction of the search index of stored resources (after a definitions upgrade).

Resources are read in key order, a batch at a time (only key, version and body, with one
raw SELECT), their SearchToken rows replaced in one transaction per batch that also records
the last key done in a ``SearchReindexCheckpoint``, so an interrupted run resumes after it.
Memory stays flat: a few batches of bodies and rows at a time, whatever the number of
resources.

Extraction (FHIRPath over each body) is CPU work: with ``workers`` > 1 it runs in that many
worker processes while this one writes the rows of the batch before, so a run uses every
core. The writing process handles rows as plain tuples of field values, never model
instances. Writing a row costs its eight index entries, most of a batch's time, so the
resources whose stored rows already equal the extracted ones (after a definitions upgrade,
most) are left alone; for the rest, per batch one SELECT of the versions (a key range), one
DELETE of the old rows, and the new rows in one ``COPY`` on PostgreSQL (psycopg formats
each tuple in C; COPY text built in Python was ~3x slower) or multi-row INSERTs
(``store.rows.insert_values``) on SQLite. Other backends (MongoDB) go through the ORM.

A run that writes every row (over an empty index: nothing to compare with; or asked to
rebuild) drops the search indexes first and builds each again once its scope is done, one
sorted pass instead of a random insertion per row and index (``reindex_indexes``; ~2x an
emptied index's rate at 22,000 resources, more at 10^6 where the indexes outgrow memory).
The primary key and the indexes led by ``resource_key`` stay: rows come in key order, so
their entries append, and every write (this one's DELETE too) finds a resource's rows by
them. The missing indexes are the state that survives a crash: a run that finds them
missing rebuilds, resuming after the checkpoint, and builds them when done.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.db import connections, router, transaction
from django.utils import timezone

from fhirservice.models import SearchReindexCheckpoint, SearchToken, StoredResource
from fhirservice.search import reindex_indexes, reindex_worker
from fhirservice.search.extract import Row
from fhirservice.store.rows import insert_values

Progress = Callable[..., None]


@dataclass
class ReindexReport:
    """What a run did: resources re-extracted, rows written, resources whose rows were
    already right (not rewritten), the key it stopped after, and
    the seconds this process spent reading bodies and writing rows (the rest of a run is
    extraction, or waiting for the workers' extraction); whether it rebuilt (every row
    written, the search indexes dropped and built again) and the seconds the build took."""

    resources: int = 0
    rows: int = 0
    last_key: str = ""
    finished: bool = False
    up_to_date: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    rebuild: bool = False
    index_seconds: float = 0.0


def checkpoint_name(resource_type: str | None) -> str:
    """The checkpoint row of a scope: every type, or one."""
    return f"reindex:{resource_type or '*'}"


def reindex_checkpoint(resource_type: str | None) -> SearchReindexCheckpoint | None:
    """The stored checkpoint of a scope, if a run has started."""
    return SearchReindexCheckpoint.objects.filter(name=checkpoint_name(resource_type)).first()


def reindex_checkpoint_reset(resource_type: str | None) -> None:
    """Forget the checkpoint: the next run starts from the first resource."""
    SearchReindexCheckpoint.objects.filter(name=checkpoint_name(resource_type)).delete()


def _scope(resource_type: str | None, after: str):
    rows = StoredResource.objects.filter(key__gt=after)
    if resource_type is not None:
        rows = rows.filter(resource_type=resource_type)
    return rows


def reindex_remaining(*, resource_type: str | None, after: str = "") -> int:
    """Resources (live or deleted) a run still has to visit after ``after``."""
    return _scope(resource_type, after).count()


def search_reindex(
    *,
    resource_type: str | None = None,
    batch_size: int = 500,
    limit: int | None = None,
    workers: int = 1,
    rebuild: bool = False,
    progress: Progress | None = None,
) -> ReindexReport:
    """Re-extract the SearchToken rows of stored resources, resuming from the checkpoint.

    A resource rewritten while its batch is processed keeps the rows its writer stored: the
    batch replaces rows only of resources still at the version it read. ``workers`` > 1
    extracts in that many processes (see the module docstring).

    A rebuild writes every row without comparing, into the table with its search indexes
    dropped (``reindex_indexes``), and builds them again once the scope is done. A run
    rebuilds when asked (``rebuild``), when it starts over an empty index (nothing to
    compare with), or when it finds indexes missing: an earlier rebuild was interrupted,
    and this run completes it.
    """
    name = checkpoint_name(resource_type)
    now = timezone.now()
    checkpoint, _ = SearchReindexCheckpoint.objects.get_or_create(
        name=name, defaults={"started_at": now, "updated_at": now}
    )
    if checkpoint.finished_at is not None:  # a finished run: a new one starts over
        checkpoint.last_key, checkpoint.done, checkpoint.finished_at = "", 0, None
        checkpoint.started_at = now
    report = ReindexReport(last_key=checkpoint.last_key)
    writer = _Writer(connections[router.db_for_write(SearchToken)])
    report.rebuild = writer.raw and (
        rebuild
        or bool(reindex_indexes.missing(writer.connection))
        or (not report.last_key and not SearchToken.objects.exists())
    )
    if report.rebuild:
        # Saved first: should the run stop at once, the dropped indexes say a rebuild is
        # under way and the checkpoint where it resumes.
        checkpoint.save()
        reindex_indexes.drop(writer.connection)
        writer.rebuild = True
    batches = _batches(writer, resource_type, report.last_key, batch_size, limit, report)
    with writer.session():
        for batch, rows in _extracted(batches, workers):
            started = time.perf_counter()
            with transaction.atomic(using=writer.connection.alias):
                written, skipped = writer.replace(batch, rows)
                report.rows += written
                report.up_to_date += skipped
                report.resources += len(batch)
                report.last_key = batch[-1][0]
                checkpoint.last_key = report.last_key
                checkpoint.done += len(batch)
                checkpoint.updated_at = timezone.now()
                checkpoint.save()
            report.write_seconds += time.perf_counter() - started
            if progress is not None:
                progress(len(batch), rows=report.rows, up_to_date=report.up_to_date)
    report.finished = (
        limit is None
        or report.resources < limit
        or not _scope(resource_type, report.last_key).exists()
    )
    if report.finished:
        if report.rebuild:
            started = time.perf_counter()
            reindex_indexes.build_missing(writer.connection)
            writer.analyze()
            report.index_seconds = time.perf_counter() - started
        checkpoint.finished_at = timezone.now()
        checkpoint.save()
    return report


Batch = list[tuple[str, int, bool, str]]


def _batches(
    writer: _Writer,
    resource_type: str | None,
    after: str,
    batch_size: int,
    limit: int | None,
    report: ReindexReport,
) -> Iterator[Batch]:
    """Batches of (key, version, deleted, body) in key order, after ``after``."""
    read = 0
    while limit is None or read < limit:
        size = batch_size if limit is None else min(batch_size, limit - read)
        started = time.perf_counter()
        batch = writer.read(resource_type, after, size)
        report.read_seconds += time.perf_counter() - started
        if not batch:
            return
        read += len(batch)
        after = batch[-1][0]
        yield batch


def _extracted(batches: Iterator[Batch], workers: int) -> Iterator[tuple[Batch, list[Row]]]:
    """Each batch with its SearchToken rows, extracted here or in ``workers`` processes
    (at most ``workers`` + 1 batches in flight)."""
    if workers <= 1:
        for batch in batches:
            yield batch, reindex_worker.extract_values(_bodies(batch))
        return
    # spawn: a fresh interpreter per worker; forking would copy open database connections
    # and an embedded ClickHouse's threads into it.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=reindex_worker.setup) as pool:
        pending: deque[tuple[Batch, Future]] = deque()
        for batch in batches:
            pending.append((batch, pool.submit(reindex_worker.extract_values, _bodies(batch))))
            if len(pending) > workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def _bodies(batch: Batch) -> list[tuple[str, str]]:
    return [(key, body) for key, _, deleted, body in batch if not deleted and body]


_FIELDS = [field.attname for field in SearchToken._meta.concrete_fields]
_RESOURCE_KEY = _FIELDS.index("resource_key")
# Keys per DELETE on SQLite (its bound-parameter limit is 999 in older builds).
_SQLITE_KEYS = 900


def _already_stored(keys: list[str], rows: list[Row]) -> set[str]:
    """The resources among ``keys`` whose stored index rows equal ``rows`` (theirs)."""
    stored: dict[str, list[Row]] = {}
    for row in SearchToken.objects.filter(resource_key__in=keys).values_list(*_FIELDS):
        stored.setdefault(row[_RESOURCE_KEY], []).append(row)
    fresh: dict[str, list[Row]] = {}
    for row in rows:
        fresh.setdefault(row[_RESOURCE_KEY], []).append(tuple(row))
    # Each row's key is unique, so sorting compares keys only; values compare as Python
    # values (dates as instants, whatever the offset they were written with).
    return {key for key in keys if sorted(stored.get(key, ())) == sorted(fresh.get(key, ()))}


class _Writer:
    """Reads batches and replaces their index rows on one database connection: raw SQL on
    PostgreSQL and SQLite, the ORM elsewhere. Table and column names come from the models,
    every value is bound."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.vendor = connection.vendor
        # Every row is written, none compared (a rebuild).
        self.rebuild = False
        quote = connection.ops.quote_name
        stored = quote(StoredResource._meta.db_table)
        tokens = quote(SearchToken._meta.db_table)
        columns = ", ".join(quote(f.column) for f in SearchToken._meta.concrete_fields)
        resource_key = quote(SearchToken._meta.get_field("resource_key").column)
        self.read_sql = f"SELECT key, version_id, deleted, body FROM {stored} WHERE key > %s"  # noqa: S608
        self.versions_sql = f"SELECT key, version_id FROM {stored} WHERE key >= %s AND key <= %s"  # noqa: S608
        if self.vendor == "postgresql":
            # Until the batch commits, a writer of these resources (it locks the row first,
            # then replaces the rows) waits; one already under way is waited for, and its
            # new version read. Unlocked, a write committed between this read and the
            # DELETE had its rows deleted and the old version's copied in. (SQLite: the
            # batch's transaction holds the database's write lock from its start.)
            self.versions_sql += " FOR SHARE"
        self.delete_sql = f"DELETE FROM {tokens} WHERE {resource_key} "  # noqa: S608
        self.copy_sql = f"COPY {tokens} ({columns}) FROM STDIN"
        self.analyze_sql = f"ANALYZE {tokens}"

    @property
    def raw(self) -> bool:
        """Whether this backend takes the raw SQL."""
        return self.vendor in ("postgresql", "sqlite")

    @contextmanager
    def session(self) -> Iterator[None]:
        """This connection's settings for a rebuild's load (PostgreSQL: commits do not wait
        for their WAL flush; a crash loses at most the last batches, which the checkpoint
        has not recorded either, and the index is rebuildable from the stored resources)."""
        if not (self.rebuild and self.vendor == "postgresql"):
            yield
            return
        with self.connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO off")
        try:
            yield
        finally:
            with self.connection.cursor() as cursor:
                cursor.execute("RESET synchronous_commit")

    def analyze(self) -> None:
        """Planner statistics for the rebuilt table (PostgreSQL: the ones it had described
        the table before the rebuild, perhaps empty)."""
        if self.vendor == "postgresql":
            with self.connection.cursor() as cursor:
                cursor.execute(self.analyze_sql)

    def read(self, resource_type: str | None, after: str, size: int) -> Batch:
        """Up to ``size`` (key, version, deleted, body) after ``after``, in key order."""
        if not self.raw:
            return list(
                _scope(resource_type, after)
                .order_by("key")
                .values_list("key", "version_id", "deleted", "body")[:size]
            )
        sql, params = self.read_sql, [after]
        if resource_type is not None:
            sql, params = sql + " AND resource_type = %s", [after, resource_type]
        with self.connection.cursor() as cursor:
            cursor.execute(sql + " ORDER BY key LIMIT %s", [*params, size])
            return cursor.fetchall()

    def replace(self, batch: Batch, rows: list[Row]) -> tuple[int, int]:
        """Replace the index rows of the batch's resources still at the version read (in
        the caller's transaction): the number of rows written, and of resources whose rows
        were already right."""
        versions = {key: version for key, version, _, _ in batch}
        if self.raw:
            # The batch is a key range: one range read rather than a list of its keys.
            with self.connection.cursor() as cursor:
                cursor.execute(self.versions_sql, [batch[0][0], batch[-1][0]])
                current = dict(cursor.fetchall())
        else:
            current = dict(
                StoredResource.objects.filter(key__in=list(versions)).values_list(
                    "key", "version_id"
                )
            )
        unchanged = [key for key, version in versions.items() if current.get(key) == version]
        kept = set(unchanged)
        fresh = [row for row in rows if row[_RESOURCE_KEY] in kept]
        # Resources whose stored rows are already these: nothing to rewrite (after a
        # definitions upgrade most are; rewriting a row costs its eight index entries).
        same = set() if self.rebuild else _already_stored(unchanged, fresh)
        if same:
            unchanged = [key for key in unchanged if key not in same]
            fresh = [row for row in fresh if row[_RESOURCE_KEY] not in same]
        if self.vendor == "postgresql":
            self._replace_postgresql(unchanged, fresh)
        elif self.vendor == "sqlite":
            self._replace_sqlite(unchanged, fresh)
        else:
            SearchToken.objects.filter(resource_key__in=unchanged).delete()
            SearchToken.objects.bulk_create([SearchToken(*row) for row in fresh], batch_size=1000)
        return len(fresh), len(same)

    def _replace_postgresql(self, keys: list[str], rows: list[Row]) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute(self.delete_sql + "= ANY(%s)", [keys])
            with cursor.cursor.copy(self.copy_sql) as copy:
                for row in rows:
                    copy.write_row(row)

    def _replace_sqlite(self, keys: list[str], rows: list[Row]) -> None:
        with self.connection.cursor() as cursor:
            for start in range(0, len(keys), _SQLITE_KEYS):
                chunk = keys[start : start + _SQLITE_KEYS]
                cursor.execute(self.delete_sql + f"IN ({', '.join(['%s'] * len(chunk))})", chunk)
        insert_values(SearchToken, rows)
