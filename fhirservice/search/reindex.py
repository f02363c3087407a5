"""Re-extraction of the search index of stored resources (after a definitions upgrade).

Resources are read in key order, a batch at a time (only key, version and body), their
SearchToken rows replaced in one transaction per batch, and the last key done recorded in a
``SearchReindexCheckpoint`` so an interrupted run resumes after it. Memory stays flat: a
few batches of bodies and rows at a time, whatever the number of resources.

Extraction (FHIRPath over each body) is CPU work: with ``workers`` > 1 it runs in that many
worker processes while this one writes the rows of the batch before, so a run uses every
core. Rows are written with ``COPY`` on PostgreSQL (one statement per batch, without the
ORM's per-value preparation) and as multi-row INSERTs elsewhere (no model instance per
row: extraction gives tuples of field values).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import orjson
from django.db import connections, router, transaction
from django.utils import timezone

from fhirservice.models import SearchReindexCheckpoint, SearchToken, StoredResource
from fhirservice.search import reindex_worker
from fhirservice.search.extract import Row, extract_rows
from fhirservice.store.rows import insert_values

Progress = Callable[..., None]


@dataclass
class ReindexReport:
    """What a run did: resources re-extracted, rows written, the key it stopped after."""

    resources: int = 0
    rows: int = 0
    last_key: str = ""
    finished: bool = False


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
    progress: Progress | None = None,
) -> ReindexReport:
    """Re-extract the SearchToken rows of stored resources, resuming from the checkpoint.

    A resource rewritten while its batch is processed keeps the rows its writer stored: the
    batch replaces rows only of resources still at the version it read. ``workers`` > 1
    extracts in that many processes (see the module docstring).
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
    batches = _batches(resource_type, report.last_key, batch_size, limit)
    for batch, tokens in _extracted(batches, workers):
        report.rows += _replace_tokens(batch, tokens)
        report.resources += len(batch)
        report.last_key = batch[-1][0]
        checkpoint.last_key = report.last_key
        checkpoint.done += len(batch)
        checkpoint.updated_at = timezone.now()
        checkpoint.save()
        if progress is not None:
            progress(len(batch), rows=report.rows)
    report.finished = (
        limit is None
        or report.resources < limit
        or not _scope(resource_type, report.last_key).exists()
    )
    if report.finished:
        checkpoint.finished_at = timezone.now()
        checkpoint.save()
    return report


Batch = list[tuple[str, int, bool, str]]


def _batches(
    resource_type: str | None, after: str, batch_size: int, limit: int | None
) -> Iterator[Batch]:
    """Batches of (key, version, deleted, body) in key order, after ``after``."""
    read = 0
    while limit is None or read < limit:
        size = batch_size if limit is None else min(batch_size, limit - read)
        batch = list(
            _scope(resource_type, after)
            .order_by("key")
            .values_list("key", "version_id", "deleted", "body")[:size]
        )
        if not batch:
            return
        read += len(batch)
        after = batch[-1][0]
        yield batch


def _extracted(batches: Iterator[Batch], workers: int) -> Iterator[tuple[Batch, list[Row]]]:
    """Each batch with its SearchToken rows (tuples of field values), extracted here or in
    ``workers`` processes (at most ``workers`` + 1 batches in flight)."""
    if workers <= 1:
        for batch in batches:
            yield batch, _extract(_bodies(batch))
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


def _extract(bodies: list[tuple[str, str]]) -> list[Row]:
    rows: list[Row] = []
    for key, body in bodies:
        rows.extend(extract_rows(key, orjson.loads(body)))
    return rows


def _replace_tokens(batch: Batch, tokens: list[Row]) -> int:
    versions = {key: version for key, version, _, _ in batch}
    with transaction.atomic():
        current = dict(
            StoredResource.objects.filter(key__in=list(versions)).values_list("key", "version_id")
        )
        unchanged = [key for key, version in versions.items() if current.get(key) == version]
        SearchToken.objects.filter(resource_key__in=unchanged).delete()
        kept = set(unchanged)
        fresh = [row for row in tokens if row[1] in kept]  # row[1]: resource_key
        _insert_tokens(fresh)
    return len(fresh)


def _insert_tokens(tokens: list[Row]) -> None:
    """Insert rows: ``COPY`` on PostgreSQL, ``insert_values`` elsewhere."""
    connection = connections[router.db_for_write(SearchToken)]
    if connection.vendor != "postgresql":
        insert_values(SearchToken, tokens)
        return
    fields = SearchToken._meta.concrete_fields
    table = connection.ops.quote_name(SearchToken._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    with connection.cursor() as cursor:
        with cursor.cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for row in tokens:
                copy.write_row(row)
