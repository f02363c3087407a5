"""One error hierarchy for the whole service, and the one handler that renders it.

Every 4xx/5xx answer is an OperationOutcome. Each error class declares its HTTP status, its
FHIR issue code and a stable detail code (``MSG_*``) that clients and tests can rely on; the
human text goes into ``diagnostics``. A backing store that cannot serve (the metadata store
stopped, unreachable or locked beyond its timeout; ClickHouse unreachable) is a 503
``transient`` with ``Retry-After``, logged in one rate-limited line (:func:`store_unavailable`,
:func:`exception_handler`). A transaction the metadata store aborted as a lost race that no
retry won is a 409 ``conflict`` (:func:`store_conflict`): the store is up. Other unknown
exceptions are logged with their traceback and answered with a bare 500 outcome that leaks
nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from django.http import Http404
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from fhirservice import db
from fhirservice.clickhouse import ClickHouseUnavailable
from fhirservice.conf import fhir_settings

logger = logging.getLogger(__name__)

DETAIL_SYSTEM = "urn:fhirservice:detail-code"

# Diagnostics texts that tests assert exactly.
MSG_VERSION_MISMATCH = "If-Match names version {expected}, but the current version is {current}"
MSG_UNKNOWN_TYPE = "Unknown resource type: {type}"
MSG_NOT_FOUND = "{type}/{id} is not known"
MSG_DELETED = "{type}/{id} was deleted (version {version})"
MSG_VERSION_NOT_FOUND = "{type}/{id} has no version {version}"
MSG_TOO_MANY_PATCH_OPS = "The patch has {count} operations; at most {limit} are allowed per request"
MSG_TOKEN_MISSING = "This endpoint needs a bearer token (Authorization: Bearer <token>)"  # noqa: S105
MSG_TOKEN_INVALID = "The bearer token is not known, was revoked or has expired"  # noqa: S105
MSG_INSUFFICIENT_SCOPE = "The token's scopes do not allow {interaction} on {target}; needs {scope}"
MSG_METADATA_STORE_DOWN = "The metadata store is unavailable; try again later"
MSG_CLICKHOUSE_DOWN = "The member store (ClickHouse) is unavailable; try again later"
MSG_STORE_CONFLICT = (
    "The request conflicted with concurrent changes to the same data (the metadata store "
    "aborted its transaction) and changed nothing; read the current state and try again"
)
# What a request that met a store down says in its log line (no traceback: nothing to
# debug): the answer's diagnostics, the exception's class and text.
LOG_STORE_DOWN = "%s (%s: %s)"
# The attribute of a (Django) request answered 503 that carries LOG_STORE_DOWN's text to the
# request's log line (fhirservice.errorlog.StoreErrorLogFilter, which rate-limits them).
STORE_ERROR_ATTR = "fhir_store_error"


class FhirError(Exception):
    """Base class: an error that becomes an OperationOutcome."""

    status = 500
    code = "exception"
    detail_code = "MSG_EXCEPTION"
    default_diagnostics = "The server could not complete the request"
    severity = "error"

    def __init__(
        self,
        diagnostics: str | None = None,
        *,
        expression: str | list[str] | None = None,
        detail_code: str | None = None,
        issues: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.diagnostics = diagnostics or self.default_diagnostics
        if detail_code:
            self.detail_code = detail_code
        if isinstance(expression, str):
            expression = [expression]
        self.expression = expression
        self.extra_issues = issues or []
        self.headers = headers or {}
        super().__init__(self.diagnostics)

    def outcome(self) -> dict[str, Any]:
        """The OperationOutcome resource for this error."""
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "details": {"coding": [{"system": DETAIL_SYSTEM, "code": self.detail_code}]},
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = self.expression
        return operation_outcome([issue, *self.extra_issues])


class BadRequest(FhirError):
    """Malformed or semantically wrong input (400 invalid)."""

    status = 400
    code = "invalid"
    detail_code = "MSG_BAD_FORMAT"
    default_diagnostics = "The request is not valid"


class InvalidResource(BadRequest):
    """The resource content is not valid FHIR R4."""

    detail_code = "MSG_INVALID_RESOURCE"
    default_diagnostics = "The resource is not valid FHIR R4"


class BindingViolation(InvalidResource):
    """A coded element holds a value outside its required value set (400 code-invalid)."""

    code = "code-invalid"
    detail_code = "MSG_CODE_INVALID"
    default_diagnostics = "A code is not in the value set its element requires"


class UnprocessableEntity(FhirError):
    """Well-formed input that the server cannot process (422)."""

    status = 422
    code = "processing"
    detail_code = "MSG_UNPROCESSABLE"
    default_diagnostics = "The request could not be processed"


class TooCostly(FhirError):
    """The request asks for more work than a limit allows (400 too-costly)."""

    status = 400
    code = "too-costly"
    detail_code = "MSG_TOO_COSTLY"
    default_diagnostics = "The request exceeds a server limit"


def bearer_challenge(**params: str) -> str:
    """A ``WWW-Authenticate`` value (RFC 6750): ``Bearer realm="fhir"`` and the set params."""
    return ", ".join(['Bearer realm="fhir"', *(f'{k}="{v}"' for k, v in params.items() if v)])


class Unauthorized(FhirError):
    """No usable credentials: no, an unknown, a revoked or an expired bearer token (401)."""

    status = 401
    code = "login"
    detail_code = "MSG_AUTH_REQUIRED"
    default_diagnostics = MSG_TOKEN_MISSING

    def __init__(self, diagnostics: str | None = None, *, error: str = "", **kwargs: Any) -> None:
        super().__init__(diagnostics, **kwargs)
        self.headers.setdefault("WWW-Authenticate", bearer_challenge(error=error))


class Forbidden(FhirError):
    """Valid credentials whose scopes do not cover the interaction (403)."""

    status = 403
    code = "forbidden"
    detail_code = "MSG_INSUFFICIENT_SCOPE"
    default_diagnostics = "The token's scopes do not allow this interaction"

    def __init__(self, diagnostics: str | None = None, *, scope: str = "", **kwargs: Any) -> None:
        super().__init__(diagnostics, **kwargs)
        challenge = bearer_challenge(error="insufficient_scope", scope=scope)
        self.headers.setdefault("WWW-Authenticate", challenge)


class NotFound(FhirError):
    """Unknown resource, version or route (404)."""

    status = 404
    code = "not-found"
    detail_code = "MSG_NO_EXIST"
    default_diagnostics = "Not found"


class Gone(FhirError):
    """The resource was deleted (410)."""

    status = 410
    code = "deleted"
    detail_code = "MSG_DELETED"
    default_diagnostics = "The resource was deleted"


class MethodNotAllowed(FhirError):
    """The route exists but not for this method (405)."""

    status = 405
    code = "not-supported"
    detail_code = "MSG_METHOD_NOT_ALLOWED"
    default_diagnostics = "Method not allowed"


class NotAcceptable(FhirError):
    """The client accepts no format we produce (406)."""

    status = 406
    code = "not-supported"
    detail_code = "MSG_NOT_ACCEPTABLE"
    default_diagnostics = "Only FHIR JSON and FHIR XML are produced"


class Conflict(FhirError):
    """A concurrent change or a state conflict (409)."""

    status = 409
    code = "conflict"
    detail_code = "MSG_CONFLICT"
    default_diagnostics = "The request conflicts with the current state"


class VersionConflict(Conflict):
    """An operation named a version that is no longer current (409)."""

    detail_code = "MSG_VERSION_AWARE_CONFLICT"


class PreconditionFailed(FhirError):
    """If-Match or a conditional interaction did not hold (412)."""

    status = 412
    code = "conflict"
    detail_code = "MSG_VERSION_MISMATCH"
    default_diagnostics = "The precondition did not hold"


class PayloadTooLarge(FhirError):
    """The body is larger than MAX_BODY_BYTES (413)."""

    status = 413
    code = "too-costly"
    detail_code = "MSG_BODY_TOO_LARGE"
    default_diagnostics = "The request body is too large"


class UnsupportedMediaType(FhirError):
    """The body's content type is not one we read (415)."""

    status = 415
    code = "not-supported"
    detail_code = "MSG_UNSUPPORTED_MEDIA_TYPE"
    default_diagnostics = "Unsupported content type"


