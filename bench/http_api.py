"""The benchmark's FHIR requests over HTTP, as a client sees them.

One keep-alive HTTP/1.1 connection (``http.client``; no Django here, so ``bench.compare``
runs against any server from any checkout) sends each request and reads the whole answer; the
caller times that from outside. ``HttpApi`` has the methods of ``bench.api.Api`` (the
in-process client) plus plain Patient create and read, so the rows run unchanged on both.

Access control: with ``credentials`` (client id, secret) the client takes a client-credentials
token at ``token_url`` and renews it at half its lifetime; with ``token`` it sends that bearer
token as is; with neither it sends none.
"""

from __future__ import annotations

import base64
import http.client
import time
import urllib.parse
from collections.abc import Callable

import orjson

FHIR_JSON = "application/fhir+json"
PATCH_JSON = "application/json-patch+json"
CHUNK = 65_536
ENTITY = b'"entity"'
# Connections idle longer than this are reopened before the next request: gunicorn closes
# idle keep-alive connections after 2 s, and a request sent into a closing socket fails.
IDLE_REOPEN = 1.5


class BenchError(RuntimeError):
    """The service answered something a benchmark did not expect."""


class HttpApi:
    """The requests of the benchmark rows, over one keep-alive HTTP connection."""

    def __init__(
        self,
        base_url: str,
        *,
        credentials: tuple[str, str] | None = None,
        token_url: str | None = None,
        token: str | None = None,
        timeout: float = 1800.0,
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url.rstrip("/"))
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.scheme = parsed.scheme
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.base = parsed.path
        self.timeout = timeout
        self.credentials = credentials
        self.token_url = token_url
        self.token = token
        self.connection: http.client.HTTPConnection | None = None
        self._last_used = 0.0
        self._token_renew_at = float("inf") if token or not credentials else 0.0

    # -- the connection ---------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        now = time.monotonic()
        if self.connection is not None and now - self._last_used > IDLE_REOPEN:
            self.close()
        if self.connection is None:
            kind = (
                http.client.HTTPSConnection
                if self.scheme == "https"
                else http.client.HTTPConnection
            )
            self.connection = kind(self.host, self.port, timeout=self.timeout)
        return self.connection

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def _authorize(self) -> None:
        if time.monotonic() < self._token_renew_at:
            return
        assert self.credentials is not None and self.token_url is not None
        basic = base64.b64encode(":".join(self.credentials).encode()).decode()
        status, body, _ = self._exchange(
            "POST",
            self.token_url,
            b"grant_type=client_credentials",
            {
                "Authorization": f"Basic {basic}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        if status != 200:
            raise BenchError(f"POST {self.token_url}: HTTP {status}: {body[:500]!r}")
        answer = orjson.loads(body)
        self.token = answer["access_token"]
        self._token_renew_at = time.monotonic() + answer["expires_in"] / 2

    def _exchange(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> tuple[int, bytes, http.client.HTTPMessage]:
        """Send one request and read the whole answer (chunk by chunk into ``on_chunk``,
        then the body returned is empty): status, body, headers."""
        for attempt in (1, 2):
            connection = self._connect()
            try:
                connection.request(method, path, body=body or None, headers=headers)
                response = connection.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed a kept-alive connection as the request went out: nothing
                # was processed; once more on a new connection.
                self.close()
                if attempt == 2:
                    raise
                continue
            if on_chunk is None or response.status >= 300:
                content = response.read()
            else:
                content = b""
                while chunk := response.read1(CHUNK):
                    on_chunk(chunk)
            self._last_used = time.monotonic()
            if response.will_close:
                self.close()
            return response.status, content, response.headers
        raise AssertionError("unreachable")

    def _send(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        expected: tuple[int, ...] = (200,),
        content_type: str | None = None,
        minimal: bool = False,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> tuple[int, bytes, http.client.HTTPMessage]:
        headers = {"Accept": FHIR_JSON}
        if self.credentials:
            self._authorize()
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        if minimal:
            headers["Prefer"] = "return=minimal"
        status, content, answer = self._exchange(method, self.base + path, body, headers, on_chunk)
        if status not in expected:
            raise BenchError(f"{method} {path}: HTTP {status}: {content[:500]!r}")
        return status, content, answer

    # -- the rows' requests ---------------------------------------------------------

    def get(self, path: str) -> bytes:
        """``GET`` a path below the base (200 expected): the body."""
        return self._send("GET", path)[1]

    def post(self, path: str, body: bytes) -> None:
        """``POST`` a resource (201 expected, ``return=minimal``)."""
        self._send("POST", path, body, expected=(201,), content_type=FHIR_JSON, minimal=True)

    def create_group(self, body: bytes) -> str:
        """POST a Group (``Prefer: return=minimal``); its id."""
        return self._create("Group", body)

    def create_patient(self, body: bytes) -> str:
        """POST a Patient (``Prefer: return=minimal``); its id."""
        return self._create("Patient", body)

    def _create(self, kind: str, body: bytes) -> str:
        _, _, headers = self._send(
            "POST", f"/{kind}", body, expected=(201,), content_type=FHIR_JSON, minimal=True
        )
        location = headers.get("Location", "")
        if f"/{kind}/" not in location:
            raise BenchError(f"POST /{kind}: no Location of a {kind}: {location!r}")
        return location.split(f"/{kind}/")[1].split("/")[0]

    def read_patient(self, patient_id: str) -> None:
        """GET a Patient."""
        self._send("GET", f"/Patient/{patient_id}")

    def patch(self, group_id: str, ops: bytes) -> None:
        """PATCH a Group with JSON Patch (``Prefer: return=minimal``)."""
        self._send("PATCH", f"/Group/{group_id}", ops, content_type=PATCH_JSON, minimal=True)

    def read_streamed(self, group_id: str, on_chunk: Callable[[], None] | None = None) -> int:
        """GET the whole Group, reading the body chunk by chunk without keeping it.

        Returns the number of members received (counted by their ``"entity"`` key, also
        across chunk boundaries). ``on_chunk`` is called every 100 chunks of 64 KiB.
        """
        members = 0
        tail = b""
        chunks = 0

        def consume(chunk: bytes) -> None:
            nonlocal members, tail, chunks
            joined = tail + chunk
            members += joined.count(ENTITY)
            # Keep the bytes that could start a split key, never a whole one.
            keep = len(ENTITY) - 1
            tail = joined[-keep:] if not joined.endswith(ENTITY) else b""
            chunks += 1
            if on_chunk is not None and chunks % 100 == 0:
                on_chunk()

        self._send("GET", f"/Group/{group_id}", on_chunk=consume)
        return members

    def quantity(self, group_id: str) -> int:
        """GET Group/{id}?_elements=quantity; the quantity."""
        _, content, _ = self._send("GET", f"/Group/{group_id}?_elements=quantity")
        return orjson.loads(content)["quantity"]

    def members_page(self, group_id: str, *, after: str = "", count: int = 1000) -> int:
        """GET Group/{id}/$members with a cursor after reference ``after``; members on it."""
        query = f"_count={count}"
        if after:
            cursor = base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")
            query += f"&_cursor={cursor}"
        _, content, _ = self._send("GET", f"/Group/{group_id}/$members?{query}")
        body = orjson.loads(content)
        return sum(1 for p in body["parameter"] if p["name"] == "member")

    def search_member(self, reference: str) -> int:
        """GET Group?member=<reference>; the Bundle's total."""
        _, content, _ = self._send("GET", f"/Group?member={urllib.parse.quote(reference)}")
        return orjson.loads(content)["total"]

    def search(self, path: str) -> bytes:
        """GET a search (``path`` below the base, query included); the Bundle's bytes."""
        return self._send("GET", path)[1]

    def post_bundle(self, body: bytes) -> None:
        """POST a batch or transaction Bundle; every entry must have succeeded."""
        _, content, _ = self._send("POST", "", body, content_type=FHIR_JSON)
        failed = [
            e for e in orjson.loads(content)["entry"] if not e["response"]["status"][:1] == "2"
        ]
        if failed:
            raise BenchError(f"POST Bundle: {len(failed)} entries failed: {failed[0]!r}"[:500])
