"""App config of ``$export``: registers its operations with the core, indexes the Patient
compartment on every write, and starts the in-process worker with the server."""

from django.apps import AppConfig

# The app's settings join the FHIR_SERVICE namespace now, before any app's ready() (the core's
# validates the namespace) runs.
from operations.export import conf  # noqa: F401


class ExportConfig(AppConfig):
    """FHIR Bulk Data Access export: jobs, worker, NDJSON files."""

    name = "operations.export"
    label = "export"
    verbose_name = "Bulk Data export"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register the operations; connect the compartment index and the worker thread."""
        # Imported here, not at the top: these modules import models, which Django loads
        # only after every app's config (importing them earlier raises AppRegistryNotReady).
        from fhirservice import plugins
        from fhirservice.serving import service_starting, service_stopping
        from fhirservice.store.handlers import resource_saved
        from operations.export import compartment, views, worker

        kick_off = views.KickOffView.as_view()
        for definition in (views.SYSTEM_EXPORT, views.PATIENT_EXPORT, views.GROUP_EXPORT):
            plugins.register_operation(definition, view=kick_off)
        plugins.register_operation(views.POLL_STATUS, view=views.StatusView.as_view())
        plugins.register_operation(views.EXPORT_FILE, view=views.FileView.as_view())
        resource_saved.connect(
            compartment.on_resource_saved, dispatch_uid="export.compartment_index"
        )
        service_starting.connect(compartment.warm_up, dispatch_uid="export.compartment_warm_up")
        service_starting.connect(worker.worker_thread_start, dispatch_uid="export.worker")
        service_stopping.connect(worker.worker_thread_stop, dispatch_uid="export.worker")
