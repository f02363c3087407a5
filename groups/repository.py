"""The member event repository: every SQL statement the app sends to ClickHouse.

Reads are written for the sort keys: the roster of one roster key is a range of
``Group_4_0_0_MemberState`` (sorted by member reference), and "groups of a member" is a range
of ``Group_4_0_0_MemberGroups``. Every read aggregates argMax states by ``pos`` (version << 32
| seq), so it gives the same answer whether or not parts have merged and whether or not a
batch was inserted twice. No ``FINAL`` anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fhirservice.clickhouse import ClickHouseClient, get_clickhouse
from groups.clickhouse_migrations import EVENTS, POS, REVERSE, STATE

EVENT_COLUMNS = (
    "roster_key",
    "member_ref",
    "member_type",
    "event_type",
    "version",
    "seq",
    "period_start",
    "period_end",
    "inactive",
    "extra",
    "recorded_at",
    "request_id",
    "source",
    "actor",
)

# Aliases differ from column names: ClickHouse resolves an alias that shadows a column
# inside its own aggregate as a cycle.
_STATE_COLUMNS = (
    "member_ref, argMaxMerge(member_type) AS s_type, argMaxMerge(period_start) AS s_start, "
    "argMaxMerge(period_end) AS s_end, argMaxMerge(inactive) AS s_inactive, "
    "argMaxMerge(extra) AS s_extra, maxMerge(pos) AS s_pos, argMaxMerge(present) AS s_present"
)
_EVENT_STATE_COLUMNS = (
    f"member_ref, argMax(member_type, {POS}) AS s_type, argMax(period_start, {POS}) AS s_start, "
    f"argMax(period_end, {POS}) AS s_end, argMax(inactive, {POS}) AS s_inactive, "
    f"argMax(extra, {POS}) AS s_extra, max({POS}) AS s_pos, "
    f"argMax(toUInt8(event_type != 'removed'), {POS}) AS s_present"
)


@dataclass(frozen=True, slots=True)
class MemberState:
    """A member reference's latest state in a roster (present False: removed)."""

    ref: str
    member_type: str
    period_start: str
    period_end: str
    inactive: bool
    extra: str
    pos: int
    present: bool

    @property
    def active(self) -> bool:
        """Counted in Group.quantity: present and not inactive."""
        return self.present and not self.inactive


def _state(row: tuple) -> MemberState:
    return MemberState(
        row[0], row[1], row[2], row[3], bool(row[4]), row[5], int(row[6]), bool(row[7])
    )


