"""ClickHouse schema of the member event store (SQL subset that runs on 18.16 and current).

- ``Group_4_0_0_MemberEvents``: the raw event log, one row per member event. Event identity
  is (roster key, version, seq), the sort key of a ReplacingMergeTree, so a re-shipped batch
  collapses on merge; every read is written to give the same answer before the merge too.
- ``Group_4_0_0_MemberState``: current state per (roster key, member reference), kept by a
  materialized view as argMax states over ``pos = version << 32 | seq``; the roster order and
  the paging key are its sort key.
- ``Group_4_0_0_MemberGroups``: the same state sorted by (member reference, roster key), for
  ``Group?member=`` and "which groups is this patient in".
"""

from fhirservice.clickhouse.migrations import Migration

EVENTS = "Group_4_0_0_MemberEvents"
STATE = "Group_4_0_0_MemberState"
REVERSE = "Group_4_0_0_MemberGroups"

POS = "bitShiftLeft(toUInt64(version), 32) + seq"

MIGRATIONS = [
    Migration(
        "groups",
        "0001_member_events",
        [
            f"""CREATE TABLE IF NOT EXISTS {EVENTS}{{on_cluster}} (
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
        ) ENGINE = ReplacingMergeTree ORDER BY (roster_key, version, seq)""",
            f"""CREATE TABLE IF NOT EXISTS {STATE}{{on_cluster}} (
            roster_key String,
            member_ref String,
            pos AggregateFunction(max, UInt64),
            present AggregateFunction(argMax, UInt8, UInt64),
            member_type AggregateFunction(argMax, String, UInt64),
            period_start AggregateFunction(argMax, String, UInt64),
            period_end AggregateFunction(argMax, String, UInt64),
            inactive AggregateFunction(argMax, UInt8, UInt64),
            extra AggregateFunction(argMax, String, UInt64)
        ) ENGINE = AggregatingMergeTree ORDER BY (roster_key, member_ref)""",
            f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {STATE}_mv{{on_cluster}} TO {STATE} AS
        SELECT roster_key, member_ref,
            maxState({POS}) AS pos,
            argMaxState(toUInt8(event_type != 'removed'), {POS}) AS present,
            argMaxState(member_type, {POS}) AS member_type,
            argMaxState(period_start, {POS}) AS period_start,
            argMaxState(period_end, {POS}) AS period_end,
            argMaxState(inactive, {POS}) AS inactive,
            argMaxState(extra, {POS}) AS extra
        FROM {EVENTS} GROUP BY roster_key, member_ref""",
            f"""CREATE TABLE IF NOT EXISTS {REVERSE}{{on_cluster}} (
            member_ref String,
            roster_key String,
            pos AggregateFunction(max, UInt64),
            present AggregateFunction(argMax, UInt8, UInt64),
            inactive AggregateFunction(argMax, UInt8, UInt64)
        ) ENGINE = AggregatingMergeTree ORDER BY (member_ref, roster_key)""",
            f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {REVERSE}_mv{{on_cluster}} TO {REVERSE} AS
        SELECT member_ref, roster_key,
            maxState({POS}) AS pos,
            argMaxState(toUInt8(event_type != 'removed'), {POS}) AS present,
            argMaxState(inactive, {POS}) AS inactive
        FROM {EVENTS} GROUP BY member_ref, roster_key""",
        ],
    ),
]
