"""Client layer for the member event store (ClickHouse), shared by every app.

Two backends behind one interface, chosen by URL:

- ``chdb:///abs/path``: embedded chdb (ClickHouse 26.x in the web process). One process
  may hold a data path; within a process only one path can be open at a time.
- ``clickhouse://user:pass@host:port/db``: a ClickHouse server over the native protocol
  (clickhouse-driver). The database is created when missing. Optional query parameters:
  ``connect_timeout``, ``send_receive_timeout`` and ``sync_request_timeout`` (seconds), and
  ``alt_hosts=host:port,host:port``: other replicas a new connection tries, in order, when
  ``host:port`` does not answer (a cluster, ``CLICKHOUSE_CLUSTER``).

Everything sent must run on ClickHouse 18.16 (the server our tests use) as well as on
current releases; see ``docs/adr`` for the SQL subset.

Parameters
    SQL takes ``%(name)s`` placeholders; values are escaped on the client by
    clickhouse-driver's own escaping for *both* backends, so both see identical SQL.
    Supported values: ``None``, ``bool`` (sent as 0/1), ``int``, ``float``, ``Decimal``,
    ``str``, ``datetime``, ``date``, ``UUID``, ``Enum`` (its value) and lists (arrays) or
    tuples (``IN`` lists) of these. Anything else raises ``TypeError``, because the driver
    would paste its ``str()`` into the SQL unescaped. With parameters, a literal ``%`` in the
    SQL is written ``%%``; without parameters the SQL is sent as it is.

Datetimes
    ``DateTime`` values are instants in UTC. Naive datetimes given to ``insert`` or as
    parameters are read as UTC, aware ones are converted; values read back are aware
    datetimes in UTC on both backends. chdb sessions run with ``session_timezone = 'UTC'``;
    a server should run in UTC too (values still come out right if it does not, but
    date functions such as ``toDate`` then work in the server's zone).

Errors
    ``ClickHouseUnavailable`` means the store cannot be reached (refused, timed out, gone,
    chdb path locked by another process, client closed) or, on a cluster, cannot take the
    statement now (replicated tables read-only without ZooKeeper, no replica reachable).
    Everything else keeps the backend's own type: ``clickhouse_driver.errors.ServerException``
    (and the driver's client-side errors) for the server; for chdb,
    ``chdb.state.sqlitelike.ChdbError`` for queries and ``RuntimeError`` for inserts
    (``chdb.ChdbError`` is a different class).

Threads
    Each backend keeps a small pool of connections (driver ``Client`` objects are not thread
    safe; a chdb session must not run two statements at once, and any statement on a session
    ends a stream open on it). Each call takes a connection for its duration, ``iter_rows``
    for the life of its iterator, so streaming and querying in one thread do not collide.
"""

from __future__ import annotations

import abc
import datetime as dt
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from enum import Enum
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit
from uuid import UUID

from clickhouse_driver.context import Context
from clickhouse_driver.util.escape import escape_chars_map, escape_param, escape_params
from django.core.signals import setting_changed
from django.dispatch import Signal

from fhirservice.conf import fhir_settings

__all__ = [
    "ClickHouseClient",
    "ClickHouseUnavailable",
    "connect",
    "get_clickhouse",
    "open_clickhouse",
    "reset_clickhouse",
    "url_for_logs",
]

UTC = dt.UTC

# Rows per block that iter_rows asks for: large enough that per-block overhead vanishes,
# small enough that one decoded block stays a few MB.
ITER_BLOCK_ROWS = 65_536

# Rows per insert batch (one driver data block / one chdb append): bounds client memory.
INSERT_BATCH_ROWS = 50_000

# A server that is down must fail a request fast. A slow SELECT keeps the socket alive with
# progress packets, so the receive timeout only fires on a silent server; a long synchronous
# statement (OPTIMIZE … FINAL on a big table) may need a larger ?send_receive_timeout=.
DEFAULT_TIMEOUTS = {
    "connect_timeout": 3.0,
    "send_receive_timeout": 10.0,
    "sync_request_timeout": 3.0,
}

UTC_ZONE_NAMES = frozenset(
    {
        "UTC",
        "Etc/UTC",
        "UCT",
        "Etc/UCT",
        "Universal",
        "Etc/Universal",
        "Zulu",
        "Etc/Zulu",
        "GMT",
        "Etc/GMT",
        "GMT0",
        "Etc/GMT0",
        "Etc/GMT+0",
        "Etc/GMT-0",
        "Greenwich",
        "Etc/Greenwich",
    }
)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SETTING_NAME = re.compile(r"[a-z_][a-z0-9_]*")


