"""Where each file was read up to, as acknowledged by the collector.

The checkpoint file (``state_dir/checkpoints.json``) maps a file id to its
identity and the offset up to which every line is stored by the collector
(or sits in the spool). Identity is device + inode **and** a fingerprint: a
SHA-256 of the file's first bytes, never the bytes themselves (they may hold
personal data). A new file that reuses an inode has different first bytes, so
it is not mistaken for the one already read.

Writes are atomic: a temporary file, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import msgspec

# How many leading bytes make the fingerprint. Shorter files use what they
# have, and the fingerprint grows with them up to this length.
FINGERPRINT_BYTES = 1024


class FileCheckpoint(msgspec.Struct):
    """One file: identity and acknowledged offset."""

    path: str
    dev: int
    ino: int
    fingerprint: str  # sha256 hex of the first `fingerprint_len` bytes
    fingerprint_len: int
    offset: int
    updated: float = 0.0
    # The file's size when last seen (-1: unknown, a checkpoint of an older
    # agent): how much was unread if the file is gone at the next start.
    size: int = -1
    # The source it was read for (its ``source`` name and ``path`` glob), so a
    # file rotated away while the agent was stopped is read with that source.
    source: str = ""
    source_path: str = ""


class CheckpointFile(msgspec.Struct):
    version: int = 1
    agent_id: str = ""
    files: dict[str, FileCheckpoint] = {}


def fingerprint_fd(fd: int, size: int | None = None) -> tuple[str, int]:
    """``(sha256 hex, length)`` of the first bytes of an open file."""
    want = FINGERPRINT_BYTES if size is None else min(size, FINGERPRINT_BYTES)
    data = os.pread(fd, want, 0) if want else b""
    return hashlib.sha256(data).hexdigest(), len(data)


def fingerprint_matches(fd: int, expected: str, length: int) -> bool:
    """Whether the open file starts with the bytes the fingerprint was taken of."""
    data = os.pread(fd, length, 0) if length else b""
    return len(data) == length and hashlib.sha256(data).hexdigest() == expected


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointStore:
    """Loads and saves :class:`CheckpointFile`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "checkpoints.json"
        self._encoder = msgspec.json.Encoder()

    def load(self) -> CheckpointFile | None:
        """The saved checkpoints, or ``None`` on the agent's first start."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgspec.json.decode(data, type=CheckpointFile)
        except msgspec.DecodeError as exc:
            # A torn write cannot happen (rename is atomic); this is a hand edit.
            raise RuntimeError(
                f"{self.path}: unreadable checkpoint file ({exc}); move it away to start over"
            ) from None

    def save(self, state: CheckpointFile) -> None:
        now = time.time()
        for entry in state.files.values():
            if not entry.updated:
                entry.updated = now
        write_atomic(self.path, self._encoder.encode(state))
