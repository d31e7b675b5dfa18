"""ClickHouse access through clickhouse-connect, for both deployments.

``chdb:///path`` opens the embedded engine in this process; ``http(s)://``
talks to a server. Either way the sync client is used from a small thread
pool (chDB refuses the async client, and its calls block), so the event loop
never waits on storage.

chDB allows one data path per process and one process per data path
(field-notes.md): :func:`open_storage` explains a locked folder in words, and
:class:`Storage` takes a database name so tests isolate by database.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import clickhouse_connect
import orjson
from clickhouse_connect.driver.client import Client

from collector.journal import Journal, JournalLocked

T = TypeVar("T")
log = logging.getLogger("logferry.storage")


class StorageUnavailable(RuntimeError):
    """Storage cannot be opened or reached; the message says why in words."""


class StorageLocked(StorageUnavailable):
    """Another process (a running collector) holds the embedded data folder."""


def is_embedded(dsn: str) -> bool:
    return dsn.startswith("chdb://")


def chdb_path(dsn: str) -> str:
    """The absolute data folder of a ``chdb://`` DSN (relative paths are taken
    from the working directory, so ``chdb://./data/clickhouse`` works)."""
    rest = dsn[len("chdb://"):]
    return str(Path(rest).expanduser().resolve())


def _connect(dsn: str, database: str | None) -> Client:
    if is_embedded(dsn):
        path = chdb_path(dsn)
        os.makedirs(path, exist_ok=True)
        try:
            return clickhouse_connect.get_client(dsn=f"chdb://{path}", database=database or "default")
        except Exception as exc:
            text = str(exc)
            # chDB words a held folder either way (the second without detail).
            if any(m in text for m in ("Cannot lock file", "Another server instance",
                                       "Error initializing EmbeddedServer")):
                raise StorageLocked(
                    f"the data folder {path} is in use by another process (a running collector?)"
                ) from None
            raise StorageUnavailable(f"cannot open embedded storage at {path}: {text.splitlines()[0]}") from None
    parsed = urllib.parse.urlparse(dsn)
    db = database or (parsed.path.strip("/") or "default")
    try:
        return clickhouse_connect.get_client(
            host=parsed.hostname or "localhost",
            port=parsed.port or (8443 if parsed.scheme == "https" else 8123),
            username=urllib.parse.unquote(parsed.username or "default"),
            password=urllib.parse.unquote(parsed.password or ""),
            secure=parsed.scheme == "https",
            database=db,
            autogenerate_session_id=False,
        )
    except Exception as exc:
        host = parsed.hostname
        raise StorageUnavailable(f"cannot reach ClickHouse at {parsed.scheme}://{host}: {exc}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__}")


