"""The running agent: read, parse, redact, batch, spool, ship, checkpoint.

The composition root of the agent. One event loop does the work:

- the read loop discovers files, reads complete lines chunk by chunk (round
  robin over files), turns them into records (:class:`SourcePipeline`) and
  fills the open batch, closing it at ``max_wait``, ``max_records`` or
  ``max_bytes``;
- a closed batch is encoded (msgpack, zstd), appended to the spool (batches
  closed meanwhile share one fsync), and queued;
- ``max_in_flight`` ship workers deliver queued batches (:mod:`agent.shipper`);
- an acknowledged batch marks its file ranges done; a file's checkpoint
  advances over the done ranges in order, is written atomically, and only
  then are the covered batches removed from the spool.

Back-pressure: reading pauses while ``max_in_flight`` batches are unacknowledged
(or, with ``spool.max_bytes``, while the spool is full), so memory stays
bounded and the files on disk are the buffer. Rotated files stay open until
read to the end.

Open files: at most ``max_open_files`` at once; the rest wait (oldest first)
for a slot. A file read and acknowledged to its end that has not grown for
``close_inactive`` gives its slot up (its descriptor is closed, its identity
and offset kept) and is reopened when it grows or its turn comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
from operator import add
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from agent.checkpoint import CheckpointFile, CheckpointStore
from agent.config import AgentConfig, SourceConfig
from agent.deadletter import DeadLetterFile
from agent.metrics import AgentMetrics
from agent.multiline import ChunkEntries, MultilineJoiner, drop_trailing_blanks
from agent.parsers import (
    BACKSLASH_FORMATS,
    JOINED_FORMATS,
    MAX_SHIPPED_PATTERN,
    SHIPPED_FORMATS,
    LineParser,
    parse_shipped_lines,
)
from agent.redact import Redactor
from agent.shipper import Delivery, IngestResponse, Shipper, Stopped
from agent.spool import FileRange, Spool, SpooledBatch
from agent.tailer import Chunk, LostFile, Tailer, TrackedFile, excluded, glob_matches
from agent.watch import FileEvents, glob_base
from agent.wire import (
    MULTILINE_FEATURE,
    Batch,
    Lines,
    LinesMultiline,
    Record,
    decode_msgpack_batch,
    encode_batch,
    encode_batch_into,
    lines_feature,
)

log = logging.getLogger("logferry.agent")
T = TypeVar("T")
# Discoveries that file events ask for (a new file a glob matches, a parked
# file growing) are at least this far apart, and ten times as far as the last
# one took: a directory where names come and go fast costs a glob every 100
# ms at most, and discovery (globs, stats) at most a tenth of the loop's time.
_EVENT_DISCOVER_GAP = 0.1


# Directories watched for the globs with wildcards in their directories
# (beyond them, discovery every discover_interval finds their files).
MAX_GLOB_DIRS = 1024

# Until the collector first answers: the first batch's records at most, and
# the reads' size.
FIRST_BATCH_RECORDS = 1000
FIRST_READ_CHUNK = 64 * 1024


class RawRun:
    """Consecutive lines of one file, shipped as read (:class:`agent.wire.Lines`):
    ``data[lo:hi]``, ``count`` lines starting at file offset ``offset``.
    ``entries`` (multiline sources): the line numbers in the run where its
    entries start, the first 0; such a run splits only where an entry starts."""

    __slots__ = ("count", "data", "entries", "file", "hi", "lo", "offset", "pipeline", "read_at")

    def __init__(self, pipeline: SourcePipeline, data: bytes, lo: int, hi: int, offset: int, count: int,
                 file: str, read_at: float, entries: list[int] | None = None) -> None:
        self.pipeline = pipeline
        self.data = data
        self.lo = lo
        self.hi = hi
        self.offset = offset
        self.count = count
        self.file = file
        self.read_at = read_at
        self.entries = entries

    def split(self, lines: int) -> tuple[RawRun, RawRun]:
        """The first ``lines`` lines (0 < lines < count) and the rest."""
        data = self.data
        lo = self.lo
        # A line start near where the average line length puts the boundary,
        # the lines before it counted in C, then line by line to the boundary.
        near = data.rfind(b"\n", lo, lo + (self.hi - lo) * lines // self.count)
        pos = near + 1 if near >= 0 else lo
        before = data.count(b"\n", lo, pos)
        while before < lines:
            pos = data.find(b"\n", pos) + 1
            before += 1
        while before > lines:
            near = data.rfind(b"\n", lo, pos - 1)
            pos = near + 1 if near >= 0 else lo
            before -= 1
        entries = self.entries
        head = RawRun(self.pipeline, self.data, self.lo, pos, self.offset, lines, self.file, self.read_at,
                      None if entries is None else [e for e in entries if e < lines])
        tail = RawRun(self.pipeline, self.data, pos, self.hi, self.offset + pos - self.lo, self.count - lines,
                      self.file, self.read_at, None if entries is None else [e - lines for e in entries if e >= lines])
        return head, tail

    def entry_split(self, lines: int, at_least_one: bool) -> int:
        """Where a multiline run may split to hold at most ``lines`` lines: the
        last entry start within them, else 0, or (``at_least_one``) the end
        of the first entry, which is ``count`` when it is the only one."""
        entries = self.entries or [0]
        index = bisect_right(entries, lines) - 1
        if index > 0:
            return entries[index]
        if not at_least_one:
            return 0
        return entries[1] if len(entries) > 1 else self.count


Item = Record | RawRun


class SourcePipeline:
    """Lines of one source to redacted records, or to runs of lines shipped as
    read for the collector to parse (the sources in SHIPPED_FORMATS, once it says it
    can: lines where the redaction prefilter finds nothing need no parsing
    here, and parsing them once, there, costs the agent nothing)."""

    def __init__(self, cfg: SourceConfig, host: str, redactor: Redactor, metrics: AgentMetrics) -> None:
        self.cfg = cfg
        self.parser = LineParser(cfg, host)
        self.redactor = redactor
        self.metrics = metrics
        # Whether this source's lines can go as read (to a collector that names
        # the format, and lines:multiline for a multiline source): UTF-8 lines
        # whose records hold only text the raw lines' prefilter speaks for.
        self.can_ship_lines = (cfg.format in SHIPPED_FORMATS
                               and (cfg.multiline is None or self._multiline_shippable())
                               and cfg.encoding.replace("-", "").lower() in ("utf8", "utf_8")
                               and len(cfg.pattern or "") <= MAX_SHIPPED_PATTERN and not self._sensitive_groups())
        self.ship_lines = False
        self.shipped_multiline = None if cfg.multiline is None else LinesMultiline(
            cfg.multiline.mode, cfg.multiline.pattern, cfg.multiline.max_lines, int(cfg.multiline.max_bytes))
        # Whether a UUID that follows a quote or "=" in a line is whole in the
        # text of the record's fields, as in the line (see Redactor.hit_positions):
        # JSON strings and logfmt values are the bytes between their delimiters
        # (where they hold no backslash), and a plain line's text after its
        # timestamp and level is its message.
        self.uuid_tokens = cfg.format in ("json", "logfmt", "plain")
        # Whether a backslash in a line makes it a hit: syslog's structured data
        # is unescaped ('card="4111\\ 1111\\ …"' holds a card the raw line does not).
        self.backslash_hits = cfg.format in BACKSLASH_FORMATS
        self.tags = list(cfg.tags) or None
        self.fields = dict(cfg.fields) or None

    def _sensitive_groups(self) -> list[str]:
        """A regex source's groups whose values key-based redaction replaces
        whole: the line does not hold their names, so its prefilter cannot
        tell (fields renamed to record fields are not context keys)."""
        return [name for name in self.parser.regex_groups()
                if not self.parser.is_record_field(name) and self.redactor.is_sensitive_key(name)]

    def _multiline_shippable(self) -> bool:
        """Whether a multiline source's entries can go as read: the text of
        their records is then the lines' own (the first line's fields, and
        the rest joined by newlines as error_stack), so the raw lines'
        prefilter speaks for it. Not so when the first line can fill
        error_stack too (a regex group), which the rest is appended to."""
        if self.cfg.format == "plain":
            return True
        if self.cfg.format == "regex":
            return not set(self.parser.regex_groups()) & set(self.parser.field_keys("error_stack"))
        return False

    def joiner_for(self, tracked: Any) -> MultilineJoiner | None:
        if self.cfg.multiline is None:
            return None
        joiner = getattr(tracked, "joiner", None)
        if not isinstance(joiner, MultilineJoiner):
            joiner = MultilineJoiner(self.cfg.multiline)
            tracked.joiner = joiner
        return joiner

    def _settings_changed(self, tracked: Any, file: str | None) -> list[Record]:
        """The entry that a joiner with other settings (this source's before
        a reload) holds, as a record: it ends where the new settings (or none)
        take over. Kept, the joiner would join on with the old settings, and
        entries shipped as read would be joined again with the new ones."""
        joiner = getattr(tracked, "joiner", None)
        if not isinstance(joiner, MultilineJoiner) or joiner.cfg == self.cfg.multiline:
            return []
        tracked.joiner = None
        parse_entry = self.parser.parse_entry
        redact = self.redactor.redact_record
        return [redact(parse_entry(first, rest, start, file)) for first, rest, start, _ in joiner.flush()]

    def process(self, tracked: Any, chunk: Chunk, file: str | None, now: float) -> tuple[list[Item], int, int]:
        """Records (or runs of lines) of a chunk, the number of lines they
        hold, and the offset up to which they cover the file (less than
        ``chunk.end`` while a multiline entry is pending)."""
        ended = self._settings_changed(tracked, file)
        items, count, end = self._process(tracked, chunk, file, now)
        if ended:
            return [*ended, *items], count + len(ended), end
        return items, count, end

    def _process(self, tracked: Any, chunk: Chunk, file: str | None, now: float) -> tuple[list[Item], int, int]:
        if self.ship_lines and file is not None and not chunk.truncated and chunk.end > chunk.base \
                and chunk.data[chunk.end - chunk.base - 1] == 0x0A:  # not a last line without its newline
            if self.shipped_multiline is None:
                return self._runs(chunk, file)
            if not self.redactor.has_custom_rules or chunk.data.find(b"\r", 0, chunk.end - chunk.base) < 0:
                # A carriage return is cut from a line's end, so the joined
                # text is not the raw lines' ("a\r\n b" is "a\n b"): what a
                # custom rule finds across it the raw lines' prefilter cannot.
                return self._multiline_runs(tracked, chunk, file, now)
        self.metrics.lines_read += len(chunk.lines)
        self.metrics.bytes_read += chunk.end - chunk.base
        self.metrics.lines_truncated += chunk.truncated
        joiner = self.joiner_for(tracked)
        errors_before = self.parser.errors
        records: list[Record]
        if joiner is None:
            # The lines as read (unless long ones were cut): for the JSON parser and the redaction prefilter.
            body = chunk.body if chunk.end > chunk.base else b""
            records = self.parser.parse_lines(chunk.lines, chunk.starts, file,
                                              None if chunk.truncated else body)
            records = self._redact_hits(records, chunk, body)
            end = chunk.end
        else:
            parse_entry = self.parser.parse_entry
            redact = self.redactor.redact_record
            records = [redact(parse_entry(first, rest, start, file)) for first, rest, start, _
                       in joiner.feed_lines(chunk.lines, chunk.starts, chunk.end, self.parser.decode, now)]
            pending = joiner.pending_start
            end = chunk.end if pending is None else pending
        self.metrics.parse_errors += self.parser.errors - errors_before
        return records, len(records), end  # type: ignore[return-value]

    def _runs(self, chunk: Chunk, file: str) -> tuple[list[Item], int, int]:
        """The chunk as runs of lines shipped as read; a line the redaction
        prefilter hits is parsed and redacted here, as a record."""
        # The lines are data[:size]: the read's partial last line is left out
        # by bounds, not by a copy. Each byte is counted (newlines) once.
        body = chunk.data
        size = chunk.end - chunk.base
        self.metrics.bytes_read += size
        read_at = time.time()
        base = chunk.base
        redactor = self.redactor
        hits = redactor.hit_positions(body, size, json=self.uuid_tokens) if redactor.active else []
        if self.backslash_hits and redactor.active:
            hits = _with_backslash_lines(body, size, hits)
        if not hits:
            count = body.count(b"\n", 0, size)
            self.metrics.lines_read += count
            return [RawRun(self, body, 0, size, base, count, file, read_at)], count, chunk.end
        items: list[Item | None] = []
        slots: list[int] = []  # where each hit line's record goes in items
        rfind = body.rfind
        find = body.find
        newlines = body.count
        lo = 0
        count = len(hits)  # one line per hit, plus the lines of the runs between them
        hit_lines: list[bytes] = []
        hit_starts: list[int] = []
        for pos in hits:
            start = rfind(b"\n", 0, pos) + 1
            stop = find(b"\n", pos)
            if start > lo:
                n = newlines(b"\n", lo, start)
                count += n
                items.append(RawRun(self, body, lo, start, base + lo, n, file, read_at))
            slots.append(len(items))
            items.append(None)  # the record, below
            hit_lines.append(body[start:stop])
            hit_starts.append(base + start)
            lo = stop + 1
        if lo < size:
            n = newlines(b"\n", lo, size)
            count += n
            items.append(RawRun(self, body, lo, size, base + lo, n, file, read_at))
        self.metrics.lines_read += count
        errors_before = self.parser.errors
        records: list[Record | None] = self.parser.parse_lines(hit_lines, hit_starts, file)  # type: ignore[assignment]
        self.metrics.parse_errors += self.parser.errors - errors_before
        if len(records) != len(hit_lines):  # a hit on a blank line cannot be: keep it safe anyway
            by_start = {r.offset: r for r in records if r is not None}
            records = [by_start.get(start) for start in hit_starts]
        redact = redactor.redact_record
        missing = 0
        for slot, record in zip(slots, records, strict=True):
            if record is not None:
                items[slot] = redact(record)
            else:
                missing += 1
        if missing:
            count -= missing
            items = [item for item in items if item is not None]
        return items, count, chunk.end  # type: ignore[return-value]

    def _multiline_runs(self, tracked: Any, chunk: Chunk, file: str, now: float) -> tuple[list[Item], int, int]:
        """A multiline source's chunk: its lines joined by the file's joiner,
        the entries complete in the chunk with no prefilter hit in any of
        their lines as runs of lines shipped as read (each run starting where
        an entry does; the collector joins them again alike), the others
        (hits, and entries begun in an earlier chunk) parsed and redacted here."""
        joiner = self.joiner_for(tracked)
        assert joiner is not None
        body = chunk.data
        size = chunk.end - chunk.base
        base = chunk.base
        lines = chunk.lines
        starts = chunk.starts
        self.metrics.bytes_read += size
        self.metrics.lines_read += len(lines)
        read_at = time.time()
        redactor = self.redactor
        if self.parser.utf8:
            joined = joiner.feed_chunk(body, size, lines, starts, chunk.end, self.parser.decode, now)
            if joined is not None:
                return self._chunk_entries(joined, joiner, chunk, file, read_at)
        rfind = body.rfind
        hit_lines = sorted({base + rfind(b"\n", 0, pos) + 1
                            for pos in redactor.hit_positions(body, size, json=self.uuid_tokens)}) \
            if redactor.active else []
        parse_entry = self.parser.parse_entry
        redact = redactor.redact_record
        errors_before = self.parser.errors
        items: list[Item] = []
        count = 0
        run_first = -1  # line number (in the chunk) where the open run starts
        run_end = 0  # its end (file offset)
        entries: list[int] = []

        def close_run() -> None:
            nonlocal count, run_first
            if run_first < 0:
                return
            stop = bisect_left(starts, run_end)  # the line after the run
            n = stop - run_first
            items.append(RawRun(self, body, starts[run_first] - base, run_end - base, starts[run_first], n, file,
                                read_at, entries.copy()))
            count += n
            run_first = -1
            entries.clear()

        for first, rest, start, end in joiner.feed_lines(lines, starts, chunk.end, self.parser.decode, now):
            hit = bisect_left(hit_lines, start)
            if start < base or (hit < len(hit_lines) and hit_lines[hit] < end):
                close_run()
                items.append(redact(parse_entry(first, rest, start, file)))
                count += 1
                continue
            at = bisect_left(starts, start)
            if run_first < 0:
                run_first = at
            entries.append(at - run_first)
            run_end = end
        close_run()
        self.metrics.parse_errors += self.parser.errors - errors_before
        pending = joiner.pending_start
        return items, count, chunk.end if pending is None else pending

    def _chunk_entries(self, joined: ChunkEntries, joiner: MultilineJoiner, chunk: Chunk, file: str,
                       read_at: float) -> tuple[list[Item], int, int]:
        """:meth:`_multiline_runs` from what :meth:`MultilineJoiner.feed_chunk`
        found: the entries it gives as text are records; of those it gives by
        line number, each with a prefilter hit in one of its lines is a
        record, the others are runs of lines shipped as read, split where a
        record comes between them."""
        body = chunk.data
        base = chunk.base
        lines = chunk.lines
        starts = chunk.starts
        parser = self.parser
        parse_entry = parser.parse_entry
        redact = self.redactor.redact_record
        errors_before = parser.errors
        items: list[Item] = [redact(parse_entry(first, rest, start, file)) for first, rest, start, _ in joined.before]
        count = len(items)
        entry_starts = joined.starts
        if entry_starts:
            stop = joined.stop
            # The entries (by their index in entry_starts) with a prefilter hit in one of their lines.
            low, high = starts[entry_starts[0]] - base, starts[stop] - base
            hit_entries = sorted({bisect_right(entry_starts, bisect_right(starts, base + pos) - 1) - 1
                                  for pos in self.redactor.hit_positions(body, high, json=self.uuid_tokens)
                                  if pos >= low}) \
                if self.redactor.active else []
            decode = parser.decode
            run_from = 0  # the first entry of the next run
            for k in (*hit_entries, len(entry_starts)):
                if k > run_from:
                    line, line_stop = entry_starts[run_from], entry_starts[k] if k < len(entry_starts) else stop
                    n = line_stop - line
                    items.append(RawRun(self, body, starts[line] - base, starts[line_stop] - base, starts[line], n,
                                        file, read_at, [e - line for e in entry_starts[run_from:k]]))
                    count += n
                if k < len(entry_starts):
                    line, line_stop = entry_starts[k], entry_starts[k + 1] if k + 1 < len(entry_starts) else stop
                    rest = [decode(text) for text in lines[line + 1:line_stop]]
                    drop_trailing_blanks(rest)
                    items.append(redact(parse_entry(decode(lines[line]), rest, starts[line], file)))
                    count += 1
                run_from = k + 1
        items += [redact(parse_entry(first, rest, start, file)) for first, rest, start, _ in joined.after]
        count += len(joined.after)
        self.metrics.parse_errors += parser.errors - errors_before
        pending = joiner.pending_start
        return items, count, chunk.end if pending is None else pending

    def _redact_hits(self, records: list[Record], chunk: Chunk, body: bytes) -> list[Record]:
        redactor = self.redactor
        if not redactor.active:
            return records
        if self.cfg.format in JOINED_FORMATS:
            # Their records join text of the line (see SHIPPED_FORMATS): the
            # raw line's verdict does not cover them, each record is looked at.
            return [redactor.redact_record(r) for r in records]
        hits = redactor.hit_positions(body, json=self.uuid_tokens) if body else []
        if self.backslash_hits and body:
            hits = _with_backslash_lines(body, len(body), hits)
        if not hits:
            return records
        base = chunk.base
        starts = chunk.starts
        if len(records) == len(starts):
            # One record per line: the line a hit falls in is the record's index.
            for i in sorted({bisect_right(starts, base + pos) - 1 for pos in hits}):
                records[i] = redactor.redact_record(records[i])
        else:
            hit_offsets = {starts[bisect_right(starts, base + pos) - 1] for pos in hits}
            for i, record in enumerate(records):
                if record.offset in hit_offsets:
                    records[i] = redactor.redact_record(record)
        return records

    def flush(self, tracked: Any, file: str | None) -> list[Record]:
        """The pending multiline entry, as a record."""
        ended = self._settings_changed(tracked, file)
        joiner = self.joiner_for(tracked)
        if joiner is None:
            return ended
        entries = joiner.flush()
        records = [self.parser.parse_entry(first, rest, start, file) for first, rest, start, _ in entries]
        return ended + [self.redactor.redact_record(r) for r in records]


class _Marker:
    """One batch's share of one file: lines up to ``end``."""

    __slots__ = ("batch", "done", "end")

    def __init__(self, end: int, batch: PendingBatch) -> None:
        self.end = end
        self.done = False
        self.batch = batch


