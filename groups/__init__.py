"""Group app: rosters as a ClickHouse member event stream, member-aware views and commands."""
