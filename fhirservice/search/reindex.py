"""Re-extraction of the search index of stored resources (after a definitions upgrade).

Resources are read in key order, a batch at a time (only key, version and body), their
SearchToken rows replaced in one transaction per batch, and the last key done recorded in a
``SearchReindexCheckpoint`` so an interrupted run resumes after it. Memory stays flat: one
batch of bodies and rows at a time, whatever the number of resources.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson
from django.db import transaction
from django.utils import timezone

from fhirservice.models import SearchReindexCheckpoint, SearchToken, StoredResource
from fhirservice.search.extract import extract_tokens

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
    progress: Progress | None = None,
) -> ReindexReport:
    """Re-extract the SearchToken rows of stored resources, resuming from the checkpoint.

    A resource rewritten while its batch is processed keeps the rows its writer stored: the
    batch replaces rows only of resources still at the version it read.
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
    while limit is None or report.resources < limit:
        size = batch_size if limit is None else min(batch_size, limit - report.resources)
        batch = list(
            _scope(resource_type, report.last_key)
            .order_by("key")
            .values_list("key", "version_id", "deleted", "body")[:size]
        )
        if not batch:
            report.finished = True
            break
        report.rows += _reindex_batch(batch)
        report.resources += len(batch)
        report.last_key = batch[-1][0]
        checkpoint.last_key = report.last_key
        checkpoint.done += len(batch)
        checkpoint.updated_at = timezone.now()
        checkpoint.save()
        if progress is not None:
            progress(len(batch), rows=report.rows)
    if report.finished:
        checkpoint.finished_at = timezone.now()
        checkpoint.save()
    return report


def _reindex_batch(batch: list[tuple[str, int, bool, str]]) -> int:
    tokens: list[SearchToken] = []
    for key, _, deleted, body in batch:
        if not deleted and body:
            tokens.extend(extract_tokens(key, orjson.loads(body)))
    versions = {key: version for key, version, _, _ in batch}
    with transaction.atomic():
        current = dict(
            StoredResource.objects.filter(key__in=list(versions)).values_list("key", "version_id")
        )
        unchanged = [key for key, version in versions.items() if current.get(key) == version]
        SearchToken.objects.filter(resource_key__in=unchanged).delete()
        kept = set(unchanged)
        fresh = [t for t in tokens if t.resource_key in kept]
        SearchToken.objects.bulk_create(fresh, batch_size=1000)
    return len(fresh)