class PendingBatch:
    """A spooled batch not yet acknowledged, or acknowledged but not yet
    covered by the checkpoint."""

    __slots__ = ("batch_id", "body", "content_encoding", "lines", "markers", "raw_bytes", "records", "seq",
                 "uncommitted")

    def __init__(self, spooled: SpooledBatch, keep_body: bool) -> None:
        self.seq = spooled.seq
        self.batch_id = spooled.batch_id
        self.records = spooled.records
        self.lines = spooled.lines
        self.raw_bytes = spooled.raw_bytes
        self.content_encoding = spooled.content_encoding
        self.body: bytes | None = spooled.body if keep_body else None
        self.markers: list[tuple[str, _Marker]] = []
        self.uncommitted = 0


def _with_backslash_lines(data: bytes, end: int, hits: list[int]) -> list[int]:
    """``hits`` (sorted positions in ``data[:end]``, one a line) with the first
    backslash of each line holding one added: sorted, one position a line."""
    find = data.find
    extra = []
    pos = find(b"\\", 0, end)
    while pos >= 0:
        extra.append(pos)
        newline = find(b"\n", pos, end)
        if newline < 0:
            break
        pos = find(b"\\", newline + 1, end)
    if not extra:
        return hits
    merged: list[int] = []
    line_end = -1  # the newline ending the line of the last position kept
    for pos in sorted(hits + extra):
        if pos > line_end:
            merged.append(pos)
            line_end = find(b"\n", pos, end)
            if line_end < 0:
                line_end = end
    return merged


