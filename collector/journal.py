"""A local write-ahead journal in front of ClickHouse for the hot path's
mutable rows (notifications, their deliveries, the email service's messages,
outbox and idempotency keys).

Why: one chDB insert costs 20–25 ms whatever its size (the ``text`` indexes
add ~10 ms per part and the embedded engine serialises every call), while an
``fdatasync`` of a local file costs ~0.1 ms (p99 ~4 ms). So "stored" means:
appended here and fsynced. A background flusher then writes coalesced inserts
per table into ClickHouse and retires the journal segments whose rows all
reached it.

- **Records**: ``[u32 length][u32 crc32][payload]``, little-endian; the payload
  is ``orjson([table, rows])``. A torn or corrupt record (a crash in the middle
  of an append) ends its segment: it and anything after it are ignored — they
  were never acknowledged, since a write returns only after the fsync that
  covers it.
- **Group commit**: writers append (a ``write(2)`` under a lock) and wait for
  the one fsync thread; every writer that appended before an fsync started is
  covered by it, so concurrent writers share one fsync.
- **Replay**: :meth:`Journal.open` re-inserts every record of the segments a
  previous run left (before anything reads), then deletes them. Every
  journaled table is a ReplacingMergeTree whose rows carry their version, so
  inserting a row twice is harmless (the caller guarantees it: see
  :data:`JOURNALED_TABLES`).
- **Read-your-writes**: :meth:`Journal.barrier` waits until the rows appended so
  far for the given tables are in ClickHouse (asking the flusher to go now);
  :class:`~collector.storage.Storage` calls it before every statement that
  names a journaled table, so reads, ``DELETE``\\s and ``ALTER``\\s see
  (or act on) every acknowledged row.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("logferry.journal")

#: Tables that may go through the journal: each is a ReplacingMergeTree whose
#: rows carry everything that decides which copy wins (the ``version`` column,
#: for email_idempotency an immutable key → email id, for ingest_rejections a
#: batch id → what its first request rejected), so replaying a record
#: whose rows already reached ClickHouse changes nothing. A plain MergeTree
#: (email_events) must not be added here: a replay would duplicate its rows.
JOURNALED_TABLES: tuple[str, ...] = (
    "notifications", "notification_deliveries", "email_messages", "email_outbox", "email_idempotency",
    "ingest_rejections",
)

#: A plain MergeTree may still be journaled when the journal is given a
#: ``dedupe`` function for it: every flush and the replay pass it the table's
#: rows and insert only those it returns (those not already in ClickHouse). application_logs
#: is journaled so (collector.storage: every journaled log row carries a batch
#: id, and the insert that stores a batch's rows records the id).
Dedupe = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]

_HEADER = struct.Struct("<II")
_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
_SEGMENT = re.compile(r"^segment-(\d{20})\.log$")
_MUTATION = re.compile(r"^\s*(DELETE|ALTER|TRUNCATE|DROP|OPTIMIZE)\b", re.IGNORECASE)


#: Rows ClickHouse refused to parse, set aside (JSON lines) instead of blocking the table.
REJECTED_FILE = "rejected.ndjson"
_AT_ROW = re.compile(r"\(at row (\d+)\)")


def bad_row(exc: BaseException, rows: int) -> int | None:
    """The index of the row an insert's error blames, when it is a row that
    could not be parsed (ClickHouse: ``… (at row N) … JSONEachRowRowInputFormat``)."""
    text = str(exc)
    match = _AT_ROW.search(text)
    if match is None or "JSONEachRow" not in text:
        return None
    index = int(match.group(1)) - 1
    return index if 0 <= index < rows else None


class JournalError(RuntimeError):
    """The journal cannot take or flush writes; the message says why."""


class JournalLocked(JournalError):
    """Another journal (another collector process) uses this folder."""


class JournalFull(JournalError):
    """Too many rows wait for ClickHouse (it is down or slower than the writers):
    the write is refused rather than letting memory grow without bound."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"cannot journal {type(obj).__name__}")


