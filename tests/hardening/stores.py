"""What a hostile request must leave unchanged: rows of both stores, and a Group's roster."""

from __future__ import annotations

from typing import Any

from fhirservice.clickhouse import get_clickhouse
from fhirservice.models import ResourceVersion, StoredResource
from groups.models import MemberOutbox
from groups.selectors import roster_key


def store_state(gid: str | None = None) -> dict[str, Any]:
    """Row counts of the metadata store and the member event log; with ``gid``, also the
    Group's stored version, its outbox rows and its events in ClickHouse."""
    clickhouse = get_clickhouse()
    state: dict[str, Any] = {
        "StoredResource": StoredResource.objects.count(),
        "ResourceVersion": ResourceVersion.objects.count(),
        "MemberOutbox": MemberOutbox.objects.count(),
        "versions": sorted(StoredResource.objects.values_list("key", "version_id")),
        "clickhouse events": int(
            clickhouse.execute("SELECT count() FROM Group_4_0_0_MemberEvents")[0][0]
        ),
    }
    if gid is not None:
        row = StoredResource.objects.get(key=f"Group/{gid}")
        key = roster_key(gid, row.incarnation)
        state["group version"] = row.version_id
        state["group outbox"] = MemberOutbox.objects.filter(group_id=gid).count()
        state["group events"] = int(
            clickhouse.execute(
                "SELECT count() FROM Group_4_0_0_MemberEvents WHERE roster_key = %(k)s",
                {"k": key},
            )[0][0]
        )
    return state
