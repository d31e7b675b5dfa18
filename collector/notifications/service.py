"""NotificationService: create, plan, dispatch, retry and recover notifications.

The guarantees, and how they are kept:

- **Stored before acknowledged.** ``create`` returns once the PENDING row is
  in storage.
- **Dedup is atomic.** A ``dedup_key`` is claimed in the hot state (one atomic
  step) before anything is stored; a concurrent request with the same user and
  key gets the first notification, once it is stored, with ``created`` False.
- **Priority.** The queue hands out due CRITICAL and HIGH items first; CRITICAL
  ignores every preference, quiet hours and batching; HIGH is never batched.
- **Digests.** A batched notification joins the digest of its window (a key
  derived from user, frequency and the window's close, so a restart re-forms
  the same digest). Closing a digest takes its members atomically, sends one
  message per channel with an idempotency key of the digest, and retries the
  whole digest on transient errors: nothing dropped, nothing sent twice.
- **Retries.** Transient channel errors: exponential backoff with jitter up to
  ``retry.max_attempts``; permanent errors fail the delivery at once with the
  reason. The notification goes QUEUED → FAILED (retry planned) → QUEUED.
- **Never twice.** Deliveries are per (notification, channel) and move one
  way; a delivery that is SENT is never sent again. Senders that are not
  idempotent get a write-ahead mark before the send; after a crash mid-send
  the delivery fails as "outcome unknown" instead of risking a duplicate.
- **Restarts.** ``recover`` reloads PENDING, QUEUED and retry-planned FAILED
  notifications and the dedup windows from storage.

Every update of one notification happens under its lock, on the cached
authoritative copy, so a concurrent mark-read and dispatch cannot lose each
other's changes (ReplacingMergeTree keeps whole rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

from collector.notifications.channels.base import ChannelMessage, DigestItem
from collector.notifications.config import NotificationsConfig
from collector.notifications.hotstate import DIGEST, MISSING, NOTIFICATION, HotState, QueueItem
from collector.notifications.model import (
    IN_APP,
    CreateNotification,
    Delivery,
    DeliveryStatus,
    Notification,
    Priority,
    Status,
    iso,
    utc,
)
from collector.notifications.preferences import (
    DeliveryPlan,
    Frequency,
    Preference,
    PreferenceInput,
    QuietHours,
    plan_delivery,
)
from collector.notifications.repository import NotificationRepository
from collector.notifications.users import UsersDirectory
from plugins.types import ChannelResult, PermanentError, TransientError

log = logging.getLogger("logferry.notifications")

PREFERENCE_CACHE = "preference"
Clock = Callable[[], dt.datetime]


def system_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UnknownChannel(ValueError):
    """A notification names a channel that is not registered or not configured."""


class NotFound(LookupError):
    pass


class DigestRenderer(Protocol):
    """Renders the combined message of a digest; see ``channels.digest``."""

    def render(self, *, channel: str, user_id: str, frequency: str,
               items: Sequence[DigestItem]) -> tuple[str, str, str | None]:
        """``(subject, text, html)`` for the digest of ``items`` on ``channel``."""
        ...


class _Outcome:
    """What happened to one delivery in one attempt."""

    __slots__ = ("delivery", "error", "transient")

    def __init__(self, delivery: Delivery, *, transient: bool = False, error: str | None = None):
        self.delivery = delivery
        self.transient = transient
        self.error = error


def backoff_delay(attempt: int, *, base: float, cap: float, jitter: float,
                  rng: Callable[[], float] = random.random) -> float:
    """Seconds before retry number ``attempt`` (1 = the first retry):
    ``base · 2^(attempt-1)`` capped at ``cap``, spread by ±``jitter``."""
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    return max(0.0, delay * (1 + jitter * (2 * rng() - 1)))


class NotificationService:
    """Create with the collaborators, ``await recover()``, ``start()``; ``await stop()``."""

    def __init__(
        self,
        *,
        repository: NotificationRepository,
        hot: HotState,
        users: UsersDirectory,
        senders: Mapping[str, Any],
        config: NotificationsConfig,
        renderer: DigestRenderer,
        clock: Clock = system_clock,
        on_event: Callable[[str, Mapping[str, Any]], None] | None = None,
        on_sent: Callable[[Mapping[str, Any], Mapping[str, Any]], Awaitable[None]] | None = None,
        rng: Callable[[], float] = random.random,
    ):
        self.repo = repository
        self.hot = hot
        self.users = users
        self.senders = dict(senders)
        self.config = config
        self.renderer = renderer
        self.clock = clock
        self.on_event = on_event
        self.on_sent = on_sent
        self.rng = rng
        self.live = LiveInbox()
        self._locks: dict[str, asyncio.Lock] = {}
        self._cache: OrderedDict[str, Notification] = OrderedDict()
        self._deliveries: dict[str, list[Delivery]] = {}
        self._creating: dict[str, asyncio.Future[None]] = {}
        #: Notifications this process created (and still caches): their first
        #: attempt's idempotency keys cannot have been used by anyone before.
        self._born_here: set[str] = set()
        self._by_provider_id: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(config.max_concurrent_sends)
        self.stats: dict[str, int] = {"created": 0, "deduplicated": 0, "sent": 0, "failed": 0,
                                      "retried": 0, "cancelled": 0, "digests": 0}
        #: (notification id, channel) → monotonic seconds when the channel send returned (bench)
        self.send_observer: Callable[[str, str], None] | None = None

    # --- small helpers ---------------------------------------------------------

    def now(self) -> dt.datetime:
        return utc(self.clock())

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            if len(self._locks) > 50_000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _remember(self, n: Notification) -> None:
        self._cache[n.id] = n
        self._cache.move_to_end(n.id)
        while len(self._cache) > 20_000:
            old, _ = self._cache.popitem(last=False)
            self._deliveries.pop(old, None)
            self._born_here.discard(old)

    async def _load(self, notification_id: str) -> Notification | None:
        n = self._cache.get(notification_id)
        if n is not None:
            return n
        n = await self.repo.get_notification(notification_id)
        if n is not None:
            self._remember(n)
        return n

    async def _load_deliveries(self, n: Notification) -> list[Delivery]:
        found = self._deliveries.get(n.id)
        if found is None:
            found = await self.repo.deliveries(n.id)
            self._deliveries[n.id] = found
        return found

    async def _save(self, notifications: Sequence[Notification], deliveries: Sequence[Delivery] = ()) -> None:
        if deliveries:
            await asyncio.gather(self.repo.save_notifications(notifications), self.repo.save_deliveries(deliveries))
        else:
            await self.repo.save_notifications(notifications)

    def _emit(self, event: str, n: Notification, **extra: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, {"event": event, "notification": n.to_dict(), **extra})
            except Exception:
                log.exception("notification event subscriber failed")

    def configured_channels(self) -> list[str]:
        return sorted(self.senders)

    def check_channels(self, channels: Iterable[str]) -> None:
        unknown = [c for c in channels if c not in self.senders]
        if unknown:
            raise UnknownChannel(
                f"channels: {', '.join(repr(c) for c in unknown)} not configured "
                f"(configured: {', '.join(self.configured_channels())})")

    # --- creating ----------------------------------------------------------------

    async def create(self, request: CreateNotification, *, created_by: str) -> tuple[dict[str, Any], bool]:
        """Store a notification and plan its delivery.

        Returns the stored notification (the spec's field names) and ``created``:
        False when ``dedup_key`` matched a notification of the same user within
        the dedup window; that notification is returned instead. Raises
        :class:`UnknownChannel` (a ValueError) for channels that are not configured.
        """
        self.check_channels(request.channels)
        notification_id = str(uuid.uuid4())
        now = self.now()
        scope = None
        if request.dedup_key is not None:
            scope = f"{request.user_id}\x1f{request.dedup_key}"
            for attempt in itertools.count():
                holder = await self.hot.claim_dedup(scope, notification_id, now.timestamp(),
                                                    self.config.dedup_window)
                if holder is None:
                    break
                pending = self._creating.get(holder)
                if pending is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(pending)
                existing = await self._load(holder)
                if existing is not None:
                    self.stats["deduplicated"] += 1
                    return existing.to_dict(), False
                # The holder is not readable: its insert failed (and its claim was
                # released), or another collector has not stored it yet.
                if attempt >= 100:
                    raise TimeoutError(f"dedup_key {request.dedup_key!r} is held by a notification "
                                       "that cannot be read yet")
                await asyncio.sleep(0.02)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._creating[notification_id] = done
        try:
            n = Notification(
                id=notification_id, user_id=request.user_id, type=request.type,
                priority=request.priority_level, title=request.title, message=request.message,
                data=request.data, channels=list(request.channels), created_at=now,
                scheduled_for=request.scheduled_for, dedup_key=request.dedup_key, created_by=created_by,
            )
            try:
                await self.repo.save_notifications([n])
            except BaseException:
                if scope is not None:
                    await self.hot.release_dedup(scope, notification_id)
                raise
            self._remember(n)
            self._deliveries[n.id] = []
            self._born_here.add(n.id)
        finally:
            done.set_result(None)
            self._creating.pop(notification_id, None)
        self.stats["created"] += 1
        self._emit("created", n)
        async with self._lock(n.id):
            await self._admit(n)
        return n.to_dict(), True

    async def _plan(self, n: Notification, reference: dt.datetime | None = None) -> DeliveryPlan:
        preference = None if n.priority is Priority.CRITICAL else await self.preference(n.user_id, n.type)
        tz = await self.users.timezone_of(n.user_id) if preference is not None else "UTC"
        if reference is None:
            reference = n.created_at if n.scheduled_for is None else max(n.created_at, n.scheduled_for)
        return plan_delivery(
            user_id=n.user_id, notification_type=n.type, priority=n.priority, requested=n.channels,
            reference=reference, preference=preference, default_channels=self.config.default_channels,
            user_timezone=tz, digest_time=self.config.digest_local_time,
        )

    async def _admit(self, n: Notification) -> None:
        """Plan a PENDING notification and put it in the queue (or its digest);
        cancel it when preferences allow no channel. Caller holds its lock."""
        plan = await self._plan(n)
        if not plan.channels:
            n.transition(Status.CANCELLED)
            n.error_message = plan.reason
            await self._save([n])
            self.stats["cancelled"] += 1
            self._emit("cancelled", n)
            return
        await self._enqueue(n, plan, plan.due_at)

    async def _enqueue(self, n: Notification, plan: DeliveryPlan, due: dt.datetime) -> None:
        if plan.digest_key is not None:
            await self.hot.digest_add(plan.digest_key, [n.id])
            await self.hot.schedule(QueueItem(kind=DIGEST, key=plan.digest_key, due_at=due.timestamp(),
                                              priority=int(Priority.LOW)))
        else:
            await self.hot.schedule(QueueItem(kind=NOTIFICATION, key=n.id, due_at=due.timestamp(),
                                              priority=int(n.priority)))
        self.wake()

    # --- reading --------------------------------------------------------------------

    async def get(self, notification_id: str) -> dict[str, Any] | None:
        """The notification with its deliveries, or None."""
        n = await self._load(notification_id)
        if n is None:
            return None
        deliveries = await self.repo.deliveries(notification_id)
        out = n.to_dict()
        out["deliveries"] = [d.to_dict() for d in deliveries]
        return out

    async def cancel(self, notification_id: str) -> dict[str, Any]:
        """PENDING → CANCELLED; raises NotFound or InvalidTransition."""
        async with self._lock(notification_id):
            n = await self._load(notification_id)
            if n is None:
                raise NotFound(notification_id)
            n.transition(Status.CANCELLED)
            n.error_message = "cancelled"
            await self._save([n])
            await self.hot.unschedule(NOTIFICATION, n.id)
        self.stats["cancelled"] += 1
        self._emit("cancelled", n)
        return n.to_dict()

    # --- preferences ------------------------------------------------------------------

    async def preference(self, user_id: str, notification_type: str) -> Preference | None:
        """The user's preference for a type, cached in the hot state."""
        key = f"{user_id}\x1f{notification_type}"
        now = time.time()
        cached = await self.hot.cache_get(PREFERENCE_CACHE, key, now)
        if cached is not MISSING:
            return cached  # type: ignore[no-any-return]
        found = await self.repo.preference(user_id, notification_type)
        await self.hot.cache_put(PREFERENCE_CACHE, key, found, now, self.config.cache_ttl)
        return found

    async def preferences(self, user_id: str) -> list[Preference]:
        return await self.repo.preferences(user_id)

    async def set_preference(self, user_id: str, notification_type: str, data: PreferenceInput) -> Preference:
        self.check_channels(c for c, on in data.channels.items() if on)
        key = f"{user_id}\x1f{notification_type}"
        async with self._lock("pref:" + key):
            existing = await self.repo.preference(user_id, notification_type)
            now = self.now()
            preference = Preference(
                id=existing.id if existing else str(uuid.uuid4()), user_id=user_id,
                notification_type=notification_type, enabled=data.enabled, channels=dict(data.channels),
                quiet_hours=data.quiet_hours, frequency=Frequency(data.frequency),
                created_at=existing.created_at if existing else now, updated_at=now,
            )
            await self.repo.save_preference(preference)
            await self.hot.cache_invalidate(PREFERENCE_CACHE, key)
        return preference

    async def pending_queue(self, user_id: str) -> list[dict[str, Any]]:
        """The spec's query 2, plus the channels each will actually use."""
        rows = await self.repo.pending_queue(user_id)
        out = []
        for row in rows:
            n = await self._load(row["id"])
            plan = await self._plan(n) if n is not None else None
            out.append({
                "id": row["id"], "type": row["type"], "priority": row["priority"], "title": row["title"],
                "channels": list(row["channels"]),
                "created_at": iso(row["created_at"]), "scheduled_for": iso(row["scheduled_for"]),
                "preference": None if not row["has_preference"] else {
                    "enabled": bool(row["preference_enabled"]),
                    "channels": dict(row["preference_channels"] or {}),
                    "frequency": row["frequency"],
                },
                "effective_channels": list(plan.channels) if plan else [],
                "due_at": iso(plan.due_at) if plan and plan.channels else None,
                "digest": plan.frequency.value if plan and plan.batched else None,
            })
        return out

    # --- the inbox -----------------------------------------------------------------------

    async def inbox(self, user_id: str, *, unread_only: bool = False, limit: int = 50,
                    before: tuple[dt.datetime, str] | None = None) -> tuple[list[dict[str, Any]], int]:
        """A user's in-app notifications (newest first) and the unread count."""
        rows, unread = await asyncio.gather(
            self.repo.inbox(user_id, unread_only=unread_only, limit=limit, before=before),
            self.repo.unread_count(user_id))
        return [self._current(n).to_dict() for n in rows], unread

    async def unread_count(self, user_id: str) -> int:
        return await self.repo.unread_count(user_id)

    def _current(self, n: Notification) -> Notification:
        cached = self._cache.get(n.id)
        return cached if cached is not None else n

    async def mark_read(self, user_id: str, notification_id: str) -> tuple[dict[str, Any], int]:
        """Mark one of the user's in-app notifications read; returns it and the
        unread count after the change. NotFound for anything not in their inbox."""
        async with self._lock(notification_id):
            n = await self._load(notification_id)
            if n is None or n.user_id != user_id or n.inbox_at is None:
                raise NotFound(notification_id)
            if n.read_at is None:
                n.read_at = self.now()
                await self._save([n])
        unread = await self.repo.unread_count(user_id)
        self.live.publish(user_id, "read", {"id": n.id, "unread_count": unread})
        return n.to_dict(), unread

    async def mark_all_read(self, user_id: str) -> int:
        """Mark every unread in-app notification of the user read; returns how many."""
        ids = await self.repo.unread_ids(user_id)
        changed = 0
        for notification_id in ids:
            async with self._lock(notification_id):
                n = await self._load(notification_id)
                if n is not None and n.read_at is None and n.user_id == user_id:
                    n.read_at = self.now()
                    await self._save([n])
                    changed += 1
        self.live.publish(user_id, "read", {"ids": ids, "unread_count": await self.repo.unread_count(user_id)})
        return changed

    async def forget_user(self, user_id: str) -> None:
        """Drop what this process remembers of a user (after their data was
        erased from storage): cached notifications, deliveries, preferences."""
        for notification_id in [i for i, n in self._cache.items() if n.user_id == user_id]:
            n = self._cache[notification_id]
            if n.dedup_key is not None:
                await self.hot.release_dedup(f"{user_id}\x1f{n.dedup_key}", notification_id)
            self._cache.pop(notification_id, None)
            self._deliveries.pop(notification_id, None)
            self._born_here.discard(notification_id)
            await self.hot.unschedule(NOTIFICATION, notification_id)
        await self.hot.cache_invalidate(PREFERENCE_CACHE)
        await self.users.forget(user_id)

    # --- status callbacks from providers ---------------------------------------------------

    async def delivery_status(self, channel: str, provider_message_id: str, status: DeliveryStatus, *,
                              error: str | None = None, metadata: Mapping[str, Any] | None = None) -> bool:
        """Apply a provider's status report (Twilio's callback) to a delivery.
        Reports that would move a delivery backwards are ignored (one-way)."""
        notification_id = self._by_provider_id.get((channel, provider_message_id))
        if notification_id is None:
            stored = await self.repo.delivery_by_provider_id(channel, provider_message_id)
            if stored is None:
                return False
            notification_id = stored.notification_id
        async with self._lock(notification_id):
            n = await self._load(notification_id)
            if n is None:
                return False
            current = next((d for d in await self._load_deliveries(n)
                            if d.channel == channel and d.provider_message_id == provider_message_id), None)
            if current is None:
                return False
            if status not in (DeliveryStatus.DELIVERED, DeliveryStatus.FAILED):
                return True
            if current.status is not DeliveryStatus.SENT:
                # Already final (or not yet sent): status reports only move forward.
                return True
            current.transition(status, self.now())
            if error:
                current.error_message = error
            if metadata:
                current.metadata = {**(current.metadata or {}), **metadata}
            await self.repo.save_deliveries([current])
        return True

    # --- dispatching ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="notifications:dispatch")

    async def stop(self) -> None:
        """Stop taking work, let sends in flight finish (5 s), cancel the rest."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=5)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for sender in self.senders.values():
            close = getattr(sender, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("a channel failed to close")

    async def _run(self) -> None:
        while True:
            try:
                # Cleared before looking, so a wake() from now on is not missed.
                self._wake.clear()
                await self._spawn_due()
                next_due = await self.hot.next_due()
                if len(self._tasks) >= self.config.max_concurrent_sends or next_due is None:
                    timeout = 1.0  # a finishing task or a new item wakes us sooner
                else:
                    timeout = min(1.0, max(0.0, next_due - self.now().timestamp()))
                if timeout > 0:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for's inner task can leave a
                    # cancelled caller hanging (a stuck collector shutdown, seen in CI).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(timeout):
                            await self._wake.wait()
                else:
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("notification dispatcher failed; continuing")
                await asyncio.sleep(0.5)

    async def _spawn_due(self) -> None:
        while True:
            free = self.config.max_concurrent_sends - len(self._tasks)
            if free <= 0:
                return
            items = await self.hot.pop_due(self.now().timestamp(), free)
            if not items:
                return
            for item in items:
                task = asyncio.get_running_loop().create_task(self._process(item))
                self._tasks.add(task)
                task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("notification processing failed", exc_info=task.exception())
        self.wake()

    async def drain(self, within: float = 10.0) -> None:
        """Process everything due now (by the service's clock) and wait for it:
        tests advance a manual clock, then drain. TimeoutError after ``within`` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            await self._spawn_due()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=max(0.01, deadline - time.monotonic()))
                continue
            next_due = await self.hot.next_due()
            if next_due is None or next_due > self.now().timestamp():
                return
        raise TimeoutError("notifications still in flight")

    async def _process(self, item: QueueItem) -> None:
        async with self._slots:
            if item.kind == NOTIFICATION:
                await self._deliver_one(item.key)
            elif item.kind == DIGEST:
                await self._deliver_digest(item.key)

    async def _deliver_one(self, notification_id: str) -> None:
        async with self._lock(notification_id):
            n = await self._load(notification_id)
            if n is None or n.is_final:
                return
            if n.status is Status.PENDING:
                plan = await self._plan(n)
                if not plan.channels:
                    await self._admit(n)
                    return
                if plan.digest_key is not None or plan.due_at > self.now() + dt.timedelta(milliseconds=5):
                    # The preference changed while it waited: follow the new plan.
                    await self._enqueue(n, plan, plan.due_at)
                    return
                deliveries, stored = await self._begin([n], {n.id: plan.channels})
            else:
                deliveries, stored = await self._resume([n]), None
            try:
                outcomes = await asyncio.gather(*(self._send(n, d) for d in deliveries[n.id]
                                                  if d.status is DeliveryStatus.PENDING))
            finally:
                if stored is not None:
                    await stored
            await self._finish([(n, list(outcomes))])

    async def _begin(self, notifications: Sequence[Notification], channels: Mapping[str, Sequence[str]]
                     ) -> tuple[dict[str, list[Delivery]], asyncio.Task[None] | None]:
        """PENDING → QUEUED with one PENDING delivery per channel.

        When every channel is idempotent the rows are stored while the sends
        run (the returned task; await it before finishing): after a crash the
        notification is still PENDING, is sent again, and the channels'
        idempotency keys make that second send a no-op. Otherwise they are
        stored before returning (the write-ahead that non-idempotent sends need).
        """
        now = self.now()
        created: list[Delivery] = []
        out: dict[str, list[Delivery]] = {}
        for n in notifications:
            existing = {d.channel: d for d in await self._load_deliveries(n)}
            for channel in channels[n.id]:
                if channel not in existing:
                    d = Delivery(id=str(uuid.uuid4()), notification_id=n.id, channel=channel,
                                 user_id=n.user_id, created_at=now)
                    existing[channel] = d
                    created.append(d)
            out[n.id] = self._deliveries[n.id] = list(existing.values())
            n.transition(Status.QUEUED)
            n.delivery_attempts += 1
            n.next_attempt_at = None
        idempotent = all(getattr(self.senders.get(c), "idempotent", False)
                         for n in notifications for c in channels[n.id])
        rows = ([self.repo.notification_row(n) for n in notifications],
                [self.repo.delivery_row(d) for d in created])
        if idempotent:
            return out, asyncio.get_running_loop().create_task(self.repo.save_snapshot(*rows))
        await self.repo.save_snapshot(*rows)
        return out, None

    async def _resume(self, notifications: Sequence[Notification]) -> dict[str, list[Delivery]]:
        """A retry (FAILED → QUEUED) or a QUEUED notification found after a restart."""
        out: dict[str, list[Delivery]] = {}
        created: list[Delivery] = []
        for n in notifications:
            out[n.id] = await self._load_deliveries(n)
            if not out[n.id]:
                # Stopped between storing QUEUED and its deliveries: plan them again.
                plan = await self._plan(n)
                now = self.now()
                out[n.id] = self._deliveries[n.id] = [
                    Delivery(id=str(uuid.uuid4()), notification_id=n.id, channel=c, user_id=n.user_id,
                             created_at=now) for c in plan.channels]
                created.extend(out[n.id])
            if n.status is Status.FAILED:
                n.transition(Status.QUEUED)
                self.stats["retried"] += 1
            n.delivery_attempts += 1
            n.next_attempt_at = None
        await self._save(notifications, created)
        return out

    async def _message(self, n: Notification, d: Delivery, address: Any) -> ChannelMessage:
        return ChannelMessage(
            notification_id=n.id, delivery_id=d.id, channel=d.channel, user_id=n.user_id, type=n.type,
            priority=n.priority.name, title=n.title, message=n.message, data=n.data, address=address,
            idempotency_key=f"notification:{n.id}:{d.channel}", attempt=n.delivery_attempts,
            subject=n.title, text=n.message,
            first_send=n.delivery_attempts == 1 and n.id in self._born_here,
        )

    async def _send(self, n: Notification, d: Delivery) -> _Outcome:
        sender = self.senders.get(d.channel)
        if sender is None:
            return self._permanent(d, f"channel {d.channel!r} is no longer configured")
        address = None
        if getattr(sender, "needs_address", True):
            try:
                address = await self.users.address(n.user_id, d.channel)
            except Exception as exc:
                log.exception("address lookup failed")
                return _Outcome(d, transient=True, error=f"address lookup failed: {exc}")
            if address is None:
                return self._permanent(d, f"no {d.channel} address for user {n.user_id!r}")
        message = await self._message(n, d, address)
        return await self._send_message(sender, message, [d])

    async def _send_message(self, sender: Any, message: ChannelMessage, deliveries: Sequence[Delivery]) -> _Outcome:
        """Send one message on behalf of ``deliveries`` (one, or a digest's) and
        record the result on each; returns the outcome of the first."""
        idempotent = bool(getattr(sender, "idempotent", False))
        if not idempotent:
            for d in deliveries:
                d.metadata = {**(d.metadata or {}), "in_flight": message.attempt}
            await self.repo.save_deliveries(deliveries)
        try:
            result = await sender.send(message)
        except PermanentError as exc:
            outcome = [self._permanent(d, str(exc) or type(exc).__name__) for d in deliveries]
        except (TransientError, TimeoutError, OSError) as exc:
            outcome = [_Outcome(d, transient=True, error=str(exc) or type(exc).__name__) for d in deliveries]
        except Exception as exc:
            # A plugin's unexpected error: retried (attempts are capped) and logged.
            log.exception("channel %s raised", message.channel)
            outcome = [_Outcome(d, transient=True, error=f"{type(exc).__name__}: {exc}") for d in deliveries]
        else:
            if self.send_observer is not None:
                self.send_observer(message.notification_id, message.channel)
            if not isinstance(result, ChannelResult):
                result = ChannelResult() if result is None else msgspec.convert(result, ChannelResult)
            now = self.now()
            outcome = []
            for d in deliveries:
                d.transition(DeliveryStatus.SENT, now)
                d.provider_message_id = result.provider_message_id
                if result.provider_message_id:
                    self._by_provider_id[(d.channel, result.provider_message_id)] = d.notification_id
                    while len(self._by_provider_id) > 20_000:
                        self._by_provider_id.popitem(last=False)
                d.error_message = None
                meta = {k: v for k, v in (d.metadata or {}).items() if k not in ("in_flight", "last_error")}
                meta.update(result.metadata or {})
                d.metadata = meta or None
                outcome.append(_Outcome(d))
        for o in outcome:
            if o.transient:
                meta = {k: v for k, v in (o.delivery.metadata or {}).items() if k != "in_flight"}
                meta["last_error"] = o.error
                o.delivery.metadata = meta
                o.delivery.error_message = o.error
        return outcome[0]

    def _permanent(self, d: Delivery, reason: str) -> _Outcome:
        d.transition(DeliveryStatus.FAILED, self.now())
        d.error_message = reason
        if d.metadata:
            d.metadata = {k: v for k, v in d.metadata.items() if k != "in_flight"} or None
        return _Outcome(d, error=reason)

    async def _finish(self, results: Sequence[tuple[Notification, list[_Outcome]]],
                      digest_key: str | None = None) -> None:
        """Store the deliveries and each notification's new state; plan retries."""
        now = self.now()
        deliveries: list[Delivery] = []
        retry_at: dt.datetime | None = None
        to_retry: list[Notification] = []
        newly_inboxed: list[Notification] = []
        sent: list[tuple[Notification, Delivery]] = []
        for n, outcomes in results:
            all_deliveries = self._deliveries.get(n.id) or [o.delivery for o in outcomes]
            deliveries.extend(o.delivery for o in outcomes)
            for o in outcomes:
                if o.delivery.status is DeliveryStatus.SENT:
                    sent.append((n, o.delivery))
                    if o.delivery.channel == IN_APP and n.inbox_at is None:
                        n.inbox_at = now
                        newly_inboxed.append(n)
            transient = [o for o in outcomes if o.transient]
            if transient and n.delivery_attempts < self.config.retry.max_attempts:
                delay = backoff_delay(n.delivery_attempts, base=self.config.retry.base_delay,
                                      cap=self.config.retry.max_delay, jitter=self.config.retry.jitter, rng=self.rng)
                # A digest retries as one: every member gets the same time.
                if digest_key is None or retry_at is None:
                    retry_at = now + dt.timedelta(seconds=delay)
                when = retry_at
                n.transition(Status.FAILED)
                n.next_attempt_at = when
                n.error_message = "; ".join(f"{o.delivery.channel}: {o.error}" for o in transient) + \
                    f" (attempt {n.delivery_attempts} of {self.config.retry.max_attempts}; retrying)"
                to_retry.append(n)
                continue
            for o in transient:
                self._permanent(o.delivery, f"gave up after {n.delivery_attempts} attempts: {o.error}")
            failures = [d for d in all_deliveries if d.status is DeliveryStatus.FAILED]
            delivered = [d for d in all_deliveries if d.status in (DeliveryStatus.SENT, DeliveryStatus.DELIVERED)]
            n.next_attempt_at = None
            n.error_message = "; ".join(f"{d.channel}: {d.error_message}" for d in failures) or None
            if delivered:
                n.transition(Status.SENT)
                n.sent_at = now
                self.stats["sent"] += 1
            else:
                n.transition(Status.FAILED)
                self.stats["failed"] += 1
        await self._save([n for n, _ in results], deliveries)
        for n in newly_inboxed:
            self.live.publish(n.user_id, "notification", n.to_dict())
        for n, _ in results:
            self._emit(n.status.value.lower(), n)
        if to_retry:
            if digest_key is not None:
                await self.hot.digest_add(digest_key, [n.id for n in to_retry])
                assert retry_at is not None
                await self.hot.schedule(QueueItem(kind=DIGEST, key=digest_key, due_at=retry_at.timestamp(),
                                                  priority=int(Priority.LOW)))
            else:
                for n in to_retry:
                    assert n.next_attempt_at is not None
                    await self.hot.schedule(QueueItem(kind=NOTIFICATION, key=n.id,
                                                      due_at=n.next_attempt_at.timestamp(), priority=int(n.priority)))
            self.wake()
        if self.on_sent is not None:
            for n, d in sent:
                try:
                    await self.on_sent(n.to_dict(), d.to_dict())
                except Exception:
                    log.exception("logferry_notification_sent observer failed")

    # --- digests --------------------------------------------------------------------------------

    async def _deliver_digest(self, digest_key: str) -> None:
        async with self._lock("digest:" + digest_key):
            ids = await self.hot.digest_take(digest_key)
            if not ids:
                return
            locks = [self._lock(i) for i in sorted(ids)]
            async with contextlib.AsyncExitStack() as stack:
                for lock in locks:
                    await stack.enter_async_context(lock)
                await self._deliver_digest_locked(digest_key, ids)

    async def _deliver_digest_locked(self, digest_key: str, ids: list[str]) -> None:
        members: list[Notification] = []
        for notification_id in ids:
            n = await self._load(notification_id)
            if n is not None and not n.is_final:
                members.append(n)
        fresh: list[Notification] = []
        plans: dict[str, Sequence[str]] = {}
        for n in members:
            if n.status is Status.PENDING:
                plan = await self._plan(n)
                if not plan.channels or plan.digest_key != digest_key:
                    # Preferences changed since it joined: follow the new plan.
                    if plan.channels:
                        await self._enqueue(n, plan, plan.due_at)
                    else:
                        await self._admit(n)
                    continue
                fresh.append(n)
                plans[n.id] = plan.channels
        resumed = [n for n in members if n.status is not Status.PENDING]
        if not fresh and not resumed:
            return
        deliveries: dict[str, list[Delivery]] = {}
        stored: asyncio.Task[None] | None = None
        if fresh:
            begun, stored = await self._begin(fresh, plans)
            deliveries.update(begun)
        if resumed:
            deliveries.update(await self._resume(resumed))
        batch = sorted(fresh + resumed, key=lambda n: (n.created_at, n.id))
        by_id = {n.id: n for n in batch}
        by_channel: dict[str, list[tuple[Notification, Delivery]]] = {}
        for n in batch:
            for d in deliveries[n.id]:
                if d.status is DeliveryStatus.PENDING:
                    by_channel.setdefault(d.channel, []).append((n, d))
        outcomes: dict[str, list[_Outcome]] = {n.id: [] for n in batch}
        frequency = digest_key.split("|")[1] if "|" in digest_key else Frequency.BATCHED_HOURLY.value

        async def send_channel(channel: str, pairs: list[tuple[Notification, Delivery]]) -> None:
            sender = self.senders.get(channel)
            if sender is None:
                for n, d in pairs:
                    outcomes[n.id].append(self._permanent(d, f"channel {channel!r} is no longer configured"))
                return
            if channel == IN_APP or len(pairs) == 1:
                # The inbox keeps notifications one by one (each has its own read
                # state); a digest of one is just that notification.
                results = await asyncio.gather(*(self._send(n, d) for n, d in pairs))
                for (n, _), o in zip(pairs, results, strict=True):
                    outcomes[n.id].append(o)
                return
            user_id = pairs[0][0].user_id
            address = None
            if getattr(sender, "needs_address", True):
                try:
                    address = await self.users.address(user_id, channel)
                except Exception as exc:
                    for n, d in pairs:
                        outcomes[n.id].append(_Outcome(d, transient=True, error=f"address lookup failed: {exc}"))
                    return
                if address is None:
                    for n, d in pairs:
                        outcomes[n.id].append(self._permanent(d, f"no {channel} address for user {user_id!r}"))
                    return
            items = [DigestItem(notification_id=n.id, type=n.type, priority=n.priority.name, title=n.title,
                                message=n.message, data=n.data, created_at=iso(n.created_at) or "")
                     for n, _ in pairs]
            subject, text, html = self.renderer.render(channel=channel, user_id=user_id, frequency=frequency,
                                                       items=items)
            message = ChannelMessage(
                notification_id=digest_key, delivery_id=pairs[0][1].id, channel=channel, user_id=user_id,
                type="digest", priority=max(n.priority for n, _ in pairs).name, title=subject, message=text,
                data={"notification_ids": [n.id for n, _ in pairs]}, address=address,
                idempotency_key=f"digest:{digest_key}:{channel}",
                attempt=max(n.delivery_attempts for n, _ in pairs),
                subject=subject, text=text, html=html, items=items,
            )
            ds = [d for _, d in pairs]
            await self._send_message(sender, message, ds)
            for n, d in pairs:
                if d.status is DeliveryStatus.SENT:
                    d.metadata = {**(d.metadata or {}), "digest": digest_key, "digest_size": len(pairs)}
                    outcomes[n.id].append(_Outcome(d))
                elif d.status is DeliveryStatus.FAILED:
                    outcomes[n.id].append(_Outcome(d, error=d.error_message))
                else:
                    outcomes[n.id].append(_Outcome(d, transient=True, error=d.error_message))

        try:
            await asyncio.gather(*(send_channel(c, pairs) for c, pairs in by_channel.items()))
        finally:
            if stored is not None:
                await stored
        self.stats["digests"] += 1
        await self._finish([(by_id[i], outcomes[i]) for i in by_id], digest_key=digest_key)

    # --- restarts ----------------------------------------------------------------------------------

    async def recover(self) -> int:
        """Rebuild the hot state from storage: dedup windows, and every PENDING,
        QUEUED or retry-planned FAILED notification back in the queue or its
        digest. Returns how many notifications were resumed."""
        now = self.now()
        window = self.config.dedup_window
        for n in await self.repo.recent_dedup_keys(now - dt.timedelta(seconds=window)):
            assert n.dedup_key is not None
            await self.hot.claim_dedup(f"{n.user_id}\x1f{n.dedup_key}", n.id, n.created_at.timestamp(), window)
        active = await self.repo.active_notifications()
        deliveries = await self.repo.deliveries_of([n.id for n in active])
        unknown: list[Delivery] = []
        for n in active:
            self._remember(n)
            self._deliveries[n.id] = deliveries.get(n.id, [])
            for d in self._deliveries[n.id]:
                sender = self.senders.get(d.channel)
                idempotent = bool(getattr(sender, "idempotent", False))
                if d.status is DeliveryStatus.PENDING and (d.metadata or {}).get("in_flight") and not idempotent:
                    self._permanent(d, "outcome unknown: the collector stopped during the send; "
                                       "not sent again to avoid a duplicate")
                    unknown.append(d)
        if unknown:
            await self.repo.save_deliveries(unknown)
        digest_due: dict[str, float] = {}
        for n in active:
            async with self._lock(n.id):
                if n.status is Status.PENDING:
                    plan = await self._plan(n)
                    if not plan.channels:
                        await self._admit(n)
                        continue
                    if plan.digest_key is not None:
                        await self.hot.digest_add(plan.digest_key, [n.id])
                        digest_due[plan.digest_key] = max(digest_due.get(plan.digest_key, 0.0),
                                                          plan.due_at.timestamp())
                    else:
                        await self._enqueue(n, plan, plan.due_at)
                    continue
                # QUEUED (interrupted) or FAILED with a retry planned: deliveries are fixed.
                due = n.next_attempt_at or now
                plan = await self._plan(n)
                if plan.digest_key is not None and plan.channels:
                    await self.hot.digest_add(plan.digest_key, [n.id])
                    digest_due[plan.digest_key] = max(digest_due.get(plan.digest_key, 0.0), due.timestamp(),
                                                      plan.due_at.timestamp())
                else:
                    await self.hot.schedule(QueueItem(kind=NOTIFICATION, key=n.id, due_at=due.timestamp(),
                                                      priority=int(n.priority)))
        for key, due_ts in digest_due.items():
            await self.hot.schedule(QueueItem(kind=DIGEST, key=key, due_at=due_ts, priority=int(Priority.LOW)))
        self.wake()
        if active:
            log.info("notifications resumed after start", extra={"count": len(active)})
        return len(active)


class LiveInbox:
    """Live in-app events per user for ``GET /v1/me/notifications/stream``."""

    def __init__(self, queue_size: int = 256):
        self._subscribers: dict[str, set[asyncio.Queue[tuple[str, dict[str, Any]]]]] = {}
        self.queue_size = queue_size

    def subscribe(self, user_id: str) -> asyncio.Queue[tuple[str, dict[str, Any]]]:
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(self.queue_size)
        self._subscribers.setdefault(user_id, set()).add(queue)
        return queue

    def unsubscribe(self, user_id: str, queue: asyncio.Queue[tuple[str, dict[str, Any]]]) -> None:
        subs = self._subscribers.get(user_id)
        if subs is not None:
            subs.discard(queue)
            if not subs:
                del self._subscribers[user_id]

    def publish(self, user_id: str, event: str, data: dict[str, Any]) -> None:
        for queue in list(self._subscribers.get(user_id, ())):
            try:
                queue.put_nowait((event, data))
            except asyncio.QueueFull:
                # A stalled client: tell it to resync instead of blocking dispatch.
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(("resync", {}))

    def subscribers(self, user_id: str) -> int:
        return len(self._subscribers.get(user_id, ()))


__all__ = ["CreateNotification", "DigestRenderer", "NotFound", "NotificationService", "QuietHours",
           "UnknownChannel", "backoff_delay"]
