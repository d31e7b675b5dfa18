"""Batches on disk, from the moment they are closed until they are acknowledged.

Every batch is written here before it is sent (``state_dir/spool/``, one file
per batch, fsynced). After a ``kill -9`` the agent sends the spooled batches
again with the same ``batch_id``, so the collector stores each line once, and
resumes reading files after the last spooled range. While the collector is
away the spool also holds batches of sources that are not files (stdin) and,
up to ``spool.max_bytes``, batches read ahead from files.

A spool file is removed only once the checkpoint covers its ranges (see
:mod:`agent.runner`): until then a crash would re-read those lines.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec


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


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SpooledBatch)


class Spool:
    """The spool directory. ``used_bytes`` counts the files it holds."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.used_bytes = 0
        self._sizes: dict[int, int] = {}
        self._next_seq = 1

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}.batch"

    def load(self) -> list[SpooledBatch]:
        """The batches left by an earlier run, oldest first. Half-written
        temporary files are removed; unreadable ones are set aside."""
        batches: list[SpooledBatch] = []
        for path in sorted(self.directory.iterdir()):
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                continue
            if not path.name.endswith(".batch"):
                continue
            try:
                batch = _decoder.decode(path.read_bytes())
            except (msgspec.DecodeError, OSError):
                path.rename(path.with_suffix(".corrupt"))
                continue
            batches.append(batch)
            self._sizes[batch.seq] = path.stat().st_size
            self.used_bytes += self._sizes[batch.seq]
            self._next_seq = max(self._next_seq, batch.seq + 1)
        return batches

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def write(self, batch: SpooledBatch) -> None:
        """Store a batch durably (blocking: call it from a thread)."""
        data = _encoder.encode(batch)
        path = self._path(batch.seq)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._sizes[batch.seq] = len(data)
        self.used_bytes += len(data)

    def remove(self, seq: int) -> None:
        self._path(seq).unlink(missing_ok=True)
        self.used_bytes -= self._sizes.pop(seq, 0)

    def read_body(self, seq: int) -> SpooledBatch:
        return _decoder.decode(self._path(seq).read_bytes())
