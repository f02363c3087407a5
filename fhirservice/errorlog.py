"""How answers to a store that cannot serve are logged: one line, no traceback, rate-limited.

Django logs every 5xx answer (logger ``django.request``, ERROR, ``Service Unavailable:
<path>``). During an outage every request answers 503, so that is one ERROR line per request:
thousands a minute under load, burying everything else. :class:`StoreErrorLogFilter`, on that
logger, keeps the first 503 line at ERROR, naming what the request met (the store, the
driver's error), and then at most one line per ``UNAVAILABLE_LOG_INTERVAL`` seconds, which
also counts the 503 answers not logged since the line before. Each request's own line in the
request log (``fhirservice.requests``) and the 5xx counters of ``/metrics`` still count every
answer.

Out of the REST views (a middleware, a plain view) Django logs the exception with its
traceback; the filter drops the traceback of a store that cannot serve and of a transaction
the store aborted as a lost race (a 409): there is nothing to debug, only a store to bring
back or a client to retry.
"""

from __future__ import annotations

import logging
import threading
import time

from fhirservice.conf import fhir_settings
from fhirservice.errors import LOG_STORE_DOWN, STORE_ERROR_ATTR, store_error

# Appended to a 503 line after others were left out.
LOG_NOT_LOGGED = "; %d more 503 answers in the last %.0f s not logged"


class StoreErrorLogFilter(logging.Filter):
    """The ``django.request`` filter: store errors in one line each, 503 lines rate-limited
    (see the module). Other records pass unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._logged_at: float | None = None  # time.monotonic() of the last 503 line
        self._left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Name a store error's cause and drop its traceback; drop 503 lines over the rate."""
        exc = record.exc_info[1] if record.exc_info else None
        cause = None
        if exc is not None and (error := store_error(exc)) is not None:
            cause = LOG_STORE_DOWN % (error.diagnostics, type(exc).__name__, exc)
            record.exc_info = None
            record.exc_text = None
        elif getattr(record, "request", None) is not None:
            cause = getattr(record.request, STORE_ERROR_ATTR, None)
        if getattr(record, "status_code", None) == 503:
            since = self._admit()
            if since is None:
                return False
            left_out, seconds = since
            if left_out:
                cause = (cause or "") + LOG_NOT_LOGGED % (left_out, seconds)
        if cause:
            record.msg = f"{record.msg} ({cause.replace('%', '%%')})"
        return True

    def _admit(self) -> tuple[int, float] | None:
        """None: this 503 line is left out (counted); else the lines left out before it and
        over how many seconds."""
        interval = fhir_settings.UNAVAILABLE_LOG_INTERVAL
        now = time.monotonic()
        with self._lock:
            last = self._logged_at
            if last is not None and now - last < interval:
                self._left_out += 1
                return None
            left_out, self._left_out, self._logged_at = self._left_out, 0, now
        return left_out, (now - last if last is not None else 0.0)
