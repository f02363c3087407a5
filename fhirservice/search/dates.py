"""Date search over the ``[low, high)`` ranges of SearchToken rows, as short index scans.

Every prefix (http://hl7.org/fhir/R4/search.html#prefix) relates the row's range to the
search range ``[l, h)``, and each relation is a union of *boxes*: bounds on ``low`` and on
``high`` (``eq``: ``l ≤ low < h`` and ``high ≤ h``; ``ge``: ``high > h``, or ``eq``; ...).
A bound on ``high`` alone (``high > a``) reads the index from ``a`` to the end, and
``date=ge2024-03-01&date=lt2024-03-08`` is then two scans of most of the rows, intersected.

Two facts the extraction records make that short:

- **Width classes.** A row's ``span`` says how wide its range is (:data:`SPAN_WIDTHS`: a
  dateTime or date ≤ 1 day, a month ≤ 31 days, a year ≤ 366 days, anything wider). In class
  ``c`` a bound ``high > a`` implies ``low ≥ a - width(c)``, so each class reads
  ``low`` from just before the search range (index ``(type, param, span, low, high)``).
- **Sole values.** ``span`` holds a class only when the row is its parameter's only value
  in the resource (else SEVERAL). Repeated parameters are AND'd per resource (``ge`` may
  hold on one value, ``lt`` on another); for a resource with one value both must hold on
  that row, so the conditions merge into one box per pair of alternatives, and a range
  ``ge…&lt…`` reads only the rows inside it. Resources with several values (``span``
  SEVERAL) are matched condition by condition, as before, among their own rows only.

Results are exactly those of the spec's definitions; the boxes only choose which index range
each part reads. Rows of other types keep ``span`` null (a value, not null, marks several
values: PostgreSQL's estimate of ``span IS NULL`` would count every token row and turn the
OR of short index ranges into a scan of the whole parameter).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Q, QuerySet

from fhirservice.models import SearchToken

# Upper bounds (inclusive) of the width classes 0, 1, 2; class 3 is anything wider, open
# Periods included, and has no bound.
SPAN_WIDTHS = (timedelta(days=1), timedelta(days=31), timedelta(days=366))
WIDE = len(SPAN_WIDTHS)
# The ``span`` of the date rows of a resource with several values of the parameter.
SEVERAL = WIDE + 1
# Repeated parameters merged into at most this many boxes (their alternatives multiply);
# beyond it each parameter is matched on its own and the sets intersected.
MAX_BOXES = 64


@dataclass(frozen=True)
class Box:
    """Rows with ``low_from ≤ low < low_to`` and ``high_above < high ≤ high_to`` (None:
    unbounded)."""

    low_from: datetime | None = None
    low_to: datetime | None = None
    high_above: datetime | None = None
    high_to: datetime | None = None

    def q(self) -> Q:
        """The box as a filter on SearchToken."""
        bounds = {
            "low__gte": self.low_from,
            "low__lt": self.low_to,
            "high__gt": self.high_above,
            "high__lte": self.high_to,
        }
        return Q(**{lookup: value for lookup, value in bounds.items() if value is not None})

    def empty(self) -> bool:
        """Whether no range fits (only bounds on one column are compared)."""
        return (
            self.low_from is not None and self.low_to is not None and self.low_from >= self.low_to
        ) or (
            self.high_above is not None
            and self.high_to is not None
            and self.high_above >= self.high_to
        )

    def __and__(self, other: Box) -> Box:
        return Box(
            low_from=_latest(self.low_from, other.low_from),
            low_to=_earliest(self.low_to, other.low_to),
            high_above=_latest(self.high_above, other.high_above),
            high_to=_earliest(self.high_to, other.high_to),
        )


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def prefix_boxes(prefix: str, low: datetime, high: datetime) -> list[Box]:
    """The rows whose range relates to the search range ``[low, high)`` by ``prefix``.

    The spec's definitions: eq — the search range contains the row's; ne — it does not;
    gt/lt — the row's range reaches above/below the search range; ge/le — gt/lt or eq;
    sa/eb — the row's range starts after/ends before it; ap — the two ranges overlap.
    """
    # A range inside [low, high) also starts before ``high``: the bound keeps scans short.
    inside = Box(low_from=low, low_to=high, high_to=high)
    return {
        "eq": [inside],
        "ap": [Box(low_to=high, high_above=low)],
        "ne": [Box(low_to=low), Box(low_from=high), Box(high_above=high)],
        "gt": [Box(high_above=high)],
        "lt": [Box(low_to=low)],
        "ge": [Box(high_above=high), inside],
        "le": [Box(low_to=low), inside],
        "sa": [Box(low_from=high)],
        "eb": [Box(high_to=low)],
    }[prefix]


def span_class(low: datetime, high: datetime) -> int:
    """The width class of the range ``[low, high)``."""
    width = high - low
    return next((c for c, bound in enumerate(SPAN_WIDTHS) if width <= bound), WIDE)


SOLE = tuple(range(WIDE + 1))


def _span_ranges(boxes: list[Box], spans: tuple[int, ...]) -> list[Q]:
    """Rows of the given ``span`` values in any of ``boxes``, as the filters of index ranges
    (OR'd, the rows meant). A bound on ``high`` gives each bounded class its own index range,
    with the bound on ``low`` the class implies; the other spans share one range per box
    (``span IN (…)``)."""
    ranges = []
    for box in boxes:
        shared = spans
        if box.high_above is not None:
            shared = tuple(span for span in spans if span >= WIDE)
            for span in (span for span in spans if span < WIDE):
                lowest = box.high_above - SPAN_WIDTHS[span]
                ranges.append(Q(span=span, low__gte=lowest) & box.q())
        if shared:
            ranges.append(Q(span__in=shared) & box.q())
    return ranges


def _spans_q(boxes: list[Box], spans: tuple[int, ...]) -> Q:
    """Rows of the given ``span`` values in any of ``boxes`` (:func:`_span_ranges` OR'd)."""
    return _any(_span_ranges(boxes, spans))


def _any(conditions: list[Q]) -> Q:
    condition = Q(pk__in=[])
    for one in conditions:
        condition |= one
    return condition


def boxes_q(boxes: list[Box]) -> Q:
    """Rows in any of ``boxes`` (whatever their width class)."""
    condition = Q(pk__in=[])
    for box in boxes:
        condition |= box.q()
    return condition


def date_rows(resource_type: str, name: str, conditions: list[list[Box]]) -> QuerySet[SearchToken]:
    """The index rows of resources meeting every condition (each a union of boxes) on the
    date parameter ``name``: their ``resource_key`` values (with repeats) are the matches.

    One condition, or several while no resource has several values of the parameter: one
    read of the rows in the (merged) boxes, a union of short index ranges. Otherwise
    condition ``i`` reads the sole rows in the merged boxes and the rows of resources with
    several values in its own boxes; the intersection over ``i`` is exactly the resources
    meeting every condition.
    """
    rows = SearchToken.objects.filter(resource_type=resource_type, param=name)
    merged: list[Box] | None = [Box()]
    for alternatives in conditions:
        merged = [m & a for m, a in itertools.product(merged, alternatives)]
        merged = [box for box in merged if not box.empty()]
        if len(merged) > MAX_BOXES:
            merged = None  # each condition then reads its own sole rows too
            break
    if len(conditions) == 1:
        return _read_once(rows, _span_ranges(conditions[0], (*SOLE, SEVERAL)))
    several = rows.filter(span=SEVERAL)
    if merged is not None and not several.exists():
        return _read_once(rows, _span_ranges(merged, SOLE))
    keys = None
    for alternatives in conditions:
        sole = _spans_q(merged if merged is not None else alternatives, SOLE)
        part = rows.filter(sole | _spans_q(alternatives, (SEVERAL,)))
        keys = part if keys is None else keys.filter(resource_key__in=part.values("resource_key"))
    assert keys is not None
    return keys.values("resource_key")


def _read_once(rows: QuerySet[SearchToken], ranges: list[Q]) -> QuerySet[SearchToken]:
    """The keys of ``rows`` in any of ``ranges``; the ranges stay with the QuerySet (as
    ``index_ranges``, see :func:`index_ranges`)."""
    keys = rows.filter(_any(ranges)).values("resource_key")
    keys.index_ranges = [rows.filter(one) for one in ranges]  # type: ignore[attr-defined]
    return keys


def index_ranges(keys: QuerySet[SearchToken]) -> list[QuerySet[SearchToken]] | None:
    """The index ranges whose union is a date search's set of keys (:func:`date_rows`), or
    None for any other set.

    Read on their own, each is an index-only scan of ``(type, param, span, low, high,
    resource_key)``. PostgreSQL reads their OR through a bitmap of the heap pages instead:
    a week of 10^6 Observations is 17,000 rows on 15,000 pages (250 ms, against 45 ms for
    the UNION of the ranges, EXPLAIN ANALYZE at load 10).
    """
    return getattr(keys, "index_ranges", None) or None
