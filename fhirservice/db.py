"""Transactions that hold on every metadata backend.

``django.db.transaction.atomic`` does nothing on django-mongodb-backend; its own ``atomic``
runs a MongoDB transaction (replica sets only). Store code uses :func:`atomic` from here so
that a version, its history row and its outbox rows commit together on every backend.
"""

from __future__ import annotations

from typing import Any

from django.db import connection, transaction


def atomic(**kwargs: Any) -> Any:
    """The backend's atomic block (a context manager)."""
    if connection.vendor == "mongodb":
        from django_mongodb_backend import transaction as mongo_transaction

        return mongo_transaction.atomic(**kwargs)
    return transaction.atomic(**kwargs)


def in_transaction() -> bool:
    """Whether the caller already runs inside an atomic block."""
    return transaction.get_connection().in_atomic_block


def lock_rows(queryset: Any) -> Any:
    """``queryset`` with its rows locked until commit, where the backend can lock rows.

    Writers of one resource then queue on its row (PostgreSQL ``SELECT ... FOR UPDATE``)
    instead of racing on the version check and retrying: optimistic retries alone starve
    some writers when many hit one hot Group. SQLite needs no lock (``BEGIN IMMEDIATE``
    already serializes writers); elsewhere the version check still catches every race.
    """
    if connection.features.has_select_for_update:
        return queryset.select_for_update()
    return queryset


def on_commit(func: Any) -> None:
    """Run ``func`` after the current transaction commits (at once outside one).

    ``robust``: a failing callback (e.g. ClickHouse down while shipping) is logged and does
    not turn a committed write into an error.
    """
    if connection.vendor == "mongodb":
        from django_mongodb_backend import transaction as mongo_transaction

        mongo_transaction.on_commit(func, robust=True)
    else:
        transaction.on_commit(func, robust=True)
