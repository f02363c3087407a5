"""The member event repository: every SQL statement the app sends to ClickHouse.

Reads are written for the sort keys: the roster of one roster key is a range of
``Group_4_0_0_MemberState`` (sorted by member reference), and "groups of a member" is a range
of ``Group_4_0_0_MemberGroups``. Every read aggregates argMax states by ``pos`` (version << 32
| seq), so it gives the same answer whether or not parts have merged and whether or not a
batch was inserted twice. No ``FINAL`` anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from fhirservice.clickhouse import ClickHouseClient, get_clickhouse
from fhirservice.clickhouse.migrations import local_table
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


# A member's JSON element, rendered by ClickHouse, for the common member: no extra elements
# and reference/period text that needs no JSON escaping (printable ASCII without '"' and
# '\\'; one match over the three concatenated, each being plain exactly when all are). Any
# other member comes out as the hex of its reference (never starting with "{") and is
# rendered in Python (members.render_member, whose output this matches byte for byte).
#
# It renders one state row's values (``r_*``, below): a state row holds argMax states of one
# or more events, all by the same position, so finalizing each column gives the values of
# that row's newest event, and the member's current state is its row with the largest
# ``r_pos``. No GROUP BY: merging the argMax states in a hash table per member cost
# ClickHouse 18.16 ~1.6 s of CPU per 10^6 members, and sorting the result ~0.5 s more.
_PLAIN = r"'^[!#-\\[\\]-~]*$'"
_JSON_OR_HEX = (
    f"if(r_extra = '' AND match(concat(member_ref, r_start, r_end), {_PLAIN}), "
    'concat(\'{"entity":{"reference":"\', member_ref, \'"}\', '
    "if(r_start = '' AND r_end = '', '', concat(',\"period\":{', "
    "if(r_start = '', '', concat('\"start\":\"', r_start, '\"')), "
    "if(r_start != '' AND r_end != '', ',', ''), "
    "if(r_end = '', '', concat('\"end\":\"', r_end, '\"')), '}')), "
    "if(r_inactive = 1, ',\"inactive\":true', ''), '}'), hex(member_ref))"
)
_ROW_VALUES = (
    "member_ref, finalizeAggregation(pos) AS r_pos, finalizeAggregation(present) AS r_present, "
    "finalizeAggregation(extra) AS r_extra, finalizeAggregation(period_start) AS r_start, "
    "finalizeAggregation(period_end) AS r_end, finalizeAggregation(inactive) AS r_inactive"
)
# One window of the sort key as ONE row: its present members' elements, in reference order,
# joined by commas (the response's text as it is), or, when any of them is in hex (to be
# rendered in Python), each on a line of its own after a leading newline. The window's state
# rows are collected as (reference, position, present, element) tuples and sorted as tuples
# (deterministic: no reliance on the order in which groupArray sees rows); of each run of one
# reference the last (newest) is kept, if present. A driver then decodes ~20 strings per
# 10^6 members instead of 10^6, and Python neither splits nor scans the common window.
_WINDOW_ELEMENTS = (
    "arrayFilter((e, r, next_r, p) -> r != next_r AND p = 1, arrayMap(row -> row.4, rows), "
    "arrayMap(row -> row.1, rows) AS refs, arrayPopFront(arrayPushBack(refs, '')), "
    "arrayMap(row -> row.3, rows))"
)
_ROSTER_JSON_WINDOW = (
    "SELECT if(arrayExists(e -> substring(e, 1, 1) != '{', elements), "
    "concat('\\n', arrayStringConcat(elements, '\\n')), arrayStringConcat(elements, ',')) "
    f"FROM (SELECT {_WINDOW_ELEMENTS} AS elements FROM (SELECT arraySort(groupArray(("
    f"member_ref, r_pos, r_present, {_JSON_OR_HEX}))) AS rows FROM (SELECT {_ROW_VALUES} "
    f"FROM {STATE} WHERE roster_key = %(k)s AND member_ref > %(after)s "
    "AND member_ref <= %(bound)s)))"
)


class MemberState(NamedTuple):
    """A member reference's latest state in a roster (present False: removed).

    A named tuple rather than a frozen dataclass: a streamed roster builds one per member,
    and a tuple is built ~3x faster (a frozen dataclass sets each field through
    ``object.__setattr__``), about 2 s less per 10^6-member read.
    """

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

    def rendered(self) -> tuple[str, str, str, bool, str]:
        """The arguments of ``members.render_member`` for this state."""
        return self.ref, self.period_start, self.period_end, self.inactive, self.extra


# The upper end of a page's window: the last of the next %(window)s state rows' references
# (read in sort-key order; a scalar subquery, folded to a constant before index analysis).
_PAGE_WINDOW = (
    f" AND member_ref <= (SELECT max(member_ref) FROM (SELECT member_ref FROM {STATE} "
    f"WHERE roster_key = %(k)s AND member_ref > %(after)s "
    f"ORDER BY roster_key, member_ref LIMIT %(window)s))"
)


# The threads that read windows ahead, shared by the process's requests and kept between
# GETs (none started per request; its threads start at the first use, after a worker's
# fork), so a served worker's per-thread CPU (/proc/PID/task/*/schedstat, as bench.server
# sums it) keeps their time. One per request thread of a gunicorn worker (--threads 8): a
# GET has one fetch in flight.
_READ_AHEAD = ThreadPoolExecutor(max_workers=8, thread_name_prefix="roster-read-ahead")


def _read_ahead(items: Iterator[bytes]) -> Iterator[bytes]:
    """``items`` in order, each next one fetched on a helper thread while the caller handles
    the one before: ClickHouse renders a window while the previous one is being sent, on the
    server's threads or chdb's (both release the interpreter). At most two windows are in
    memory; an early close waits for the one being fetched."""
    future = _READ_AHEAD.submit(next, items, None)
    try:
        while (item := future.result()) is not None:
            future = _READ_AHEAD.submit(next, items, None)
            yield item
    finally:
        wait([future])


def _state(row: tuple) -> MemberState:
    return MemberState(
        row[0], row[1], row[2], row[3], bool(row[4]), row[5], int(row[6]), bool(row[7])
    )


# Members per windowed query when an embedded engine streams a whole roster: each window
# costs two queries (~10 ms of chdb's CPU each beyond the rows); at 50,000 a 10^6 walk took
# 1.2 s of CPU against 1.6 s at 20,000, for ~30 MB more peak RSS.
ROSTER_WINDOW = 50_000

# Bytes of quoted values per ``IN (…)`` list: ClickHouse refuses SELECT text longer than
# max_query_size (256 KiB by default, on 18.16 as on current releases), and a PATCH may name
# 10,000+ members. Longer lists are split into several queries.
IN_LIST_BYTES = 200_000
_ESCAPED = frozenset("\\'\x00\x08\x0c\r\n\t")


def in_chunks(values: Iterable[str], max_bytes: int = IN_LIST_BYTES) -> Iterator[tuple[str, ...]]:
    """Split values into tuples whose quoted SQL literals stay under ``max_bytes``."""
    chunk: list[str] = []
    size = 0
    for value in values:
        encoded = len(value.encode())
        # Quotes and ", "; escaping at most doubles a value's length.
        cost = encoded * (2 if _ESCAPED.intersection(value) else 1) + 4
        if chunk and size + cost > max_bytes:
            yield tuple(chunk)
            chunk, size = [], 0
        chunk.append(value)
        size += cost
    if chunk:
        yield tuple(chunk)


def _pair_chunks(
    pairs: Iterable[tuple[str, Any]], *, reverse: bool = False, max_bytes: int = IN_LIST_BYTES
) -> Iterator[tuple[tuple[Any, Any], ...]]:
    """Split (roster key, value) pairs into tuples for a tuple ``IN`` whose SQL literals stay
    under ``max_bytes`` (as :func:`in_chunks`); ``reverse``: each pair as (value, roster key),
    the order of the reverse table's sort key."""
    chunk: list[tuple[Any, Any]] = []
    size = 0
    for first, second in pairs:
        texts = [value for value in (first, second) if isinstance(value, str)]
        cost = sum(len(t.encode()) * (2 if _ESCAPED.intersection(t) else 1) for t in texts) + 28
        if chunk and size + cost > max_bytes:
            yield tuple(chunk)
            chunk, size = [], 0
        chunk.append((second, first) if reverse else (first, second))
        size += cost
    if chunk:
        yield tuple(chunk)