class ServiceUnavailable(FhirError):
    """A backing store is down; the request may succeed later (503, with ``Retry-After``:
    the ``UNAVAILABLE_RETRY_AFTER`` setting)."""

    status = 503
    code = "transient"
    detail_code = "MSG_UNAVAILABLE"
    default_diagnostics = "A backing store is unavailable; try again later"

    def __init__(self, diagnostics: str | None = None, **kwargs: Any) -> None:
        super().__init__(diagnostics, **kwargs)
        self.headers.setdefault("Retry-After", str(fhir_settings.UNAVAILABLE_RETRY_AFTER))


def store_conflict(exc: BaseException) -> Conflict | None:
    """The 409 of a transaction the metadata store aborted because it lost a race with
    concurrent ones (``fhirservice.db.is_conflict``: a serialization failure or deadlock that
    no retry won), else None. The store is up: a 503 "unavailable" would send operators
    looking for an outage. FHIR's answer to a concurrent modification is 409 Conflict (issue
    ``conflict``: "an edit conflict"), as when a write's own retries run out."""
    if db.is_conflict(exc):
        return Conflict(MSG_STORE_CONFLICT, detail_code="MSG_CONCURRENT_WRITE")
    return None


def store_error(exc: BaseException) -> FhirError | None:
    """The answer to an exception from a backing store that is not a bug: a lost race (409,
    :func:`store_conflict`) or a store that cannot serve (503, :func:`store_unavailable`)."""
    return store_conflict(exc) or store_unavailable(exc)


