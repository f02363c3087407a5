"""The extraction step of ``reindex_search`` in a worker process (``workers`` > 1).

Kept apart from ``fhirservice.search.reindex`` because a spawned worker imports this module
before Django is set up: nothing here may import models at module level.
"""

from __future__ import annotations

from typing import Any


def setup() -> None:
    """Set Django up in a fresh worker (the settings module comes from the environment)."""
    import django

    django.setup()


def extract_values(bodies: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
    """The SearchToken rows of (key, JSON body) pairs as plain tuples of field values, in
    model field order (cheaper to send back than model instances)."""
    import orjson

    from fhirservice.search.extract import extract_rows

    return [row for key, body in bodies for row in extract_rows(key, orjson.loads(body))]