class ClickHouseUnavailable(Exception):
    """The ClickHouse store cannot be reached: refused, timed out, gone, or locked."""


def quote_identifier(name: str) -> str:
    """Backtick-quote a table or column name (``db.table`` allowed) after checking its form.

    Only plain identifiers are accepted: names come from code, and a name with odd
    characters is a bug to report rather than something to escape.
    """
    parts = name.split(".")
    if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(part) for part in parts):
        raise ValueError(f"Not a plain ClickHouse identifier: {name!r}")
    return ".".join(f"`{part}`" for part in parts)


def url_for_logs(url: str) -> str:
    """``url`` without its password, fit for logs and error texts."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=user + parts.netloc.rsplit("@", 1)[1]).geturl()


def _plain_param(value: Any) -> Any:
    """Check one parameter value and turn it into what the driver's escaping handles right."""
    if value is None or isinstance(value, str | float | Decimal | UUID | dt.date | dt.time):
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            # Our datetimes are UTC; the escaper converts aware values to the server's zone.
            return value.replace(tzinfo=UTC)
        return value
    if isinstance(value, bool):
        # The driver would write True/False, which 18.16 does not know.
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, Enum):
        return _plain_param(value.value)
    if isinstance(value, list | tuple):
        return type(value)(_plain_param(item) for item in value)
    # escape_param returns unknown objects unchanged, so their str() would reach the SQL.
    raise TypeError(f"Unsupported ClickHouse parameter type: {type(value).__name__}")


class _ServerTimezone:
    """The one part of the driver's ``ServerInfo`` that its escaping reads."""

    def __init__(self, timezone: str) -> None:
        self.timezone = timezone

    def get_timezone(self) -> str:
        return self.timezone


def escape_context(timezone: str) -> Context:
    """A driver ``Context`` for ``escape_params``: it only needs the server's time zone."""
    context = Context()
    context.server_info = _ServerTimezone(timezone)
    return context


def bind(sql: str, params: dict[str, Any] | None, context: Context) -> str:
    """Substitute ``%(name)s`` placeholders with escaped literals (driver's escaping)."""
    if params is None:
        return sql
    if not isinstance(params, dict):
        raise TypeError("ClickHouse parameters must be a dict of %(name)s values")
    literals: dict[str, str] = {}
    rest: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, list | tuple) and all(type(item) is str for item in value):
            literals[key] = _strings_literal(value)
        else:
            rest[key] = _plain_param(value)
    literals.update(escape_params(rest, context))
    return sql % literals


# The driver's escaping of string literals, as one str.translate table.
_STRING_ESCAPES = str.maketrans(escape_chars_map)


def _strings_literal(values: list[str] | tuple[str, ...]) -> str:
    """A list/tuple of strings as the driver would escape it, without its per-character
    Python loop: an IN list of 10^4 member references is bound in ~3 ms instead of ~200."""
    body = ", ".join("'" + value.translate(_STRING_ESCAPES) + "'" for value in values)
    return f"[{body}]" if isinstance(values, list) else f"({body})"


def setting_literal(name: str, value: Any, context: Context) -> str:
    """``name=value`` for a SETTINGS clause, with the name checked and the value escaped."""
    if not _SETTING_NAME.fullmatch(name):
        raise ValueError(f"Not a ClickHouse setting name: {name!r}")
    return f"{name}={escape_param(_plain_param(value), context)}"


T = TypeVar("T")


