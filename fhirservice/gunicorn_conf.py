"""gunicorn's configuration for this service (``--config python:fhirservice.gunicorn_conf``,
as ``scripts/serve.sh`` and the Docker image pass it): server hooks only; the command line
keeps the bind address, workers and threads."""

from __future__ import annotations

from typing import Any


def post_worker_init(worker: Any) -> None:
    """After the worker loaded the application (``fhirservice.wsgi``, which ran
    ``serving.warm_up``) and before it accepts a connection: warm the threads that will
    serve its requests (``serving.warm_request_threads``)."""
    from fhirservice.serving import warm_request_threads

    warm_request_threads(getattr(worker, "tpool", None), worker.cfg.threads)