class _OpenBatch:
    __slots__ = ("count", "items", "opened", "ranges", "raw_bytes")

    def __init__(self, now: float) -> None:
        self.items: list[Item] = []
        self.count = 0  # lines: a record is one, a run of lines its count
        self.ranges: dict[str, int] = {}
        self.raw_bytes = 0
        self.opened = now


def _split_items(items: Sequence[Item], lines: int) -> tuple[Sequence[Item], Sequence[Item], int]:
    """The items holding the first ``lines`` lines (a run is split if need
    be), the rest, and the number of lines of the first part."""
    taken = 0
    for i, item in enumerate(items):
        n = item.count if type(item) is RawRun else 1
        if taken + n > lines:
            if type(item) is RawRun and item.entries is not None:
                # A multiline run splits where an entry starts; a batch that
                # holds nothing yet takes a whole entry, however long.
                at = item.entry_split(lines - taken, at_least_one=not taken and not i)
                if at == item.count:
                    return [*items[:i], item], items[i + 1:], taken + at
                if at:
                    head, tail = item.split(at)
                    return [*items[:i], head], [tail, *items[i + 1:]], taken + at
                return items[:i], items[i:], taken
            if type(item) is RawRun and lines > taken:
                head, tail = item.split(lines - taken)
                return [*items[:i], head], [tail, *items[i + 1:]], lines
            return items[:i], items[i:], taken
        taken += n
    return items, [], taken


# How the collector rejects every line of a group whose settings it refuses
# (agent.parsers.parse_shipped_lines, collector.ingest.add_shipped_lines).
_GROUP_ERRORS = ("lines.", "lines:")


def _is_group_error(item: dict[str, Any]) -> bool:
    return str(item.get("error", "")).startswith(_GROUP_ERRORS)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _wire_items(items: list[Item]) -> tuple[list[Record], list[Lines]]:
    """A batch's records, and its runs of lines as :class:`Lines`. A run that
    continues the previous one in the same read is joined to it; the lines
    are views of what was read, not copies."""
    records: list[Record] = []
    lines: list[Lines] = []
    last: RawRun | None = None
    hi = 0

    def close(run: RawRun, hi: int) -> None:
        p = run.pipeline
        whole = run.lo == 0 and hi == len(run.data)
        data: Any = run.data if whole else memoryview(run.data)[run.lo:hi]
        offset = time.localtime(run.read_at).tm_gmtoff if p.cfg.format == "syslog" else None
        lines.append(Lines(p.cfg.source, data, run.read_at, p.cfg.format, run.file, run.offset, p.tags, p.fields,
                           offset, p.cfg.pattern, p.shipped_multiline if run.entries is not None else None))

    for item in items:
        if type(item) is not RawRun:
            records.append(item)  # type: ignore[arg-type]
            continue
        if last is not None and item.data is last.data and item.lo == hi and item.pipeline is last.pipeline \
                and (item.entries is None) == (last.entries is None):
            hi = item.hi
            continue
        if last is not None:
            close(last, hi)
        last, hi = item, item.hi
    if last is not None:
        close(last, hi)
    return records, lines


