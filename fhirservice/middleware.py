"""Request-scoped middleware of the FHIR core: request ids and the request log, limits and
hardened answers."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import orjson
from django.contrib.messages.middleware import MessageMiddleware
from django.http import HttpRequest, HttpResponse

from fhirservice.conf import fhir_settings
from fhirservice.errors import FhirError, PayloadTooLarge
from fhirservice.metrics import route_of
from fhirservice.rest.limits import LengthRequired, check_query_string
from fhirservice.store.json import dumps

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9\-_.]{1,64}")


REQUEST_LOG = logging.getLogger("fhirservice.requests")


class RequestIdMiddleware:
    """Give every request an id (the client's X-Request-ID when well-formed), echo it, and
    log one line per request.

    The id is stored on every version and member event, so a client's log line can be
    matched to what the server did. The line goes to the ``fhirservice.requests`` logger at
    INFO as one JSON object (see :func:`request_line`), once the answer is sent: for a
    streamed answer (a Group's roster) the duration and bytes cover the whole body. The
    query string is left out: search parameters can carry patient data.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Set ``request.request_id`` and the X-Request-ID response header; log the line."""
        started = time.perf_counter()
        given = request.META.get("HTTP_X_REQUEST_ID", "")
        request.request_id = given if REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        response = self.get_response(request)
        response["X-Request-ID"] = request.request_id
        if not REQUEST_LOG.isEnabledFor(logging.INFO):
            return response
        if not response.streaming:
            _log_request(request, response, started, len(response.content))
        elif response.is_async or getattr(response, "file_to_stream", None) is not None:
            # Files go out through the server's file wrapper, past any wrapped iterator.
            length = response.headers.get("Content-Length")
            _log_request(request, response, started, int(length) if length else None)
        else:
            response.streaming_content = _CountedBody(
                response.streaming_content,
                lambda sent: _log_request(request, response, started, sent),
            )
        return response


class _CountedBody:
    """A streamed body that counts its bytes and reports them once the server closes it."""

    def __init__(self, chunks: Iterable[bytes], on_close: Callable[[int], None]) -> None:
        self.chunks = chunks
        self.on_close = on_close
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.sent += len(chunk)
            yield chunk

    def close(self) -> None:
        """Called by the response's close(), after the last byte or an abandoned transfer."""
        self.on_close(self.sent)


def request_line(
    request: HttpRequest, response: HttpResponse, seconds: float, sent: int | None
) -> dict[str, Any]:
    """The request's log record: time (UTC, ms), request_id, client (the remote address),
    actor (``client:<id>``, ``staff:<user>`` or ""), method, path, route (the URL pattern,
    as in the metrics), status, duration_ms and bytes (of the body; null if unknown)."""
    access = getattr(request, "access", None)
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": request.request_id,
        "client": request.META.get("REMOTE_ADDR", ""),
        "actor": access.actor if access is not None else _staff_actor(request),
        "method": request.method,
        "path": request.path,
        "route": route_of(request),
        "status": response.status_code,
        "duration_ms": round(seconds * 1000, 3),
        "bytes": sent,
    }


def _staff_actor(request: HttpRequest) -> str:
    # Only the admin's views resolve the session user; evaluating it elsewhere would cost a
    # session query for the sake of a log line.
    if not request.path.startswith("/admin/"):
        return ""
    user = getattr(request, "user", None)
    return f"staff:{user.get_username()}" if user is not None and user.is_authenticated else ""


def _log_request(
    request: HttpRequest, response: HttpResponse, started: float, sent: int | None
) -> None:
    line = request_line(request, response, time.perf_counter() - started, sent)
    REQUEST_LOG.info(orjson.dumps(line).decode())


class BackgroundStreamHandler(logging.StreamHandler):
    """A stream handler (stderr by default) whose lines a thread of its own writes in batches.

    The request log's handler: the request thread only appends its record to a list. Written
    in place, each line was a write and a flush on the request thread, which waits whenever
    the reader of the stream (a terminal, a container runtime's pipe) is slow; under load it
    was the largest single item of a plain read's profile. Handing each line to a waiting
    thread instead would wake that thread per request (a context switch and a turn at the
    interpreter lock each time): the writer sleeps ``interval`` seconds between batches, so
    lines appear at most that much later, in order. Nothing is lost at a normal exit:
    ``logging.shutdown`` (at interpreter exit, after the server drained its requests) closes
    the handler, which writes what is left first. A forked child (a preloading server) drops
    its parent's pending lines (the parent writes them) and starts a writer of its own.
    """

    def __init__(self, stream: Any = None, interval: float = 0.05) -> None:
        super().__init__(stream)
        self.interval = interval
        self._pending: deque[logging.LogRecord] = deque()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._writing = threading.Lock()
        _BACKGROUND_HANDLERS.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the record (the first one starts the writer thread)."""
        if self._writer is None:
            # Under the handler's lock (held by handle()): two first lines start one writer.
            self._writer = threading.Thread(
                target=self._write_batches, name="fhir-request-log", daemon=True
            )
            self._writer.start()
        self._pending.append(record)

    def _write_batches(self) -> None:
        stop = self._stop
        while True:
            stopping = stop.wait(self.interval)
            self._write_pending()
            if stopping:
                return

    def _write_pending(self) -> None:
        lines = []
        pending = self._pending
        while pending:
            record = pending.popleft()
            try:
                lines.append(self.format(record) + self.terminator)
            except Exception:  # noqa: BLE001 - logging's contract: report, never raise
                self.handleError(record)
        if lines:
            try:
                # Not self.flush(): it takes the handler's lock, which logging.shutdown holds
                # while it closes the handler and close() waits for this thread.
                with self._writing:  # no fork in the middle of a write (see forget_parent)
                    self.stream.write("".join(lines))
                    self.stream.flush()
            except Exception:  # noqa: BLE001 - as StreamHandler.emit
                self.handleError(record)

    def close(self) -> None:
        """Write what is pending, stop the writer thread, then close as a stream handler."""
        with self.lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._stop.set()
            writer.join()
            self._stop = threading.Event()
        self._write_pending()  # lines of a process whose writer never started or was forked
        super().close()

    def forget_parent(self) -> None:
        """In a forked child: the parent's pending lines and writer are not this process's.

        The fork waited for any write in progress (``_writing``, held around each batch and
        around the fork): a stream's buffer locked by a thread the child does not have would
        block the child's first line forever.
        """
        self._pending = deque()
        self._stop = threading.Event()
        self._writer = None
        self._writing = threading.Lock()


_BACKGROUND_HANDLERS: weakref.WeakSet[BackgroundStreamHandler] = weakref.WeakSet()


def _before_fork() -> None:
    for handler in list(_BACKGROUND_HANDLERS):
        handler._writing.acquire()


def _after_fork_in_parent() -> None:
    for handler in list(_BACKGROUND_HANDLERS):
        handler._writing.release()


def _after_fork_in_child() -> None:
    for handler in list(_BACKGROUND_HANDLERS):
        handler.forget_parent()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)


class NoTracebackFilter(logging.Filter):
    """Keeps a record's line and drops its traceback, as a WARNING (for Django's log of a bad
    Host header: a client's mistake, answered 400, not a fault of the server)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Strip the record; never drop it."""
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


# Headers of every answer; FHIR answers also get FHIR_HEADERS. Values already set stand.
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: under no-referrer browsers send "Origin: null" with the
    # admin's forms, and Django's CSRF check refuses them.
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
FHIR_HEADERS = {
    # Patient data must not linger in shared or browser caches; conditional reads
    # (If-None-Match) still work.
    "Cache-Control": "no-store",
    # JSON is never a document: nothing may load, run or frame it.
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; sandbox",
}
ISSUE_CODE_OF_STATUS = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    411: "invalid",
    413: "too-costly",
    415: "not-supported",
    429: "throttled",
}
MSG_BODY_TOO_LARGE = "The body has {size} bytes; the limit is {limit}"


