"""The two ClickHouse backends: embedded chdb and a server through clickhouse-driver.

Both present the same values to callers (see the package docstring); the comments below say
where each backend needs help to get there.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from decimal import Decimal
from functools import lru_cache
from itertools import islice
from typing import Any
from urllib.parse import unquote

import orjson
import pytz
from clickhouse_driver import Client, defines
from clickhouse_driver import errors as driver_errors
from clickhouse_driver.context import Context
from clickhouse_driver.settings.available import settings as driver_known_settings

from . import (
    INSERT_BATCH_ROWS,
    ITER_BLOCK_ROWS,
    UTC,
    UTC_ZONE_NAMES,
    ClickHouseClient,
    ClickHouseUnavailable,
    ConnectionPool,
    escape_context,
    quote_identifier,
    setting_literal,
)

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# ClickHouse server (clickhouse-driver, native protocol)
# --------------------------------------------------------------------------------------

# What a lost, refused or silent server raises inside the driver. Server-side errors
# (ServerException: bad SQL, unknown table, limits) are deliberately not in this list.
_UNREACHABLE = (driver_errors.NetworkError, driver_errors.SocketTimeoutError, EOFError, OSError)
# Server errors that mean "not now" rather than "wrong": a cluster whose replicated tables
# lost ZooKeeper (read-only, no session, connection loss, insert status unknown) or whose
# Distributed table reached no replica. Callers treat them as the store being down: the
# batch stays pending and ships later (idempotent by construction).
_UNAVAILABLE_CODES = frozenset(
    {
        209,  # SOCKET_TIMEOUT (to another replica)
        210,  # NETWORK_ERROR (to another replica)
        225,  # NO_ZOOKEEPER
        242,  # TABLE_IS_READ_ONLY
        279,  # ALL_CONNECTION_TRIES_FAILED
        319,  # UNKNOWN_STATUS_OF_INSERT
        999,  # KEEPER_EXCEPTION
    }
)


# (column index, function) pairs for the columns whose values need converting; NULLs pass.
Converters = tuple[tuple[int, Callable[[Any], Any]], ...]


def _convert(row: Sequence[Any], converters: Converters) -> tuple:
    values = list(row)
    for index, convert in converters:
        value = values[index]
        if value is not None:
            values[index] = convert(value)
    return tuple(values)


def _strip_wrappers(ch_type: str) -> str:
    for wrapper in ("LowCardinality(", "Nullable("):
        if ch_type.startswith(wrapper):
            ch_type = ch_type[len(wrapper) : -1]
    return ch_type


class DriverClient(ClickHouseClient):
    """A ClickHouse server through clickhouse-driver, with a small pool of ``Client`` objects.

    On creation it connects once (so a down server fails at once), creates the database if
    it is missing and reads the server's version and time zone.
    """

    def __init__(
        self,
        *,
        url: str,
        host: str,
        port: int,
        user: str,
        password: str,
        database: str,
        connect_timeout: float,
        send_receive_timeout: float,
        sync_request_timeout: float,
        alt_hosts: str = "",
    ) -> None:
        self.url = url
        self.database = database
        self._client_kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "user": user,
            "password": password,
            "connect_timeout": connect_timeout,
            "send_receive_timeout": send_receive_timeout,
            "sync_request_timeout": sync_request_timeout,
            "client_name": "fhirservice",
            # parallel_view_processing: an insert feeds its table's materialized views side
            # by side (the member events have two): ~25 % less time per insert (18.16 and current).
            # On a cluster (Distributed tables, see clickhouse.migrations) an insert must be
            # stored when it returns, as on one node: insert_distributed_sync; and stored
            # even when a block repeats one inserted before (a state rebuilt after a delete),
            # which replicated tables would otherwise drop: insert_deduplicate 0. Our tables
            # are idempotent by construction, as on one node. And a Distributed read runs on
            # the replica connected to, where this process's inserts land, however far behind
            # that replica calls itself: max_replica_delay_for_distributed_queries 0. Left at
            # 300 s, a replica back from a crash (or a lost ZooKeeper session) reports
            # "infinitely" behind until its first queue update (~ZooKeeper's session timeout)
            # and sends reads to another replica, which has not yet fetched what it just took.
            # None of these changes a plain table.
            "settings": {
                "insert_block_size": INSERT_BATCH_ROWS,
                "parallel_view_processing": 1,
                "insert_distributed_sync": 1,
                "insert_deduplicate": 0,
                "max_replica_delay_for_distributed_queries": 0,
            },
        }
        # Failover: a new connection tries this process's replica, then the others in order
        # (host:port first, then alt_hosts). See _connection for why a process keeps to one.
        self._replicas = [(host, port)] + [
            (alt.rpartition(":")[0], int(alt.rpartition(":")[2]))
            for alt in alt_hosts.split(",")
            if alt
        ]
        self._replica = self._replicas[0]
        self._replica_lock = threading.Lock()
        self._datetime_indexes: dict[
            tuple[str, tuple[str, ...]], tuple[tuple[int, ...], tuple[int, ...]]
        ] = {}
        self._bootstrap()
        self._pool: ConnectionPool[Client] = ConnectionPool(
            self._new_client, lambda client: client.disconnect()
        )

    def _bootstrap(self) -> None:
        client = self._new_client(database="default")
        try:
            with self._reachable():
                exists = client.execute(
                    "SELECT count() FROM system.databases WHERE name = %(name)s",
                    {"name": self.database},
                )[0][0]
                if not exists:
                    database = quote_identifier(self.database)
                    client.execute(f"CREATE DATABASE IF NOT EXISTS {database}")
                info = client.connection.server_info
                # The first replica that answered is this process's (see _connection).
                self._replica = (client.connection.host, client.connection.port)
        finally:
            client.disconnect()
        self._version = info.version_tuple()
        self.timezone = info.timezone
        self._server_is_utc = self.timezone in UTC_ZONE_NAMES
        self._server_zone = pytz.timezone(self.timezone)
        # Before this revision settings travel in a typed binary form that only settings the
        # driver knows can take; it skips the others with a warning.
        revision = getattr(info, "used_revision", info.revision)
        self._settings_as_strings = (
            revision >= defines.DBMS_MIN_REVISION_WITH_SETTINGS_SERIALIZED_AS_STRINGS
        )
        self._context = escape_context(self.timezone)

    def _new_client(self, database: str | None = None) -> Client:
        """A client that connects to this process's replica first, then to the others."""
        start = self._replicas.index(self._replica)
        order = self._replicas[start:] + self._replicas[:start]
        (host, port), others = order[0], order[1:]
        alt_hosts = ",".join(f"{alt_host}:{alt_port}" for alt_host, alt_port in others)
        kwargs = dict(self._client_kwargs, host=host, port=port)
        client = Client(database=database or self.database, alt_hosts=alt_hosts or None, **kwargs)
        client.fhir_replica = (host, port)  # type: ignore[attr-defined]
        return client

    @contextmanager
    def _connection(self) -> Iterator[Client]:
        """Lend a pooled client that talks to this process's replica.

        On a cluster an insert lands on the replica it is sent to and reaches the others
        moments later; a read sees it at once only on that replica. So every connection of a
        process uses one replica (reads see the process's writes, and a mutation
        ``wait_for_mutations`` saw finish), and the process moves to another replica only
        when a connection fails over to it because its replica cannot be reached. Idle
        connections still on the old replica are then closed rather than reused.
        """
        client = self._pool.acquire()
        if len(self._replicas) > 1:
            while client.fhir_replica != self._replica:
                self._pool.discard(client)
                client = self._pool.acquire()
        try:
            yield client
        except BaseException:
            self._give_back(client)
            raise
        self._give_back(client)

    def _give_back(self, client: Client) -> None:
        connection = client.connection
        if len(self._replicas) > 1 and connection.connected:
            reached = (connection.host, connection.port)
            if reached != client.fhir_replica:
                # The client's replica did not answer and it failed over: the process follows.
                with self._replica_lock:
                    if self._replica == client.fhir_replica:
                        logger.warning(
                            "ClickHouse replica %s:%s cannot be reached; this process now "
                            "uses %s:%s",
                            *client.fhir_replica,
                            *reached,
                        )
                        self._replica = reached
                self._pool.discard(client)
                return
            if reached != self._replica:
                self._pool.discard(client)
                return
        self._pool.release(client)

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except _UNREACHABLE as exc:
            raise ClickHouseUnavailable(
                f"ClickHouse at {self.url_for_logs} cannot be reached: {exc}"
            ) from exc
        except driver_errors.ServerException as exc:
            if exc.code not in _UNAVAILABLE_CODES:
                raise
            first_line = str(exc).split("\n", 2)[:2]
            raise ClickHouseUnavailable(
                f"ClickHouse at {self.url_for_logs} cannot take this now: {' '.join(first_line)}"
            ) from exc

    def _escape_context(self) -> Context:
        return self._context

    @property
    def server_version(self) -> tuple[int, ...]:
        """The server's version as reported at connection time."""
        return self._version

    def supports_setting(self, name: str) -> bool:
        """Known to the server, and sendable by the driver to this server."""
        return super().supports_setting(name) and (
            self._settings_as_strings or name in driver_known_settings
        )

    def execute(
        self,
        sql: str,
        params: dict[str, Any] | None = None,
        *,
        settings: dict[str, Any] | None = None,
    ) -> list[tuple]:
        """Run a query; see ``ClickHouseClient.execute``."""
        query = self.bind(sql, params)
        with self._reachable(), self._connection() as client:
            rows, columns = client.execute(query, with_column_types=True, settings=settings)
        converters = self._converters(columns)
        if not converters:
            return rows
        return [_convert(row, converters) for row in rows]

    def iter_rows(
        self,
        sql: str,
        params: dict[str, Any] | None = None,
        *,
        settings: dict[str, Any] | None = None,
    ) -> Iterator[tuple]:
        """Stream a SELECT with ``execute_iter``; see ``ClickHouseClient.iter_rows``."""
        query = self.bind(sql, params)
        return self._stream(query, {"max_block_size": ITER_BLOCK_ROWS, **(settings or {})})

    def _stream(self, query: str, settings: dict[str, Any]) -> Iterator[tuple]:
        with self._connection() as client:
            yield from self._stream_on(client, query, settings)

    def _stream_on(self, client: Client, query: str, settings: dict[str, Any]) -> Iterator[tuple]:
        finished = False
        try:
            with self._reachable():
                rows = client.execute_iter(query, settings=settings, with_column_types=True)
                columns = next(rows, None)
                converters = self._converters(columns or [])
                if not converters:
                    yield from rows
                else:
                    for row in rows:
                        yield _convert(row, converters)
            finished = True
        finally:
            if not finished:
                # The server is still sending the abandoned result: drop the connection
                # rather than read it to the end.
                client.disconnect()

    def insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """Insert through the native protocol in blocks; see ``ClickHouseClient.insert``."""
        sql = (
            f"INSERT INTO {quote_identifier(table)} "
            f"({', '.join(quote_identifier(column) for column in columns)}) VALUES"
        )
        with self._reachable(), self._connection() as client:
            seconds, fix = self._datetime_columns(client, table, columns)
            data: Iterable[Sequence[Any]] = rows  # the driver takes lists, tuples or generators
            if seconds or fix:
                data = _datetimes_for_driver(rows, seconds, fix)
            return client.execute(sql, data, types_check=False) or 0

    def _datetime_columns(
        self, client: Client, table: str, columns: Sequence[str]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Indexes of the DateTime columns, and of the DateTime64 columns where the driver
        would misread a naive datetime. Looked up once per table and columns.

        DateTime values are sent as Unix seconds: the driver passes integers through, while
        it converts each datetime through pytz (~5 us a value: half the time of a 10^6-row
        insert). A DateTime64 value is fixed only where the driver would read naive wall
        time in a zone other than UTC (the column's, or else the server's); ours are UTC.
        """
        key = (table, tuple(columns))
        cached = self._datetime_indexes.get(key)
        if cached is not None:
            return cached
        types = dict(row[:2] for row in client.execute(f"DESCRIBE TABLE {quote_identifier(table)}"))
        seconds, fix = [], []
        for index, column in enumerate(columns):
            inner = _strip_wrappers(types.get(column, ""))
            if inner.startswith("DateTime64"):
                zone = inner.partition("'")[2].rpartition("'")[0]
                if (zone or self.timezone) not in UTC_ZONE_NAMES:
                    fix.append(index)
            elif inner.startswith("DateTime"):
                seconds.append(index)
        self._datetime_indexes[key] = (tuple(seconds), tuple(fix))
        return self._datetime_indexes[key]

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        """Run a statement and ignore its result."""
        query = self.bind(sql, params)
        # DDL may change column types that insert() has looked up.
        self._datetime_indexes.clear()
        with self._reachable(), self._connection() as client:
            client.execute(query)

    def close(self) -> None:
        """Disconnect every pooled ``Client``."""
        self._pool.close()

    def _converters(self, columns: Sequence[tuple[str, str]]) -> Converters:
        """(index, function) for each DateTime column, making its values aware UTC."""
        converters = []
        for index, (_name, ch_type) in enumerate(columns):
            inner = _strip_wrappers(ch_type)
            if not inner.startswith("DateTime"):
                continue
            if inner.endswith(")") and "'" in inner:
                converters.append((index, _aware_to_utc))  # zoned column: aware values
            elif self._server_is_utc:
                converters.append((index, _naive_utc_to_aware))
            else:
                converters.append((index, self._server_wall_time_to_utc))
        return tuple(converters)

    def _server_wall_time_to_utc(self, value: dt.datetime) -> dt.datetime:
        return self._server_zone.localize(value).astimezone(UTC)


def _datetimes_for_driver(
    rows: Iterable[Sequence[Any]], seconds: tuple[int, ...], fix: tuple[int, ...]
) -> Iterator[list[Any]]:
    """Rows with the datetimes at ``seconds`` as Unix seconds (naive ones are UTC) and the
    naive datetimes at ``fix`` made aware UTC. Rows of one batch share their timestamps, so
    conversions are remembered (a few at a time)."""
    known: dict[dt.datetime, int] = {}
    for row in rows:
        fixed = list(row)
        for index in seconds:
            value = fixed[index]
            if isinstance(value, dt.datetime):
                unix = known.get(value)
                if unix is None:
                    if len(known) > 1024:
                        known.clear()
                    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
                    unix = known[value] = int(aware.timestamp())
                fixed[index] = unix
        for index in fix:
            value = fixed[index]
            if isinstance(value, dt.datetime) and value.tzinfo is None:
                fixed[index] = value.replace(tzinfo=UTC)
        yield fixed


def _naive_utc_to_aware(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=UTC)


def _aware_to_utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(UTC)


# --------------------------------------------------------------------------------------
# chdb (embedded)
# --------------------------------------------------------------------------------------

# Set on every chdb session. The output settings make the JSON carry exact values (UTC
# instants as numbers, 64-bit integers unquoted, NaN/Inf and decimals as text);
# null_as_default=0 makes a NULL in a non-Nullable column an error, as it is with the driver.
_CHDB_SESSION_SETTINGS = (
    "SET session_timezone = 'UTC', date_time_output_format = 'unix_timestamp', "
    "date_time_input_format = 'best_effort', input_format_null_as_default = 0, "
    "output_format_json_quote_64bit_integers = 0, output_format_json_quote_denormals = 1, "
    "output_format_json_quote_decimals = 1, output_format_json_validate_utf8 = 1, "
    "parallel_view_processing = 1"
)

# Rows travel as JSON arrays: orjson decodes a whole block in one call and encodes a whole
# insert batch in one call, which is several times faster than per-row work in Python.
_CHDB_RESULT_FORMAT = "JSONCompactEachRowWithNamesAndTypes"
_CHDB_INSERT_FORMAT = "JSONCompactEachRow"

# chdb's allocator (jemalloc) keeps the pages an insert freed: the materialized views of
# 20 inserts of 50,000 member events left ~240 MB of this process's RSS held while the
# engine tracked ~13 MB in use. An insert of at least this many rows hands them back
# (``SYSTEM JEMALLOC PURGE``, 10-50 ms; RSS then stays within ~50 MB of where it was).
_CHDB_PURGE_AFTER_ROWS = INSERT_BATCH_ROWS
_CHDB_PURGE = "SYSTEM JEMALLOC PURGE"
LOG_NO_PURGE = "chdb cannot purge its allocator (%s): memory freed by inserts stays held"

# chdb runs one embedded server per process, bound to the first data path opened; another
# path can be opened only after every session on the first one is closed.
_registry_lock = threading.Lock()
_open_path: str | None = None
_open_clients = 0


def open_chdb_path() -> str | None:
    """The data path that chdb clients of this process hold open, if any."""
    return _open_path


def _register_path(path: str) -> None:
    global _open_path, _open_clients
    with _registry_lock:
        if _open_path is not None and _open_path != path:
            raise RuntimeError(
                f"chdb has {_open_path} open in this process; close every client on it "
                f"before opening {path}"
            )
        _open_path = path
        _open_clients += 1


def _unregister_path() -> None:
    global _open_path, _open_clients
    with _registry_lock:
        _open_clients -= 1
        if _open_clients == 0:
            _open_path = None


# Timestamps repeat a lot (one write stamps all its events alike): a small cache saves most
# of the datetime construction when streaming.
@lru_cache(maxsize=8192)
def _from_unix_seconds(value: str) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(value), UTC)


def _from_unix_fraction(value: str) -> dt.datetime:
    return dt.datetime.fromtimestamp(float(value), UTC)


def _json_converter(ch_type: str) -> Callable[[Any], Any] | None:
    """How to turn a JSON value of ``ch_type`` into what the driver returns; None: as it is."""
    inner = _strip_wrappers(ch_type)
    if inner.startswith("DateTime64"):
        return _from_unix_fraction
    if inner.startswith("DateTime"):
        return _from_unix_seconds
    if inner.startswith("Float"):
        return float  # NaN and infinities arrive as text
    if inner.startswith("Decimal"):
        return Decimal  # exact, as text
    if inner in ("Int128", "UInt128", "Int256", "UInt256"):
        return int  # always quoted in JSON
    return None


def _decode_block(data: bytes) -> list[tuple]:
    """Decode one JSONCompactEachRowWithNamesAndTypes block into rows."""
    payload = data.rstrip(b"\n")
    if not payload:
        return []
    # JSON strings escape newlines, so every newline separates two rows: one loads call
    # decodes the whole block.
    names_types_rows = orjson.loads(b"[" + payload.replace(b"\n", b",") + b"]")
    converters = [
        (index, convert)
        for index, ch_type in enumerate(names_types_rows[1])
        if (convert := _json_converter(ch_type)) is not None
    ]
    rows = names_types_rows[2:]
    for row in rows if converters else ():
        for index, convert in converters:  # orjson's lists can be changed in place
            value = row[index]
            if value is not None:
                row[index] = convert(value)
    return list(map(tuple, rows))


class ChdbClient(ClickHouseClient):
    """Embedded chdb on a data path, with a small pool of sessions on that path.

    Sessions on one path share the embedded server, so the pool gives each thread (and each
    open ``iter_rows``) a session of its own: a statement on a session would end a stream
    open on the same session.
    """

    in_process = True

    def __init__(self, *, url: str, path: str) -> None:
        self.url = url
        self.path = unquote(path)
        self._purges = True  # False once chdb refused _CHDB_PURGE
        self._context = escape_context("UTC")
        _register_path(self.path)
        self._pool: ConnectionPool[Any] = ConnectionPool(self._open_session, self._close_session)
        try:
            with self._pool.connection() as session:
                version = session.query("SELECT version()", "TSV").bytes()
        except BaseException:
            self.close()
            raise
        self._version = tuple(int(part) for part in version.decode().strip().split("."))

    def _open_session(self) -> Any:
        from chdb.session import Session

        try:
            session = Session(self.path)
        except RuntimeError as exc:
            raise ClickHouseUnavailable(
                f"chdb cannot open {self.path} (is another process using it?): {exc}"
            ) from exc
        try:
            session.query(_CHDB_SESSION_SETTINGS)
        except BaseException:
            session.close()
            raise
        return session

    @staticmethod
    def _close_session(session: Any) -> None:
        session.close()

    def _escape_context(self) -> Context:
        return self._context

    @property
    def server_version(self) -> tuple[int, ...]:
        """chdb's ClickHouse engine version."""
        return self._version

    def _with_settings(self, query: str, settings: dict[str, Any] | None) -> str:
        if not settings:
            return query
        clause = ", ".join(
            setting_literal(name, value, self._context) for name, value in settings.items()
        )
        # A new line, so that a trailing "-- comment" in the query cannot swallow the clause.
        return f"{query.rstrip().rstrip(';')}\nSETTINGS {clause}"

    def execute(
        self,
        sql: str,
        params: dict[str, Any] | None = None,
        *,
        settings: dict[str, Any] | None = None,
    ) -> list[tuple]:
        """Run a query; see ``ClickHouseClient.execute``."""
        query = self._with_settings(self.bind(sql, params), settings)
        with self._pool.connection() as session:
            data = session.query(query, _CHDB_RESULT_FORMAT).bytes()
        return _decode_block(data)

    def execute_lines(
        self,
        sql: str,
        params: dict[str, Any] | None = None,
        *,
        settings: dict[str, Any] | None = None,
    ) -> bytes:
        """The engine's ``TabSeparatedRaw`` output; see ``ClickHouseClient.execute_lines``."""
        query = self._with_settings(self.bind(sql, params), settings)
        with self._pool.connection() as session:
            return session.query(query, "TabSeparatedRaw").bytes()

    def iter_rows(
        self,
        sql: str,
        params: dict[str, Any] | None = None,
        *,
        settings: dict[str, Any] | None = None,
    ) -> Iterator[tuple]:
        """Stream a SELECT with ``send_query``; see ``ClickHouseClient.iter_rows``."""
        query = self._with_settings(
            self.bind(sql, params), {"max_block_size": ITER_BLOCK_ROWS, **(settings or {})}
        )
        return self._stream(query)

    def _stream(self, query: str) -> Iterator[tuple]:
        session = self._pool.acquire()
        stream = None
        finished = False
        try:
            stream = session.send_query(query, _CHDB_RESULT_FORMAT)
            for chunk in stream:
                yield from _decode_block(chunk.bytes())
            finished = True
        finally:
            if stream is not None and not finished:
                with suppress(Exception):  # the stream may already have failed and ended
                    stream.cancel()
            self._pool.release(session)

    def insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        """Stream rows as JSON arrays into one INSERT; see ``ClickHouseClient.insert``."""
        sql = (
            f"INSERT INTO {quote_identifier(table)} "
            f"({', '.join(quote_identifier(column) for column in columns)})"
        )
        count = 0
        remaining = iter(rows)
        with self._pool.connection() as session:
            inserter = session.send_insert(sql, _CHDB_INSERT_FORMAT)
            try:
                while batch := list(islice(remaining, INSERT_BATCH_ROWS)):
                    # One dumps call per batch; its outer brackets dropped, the rows are
                    # comma-separated, which JSONCompactEachRow reads. Naive datetimes are UTC.
                    inserter.append(orjson.dumps(batch, option=orjson.OPT_NAIVE_UTC)[1:-1])
                    inserter.append(b"\n")
                    count += len(batch)
                inserter.finish()
            except BaseException:
                inserter.cancel()
                raise
            if count >= _CHDB_PURGE_AFTER_ROWS and self._purges:
                try:
                    session.query(_CHDB_PURGE, "TSV")
                except RuntimeError as exc:  # a chdb built without jemalloc: rows are in
                    self._purges = False
                    logger.warning(LOG_NO_PURGE, exc)
        return count

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        """Run a statement and ignore its result."""
        query = self.bind(sql, params)
        with self._pool.connection() as session:
            session.query(query, "TSV")

    def close(self) -> None:
        """Close every session; afterwards this process may open another chdb path."""
        if self._pool.close():
            _unregister_path()
