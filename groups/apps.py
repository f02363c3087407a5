"""App config of the Group roster app: plugs the Group handler, ``member`` search, ``$members``
and the Group admin page into the core; connects the post-save receiver, the shipper, the
digests' warm-up, the outbox relay and the shipper's drain at exit to the core's signals."""

from django.apps import AppConfig

# The app's settings join the FHIR_SERVICE namespace now, before any app's ready() (the core's
# validates the namespace) runs.
from groups import conf  # noqa: F401


class GroupsConfig(AppConfig):
    """Group rosters stored as member events in ClickHouse."""

    name = "groups"
    verbose_name = "Group rosters"

    def ready(self) -> None:
        """Register with the core's plug-in registry; connect to the core's signals; register
        the backlog's metrics and readiness detail."""
        # Imported here, not at the top: these modules import models, which Django loads
        # only after every app's config (importing them earlier raises AppRegistryNotReady).
        from fhirservice import plugins
        from fhirservice.clickhouse import clickhouse_closing
        from fhirservice.health import register_readiness_detail
        from fhirservice.metrics import STORE_METRICS
        from fhirservice.serving import service_starting, service_stopping
        from fhirservice.store.handlers import resource_saved
        from groups import views
        from groups.digest import digests
        from groups.handlers import GroupHandler, on_resource_saved
        from groups.metrics import MemberBacklogCollector, backlog_detail
        from groups.outbox import background
        from groups.search import member_param, member_references

        plugins.register_resource_handler("Group", GroupHandler())
        plugins.register_search_param(
            "Group",
            "member",
            member_param,
            "A member of the group (Patient/123); several values mean any of them",
            references=member_references,
        )
        plugins.register_operation(views.OPERATION, view=views.GroupMembersView.as_view())
        plugins.register_admin_page("Group", "admin:groups_groupresource_change")
        clickhouse_closing.connect(
            background.on_clickhouse_closing, dispatch_uid="groups.outbox.background"
        )
        resource_saved.connect(on_resource_saved, dispatch_uid="groups.on_resource_saved")
        service_starting.connect(digests.warm_up, dispatch_uid="groups.digests.warm_up")
        service_starting.connect(background.outbox_relay_start, dispatch_uid="groups.outbox_relay")
        service_stopping.connect(background.shutdown_drain, dispatch_uid="groups.outbox_drain")
        register_readiness_detail("member_backlog", backlog_detail)
        STORE_METRICS.register(MemberBacklogCollector())