# The tables one roster lives in: repair's deletes and mutation checks cover all three.
MEMBER_TABLES = (EVENTS, STATE, REVERSE)
# Columns of the admin's member timeline.
_TIMELINE_KEYS = (
    "version",
    "seq",
    "member_ref",
    "member_type",
    "event_type",
    "period_start",
    "period_end",
    "inactive",
    "recorded_at",
    "request_id",
    "source",
    "actor",
)
_PRESENT = f"argMax(toUInt8(event_type != 'removed'), {POS})"


@dataclass(frozen=True, slots=True)
class RosterConsistency:
    """How one roster's current-state rows compare with its event log.

    ``state_mismatches``: members whose ``MemberState`` row differs from the argMax over the
    log (or exists on one side only); ``reverse_mismatches`` the same for ``MemberGroups``.
    ``log_present`` / ``log_active``: members present / active according to the log.
    """

    roster_key: str
    state_mismatches: int = 0
    reverse_mismatches: int = 0
    sample: str = ""
    log_present: int = 0
    log_active: int = 0

    @property
    def consistent(self) -> bool:
        """Both state tables agree with the log."""
        return not self.state_mismatches and not self.reverse_mismatches


class MemberEventRepository:
    """SQL over the member event tables of one ClickHouse client.

    Request paths use the roster reads (lookups, pages, streams, reverse lookups). The
    operator's reads (timeline, whole-roster checks) and the mutations repair needs follow;
    the checks read whole rosters and the mutations rewrite parts, so no request path calls
    them, except :meth:`timeline` and :meth:`event_type_counts` (the admin's Group page).

    Removal uses ``ALTER TABLE … DELETE WHERE`` mutations (ClickHouse 18.16 has no
    lightweight ``DELETE``). Mutations are asynchronous and apply only to parts that exist
    when the mutation is created; rows inserted afterwards are kept. :meth:`rebuild_state`
    relies on that: it creates the delete first and inserts the rebuilt states after it, so
    readers never see an empty roster; :meth:`pending_mutations` tells when the old rows are
    gone. On a ClickHouse cluster the mutations name the connected replica's replicated tables
    (``local_table``); ZooKeeper hands them to the other replicas of its shard (the tested
    layout has one shard).
    """

    def __init__(self, client: ClickHouseClient | None = None) -> None:
        self.client = client or get_clickhouse()
        # (replicated table, its largest mutation id before ours): see _mutate.
        self._unseen_mutations: list[tuple[str, str]] = []

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

    def held_batches(self, batches: list[tuple[str, int, list[list[Any]]]]) -> list[bool]:
        """Whether every table that serves reads holds each of some outbox batches (roster
        key, version, its ``events``): the log each event, the state and reverse tables each
        member at a position at least as new as the batch's.

        Each table is checked on its own: an insert is the log's part first and then one part
        per materialized view, so a server that dies in between leaves a log that holds the
        batch and state tables that do not (issue 16, D1). A newer position in a state table
        means re-inserting the batch could not change what it answers there.

        One query per table for all the batches (in IN lists of at most IN_LIST_BYTES), not
        three per batch: after an outage the relay checks thousands. The log is read per
        version: a version's batches (its chunks) are held when the log's seqs of that version
        are exactly theirs. A version some of whose chunks were shipped before counts as not
        held, and is inserted again: harmless, as every read collapses duplicates.
        """
        held = [False] * len(batches)
        versions: dict[tuple[str, int], list[int]] = {}
        for index, (roster_key, version, _) in enumerate(batches):
            versions.setdefault((roster_key, version), []).append(index)
        logged: dict[tuple[str, int], tuple[int, int, int]] = {}
        for chunk in _pair_chunks(versions):
            rows = self.client.execute(
                f"SELECT roster_key, version, min(seq), max(seq), uniqExact(seq) FROM {EVENTS} "
                f"WHERE (roster_key, version) IN %(pairs)s GROUP BY roster_key, version",
                {"pairs": chunk},
            )
            logged.update(((k, int(v)), (int(lo), int(hi), int(n))) for k, v, lo, hi, n in rows)
        candidates = []
        for pair, indexes in versions.items():
            seqs = {event[2] for index in indexes for event in batches[index][2]}
            low, high = min(seqs), max(seqs)
            if logged.get(pair) == (low, high, len(seqs)) and high - low + 1 == len(seqs):
                candidates.extend(indexes)
        if not candidates:
            return held
        # The newest position of each member each candidate names, then what both state
        # tables hold for those (roster key, member) pairs.
        newest: dict[int, dict[str, int]] = {}
        wanted: set[tuple[str, str]] = set()
        for index in candidates:
            roster_key, version, events = batches[index]
            positions: dict[str, int] = {}
            for event in events:
                positions[event[0]] = max(positions.get(event[0], 0), (version << 32) | event[2])
            newest[index] = positions
            wanted.update((roster_key, ref) for ref in positions)
        states = []
        for table, key in ((STATE, "roster_key, member_ref"), (REVERSE, "member_ref, roster_key")):
            positions = {}
            for chunk in _pair_chunks(wanted, reverse=table == REVERSE):
                rows = self.client.execute(
                    f"SELECT roster_key, member_ref, maxMerge(pos) FROM {table} "
                    f"WHERE ({key}) IN %(pairs)s GROUP BY {key}",
                    {"pairs": chunk},
                )
                positions.update(((k, ref), int(pos)) for k, ref, pos in rows)
            states.append(positions)
        for index in candidates:
            roster_key = batches[index][0]
            held[index] = all(
                state.get((roster_key, ref), -1) >= pos
                for state in states
                for ref, pos in newest[index].items()
            )
        return held

    def activity_history(
        self, roster_key: str, refs: list[str], *, below_version: int
    ) -> list[tuple[str, int, bool]]:
        """(member reference, pos, active after the event) of every logged event of some
        members in versions before ``below_version``; a re-shipped event may come twice.

        The log is sorted by version, not member: this reads the roster's log filtered by
        member (a column scan of one roster's range), for the few members a recount needs.
        """
        history: list[tuple[str, int, bool]] = []
        for chunk in in_chunks(refs):
            rows = self.client.execute(
                f"SELECT member_ref, {POS}, event_type != 'removed' AND inactive = 0 "
                f"FROM {EVENTS} WHERE roster_key = %(k)s AND version < %(v)s "
                f"AND member_ref IN %(refs)s",
                {"k": roster_key, "v": below_version, "refs": chunk},
            )
            history.extend((ref, int(pos), bool(active)) for ref, pos, active in rows)
        return history

    def lookup(self, roster_key: str, refs: list[str]) -> dict[str, MemberState]:
        """Current state of some member references (absent: never in the roster)."""
        states: dict[str, MemberState] = {}
        # PREWHERE: the key columns of the granules the sort key selects are read first, the
        # seven aggregate states only where a reference matched. A write's lookup is mostly of
        # a member the roster does not hold (the digest could not tell): with WHERE, 18.16
        # read every column of those granules (a 10^5 roster in a 10^7-row table: 40 MB,
        # ~12 ms of server CPU per lookup; 4.4 MB and ~4 ms with PREWHERE).
        for chunk in in_chunks(refs):
            rows = self.client.execute(
                f"SELECT {_STATE_COLUMNS} FROM {STATE} PREWHERE roster_key = %(k)s "
                f"AND member_ref IN %(refs)s GROUP BY roster_key, member_ref",
                {"k": roster_key, "refs": chunk},
            )
            states.update((row[0], _state(row)) for row in rows)
        return states

    def iter_roster(
        self,
        roster_key: str,
        *,
        after: str = "",
        limit: int | None = None,
        include_removed: bool = False,
    ) -> Iterator[MemberState]:
        """Current members in reference order, after ``after``, streamed.

        With ``limit`` (a page), the aggregation is first confined to a window of the sort
        key: the state rows of the next ``2 * limit + 16`` rows' references. Without it,
        ClickHouse aggregates (and sorts) every state row after ``after`` before the first
        row comes out, seconds for a cursor early in a 10^6 roster; the window reads a few
        granules. Every state row of a reference inside the window is aggregated, so members
        inside it are exact; when it holds fewer than ``limit`` members (end of the roster,
        many removed members, unmerged parts) the unwindowed query answers instead.
        """
        if limit is not None:
            return map(_state, self._page(roster_key, after, limit, include_removed))
        sql = self._roster_sql(include_removed)
        if self.client.in_process:
            return (
                _state(row)
                for window, params in self._roster_windows(roster_key, after)
                for row in self.client.execute(
                    sql.format(window=window), params, settings=self._in_order()
                )
            )
        params = {"k": roster_key, "after": after}
        rows = self.client.iter_rows(sql.format(window=""), params, settings=self._in_order())
        return map(_state, rows)

    def iter_roster_json(self, roster_key: str) -> Iterator[bytes | MemberState]:
        """The current roster for a streamed read, in reference order: runs of members as
        their JSON elements joined by commas (bytes), as ClickHouse rendered them, and the
        members it could not render as their MemberState (the caller renders those).

        One query per window of the sort key (``_roster_windows``), each answering one row
        of text, so memory stays flat on both engines and a response chunk is a window's
        text. The next window is read while the caller sends this one (``_read_ahead``)."""
        windows = (
            self.client.execute_lines(_ROSTER_JSON_WINDOW, params)
            for _, params in self._roster_windows(roster_key, "")
        )
        for lines in _read_ahead(windows):
            yield from self._rendered(roster_key, lines)

    def _rendered(self, roster_key: str, lines: bytes) -> Iterator[bytes | MemberState]:
        """The items of ``iter_roster_json`` from a ``_ROSTER_JSON_WINDOW`` value and its
        line end (alone: a window without present members)."""
        if len(lines) < 2:
            return
        if lines[:1] != b"\n":  # the common case: the elements, comma-joined
            yield lines[:-1]
            return
        items = [
            item if item[:1] == b"{" else bytes.fromhex(item.decode()).decode()
            for item in lines[1:-1].split(b"\n")
        ]
        states = self.lookup(roster_key, [item for item in items if type(item) is str])
        run: list[bytes] = []
        for item in items:
            if type(item) is bytes:
                run.append(item)
                continue
            if run:
                yield b",".join(run)
                run = []
            yield states[item]
        if run:
            yield b",".join(run)

    @staticmethod
    def _roster_sql(include_removed: bool) -> str:
        having = "" if include_removed else " HAVING s_present = 1"
        return (
            f"SELECT {_STATE_COLUMNS} FROM {STATE} WHERE roster_key = %(k)s "
            f"AND member_ref > %(after)s{{window}} GROUP BY roster_key, member_ref{having} "
            f"ORDER BY member_ref"
        )

    def _page(self, roster_key: str, after: str, limit: int, include_removed: bool) -> list[tuple]:
        """Rows of one page: windowed first, unwindowed when the window falls short."""
        sql = self._roster_sql(include_removed) + " LIMIT %(limit)s"
        params: dict[str, Any] = {
            "k": roster_key,
            "after": after,
            "limit": limit,
            "window": 2 * limit + 16,
        }
        if self.client.in_process:
            window = _PAGE_WINDOW
        else:
            bound = self._window_bound(roster_key, after, params["window"])
            if bound is None:
                return []  # no state row after ``after``: the roster ends here
            window, params["bound"] = " AND member_ref <= %(bound)s", bound
        rows = self.client.execute(sql.format(window=window), params, settings=self._in_order())
        if len(rows) < limit:
            rows = self.client.execute(sql.format(window=""), params, settings=self._in_order())
        return rows

    def _window_bound(self, roster_key: str, after: str, window: int) -> str | None:
        """A reference past which a page need not look, or None (no state row after
        ``after``: the roster ends there).

        Embedded: the ``window``-th state row's reference in sort-key order. ClickHouse
        server: 18.16 cannot stop an ``ORDER BY`` on the sort key early: the scalar subquery
        of _PAGE_WINDOW reads every state row after ``after`` (~100 ms at the start of a 10^6
        roster). A plain LIMIT on one thread stops after ``window`` rows, each part read in
        key order from ``after``, so their largest reference bounds a window of at least
        ``window`` state rows, usually just that (the first part is the big merged one). Any
        bound gives exact members below it; a page that falls short reads unwindowed.
        """
        if self.client.in_process:
            sql = (
                f"SELECT max(member_ref), count() FROM (SELECT member_ref FROM {STATE} "
                f"WHERE roster_key = %(k)s AND member_ref > %(after)s "
                f"ORDER BY roster_key, member_ref LIMIT %(window)s)"
            )
            settings = None
        else:
            sql = (
                f"SELECT max(member_ref), count() FROM (SELECT member_ref FROM {STATE} "
                f"WHERE roster_key = %(k)s AND member_ref > %(after)s LIMIT %(window)s)"
            )
            settings = {"max_threads": 1}
        params = {"k": roster_key, "after": after, "window": window}
        rows = self.client.execute(sql, params, settings=settings)
        return rows[0][0] if rows and rows[0][1] else None

    def _roster_windows(self, roster_key: str, after: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """The whole roster after ``after`` as a walk of windows of the sort key (embedded
        ClickHouse): each window's condition and parameters, for the caller to query before
        the next one is bounded.

        One GROUP BY over a 10^6-member roster holds its aggregation state in memory until the
        last row is out; in chdb that memory is this process's (400+ MB). Each step bounds a
        window by the reference of the ROSTER_WINDOW-th state row after the previous window,
        and the caller aggregates just the state rows inside it: every state row is read and
        aggregated once, removed members and unmerged parts need no second look, memory
        stays flat.
        """
        while True:
            bound = self._window_bound(roster_key, after, ROSTER_WINDOW)
            if bound is None:
                return
            yield " AND member_ref <= %(bound)s", {"k": roster_key, "after": after, "bound": bound}
            after = bound

    def iter_roster_windows_as_of(
        self, roster_key: str, version: int, *, window: int = ROSTER_WINDOW
    ) -> Iterator[MemberState]:
        """Every member as of a version (events with version ≤ ``version``; removed ones
        too, ``present`` false), in reference order, streamed a window at a time.

        iter_roster_as_of aggregates the events table, whose sort key (roster_key, version,
        seq) does not bound a reference range: each call reads and aggregates every event of
        the roster after ``after``, so paging a 10^6 roster with it is quadratic. Here each
        window of the state table's sort key (roster_key, member_ref) is aggregated once, as
        _roster_windows walks them; a member whose newest event is later than ``version``
        (changed since) takes its state then from the events table, looked up by reference.
        """
        sql = self._roster_sql(True).format(window=" AND member_ref <= %(bound)s")
        settings = self._in_order()
        after = ""
        while True:
            bound = self._window_bound(roster_key, after, window)
            if bound is None:
                return
            params = {"k": roster_key, "after": after, "bound": bound}
            states = [_state(row) for row in self.client.execute(sql, params, settings=settings)]
            late = [state.ref for state in states if state.pos >> 32 > version]
            if late:
                then = self._states_as_of(roster_key, version, late)
                states = [then.get(s.ref) if s.pos >> 32 > version else s for s in states]
            yield from (state for state in states if state is not None)
            after = bound

    def _states_as_of(
        self, roster_key: str, version: int, refs: list[str]
    ) -> dict[str, MemberState]:
        """The states of some members as of a version (absent: not in the roster then)."""
        states: dict[str, MemberState] = {}
        for chunk in in_chunks(refs):
            rows = self.client.execute(
                f"SELECT {_EVENT_STATE_COLUMNS} FROM {EVENTS} WHERE roster_key = %(k)s "
                f"AND version <= %(v)s AND member_ref IN %(refs)s GROUP BY member_ref",
                {"k": roster_key, "v": version, "refs": chunk},
            )
            states.update((row[0], _state(row)) for row in rows)
        return states

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
        condition = "p = 1 AND i = 0" if active_only else "p = 1"
        pairs: list[tuple[str, str]] = []
        # No optimize_aggregation_in_order here: the IN list selects a few granules, which a
        # hash aggregation handles at once, while the in-order pipeline costs chdb ~40 ms
        # per query (7 ms without it, on a 6-million-row table). PREWHERE, as in ``lookup``:
        # the states only where a reference matched (~2 instead of ~3 ms of 18.16's CPU).
        for chunk in in_chunks(refs):
            rows = self.client.execute(
                f"SELECT member_ref, roster_key FROM (SELECT member_ref, roster_key, "
                f"argMaxMerge(present) AS p, argMaxMerge(inactive) AS i FROM {REVERSE} "
                f"PREWHERE member_ref IN %(refs)s GROUP BY member_ref, roster_key) "
                f"WHERE {condition}",
                {"refs": chunk},
            )
            pairs.extend((row[0], row[1]) for row in rows)
        return pairs

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

    # -- operator reads and the mutations repair needs --------------------------------------

    def timeline(
        self,
        roster_key: str,
        *,
        before: tuple[int, int] | None = None,
        low: tuple[int, int] | None = None,
        member_ref: str | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Events of a roster newest first, below ``before`` and from ``low`` = (version, seq).

        Keyset-paged on the log's sort key. ``low`` lets the caller bound the range to the
        page it wants (the outbox knows how many events each version has), so ClickHouse
        reads about ``limit`` rows of the sort key instead of the roster's whole log; current
        releases also read in order without it. No ``LIMIT 1 BY``: it defeats reading in
        order, so a re-shipped event (adjacent in this order) is dropped here instead.
        """
        conditions = ["roster_key = %(k)s"]
        params: dict[str, Any] = {"k": roster_key, "limit": limit}
        if member_ref:
            conditions.append("member_ref = %(ref)s")
            params["ref"] = member_ref
        if before is not None:
            conditions.append("(version < %(bv)s OR (version = %(bv)s AND seq < %(bs)s))")
            params["bv"], params["bs"] = before
        if low is not None:
            # Spelled as ranges on the key columns so that the primary index prunes them.
            conditions.append("version >= %(lv)s AND (version > %(lv)s OR seq >= %(ls)s)")
            params["lv"], params["ls"] = low
        rows = self.client.execute(
            f"SELECT {', '.join(_TIMELINE_KEYS)} FROM {EVENTS} "
            f"WHERE {' AND '.join(conditions)} ORDER BY version DESC, seq DESC "
            f"LIMIT %(limit)s",
            params,
        )
        events: list[dict[str, Any]] = []
        for row in rows:
            if events and (events[-1]["version"], events[-1]["seq"]) == (row[0], row[1]):
                continue
            events.append(dict(zip(_TIMELINE_KEYS, row, strict=True)))
        return events

    def event_type_counts(
        self, roster_key: str, versions: list[int], *, exact: bool = False
    ) -> dict[int, dict[str, int]]:
        """{version: {event type: events}} for some versions of a roster.

        ``exact`` counts distinct seqs (a hash set per version: costly for a million-event
        version); otherwise rows are counted, which a re-shipped, not yet merged batch
        inflates. Callers compare the sum with the outbox and ask again exactly on mismatch.
        """
        if not versions:
            return {}
        measure = "uniqExact(seq)" if exact else "count()"
        rows = self.client.execute(
            f"SELECT version, toString(event_type), {measure} FROM {EVENTS} "
            f"WHERE roster_key = %(k)s AND version IN %(vs)s GROUP BY version, event_type",
            {"k": roster_key, "vs": tuple(versions)},
        )
        counts: dict[int, dict[str, int]] = {}
        for version, event_type, n in rows:
            counts.setdefault(int(version), {})[event_type] = int(n)
        return counts

    def roster_keys(self, *, prefix: str | None = None) -> set[str]:
        """Every roster key found in the log or either state table (optionally by prefix)."""
        where, params = "", None
        if prefix is not None:
            where = " WHERE startsWith(roster_key, %(p)s)"
            params = {"p": prefix}
        rows = self.client.execute(
            f"SELECT DISTINCT roster_key FROM (SELECT roster_key FROM {EVENTS}{where} "
            f"UNION ALL SELECT roster_key FROM {STATE}{where} "
            f"UNION ALL SELECT roster_key FROM {REVERSE}{where})",
            params,
        )
        return {row[0] for row in rows}

    def version_counts(self, roster_keys: list[str]) -> dict[tuple[str, int], tuple[int, int]]:
        """{(roster key, version): (distinct events, highest seq)} over the log."""
        if not roster_keys:
            return {}
        rows = self.client.execute(
            f"SELECT roster_key, version, uniqExact(seq), max(seq) FROM {EVENTS} "
            f"WHERE roster_key IN %(keys)s GROUP BY roster_key, version",
            {"keys": tuple(roster_keys)},
        )
        return {(key, int(v)): (int(n), int(top)) for key, v, n, top in rows}

    def consistency(self, roster_keys: list[str]) -> dict[str, RosterConsistency]:
        """Compare both state tables with the argMax over the log, member by member.

        One query over three aggregations (state, log, reverse) unioned and grouped by
        member; a member is consistent when its state row hashes like its log-derived state.
        Rosters absent from every table are absent from the answer. Aliases (h, hs, lp, la)
        never reuse a column name: see ``_STATE_COLUMNS``.
        """
        if not roster_keys:
            return {}
        state_hash = (
            "cityHash64(maxMerge(pos), argMaxMerge(present), argMaxMerge(member_type), "
            "argMaxMerge(period_start), argMaxMerge(period_end), argMaxMerge(inactive), "
            "argMaxMerge(extra))"
        )
        log_hash = (
            f"cityHash64(max({POS}), {_PRESENT}, argMax(member_type, {POS}), "
            f"argMax(period_start, {POS}), argMax(period_end, {POS}), argMax(inactive, {POS}), "
            f"argMax(extra, {POS}))"
        )
        short_merged = "cityHash64(maxMerge(pos), argMaxMerge(present), argMaxMerge(inactive))"
        short_log = f"cityHash64(max({POS}), {_PRESENT}, argMax(inactive, {POS}))"
        rows = self.client.execute(
            "SELECT roster_key, countIf(NOT s_ok), countIf(NOT r_ok), "
            "anyIf(member_ref, NOT (s_ok AND r_ok)), sumIf(l_present, has_log), "
            "sumIf(l_active, has_log) FROM ("
            " SELECT roster_key, member_ref,"
            "  countIf(side = 1) = countIf(side = 2)"
            "   AND anyIf(h, side = 1) = anyIf(h, side = 2) AS s_ok,"
            "  countIf(side = 3) = countIf(side = 2)"
            "   AND anyIf(hs, side = 3) = anyIf(hs, side = 2) AS r_ok,"
            "  countIf(side = 2) = 1 AS has_log,"
            "  anyIf(lp, side = 2) AS l_present, anyIf(la, side = 2) AS l_active"
            " FROM ("
            f"  SELECT roster_key, member_ref, 1 AS side, {state_hash} AS h,"
            f"   {short_merged} AS hs, toUInt8(0) AS lp, toUInt8(0) AS la"
            f"  FROM {STATE} WHERE roster_key IN %(keys)s GROUP BY roster_key, member_ref"
            "  UNION ALL"
            f"  SELECT roster_key, member_ref, 2 AS side, {log_hash} AS h, {short_log} AS hs,"
            f"   {_PRESENT} AS lp,"
            f"   toUInt8({_PRESENT} = 1 AND argMax(inactive, {POS}) = 0) AS la"
            f"  FROM {EVENTS} WHERE roster_key IN %(keys)s GROUP BY roster_key, member_ref"
            "  UNION ALL"
            f"  SELECT roster_key, member_ref, 3 AS side, toUInt64(0) AS h, {short_merged} AS hs,"
            "   toUInt8(0) AS lp, toUInt8(0) AS la"
            f"  FROM {REVERSE} WHERE roster_key IN %(keys)s GROUP BY member_ref, roster_key"
            " ) GROUP BY roster_key, member_ref"
            ") GROUP BY roster_key",
            {"keys": tuple(roster_keys)},
        )
        return {
            key: RosterConsistency(key, int(bad_state), int(bad_reverse), sample, int(p), int(a))
            for key, bad_state, bad_reverse, sample, p, a in rows
        }

    def delete_events(
        self, roster_key: str, *, version: int | None = None, min_seq: int | None = None
    ) -> None:
        """Start removing log rows of a roster (one version, from ``min_seq`` on); async."""
        conditions = ["roster_key = %(k)s"]
        params: dict[str, Any] = {"k": roster_key}
        if version is not None:
            conditions.append("version = %(v)s")
            params["v"] = version
        if min_seq is not None:
            conditions.append("seq >= %(s)s")
            params["s"] = min_seq
        self._mutate(EVENTS, " AND ".join(conditions), params)

    def delete_roster(self, roster_key: str) -> None:
        """Start removing every row of a roster key from the log and both state tables."""
        for table in MEMBER_TABLES:
            self.delete_rows(table, roster_key)

    def delete_rows(self, table: str, roster_key: str) -> None:
        """Start removing a roster key's rows from one member table; async."""
        self._mutate(table, "roster_key = %(k)s", {"k": roster_key})

    def _mutate(self, table: str, where: str, params: dict[str, Any]) -> None:
        """``ALTER TABLE … DELETE WHERE``, tracked until this replica knows the mutation.

        On a single node the mutation is in ``system.mutations`` when the statement returns.
        A replicated table's mutation is created in ZooKeeper, and each replica loads it
        into its ``system.mutations`` moments later: until then "no mutation pending" would
        be read as "done". Replicated mutation ids are zero-padded sequence numbers, so the
        replica knows ours once its largest id is past the one it had before.
        """
        local = local_table(table)
        replicated = local != table
        if replicated:
            before = self._last_mutation_id(local)
        self.client.command(f"ALTER TABLE {local} DELETE WHERE {where}", params)
        if replicated:
            self._unseen_mutations.append((local, before))

    def _last_mutation_id(self, local: str) -> str:
        rows = self.client.execute(
            "SELECT max(mutation_id) FROM system.mutations "
            "WHERE database = currentDatabase() AND table = %(t)s",
            {"t": local},
        )
        return str(rows[0][0])

    def rebuild_state(self, roster_key: str) -> None:
        """Replace a roster's rows in both state tables with states derived from its log.

        The deletes are created before the inserts, so they remove only the old rows: the
        roster stays readable throughout (old and new states merge by position until the
        mutation has run). Wait until :meth:`pending_mutations` is 0 before relying on the result.
        """
        params = {"k": roster_key}
        for table in (STATE, REVERSE):
            self.delete_rows(table, roster_key)
        self.client.command(
            f"INSERT INTO {STATE} (roster_key, member_ref, pos, present, member_type, "
            f"period_start, period_end, inactive, extra) SELECT roster_key, member_ref, "
            f"maxState({POS}), argMaxState(toUInt8(event_type != 'removed'), {POS}), "
            f"argMaxState(member_type, {POS}), argMaxState(period_start, {POS}), "
            f"argMaxState(period_end, {POS}), argMaxState(inactive, {POS}), "
            f"argMaxState(extra, {POS}) FROM {EVENTS} WHERE roster_key = %(k)s "
            f"GROUP BY roster_key, member_ref",
            params,
        )
        self.client.command(
            f"INSERT INTO {REVERSE} (member_ref, roster_key, pos, present, inactive) "
            f"SELECT member_ref, roster_key, maxState({POS}), "
            f"argMaxState(toUInt8(event_type != 'removed'), {POS}), "
            f"argMaxState(inactive, {POS}) FROM {EVENTS} WHERE roster_key = %(k)s "
            f"GROUP BY member_ref, roster_key",
            params,
        )

    def pending_mutations(self) -> int:
        """Mutations of the member tables that have not finished yet (on this replica,
        counting those of this repository it has not loaded yet; see :meth:`_mutate`)."""
        self._unseen_mutations = [
            (local, before)
            for local, before in self._unseen_mutations
            if self._last_mutation_id(local) <= before
        ]
        rows = self.client.execute(
            "SELECT count() FROM system.mutations WHERE database = currentDatabase() "
            "AND table IN %(tables)s AND is_done = 0",
            {"tables": tuple(local_table(table) for table in MEMBER_TABLES)},
        )
        return int(rows[0][0]) + len(self._unseen_mutations)


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
