"""Metadata store of every FHIR resource: current rows, version history and search index.

Portable across SQLite, PostgreSQL and MongoDB (django-mongodb-backend): every model has an
explicit string primary key, writes use compare-and-set on ``version_id`` instead of row
locks, and nothing here uses raw SQL. Resource bodies are stored as JSON text exactly as they
are served (``meta`` included), so reads copy bytes instead of re-encoding.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import models


def minute_of(moment: datetime) -> datetime:
    """``moment`` cut to its minute: the value of ``StoredResource.updated_minute``."""
    return moment.replace(second=0, microsecond=0)


class PartialIndex(models.Index):
    """An index of the rows its ``condition`` holds for, on SQLite and PostgreSQL.

    The conditions here are ``column IS NOT NULL``, which both planners infer from any bound
    on the column, so every search that bounds it can read the index. MongoDB's index
    conditions take no ``isnull``: there it indexes every row, as a plain index would.
    """

    def get_pymongo_index_model(self, model: Any, schema_editor: Any, **kwargs: Any) -> Any:
        """django-mongodb-backend's index model of the same fields, without the condition."""
        whole = models.Index(fields=self.fields, name=self.name)
        return whole.get_pymongo_index_model(model, schema_editor, **kwargs)


class StoredResource(models.Model):
    """The current version of one resource (also kept after delete, as a tombstone)."""

    key = models.CharField(primary_key=True, max_length=160, help_text="Type/id")
    resource_type = models.CharField(max_length=64)
    resource_id = models.CharField(max_length=64)
    version_id = models.PositiveBigIntegerField()
    # The version at which the current life of this id began (1, or the re-create after a
    # delete): data keyed by it, such as a Group roster, starts empty for a re-created id.
    incarnation = models.PositiveBigIntegerField(default=1)
    last_updated = models.DateTimeField()
    # ``last_updated`` cut to the minute (minute_of): the column the (type, time) index holds.
    # No index of this table holds ``last_updated`` itself, so on PostgreSQL an update that
    # stays in the minute of the previous version changes no indexed column and is HOT: it
    # adds no entry to any index. Indexing ``last_updated`` made every update insert a key
    # into every index, among them the primary key's page that holds many Groups' keys:
    # serializable operations on different Groups each read that page and wrote into it,
    # and one of the two failed and ran again (~3.5 attempts per $add-member, 8 clients).
    # A search or sort by ``_lastUpdated`` bounds and orders by this column as well as by
    # ``last_updated`` (fhirservice.search.query), which keeps it on the index.
    updated_minute = models.DateTimeField()
    deleted = models.BooleanField(default=False)
    body = models.TextField(help_text="The resource as served, JSON")
    # The data boundary (fhirservice.access.boundaries): the organization of the client that
    # created the id; blank = shared (staff, commands, FHIR_AUTH=off).
    organization = models.CharField(max_length=64, blank=True, default="", db_index=True)

    class Meta:
        indexes = [
            models.Index(fields=["resource_type", "updated_minute"], name="res_type_minute"),
            models.Index(fields=["resource_type", "resource_id"], name="res_type_id"),
        ]

    def __str__(self) -> str:
        return f"{self.key} v{self.version_id}"


class ResourceVersion(models.Model):
    """One version of a resource: the history that vread and _history serve."""

    key = models.CharField(primary_key=True, max_length=200, help_text="Type/id/_history/vid")
    resource_type = models.CharField(max_length=64)
    resource_id = models.CharField(max_length=64)
    version_id = models.PositiveBigIntegerField()
    incarnation = models.PositiveBigIntegerField(default=1)
    last_updated = models.DateTimeField()
    deleted = models.BooleanField(default=False)
    method = models.CharField(max_length=8, help_text="POST, PUT, PATCH or DELETE")
    body = models.TextField(blank=True, default="", help_text="Empty for a delete")
    request_id = models.CharField(max_length=64, blank=True, default="")
    actor = models.CharField(max_length=200, blank=True, default="")
    organization = models.CharField(max_length=64, blank=True, default="", db_index=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["resource_type", "resource_id", "version_id"], name="ver_type_id_vid"
            ),
            models.Index(fields=["resource_type", "last_updated"], name="ver_type_updated"),
            models.Index(fields=["last_updated"], name="ver_updated"),
        ]

    def __str__(self) -> str:
        return self.key


