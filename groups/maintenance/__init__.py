"""Roster maintenance, one module per job: ``scan`` (find damage, verify one roster),
``repair`` (ship, rebuild, fix what a scan found) and ``backfill`` (move inline rosters into
ClickHouse); ``common`` holds what they share.

The admin's actions and the ``repair_group_members`` / ``backfill_group_members`` commands
are thin wrappers over these services. A roster is stored three times over, and each copy
can be checked against another:

- the **outbox** (metadata store): every committed member event, written with its version;
- the **event log** (ClickHouse ``Group_4_0_0_MemberEvents``): the shipped copy;
- the **current-state tables** (``MemberState``, ``MemberGroups``): kept from the log by
  materialized views;
- and the Group's ``quantity`` in its metadata body.

The outbox is the authority (ADR 0004): an event in ClickHouse that no outbox row backs was
never committed; a committed event missing from ClickHouse is re-inserted from the outbox;
state rows that disagree with the log are rebuilt from the log; ``quantity`` is recounted
from the roster.

ClickHouse 18.16 has no lightweight ``DELETE``, and argMax states cannot be overridden by
inserting "better" ones (a bogus state with a higher position would always win), so removal
uses ``ALTER TABLE … DELETE WHERE`` mutations: asynchronous, applied to the parts that exist
when the mutation is created. Repair waits for them to finish (``system.mutations``) before
it derives anything from the log, and a rebuild inserts the new states after creating the
delete, so the roster stays readable throughout (see ``MemberEventRepository``). Every
ClickHouse statement of these jobs is a method of that repository.
"""