class Agent:
    """Runs until :meth:`request_stop`; see the module docstring."""

    def __init__(self, cfg: AgentConfig, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.host = cfg.host or socket.gethostname()
        self.state_dir = Path(cfg.state_dir)
        self.metrics = AgentMetrics()
        self.redactor = Redactor.from_config(cfg.redact)
        self.metrics.redactions = lambda: dict(self.redactor.counts)
        self.metrics.file_lag = self._file_lag
        self.pipelines = [SourcePipeline(s, self.host, self.redactor, self.metrics) for s in cfg.sources]
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._reload_requested = False
        self._open: _OpenBatch | None = None
        self._queue: deque[PendingBatch] = deque()
        self._queued = asyncio.Event()
        self._unacked = 0
        self._pending_by_file: dict[str, deque[_Marker]] = {}
        self._removable: list[PendingBatch] = []
        self._dirty_set = asyncio.Event()  # wakes the commit loop (see _dirty)
        self._dirty = False
        self._committed = asyncio.Event()
        self._lock_fd: int | None = None
        self._spooling: set[asyncio.Task[None]] = set()
        self._to_spool: list[tuple[SpooledBatch, PendingBatch]] = []
        self._durable_waiters: dict[int, asyncio.Future[None]] = {}  # spool seq -> set once written
        self._spool_writing = False
        self._dead_letter_lock = asyncio.Lock()
        # File events (agent.watch): None while polling.
        self._events: FileEvents | None = None
        self._events_complete = False  # every directory read from is watched
        self._events_failed: set[str] = set()  # directories warned about
        self._open_paths: frozenset[str] = frozenset()  # where the open files are now (symlinks resolved)
        self._discover_soon = False  # an event named a file a source's glob matches
        self._discover_gap = _EVENT_DISCOVER_GAP  # see _EVENT_DISCOVER_GAP
        self._queued_paths: frozenset[str] = frozenset()  # files waiting for a slot: their growth needs no discovery
        # Directories under a glob's base that the glob can match files in (_watch_new_dirs).
        self._glob_dirs_watched: set[str] = set()
        # File id -> (its state, where it is open, its directory), for _watch_dirs.
        self._located: dict[str, tuple[tuple[Any, ...], str | None, str]] = {}
        # Bytes of closed batches not yet written to the spool, and the largest
        # batch body so far: spool.max_bytes holds only while reading stops
        # before one more batch could take the spool past it.
        self._spool_reserved = 0
        self._spool_sizes: dict[int, int] = {}
        self._largest_body = 0
        self._commit_lock = threading.Lock()
        self._compress: Any = None
        self._encode_buffer = bytearray()
        self.content_encoding = "identity"
        self.exit_code = 0
        # Whether the collector said it parses lines shipped as read: until it
        # does, every line goes as a record.
        self._lines_known = False
        self._lines_features: frozenset[str] = frozenset()  # what the collector said it parses (lines_feature)
        self._answered = False

    # --- setup -----------------------------------------------------------------

    def _lock_state_dir(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another agent is running with state_dir {self.state_dir}") from None
        self._lock_fd = fd

    def _setup_compression(self) -> None:
        kind = self.cfg.collector.compression
        if kind == "zstd":
            import zstandard

            level = self.cfg.collector.zstd_level
            if level == 1:
                # Level 1 with a 16 KiB match table (hash_log 12, as zstd itself
                # uses for small inputs) and 6-byte matches: on JSON, access-log
                # and syslog-style data, ~10% less CPU than level 1's parameters
                # for a 1 MiB batch and the same or a better ratio
                # (bench_agent's file: 4.74 vs 4.67; text that is not logs,
                # such as source code, compresses ~5% less).
                params = zstandard.ZstdCompressionParameters.from_level(1, hash_log=12, min_match=6)
                compressor = zstandard.ZstdCompressor(compression_params=params)
            else:
                compressor = zstandard.ZstdCompressor(level=level)
            compress = compressor.compress

            def compress_exact(data: Any) -> bytes:
                # python-zstandard allocates its result at ZSTD_compressBound
                # (a little over the input's size) and only shrinks its length:
                # each body kept in flight or queued would pin ~5x its bytes (a
                # 1 MiB batch compresses to ~220 KB and held 1 MiB). A copy of
                # the exact size costs ~20 µs a batch.
                return memoryview(compress(data)).tobytes()

            self._compress = compress_exact
            self.content_encoding = "zstd"
        elif kind == "gzip":
            import gzip

            self._compress = lambda data: gzip.compress(data, compresslevel=1)
            self.content_encoding = "gzip"
        else:
            self._compress = bytes
            self.content_encoding = "identity"

    def _restore(self) -> None:
        self.store = CheckpointStore(self.state_dir)
        saved = self.store.load()
        self.state = saved or CheckpointFile(agent_id=str(uuid.uuid4()))
        if not self.state.agent_id:
            self.state.agent_id = str(uuid.uuid4())
        self.spool = Spool(self.state_dir / "spool", sync=self.cfg.spool.sync)
        self.tailer = Tailer(self.cfg.sources, saved, self.cfg.read_chunk, self.cfg.max_open_files)
        self._resume_at: dict[str, int] = {}
        for spooled in self.spool.load():
            pending = PendingBatch(spooled, keep_body=False)
            for file_range in spooled.ranges:
                marker = _Marker(file_range.end, pending)
                pending.markers.append((file_range.file_id, marker))
                pending.uncommitted += 1
                self._pending_by_file.setdefault(file_range.file_id, deque()).append(marker)
                self._resume_at[file_range.file_id] = max(self._resume_at.get(file_range.file_id, 0),
                                                          file_range.end)
            self._queue.append(pending)
            self._unacked += 1
        if self._queue:
            log.info("re-sending %d spooled batches", len(self._queue))
            self._queued.set()
        if saved is None:
            self.store.save(self.state)

    # --- files -------------------------------------------------------------------

    def _file_lag(self) -> list[tuple[str, str, int]]:
        """(source, path, bytes not yet acknowledged) of every file being read
        or waiting for a descriptor (``max_open_files``)."""
        out = []
        sources = self.cfg.sources

        def name(index: int) -> str:
            return sources[index].source if index < len(sources) else ""

        for tracked in self.tailer.files.values():
            if tracked.closed or tracked.parked:
                continue
            out.append((name(tracked.source_index), tracked.path, max(0, tracked.size - tracked.acked)))
        saved = {(e.dev, e.ino): e.offset for e in self.tailer.saved.values()}
        for key, item in list(self.tailer.waiting.items()):
            try:
                st = os.stat(item.path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != key:
                continue  # renamed meanwhile: its size is not known until it is opened
            if item.tracked is not None:
                done = item.tracked.acked
            elif item.start_end is not None:
                done = item.start_end
            else:
                done = saved.get(key, 0)
            out.append((name(item.source_index), item.path, max(0, st.st_size - done)))
        return out

    def _adopt(self, tracked: TrackedFile) -> None:
        resume = self._resume_at.pop(tracked.id, None)
        if resume is not None and resume > tracked.pos:
            tracked.pos = resume
        tracked.pipeline = self.pipelines[tracked.source_index]  # type: ignore[attr-defined]
        self._pending_by_file.setdefault(tracked.id, deque())
        self._dirty = True
        if tracked.reopens:
            return  # a parked file reopened: its id is in the checkpoint already
        # A new file's id is random: it must be in the checkpoint before any of
        # its lines can be spooled, or after a kill -9 the restarted agent would
        # give the file a new id, miss the spooled batches' resume points, and
        # read the file again from 0 into new batches (duplicates).
        self.commit()

    def _discover(self, now: float) -> None:
        for tracked in self.tailer.discover(now):
            self._adopt(tracked)
        self._drop_forgotten()
        if self.tailer.lost:
            lost, self.tailer.lost = self.tailer.lost, []
            for item in lost:
                self._report_lost(item)
            self._dirty = True
        for tracked in list(self.tailer.files.values()):
            if tracked.closed:
                if not self._pending_by_file.get(tracked.id) and self._gone(tracked):
                    self.tailer.forget(tracked)
                    self._pending_by_file.pop(tracked.id, None)
                    self._dirty = True
                continue
            if not tracked.unmatched and tracked.source_index < len(self.pipelines):
                tracked.pipeline = self.pipelines[tracked.source_index]  # type: ignore[attr-defined]
        self._count_files()

    # --- file events ----------------------------------------------------------------

    def _start_file_events(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.cfg.file_events or all(s.path == "-" for s in self.cfg.sources):
            return
        try:
            events = FileEvents()
        except OSError as exc:
            log.warning("file events unavailable (%s): checking files every %s", exc.strerror or exc,
                        self.cfg.poll_interval)
            return
        loop.add_reader(events.fd, self._on_file_events)
        self._events = events
        self._watch_new_dirs([base for base, _ in self._glob_dirs()])
        self._watch_dirs()

    def _stop_file_events(self) -> None:
        if self._events is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._events.fd)
            self._events.close()
            self._events = None

    def _watch_dirs(self) -> None:
        """Watch the directories of the files read (where they are now: after
        a rename, through a symlink) and of the sources' globs; after each discovery."""
        events = self._events
        if events is None:
            return
        dirs = set()
        for source in self.cfg.sources:
            if source.path != "-":
                base = glob_base(source.path)
                if os.path.isdir(base):
                    dirs.add(base)
        self._glob_dirs_watched = {d for d in self._glob_dirs_watched if os.path.isdir(d)}
        dirs |= self._glob_dirs_watched
        open_paths = set()
        located = self._located
        self._located = {}
        for tracked in self.tailer.files.values():
            if tracked.closed:
                continue
            # Where the file is now: asked of the kernel again only when its
            # path, descriptor or state changed (a discovery sees renames and deletions).
            key = (tracked.path, tracked.fd, tracked.parked, tracked.rotated, tracked.deleted)
            known = located.get(tracked.id)
            if known is None or known[0] != key:
                where = None
                if not tracked.parked:
                    with contextlib.suppress(OSError):
                        where = os.readlink(f"/proc/self/fd/{tracked.fd}").removesuffix(" (deleted)")
                known = (key, where, os.path.dirname(where or os.path.realpath(tracked.path)))
            self._located[tracked.id] = known
            if known[1] is not None:
                open_paths.add(known[1])
            dirs.add(known[2])
        queued = {os.path.realpath(waiting.path) for waiting in self.tailer.waiting.values()}
        dirs.update(os.path.dirname(path) for path in queued)
        self._open_paths = frozenset(open_paths)
        self._queued_paths = frozenset(queued)
        failed = events.watch(dirs)
        self._events_complete = not failed
        for directory, reason in failed:
            if directory not in self._events_failed:
                self._events_failed.add(directory)
                log.warning("cannot watch %s for file events (%s): checking files every %s", directory, reason,
                            self.cfg.poll_interval)

    def _on_file_events(self) -> None:
        """The event queue is readable: wake the read loop for a file being
        read, and have it discover soon for a file one of the globs matches."""
        events = self._events
        if events is None:
            return
        try:
            changed = events.read()
        except OSError as exc:
            log.warning("file events failed (%s): checking files every %s", exc, self.cfg.poll_interval)
            self._stop_file_events()
            self._wake.set()
            return
        wake = False
        open_paths = self._open_paths
        queued = self._queued_paths
        for path in changed.modified:
            if path in open_paths:
                wake = True
            elif path not in queued and self._globbed(path):
                self._discover_soon = wake = True
        if changed.dirs and self._watch_new_dirs(changed.dirs):
            self._watch_dirs()
        if changed.overflow or changed.dirs or any(p in open_paths or self._globbed(p) for p in changed.named):
            self._discover_soon = wake = True
        if wake:
            self._wake.set()

    def _glob_dirs(self) -> list[tuple[str, int | None]]:
        """The sources' globs with a wildcard in their directories
        (``logs/**/*.log``, ``/srv/*/app.log``): each one's base directory
        and how deep under it a directory can hold files it matches (None: any
        depth, for ``**``)."""
        out = []
        for source in self.cfg.sources:
            if source.path == "-":
                continue
            base = glob_base(source.path)
            folder = os.path.dirname(os.path.abspath(os.path.expanduser(source.path)))
            if folder == base:
                continue
            below = os.path.relpath(folder, base).split(os.sep)
            out.append((base, None if "**" in below else len(below)))
        return out

    def _watch_new_dirs(self, created: Iterable[str]) -> bool:
        """Of ``created`` (directories that appeared, or that were there at the
        start), those a glob with a wildcard in its directories can find
        files in are watched from now on, with the directories already in
        them (``mkdir -p``), up to MAX_GLOB_DIRS: a file then created there is
        found on its event, not at the next discovery. Whether any was added."""
        globs = self._glob_dirs()
        added = False
        for directory in created:
            for base, depth in globs:
                prefix = base.rstrip(os.sep) + os.sep
                if directory != base and not directory.startswith(prefix):
                    continue
                for found, subdirs, _ in os.walk(directory):
                    level = 0 if found == base else found[len(prefix):].count(os.sep) + 1
                    if depth is not None and level >= depth:
                        subdirs.clear()  # files deeper down are not this glob's
                        if level > depth:
                            continue
                    if found == base or found in self._glob_dirs_watched:
                        continue
                    if len(self._glob_dirs_watched) >= MAX_GLOB_DIRS:
                        log.debug("%d directories watched for globs already: %s is left to discovery",
                                  MAX_GLOB_DIRS, found)
                        return added
                    self._glob_dirs_watched.add(found)
                    added = True
        return added

    def _globbed(self, path: str) -> bool:
        return any(s.path != "-" and glob_matches(s.path, path) and not excluded(path, s.exclude)
                   for s in self.cfg.sources)

    def _idle_timeout(self, now: float, next_discover: float, last_discover: float) -> float:
        """How long the read loop may wait for a wake-up when nothing was read."""
        poll = float(self.cfg.poll_interval)
        if self._events is None or not self._events_complete:
            timeout = poll
        else:
            # Events wake it; discovery (every discover_interval) is the net.
            timeout = max(0.0, next_discover - now)
            if self._discover_soon:
                timeout = min(timeout, max(0.0, last_discover + self._discover_gap - now))
            if any(p.cfg.multiline is not None for p in self.pipelines):
                for tracked in self.tailer.files.values():
                    joiner = getattr(tracked, "joiner", None)
                    if isinstance(joiner, MultilineJoiner) and joiner.pending_start is not None:
                        timeout = min(timeout, max(0.0, joiner.last_line_at + joiner.cfg.timeout - now))
        if self._open is not None:
            timeout = min(timeout, max(0.0, self._open.opened + self.cfg.batch.max_wait - now))
        return timeout

    def _count_files(self) -> None:
        self.metrics.files_open = self.tailer.open_count()
        self.metrics.files_waiting = len(self.tailer.waiting)

    def _drop_forgotten(self) -> None:
        if self.tailer.dropped:
            dropped, self.tailer.dropped = self.tailer.dropped, []
            for tracked in dropped:
                self._pending_by_file.pop(tracked.id, None)
            self._dirty = True

    def _fill(self, now: float) -> None:
        """Give free slots to waiting files (after files were released or closed as inactive)."""
        if not self.tailer.waiting:
            return
        for tracked in self.tailer.fill(now):
            self._adopt(tracked)
        self._drop_forgotten()
        self._count_files()

    def _parkable(self, tracked: TrackedFile, read_to_end: bool = True) -> bool:
        """Whether an open file may give up its descriptor: everything read of it
        is acknowledged (and, with ``read_to_end``, it is read to its end),
        nothing pending, and not rotated away (a rotated file is read to its end
        and released instead)."""
        if tracked.rotated or tracked.deleted or tracked.unmatched or tracked.carry is not None \
                or tracked.skipping:
            return False
        if (read_to_end and tracked.pos < tracked.size) or tracked.acked < tracked.pos \
                or self._pending_by_file.get(tracked.id):
            return False
        joiner = getattr(tracked, "joiner", None)
        return not (isinstance(joiner, MultilineJoiner) and joiner.pending_start is not None)

    def _inactive(self, tracked: TrackedFile, now: float) -> bool:
        """close_inactive: read and acknowledged to its end, and idle."""
        return now - tracked.last_growth >= self.cfg.close_inactive and self._parkable(tracked)

    def _yielding(self, tracked: TrackedFile, now: float) -> bool:
        """Whether an open file stops reading to give its slot to a waiting one
        (it had it for ``file_turn``); rotated files are read to their end first."""
        if not tracked.yielding and self.tailer.waiting and now - tracked.opened_at >= self.cfg.file_turn \
                and not (tracked.rotated or tracked.deleted or tracked.unmatched):
            tracked.yielding = True
        return tracked.yielding

    def _report_lost(self, item: LostFile) -> None:
        """One warning line per checkpointed file whose unread tail is gone:
        which file, why, and how many bytes the agent knows it had not read
        (lines appended after the agent's last look at the file cannot be counted)."""
        entry = item.entry
        spooled = self._resume_at.get(item.file_id, 0)  # read and spooled: re-sent, not lost
        done = max(entry.offset, spooled)
        unread = str(max(0, entry.size - done)) if entry.size >= 0 else "unknown"
        self.metrics.files_lost += 1
        log.warning("unread lines lost: path=%s source=%s reason=%s read_up_to=%d last_seen_size=%s "
                    "unread_bytes_at_least=%s (bytes written after the agent last saw the file are not counted)",
                    msgspec.json.encode(entry.path).decode(), msgspec.json.encode(entry.source).decode(),
                    msgspec.json.encode(item.reason).decode(), done,
                    entry.size if entry.size >= 0 else "unknown", unread)

    @staticmethod
    def _gone(tracked: TrackedFile) -> bool:
        try:
            st = os.stat(tracked.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != (tracked.dev, tracked.ino)

    def _finished(self, tracked: TrackedFile, now: float) -> bool:
        gone = tracked.rotated or tracked.deleted or tracked.unmatched
        return gone and tracked.carry is None and tracked.pos >= tracked.size \
            and now - tracked.last_growth >= self.cfg.release_after

    def _has_room(self) -> bool:
        # One batch at a time until the collector first answers: whether it
        # parses lines shipped as read decides how the rest is shipped.
        if self._unacked < (self.cfg.collector.max_in_flight if self._answered else 1):
            return True
        limit = self.cfg.spool.max_bytes
        # Room for another batch as large as the largest so far (the next one
        # is closed before the spool's size is checked again).
        return bool(limit) and self.spool.used_bytes + self._spool_reserved + self._largest_body <= limit

    def _read_files(self, now: float) -> bool:
        """One round over the open files; whether anything was read."""
        progressed = False
        max_records = self.cfg.batch.max_records
        self.tailer.read_chunk = self.cfg.read_chunk
        first = not self._answered and not self._unacked
        if first:
            # The first batch is small: until the collector first answers, the
            # lines are parsed here as records (its answer says whether it
            # parses lines shipped as read), which costs 10-35 µs a line for
            # most formats, and nothing else is sent meanwhile. The round ends
            # when it closes: batches a spool with room takes while the answer
            # is awaited (an outage) are of full size, records either way.
            max_records = min(max_records, FIRST_BATCH_RECORDS)
            self.tailer.read_chunk = min(self.cfg.read_chunk, FIRST_READ_CHUNK)
        parked = False
        for tracked in list(self.tailer.files.values()):
            if first and self._unacked:
                break
            if tracked.closed or tracked.parked:
                continue
            pipeline: SourcePipeline = tracked.pipeline  # type: ignore[attr-defined]
            if not self._has_room():
                break
            if tracked.carry is None and self.tailer.check_truncation(tracked):
                # What was read of the old content goes out under the old id.
                self._add(pipeline.flush(tracked, tracked.path), tracked.id, tracked.pos, 0, now, max_records)
                tracked = self.tailer.renew(tracked)
                self._adopt(tracked)
            if tracked.carry is not None:
                items, end, raw, count = tracked.carry
                tracked.carry = None
                self._add(items, tracked.id, end, raw, now, max_records, tracked, count)
                progressed = True
            yielding = self._yielding(tracked, now)
            budget = 0 if yielding else 8  # chunks per file per round, so one busy file cannot starve the rest
            while budget and self._has_room() and tracked.carry is None and not (first and self._unacked):
                budget -= 1
                chunk = self.tailer.read(tracked, pipeline.cfg.max_line)
                if chunk is None:
                    break
                progressed = True
                tracked.last_growth = now
                items, count, end = pipeline.process(tracked, chunk, tracked.path, now)
                self._add(items, tracked.id, end, chunk.end - chunk.base, now, max_records, tracked, count)
            joiner = getattr(tracked, "joiner", None)
            if isinstance(joiner, MultilineJoiner) and joiner.due(now):
                self._add(pipeline.flush(tracked, tracked.path), tracked.id, tracked.pos, 0, now, max_records)
            if self._finished(tracked, now):
                chunk = self.tailer.read_partial(tracked)
                if chunk is not None:
                    items, count, end = pipeline.process(tracked, chunk, tracked.path, now)
                    self._add(items, tracked.id, end, len(chunk.data), now, max_records, None, count)
                self._add(pipeline.flush(tracked, tracked.path), tracked.id, tracked.pos, 0, now, max_records)
                self.tailer.release(tracked)
                parked = True
            elif self._inactive(tracked, now) or (yielding and self._parkable(tracked, read_to_end=False)):
                if yielding:
                    log.debug("%s gives its slot to a waiting file at byte %d", tracked.path, tracked.pos)
                self.tailer.park(tracked)
                parked = True
        if parked:
            self._count_files()
        return progressed

    # --- batches ------------------------------------------------------------------

    def _add(self, items: Sequence[Item], file_id: str | None, end: int | None, raw_bytes: int, now: float,
             max_records: int, tracked: TrackedFile | None = None, count: int | None = None) -> None:
        """Put records (and runs of lines) into the open batch, closing it
        whenever it is full. ``end``: the file offset they cover up to;
        ``count``: the lines they hold (``len(items)`` when all are records)."""
        max_bytes = self.cfg.batch.max_bytes
        if count is None:
            count = len(items)
        per_record = raw_bytes / count if count else 0
        while True:
            batch = self._open
            if batch is None:
                if not items:
                    if file_id is not None and end is not None and file_id in self._pending_by_file:
                        # Nothing to send (blank lines, a pending multiline entry)
                        # but the offset may still move: ride on the next batch.
                        batch = self._open = _OpenBatch(now)
                    else:
                        return
                else:
                    batch = self._open = _OpenBatch(now)
            room = max_records - batch.count
            if per_record:
                room = min(room, max(1, int((max_bytes - batch.raw_bytes) / per_record)))
            if count <= room:
                batch.items.extend(items)
                batch.count += count
                batch.raw_bytes += int(per_record * count) if count else raw_bytes
                if file_id is not None and end is not None:
                    batch.ranges[file_id] = end
                if batch.count >= max_records or batch.raw_bytes >= max_bytes:
                    self._close_batch()
                return
            if count == len(items):  # one line an item
                head, items, taken = items[:room], items[room:], room
            else:
                head, items, taken = _split_items(items, room)
            count -= taken
            batch.items.extend(head)
            batch.count += taken
            batch.raw_bytes += int(per_record * taken)
            if not items:  # a multiline run's one entry, longer than the room left, went whole
                if file_id is not None and end is not None:
                    batch.ranges[file_id] = end
                self._close_batch()
                return
            next_start = items[0].offset
            if file_id is not None and next_start is not None:
                batch.ranges[file_id] = next_start
            self._close_batch()
            if tracked is not None and not self._has_room():
                # Back-pressure inside a chunk: the rest waits on the file
                # (at most one chunk per file) until there is room.
                tracked.carry = (items, end, int(per_record * count), count)
                return

    def _close_batch(self) -> None:
        batch = self._open
        self._open = None
        if batch is None or (not batch.items and not batch.ranges):
            return
        if not batch.items:
            # Only offsets moved (blank lines): nothing to ship, advance directly.
            self._advance_without_batch(batch.ranges)
            return
        batch_id = str(uuid.uuid4())
        records, lines = _wire_items(batch.items)
        shipped_lines = batch.count - len(records) if lines else 0
        # Records the collector makes: a line each, but an entry each for multiline runs.
        record_count = batch.count - sum(item.count - len(item.entries) for item in batch.items
                                         if type(item) is RawRun and item.entries is not None)
        buffer = self._encode_buffer
        encode_batch_into(Batch(self.state.agent_id, batch_id, self.host, records, lines=lines,
                                redacted_with=self.redactor.fingerprint), buffer)
        with memoryview(buffer) as view:
            body = self._compress(view)
        self._enqueue(batch_id, record_count, batch.raw_bytes, batch.ranges, body, shipped_lines)

    def _enqueue(self, batch_id: str, records: int, raw_bytes: int, ranges: dict[str, int], body: bytes,
                 shipped_lines: int) -> SpooledBatch:
        """Spool an encoded batch (off the loop, grouped with others) and
        queue it for sending once it is durable."""
        spooled = SpooledBatch(self.spool.next_seq(), batch_id, records, raw_bytes,
                               [FileRange(fid, end) for fid, end in ranges.items()], time.time(),
                               self.content_encoding, body, shipped_lines)
        pending = PendingBatch(spooled, keep_body=True)
        for file_id, end in ranges.items():
            marker = _Marker(end, pending)
            pending.markers.append((file_id, marker))
            pending.uncommitted += 1
            self._pending_by_file.setdefault(file_id, deque()).append(marker)
        self._unacked += 1
        self.metrics.batches_pending = self._unacked
        if self._unacked > self.cfg.collector.max_in_flight * 2:
            pending.body = None  # waits on disk only
        # The fsync happens off the event loop; the batch is queued for
        # sending only once it is durable. Batches closed meanwhile share the
        # next write and its fsync.
        self._to_spool.append((spooled, pending))
        # The spool also frames and keeps each batch's ids and ranges: ~100 bytes and ~50 a file.
        size = len(body) + 128 + 64 * len(spooled.ranges)
        spooled_sizes = self._spool_sizes
        spooled_sizes[spooled.seq] = size
        self._spool_reserved += size
        self._largest_body = max(self._largest_body, size)
        if not self._spool_writing:
            self._spool_writing = True
            task = asyncio.get_running_loop().create_task(self._spool_writer())
            self._spooling.add(task)
            task.add_done_callback(self._spooling.discard)
        return spooled

    async def _spool_writer(self) -> None:
        """Write the closed batches to the spool, in order, a group at a time,
        and queue each group once it is synced."""
        try:
            await self._write_spool_groups()
        finally:
            self._spool_writing = False  # no await since the queue was seen empty

    async def _write_spool_groups(self) -> None:
        while self._to_spool:
            group, self._to_spool = self._to_spool, []
            try:
                await asyncio.to_thread(self.spool.write_many, [spooled for spooled, _ in group])
            except OSError as exc:
                if self._stop.is_set():
                    log.error("cannot write the spool at shutdown: %s; %d batches are read again on start",
                              exc, len(group))
                    return
                log.error("cannot write the spool: %s; retrying in 1s", exc)
                self._to_spool[:0] = group
                await asyncio.sleep(1.0)
                continue
            self._spool_reserved -= sum(self._spool_sizes.pop(spooled.seq, 0) for spooled, _ in group)
            self._queue.extend(pending for _, pending in group)
            self._queued.set()
            for spooled, _ in group:
                durable = self._durable_waiters.pop(spooled.seq, None)
                if durable is not None and not durable.done():
                    durable.set_result(None)

    def _advance_without_batch(self, ranges: dict[str, int]) -> None:
        for file_id, end in ranges.items():
            markers = self._pending_by_file.get(file_id)
            tracked = self.tailer.files.get(file_id)
            if tracked is None:
                continue
            if not markers:
                tracked.acked = max(tracked.acked, end)
                self._dirty = True
            else:
                # Behind unacknowledged batches: a done marker of its own.
                phantom = PendingBatch.__new__(PendingBatch)
                phantom.seq = -1
                phantom.uncommitted = 1
                marker = _Marker(end, phantom)
                marker.done = True
                markers.append(marker)

    # --- acknowledgements ---------------------------------------------------------

    def _acknowledge(self, pending: PendingBatch) -> None:
        self._unacked -= 1
        self.metrics.batches_pending = self._unacked
        if not pending.markers:
            self._removable.append(pending)
        for _, marker in pending.markers:
            marker.done = True
        for file_id, _ in pending.markers:
            markers = self._pending_by_file.get(file_id)
            if markers is None:
                continue
            tracked = self.tailer.files.get(file_id)
            # A spooled batch of a file not open yet (waiting for a slot after a
            # restart): its checkpoint entry moves, or the file would be read again from there.
            entry = self.tailer.saved.get(file_id) if tracked is None else None
            while markers and markers[0].done:
                marker = markers.popleft()
                if tracked is not None and marker.end > tracked.acked:
                    tracked.acked = marker.end
                elif entry is not None and marker.end > entry.offset:
                    entry.offset = marker.end
                owner = marker.batch
                owner.uncommitted -= 1
                if owner.uncommitted == 0 and owner.seq >= 0:
                    self._removable.append(owner)
        self._dirty = True
        self._wake.set()

    def _checkpoint_state(self) -> CheckpointFile:
        files = {}
        for file_id, entry in self.tailer.saved.items():
            files[file_id] = entry
        for tracked in self.tailer.files.values():
            files[tracked.id] = tracked.checkpoint()
        return CheckpointFile(agent_id=self.state.agent_id, files=files)

    def _commit_snapshot(self) -> tuple[CheckpointFile, list[PendingBatch]]:
        self._dirty = False
        removable, self._removable = self._removable, []
        return self._checkpoint_state(), removable

    def _write_commit(self, state: CheckpointFile, removable: list[PendingBatch]) -> None:
        """Write the checkpoint, then drop the spool files it covers. A cancelled
        commit task leaves its thread running: the lock keeps writers in turn."""
        with self._commit_lock:
            self.store.save(state)
            for pending in removable:
                self.spool.remove(pending.seq)

    def commit(self) -> None:
        if self._dirty:
            self._write_commit(*self._commit_snapshot())
        self.metrics.spool_bytes = self.spool.used_bytes

    @property
    def _dirty(self) -> bool:
        """Whether the checkpoint has changed since it was last written (set on the loop only)."""
        return self._dirty_flag

    @_dirty.setter
    def _dirty(self, value: bool) -> None:
        self._dirty_flag = value
        if value:
            self._dirty_set.set()

    async def _commit_loop(self) -> None:
        # A few checkpoint writes a second: each is two fsyncs, and a crash
        # between them only means re-sending spooled batches (deduplicated).
        # Asleep while nothing changes: an idle agent does not wake for it.
        while True:
            await self._dirty_set.wait()
            await asyncio.sleep(0.2)
            self._dirty_set.clear()
            if self._dirty:
                # The snapshot is taken on the loop; the fsyncs happen in a thread.
                await asyncio.to_thread(self._write_commit, *self._commit_snapshot())
                self.metrics.spool_bytes = self.spool.used_bytes

    # --- shipping --------------------------------------------------------------------

    async def _ship_worker(self, shipper: Shipper) -> None:
        while True:
            while not self._queue:
                self._queued.clear()
                await self._queued.wait()
            pending = self._queue.popleft()
            moved = 0  # records of this batch that go in a replacement batch instead
            body = pending.body
            if body is None:
                body = self.spool.read_body(pending.seq).body
            try:
                delivery = await shipper.deliver(body, pending.content_encoding)
                answer = delivery.response
                if pending.lines and answer is not None and not answer.duplicate \
                        and answer.lines != pending.lines:
                    # A collector that does not parse shipped lines (an older
                    # one behind the same address): send them again as records.
                    moved = await self._resend_as_records(pending, body, answer)
                elif pending.lines and answer is not None and answer.rejected \
                        and any(_is_group_error(item) for item in answer.rejected):
                    moved = await self._resend_refused_groups(pending, body, answer)
            except Stopped:
                self._queue.appendleft(pending)
                return
            await self._delivered(pending, body, delivery, moved)
            pending.body = None

    async def _resend_as_records(self, pending: PendingBatch, body: bytes, answer: IngestResponse) -> int:
        """A batch's lines again, parsed here, as records of a replacement
        batch (:meth:`_spool_replacement`); how many records moved there."""
        if any(p.ship_lines for p in self.pipelines):
            log.error("the collector did not read the %d lines shipped as read in batch %s (it answered "
                      "lines=%d): sending lines as records from now on", pending.lines, pending.batch_id,
                      answer.lines)
            self._collector_lines(False)
        decoded = decode_msgpack_batch(self._decompress(body, pending.content_encoding))
        records = [r for group in decoded.lines for _, r in parse_shipped_lines(group, decoded.host)[0]]
        records = [self.redactor.redact_record(r) for r in records]
        await self._spool_replacement(pending, decoded.agent_id, decoded.host, records, "records")
        return pending.records - len(decoded.records)

    async def _spool_replacement(self, pending: PendingBatch, agent_id: str, host: str, records: list[Record],
                                 suffix: str) -> None:
        """Spool ``records`` as a batch of their own, whose id derives from
        ``pending``'s (a repeat is still deduplicated), and return once it is
        durable: only then may ``pending`` be acknowledged. A stop or a crash
        before would re-send ``pending``, answered as a duplicate, and lose
        them. The batch is sent like any other."""
        batch_id = str(uuid.uuid5(uuid.UUID(pending.batch_id), suffix)) if _is_uuid(pending.batch_id) \
            else f"{pending.batch_id}-{suffix}"
        body = self._compress(encode_batch(Batch(agent_id, batch_id, host, records,
                                                 redacted_with=self.redactor.fingerprint)))
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._durable_waiters[self._enqueue(batch_id, len(records), 0, {}, body, 0).seq] = durable
        await durable

    async def _resend_refused_groups(self, pending: PendingBatch, body: bytes, answer: IngestResponse) -> int:
        """Lines of a group the collector refused whole (its settings, such as
        a regex pattern its RE2 does not take: every line rejected with the same
        ``lines…`` reason) are parsed here and sent again as records, in a
        replacement batch (:meth:`_spool_replacement`), and their source ships
        records from now on. Lines this agent cannot parse either stay
        rejected, to be dead-lettered with the collector's reason.
        ``answer.rejected`` keeps only what is still rejected; returns how many
        records moved to the replacement."""
        decoded = decode_msgpack_batch(self._decompress(body, pending.content_encoding))
        reasons = {item.get("index"): str(item.get("error", "")) for item in answer.rejected}
        index = decoded.lines_index
        records: list[Record] = []
        taken: set[int] = set()
        for group in decoded.lines:
            count = group.data.count(b"\n") + (1 if group.data[-1:] not in (b"\n", b"") else 0)
            reason = reasons.get(index)
            if count and reason is not None and reason.startswith(_GROUP_ERRORS) \
                    and all(reasons.get(i) == reason for i in range(index, index + count)):
                try:
                    numbered = parse_shipped_lines(group, decoded.host)[0]
                except ValueError:
                    numbered = None  # this agent refuses them too: they stay rejected
                if numbered is not None:
                    records.extend(self.redactor.redact_record(record) for _, record in numbered)
                    taken.update(range(index, index + count))
                    self._ship_records(group, reason)
            index += count
        if not taken:
            return 0
        answer.rejected = [item for item in answer.rejected if item.get("index") not in taken]
        await self._spool_replacement(pending, decoded.agent_id, decoded.host, records, "refused-lines")
        return len(records)

    def _ship_records(self, group: Lines, reason: str) -> None:
        """The pipelines whose lines ``group`` holds ship records from now on
        (until the configuration is loaded again)."""
        for p in self.pipelines:
            if p.ship_lines and p.cfg.source == group.source and p.cfg.format == group.format \
                    and (group.pattern is None or p.cfg.pattern == group.pattern):
                log.error("the collector refused the lines of source %s (%s): parsing them here and "
                          "sending records from now on", group.source, reason[:300])
                p.ship_lines = p.can_ship_lines = False

    def _collector_lines(self, able: bool, features: Sequence[str] | None = None) -> None:
        """The collector can (or cannot) parse lines shipped as read, of the
        formats its ``features`` name (None: those it named before)."""
        if features is not None:
            self._lines_features = frozenset(features)
        for p in self.pipelines:
            p.ship_lines = able and p.can_ship_lines and lines_feature(p.cfg.format) in self._lines_features \
                and (p.shipped_multiline is None or MULTILINE_FEATURE in self._lines_features)
        self._lines_known = able

    async def _delivered(self, pending: PendingBatch, body: bytes, delivery: Delivery, moved: int = 0) -> None:
        # The dead-letter file's reads and fsynced appends run in a thread:
        # holds() may scan every rotated file, and the loop goes on reading
        # and shipping meanwhile. The batch is acknowledged (its checkpoint
        # may move) only once its rejections are durably in the file.
        self._answered = True
        if delivery.stored:
            answer = delivery.response
            if not self._lines_known and answer is not None and lines_feature("json") in answer.features:
                self._collector_lines(True, answer.features)
            self.metrics.batches_shipped += 1
            rejected = answer.rejected if answer is not None else []
            if answer is not None and answer.duplicate:
                self.metrics.batches_duplicate += 1
            self.metrics.records_shipped += pending.records - len(rejected) - moved
            if rejected and answer is not None and answer.duplicate and await self._dead_letter_io(
                    self._dead_letters().holds, pending.batch_id):
                # Dead-lettered by the first answer, before the agent stopped
                # short of moving its checkpoint past the batch.
                log.info("batch %s was resent; its %d rejected records are in the dead-letter file already",
                         pending.batch_id, len(rejected))
            elif rejected:
                await self._dead_letter(pending, body, f"HTTP {delivery.status}: rejected", rejected)
                self.metrics.records_rejected += len(rejected)  # counted once in the file
        else:
            log.error("batch %s dead-lettered: %s", pending.batch_id, delivery.reason)
            await self._dead_letter(pending, body, delivery.reason, None)
            self.metrics.batches_dead_lettered += 1
        self._acknowledge(pending)

    async def _dead_letter(self, pending: PendingBatch, body: bytes, reason: str,
                           rejected: list[dict[str, Any]] | None) -> None:
        """Append the batch's records (or only the rejected ones) to
        ``state_dir/dead-letter.ndjson``, each with the collector's reason."""
        batch_id = pending.batch_id
        try:
            raw = self._decompress(body, pending.content_encoding)
            decoded = decode_msgpack_batch(raw)
            records = [r for _, r in decoded.records]
            for group in decoded.lines:  # numbered after the records, a line each
                numbered, count, _ = parse_shipped_lines(group, decoded.host)
                by_line: dict[int, Record] = dict(numbered)
                records.extend(by_line.get(i) or Record("", "", group.source, "") for i in range(count))
        except Exception as exc:  # the body is ours; still keep what we can
            log.error("cannot decode dead-lettered batch %s: %s", batch_id, exc)
            records = []
        reasons: dict[int, str] = {}
        if rejected is not None:
            for item in rejected:
                index = item.get("index")
                if isinstance(index, int):
                    reasons[index] = str(item.get("error", ""))
        now = time.time()
        lines = []
        encoder = msgspec.json.Encoder()
        for index, record in enumerate(records):
            if rejected is not None and index not in reasons:
                continue
            lines.append(encoder.encode({"time": now, "batch_id": batch_id, "index": index,
                                         "reason": reasons.get(index, reason), "record": record}))
        if not records:
            lines.append(encoder.encode({"time": now, "batch_id": batch_id, "reason": reason,
                                         "body_hex": body[:65536].hex()}))
        await self._dead_letter_io(self._dead_letters().append, b"\n".join(lines) + b"\n")

    async def _dead_letter_io(self, call: Callable[[Any], T], arg: Any) -> T:
        """``call(arg)`` on the dead-letter file, in a thread, one at a time
        (ship workers dead-letter concurrently; appends and rotations must not interleave)."""
        async with self._dead_letter_lock:
            return await asyncio.to_thread(call, arg)

    def _dead_letters(self) -> DeadLetterFile:
        cap = self.cfg.dead_letter
        return DeadLetterFile(self.state_dir / "dead-letter.ndjson", cap.max_bytes, cap.keep)

    @staticmethod
    def _decompress(body: bytes, encoding: str) -> bytes:
        if encoding == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().decompress(body, max_output_size=512 * 1024 * 1024)
        if encoding == "gzip":
            import gzip

            return gzip.decompress(body)
        return body

    # --- stdin ---------------------------------------------------------------------------

    def _stdin_source(self) -> int | None:
        for index, source in enumerate(self.cfg.sources):
            if source.path == "-":
                return index
        return None

    async def _read_stdin(self, index: int) -> None:
        """Lines from standard input; they have no file to fall back on, so
        their batches are durable only once spooled."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

        def pump() -> None:
            stream = sys.stdin.buffer
            while True:
                data = stream.read1(256 * 1024) if hasattr(stream, "read1") else stream.read(65536)
                asyncio.run_coroutine_threadsafe(chunks.put(data), loop).result()
                if not data:
                    return

        threading.Thread(target=pump, name="stdin", daemon=True).start()
        holder = _StdinFile()
        partial = b""
        offset = 0
        while True:
            data = await chunks.get()
            pipeline = self.pipelines[index] if index < len(self.pipelines) else None
            if pipeline is None:
                return
            if not data:
                if partial:
                    data, partial = partial + b"\n", b""
                else:
                    records = pipeline.flush(holder, None)
                    self._add(records, None, None, 0, time.monotonic(), self.cfg.batch.max_records)
                    self._stdin_done()
                    return
            data = partial + data
            last = data.rfind(b"\n")
            if last < 0:
                partial = data
                continue
            partial = data[last + 1:]
            body = data[: last + 1]
            lines = body[:-1].split(b"\n")
            starts = list(map(add, accumulate(map(len, lines), initial=offset), range(len(lines) + 1)))
            chunk = Chunk(body, lines, starts[:-1], starts[-1])
            items, _, _ = pipeline.process(holder, chunk, None, time.monotonic())
            for record in items:  # no file: records only, never runs of lines
                record.offset = None
            offset += len(body)
            self._add(items, None, None, len(body), time.monotonic(), self.cfg.batch.max_records)
            while not self._has_room() and not self._stop.is_set():
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.cfg.poll_interval):
                        await self._wake.wait()

    def _stdin_done(self) -> None:
        if all(s.path == "-" for s in self.cfg.sources):
            log.info("standard input closed: stopping")
            self.request_stop()

    # --- control --------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._wake.set()

    def _reload(self, shipper: Shipper) -> None:
        self._reload_requested = False
        if not self.config_path:
            return
        from agent.config import load_agent_config
        from agent.configfile import ConfigInvalid

        try:
            cfg = load_agent_config(self.config_path)
        except ConfigInvalid as exc:
            log.error("config reload failed, keeping the running config:\n%s", exc)
            return
        if cfg.state_dir != self.cfg.state_dir:
            log.warning("state_dir cannot change on reload; restart the agent for that")
            cfg = msgspec.structs.replace(cfg, state_dir=self.cfg.state_dir)
        if cfg.collector.url != self.cfg.collector.url:
            self._lines_known = False  # another collector: ask again
        self.cfg = cfg
        self.redactor = Redactor.from_config(cfg.redact)
        self.metrics.redactions = lambda: dict(self.redactor.counts)
        self.pipelines = [SourcePipeline(s, self.host, self.redactor, self.metrics) for s in cfg.sources]
        self._collector_lines(self._lines_known)
        self.tailer.update_sources(cfg.sources)
        self.tailer.max_open = cfg.max_open_files
        self.spool.sync = cfg.spool.sync
        if not cfg.file_events:
            self._stop_file_events()
        elif self._events is None:
            self._start_file_events(asyncio.get_running_loop())
        else:  # the globs may have changed: the directories they can find files in too
            self._glob_dirs_watched.clear()
            self._watch_new_dirs([base for base, _ in self._glob_dirs()])
        shipper.update(cfg.collector)
        log.info("config reloaded from %s", self.config_path)

    # --- main ------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped; 0 after a clean shutdown."""
        self._lock_state_dir()
        self._setup_compression()
        self._restore()
        # The agent makes few reference cycles and many short-lived objects:
        # fewer young-generation collections save CPU on every line.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        loop = asyncio.get_running_loop()
        for signum, handler in ((signal.SIGTERM, self.request_stop), (signal.SIGINT, self.request_stop),
                                (signal.SIGHUP, self.request_reload)):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, handler)
        tasks: list[asyncio.Task[Any]] = []
        metrics_runner = None
        async with Shipper(self.cfg.collector, on_retry=self._count_retry) as shipper:
            workers = [asyncio.create_task(self._ship_worker(shipper))
                       for _ in range(self.cfg.collector.max_in_flight)]
            tasks.append(asyncio.create_task(self._commit_loop()))
            if self.cfg.metrics.listen:
                metrics_runner = await self._serve_metrics(self.cfg.metrics.listen)
            if self.cfg.metrics.summary_interval:
                tasks.append(asyncio.create_task(self._summaries(self.cfg.metrics.summary_interval)))
            stdin_index = self._stdin_source()
            if stdin_index is not None:
                tasks.append(asyncio.create_task(self._read_stdin(stdin_index)))
            self._start_file_events(loop)
            try:
                await self._read_loop(shipper)
            finally:
                self._stop_file_events()
                await self._shutdown(shipper, workers, tasks)
                if metrics_runner is not None:
                    await asyncio.to_thread(metrics_runner.shutdown)
                    metrics_runner.server_close()
        self.tailer.close_all()
        self.spool.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        return self.exit_code

    def _count_retry(self, problem: str) -> None:
        self.metrics.retries += 1

    async def _read_loop(self, shipper: Shipper) -> None:
        next_discover = 0.0
        last_discover = float("-inf")
        while not self._stop.is_set():
            if self._reload_requested:
                self._reload(shipper)
                next_discover = 0.0
            now = time.monotonic()
            if now >= next_discover or (self._discover_soon and now >= last_discover + self._discover_gap):
                self._discover_soon = False
                self._discover(now)
                self._watch_dirs()
                last_discover = now
                self._discover_gap = max(_EVENT_DISCOVER_GAP, 10 * (time.monotonic() - now))
                next_discover = now + self.cfg.discover_interval
            progressed = self._read_files(now)
            self._fill(now)
            batch = self._open
            if batch is not None and (now - batch.opened >= self.cfg.batch.max_wait):
                self._close_batch()
            if progressed:
                await asyncio.sleep(0)
                continue
            timeout = self._idle_timeout(now, next_discover, last_discover)
            self._wake.clear()
            # asyncio.timeout, not wait_for: no task a wait, fewer loop turns when idle.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _shutdown(self, shipper: Shipper, workers: list[asyncio.Task[Any]],
                        tasks: list[asyncio.Task[Any]]) -> None:
        """Send the open batch, wait (bounded) for what is in flight, save checkpoints."""
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._close_batch()
        await asyncio.gather(*list(self._spooling), return_exceptions=True)
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        while self._unacked and time.monotonic() < deadline:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._wake.wait()
        if self._unacked:
            log.warning("%d batches not acknowledged at shutdown; they stay spooled and are re-sent on start",
                        self._unacked)
        shipper.stop()
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._dirty = True
        self.commit()
        log.info("stopped: %s", self.metrics.summary())

    async def _summaries(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            log.info("summary: %s", self.metrics.summary())

    async def _serve_metrics(self, listen: str) -> Any:
        """``GET /metrics`` (Prometheus text) on ``listen``, served by the
        standard library's HTTP server on a daemon thread; the text is made on
        the event loop, which owns the state it reads."""
        import http.server

        loop = asyncio.get_running_loop()

        async def text() -> bytes:
            self.metrics.spool_bytes = self.spool.used_bytes
            return self.metrics.prometheus().encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404)
                    return
                try:
                    body = asyncio.run_coroutine_threadsafe(text(), loop).result(timeout=10)
                except Exception:
                    self.send_error(503)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        host, _, port = listen.rpartition(":")
        server = http.server.ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics on http://%s/metrics", listen)
        return server

class _StdinFile:
    """Stands in for a tracked file for stdin's multiline state."""

    joiner: object | None = None


def run_agent(cfg: AgentConfig, config_path: str | None = None) -> int:
    return asyncio.run(Agent(cfg, config_path).run())
