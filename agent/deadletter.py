"""The dead-letter file: records the collector refused for good, one JSON
object a line, in ``state_dir/dead-letter.ndjson``.

It is size-capped: when an append would take it past ``max_bytes``, it is
rotated by rename first (``dead-letter.ndjson`` -> ``.1`` -> … -> ``.keep``;
the oldest beyond ``keep`` is deleted), so the newest entries are always in
``dead-letter.ndjson``. One append is never split: an append larger than
``max_bytes`` goes whole into a fresh file. ``max_bytes: 0`` never rotates.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("logferry.agent.deadletter")


class DeadLetterFile:
    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep

    def rotated(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")

    def holds(self, batch_id: str) -> bool:
        """Whether an entry of ``batch_id`` is in this file or a rotated one
        (a resent batch whose rejections were dead-lettered before the agent
        stopped, and its checkpoint did not move past it)."""
        needle = b'"batch_id":' + json.dumps(batch_id, ensure_ascii=False).encode()
        for path in (self.path, *(self.rotated(n) for n in range(1, self.keep + 1))):
            try:
                with open(path, "rb") as dead:
                    tail = b""
                    while chunk := dead.read(1 << 20):
                        if needle in tail + chunk:
                            return True
                        tail = chunk[-len(needle):]
            except FileNotFoundError:
                continue
        return False

    def append(self, data: bytes) -> None:
        """Append ``data`` (whole lines) durably, rotating first if it would pass the cap."""
        if self.max_bytes:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size and size + len(data) > self.max_bytes:
                self.rotate()
        with open(self.path, "ab") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())

    def rotate(self) -> None:
        """``.keep`` is deleted, ``.n`` renamed to ``.n+1``, the current file to ``.1``."""
        if self.keep <= 0:
            self.path.unlink(missing_ok=True)
        else:
            self.rotated(self.keep).unlink(missing_ok=True)
            for n in range(self.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.rotated(n), self.rotated(n + 1))
            os.replace(self.path, self.rotated(1))
        # Beyond `keep` (a smaller `keep` than before): nothing may remain.
        prefix = self.path.name + "."
        for old in self.path.parent.iterdir():
            suffix = old.name[len(prefix):] if old.name.startswith(prefix) else ""
            if suffix.isdigit() and int(suffix) > self.keep:
                old.unlink(missing_ok=True)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        log.info("dead-letter file rotated (over %d bytes); keeping %d older files", self.max_bytes, self.keep)
