"""EmailMessage and friends in ClickHouse: rows in, records out.

Records are plain dicts with the spec's field names, addresses in the clear
and datetimes timezone-aware; rows hold addresses sealed with
:class:`~collector.pii.PiiCipher` (``to``, ``cc``, ``bcc``) and their keyed
hashes (``to_hash``: every recipient's, for lookups and erasure). Every
update inserts the whole row again with a new version (ReplacingMergeTree);
reads use ``FINAL``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import orjson

from collector.email.message import OutgoingEmail, bare_address
from collector.pii import PiiCipher
from collector.storage import Storage, new_version

BUILTIN_PROVIDERS = {"RESEND", "MAILGUN", "SMTP"}
DATETIME_FIELDS = ("created_at", "sent_at", "delivered_at", "opened_at", "clicked_at", "next_attempt_at",
                   "sending_since")
_outbox_encoder = msgspec.msgpack.Encoder()
_outbox_decoder = msgspec.msgpack.Decoder(OutgoingEmail)


def ch_time(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def utc(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return dt.datetime.fromisoformat(str(value)).replace(tzinfo=dt.UTC)


class GroupCommit:
    """Inserts with group commit: a write goes out at once when its table is
    idle; writes that arrive while an insert is running are coalesced into the
    next one. No added latency for one caller, few inserts under load
    (ClickHouse prefers few large inserts)."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._pending: dict[str, list[tuple[Sequence[Mapping[str, Any]], asyncio.Future[None]]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.inserts = 0

    async def insert(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.setdefault(table, []).append((rows, future))
        if table not in self._tasks:
            self._tasks[table] = loop.create_task(self._drain(table), name=f"email:insert:{table}")
        await asyncio.shield(future)

    async def _drain(self, table: str) -> None:
        try:
            while self._pending.get(table):
                batch = self._pending.pop(table)
                rows = [row for chunk, _ in batch for row in chunk]
                try:
                    await self.storage.insert_rows(table, rows)
                    self.inserts += 1
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._tasks.pop(table, None)

    async def wait_idle(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)


class EmailRepository:
    def __init__(self, storage: Storage, cipher: PiiCipher):
        self.storage = storage
        self.cipher = cipher
        self.writer = GroupCommit(storage)

    # --- EmailMessage ---------------------------------------------------------------

    def to_row(self, record: dict[str, Any]) -> dict[str, Any]:
        enc = self.cipher.encrypt
        recipients = [*record["to"], *(record.get("cc") or []), *(record.get("bcc") or [])]
        provider = (record.get("provider") or "").upper()
        row = {
            "id": record["id"],
            "message_id": record.get("message_id") or "",
            "header_message_id": record.get("header_message_id") or "",
            "from": record["from"],
            "to": [enc(a) for a in record["to"]],
            "to_hash": [self.cipher.email_hash(bare_address(a)) for a in recipients],
            "cc": [enc(a) for a in record.get("cc") or []],
            "bcc": [enc(a) for a in record.get("bcc") or []],
            "subject": record["subject"],
            "html_body": record.get("html_body"),
            "text_body": record.get("text_body") or "",
            "attachments": orjson.dumps(record.get("attachments") or []).decode(),
            "template_id": record.get("template_id"),
            "template_data": (orjson.dumps(record["template_data"]).decode()
                              if record.get("template_data") is not None else None),
            "provider": provider if provider in BUILTIN_PROVIDERS else "NONE",
            "provider_name": record.get("provider_name") or "",
            "status": record["status"],
            "bounce_type": record.get("bounce_type"),
            "error_message": record.get("error_message"),
            "retry_count": record.get("retry_count") or 0,
            "notification_id": record.get("notification_id"),
            "idempotency_key": record.get("idempotency_key") or "",
            "tags": list(record.get("tags") or []),
            "transactional": bool(record.get("transactional", True)),
            "open_count": record.get("open_count") or 0,
            "click_count": record.get("click_count") or 0,
            "provider_response": record.get("provider_response"),
            "version": new_version(),
        }
        for name in DATETIME_FIELDS:
            row[name] = ch_time(record.get(name))
        return row

    def from_row(self, row: dict[str, Any]) -> dict[str, Any]:
        dec = self.cipher.decrypt
        record = dict(row)
        record["id"] = str(row["id"])
        for name in ("to", "cc", "bcc"):
            record[name] = [dec(a) for a in row.get(name) or []]
        record["attachments"] = orjson.loads(row.get("attachments") or "[]")
        record["template_data"] = orjson.loads(row["template_data"]) if row.get("template_data") else None
        record["provider"] = (row.get("provider_name") or "").upper() or (
            None if row.get("provider") in (None, "NONE") else row["provider"])
        record["tags"] = list(row.get("tags") or [])
        for name in DATETIME_FIELDS:
            record[name] = utc(row.get(name))
        record.pop("version", None)
        return record

    async def save(self, record: dict[str, Any]) -> None:
        await self.writer.insert("email_messages", [self.to_row(record)])

    async def get(self, email_id: str) -> dict[str, Any] | None:
        try:
            rows = await self.storage.query(
                "SELECT * FROM email_messages FINAL WHERE id = {id:UUID} LIMIT 1", {"id": email_id})
        except Exception as exc:
            if "Cannot parse" in str(exc) or "UUID" in str(exc):
                return None
            raise
        return self.from_row(rows[0]) if rows else None

    async def find_id_by_provider_message_id(self, provider_message_id: str) -> str | None:
        rows = await self.storage.query(
            "SELECT toString(id) AS id FROM email_messages WHERE message_id = {m:String} "
            "OR header_message_id = {h:String} ORDER BY created_at DESC LIMIT 1",
            {"m": provider_message_id, "h": f"<{provider_message_id.strip('<>')}>"})
        return rows[0]["id"] if rows else None

    async def search(self, *, status: str | None, recipient_hash: str | None, tag: str | None,
                     before: tuple[dt.datetime, str] | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, keyset-paginated on (created_at, id)."""
        where = ["1"]
        params: dict[str, Any] = {"limit": limit}
        if status:
            where.append("status = {status:String}")
            params["status"] = status
        if recipient_hash:
            where.append("has(to_hash, {h:String})")
            params["h"] = recipient_hash
        if tag:
            where.append("has(tags, {tag:String})")
            params["tag"] = tag
        if before is not None:
            where.append("(created_at, id) < ({bt:DateTime64(3, 'UTC')}, {bid:UUID})")
            params["bt"], params["bid"] = ch_time(before[0]), before[1]
        rows = await self.storage.query(
            f"SELECT * FROM email_messages FINAL WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, id DESC LIMIT {limit:UInt32}", params)
        return [self.from_row(r) for r in rows]

    async def recoverable(self) -> list[dict[str, Any]]:
        """Messages still QUEUED (to pick up after a restart), newest week only."""
        rows = await self.storage.query(
            "SELECT * FROM email_messages FINAL WHERE status = 'QUEUED' "
            "AND created_at > now64(3) - INTERVAL 7 DAY")
        return [self.from_row(r) for r in rows]

    async def stats(self, days: int) -> list[dict[str, Any]]:
        """The spec's query 3, per day of ``sent_at``, plus opens, clicks and failures."""
        return await self.storage.query(
            """SELECT toDate(sent_at) AS date,
                      count() AS total,
                      countIf(status = 'DELIVERED') AS delivered,
                      countIf(status = 'BOUNCED') AS bounced,
                      countIf(status = 'FAILED') AS failed,
                      countIf(opened_at IS NOT NULL) AS opened,
                      countIf(clicked_at IS NOT NULL) AS clicked,
                      sum(open_count) AS opens,
                      sum(click_count) AS clicks
               FROM email_messages FINAL
               WHERE sent_at > now64(3) - toIntervalDay({days:UInt32})
               GROUP BY date ORDER BY date""",
            {"days": days})

    async def erase_by_hash(self, email_hash: str) -> int:
        rows = await self.storage.query(
            "SELECT DISTINCT toString(id) AS id FROM email_messages WHERE has(to_hash, {h:String})", {"h": email_hash})
        ids = [r["id"] for r in rows]
        if not ids:
            return 0
        await self.storage.command("DELETE FROM email_messages WHERE has(to_hash, {h:String})", {"h": email_hash})
        for table in ("email_events", "email_outbox"):
            await self.storage.command(f"DELETE FROM {table} WHERE email_id IN {{ids:Array(String)}}", {"ids": ids})
        return len(ids)

    # --- idempotency keys ----------------------------------------------------------------

    async def idempotent_email_id(self, key: str) -> str | None:
        # Keys still in the journal are looked at here, so the read need not
        # wait for the journal's flush (a key is never written twice with
        # different ids: the service holds the key's lock).
        journal = self.storage.journal
        if journal is not None and journal.journaled("email_idempotency"):
            for row in journal.pending_rows("email_idempotency"):
                if row.get("key") == key:
                    return str(row["email_id"])
        rows = await self.storage.query(
            "SELECT email_id FROM email_idempotency FINAL WHERE key = {k:String} LIMIT 1", {"k": key},
            barrier=journal is None)
        return rows[0]["email_id"] if rows else None

    async def remember_key(self, key: str, email_id: str, at: dt.datetime) -> None:
        await self.writer.insert("email_idempotency",
                                       [{"key": key, "email_id": email_id, "created_at": ch_time(at)}])

    # --- outbox ---------------------------------------------------------------------------

    async def outbox_put(self, out: OutgoingEmail, at: dt.datetime, record: dict[str, Any] | None = None) -> None:
        """Store what sending ``out`` needs (sealed: it holds addresses), and the
        message's row as it was before the send (for a send cut short by a stop)."""
        payload = self.cipher.encrypt(base64.b64encode(_outbox_encoder.encode(out)).decode("ascii"))
        row = orjson.dumps(self.to_row(record)).decode() if record is not None else ""
        await self.writer.insert("email_outbox", [{"email_id": out.email_id, "payload": payload, "record": row,
                                                   "created_at": ch_time(at), "version": new_version()}])

    async def outbox_get(self, email_id: str) -> OutgoingEmail | None:
        rows = await self.storage.query(
            "SELECT payload FROM email_outbox FINAL WHERE email_id = {e:String} LIMIT 1", {"e": email_id})
        if not rows or not rows[0]["payload"]:
            return None
        return _outbox_decoder.decode(base64.b64decode(self.cipher.decrypt(rows[0]["payload"])))

    async def unrecorded_sends(self) -> list[dict[str, Any]]:
        """Messages whose send started (outbox written) but whose row was never
        stored: a ``wait=True`` send cut short by a stop."""
        rows = await self.storage.query(
            """SELECT record FROM email_outbox FINAL
               WHERE record != '' AND created_at > now64(3) - INTERVAL 7 DAY
                 AND email_id NOT IN (SELECT toString(id) FROM email_messages)""")
        return [self.from_row(orjson.loads(r["record"])) for r in rows]

    async def outbox_delete(self, email_id: str, at: dt.datetime) -> None:
        await self.writer.insert("email_outbox", [{"email_id": email_id, "payload": "",
                                                         "created_at": ch_time(at), "version": new_version(),
                                                         "deleted": 1}])

    # --- webhook receipts and events ---------------------------------------------------------

    async def receipt_seen(self, source: str, receipt_id: str) -> bool:
        rows = await self.storage.query(
            "SELECT 1 AS x FROM email_webhook_receipts WHERE source = {s:String} AND receipt_id = {r:String} "
            "LIMIT 1", {"s": source, "r": receipt_id})
        return bool(rows)

    async def remember_receipt(self, source: str, receipt_id: str, at: dt.datetime) -> None:
        await self.writer.insert("email_webhook_receipts",
                                       [{"source": source, "receipt_id": receipt_id, "received_at": ch_time(at)}])

    async def add_event(self, event: dict[str, Any], received_at: dt.datetime) -> None:
        await self.writer.insert("email_events", [{
            "email_id": event.get("email_id") or "",
            "type": event["type"],
            "provider": event.get("provider") or "",
            "occurred_at": ch_time(utc(event["occurred_at"])),
            "received_at": ch_time(received_at),
            "recipient_hash": event.get("recipient_hash") or "",
            "severity": event.get("severity") or "",
            "reason": event.get("reason") or "",
            "url": event.get("url") or "",
            "suspected_scanner": bool(event.get("suspected_scanner")),
            "raw": orjson.dumps(event.get("raw") or {}, default=str).decode(),
        }])

    async def events_of(self, email_id: str) -> list[dict[str, Any]]:
        return await self.storage.query(
            "SELECT type, provider, occurred_at, severity, reason, url, suspected_scanner "
            "FROM email_events WHERE email_id = {e:String} ORDER BY occurred_at", {"e": email_id})
