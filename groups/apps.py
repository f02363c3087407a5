"""App config of the Group roster app."""

from django.apps import AppConfig


class GroupsConfig(AppConfig):
    """Group rosters stored as member events in ClickHouse."""

    name = "groups"
    verbose_name = "Group rosters"
