"""File events: Linux inotify on the directories the agent reads from, through
ctypes (the standard library; the agent takes no dependency for it).

Events only wake the agent early: what it reads is still decided by looking
at the files (offsets, sizes, identities), and a slower poll (the agent's
``poll_interval``) catches what events miss: network filesystems, writes
through a shared mapping, a directory whose watch could not be added.
Directories are watched, not files: a directory watch reports its entries'
changes (IN_MODIFY of a file written through it, names created, moved and
deleted) with the entry's name, and survives the rotation of the files in it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import sys
from collections.abc import Iterable

log = logging.getLogger("logferry.agent.watch")

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ISDIR = 0x40000000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# Growth and truncation (IN_MODIFY), names appearing and going; IN_ATTRIB
# for a link count reaching 0 (a deleted file still open for writing).
MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ONLYDIR
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
_READ_SIZE = 64 * 1024

# Errors adding a watch that mean the directory is gone or not one (the next
# discovery decides), not that events are missing for a directory we read from.
_GONE = (errno.ENOENT, errno.ENOTDIR)


class Changed:
    """What one drain of the event queue saw."""

    __slots__ = ("dirs", "modified", "named", "overflow")

    def __init__(self) -> None:
        self.modified: set[str] = set()  # files written to or truncated
        self.named: set[str] = set()  # entries created, moved in or out, deleted, or whose links changed
        self.dirs: set[str] = set()  # directories created or moved in (their entries are not watched yet)
        self.overflow = False  # the kernel's queue overflowed: anything may have changed


class FileEvents:
    """An inotify instance watching a set of directories."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError(errno.ENOSYS, "inotify is Linux only")
        libc = ctypes.CDLL(None, use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._add.restype = ctypes.c_int
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = (ctypes.c_int, ctypes.c_int)
        self._rm.restype = ctypes.c_int
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self.fd: int = fd
        self._dirs: dict[str, int] = {}  # directory -> watch descriptor
        self._by_wd: dict[int, str] = {}

    @property
    def watched(self) -> frozenset[str]:
        return frozenset(self._dirs)

    def watch(self, dirs: Iterable[str]) -> list[tuple[str, str]]:
        """Watch exactly ``dirs`` (absolute paths): add the new ones, drop the
        others. Returns the directories that exist but could not be watched,
        with the reason (the watch limit, permissions)."""
        wanted = set(dirs)
        failed: list[tuple[str, str]] = []
        for directory in list(self._dirs):
            if directory not in wanted:
                wd = self._dirs.pop(directory)
                self._by_wd.pop(wd, None)
                self._rm(self.fd, wd)  # EINVAL once the kernel dropped it (directory deleted): nothing to do
        for directory in wanted - self._dirs.keys():
            wd = self._add(self.fd, os.fsencode(directory), MASK)
            if wd < 0:
                code = ctypes.get_errno()
                if code not in _GONE:
                    hint = " (fs.inotify.max_user_watches)" if code == errno.ENOSPC else ""
                    failed.append((directory, os.strerror(code) + hint))
                continue
            # A directory reached by two paths (a symlink) has one watch descriptor.
            old = self._by_wd.get(wd)
            if old is not None:
                self._dirs.pop(old, None)
            self._dirs[directory] = wd
            self._by_wd[wd] = directory
        return failed

    def read(self) -> Changed:
        """Drain the queued events (non-blocking)."""
        changed = Changed()
        by_wd = self._by_wd
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return changed
            except InterruptedError:
                continue
            if not data:
                return changed
            at = 0
            end = len(data)
            while at + _HEADER.size <= end:
                wd, mask, _, size = _HEADER.unpack_from(data, at)
                name_at = at + _HEADER.size
                at = name_at + size
                if mask & IN_Q_OVERFLOW:
                    changed.overflow = True
                    continue
                directory = by_wd.get(wd)
                if mask & IN_IGNORED:  # the directory was deleted or unmounted: its watch is gone
                    if directory is not None:
                        by_wd.pop(wd, None)
                        self._dirs.pop(directory, None)
                    continue
                if directory is None or not size:
                    continue  # a watch dropped meanwhile, or an event on the directory itself
                name = os.fsdecode(data[name_at:at].split(b"\0", 1)[0])
                path = os.path.join(directory, name)
                if mask & IN_ISDIR:
                    if mask & (IN_CREATE | IN_MOVED_TO):
                        changed.dirs.add(path)
                    continue
                if mask & IN_MODIFY:
                    changed.modified.add(path)
                if mask & ~IN_MODIFY:
                    changed.named.add(path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._dirs.clear()
        self._by_wd.clear()


def glob_base(pattern: str) -> str:
    """The directory of a glob pattern before its first wildcard
    (``/var/log/app/*.log`` -> ``/var/log/app``, ``/srv/**/x.log`` -> ``/srv``)."""
    parts = os.path.abspath(os.path.expanduser(pattern)).split(os.sep)
    base: list[str] = []
    for part in parts[:-1]:
        if any(ch in part for ch in "*?["):
            break
        base.append(part)
    return os.sep.join(base) or os.sep
