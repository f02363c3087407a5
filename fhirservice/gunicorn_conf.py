"""gunicorn's configuration for this service (``--config python:fhirservice.gunicorn_conf``,
as ``scripts/serve.sh`` and the Docker image pass it): server hooks only; the command line
keeps the bind address, workers and threads."""

from __future__ import annotations

from typing import Any

from gunicorn.config import Config


class SettledConfig(Config):
    """A worker's configuration once it serves: each setting looked up once, then read as a
    plain attribute.

    gunicorn reads its settings per request and per header line (``cfg.keepalive``,
    ``cfg.strip_header_spaces``, ...), each through ``Config.__getattr__`` after a failed
    attribute lookup: ~3% of the worker's CPU per member write as served. A worker's settings
    no longer change once it serves (a reload starts new workers with the new ones), so the
    value the first read returns stays right; ``set`` is refused rather than ignored.
    """

    def __getattr__(self, name: str) -> Any:
        value = super().__getattr__(name)
        self.__dict__[name] = value  # past Config.__setattr__, which refuses setting names
        return value

    def set(self, name: str, value: Any) -> None:
        """Refused: the values already read would stand."""
        raise AttributeError(MSG_SETTLED.format(name=name))


MSG_SETTLED = "gunicorn setting {name!r} changed after the worker started serving"


def post_worker_init(worker: Any) -> None:
    """After the worker loaded the application (``fhirservice.wsgi``, which ran
    ``serving.warm_up``) and before it accepts a connection: warm the threads that will
    serve its requests (``serving.warm_request_threads``), settle its configuration
    (:class:`SettledConfig`) and its garbage collector (``serving.settle_collector``)."""
    from fhirservice.serving import settle_collector, warm_request_threads

    if type(worker.cfg) is Config:
        worker.cfg.__class__ = SettledConfig
    warm_request_threads(getattr(worker, "tpool", None), worker.cfg.threads)
    settle_collector()