def encode_rows(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """A JSON array of row objects, which ClickHouse's JSONEachRow input also
    reads: one orjson call is ~25x cheaper than a call per row (measured)."""
    return orjson.dumps(rows if isinstance(rows, list) else list(rows), default=_json_default)


class Storage:
    """One logical database on one ClickHouse (embedded or server)."""

    def __init__(self, dsn: str, database: str, *, query_timeout: float = 10.0, workers: int = 4):
        self.dsn = dsn
        self.database = database
        self.query_timeout = query_timeout
        bootstrap = _connect(dsn, None)
        bootstrap.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        self._client = _connect(dsn, database)
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="storage")
        self._local = threading.local()
        self._closed = False
        #: The write-ahead journal of the hot path's tables, when one is attached
        #: (:meth:`attach_journal`); None: every insert goes straight to ClickHouse.
        self.journal: Journal | None = None
        self._journal_users = 0
        self._journal_lock = threading.Lock()

    # --- sync API (call from threads) ------------------------------------

    @property
    def client(self) -> Client:
        return self._client

    def barrier(self, sql: str) -> None:
        """Read-your-writes: rows acknowledged through the journal for a table
        this statement names are in ClickHouse before it runs."""
        journal = self.journal
        if journal is not None:
            journal.barrier_for_sql(sql, timeout=max(30.0, self.query_timeout))

    def query_sync(self, sql: str, parameters: Mapping[str, Any] | None = None,
                   settings: Mapping[str, Any] | None = None, *, barrier: bool = True) -> list[dict[str, Any]]:
        if barrier:
            self.barrier(sql)
        result = self._client.query(sql, parameters=dict(parameters or {}), settings=dict(settings or {}))
        names = result.column_names
        return [dict(zip(names, row, strict=True)) for row in result.result_rows]

    def query_json_sync(self, sql: str, parameters: Mapping[str, Any] | None = None,
                        settings: Mapping[str, Any] | None = None) -> bytes:
        """Raw ``FORMAT JSONEachRow`` bytes of a query (``sql`` must not name a format)."""
        self.barrier(sql)
        return bytes(self._client.raw_query(sql + " FORMAT JSONEachRow", parameters=dict(parameters or {}),
                                            settings=dict(settings or {})))

    def command_sync(self, sql: str, parameters: Mapping[str, Any] | None = None,
                     settings: Mapping[str, Any] | None = None) -> Any:
        self.barrier(sql)
        return self._client.command(sql, parameters=dict(parameters or {}) or None, settings=dict(settings or {}))

    def insert_rows_sync(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        journal = self.journal
        if journal is not None and journal.journaled(table) and table != LOGS_TABLE:
            journal.write_sync(table, rows)
            return
        self.insert_direct_sync(table, rows)

    def insert_direct_sync(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert into ClickHouse itself (the journal's flusher and replay)."""
        if not rows:
            return
        self._client.raw_insert(table, None, encode_rows(rows), fmt="JSONEachRow",
                                settings={"date_time_input_format": "best_effort"})

    # --- async API --------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def query(self, sql: str, parameters: Mapping[str, Any] | None = None,
                    settings: Mapping[str, Any] | None = None, *, barrier: bool = True) -> list[dict[str, Any]]:
        """Rows of ``sql``. ``barrier=False`` skips waiting for journaled rows
        (the caller looks at :meth:`Journal.pending_rows` itself)."""
        if not barrier:
            return await self.run(lambda: self.query_sync(sql, parameters, settings, barrier=False))
        return await self.run(self.query_sync, sql, parameters, settings)

    async def query_json(self, sql: str, parameters: Mapping[str, Any] | None = None,
                         settings: Mapping[str, Any] | None = None) -> bytes:
        return await self.run(self.query_json_sync, sql, parameters, settings)

    async def command(self, sql: str, parameters: Mapping[str, Any] | None = None,
                      settings: Mapping[str, Any] | None = None) -> Any:
        return await self.run(self.command_sync, sql, parameters, settings)

    async def insert_rows(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Store rows: through the journal for a journaled table (returns once
        fsynced there), else one insert into ClickHouse. Logs are journaled
        only by collector.ingest.LogWriter, which gives each row the batch id
        a replay needs; here they are inserted."""
        if not rows:
            return
        journal = self.journal
        if journal is not None and journal.journaled(table) and table != LOGS_TABLE:
            await journal.write(table, rows)
            return
        await self.run(self.insert_direct_sync, table, rows)

    # --- the journal ------------------------------------------------------------

    def attach_journal(self, directory: str | os.PathLike[str], *, flush_interval: float = 0.25,
                       remove_when_empty: bool = False, max_unflushed_rows: int = 200_000,
                       logs: bool = False, max_unflushed_logs: int = 500_000) -> bool:
        """Route the hot path's tables through a write-ahead journal in
        ``directory`` (replaying what a previous run left there first: call it
        after migrations, before anything reads). Several callers may attach
        (an app restarted on the same Storage in tests); the last
        :meth:`detach_journal` flushes and closes it. Returns False (writes go
        straight to ClickHouse) when another process holds the folder.
        ``remove_when_empty``: remove the folder on a clean close (the default
        folder of an embedded store, which chDB's own lock keeps to one process).
        ``max_unflushed_rows``: beyond it writes of a table are refused (``JournalFull``)
        until ClickHouse catches up, so memory stays bounded while it is away.
        ``logs``: journal application_logs too (``max_unflushed_logs`` rows at
        most); its replay skips the batches already stored (:meth:`logs_not_stored`)."""
        with self._journal_lock:
            if self.journal is not None:
                self._journal_users += 1
                return True
            journal = Journal(directory, self.insert_direct_sync, flush_interval=flush_interval,
                              remove_when_empty=remove_when_empty, max_unflushed_rows=max_unflushed_rows,
                              dedupe={LOGS_TABLE: self.logs_not_stored} if logs else None,
                              table_limits={LOGS_TABLE: max_unflushed_logs})
            try:
                journal.open()
            except JournalLocked as exc:
                log.warning("journal not used: %s; its tables are written straight to storage", exc)
                return False
            self.journal = journal
            self._journal_users = 1
            return True

    def logs_not_stored(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The log rows whose batch is not in ingest_batches yet, each id once
        (the journal's flushes and replay of application_logs). The insert that
        stores a batch's rows records its id (the ingest_batches_from_logs
        view), so a batch resent after the collector forgot it, or a record the
        flusher had inserted before a crash, is recognised. Rows without a
        batch id are kept (the collector gives every journaled row one)."""
        ids = sorted({str(row.get("batch_id") or "") for row in rows} - {""})
        stored: set[str] = set()
        for start in range(0, len(ids), 10_000):
            found = self.query_sync(
                "SELECT DISTINCT batch_id FROM ingest_batches WHERE batch_id IN {ids:Array(String)}",
                {"ids": ids[start:start + 10_000]}, barrier=False)
            stored.update(r["batch_id"] for r in found)
        out = []
        row_ids: set[Any] = set()
        for row in rows:
            if row.get("batch_id") and row["batch_id"] in stored:
                continue
            # A batch journaled twice before either reached ClickHouse: its rows have the same ids.
            key = row.get("id")
            if key is not None:
                if key in row_ids:
                    continue
                row_ids.add(key)
            out.append(row)
        return out

    def detach_journal(self) -> None:
        with self._journal_lock:
            if self.journal is None:
                return
            self._journal_users -= 1
            if self._journal_users > 0:
                return
            journal = self.journal
            # Closed (flushed) while still attached, so reads meanwhile keep their barrier.
            journal.close()
            self.journal = None

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.command("SELECT 1"), timeout=5))
        except Exception:
            return False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.journal is not None:
            self._journal_users = 1
            self.detach_journal()
        self._executor.shutdown(wait=True, cancel_futures=False)
        try:
            self._client.close()
        except Exception:  # noqa: S110 - closing a client that is already gone is fine
            pass


#: The log table, journaled when :meth:`Storage.attach_journal` is asked to.
LOGS_TABLE = "application_logs"


def default_journal_dir(dsn: str, database: str) -> str:
    """Where the journal lives unless ``storage.journal`` says: beside the chDB
    data folder (``<folder>-journal/<database>``) for ``chdb://``, else
    ``./data/journal/<database>`` (local state of this collector)."""
    if is_embedded(dsn):
        folder = Path(chdb_path(dsn))
        return str(folder.with_name(folder.name + "-journal") / database)
    return str(Path("data", "journal", database).resolve())


def open_storage(dsn: str, database: str, *, query_timeout: float = 10.0) -> Storage:
    """Open storage or raise :class:`StorageUnavailable` with a sentence a user understands."""
    return Storage(dsn, database, query_timeout=query_timeout)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_version() -> int:
    """A version for ReplacingMergeTree rows: nanoseconds, strictly increasing in this process."""
    global _last_version
    with _version_lock:
        v = max(time.time_ns(), _last_version + 1)
        _last_version = v
        return v


_last_version = 0
_version_lock = threading.Lock()
