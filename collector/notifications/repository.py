"""Notifications, deliveries and preferences in ClickHouse.

Mutable rows live in ReplacingMergeTree tables: every save inserts the full
row with a new version; reads use FINAL. Writes from concurrent callers are
coalesced into one insert per table while the previous insert is in flight
(:class:`CoalescingWriter`), so an idle collector writes at once and a busy
one writes in batches; ``save`` returns once the row is durably stored.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import orjson

from collector.notifications.model import (
    Delivery,
    DeliveryStatus,
    Notification,
    Priority,
    Status,
    utc,
)
from collector.notifications.preferences import Frequency, Preference, QuietHours
from collector.storage import Storage, new_version


def ms(value: dt.datetime | None) -> str | None:
    """A DateTime64(3) value for JSONEachRow."""
    if value is None:
        return None
    return utc(value).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _opt_utc(value: Any) -> dt.datetime | None:
    return None if value is None else utc(value)


class _Pending:
    __slots__ = ("future", "rows")

    def __init__(self, rows: Sequence[Mapping[str, Any]], future: asyncio.Future[None]):
        self.rows = rows
        self.future = future


class CoalescingWriter:
    """One insert at a time per table; rows arriving meanwhile go together in the next."""

    def __init__(self, storage: Storage, table: str):
        self.storage = storage
        self.table = table
        self._queue: list[_Pending] = []
        self._running = False
        self.inserts = 0

    async def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(rows, future))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                rows = [row for pending in batch for row in pending.rows]
                try:
                    await self.storage.insert_rows(self.table, rows)
                    self.inserts += 1
                except Exception as exc:
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(exc)
                    continue
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_result(None)
        finally:
            self._running = False


class NotificationRepository:
    def __init__(self, storage: Storage):
        self.storage = storage
        self._notifications = CoalescingWriter(storage, "notifications")
        self._deliveries = CoalescingWriter(storage, "notification_deliveries")
        self._preferences = CoalescingWriter(storage, "notification_preferences")

    # --- notifications ---------------------------------------------------------

    @staticmethod
    def notification_row(n: Notification) -> dict[str, Any]:
        return {
            "id": n.id, "user_id": n.user_id, "type": n.type, "priority": n.priority.name,
            "title": n.title, "message": n.message,
            "data": None if n.data is None else orjson.dumps(n.data).decode(),
            "channels": n.channels, "created_at": ms(n.created_at), "scheduled_for": ms(n.scheduled_for),
            "sent_at": ms(n.sent_at), "status": n.status.value, "delivery_attempts": n.delivery_attempts,
            "error_message": n.error_message, "dedup_key": n.dedup_key, "read_at": ms(n.read_at),
            "inbox_at": ms(n.inbox_at), "next_attempt_at": ms(n.next_attempt_at), "created_by": n.created_by,
            "version": new_version(),
        }

    @staticmethod
    def notification_from_row(row: Mapping[str, Any]) -> Notification:
        return Notification(
            id=str(row["id"]), user_id=row["user_id"], type=row["type"], priority=Priority[row["priority"]],
            title=row["title"], message=row["message"],
            data=None if row["data"] is None else orjson.loads(row["data"]),
            channels=list(row["channels"]), created_at=utc(row["created_at"]),
            scheduled_for=_opt_utc(row["scheduled_for"]), sent_at=_opt_utc(row["sent_at"]),
            status=Status(row["status"]), delivery_attempts=int(row["delivery_attempts"]),
            error_message=row["error_message"], dedup_key=row["dedup_key"], read_at=_opt_utc(row["read_at"]),
            inbox_at=_opt_utc(row.get("inbox_at")), next_attempt_at=_opt_utc(row.get("next_attempt_at")),
            created_by=row.get("created_by") or "",
        )

    async def save_snapshot(self, notification_rows: Sequence[Mapping[str, Any]],
                            delivery_rows: Sequence[Mapping[str, Any]]) -> None:
        """Store rows built earlier (their versions fix their order, not the insert's time)."""
        await asyncio.gather(self._notifications.write(notification_rows), self._deliveries.write(delivery_rows))

    async def save_notifications(self, notifications: Sequence[Notification]) -> None:
        await self._notifications.write([self.notification_row(n) for n in notifications])

    async def get_notification(self, notification_id: str) -> Notification | None:
        rows = await self.storage.query(
            "SELECT * FROM notifications FINAL WHERE id = {id:UUID} LIMIT 1", {"id": notification_id})
        return self.notification_from_row(rows[0]) if rows else None

    async def active_notifications(self) -> list[Notification]:
        """Everything a restarted collector must resume: PENDING, QUEUED, and
        FAILED with a retry planned."""
        rows = await self.storage.query(
            "SELECT * FROM notifications FINAL WHERE status IN ('PENDING', 'QUEUED') "
            "OR (status = 'FAILED' AND next_attempt_at IS NOT NULL)")
        return [self.notification_from_row(r) for r in rows]

    async def recent_dedup_keys(self, since: dt.datetime) -> list[Notification]:
        rows = await self.storage.query(
            "SELECT * FROM notifications FINAL WHERE dedup_key IS NOT NULL AND created_at >= {since:DateTime64(3)}",
            {"since": ms(since)})
        return [self.notification_from_row(r) for r in rows]

    async def pending_for_user(self, user_id: str) -> list[Notification]:
        rows = await self.storage.query(
            "SELECT * FROM notifications FINAL WHERE user_id = {u:String} AND status = 'PENDING' "
            "ORDER BY created_at, id", {"u": user_id})
        return [self.notification_from_row(r) for r in rows]

    async def inbox(self, user_id: str, *, unread_only: bool, limit: int,
                    before: tuple[dt.datetime, str] | None) -> list[Notification]:
        """A user's in-app notifications, newest first (keyset pagination on ``before``)."""
        where = ["user_id = {u:String}", "inbox_at IS NOT NULL"]
        params: dict[str, Any] = {"u": user_id, "limit": limit}
        if unread_only:
            where.append("read_at IS NULL")
        if before is not None:
            where.append("(created_at, toString(id)) < ({bt:DateTime64(3)}, {bid:String})")
            params["bt"] = ms(before[0])
            params["bid"] = before[1]
        rows = await self.storage.query(
            "SELECT * FROM notifications FINAL WHERE " + " AND ".join(where)
            + " ORDER BY created_at DESC, toString(id) DESC LIMIT {limit:UInt32}", params)
        return [self.notification_from_row(r) for r in rows]

    async def unread_count(self, user_id: str) -> int:
        rows = await self.storage.query(
            "SELECT count() AS n FROM notifications FINAL WHERE user_id = {u:String} "
            "AND inbox_at IS NOT NULL AND read_at IS NULL", {"u": user_id})
        return int(rows[0]["n"]) if rows else 0

    async def unread_ids(self, user_id: str) -> list[str]:
        rows = await self.storage.query(
            "SELECT toString(id) AS id FROM notifications FINAL WHERE user_id = {u:String} "
            "AND inbox_at IS NOT NULL AND read_at IS NULL", {"u": user_id})
        return [r["id"] for r in rows]

    # --- deliveries ------------------------------------------------------------------

    @staticmethod
    def delivery_row(d: Delivery) -> dict[str, Any]:
        return {
            "id": d.id, "notification_id": d.notification_id, "channel": d.channel.upper(),
            "status": d.status.value, "sent_at": ms(d.sent_at), "delivered_at": ms(d.delivered_at),
            "failed_at": ms(d.failed_at), "provider_message_id": d.provider_message_id,
            "error_message": d.error_message,
            "metadata": None if d.metadata is None else orjson.dumps(d.metadata).decode(),
            "user_id": d.user_id, "created_at": ms(d.created_at), "version": new_version(),
        }

    @staticmethod
    def delivery_from_row(row: Mapping[str, Any]) -> Delivery:
        return Delivery(
            id=str(row["id"]), notification_id=row["notification_id"], channel=str(row["channel"]).lower(),
            user_id=row["user_id"], created_at=utc(row["created_at"]), status=DeliveryStatus(row["status"]),
            sent_at=_opt_utc(row["sent_at"]), delivered_at=_opt_utc(row["delivered_at"]),
            failed_at=_opt_utc(row["failed_at"]), provider_message_id=row["provider_message_id"],
            error_message=row["error_message"],
            metadata=None if row["metadata"] is None else orjson.loads(row["metadata"]),
        )

    async def save_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        await self._deliveries.write([self.delivery_row(d) for d in deliveries])

    async def deliveries(self, notification_id: str) -> list[Delivery]:
        rows = await self.storage.query(
            "SELECT * FROM notification_deliveries FINAL WHERE notification_id = {n:String} ORDER BY channel",
            {"n": notification_id})
        return [self.delivery_from_row(r) for r in rows]

    async def deliveries_of(self, notification_ids: Sequence[str]) -> dict[str, list[Delivery]]:
        if not notification_ids:
            return {}
        rows = await self.storage.query(
            "SELECT * FROM notification_deliveries FINAL WHERE notification_id IN {ids:Array(String)}",
            {"ids": list(notification_ids)})
        out: dict[str, list[Delivery]] = {}
        for row in rows:
            d = self.delivery_from_row(row)
            out.setdefault(d.notification_id, []).append(d)
        return out

    async def delivery_by_provider_id(self, channel: str, provider_message_id: str) -> Delivery | None:
        rows = await self.storage.query(
            "SELECT * FROM notification_deliveries FINAL WHERE provider_message_id = {p:String} "
            "AND channel = {c:String} LIMIT 1", {"p": provider_message_id, "c": channel.upper()})
        return self.delivery_from_row(rows[0]) if rows else None

    # --- preferences ---------------------------------------------------------------------

    @staticmethod
    def preference_row(p: Preference) -> dict[str, Any]:
        return {
            "id": p.id, "user_id": p.user_id, "notification_type": p.notification_type, "enabled": p.enabled,
            "channels": p.channels,
            "quiet_hours": None if p.quiet_hours is None else msgspec.json.encode(p.quiet_hours).decode(),
            "frequency": p.frequency.value, "created_at": ms(p.created_at), "updated_at": ms(p.updated_at),
            "version": new_version(), "deleted": 0,
        }

    @staticmethod
    def preference_from_row(row: Mapping[str, Any]) -> Preference:
        quiet = row["quiet_hours"]
        return Preference(
            id=str(row["id"]), user_id=row["user_id"], notification_type=row["notification_type"],
            enabled=bool(row["enabled"]), channels={str(k): bool(v) for k, v in dict(row["channels"]).items()},
            quiet_hours=None if quiet is None else msgspec.json.decode(quiet, type=QuietHours),
            frequency=Frequency(row["frequency"]), created_at=utc(row["created_at"]),
            updated_at=utc(row["updated_at"]),
        )

    async def save_preference(self, p: Preference) -> None:
        await self._preferences.write([self.preference_row(p)])

    async def preference(self, user_id: str, notification_type: str) -> Preference | None:
        rows = await self.storage.query(
            "SELECT * FROM notification_preferences FINAL WHERE user_id = {u:String} "
            "AND notification_type = {t:String} AND deleted = 0 LIMIT 1", {"u": user_id, "t": notification_type})
        return self.preference_from_row(rows[0]) if rows else None

    async def preferences(self, user_id: str) -> list[Preference]:
        rows = await self.storage.query(
            "SELECT * FROM notification_preferences FINAL WHERE user_id = {u:String} AND deleted = 0 "
            "ORDER BY notification_type", {"u": user_id})
        return [self.preference_from_row(r) for r in rows]

    async def pending_queue(self, user_id: str) -> list[dict[str, Any]]:
        """The spec's query 2: a user's PENDING notifications joined with the
        channels of their preference for each type (NULL when there is none)."""
        return await self.storage.query(
            """SELECT toString(n.id) AS id, n.type AS type, n.priority AS priority, n.title AS title,
                      n.channels AS channels, n.created_at AS created_at, n.scheduled_for AS scheduled_for,
                      np.channels AS preference_channels, np.frequency AS frequency,
                      np.enabled AS preference_enabled, np.user_id != '' AS has_preference
               FROM (SELECT * FROM notifications FINAL WHERE user_id = {u:String} AND status = 'PENDING') AS n
               LEFT JOIN (SELECT * FROM notification_preferences FINAL WHERE user_id = {u:String} AND deleted = 0) AS np
                 ON n.type = np.notification_type AND np.user_id = n.user_id
               ORDER BY n.created_at, id""",
            {"u": user_id}, settings={"join_use_nulls": 1})
