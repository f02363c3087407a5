"""ClickHouse schema of the member event store (SQL subset that runs on 18.16 and current).

- ``Group_4_0_0_MemberEvents``: the raw event log, one row per member event. Event identity
  is (roster key, version, seq), the sort key of a ReplacingMergeTree, so a re-shipped batch
  collapses on merge; every read is written to give the same answer before the merge too.
- ``Group_4_0_0_MemberState``: current state per (roster key, member reference), kept by a
  materialized view as argMax states over ``pos = version << 32 | seq``; the roster order and
  the paging key are its sort key.
- ``Group_4_0_0_MemberGroups``: the same state sorted by (member reference, roster key), for
  ``Group?member=`` and "which groups is this patient in".

On a ClickHouse cluster (``CLICKHOUSE_CLUSTER``) each is a replicated ``<name>_local`` table
on every node behind a Distributed table of its name (``fhirservice.clickhouse.migrations``).
"""

from fhirservice.clickhouse.migrations import MaterializedView, Migration, ServedTable

EVENTS = "Group_4_0_0_MemberEvents"
STATE = "Group_4_0_0_MemberState"
REVERSE = "Group_4_0_0_MemberGroups"

POS = "bitShiftLeft(toUInt64(version), 32) + seq"

# Sharding key of all three tables: a roster's events and both of its state tables' rows
# live on one shard, where the views derive the states from the events.
SHARD_BY = "cityHash64(roster_key)"

MIGRATIONS = [
    Migration(
        "groups",
        "0001_member_events",
        [
            ServedTable(
                EVENTS,
                """
            roster_key String,
            member_ref String,
            member_type String,
            event_type Enum8('added' = 1, 'removed' = 2, 'updated' = 3),
            version UInt64,
            seq UInt32,
            period_start String,
            period_end String,
            inactive UInt8,
            extra String,
            recorded_at DateTime,
            request_id String,
            source String,
            actor String
        """,
                "ReplacingMergeTree",
                "(roster_key, version, seq)",
                SHARD_BY,
            ),
            ServedTable(
                STATE,
                """
            roster_key String,
            member_ref String,
            pos AggregateFunction(max, UInt64),
            present AggregateFunction(argMax, UInt8, UInt64),
            member_type AggregateFunction(argMax, String, UInt64),
            period_start AggregateFunction(argMax, String, UInt64),
            period_end AggregateFunction(argMax, String, UInt64),
            inactive AggregateFunction(argMax, UInt8, UInt64),
            extra AggregateFunction(argMax, String, UInt64)
        """,
                "AggregatingMergeTree",
                "(roster_key, member_ref)",
                SHARD_BY,
            ),
            MaterializedView(
                f"{STATE}_mv",
                STATE,
                EVENTS,
                f"""roster_key, member_ref,
            maxState({POS}) AS pos,
            argMaxState(toUInt8(event_type != 'removed'), {POS}) AS present,
            argMaxState(member_type, {POS}) AS member_type,
            argMaxState(period_start, {POS}) AS period_start,
            argMaxState(period_end, {POS}) AS period_end,
            argMaxState(inactive, {POS}) AS inactive,
            argMaxState(extra, {POS}) AS extra""",
                "roster_key, member_ref",
            ),
            ServedTable(
                REVERSE,
                """
            member_ref String,
            roster_key String,
            pos AggregateFunction(max, UInt64),
            present AggregateFunction(argMax, UInt8, UInt64),
            inactive AggregateFunction(argMax, UInt8, UInt64)
        """,
                "AggregatingMergeTree",
                "(member_ref, roster_key)",
                SHARD_BY,
            ),
            MaterializedView(
                f"{REVERSE}_mv",
                REVERSE,
                EVENTS,
                f"""member_ref, roster_key,
            maxState({POS}) AS pos,
            argMaxState(toUInt8(event_type != 'removed'), {POS}) AS present,
            argMaxState(inactive, {POS}) AS inactive""",
                "member_ref, roster_key",
            ),
        ],
    ),
]