def encode_record(table: str, rows: Sequence[Mapping[str, Any]]) -> bytes:
    payload = orjson.dumps([table, rows if isinstance(rows, list) else list(rows)], default=_json_default)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_segment(data: bytes) -> tuple[list[tuple[str, list[dict[str, Any]]]], int]:
    """The whole records of a segment's bytes, and how many bytes at the end
    were ignored (a torn or corrupt tail)."""
    records: list[tuple[str, list[dict[str, Any]]]] = []
    pos = 0
    size = len(data)
    while pos + _HEADER.size <= size:
        length, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        end = start + length
        if end > size or zlib.crc32(data[start:end]) != crc:
            break
        try:
            table, rows = orjson.loads(data[start:end])
        except orjson.JSONDecodeError:
            break
        records.append((str(table), list(rows)))
        pos = end
    return records, size - pos


class _Waiters:
    """Callbacks to run once the fsync covering a sequence number is done."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: deque[tuple[int, Callable[[BaseException | None], None]]] = deque()


class Journal:
    """One journal folder; see the module doc. Thread-safe; ``write`` is async.

    ``insert(table, rows)`` writes rows straight into ClickHouse (called from
    the flusher thread and during replay).
    """

    def __init__(self, directory: str | os.PathLike[str], insert: Callable[[str, list[dict[str, Any]]], None], *,
                 tables: Iterable[str] = JOURNALED_TABLES, flush_interval: float = 0.25,
                 segment_bytes: int = 4 * 1024 * 1024, fsync: bool = True, remove_when_empty: bool = False,
                 max_unflushed_rows: int = 200_000, dedupe: Mapping[str, Dedupe] | None = None,
                 table_limits: Mapping[str, int] | None = None):
        self.directory = Path(directory)
        self.dedupe = dict(dedupe or {})
        self.tables = frozenset(tables) | frozenset(self.dedupe)
        self._insert = insert
        self.flush_interval = flush_interval
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        #: Rows of one table appended but not yet in ClickHouse beyond which
        #: writes are refused (:class:`JournalFull`); ``table_limits`` overrides it per table.
        self.max_unflushed_rows = max_unflushed_rows
        self.table_limits = dict(table_limits or {})
        self._unflushed: dict[str, int] = {}
        #: On a clean close, remove the folder (and its parent, when empty too).
        self.remove_when_empty = remove_when_empty
        self._table_pattern = re.compile(r"\b(" + "|".join(sorted(self.tables, key=len, reverse=True)) + r")\b")
        self._lock = threading.Lock()
        self._sync_cond = threading.Condition(self._lock)
        self._flush_cond = threading.Condition(self._lock)
        self._flushed_cond = threading.Condition(self._lock)
        self._lock_fd: int | None = None
        self._fd = -1
        self._segment_path: Path | None = None
        self._segment_size = 0
        self._segment_first = 0
        self._closed_segments: list[tuple[Path, int]] = []  # (path, last seq), oldest first
        self._seq = 0  # last appended
        self._synced = 0  # last covered by an fsync
        self._sync_error: BaseException | None = None
        self._waiters = _Waiters()
        self._pending: dict[str, list[tuple[int, list[dict[str, Any]]]]] = {}
        self._in_flight: dict[str, list[tuple[int, list[dict[str, Any]]]]] = {}  # table → batch being inserted
        self._last_seq: dict[str, int] = {}
        self._flushed_seq: dict[str, int] = {}
        self._oldest_pending: float | None = None
        self._urgent = False
        self._stopping = False
        self._running = False
        self._threads: list[threading.Thread] = []
        self._flush_error: str | None = None
        self._left_unflushed = False
        self._rotate_requested = False
        #: Recent inserts of the flusher: (table, rows, seconds), for metrics and benchmarks.
        self.inserts: deque[tuple[str, int, float]] = deque(maxlen=2048)
        self.stats = {"records": 0, "rows": 0, "fsyncs": 0, "flushes": 0, "flushed_rows": 0,
                      "flush_failures": 0, "replayed_rows": 0, "ignored_bytes": 0, "rejected_rows": 0,
                      "skipped_rows": 0}

    # --- opening -------------------------------------------------------------------

    def open(self) -> int:
        """Lock the folder, replay what a previous run left, start the threads.
        Returns how many rows were replayed. Raises JournalLocked or JournalError."""
        for attempt in range(3):  # a journal closing beside it may remove the shared parent meanwhile
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalLocked(f"the journal folder {self.directory} is in use by another process") from None
        self._lock_fd = fd
        try:
            replayed = self._replay()
            self._new_segment(1)
        except BaseException:
            self._unlock()
            raise
        self._running = True
        for name, target in (("journal-sync", self._sync_main), ("journal-flush", self._flush_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return replayed

    def _segments(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if _SEGMENT.match(p.name))

    def _replay(self) -> int:
        """Insert the rows of the segments a previous run left, one segment at
        a time (memory stays bounded by a segment, not by the backlog), then
        delete them. A crash during the replay replays again: harmless (see
        :data:`JOURNALED_TABLES` and :data:`Dedupe`)."""
        segments = self._segments()
        total = 0
        for path in segments:
            records, ignored = read_segment(path.read_bytes())
            if ignored:
                self.stats["ignored_bytes"] += ignored
                log.warning("journal segment has a torn or corrupt tail; ignoring it (never acknowledged)",
                            extra={"segment": path.name, "bytes": ignored})
            by_table: dict[str, list[dict[str, Any]]] = {}
            for table, rows in records:
                if table not in self.tables:
                    raise JournalError(f"the journal holds rows of {table!r}, which is not a journaled table")
                by_table.setdefault(table, []).extend(rows)
            del records
            for table, rows in by_table.items():
                dedupe = self.dedupe.get(table)
                if dedupe is not None:
                    found = len(rows)
                    rows = dedupe(rows)
                    if found != len(rows):
                        log.info("journal replay skipped rows already stored",
                                 extra={"table": table, "rows": found - len(rows), "segment": path.name})
                for start in range(0, len(rows), 50_000):
                    self._insert_isolating(table, rows[start:start + 50_000])
                total += len(rows)
        for path in segments:
            path.unlink()
        if segments:
            self._fsync_dir()
            log.info("journal replayed", extra={"rows": total, "segments": len(segments)})
        self.stats["replayed_rows"] += total
        return total

    def _fsync_dir(self) -> None:
        if not self.fsync:
            return
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _new_segment(self, first_seq: int) -> None:
        path = self.directory / f"segment-{first_seq:020d}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segment_path = path
        self._segment_size = 0
        self._segment_first = first_seq
        self._fsync_dir()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- writing -----------------------------------------------------------------------

    def journaled(self, table: str) -> bool:
        return table in self.tables

    def _append(self, table: str, rows: list[dict[str, Any]], done: Callable[[BaseException | None], None]) -> None:
        record = encode_record(table, rows)
        with self._lock:
            if not self._running or self._stopping:
                raise JournalError("the journal is closed")
            if self._sync_error is not None:
                raise JournalError(f"the journal cannot be written: {self._sync_error}")
            unflushed = self._unflushed.get(table, 0)
            limit = self.table_limits.get(table, self.max_unflushed_rows)
            if unflushed and unflushed + len(rows) > limit:
                raise JournalFull(f"{unflushed} stored rows of {table} are waiting for ClickHouse (limit "
                                  f"{limit})" + (f"; last error: {self._flush_error}" if self._flush_error else ""))
            view = memoryview(record)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                # A partial record would hide every later one from a replay: stop taking writes.
                self._sync_error = exc
                raise JournalError(f"the journal cannot be written: {exc}") from exc
            self._seq += 1
            seq = self._seq
            self._segment_size += len(record)
            self._waiters.items.append((seq, done))
            self._pending.setdefault(table, []).append((seq, rows))
            self._unflushed[table] = unflushed + len(rows)
            self._last_seq[table] = seq
            if self._oldest_pending is None:
                self._oldest_pending = time.monotonic()
                self._flush_cond.notify()
            self.stats["records"] += 1
            self.stats["rows"] += len(rows)
            self._sync_cond.notify()

    async def write(self, table: str, rows: Sequence[Mapping[str, Any]], *, copy: bool = True) -> None:
        """Append ``rows`` of ``table``; returns once they are fsynced (stored).
        ``copy=False``: the caller hands the row dicts over and never changes them again."""
        if not rows:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def resolve(error: BaseException | None) -> None:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(JournalError(f"the journal cannot be written: {error}"))

        def done(error: BaseException | None) -> None:
            loop.call_soon_threadsafe(resolve, error)

        self._append(table, [dict(r) for r in rows] if copy else list(rows), done)  # type: ignore[arg-type]
        await future

    def write_sync(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """:meth:`write` for threads (never from the event loop of an async writer)."""
        if not rows:
            return
        event = threading.Event()
        errors: list[BaseException] = []

        def done(error: BaseException | None) -> None:
            if error is not None:
                errors.append(error)
            event.set()

        self._append(table, [dict(r) for r in rows], done)
        event.wait()
        if errors:
            raise JournalError(f"the journal cannot be written: {errors[0]}")

    def _sync_loop(self) -> None:
        while True:
            with self._lock:
                while self._seq == self._synced and not self._stopping and not self._rotate_requested:
                    self._sync_cond.wait()
                if self._seq == self._synced:
                    if self._rotate_requested:
                        try:
                            self._rotate_locked()
                        except OSError as exc:
                            self._fail_locked(exc)
                        continue
                    return  # stopping, everything synced
                target = self._seq
                fd = self._fd
            error: BaseException | None = None
            try:
                if self.fsync:
                    _datasync(fd)
            except OSError as exc:
                error = exc
                log.error("journal fsync failed", extra={"error": str(exc)})
            ready: list[Callable[[BaseException | None], None]] = []
            with self._lock:
                if error is not None:
                    self._sync_error = error
                self._synced = target
                waiters = self._waiters.items
                while waiters and waiters[0][0] <= target:
                    ready.append(waiters.popleft()[1])
                self.stats["fsyncs"] += 1
                if error is None and (self._rotate_requested or self._segment_size >= self.segment_bytes):
                    try:
                        if self.fsync and self._seq != target:
                            _datasync(self._fd)
                        self._synced = self._seq
                        while waiters:
                            ready.append(waiters.popleft()[1])
                        self._rotate_locked()
                    except OSError as exc:
                        error = exc
                        self._fail_locked(exc)
                        while waiters:
                            ready.append(waiters.popleft()[1])
            for callback in ready:
                try:
                    callback(error)
                except Exception:  # a writer whose loop is gone
                    log.debug("journal waiter failed", exc_info=True)

    def _fail_locked(self, exc: BaseException) -> None:
        """The journal cannot go on (a disk error): refuse further writes."""
        log.error("journal failed; refusing writes", extra={"error": str(exc)})
        self._sync_error = exc
        self._rotate_requested = False
        self._flushed_cond.notify_all()

    def _sync_main(self) -> None:
        try:
            self._sync_loop()
        except BaseException as exc:  # never leave a writer waiting for an fsync that will not come
            with self._lock:
                self._fail_locked(exc)
                waiters = list(self._waiters.items)
                self._waiters.items.clear()
            for _, callback in waiters:
                with contextlib.suppress(Exception):
                    callback(exc)
            raise

    def _rotate_locked(self) -> None:
        """Close the current segment (fully synced) and start the next one.
        Only the sync thread calls it: it is the only one that fsyncs the fd."""
        old = self._fd
        assert self._segment_path is not None
        self._closed_segments.append((self._segment_path, self._seq))
        self._new_segment(self._seq + 1)
        os.close(old)
        self._rotate_requested = False
        self._flushed_cond.notify_all()

    # --- flushing into ClickHouse ----------------------------------------------------------

    def _flush_loop(self) -> None:
        failures = 0
        while True:
            with self._lock:
                while True:
                    if self._pending_any():
                        if self._urgent or self._stopping:
                            break
                        assert self._oldest_pending is not None
                        wait = self._oldest_pending + self.flush_interval - time.monotonic()
                        if wait <= 0:
                            break
                        self._flush_cond.wait(wait)
                    elif self._stopping:
                        return
                    else:
                        self._flush_cond.wait()
                self._urgent = False
                batches = {t: items for t, items in self._pending.items() if items}
                self._pending = {}
                self._oldest_pending = None
                self._in_flight.update(batches)
            failed = False
            for table, items in batches.items():
                rows = [row for _, chunk in items for row in chunk]
                count = len(rows)
                started = time.perf_counter()
                try:
                    dedupe = self.dedupe.get(table)
                    if dedupe is not None:
                        rows = dedupe(rows)
                        self.stats["skipped_rows"] += count - len(rows)
                    self._insert_isolating(table, rows)
                except Exception as exc:
                    failed = True
                    with self._lock:
                        self._pending[table] = items + self._pending.get(table, [])
                        self._in_flight.pop(table, None)
                        if self._oldest_pending is None:
                            self._oldest_pending = time.monotonic()
                        self._flush_error = f"{table}: {exc}"
                        self.stats["flush_failures"] += 1
                    log.error("journal flush into ClickHouse failed; retrying", extra={
                        "table": table, "rows": len(rows), "error": str(exc).splitlines()[0] if str(exc) else ""})
                    continue
                self.inserts.append((table, count, time.perf_counter() - started))
                with self._lock:
                    self._in_flight.pop(table, None)
                    self._flushed_seq[table] = items[-1][0]
                    self._unflushed[table] -= count
                    self._flush_error = None
                    self.stats["flushes"] += 1
                    self.stats["flushed_rows"] += count
                    self._flushed_cond.notify_all()
            self._retire()
            if failed:
                failures += 1
                if self._stopping and failures >= 3:
                    log.error("journal: rows not flushed at stop; they stay in the journal for the next start")
                    with self._lock:
                        self._pending = {}
                        self._left_unflushed = True
                        self._flushed_cond.notify_all()
                    return
                time.sleep(min(5.0, 0.2 * 2 ** min(failures, 5)))
            else:
                failures = 0

    def _insert_isolating(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows``; a row ClickHouse cannot parse (its error names the
        row) is set aside in ``rejected.ndjson`` beside the segments and the
        rest inserted, so one bad row never blocks the table's flushes (nor a
        start-up replay) for good. Other errors are raised: the caller retries."""
        rows = list(rows)
        while rows:
            try:
                self._insert(table, rows)
                return
            except Exception as exc:
                index = bad_row(exc, len(rows))
                if index is None:
                    raise
                self._set_aside(table, rows.pop(index), exc)

    def _set_aside(self, table: str, row: dict[str, Any], exc: BaseException) -> None:
        error = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
        line = orjson.dumps({"table": table, "error": error, "at": time.time(), "row": row},
                            default=_json_default) + b"\n"
        path = self.directory / REJECTED_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            if self.fsync:
                _datasync(fd)
        finally:
            os.close(fd)
        self.stats["rejected_rows"] += 1
        log.error("journal: ClickHouse refused a row; set aside, the others are stored",
                  extra={"table": table, "file": str(path), "error": error})

    def _pending_any(self) -> bool:
        return any(self._pending.values())

    def _watermark(self) -> int:
        """Every record with a lower sequence number is in ClickHouse."""
        low = self._seq + 1
        for items in self._pending.values():
            if items:
                low = min(low, items[0][0])
        for items in self._in_flight.values():
            low = min(low, items[0][0])
        return low

    def _retire(self) -> None:
        # Deleted under the lock, so whoever retires next (a checkpoint) finds them gone.
        with self._lock:
            mark = self._watermark()
            done = [path for path, last in self._closed_segments if last < mark]
            self._closed_segments = [(p, last) for p, last in self._closed_segments if last >= mark]
            for path in done:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if done:
                with contextlib.suppress(OSError):
                    self._fsync_dir()

    # --- reading -----------------------------------------------------------------------------

    def tables_in(self, sql: str) -> set[str]:
        return set(self._table_pattern.findall(sql))

    def barrier(self, tables: Iterable[str], timeout: float = 30.0) -> None:
        """Block until every row appended so far to ``tables`` is in ClickHouse."""
        with self._lock:
            targets = {t: self._last_seq[t] for t in tables
                       if self._last_seq.get(t, 0) > self._flushed_seq.get(t, 0)}
            if not targets:
                return
            self._urgent = True
            self._flush_cond.notify()
            deadline = time.monotonic() + timeout
            while any(self._flushed_seq.get(t, 0) < s for t, s in targets.items()):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._threads_alive():
                    raise JournalError("journaled rows are not in ClickHouse yet"
                                       + (f" (last error: {self._flush_error})" if self._flush_error else ""))
                self._flushed_cond.wait(min(remaining, 1.0))

    def barrier_for_sql(self, sql: str, timeout: float = 30.0) -> None:
        """The barrier a statement needs: reads wait for their tables' rows;
        a ``DELETE``, ``ALTER``, ``TRUNCATE`` or ``DROP`` of a journaled table
        also retires every record written so far (:meth:`checkpoint`), so a
        replay after a crash cannot bring deleted rows back."""
        if not self._last_seq:
            return
        tables = self.tables_in(sql)
        if not tables:
            return
        if _MUTATION.match(sql):
            self.checkpoint(timeout)
        else:
            self.barrier(tables, timeout)

    def checkpoint(self, timeout: float = 30.0) -> None:
        """Flush every record appended so far into ClickHouse and delete the
        segments holding them (the current one is closed first)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self._running:
                return
            target = self._seq
            self._rotate_requested = True
            self._sync_cond.notify()
            while self._segment_first <= target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._threads_alive() or self._sync_error is not None:
                    raise JournalError("the journal could not close its segment")
                self._flushed_cond.wait(min(remaining, 1.0))
        self.barrier(self.tables, max(0.1, deadline - time.monotonic()))
        self._retire()

    def unflushed(self, table: str) -> int:
        """How many rows of ``table`` are stored here but not yet in ClickHouse."""
        with self._lock:
            return self._unflushed.get(table, 0)

    def pending_rows(self, table: str) -> list[dict[str, Any]]:
        """Rows of ``table`` appended but not yet known to be in ClickHouse."""
        with self._lock:
            items = [*self._in_flight.get(table, ()), *self._pending.get(table, ())]
            return [row for _, rows in items for row in rows]

    def _threads_alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    # --- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush every row into ClickHouse, stop, and delete the segments (kept
        when a flush failed: the next start replays them)."""
        with self._lock:
            if not self._running:
                return
            self._stopping = True
            self._sync_cond.notify_all()
            self._flush_cond.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads = []
        with self._lock:
            self._running = False
            clean = self._watermark() > self._seq and not self._left_unflushed
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        if clean:
            for path in self._segments():
                path.unlink()
            self._fsync_dir()
            if self.remove_when_empty:
                with contextlib.suppress(OSError):
                    (self.directory / "LOCK").unlink()
                    self.directory.rmdir()
                    self.directory.parent.rmdir()
        self._unlock()
