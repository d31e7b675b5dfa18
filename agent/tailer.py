"""Finding and reading the files of the configured sources.

A :class:`TrackedFile` is one open file (one inode), read through its own
descriptor with ``pread``, so a file renamed or deleted by logrotate is still
read to its end. Files are found by globbing each source's ``path`` (``**``
crosses directories, symlinks are followed, ``exclude`` globs drop matches)
and recognised by device + inode, confirmed by the fingerprint of their first
bytes (see :mod:`agent.checkpoint`).

Reading hands back complete lines only. A partial last line waits for its
newline; a line longer than ``max_line`` is cut, marked, and the rest of it
skipped. A file that shrinks below the read position (copytruncate, or
truncation in place) or whose first bytes change is read again from 0 as a
new file.

At start, a checkpointed file that is no longer at its recorded path (rotated
by rename while the agent was stopped, to a name no glob matches) is looked up
by device + inode + fingerprint among the files of its directory; found, its
unread tail is read with the source it belonged to and it is released like a
file rotated while running. Not found (deleted, or its inode reused by another
file), it is reported in :attr:`Tailer.lost` and its entry dropped.

At most ``max_open`` files are open at once. Files found beyond that wait in
:attr:`Tailer.waiting` (oldest first) without a descriptor; their checkpoint
entries stay until they are opened. A file read to its end and idle for
``close_inactive`` is *parked* by the runner: its descriptor is closed but it
stays known (identity and offset). Discovery queues it again when its size
differs from its offset; reopened, it continues from its offset, and the usual
truncation check (size, fingerprint) reads a file that reused its inode from 0.
A parked file renamed away is looked up in its directory like a file rotated
while the agent was stopped.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import logging
import os
import stat
import uuid
from collections import deque
from collections.abc import Sequence
from itertools import accumulate
from operator import add
from typing import Any, NamedTuple

from agent.checkpoint import (
    FINGERPRINT_BYTES,
    CheckpointFile,
    FileCheckpoint,
    fingerprint_fd,
    fingerprint_matches,
)
from agent.config import SourceConfig

log = logging.getLogger("logferry.agent.tailer")

TRUNCATION_MARKER = "…[line truncated at {} bytes]"


class LostFile(NamedTuple):
    """A checkpointed file whose unread tail cannot be read any more."""

    file_id: str
    entry: FileCheckpoint
    reason: str


class Waiting(NamedTuple):
    """A file waiting for a descriptor: a new one (``tracked`` is ``None``) or a parked one."""

    path: str
    source_index: int
    since: float
    tracked: TrackedFile | None
    # For a file present at the agent's first start with ``start_at: end``: its size then.
    start_end: int | None = None


class Chunk:
    """Complete lines read from a file: ``lines[i]`` (without newline) starts
    at byte ``starts[i]``; ``end`` is the offset after the last newline and
    ``base`` the offset of ``data[0]``. For a chunk made by :meth:`of_body`
    the lines are split only when asked for (the shipped-lines path never asks)."""

    __slots__ = ("_lines", "_starts", "base", "data", "end", "truncated")

    def __init__(self, data: bytes, lines: list[bytes] | None, starts: list[int] | None, end: int,
                 truncated: int = 0, base: int | None = None) -> None:
        self.data = data
        self._lines = lines
        self._starts = starts
        self.end = end
        self.truncated = truncated
        self.base = base if base is not None else (starts[0] if starts else end)

    @classmethod
    def of_body(cls, data: bytes, base: int, end: int) -> Chunk:
        """Lines ``data[:end - base]``, each ending with a newline, not split yet."""
        return cls(data, None, None, end, 0, base)

    @property
    def lines(self) -> list[bytes]:
        if self._lines is None:
            self._lines = self.data[: self.end - self.base - 1].split(b"\n")
        return self._lines

    @property
    def starts(self) -> list[int]:
        if self._starts is None:
            starts = list(map(add, accumulate(map(len, self.lines), initial=self.base),
                              range(len(self.lines) + 1)))
            starts.pop()
            self._starts = starts
        return self._starts

    @property
    def count(self) -> int:
        """The number of lines."""
        if self._lines is not None:
            return len(self._lines)
        return self.data.count(b"\n", 0, self.end - self.base)

    @property
    def body(self) -> bytes:
        """The lines as read, each followed by its newline (for untruncated chunks)."""
        size = self.end - self.base
        return self.data if len(self.data) == size else self.data[:size]


class TrackedFile:
    """One file being read. ``pos`` is where the next read starts; ``acked``
    the offset the collector has acknowledged (all lines before it are stored)."""

    def __init__(self, file_id: str, path: str, source_index: int, fd: int, st: os.stat_result,
                 pos: int, fingerprint: str, fingerprint_len: int, now: float) -> None:
        self.id = file_id
        self.path = path
        self.source_index = source_index
        self.fd = fd
        self.dev = st.st_dev
        self.ino = st.st_ino
        self.pos = pos
        self.acked = pos
        self.size = st.st_size
        self.fingerprint = fingerprint
        self.fingerprint_len = fingerprint_len
        self.skipping = False
        self.rotated = False  # the path no longer leads to this file
        self.deleted = False
        self.unmatched = False  # no source glob matches it any more
        self.last_growth = now
        self.closed = False
        self.parked = False  # descriptor closed by close_inactive; the file is still known
        self.reopens = 0
        # When it got its slot (max_open_files), and whether it is giving it up for a waiting file.
        self.opened_at = now
        self.yielding = False
        # (end offset, done) of batches holding this file's lines, oldest first.
        self.pending: deque[list[object]] = deque()
        self.joiner: object | None = None
        # Records read but not yet batched (back-pressure): (records, end offset, raw bytes).
        self.carry: tuple[Sequence[Any], int | None, int, int] | None = None
        # The source's name and glob, kept in the checkpoint.
        self.source = ""
        self.source_path = ""

    def checkpoint(self) -> FileCheckpoint:
        return FileCheckpoint(self.path, self.dev, self.ino, self.fingerprint, self.fingerprint_len,
                              self.acked, size=self.size, source=self.source, source_path=self.source_path)

    def close(self) -> None:
        if not self.closed:
            if not self.parked:
                os.close(self.fd)
            self.closed = True

    def park(self) -> None:
        """Close the descriptor but keep the file's identity and offset."""
        if not self.closed and not self.parked:
            os.close(self.fd)
            self.fd = -1
            self.parked = True