class ConnectionPool(Generic[T]):
    """Connections handed to one caller at a time; idle ones are kept for reuse.

    ``create`` opens a connection, ``destroy`` closes one. Connections given back after
    ``close()`` are destroyed; ``close()`` also destroys connections still lent out, so a
    forgotten iterator cannot keep a chdb path open.
    """

    def __init__(
        self, create: Callable[[], T], destroy: Callable[[T], None], max_idle: int = 8
    ) -> None:
        self._create = create
        self._destroy = destroy
        self._max_idle = max_idle
        self._idle: list[T] = []
        self._all: list[T] = []
        self._lock = threading.Lock()
        self.closed = False

    def acquire(self) -> T:
        """Take an idle connection or open a new one."""
        with self._lock:
            if self.closed:
                raise ClickHouseUnavailable("The ClickHouse client is closed")
            if self._idle:
                return self._idle.pop()
        connection = self._create()
        with self._lock:
            if not self.closed:
                self._all.append(connection)
                return connection
        self._destroy(connection)
        raise ClickHouseUnavailable("The ClickHouse client is closed")

    def release(self, connection: T) -> None:
        """Give a connection back; beyond ``max_idle`` idle ones it is closed."""
        with self._lock:
            keep = not self.closed and len(self._idle) < self._max_idle
            if keep:
                self._idle.append(connection)
            elif connection in self._all:
                self._all.remove(connection)
            else:
                return  # close() already destroyed it
        if not keep:
            self._destroy(connection)

    def discard(self, connection: T) -> None:
        """Close a lent connection instead of giving it back (it must not be reused)."""
        with self._lock:
            if connection not in self._all:
                return  # close() already destroyed it
            self._all.remove(connection)
        self._destroy(connection)

    @contextmanager
    def connection(self) -> Iterator[T]:
        """Lend a connection for the ``with`` block."""
        connection = self.acquire()
        try:
            yield connection
        finally:
            self.release(connection)

    def close(self) -> bool:
        """Close every connection, idle or lent out; False if the pool was already closed."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            connections, self._all, self._idle = self._all, [], []
        for connection in connections:
            self._destroy(connection)
        return True


class ClickHouseClient(abc.ABC):
    """One interface over chdb and the ClickHouse server; see the module docstring."""

    url: str
    # Whether queries run inside this process (chdb): their working memory is then ours.
    in_process: bool = False

    @property
    def url_for_logs(self) -> str:
        """The URL without its password, fit for logs and error texts."""
        return url_for_logs(self.url)

    @abc.abstractmethod
    def execute(
        self,
        sql: str,
        params: dict[str, Any] | None = None,
        *,
        settings: dict[str, Any] | None = None,
    ) -> list[tuple]:
        """Run a query and return all rows as tuples.

        ``settings`` are per-query settings (only for SELECT: the chdb backend appends them
        as a ``SETTINGS`` clause). Check optional ones with ``supports_setting`` first: 18.16
        rejects unknown settings.
        """

    @abc.abstractmethod
    def iter_rows(
        self,
        sql: str,
        params: dict[str, Any] | None = None,
        *,
        settings: dict[str, Any] | None = None,
    ) -> Iterator[tuple]:
        """Stream the rows of a SELECT block by block; memory stays flat for any size.

        The iterator holds a connection until it is exhausted or closed: close it (or use
        ``contextlib.closing``) when stopping early.
        """

    def execute_lines(
        self,
        sql: str,
        params: dict[str, Any] | None = None,
        *,
        settings: dict[str, Any] | None = None,
    ) -> bytes:
        """Run a query of one String column; its values as UTF-8 lines, each ending in a
        newline, in result order (b"" for no rows).

        For results the caller passes on as text (a roster rendered as JSON by ClickHouse):
        chdb writes the lines itself (``TabSeparatedRaw``), so no row becomes a Python
        object. The values must hold no newline.
        """
        rows = self.execute(sql, params, settings=settings)
        return "".join(f"{row[0]}\n" for row in rows).encode()

    @abc.abstractmethod
    def insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """Insert rows (tuples or lists, in ``columns`` order) in batches; return the count.

        Values may be ``str``, ``int``, ``bool``, ``None`` (Nullable columns only),
        ``datetime`` (UTC, see the module docstring) and, for Enum8 columns, the name.
        Rows are consumed lazily, so a generator of 10^7 rows needs no more memory than one
        batch.
        """

    @abc.abstractmethod
    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        """Run a statement that returns no rows (DDL, INSERT … SELECT, OPTIMIZE)."""

    @property
    @abc.abstractmethod
    def server_version(self) -> tuple[int, ...]:
        """The engine's version, e.g. ``(18, 16, 1)`` or ``(26, 9, 2, 1)``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection. The client cannot be used afterwards."""

    @abc.abstractmethod
    def _escape_context(self) -> Context:
        """The context the driver's escaping needs for this backend."""

    def bind(self, sql: str, params: dict[str, Any] | None) -> str:
        """The SQL text with parameters substituted, as this client would send it."""
        return bind(sql, params, self._escape_context())

    def ping(self) -> bool:
        """Whether the store answers a trivial query now."""
        try:
            return self.execute("SELECT 1") == [(1,)]
        except ClickHouseUnavailable:
            return False

    def supports_setting(self, name: str) -> bool:
        """Whether per-query setting ``name`` is known, so it can be passed safely.

        For example ``optimize_aggregation_in_order`` exists from ClickHouse 19.14 on.
        """
        names = getattr(self, "_setting_names", None)
        if names is None:
            names = frozenset(row[0] for row in self.execute("SELECT name FROM system.settings"))
            self._setting_names = names
        return name in names

    def table_exists(self, table: str) -> bool:
        """Whether ``table`` exists in the current database."""
        rows = self.execute(
            "SELECT count() FROM system.tables WHERE database = currentDatabase() "
            "AND name = %(table)s",
            {"table": table},
        )
        return rows[0][0] > 0

    def __enter__(self) -> ClickHouseClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url_for_logs}>"