def store_unavailable(exc: BaseException) -> ServiceUnavailable | None:
    """The 503 of an exception that says a backing store cannot serve now (see
    ``fhirservice.db.is_unavailable`` and ``ClickHouseUnavailable``), else None."""
    if isinstance(exc, ClickHouseUnavailable):
        return ServiceUnavailable(MSG_CLICKHOUSE_DOWN, detail_code="MSG_MEMBER_STORE_DOWN")
    if db.is_unavailable(exc):
        return ServiceUnavailable(MSG_METADATA_STORE_DOWN, detail_code="MSG_METADATA_STORE_DOWN")
    return None


def operation_outcome(issues: list[dict[str, Any]]) -> dict[str, Any]:
    """Wrap issues in an OperationOutcome resource."""
    return {"resourceType": "OperationOutcome", "issue": issues}


def information_outcome(text: str) -> dict[str, Any]:
    """An OperationOutcome with one informational issue (for ``return=OperationOutcome``)."""
    return operation_outcome(
        [{"severity": "information", "code": "informational", "diagnostics": text}]
    )


_DRF_MAP: dict[type[Exception], type[FhirError]] = {
    drf_exceptions.ParseError: BadRequest,
    drf_exceptions.UnsupportedMediaType: UnsupportedMediaType,
    drf_exceptions.MethodNotAllowed: MethodNotAllowed,
    drf_exceptions.NotAcceptable: NotAcceptable,
    drf_exceptions.NotFound: NotFound,
    drf_exceptions.ValidationError: BadRequest,
}


def as_fhir_error(exc: Exception) -> FhirError:
    """Turn any exception into a FhirError: a transaction the store aborted as a lost race
    into a 409, a store that cannot serve into a 503 (logged by the request's line, see
    :func:`exception_handler`), other unknown ones into a bare 500 (logged with their
    traceback)."""
    if isinstance(exc, FhirError):
        return exc
    if isinstance(exc, Http404):
        return NotFound()
    for drf_class, fhir_class in _DRF_MAP.items():
        if isinstance(exc, drf_class):
            return fhir_class(str(exc.detail) if hasattr(exc, "detail") else None)
    if isinstance(exc, drf_exceptions.APIException):
        error = FhirError(str(exc.detail))
        error.status = exc.status_code
        return error
    conflict = store_conflict(exc)
    if conflict is not None:
        return conflict
    unavailable = store_unavailable(exc)
    if unavailable is not None:
        return unavailable
    logger.exception("Unhandled error", exc_info=exc)
    return FhirError()


def error_response(error: FhirError) -> Response:
    """The DRF response for an error."""
    response = Response(error.outcome(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """DRF's exception handler hook: every error becomes an OperationOutcome.

    A 503 (a store that cannot serve) leaves what the request met on the request
    (``STORE_ERROR_ATTR``): Django logs every 5xx answer in a line of its own, and the
    ``django.request`` logger's filter (``fhirservice.errorlog``) names the cause there and
    rate-limits those lines, so that an outage under load does not flood the log.
    """
    error = as_fhir_error(exc)
    request = context.get("request")
    request = getattr(request, "_request", request)  # DRF's Request wraps Django's
    if isinstance(error, ServiceUnavailable) and request is not None:
        cause = exc.__cause__ if isinstance(exc, FhirError) else exc
        text = error.diagnostics
        if cause is not None:
            text = LOG_STORE_DOWN % (text, type(cause).__name__, cause)
        setattr(request, STORE_ERROR_ATTR, text)
    return error_response(error)