def _line_aligned_end(fd: int, size: int) -> int:
    """The offset after the last newline: a partial last line will be read once complete."""
    start = max(0, size - 64 * 1024)
    tail = os.pread(fd, size - start, start)
    newline = tail.rfind(b"\n")
    return start + newline + 1 if newline >= 0 else (size if len(tail) == size - start and start else 0)


def excluded(path: str, patterns: list[str]) -> bool:
    name = os.path.basename(path)
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)


def glob_matches(pattern: str, path: str) -> bool:
    """Whether ``path`` (absolute) is one ``glob(pattern, recursive=True)`` would
    return, without the file having to exist; ``**`` spans directories."""
    pattern = os.path.abspath(os.path.expanduser(pattern))

    def match(parts: list[str], names: list[str]) -> bool:
        if not parts:
            return not names
        if parts[0] == "**":
            return any(match(parts[1:], names[i:]) for i in range(len(names) + 1))
        return bool(names) and fnmatch.fnmatchcase(names[0], parts[0]) and match(parts[1:], names[1:])

    return match(pattern.strip(os.sep).split(os.sep), path.strip(os.sep).split(os.sep))


class Tailer:
    """Discovers files for the sources and reads them."""

    def __init__(self, sources: list[SourceConfig], saved: CheckpointFile | None, read_chunk: int,
                 max_open: int = 1024) -> None:
        self.sources = sources
        self.read_chunk = read_chunk
        self.max_open = max_open
        # Files waiting for a descriptor, in the order they started waiting: (dev, ino) -> Waiting.
        self.waiting: dict[tuple[int, int], Waiting] = {}
        self._copies: list[TrackedFile] = []
        # Parked files found gone or replaced (the runner drops their state).
        self.dropped: list[TrackedFile] = []
        self.first_start = saved is None
        self.saved: dict[str, FileCheckpoint] = dict(saved.files) if saved else {}
        self.files: dict[str, TrackedFile] = {}
        self._by_inode: dict[tuple[int, int], TrackedFile] = {}
        self.started = False
        # Checkpointed files found gone at start (the runner reports and clears them).
        self.lost: list[LostFile] = []

    def update_sources(self, sources: list[SourceConfig]) -> None:
        self.sources = sources

    # --- discovery -------------------------------------------------------------

    def matches(self) -> dict[tuple[int, int], tuple[str, int, os.stat_result]]:
        """Every file the sources' globs match now: (dev, ino) -> (path, source index, stat)."""
        found: dict[tuple[int, int], tuple[str, int, os.stat_result]] = {}
        for index, source in enumerate(self.sources):
            if source.path == "-":
                continue
            pattern = os.path.expanduser(source.path)
            for path in sorted(glob.glob(pattern, recursive=True)):
                if source.exclude and excluded(path, source.exclude):
                    continue
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                found.setdefault((st.st_dev, st.st_ino), (os.path.abspath(path), index, st))
        return found

    def open_count(self) -> int:
        return sum(1 for f in self.files.values() if not f.closed and not f.parked)

    def discover(self, now: float) -> list[TrackedFile]:
        """Queue newly matched files and parked files whose size changed, then
        open waiting files up to ``max_open`` (:meth:`fill`); mark tracked files
        whose path moved on, that were deleted, or that no glob matches any
        more. Returns the files opened."""
        found = self.matches()
        new: list[TrackedFile] = []
        start_end = self.first_start and not self.started
        saved_by_key: dict[tuple[int, int], list[str]] = {}
        for file_id, entry in self.saved.items():
            saved_by_key.setdefault((entry.dev, entry.ino), []).append(file_id)
        for key, (path, index, st) in found.items():
            tracked = self._by_inode.get(key)
            if tracked is not None:
                tracked.unmatched = False
                if tracked.parked:
                    tracked.path = path
                    if st.st_size != tracked.pos and key not in self.waiting:
                        self.waiting[key] = Waiting(path, tracked.source_index, now, tracked)
                elif tracked.path != path and tracked.rotated:
                    tracked.path = path
                continue
            waiting = self.waiting.get(key)
            if waiting is not None:
                if waiting.tracked is None and waiting.path != path:
                    self.waiting[key] = waiting._replace(path=path, source_index=index)  # keeps its turn
                continue
            ids = saved_by_key.get(key, [])
            if len(ids) == 1 and self._restore_idle(ids[0], path, index, st, now):
                continue
            at_end = st.st_size if start_end and self.sources[index].start_at == "end" else None
            self.waiting[key] = Waiting(path, index, now, None, at_end)
        gone: list[TrackedFile] = []
        for tracked in self.files.values():
            if tracked.closed:
                continue
            if tracked.parked:
                key = (tracked.dev, tracked.ino)
                if key not in found and key not in self.waiting:
                    gone.append(tracked)
                continue
            tracked.unmatched = (tracked.dev, tracked.ino) not in found
            try:
                st = os.stat(tracked.path)
                tracked.rotated = (st.st_dev, st.st_ino) != (tracked.dev, tracked.ino)
            except OSError:
                tracked.rotated = True
            try:
                tracked.deleted = os.fstat(tracked.fd).st_nlink == 0
            except OSError:
                tracked.deleted = True
        listings: dict[str, dict[tuple[int, int], list[str]]] = {}
        for tracked in gone:
            self._parked_gone(tracked, listings, now)
        if not self.started:
            self.started = True
            # Files rotated away while the agent was stopped: their unread tail
            # is read now. Other entries would only pile up.
            known = {(f.dev, f.ino) for f in self.files.values()}
            for file_id, entry in list(self.saved.items()):
                if (entry.dev, entry.ino) in self.waiting:
                    continue  # resumed from this entry when its turn comes
                self.saved.pop(file_id)
                if (entry.dev, entry.ino) in known:
                    continue
                recovered = self._recover(file_id, entry, listings, now)
                if recovered is not None:
                    known.add((recovered.dev, recovered.ino))  # one inode is read once
                    new.append(recovered)
        new.extend(self.fill(now))
        return new

    # --- the cap on open files ------------------------------------------------------

    def fill(self, now: float) -> list[TrackedFile]:
        """Open waiting files, oldest first, while fewer than ``max_open`` are open."""
        opened: list[TrackedFile] = []
        if not self.waiting:
            return opened
        free = self.max_open - self.open_count()
        while free > 0 and self.waiting:
            key = next(iter(self.waiting))
            item = self.waiting.pop(key)
            tracked = self._reopen(item, now) if item.tracked is not None else self._open_waiting(key, item, now)
            if tracked is not None:
                opened.append(tracked)
                free -= 1
        # Copies found for files truncated while the agent was stopped (_recover_copy).
        opened.extend(self._copies)
        self._copies.clear()
        return opened

    def _restore_idle(self, file_id: str, path: str, index: int, st: os.stat_result, now: float) -> bool:
        """A checkpointed file read to its end (its size is its offset) is known
        again without a descriptor, as a parked file: it takes no slot until it
        changes, and reopened, its first bytes confirm it (else it is read from 0)."""
        entry = self.saved[file_id]
        if entry.offset != st.st_size:
            return False
        self.saved.pop(file_id)
        tracked = TrackedFile(file_id, path, index, -1, st, entry.offset, entry.fingerprint,
                              entry.fingerprint_len, now)
        tracked.parked = True
        self._describe(tracked, index)
        self.files[file_id] = tracked
        self._by_inode[(tracked.dev, tracked.ino)] = tracked
        return True

    def park(self, tracked: TrackedFile) -> None:
        """Close an idle file's descriptor (close_inactive); it stays known."""
        tracked.park()
        log.info("closed inactive %s at byte %d", tracked.path, tracked.pos)

    def _drop(self, tracked: TrackedFile, reason: str) -> None:
        tracked.closed = True
        self.forget(tracked)
        self.dropped.append(tracked)
        log.info("forgetting closed file %s: %s", tracked.path, reason)

    def _parked_gone(self, tracked: TrackedFile, listings: dict[str, dict[tuple[int, int], list[str]]],
                     now: float) -> None:
        """A parked file no glob matches any more: renamed away (its unread
        tail, if it grew, is read like a rotated file's), deleted, or left out."""
        try:
            st = os.stat(tracked.path)
            if (st.st_dev, st.st_ino) == (tracked.dev, tracked.ino):
                self._drop(tracked, "no source matches it any more")
                return
        except OSError:
            pass
        found = self._find_moved(tracked.checkpoint(), listings)
        if isinstance(found, str):
            self._drop(tracked, found)
            return
        path, fd, fst = found
        os.close(fd)
        if fst.st_size <= tracked.pos:
            self._drop(tracked, f"rotated to {path}, read to its end")
            return
        tracked.rotated = True
        tracked.unmatched = True
        self.waiting[(tracked.dev, tracked.ino)] = Waiting(path, tracked.source_index, now, tracked)

    def _reopen(self, item: Waiting, now: float) -> TrackedFile | None:
        """A parked file's descriptor again, at its path or, renamed, in its directory."""
        tracked = item.tracked
        assert tracked is not None
        fd: int | None
        try:
            fd = os.open(item.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            fd = None
        if fd is not None:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (tracked.dev, tracked.ino) or not stat.S_ISREG(fst.st_mode):
                os.close(fd)
                fd = None
        if fd is None:
            found = self._find_moved(tracked.checkpoint(), {})
            if isinstance(found, str):
                self._drop(tracked, found)
                return None
            _, fd, fst = found
            tracked.rotated = True
            tracked.unmatched = True
        # Same inode: a file that reused it, or was truncated, is noticed by
        # check_truncation (size below the offset, or other first bytes) and read from 0.
        tracked.fd = fd
        tracked.parked = False
        tracked.size = fst.st_size
        tracked.last_growth = now
        tracked.opened_at = now
        tracked.yielding = False
        tracked.reopens += 1
        log.info("reopened %s at byte %d", tracked.path, tracked.pos)
        return tracked

    def _open_waiting(self, key: tuple[int, int], item: Waiting, now: float) -> TrackedFile | None:
        """Open a file that waited for a descriptor; renamed meanwhile, it is
        looked up in its directory (by its checkpoint, or a rotation-style name)."""
        path = item.path
        rotated = False
        try:
            st = os.stat(path)
            moved = (st.st_dev, st.st_ino) != key
        except OSError:
            moved = True
        if moved:
            entries = [e for e in self.saved.values() if (e.dev, e.ino) == key]
            empty = hashlib.sha256(b"").hexdigest()
            entry = entries[0] if entries else FileCheckpoint(path, key[0], key[1], empty, 0, 0)
            found = self._find_moved(entry, {})
            if isinstance(found, str):
                for file_id, saved in list(self.saved.items()):
                    if (saved.dev, saved.ino) == key:
                        self.saved.pop(file_id)
                        self.lost.append(LostFile(file_id, saved, found))
                log.info("%s is gone before it could be opened (%s)", path, found)
                return None
            path, fd, st = found
            os.close(fd)
            rotated = True
        tracked = self._open(path, item.source_index, st, now, item.start_end)
        if tracked is not None and rotated:
            tracked.path = item.path  # named by its old path, read to its end, then released
            tracked.rotated = True
            tracked.unmatched = True
        return tracked

    # --- files rotated away while the agent was stopped ---------------------------

    def _source_for(self, entry: FileCheckpoint) -> int | None:
        """The index of the source a checkpointed file was read for: the same
        name and glob; else (an older checkpoint, or the config was edited) the
        first source whose glob matches its recorded path, one of the same name first."""
        for index, source in enumerate(self.sources):
            if source.path != "-" and source.path == entry.source_path and source.source == entry.source:
                return index
        matching = [index for index, source in enumerate(self.sources)
                    if source.path != "-" and glob_matches(source.path, entry.path)
                    and not excluded(entry.path, source.exclude)]
        for index in matching:
            if self.sources[index].source == entry.source:
                return index
        return matching[0] if matching else None

    @staticmethod
    def _candidates(entry: FileCheckpoint, listings: dict[str, dict[tuple[int, int], list[str]]],
                    olddir: str = "") -> list[str]:
        """Paths in the recorded file's directory (and its symlink target's, and
        the source's ``olddir``) with its device and inode."""
        directories = [os.path.dirname(entry.path)]
        real = os.path.dirname(os.path.realpath(entry.path))
        if real not in directories:
            directories.append(real)
        if olddir:
            old = os.path.normpath(os.path.join(directories[0], os.path.expanduser(olddir)))
            if old not in directories:
                directories.append(old)
        paths: list[str] = []
        for directory in directories:
            listing = listings.get(directory)
            if listing is None:
                # stat, not the directory entry's inode: overlay file systems may differ there.
                listing = listings[directory] = {}
                try:
                    with os.scandir(directory) as it:
                        for item in it:
                            try:
                                st = item.stat()
                            except OSError:
                                continue
                            if not stat.S_ISREG(st.st_mode):
                                continue  # never open a FIFO or device that got the inode
                            listing.setdefault((st.st_dev, st.st_ino), []).append(item.name)
                except OSError:
                    pass
            paths.extend(os.path.join(directory, name) for name in sorted(listing.get((entry.dev, entry.ino), [])))
        return paths

    def _find_moved(self, entry: FileCheckpoint,
                    listings: dict[str, dict[tuple[int, int], list[str]]]) -> tuple[str, int, os.stat_result] | str:
        """The file of a checkpoint entry at its new name: (path, open descriptor,
        stat); or why it cannot be read: ``deleted`` or ``inode reused``."""
        reused = False
        stem = os.path.basename(entry.path).split(".", 1)[0]
        for path in self._candidates(entry, listings, self._olddir(entry)):
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue
            fst = os.fstat(fd)
            same = (fst.st_dev, fst.st_ino) == (entry.dev, entry.ino) and stat.S_ISREG(fst.st_mode)
            if same and not fingerprint_matches(fd, entry.fingerprint, entry.fingerprint_len):
                reused = True  # an unrelated file that got the inode
                same = False
            if same and not entry.fingerprint_len and not os.path.basename(path).startswith(stem):
                # Nothing was read of it: no fingerprint to confirm it by, so
                # only a rotation-style name (app.log -> app.log.1) is trusted.
                reused = True
                same = False
            if same:
                return path, fd, fst
            os.close(fd)
        return "inode reused by another file" if reused else "deleted"

    def _recover(self, file_id: str, entry: FileCheckpoint, listings: dict[str, dict[tuple[int, int], list[str]]],
                 now: float) -> TrackedFile | None:
        """The tracked file for the unread tail of a checkpointed file no glob
        matched at start, or ``None`` (nothing to read, or reported lost)."""
        try:
            st = os.stat(entry.path)
            if (st.st_dev, st.st_ino) == (entry.dev, entry.ino):
                # Still where it was, but no source matches it any more (config changed).
                log.info("%s is no longer matched by any source: forgetting it", entry.path)
                return None
        except OSError:
            pass
        found = self._find_moved(entry, listings)
        if isinstance(found, str):
            self.lost.append(LostFile(file_id, entry, found))
            return None
        path, fd, fst = found
        if fst.st_size < entry.offset:
            os.close(fd)
            self.lost.append(LostFile(file_id, entry, f"truncated below its checkpoint at {path}"))
            return None
        if fst.st_size == entry.offset:
            os.close(fd)
            log.info("%s (now %s) was read to its end before the agent stopped", entry.path, path)
            return None
        index = self._source_for(entry)
        if index is None:
            os.close(fd)
            self.lost.append(LostFile(file_id, entry, f"no source is configured for it any more (now {path})"))
            return None
        tracked = self._track_old(file_id, entry, index, fd, fst, now)
        log.info("%s was rotated to %s while the agent was stopped: reading its unread bytes %d-%d",
                 entry.path, path, entry.offset, fst.st_size)
        if self.open_count() > self.max_open:
            tracked.park()  # read when its turn comes
            self.waiting[(tracked.dev, tracked.ino)] = Waiting(path, index, now, tracked)
        return tracked

    def _track_old(self, file_id: str, entry: FileCheckpoint, index: int, fd: int, fst: os.stat_result,
                   now: float) -> TrackedFile:
        """The unread tail of a checkpointed file found under another name (or
        in a copy), tracked under its old id and named by its old path (as a
        file rotated while running is): read to its end, then released."""
        tracked = TrackedFile(file_id, entry.path, index, fd, fst, entry.offset, entry.fingerprint,
                              entry.fingerprint_len, now)
        self._describe(tracked, index)
        tracked.rotated = True
        tracked.unmatched = True
        self.files[file_id] = tracked
        self._by_inode[(tracked.dev, tracked.ino)] = tracked
        return tracked

    def _olddir(self, entry: FileCheckpoint) -> str:
        """The ``olddir`` of the source a checkpointed file was read for ("" if none)."""
        index = self._source_for(entry)
        return self.sources[index].olddir if index is not None else ""

    def _recover_copy(self, file_id: str, entry: FileCheckpoint, index: int, now: float) -> bool:
        """After a copytruncate while the agent was stopped (``app.log`` copied
        to ``app.log.1``, then truncated), the unread tail is in the copy: a
        file beside it with a rotation-style name, the same first bytes
        (fingerprint) and at least the checkpointed size. Its bytes from the
        checkpoint on are read under the old file's id, to its end, then it is
        released. False when no such copy is found (compressed, moved away)."""
        if not entry.fingerprint_len:
            return False  # nothing to recognise the copy by
        directory, name = os.path.split(entry.path)
        olddir = self.sources[index].olddir if index < len(self.sources) else ""
        paths: list[str] = []
        for folder in dict.fromkeys([directory, *([os.path.join(directory, os.path.expanduser(olddir))]
                                                   if olddir else [])]):
            try:
                # app.log.1 before app.log.2: the newest copy first
                paths.extend(os.path.join(folder, n) for n in sorted(os.listdir(folder))
                             if n.startswith(name) and (n != name or folder != directory))
            except OSError:
                continue
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                continue
            fst = os.fstat(fd)
            key = (fst.st_dev, fst.st_ino)
            if not stat.S_ISREG(fst.st_mode) or key == (entry.dev, entry.ino) or key in self._by_inode \
                    or fst.st_size < entry.offset \
                    or not fingerprint_matches(fd, entry.fingerprint, entry.fingerprint_len):
                os.close(fd)
                continue
            if fst.st_size == entry.offset:
                os.close(fd)
                log.info("%s was copied to %s and truncated while the agent was stopped; it had been read "
                         "to its end", entry.path, path)
                return True
            self._copies.append(self._track_old(file_id, entry, index, fd, fst, now))
            log.info("%s was copied to %s and truncated while the agent was stopped: reading the copy's "
                     "unread bytes %d-%d", entry.path, path, entry.offset, fst.st_size)
            return True
        return False

    def _describe(self, tracked: TrackedFile, index: int) -> None:
        if index < len(self.sources):
            tracked.source = self.sources[index].source
            tracked.source_path = self.sources[index].path

    def _open(self, path: str, index: int, st: os.stat_result, now: float,
              start_end: int | None = None) -> TrackedFile | None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            log.warning("cannot open %s: %s", path, exc)
            return None
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)  # replaced between stat and open: next round
            return None
        file_id, pos = self._resume(fd, fst, index, start_end, now)
        fp, fp_len = fingerprint_fd(fd, fst.st_size)
        tracked = TrackedFile(file_id, path, index, fd, fst, pos, fp, fp_len, now)
        self._describe(tracked, index)
        self.files[file_id] = tracked
        self._by_inode[(tracked.dev, tracked.ino)] = tracked
        log.info("tailing %s from byte %d", path, pos)
        return tracked

    def _resume(self, fd: int, st: os.stat_result, source_index: int,
                start_end: int | None = None, now: float = 0.0) -> tuple[str, int]:
        """The id and start offset of a newly opened file: where it was left
        when device, inode and fingerprint match a file seen before (in this
        run or in the checkpoint); else 0, or the end of the file for files
        present at the agent's first start with ``start_at: end``."""
        for tracked in list(self.files.values()):
            if tracked.closed and (tracked.dev, tracked.ino) == (st.st_dev, st.st_ino):
                if fingerprint_matches(fd, tracked.fingerprint, tracked.fingerprint_len) \
                        and st.st_size >= tracked.pos:
                    self.files.pop(tracked.id)
                    return tracked.id, tracked.pos
        for file_id, entry in list(self.saved.items()):
            if (entry.dev, entry.ino) != (st.st_dev, st.st_ino):
                continue
            self.saved.pop(file_id)
            if not fingerprint_matches(fd, entry.fingerprint, entry.fingerprint_len):
                log.info("inode %d was reused by a new file: reading it from the start", st.st_ino)
                # Truncated and written again (copytruncate): the old content may be in a copy.
                if not self._recover_copy(file_id, entry, source_index, now):
                    self.lost.append(LostFile(file_id, entry, "replaced (inode reused, or truncated and rewritten)"))
                continue  # another entry (a later file on this inode) may still match
            if st.st_size < entry.offset:
                log.info("file shrank below its checkpoint (truncated): reading it from the start")
                if not self._recover_copy(file_id, entry, source_index, now):
                    self.lost.append(LostFile(file_id, entry, "truncated while the agent was stopped"))
                continue
            return file_id, entry.offset
        file_id = uuid.uuid4().hex[:16]
        if start_end is not None:
            # Present at the first start (it may have waited for a descriptor since): only lines after then.
            return file_id, _line_aligned_end(fd, min(start_end, st.st_size))
        return file_id, 0

    # --- reading ---------------------------------------------------------------

    def check_truncation(self, tracked: TrackedFile) -> bool:
        """Whether the file was truncated or replaced in place since it was
        last read (it then starts again at 0 under a new id)."""
        try:
            size = os.fstat(tracked.fd).st_size
        except OSError:
            return False
        tracked.size = size
        truncated = size < tracked.pos
        if not truncated and tracked.fingerprint_len and size > tracked.pos:
            truncated = not fingerprint_matches(tracked.fd, tracked.fingerprint, tracked.fingerprint_len)
        if truncated:
            log.info("%s was truncated (size %d < offset %d): reading it from the start",
                     tracked.path, size, tracked.pos)
        return truncated

    def renew(self, tracked: TrackedFile) -> TrackedFile:
        """A truncated file as a new file from offset 0 (same descriptor)."""
        self.files.pop(tracked.id, None)
        fresh = TrackedFile(uuid.uuid4().hex[:16], tracked.path, tracked.source_index, tracked.fd,
                            os.fstat(tracked.fd), 0, *fingerprint_fd(tracked.fd), tracked.last_growth)
        fresh.source, fresh.source_path = tracked.source, tracked.source_path
        tracked.closed = True  # the descriptor now belongs to `fresh`
        self.files[fresh.id] = fresh
        self._by_inode[(fresh.dev, fresh.ino)] = fresh
        return fresh

    def read(self, tracked: TrackedFile, max_line: int) -> Chunk | None:
        """The next complete lines, or ``None`` when there are none yet."""
        data = b""
        while True:
            data = os.pread(tracked.fd, self.read_chunk, tracked.pos)
            if not data:
                return None
            if tracked.skipping:
                newline = data.find(b"\n")
                if newline < 0:
                    tracked.pos += len(data)
                    continue
                tracked.pos += newline + 1
                tracked.skipping = False
                continue
            break
        base = tracked.pos
        last = data.rfind(b"\n")
        if last < 0:
            if len(data) < self.read_chunk:
                return None  # a partial line: wait for its end
            longer = os.pread(tracked.fd, max_line + 1, base) if max_line + 1 > len(data) else data
            last = longer.rfind(b"\n")
            if last < 0:
                if len(longer) <= max_line:
                    return None
                return self._cut(tracked, longer, base, max_line)
            data = longer
        end = base + last + 1
        chunk = Chunk.of_body(data, base, end)
        if last > max_line:
            # A line may be longer than max_line: split now and cut those.
            lines = chunk.lines
            for i, line in enumerate(lines):
                if len(line) > max_line:
                    lines[i] = line[:max_line] + TRUNCATION_MARKER.format(max_line).encode()
                    chunk.truncated += 1
            if chunk.truncated:
                # Offsets are those of the lines as read, not as cut.
                chunk._starts = list(map(add, accumulate(map(len, data[:last].split(b"\n")), initial=base),
                                         range(len(lines) + 1)))[:-1]
        tracked.pos = end
        if end > tracked.size:
            tracked.size = end
        if tracked.fingerprint_len < FINGERPRINT_BYTES and base < FINGERPRINT_BYTES:
            tracked.fingerprint, tracked.fingerprint_len = fingerprint_fd(tracked.fd, end)
        return chunk

    def _cut(self, tracked: TrackedFile, data: bytes, base: int, max_line: int) -> Chunk:
        line = data[:max_line] + TRUNCATION_MARKER.format(max_line).encode()
        tracked.pos = base + max_line
        tracked.skipping = True
        return Chunk(data, [line], [base], base + max_line, 1)

    def read_partial(self, tracked: TrackedFile) -> Chunk | None:
        """A last line without a newline, once the file is known to be finished
        (rotated or deleted and idle)."""
        if tracked.skipping:
            size = os.fstat(tracked.fd).st_size
            tracked.pos = max(tracked.pos, size)
            tracked.skipping = False
            return None
        data = os.pread(tracked.fd, self.read_chunk, tracked.pos)
        if not data:
            return None
        base = tracked.pos
        tracked.pos += len(data)
        return Chunk(data, [data], [base], tracked.pos)

    def release(self, tracked: TrackedFile) -> None:
        """Close a finished file; its checkpoint entry goes once it is acknowledged."""
        tracked.close()
        self._by_inode.pop((tracked.dev, tracked.ino), None)
        log.info("released %s", tracked.path)

    def forget(self, tracked: TrackedFile) -> None:
        self.files.pop(tracked.id, None)
        if self._by_inode.get((tracked.dev, tracked.ino)) is tracked:
            self._by_inode.pop((tracked.dev, tracked.ino), None)

    def close_all(self) -> None:
        for tracked in self.files.values():
            tracked.close()