class MemberEventRepository:
    """SQL over the member event tables of one ClickHouse client."""

    def __init__(self, client: ClickHouseClient | None = None) -> None:
        self.client = client or get_clickhouse()

    def _in_order(self) -> dict[str, Any]:
        # Lets current ClickHouse stream a GROUP BY on the sort key instead of hashing the
        # whole range (chdb, new servers); 18.16 does not know the setting.
        if self.client.supports_setting("optimize_aggregation_in_order"):
            return {"optimize_aggregation_in_order": 1}
        return {}

    def insert_events(self, rows: Iterable[tuple]) -> int:
        """Append member event rows (EVENT_COLUMNS order); re-inserting is harmless."""
        return self.client.insert(EVENTS, EVENT_COLUMNS, rows)

    def count_events(self, roster_key: str, version: int) -> int:
        """Distinct events (by seq) stored for one roster version."""
        rows = self.client.execute(
            f"SELECT uniqExact(seq) FROM {EVENTS} WHERE roster_key = %(k)s AND version = %(v)s",
            {"k": roster_key, "v": version},
        )
        return int(rows[0][0])

    def lookup(self, roster_key: str, refs: list[str]) -> dict[str, MemberState]:
        """Current state of some member references (absent: never in the roster)."""
        if not refs:
            return {}
        rows = self.client.execute(
            f"SELECT {_STATE_COLUMNS} FROM {STATE} WHERE roster_key = %(k)s "
            f"AND member_ref IN %(refs)s GROUP BY roster_key, member_ref",
            {"k": roster_key, "refs": tuple(refs)},
        )
        return {row[0]: _state(row) for row in rows}

    def iter_roster(
        self,
        roster_key: str,
        *,
        after: str = "",
        limit: int | None = None,
        include_removed: bool = False,
    ) -> Iterator[MemberState]:
        """Current members in reference order, after ``after``, streamed."""
        having = "" if include_removed else " HAVING s_present = 1"
        sql = (
            f"SELECT {_STATE_COLUMNS} FROM {STATE} WHERE roster_key = %(k)s "
            f"AND member_ref > %(after)s GROUP BY roster_key, member_ref{having} "
            f"ORDER BY member_ref"
        )
        params: dict[str, Any] = {"k": roster_key, "after": after}
        if limit is not None:
            sql += " LIMIT %(limit)s"
            params["limit"] = limit
            return iter(
                [_state(r) for r in self.client.execute(sql, params, settings=self._in_order())]
            )
        return (_state(r) for r in self.client.iter_rows(sql, params, settings=self._in_order()))

    def iter_roster_as_of(
        self,
        roster_key: str,
        version: int,
        *,
        after: str = "",
        limit: int | None = None,
        include_removed: bool = False,
    ) -> Iterator[MemberState]:
        """Members as of a version (events with version ≤ v), in reference order, streamed."""
        having = "" if include_removed else " HAVING s_present = 1"
        sql = (
            f"SELECT {_EVENT_STATE_COLUMNS} FROM {EVENTS} WHERE roster_key = %(k)s "
            f"AND version <= %(v)s AND member_ref > %(after)s GROUP BY member_ref"
            f"{having} ORDER BY member_ref"
        )
        params: dict[str, Any] = {"k": roster_key, "v": version, "after": after}
        if limit is not None:
            sql += " LIMIT %(limit)s"
            params["limit"] = limit
            return iter([_state(r) for r in self.client.execute(sql, params)])
        return (_state(r) for r in self.client.iter_rows(sql, params))

    def count_active(self, roster_key: str) -> int:
        """Active members (present, not inactive) now, from the current-state table."""
        rows = self.client.execute(
            f"SELECT count() FROM (SELECT argMaxMerge(present) AS p, argMaxMerge(inactive) AS i "
            f"FROM {STATE} WHERE roster_key = %(k)s GROUP BY roster_key, member_ref) "
            f"WHERE p = 1 AND i = 0",
            {"k": roster_key},
            settings=self._in_order(),
        )
        return int(rows[0][0])

    def rosters_of(self, refs: list[str], *, active_only: bool = False) -> list[tuple[str, str]]:
        """(member reference, roster key) pairs where the member is present (or active)."""
        if not refs:
            return []
        condition = "p = 1 AND i = 0" if active_only else "p = 1"
        rows = self.client.execute(
            f"SELECT member_ref, roster_key FROM (SELECT member_ref, roster_key, "
            f"argMaxMerge(present) AS p, argMaxMerge(inactive) AS i FROM {REVERSE} "
            f"WHERE member_ref IN %(refs)s GROUP BY member_ref, roster_key) WHERE {condition}",
            {"refs": tuple(refs)},
            settings=self._in_order(),
        )
        return [(row[0], row[1]) for row in rows]

    def events(
        self,
        roster_key: str,
        *,
        member_ref: str | None = None,
        before_version: int | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """The event timeline of a roster, newest first, each event once."""
        conditions = ["roster_key = %(k)s"]
        params: dict[str, Any] = {"k": roster_key, "limit": limit}
        if member_ref:
            conditions.append("member_ref = %(ref)s")
            params["ref"] = member_ref
        if before_version is not None:
            conditions.append("version < %(before)s")
            params["before"] = before_version
        rows = self.client.execute(
            f"SELECT version, seq, any(member_ref), any(event_type), any(period_start), "
            f"any(period_end), any(inactive), any(recorded_at), any(request_id), any(source), "
            f"any(actor) FROM {EVENTS} WHERE {' AND '.join(conditions)} "
            f"GROUP BY version, seq ORDER BY version DESC, seq DESC LIMIT %(limit)s",
            params,
        )
        keys = (
            "version",
            "seq",
            "member_ref",
            "event_type",
            "period_start",
            "period_end",
            "inactive",
            "recorded_at",
            "request_id",
            "source",
            "actor",
        )
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def versions_with_events(self, roster_key: str) -> dict[int, int]:
        """{version: distinct events} of a roster: what repair compares with the outbox."""
        rows = self.client.execute(
            f"SELECT version, uniqExact(seq) FROM {EVENTS} WHERE roster_key = %(k)s "
            f"GROUP BY version",
            {"k": roster_key},
        )
        return {int(v): int(n) for v, n in rows}


def event_row(
    roster_key: str,
    version: int,
    event: list[Any],
    recorded_at: datetime,
    request_id: str,
    source: str,
    actor: str,
) -> tuple:
    """A ClickHouse row from an outbox event list (see MemberOutbox.events)."""
    ref, event_type, seq, member_type, start, end, inactive, extra = event
    return (
        roster_key,
        ref,
        member_type,
        event_type,
        version,
        seq,
        start,
        end,
        1 if inactive else 0,
        extra,
        recorded_at,
        request_id,
        source,
        actor,
    )