def _is_fhir_path(path: str) -> bool:
    base = f"/{fhir_settings.BASE_PATH}"
    return path == base or path.startswith(base + "/")


def _outcome_response(error: FhirError) -> HttpResponse:
    # Imported here: settings.LOGGING imports this module (its filters) before Django loads
    # the apps, and the REST base imports the access policy, which imports models.
    from fhirservice.rest.base import fhir_http_response

    return fhir_http_response(dumps(error.outcome()), status=error.status, headers=error.headers)


class HardeningMiddleware:
    """The headers every answer carries, and no stack trace in any answer of the API
    (outermost, so it covers every other middleware).

    Under the FHIR base path it turns any non-FHIR error page (Django's debug page of a crash
    under DEBUG, the HTML of an error raised outside the views) into an OperationOutcome
    that names only the status.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Harden the response."""
        response = self.get_response(request)
        if _is_fhir_path(request.path):
            response = self.as_outcome(response)
            for name, value in FHIR_HEADERS.items():
                response.headers.setdefault(name, value)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @staticmethod
    def as_outcome(response: HttpResponse) -> HttpResponse:
        """An error answer that is not FHIR (JSON or XML) becomes a bare OperationOutcome."""
        content_type = response.headers.get("Content-Type", "")
        if response.status_code < 400 or content_type.startswith(
            ("application/fhir+json", "application/fhir+xml")
        ):
            return response
        status = response.status_code
        error = FhirError(
            f"{status} {HTTPStatus(status).phrase}"
            if status in HTTPStatus._value2member_map_
            else f"HTTP status {status}",
            detail_code=f"MSG_HTTP_{status}",
        )
        error.status = status
        error.code = ISSUE_CODE_OF_STATUS.get(status, "exception" if status >= 500 else "invalid")
        replacement = _outcome_response(error)
        for name, value in response.headers.items():
            if name.lower() not in ("content-type", "content-length", "content-encoding"):
                replacement.headers.setdefault(name, value)
        if hasattr(response, "close"):
            response.close()
        return replacement