class SearchToken(models.Model):
    """One extracted search value of a current, non-deleted resource.

    The columns a value fills depend on its parameter's type (fhirservice.search.extract
    says which); composite parameters write one row per component, linked by ``group``.
    """

    key = models.CharField(primary_key=True, max_length=200, help_text="Type/id#n")
    resource_key = models.CharField(max_length=160)
    resource_type = models.CharField(max_length=64)
    param = models.CharField(max_length=80)
    # Token and quantity system, string as written, reference target type, canonical version.
    system = models.CharField(max_length=255, blank=True, default="")
    # Normalised value: lower-cased and accent-free for strings, the code for tokens and
    # quantities, "Type/id" for references, the URI for uris.
    value = models.CharField(max_length=255, blank=True, default="")
    # Token display/text (normalised), reference id, quantity unit, typed identifier value.
    text = models.CharField(max_length=255, blank=True, default="")
    # Date, dateTime, instant and Period values are stored as the instant range they cover.
    low = models.DateTimeField(null=True, blank=True)
    high = models.DateTimeField(null=True, blank=True)
    # Date rows: the width class of [low, high) when the row is its parameter's only value
    # in the resource, else SEVERAL (fhirservice.search.dates); null for other rows.
    span = models.PositiveSmallIntegerField(null=True, blank=True)
    number = models.FloatField(null=True, blank=True)
    # Composite parameters: the occurrence ("Type/id#param#n") and the component's position.
    group = models.CharField(max_length=255, blank=True, default="")
    part = models.PositiveSmallIntegerField(default=0)

    class Meta:
        # Each index ends with resource_key, so a search reads the keys from the index alone
        # (PostgreSQL's index-only scans), already in key order for the first page's merge.
        indexes = [
            # ``value`` in byte order (PostgreSQL's pattern operator class; other backends
            # ignore it): a string search's prefix (``LIKE 'famil%'``) is then a range of the
            # index, not a filter on every value of the parameter in a non-C collation
            # (10^5 Patient names: 250 ms -> 5 ms). Equality reads it as before.
            models.Index(
                fields=["resource_type", "param", "value", "system", "resource_key"],
                name="tok_type_param_value",
                opclasses=["", "", "varchar_pattern_ops", "", ""],
            ),
            # Per width class, a search's bound on ``high`` bounds ``low`` too: date ranges
            # read a short range of this index (fhirservice.search.dates).
            # The date, number and quantity indexes hold only the rows of their kind: every
            # search that reads them bounds the column, which implies it is not null, and a
            # write then adds no entry for its other rows. A Patient's ~20 rows went into
            # every index, ~150 pages of SQLite's WAL per create (bench/README.md).
            PartialIndex(
                fields=["resource_type", "param", "span", "low", "high", "resource_key"],
                name="tok_type_param_span_low",
                condition=models.Q(span__isnull=False),
            ),
            PartialIndex(
                fields=["resource_type", "param", "high", "resource_key"],
                name="tok_type_param_high",
                condition=models.Q(high__isnull=False),
            ),
            models.Index(
                fields=["resource_type", "param", "text", "resource_key"],
                name="tok_type_param_text",
            ),
            PartialIndex(
                fields=["resource_type", "param", "number", "resource_key"],
                name="tok_type_param_number",
                condition=models.Q(number__isnull=False),
            ),
            models.Index(fields=["resource_key", "param"], name="tok_resource"),
            models.Index(fields=["group"], name="tok_group"),
        ]

    def __str__(self) -> str:
        return f"{self.resource_key} {self.param}={self.system}|{self.value}"


class SearchReindexCheckpoint(models.Model):
    """Where a ``reindex_search`` run got to: the last resource key it re-extracted.

    One row per scope (all types, or one ``--type``); a resumed run starts after
    ``last_key``. Losing it costs time only: re-extracting a resource twice changes nothing.
    """

    name = models.CharField(primary_key=True, max_length=100)
    last_key = models.CharField(max_length=160, blank=True, default="")
    done = models.PositiveBigIntegerField(default=0)
    started_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        state = "finished" if self.finished_at else f"after {self.last_key or 'start'}"
        return f"{self.name}: {self.done} resources, {state}"
