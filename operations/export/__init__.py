"""FHIR Bulk Data Access 2.0 export: ``$export`` kick-off, status, files and the job worker.

A Django app of its own (label ``export``) inside the Operation API package. The core does
not know it: it registers its operations with ``fhirservice.plugins`` and listens to the
core's signals from :mod:`operations.export.apps`. Module map:

- :mod:`~operations.export.conf`: its ``FHIR_SERVICE`` keys (file size, limits, retention);
- :mod:`~operations.export.models`: jobs, their files, the Patient compartment index;
- :mod:`~operations.export.compartment`: the R4 Patient CompartmentDefinition and the index;
- :mod:`~operations.export.parameters`: the kick-off parameters, checked;
- :mod:`~operations.export.services` / :mod:`~operations.export.selectors`: job writes
  (create, claim, heartbeat, finish, cancel, expire) and reads (manifest);
- :mod:`~operations.export.runner`: what one job writes (NDJSON parts per type);
- :mod:`~operations.export.worker`: the claim loop (management command and in-process thread);
- :mod:`~operations.export.views`: kick-off, status (and cancel), file download.

See docs/adr/0008-export-jobs.md for the job design and docs/export.md for the behaviour.
"""
