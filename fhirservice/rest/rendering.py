"""Turning stored rows into response bodies: single resources and Bundles, possibly streamed.

A resource body is ``bytes`` or, when a type handler streams an external part (the Group
roster), an iterator of byte chunks; Bundles are generated entry by entry, so a history or
search page never needs its resources in memory all at once.

Streamed bodies keep their structure (:class:`Spliced`, :class:`BundleStream`) so that
:func:`reformat` can write them as XML while streaming too: a Group of 10^6 members goes out
member chunk by member chunk in either format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import orjson

from fhirservice.fhir.xml import (
    bundle_open_xml,
    elements_to_xml,
    entry_to_xml,
    resource_open_xml,
    resource_to_xml,
)
from fhirservice.rest.negotiation import OutputFormat
from fhirservice.rest.subsetting import subset, wants_element
from fhirservice.store.handlers import handler_for

Body = bytes | Iterator[bytes] | Iterable[bytes]


class VersionRow(Protocol):
    """What StoredResource and ResourceVersion have in common."""

    resource_type: str
    resource_id: str
    version_id: int
    incarnation: int
    body: str
    deleted: bool


def render_resource(
    row: VersionRow,
    *,
    current: bool,
    summary: str | None = None,
    elements: list[str] | None = None,
    in_bundle: bool = False,
) -> Body:
    """The body of one version: stored JSON, subsetted if asked, roster spliced in if any."""
    handler = handler_for(row.resource_type)
    text = row.body.encode()
    roster = handler.external_element
    if in_bundle and current and roster is not None and not elements:
        # Search results carry no external part (a page of 50 million-member rosters is
        # not a search answer): the entry is tagged SUBSETTED; read the resource for it.
        elements = [name for name in orjson.loads(text) if name != roster]
    if summary not in (None, "false") or elements:
        body, _ = subset(orjson.loads(text), summary=summary, elements=elements)
        text = orjson.dumps(body)
    if roster is None or not wants_element(
        roster, summary=summary, elements=elements, resource_type=row.resource_type
    ):
        return text
    chunks = handler.external_chunks(row, current=current, in_bundle=in_bundle)
    if chunks is None:
        return text
    return Spliced(text, roster, chunks)


class Spliced:
    """A resource's stored JSON with a streamed array appended (a Group and its roster)."""

    __slots__ = ("chunks", "name", "text")

    def __init__(self, text: bytes, name: str, chunks: Iterator[bytes]) -> None:
        self.text = text
        self.name = name
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return splice_array(self.text, self.name, self.chunks)


def splice_array(text: bytes, name: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Append ``"name": [chunks…]`` to a JSON object's text; nothing when chunks is empty."""
    first = next(chunks, None)
    if first is None:
        yield text
        return
    yield text[:-1] + b',"' + name.encode() + b'":[' + first
    for chunk in chunks:
        yield b"," + chunk
    yield b"]}"


def join(body: Body) -> bytes:
    """A body as one bytes object (for small bodies and tests)."""
    return body if isinstance(body, bytes) else b"".join(body)


def bundle_stream(
    header: dict[str, Any], entries: Iterable[tuple[dict[str, Any], Body | None]]
) -> Iterator[bytes]:
    """Encode a Bundle: ``header`` fields, then each (entry fields, resource body) in turn."""
    head = orjson.dumps(header)
    entries = iter(entries)
    first = True
    for entry, resource in entries:
        prefix = head[:-1] + b',"entry":[' if first else b","
        first = False
        fields = orjson.dumps(entry)
        if resource is None:
            yield prefix + fields
            continue
        resource_prefix = b'"resource":'
        if fields == b"{}":
            yield prefix + b"{" + resource_prefix
        else:
            yield prefix + fields[:-1] + b"," + resource_prefix
        if isinstance(resource, bytes):
            yield resource
        else:
            yield from resource
        yield b"}"
    yield head if first else b"]}"


def bundle_body(
    header: dict[str, Any], entries: Iterable[tuple[dict[str, Any], Body | None]]
) -> Body:
    """A Bundle body: bytes when every entry is small, a stream when any entry streams."""
    entries = list(entries)
    if any(resource is not None and is_streamed(resource) for _, resource in entries):
        return BundleStream(header, entries)
    return b"".join(bundle_stream(header, entries))


class BundleStream:
    """A Bundle with at least one streamed entry: encoded while it is sent."""

    __slots__ = ("entries", "header")

    def __init__(self, header: dict[str, Any], entries: list[tuple[dict[str, Any], Body | None]]):
        self.header = header
        self.entries = entries

    def __iter__(self) -> Iterator[bytes]:
        return bundle_stream(self.header, self.entries)


def is_streamed(body: Body) -> bool:
    """Whether a body is a chunk iterator rather than bytes."""
    return not isinstance(body, bytes)


def reformat(body: Body, chosen: OutputFormat) -> Body:
    """A JSON body in the chosen format: XML, or indented JSON for ``_pretty``.

    Streamed bodies stay streamed (and are not indented).
    """
    if not chosen.xml:
        if isinstance(body, bytes):
            return orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2)
        return body
    if isinstance(body, bytes):
        return resource_to_xml(orjson.loads(body), pretty=chosen.pretty)
    return _xml_stream(body)


def _xml_stream(body: Iterable[bytes]) -> Iterator[bytes]:
    """A streamed JSON body as streamed XML."""
    if isinstance(body, Spliced):
        yield from _spliced_xml(body)
    elif isinstance(body, BundleStream):
        head, end = bundle_open_xml(body.header)
        yield head
        for fields, resource in body.entries:
            nested = None
            if resource is not None:
                nested = (
                    iter((resource_to_xml(orjson.loads(resource)),))
                    if isinstance(resource, bytes)
                    else _xml_stream(resource)
                )
            yield from entry_to_xml(fields, nested)
        yield end
    else:
        yield resource_to_xml(orjson.loads(b"".join(body)))


def _spliced_xml(body: Spliced) -> Iterator[bytes]:
    """A resource and its streamed array: each chunk of items becomes their XML elements."""
    resource = orjson.loads(body.text)
    try:
        head, end = resource_open_xml(resource, body.name)
    except ValueError:
        # An element that follows the array in XML order: the whole resource is needed.
        yield resource_to_xml(orjson.loads(b"".join(body)))
        return
    yield head
    resource_type = resource["resourceType"]
    for chunk in body.chunks:
        yield elements_to_xml(resource_type, body.name, orjson.loads(b"[" + chunk + b"]"))
    yield end
