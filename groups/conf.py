"""The groups app's keys of the service settings namespace (``settings.FHIR_SERVICE``).

Registered with ``fhirservice.conf.register`` when ``groups.apps`` is imported, before any
app's ``ready()`` validates the namespace; read them as every other key, through
``fhirservice.conf.fhir_settings``.
"""

from __future__ import annotations

from typing import Any

from fhirservice.conf import register

DEFAULTS: dict[str, Any] = {
    # Where Group rosters live: "clickhouse" (member event stream) or "inline" (in the body).
    "GROUP_ROSTER_STORAGE": "clickhouse",
    # PUT of a Group without `member` keeps its roster (seed-system clients) instead of
    # emptying it (the FHIR rule).
    "GROUP_PUT_KEEPS_ROSTER": False,
    # Events per outbox row and per ClickHouse insert.
    "MEMBER_BATCH_SIZE": 50_000,
    # Who ships a write's member events after commit: "background" (a thread per process;
    # the response does not wait for ClickHouse) or "request" (the request, before answering).
    "MEMBER_SHIPPING": "background",
    # Background shipping under a load (writes came while the last round ran): seconds from
    # the start of one round (one ClickHouse insert) to the start of the next at the soonest;
    # writes committed meanwhile go out together (groups.outbox.background).
    "MEMBER_SHIP_INTERVAL": 0.5,
    # Roster digests (groups.digest): references kept per process, over all rosters, so that
    # writes skip the ClickHouse lookup of members a roster certainly does not hold (8 bytes
    # each; 0: off; 100 rosters of 10^5 written at random thrashed a bound of 4·10^6: row 8
    # of bench/README.md), and the largest roster digested inside a write (larger: in
    # background).
    "MEMBER_DIGEST_ENTRIES": 16_000_000,
    "MEMBER_DIGEST_SYNC_MAX": 20_000,
    # The outbox relay of each server process (groups.outbox.background.Relay): seconds between its
    # rounds (0: none; run ``ship_member_events --loop`` instead), and the longest wait
    # between rounds while they fail (ClickHouse down), the wait doubling up to it.
    "MEMBER_RELAY_INTERVAL": 5.0,
    "MEMBER_RELAY_MAX_INTERVAL": 60.0,
    # Seconds a server process told to stop waits for its queued member events to ship
    # before it exits; what is left goes to the relays (groups.outbox.background).
    "MEMBER_SHUTDOWN_WAIT": 10.0,
}

CHECKS = {
    "GROUP_ROSTER_STORAGE": lambda v: v in ("clickhouse", "inline"),
    "GROUP_PUT_KEEPS_ROSTER": lambda v: isinstance(v, bool),
    "MEMBER_BATCH_SIZE": lambda v: isinstance(v, int) and v > 0,
    "MEMBER_SHIPPING": lambda v: v in ("background", "request"),
    "MEMBER_SHIP_INTERVAL": lambda v: isinstance(v, int | float) and 0 <= v <= 10,
    "MEMBER_DIGEST_ENTRIES": lambda v: type(v) is int and v >= 0,
    "MEMBER_DIGEST_SYNC_MAX": lambda v: type(v) is int and v >= 0,
    "MEMBER_RELAY_INTERVAL": lambda v: isinstance(v, int | float) and v >= 0,
    "MEMBER_RELAY_MAX_INTERVAL": lambda v: isinstance(v, int | float) and v > 0,
    "MEMBER_SHUTDOWN_WAIT": lambda v: isinstance(v, int | float) and v >= 0,
}

register(DEFAULTS, CHECKS)
