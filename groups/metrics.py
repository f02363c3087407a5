"""The member-event shipping backlog, for metrics (``/metrics``) and readiness (``/readyz``).

Read from the outbox (``groups.outbox.pending.outbox_backlog``) at scrape or probe time, so every
process reports the same numbers. A backlog that grows, or whose oldest batch keeps ageing,
means ClickHouse is unreachable or the relay is stuck: alert on
``fhir_member_backlog_oldest_age_seconds``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from groups.outbox.pending import outbox_backlog

GAUGES = (
    (
        "fhir_member_backlog_batches",
        "batches",
        "Member event batches committed to the outbox and not yet shipped to ClickHouse.",
    ),
    ("fhir_member_backlog_events", "events", "Member events in those batches."),
    (
        "fhir_member_backlog_failing_batches",
        "failing",
        "Pending batches whose last shipping attempt failed.",
    ),
    (
        "fhir_member_backlog_oldest_age_seconds",
        "oldest_age",
        "How long the oldest pending batch has waited (0 when nothing waits).",
    ),
    (
        "fhir_member_recounts_pending",
        "recounts",
        "Batches of versions written blind whose quantity is not corrected yet.",
    ),
)


class MemberBacklogCollector(Collector):
    """Gauges of the outbox's backlog, computed at each scrape."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One gauge per backlog figure."""
        backlog = outbox_backlog()
        for name, field, documentation in GAUGES:
            yield GaugeMetricFamily(name, documentation, value=getattr(backlog, field))


def backlog_detail() -> dict[str, Any]:
    """The backlog as the readiness answer shows it."""
    backlog = outbox_backlog()
    return {
        "batches": backlog.batches,
        "events": backlog.events,
        "failing": backlog.failing,
        "oldest_age_seconds": round(backlog.oldest_age, 3),
        "recounts": backlog.recounts,
    }