_HOST_PORT = re.compile(r"[A-Za-z0-9_.\-]+:[0-9]{1,5}")


def _options(query: str) -> dict[str, Any]:
    """The URL's query options: timeouts (seconds) and ``alt_hosts``."""
    options: dict[str, Any] = dict(DEFAULT_TIMEOUTS)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "alt_hosts":
            if not all(_HOST_PORT.fullmatch(host) for host in value.split(",")):
                raise ValueError(f"CLICKHOUSE_URL alt_hosts is not host:port,…: {value!r}")
            options[key] = value
            continue
        if key not in DEFAULT_TIMEOUTS:
            raise ValueError(f"Unknown CLICKHOUSE_URL option: {key!r}")
        try:
            options[key] = float(value)
        except ValueError:
            raise ValueError(f"CLICKHOUSE_URL option {key} is not a number: {value!r}") from None
    return options


def connect(url: str) -> ClickHouseClient:
    """Open a client for ``url`` (``chdb:///abs/path`` or ``clickhouse://…``).

    Raises ``ValueError`` for a malformed URL and ``ClickHouseUnavailable`` when the store
    cannot be reached. Needs no Django settings.
    """
    from .backends import ChdbClient, DriverClient

    parts = urlsplit(url)
    if parts.scheme == "chdb":
        if parts.netloc or not parts.path.startswith("/") or parts.query:
            raise ValueError(f"A chdb URL names an absolute path: chdb:///path, not {url!r}")
        return ChdbClient(url=url, path=parts.path)
    if parts.scheme == "clickhouse":
        database = parts.path.strip("/") or "default"
        if not _IDENTIFIER.fullmatch(database):
            raise ValueError(f"Not a plain database name in CLICKHOUSE_URL: {database!r}")
        return DriverClient(
            url=url,
            host=parts.hostname or "localhost",
            port=parts.port or 9000,
            user=unquote(parts.username) if parts.username else "default",
            password=unquote(parts.password) if parts.password else "",
            database=database,
            **_options(parts.query),
        )
    raise ValueError(f"CLICKHOUSE_URL must start with chdb:// or clickhouse://, not {url!r}")


_client: ClickHouseClient | None = None
_client_lock = threading.Lock()


def get_clickhouse() -> ClickHouseClient:
    """The process-wide client for ``CLICKHOUSE_URL``, created on first use.

    For chdb, pending schema migrations are applied on creation (the embedded store has no
    separate deploy step); for a server, run ``manage.py migrate_clickhouse``. A failed
    creation is not remembered: the next call tries again.
    """
    client = _client
    if client is not None:
        return client
    return _create_shared_client()


def _create_shared_client() -> ClickHouseClient:
    global _client
    with _client_lock:
        if _client is not None:
            return _client
        from . import migrations
        from .backends import ChdbClient

        client = connect(fhir_settings.CLICKHOUSE_URL)
        try:
            if isinstance(client, ChdbClient):
                migrations.apply(client)
        except BaseException:
            client.close()
            raise
        _client = client
        return client


# Sent before the process-wide client closes: code that uses it from its own threads (the
# background shipper of member events) finishes first. chdb does not survive a session being
# closed under an insert running on another thread: both wait for each other for ever.
clickhouse_closing = Signal()


def reset_clickhouse() -> None:
    """Close and forget the process-wide client (tests, settings changes)."""
    global _client
    if _client is not None:
        clickhouse_closing.send(sender=ClickHouseClient)
    with _client_lock:
        client, _client = _client, None
    if client is not None:
        client.close()


@contextmanager
def open_clickhouse(url: str | None = None) -> Iterator[ClickHouseClient]:
    """A client for maintenance work that must not trigger chdb's automatic migrations.

    Yields the process-wide client when it is open on ``url`` (default
    ``CLICKHOUSE_URL``), otherwise a fresh client that is closed afterwards.
    """
    if url is None:
        url = fhir_settings.CLICKHOUSE_URL
    shared = _client
    if shared is not None and shared.url == url:
        yield shared
        return
    client = connect(url)
    try:
        yield client
    finally:
        client.close()


def _on_setting_changed(*, setting: str, **_: Any) -> None:
    if setting in ("CLICKHOUSE_URL", "CLICKHOUSE_CLUSTER"):
        reset_clickhouse()


setting_changed.connect(_on_setting_changed, dispatch_uid="fhirservice.clickhouse.reset")
