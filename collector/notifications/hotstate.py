"""The notification system's hot state, behind one small interface.

Dedup windows, the dispatch queue, digest buffers and the preference/user
caches are the state that must be fast and, once several collectors run, shared.
:class:`HotState` is that interface; :class:`MemoryHotState` implements it in
this process for the embedded deployment. A shared implementation (Redis,
Keeper) replaces it without touching the service: every method is async and
each one is a single atomic step (claim, pop, take), which is what makes dedup
and digests safe under concurrency.

Nothing here is the source of truth: storage is. On start the service rebuilds
the hot state from stored notifications, so a restart loses nothing.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Protocol

import msgspec

NOTIFICATION = "notification"
DIGEST = "digest"


class QueueItem(msgspec.Struct, frozen=True, kw_only=True):
    """Something to do at ``due_at`` (Unix seconds): dispatch one notification
    (``kind`` notification, ``key`` its id) or close a digest (``kind`` digest,
    ``key`` the digest key). Among due items, higher ``priority`` goes first."""

    kind: str
    key: str
    due_at: float
    priority: int = 2


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class HotState(Protocol):
    # --- dedup windows ---------------------------------------------------------
    async def claim_dedup(self, key: str, notification_id: str, now: float, window: float) -> str | None:
        """Atomically claim ``key`` for ``notification_id`` until ``now + window``.
        Returns None when claimed, or the id of the notification holding it."""

    async def release_dedup(self, key: str, notification_id: str) -> None:
        """Give up a claim (the notification could not be stored); only its holder can."""

    # --- the dispatch queue ------------------------------------------------------
    async def schedule(self, item: QueueItem) -> None:
        """Add ``item``, replacing an item of the same kind and key."""

    async def unschedule(self, kind: str, key: str) -> None:
        ...

    async def pop_due(self, now: float, limit: int) -> list[QueueItem]:
        """Remove and return up to ``limit`` items due at ``now``: highest
        priority first, then earliest due. Each item is returned once."""

    async def next_due(self) -> float | None:
        """When the earliest waiting item is due (None when empty)."""

    async def queue_size(self) -> int:
        ...

    # --- digest buffers -------------------------------------------------------------
    async def digest_add(self, digest_key: str, notification_ids: list[str]) -> None:
        """Add notifications to a digest (idempotent per id)."""

    async def digest_take(self, digest_key: str) -> list[str]:
        """Atomically remove and return a digest's notifications (in arrival order)."""

    async def digest_size(self, digest_key: str) -> int:
        ...

    # --- caches ------------------------------------------------------------------------
    async def cache_get(self, namespace: str, key: str, now: float) -> Any:
        """The cached value, or :data:`MISSING` (absent or older than its ttl)."""

    async def cache_put(self, namespace: str, key: str, value: Any, now: float, ttl: float) -> None:
        ...

    async def cache_invalidate(self, namespace: str, key: str | None = None) -> None:
        """Forget one key, or the whole namespace when ``key`` is None."""


class MemoryHotState:
    """:class:`HotState` in this process. Every method runs without awaiting,
    so each is atomic on the event loop."""

    def __init__(self, *, max_cache_entries: int = 100_000):
        self._dedup: dict[str, tuple[str, float]] = {}
        self._dedup_expiry: list[tuple[float, str]] = []
        self._items: dict[tuple[str, str], tuple[int, QueueItem]] = {}
        self._waiting: list[tuple[float, int, str, str]] = []
        self._ready: list[tuple[int, float, int, str, str]] = []
        self._seq = itertools.count()
        self._digests: dict[str, dict[str, None]] = {}
        self._cache: dict[str, dict[str, tuple[Any, float]]] = {}
        self._max_cache_entries = max_cache_entries

    # --- dedup -----------------------------------------------------------------------

    def _expire_dedup(self, now: float) -> None:
        while self._dedup_expiry and self._dedup_expiry[0][0] <= now:
            _, key = heapq.heappop(self._dedup_expiry)
            held = self._dedup.get(key)
            if held is not None and held[1] <= now:
                del self._dedup[key]

    async def claim_dedup(self, key: str, notification_id: str, now: float, window: float) -> str | None:
        self._expire_dedup(now)
        held = self._dedup.get(key)
        if held is not None and held[1] > now:
            return held[0]
        expires = now + window
        self._dedup[key] = (notification_id, expires)
        heapq.heappush(self._dedup_expiry, (expires, key))
        return None

    async def release_dedup(self, key: str, notification_id: str) -> None:
        held = self._dedup.get(key)
        if held is not None and held[0] == notification_id:
            del self._dedup[key]

    # --- queue ------------------------------------------------------------------------

    async def schedule(self, item: QueueItem) -> None:
        seq = next(self._seq)
        self._items[(item.kind, item.key)] = (seq, item)
        heapq.heappush(self._waiting, (item.due_at, seq, item.kind, item.key))

    async def unschedule(self, kind: str, key: str) -> None:
        self._items.pop((kind, key), None)

    def _current(self, seq: int, kind: str, key: str) -> QueueItem | None:
        entry = self._items.get((kind, key))
        if entry is None or entry[0] != seq:
            return None
        return entry[1]

    async def pop_due(self, now: float, limit: int) -> list[QueueItem]:
        while self._waiting and self._waiting[0][0] <= now:
            due, seq, kind, key = heapq.heappop(self._waiting)
            item = self._current(seq, kind, key)
            if item is not None:
                heapq.heappush(self._ready, (-item.priority, due, seq, kind, key))
        out: list[QueueItem] = []
        while self._ready and len(out) < limit:
            _, _, seq, kind, key = heapq.heappop(self._ready)
            item = self._current(seq, kind, key)
            if item is not None:
                del self._items[(kind, key)]
                out.append(item)
        return out

    async def next_due(self) -> float | None:
        if self._ready:
            return 0.0
        while self._waiting:
            due, seq, kind, key = self._waiting[0]
            if self._current(seq, kind, key) is not None:
                return due
            heapq.heappop(self._waiting)
        return None

    async def queue_size(self) -> int:
        return len(self._items)

    # --- digests ---------------------------------------------------------------------

    async def digest_add(self, digest_key: str, notification_ids: list[str]) -> None:
        members = self._digests.setdefault(digest_key, {})
        for notification_id in notification_ids:
            members[notification_id] = None

    async def digest_take(self, digest_key: str) -> list[str]:
        return list(self._digests.pop(digest_key, {}))

    async def digest_size(self, digest_key: str) -> int:
        return len(self._digests.get(digest_key, ()))

    # --- caches ------------------------------------------------------------------------

    async def cache_get(self, namespace: str, key: str, now: float) -> Any:
        entry = self._cache.get(namespace, {}).get(key)
        if entry is None or entry[1] <= now:
            return MISSING
        return entry[0]

    async def cache_put(self, namespace: str, key: str, value: Any, now: float, ttl: float) -> None:
        space = self._cache.setdefault(namespace, {})
        if len(space) >= self._max_cache_entries:
            # Drop the oldest insertions; a cache miss only costs a storage read.
            for old in list(itertools.islice(space, len(space) // 10 + 1)):
                del space[old]
        space.pop(key, None)
        space[key] = (value, now + ttl)

    async def cache_invalidate(self, namespace: str, key: str | None = None) -> None:
        if key is None:
            self._cache.pop(namespace, None)
        else:
            self._cache.get(namespace, {}).pop(key, None)
