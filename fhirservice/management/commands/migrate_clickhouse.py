"""``manage.py migrate_clickhouse``: apply the apps' ClickHouse schema migrations.

Each app declares its migrations in ``<app>/clickhouse_migrations.py`` (see
``fhirservice.clickhouse.migrations``). Run this after ``migrate`` when deploying against a
ClickHouse server; chdb stores also migrate themselves on first use.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fhirservice.clickhouse import ClickHouseUnavailable, open_clickhouse
from fhirservice.clickhouse import migrations as ch_migrations

MSG_NOTHING = "No ClickHouse migrations to apply."
MSG_WOULD_APPLY = "Would apply {app}.{name}"
MSG_APPLIED = "Applied {app}.{name}"


class Command(BaseCommand):
    """Apply, list or preview pending ClickHouse schema migrations."""

    help = (
        "Apply pending ClickHouse schema migrations of all installed apps to the store named "
        "by CLICKHOUSE_URL, recording each in fhir_schema_migrations. Statements are "
        "idempotent. With CLICKHOUSE_CLUSTER set, every node of that cluster gets replicated "
        "tables behind Distributed ones (ON CLUSTER)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Declare --dry-run and --list."""
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Show the migrations that would be applied; change nothing.",
        )
        parser.add_argument(
            "--list",
            action="store_true",
            dest="list_only",
            help="List every migration with its state ([X] applied, [ ] pending) and exit.",
        )

    def handle(
        self, *args: Any, dry_run: bool = False, list_only: bool = False, **options: Any
    ) -> None:
        """Connect, then list, preview or apply."""
        declared = ch_migrations.collect()
        try:
            with open_clickhouse() as client:
                if list_only:
                    self._list(declared, ch_migrations.applied(client))
                    return
                cluster = ch_migrations.configured_cluster()
                where = f" (cluster {cluster})" if cluster else ""
                self.stdout.write(f"ClickHouse: {client.url_for_logs}{where}")
                done = ch_migrations.apply(client, dry_run=dry_run, migrations=declared)
        except ClickHouseUnavailable as exc:
            raise CommandError(str(exc)) from exc  # names the store, without a password
        if not done:
            self.stdout.write(MSG_NOTHING)
            return
        template = MSG_WOULD_APPLY if dry_run else MSG_APPLIED
        style = self.style.WARNING if dry_run else self.style.SUCCESS
        for migration in done:
            self.stdout.write(style(template.format(app=migration.app, name=migration.name)))

    def _list(self, declared: list[ch_migrations.Migration], done: set[tuple[str, str]]) -> None:
        if not declared:
            self.stdout.write(" (no ClickHouse migrations)")
        for app in dict.fromkeys(migration.app for migration in declared):
            self.stdout.write(self.style.MIGRATE_LABEL(app))
            for migration in declared:
                if migration.app != app:
                    continue
                mark = "[X]" if migration.key in done else "[ ]"
                self.stdout.write(f" {mark} {migration.name}")