class AdminMessageMiddleware(MessageMiddleware):
    """Django's messages (the admin's notices), not set up for FHIR requests.

    Nothing under the FHIR base adds or shows a message, and building the message storage
    (its cookie and session backends) for every request was ~3% of a plain read's Django
    time. Messages waiting for an admin page stay where they are.
    """

    def process_request(self, request: HttpRequest) -> None:
        """Attach the message storage, except to FHIR requests."""
        if not _is_fhir_path(request.path):
            super().process_request(request)


class BrowserSessionMiddleware:
    """The middleware of browser sessions, run as one chain (``settings.SESSION_MIDDLEWARE``:
    sessions, CSRF, authentication, the admin's messages, X-Frame-Options), which a FHIR
    request without a session cookie skips.

    They serve the admin and a staff user calling the API from the admin's browser session
    (``access.authentication.StaffSessionAuthentication``). A FHIR request without the session
    cookie has no session to load, so no staff user; its views are CSRF-exempt (a staff
    session's writes are CSRF-checked by that authentication class itself); nothing under the
    FHIR base adds or shows a message; and :class:`HardeningMiddleware` sets the same
    X-Frame-Options on every answer. Passing through the five cost ~3% of a member write's
    Django time. Any other request (the admin, the token endpoint, FHIR with a session cookie)
    runs the whole chain as before.

    Django calls the ``process_view`` of the middleware listed in ``MIDDLEWARE`` only: this one
    forwards it to the chain's (CSRF's check of the admin's forms is one).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        # Imported here: settings.LOGGING imports this module before Django loads the apps.
        from django.conf import settings
        from django.core.handlers.exception import convert_exception_to_response
        from django.utils.module_loading import import_string

        self.get_response = get_response
        self.cookie_name = settings.SESSION_COOKIE_NAME
        self.view_hooks: list[Callable[..., HttpResponse | None]] = []
        handler = get_response
        # As Django's BaseHandler.load_middleware: innermost first, each layer turning its
        # exceptions into responses.
        for path in reversed(settings.SESSION_MIDDLEWARE):
            middleware = import_string(path)(handler)
            if hasattr(middleware, "process_view"):
                self.view_hooks.insert(0, middleware.process_view)
            handler = convert_exception_to_response(middleware)
        self.chain = handler

    def skips(self, request: HttpRequest) -> bool:
        """Whether the request bypasses the chain: FHIR, without a session cookie."""
        return self.cookie_name not in request.COOKIES and _is_fhir_path(request.path)

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """The chain, or straight on for a FHIR request without a session cookie."""
        if self.skips(request):
            return self.get_response(request)
        return self.chain(request)

    def process_view(
        self, request: HttpRequest, view: Callable[..., Any], args: Any, kwargs: Any
    ) -> HttpResponse | None:
        """The chain's ``process_view`` hooks, in order, for a request that ran the chain."""
        if self.skips(request):
            return None
        for hook in self.view_hooks:
            response = hook(request, view, args, kwargs)
            if response is not None:
                return response
        return None


class RequestLimitsMiddleware:
    """Limits that must hold before any view runs (inside the request id and log middleware,
    so a refused request is logged with its id like any other).

    Under the FHIR base path it refuses, as OperationOutcomes: query strings over the
    parameter limits (before Django parses them), bodies announced larger than
    MAX_BODY_BYTES, and chunked bodies without Content-Length (Django would read them as
    empty).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Check the request; refuse it or pass it on."""
        if _is_fhir_path(request.path):
            try:
                self.check_request(request)
            except FhirError as error:
                return _outcome_response(error)
        return self.get_response(request)

    @staticmethod
    def check_request(request: HttpRequest) -> None:
        """Query limits, the announced body size and chunked bodies (400, 413, 411)."""
        check_query_string(request.META.get("QUERY_STRING", ""))
        declared = request.META.get("CONTENT_LENGTH") or ""
        limit = fhir_settings.MAX_BODY_BYTES
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(
                MSG_BODY_TOO_LARGE.format(size=int(declared), limit=limit),
                detail_code="MSG_BODY_TOO_LARGE",
            )
        chunked = "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower()
        if chunked and not declared:
            raise LengthRequired()
