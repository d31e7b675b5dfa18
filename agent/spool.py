"""Batches on disk, from the moment they are closed until they are acknowledged.

Every batch is written here before it is sent (``state_dir/spool/``). After a
``kill -9`` the agent sends the spooled batches again with the same
``batch_id``, so the collector stores each line once, and resumes reading
files after the last spooled range. While the collector is away the spool also
holds batches of sources that are not files (stdin) and, up to
``spool.max_bytes``, batches read ahead from files.

Batches are appended to segment files (``<first seq>.seg``), several per
write, with one ``fdatasync`` for all of them: a file, a rename and an fsync
per batch cost five times the CPU. A segment starts with :data:`MAGIC`; each
batch in it is framed as ``length (u32 LE) | crc32 (u32 LE) | msgpack
SpooledBatch``. A batch is handed back to the caller (and may be sent) only
once its write is synced, so a frame cut short by a crash, or one whose
checksum fails, belongs to a batch that was never sent: :meth:`Spool.load`
stops reading that segment there and those lines are read again from their
file. A segment is appended to until it reaches :data:`SEGMENT_BYTES`; a new
run always starts a new one. A segment file is removed once every batch in it
was removed.

A batch is removed only once the checkpoint covers its ranges (see
:mod:`agent.runner`): until then a crash would re-read those lines.

Spool directories of earlier versions (one ``<seq>.batch`` file per batch)
are still read, and their files removed the same way.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path

import msgspec

log = logging.getLogger("logferry.agent.spool")

MAGIC = b"LFSPOOL1"
SEGMENT_BYTES = 16 * 1024 * 1024
_FRAME = struct.Struct("<II")
_MAX_FRAME = 1 << 31


class FileRange(msgspec.Struct, array_like=True):
    """The batch holds the lines of ``file_id`` up to byte ``end``."""

    file_id: str
    end: int


class SpooledBatch(msgspec.Struct):
    seq: int
    batch_id: str
    records: int
    raw_bytes: int
    ranges: list[FileRange]
    created: float
    content_encoding: str
    body: bytes
    # The lines shipped as read (agent.wire.Lines): the collector's answer must count them. Each is
    # one of ``records``, but for multiline groups, whose entries are (one record each, several lines).
    lines: int = 0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SpooledBatch)

_fdatasync = getattr(os, "fdatasync", os.fsync)


class _Segment:
    """One segment file; ``live`` counts its batches not yet removed."""

    __slots__ = ("fd", "live", "path", "size")

    def __init__(self, path: Path, size: int, fd: int | None) -> None:
        self.path = path
        self.size = size
        self.fd = fd
        self.live = 0


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Spool:
    """The spool directory. ``used_bytes`` counts the batches it holds (not
    yet removed); the segment files may hold up to one segment more."""

    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES, sync: bool = True) -> None:
        self.directory = directory
        # False: writes are left to the page cache (``spool.sync``).
        self.sync = sync
        directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.used_bytes = 0
        # seq -> (segment, offset of the frame's payload, payload length);
        # segment None: a batch file of an earlier version.
        self._where: dict[int, tuple[_Segment | None, int, int]] = {}
        self._active: _Segment | None = None
        self._next_seq = 1
        # write_many runs in a writer thread, remove in the commit thread.
        self._lock = threading.Lock()

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}.batch"

    @property
    def batches(self) -> int:
        """How many batches the spool holds."""
        return len(self._where)

    # --- start ---------------------------------------------------------------------

    def load(self) -> list[SpooledBatch]:
        """The batches left by an earlier run, oldest first. A torn or corrupt
        frame ends its segment; half-written batch files of earlier versions
        are removed, unreadable ones set aside."""
        batches: list[SpooledBatch] = []
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if name.endswith(".tmp"):
                path.unlink(missing_ok=True)
            elif name.endswith(".batch"):
                try:
                    data = path.read_bytes()
                    batch = _decoder.decode(data)
                except (msgspec.DecodeError, OSError):
                    path.rename(path.with_suffix(".corrupt"))
                    continue
                batches.append(batch)
                self._where[batch.seq] = (None, 0, len(data))
                self.used_bytes += len(data)
            elif name.endswith(".seg"):
                batches.extend(self._load_segment(path))
        batches.sort(key=lambda b: b.seq)
        for batch in batches:
            self._next_seq = max(self._next_seq, batch.seq + 1)
        return batches

    def _load_segment(self, path: Path) -> list[SpooledBatch]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.error("cannot read spool segment %s: %s", path, exc)
            return []
        segment = _Segment(path, len(data), None)
        found: list[SpooledBatch] = []
        if not data.startswith(MAGIC):
            if MAGIC.startswith(data):  # created, nothing synced yet
                path.unlink(missing_ok=True)
            else:
                log.error("%s is not a spool segment: set aside", path)
                path.rename(path.with_suffix(".corrupt"))
            return []
        pos = len(MAGIC)
        while pos < len(data):
            if pos + _FRAME.size > len(data):
                break
            length, crc = _FRAME.unpack_from(data, pos)
            start = pos + _FRAME.size
            payload = data[start:start + length]
            if len(payload) != length or zlib.crc32(payload) != crc:
                break
            try:
                batch = _decoder.decode(payload)
            except msgspec.DecodeError:
                break
            pos = start + length
            if batch.seq in self._where:
                continue  # written again after a failed write: the first copy counts
            found.append(batch)
            self._where[batch.seq] = (segment, start, length)
            self.used_bytes += length
        if pos < len(data):
            # Never synced, so never sent: those lines are read again from their files.
            log.warning("spool segment %s ends with %d bytes of an unfinished write: ignored",
                        path.name, len(data) - pos)
        segment.live = len(found)
        if not found:
            path.unlink(missing_ok=True)
        return found

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    # --- writing -----------------------------------------------------------------

    def write(self, batch: SpooledBatch) -> None:
        """Store a batch durably (blocking: call it from a thread)."""
        self.write_many([batch])

    def write_many(self, batches: list[SpooledBatch]) -> None:
        """Store batches with one sync (blocking: call it from a thread);
        durably unless ``sync`` is off."""
        if not batches:
            return
        frames: list[bytes] = []
        lengths: list[int] = []
        for batch in batches:
            data = _encoder.encode(batch)
            frames.append(_FRAME.pack(len(data), zlib.crc32(data)))
            frames.append(data)
            lengths.append(len(data))
        with self._lock:
            segment = self._active
            created = False
            if segment is None or segment.size >= self.segment_bytes:
                self._seal()
                segment = self._open_segment(batches[0].seq)
                created = True
            assert segment.fd is not None
            payload = b"".join(frames)
            view = memoryview(payload)
            start = segment.size
            try:
                while view:
                    view = view[os.write(segment.fd, view):]
                if self.sync:
                    _fdatasync(segment.fd)
            except OSError:
                # Whatever part was written is a torn frame for load(): start over in a new segment.
                self._active = None
                os.close(segment.fd)
                segment.fd = None
                if segment.live == 0:
                    segment.path.unlink(missing_ok=True)
                raise
            if created and self.sync:
                _fsync_dir(self.directory)
            pos = start
            for batch, length in zip(batches, lengths, strict=True):
                pos += _FRAME.size
                self._where[batch.seq] = (segment, pos, length)
                pos += length
                self.used_bytes += length
            segment.size = pos
            segment.live += len(batches)

    def _open_segment(self, first_seq: int) -> _Segment:
        path = self.directory / f"{first_seq:012d}.seg"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_CLOEXEC", 0),
                     0o600)
        os.write(fd, MAGIC)
        segment = _Segment(path, len(MAGIC), fd)
        self._active = segment
        return segment

    def _seal(self) -> None:
        """Stop appending to the active segment."""
        segment, self._active = self._active, None
        if segment is None:
            return
        if segment.fd is not None:
            os.close(segment.fd)
            segment.fd = None
        if segment.live == 0:
            segment.path.unlink(missing_ok=True)

    # --- removal and reading ---------------------------------------------------

    def remove(self, seq: int) -> None:
        with self._lock:
            where = self._where.pop(seq, None)
            if where is None:
                return
            segment, _, length = where
            self.used_bytes -= length
            if segment is None:
                self._path(seq).unlink(missing_ok=True)
                return
            segment.live -= 1
            if segment.live == 0:
                if segment is self._active:
                    self._seal()  # the next write starts a new segment
                else:
                    segment.path.unlink(missing_ok=True)

    def read_body(self, seq: int) -> SpooledBatch:
        """A batch not yet removed. No lock: a write's fsync must not block
        the event loop, and the segment of a live batch stays in place."""
        segment, offset, length = self._where[seq]
        if segment is None:
            return _decoder.decode(self._path(seq).read_bytes())
        fd = os.open(segment.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        return _decoder.decode(data)

    def close(self) -> None:
        """Close the active segment (removed if it holds no batch)."""
        with self._lock:
            self._seal()
