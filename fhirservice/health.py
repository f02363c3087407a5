"""Liveness and readiness probes for orchestrators and load balancers (unauthenticated).

- ``GET /healthz`` (liveness): 200 ``{"status": "ok"}`` while the process answers HTTP. It
  touches no store, so a store outage never gets a healthy process restarted.
- ``GET /readyz`` (readiness): checks the metadata store (one indexed query) and ClickHouse
  (``SELECT 1``; a server that does not answer costs at most its ``connect_timeout``, 3 s by
  default), and adds what apps register (the member-event shipping backlog). Its ``status``:

  ============ ====== =====================================================================
  ``ok``       200    both stores answer
  ``degraded`` 200    the metadata store answers, ClickHouse does not: writes still commit
                      (member events wait in the outbox) and resource reads work, roster
                      reads answer 503; taking every instance out of rotation would turn a
                      partial outage into a total one
  ``down``     503    the metadata store does not answer: nothing can be served
  ============ ====== =====================================================================

The body names each check (``ok`` or ``down`` with the error's class, never its text, which
may carry addresses) so an operator sees which store failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import Error as DatabaseError
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_safe

from fhirservice.clickhouse import ClickHouseUnavailable, get_clickhouse
from fhirservice.models import StoredResource

OK, DEGRADED, DOWN = "ok", "degraded", "down"

# name -> callable returning a JSON-able detail; run only while the metadata store answers.
_details: dict[str, Callable[[], Any]] = {}


def register_readiness_detail(name: str, detail: Callable[[], Any]) -> None:
    """Add ``detail()`` to every readiness answer under ``name`` (from an app's ``ready``)."""
    _details[name] = detail


def _check(probe: Callable[[], object], *errors: type[Exception]) -> dict[str, str]:
    try:
        probe()
    except errors as exc:
        return {"status": DOWN, "error": type(exc).__name__}
    return {"status": OK}


def _clickhouse_answers() -> None:
    get_clickhouse().execute("SELECT 1")


def _store_answers() -> None:
    StoredResource.objects.filter(key="").exists()


@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process serves HTTP."""
    return JsonResponse({"status": OK})


@require_safe
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: both stores checked; see the module docstring for the statuses."""
    store = _check(_store_answers, DatabaseError)
    clickhouse = _check(_clickhouse_answers, ClickHouseUnavailable)
    checks = {"metadata_store": store, "clickhouse": clickhouse}
    if store["status"] == DOWN:
        return JsonResponse({"status": DOWN, "checks": checks}, status=503)
    body: dict[str, Any] = {
        "status": OK if clickhouse["status"] == OK else DEGRADED,
        "checks": checks,
    }
    body.update((name, detail()) for name, detail in _details.items())
    return JsonResponse(body)
