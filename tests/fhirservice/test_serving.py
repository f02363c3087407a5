"""A server process's request threads start warm (``fhirservice.serving``,
``fhirservice.gunicorn_conf``): each holds its own metadata connection before the first
request, which used to open it (~3.9 ms of the first request of each thread on PostgreSQL);
and its garbage collector is set for serving once it is warm."""

from __future__ import annotations

import gc
import threading
from concurrent import futures
from types import SimpleNamespace

import pytest
from django.db import connections

from fhirservice import gunicorn_conf

THREADS = 4


@pytest.fixture(autouse=True)
def _collector_restored():
    """The hook sets this (test) process's garbage collector: set it back after each test."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_a_serving_worker_collects_rarely_and_never_what_it_started_with(transactional_db):
    from fhirservice.serving import GC_THRESHOLDS

    started_with: list = []  # an object the process holds when it starts serving
    assert any(o is started_with for o in gc.get_objects())
    gunicorn_conf.post_worker_init(SimpleNamespace(tpool=None, cfg=SimpleNamespace(threads=1)))
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 0
    assert not any(o is started_with for o in gc.get_objects())  # frozen: out of every scan
    cycle: list = []
    cycle.append(cycle)  # garbage made while serving is still collected
    del cycle
    assert gc.collect() >= 1


def held_connections(pool: futures.Executor) -> list[bool]:
    """Whether each of the pool's ``THREADS`` threads holds an open metadata connection
    (then closed: the test database outlives no thread's connection)."""
    barrier = threading.Barrier(THREADS)

    def look() -> bool:
        barrier.wait(10)  # one task per thread
        try:
            return connections["default"].connection is not None
        finally:
            connections.close_all()

    return [task.result(10) for task in [pool.submit(look) for _ in range(THREADS)]]


def worker(pool: futures.Executor) -> SimpleNamespace:
    """What the hook reads of a gunicorn ``gthread`` worker: its pool and ``--threads``."""
    return SimpleNamespace(tpool=pool, cfg=SimpleNamespace(threads=THREADS))


def test_every_request_thread_holds_its_connection_before_the_first_request(transactional_db):
    with futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        gunicorn_conf.post_worker_init(worker(pool))
        assert held_connections(pool) == [True] * THREADS
    with futures.ThreadPoolExecutor(max_workers=THREADS) as cold:
        assert held_connections(cold) == [False] * THREADS  # as every thread started before


def test_no_connection_is_opened_early_when_django_closes_it_at_each_request(
    transactional_db, monkeypatch
):
    # CONN_MAX_AGE=0: Django closes the connection when a request starts; opening it before
    # would only cost a connection set-up nobody uses.
    monkeypatch.setitem(connections.settings["default"], "CONN_MAX_AGE", 0)
    with futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        gunicorn_conf.post_worker_init(worker(pool))
        assert held_connections(pool) == [False] * THREADS


@pytest.mark.parametrize("threads", [1, 3])
def test_the_warm_up_runs_once_on_each_thread(transactional_db, threads):
    from fhirservice.serving import request_thread_starting, warm_request_threads

    seen: list[int] = []

    def receiver(**_: object) -> None:
        seen.append(threading.get_ident())
        connections.close_all()

    request_thread_starting.connect(receiver, dispatch_uid="test_serving")
    try:
        with futures.ThreadPoolExecutor(max_workers=threads) as pool:
            assert warm_request_threads(pool, threads) == threads
    finally:
        request_thread_starting.disconnect(dispatch_uid="test_serving")
    assert len(set(seen)) == len(seen) == threads


def url_patterns(resolver) -> list:
    """Every pattern below ``resolver`` (resolvers included)."""
    from django.urls import URLResolver

    found = []
    for pattern in resolver.url_patterns:
        found.append(pattern)
        if isinstance(pattern, URLResolver):
            found.extend(url_patterns(pattern))
    return found


def test_the_start_up_fills_what_the_first_write_used_to_fill(transactional_db):
    # Process-wide caches Django and the export index fill on first use: URL regexes
    # (~1 ms), model field maps and the reverse relation tree (~0.5 ms), the Patient
    # compartment table (~0.3 ms) of the first write after a restart.
    from django.apps import apps
    from django.conf import settings
    from django.test import override_settings
    from django.urls import get_resolver

    from fhirservice.serving import warm_up
    from operations.export.compartment import patient_compartment

    patterns = url_patterns(get_resolver())
    for pattern in patterns:
        pattern.pattern.__dict__.pop("regex", None)
    for model in apps.get_models():
        model._meta._expire_cache()
    patient_compartment.cache_clear()
    # Without the process's background threads (relay, export worker): not this test's.
    quiet = {**(settings.FHIR_SERVICE or {}), "EXPORT_WORKER_THREAD": False}
    with override_settings(FHIR_SERVICE={**quiet, "MEMBER_RELAY_INTERVAL": 0}):
        warm_up()
    assert all("regex" in pattern.pattern.__dict__ for pattern in patterns)
    assert all("related_objects" in model._meta.__dict__ for model in apps.get_models())
    assert patient_compartment.cache_info().currsize == 1


def test_a_serving_worker_reads_each_gunicorn_setting_once(monkeypatch):
    from gunicorn.config import Config, Setting

    cfg = Config()
    cfg.set("threads", 2)
    cfg.set("keepalive", 7)
    reads: list[str] = []
    original = Setting.get

    def counted(setting: Setting) -> object:
        reads.append(setting.name)
        return original(setting)

    monkeypatch.setattr(Setting, "get", counted)
    gunicorn_conf.post_worker_init(SimpleNamespace(tpool=None, cfg=cfg))
    for _ in range(3):
        assert (cfg.keepalive, cfg.threads, bool(cfg.is_ssl)) == (7, 2, False)
    assert sorted(reads) == ["certfile", "keepalive", "keyfile", "threads"]
    with pytest.raises(AttributeError, match="keepalive"):
        cfg.set("keepalive", 1)
    with pytest.raises(AttributeError, match="No configuration setting"):
        cfg.no_such_setting  # noqa: B018
