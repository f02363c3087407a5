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

    from fhirservice.models import SearchToken
    from fhirservice.search.extract import extract_tokens

    names = [field.attname for field in SearchToken._meta.concrete_fields]
    return [
        tuple(getattr(token, name) for name in names)
        for key, body in bodies
        for token in extract_tokens(key, orjson.loads(body))
    ]
