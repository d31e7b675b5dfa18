"""The EmailService: validate, render, track, store, send with failover, retry.

Guarantees a caller can rely on:

- **One message per idempotency key.** ``send(..., idempotency_key=k)`` twice
  returns the same message; the key is stored with the message before any send.
- **Never two sends of one message.** A message is stored QUEUED (with our
  Message-ID, which is also the providers' idempotency key) before the first
  provider call, and every attempt holds the message's lock and re-reads its
  status. A message whose send was cut short by a stop is only retried
  through providers that honour idempotency keys; otherwise it fails with
  the reason instead of risking a duplicate.
- **Failover and retries.** Providers are tried in configured order; a
  transient failure moves on to the next, a permanent rejection fails the
  message with the reason. When every provider failed transiently the
  message stays QUEUED with ``retry_count`` + 1 and is retried after an
  exponential backoff (capped), up to ``retries.max_attempts`` rounds.
- **Suppression.** Sends to suppressed addresses fail fast (stored FAILED
  with the reason) unless the caller sets ``ignore_suppression``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import logging
import random
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec

from collector.email.config import EmailConfig
from collector.email.message import (
    FAILED,
    QUEUED,
    SENT,
    Attachment,
    EmailEvent,
    InvalidEmail,
    OutgoingEmail,
    SendEmail,
    Suppressed,
    apply_event,
    backoff_delay,
    bare_address,
    check_rendered,
    make_message_id,
    validate_request,
)
from collector.email.providers import ConfiguredProvider
from collector.email.repository import EmailRepository
from collector.email.suppression import SuppressionList
from collector.email.templates import TemplateRenderer
from collector.email.tracking import TokenSigner, add_open_pixel, is_scanner_prefetch, wrap_links
from collector.email.webhooks import ParsedEvent
from collector.events import EMAIL_EVENT, EventBus
from collector.pii import PiiCipher
from collector.storage import Storage
from plugins.types import PermanentError, TransientError

__all__ = ["Attachment", "EmailService", "InvalidEmail", "SendEmail", "Suppressed"]

log = logging.getLogger("logferry.email")

# Fields of a record the API shows (the spec's, plus what callers need).
PUBLIC_FIELDS = (
    "id", "message_id", "header_message_id", "from", "to", "cc", "bcc", "subject", "html_body", "text_body",
    "attachments", "template_id", "template_data", "provider", "status", "created_at", "sent_at",
    "delivered_at", "opened_at", "clicked_at", "bounce_type", "error_message", "retry_count",
    "notification_id", "idempotency_key", "tags", "transactional", "open_count", "click_count",
)


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A record as callers see it: spec field names, ISO 8601 UTC times."""
    out = {}
    for name in PUBLIC_FIELDS:
        value = record.get(name)
        out[name] = iso(value) if isinstance(value, dt.datetime) else value
    return out


class _Queue:
    """Due times → email ids; woken early when something is added or the clock moves."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._queued: dict[str, float] = {}
        self._wake = asyncio.Event()

    def push(self, email_id: str, due: float) -> None:
        if email_id in self._queued and self._queued[email_id] <= due:
            return
        self._seq += 1
        self._queued[email_id] = due
        heapq.heappush(self._heap, (due, self._seq, email_id))
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def __len__(self) -> int:
        return len(self._queued)

    def due(self) -> int:
        now = self.clock()
        return sum(1 for d in self._queued.values() if d <= now)

    async def pop(self) -> str:
        while True:
            while self._heap and self._queued.get(self._heap[0][2]) != self._heap[0][0]:
                heapq.heappop(self._heap)  # superseded entry
            now = self.clock()
            if self._heap and self._heap[0][0] <= now:
                _, _, email_id = heapq.heappop(self._heap)
                del self._queued[email_id]
                return email_id
            timeout = None if not self._heap else max(0.001, self._heap[0][0] - now)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: see NotificationService._run
                    await self._wake.wait()


class EmailService:
    """Sends and tracks email; one per collector (``app[appkeys.EMAIL]``)."""

    def __init__(self, *, storage: Storage, config: EmailConfig, secret_key: str, public_url: str,
                 providers: Sequence[ConfiguredProvider], renderer: TemplateRenderer | None = None,
                 events: EventBus | None = None, clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random):
        self.storage = storage
        self.config = config
        self.public_url = public_url.rstrip("/")
        self.providers = list(providers)
        self.renderer = renderer or TemplateRenderer(config.templates)
        self.events = events
        self.clock = clock
        self.jitter = jitter
        self.cipher = PiiCipher(secret_key)
        self.signer = TokenSigner(secret_key)
        self.unsubscribe_signer = TokenSigner(secret_key, "email-unsubscribe")
        self.repo = EmailRepository(storage, self.cipher)
        self.suppressions = SuppressionList(storage, self.cipher, clock=clock)
        self.queue = _Queue(clock)
        self._slots = asyncio.Semaphore(config.concurrency)
        self._records: dict[str, dict[str, Any]] = {}
        self._outgoing: dict[str, OutgoingEmail] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._workers: list[asyncio.Task[None]] = []
        self._inflight = 0
        self._background: set[asyncio.Task[None]] = set()
        self._keys: OrderedDict[str, str] = OrderedDict()
        self._keys_evicted = False
        self.counters: dict[str, int] = {"sent": 0, "failed": 0, "retried": 0, "failover": 0, "duplicates": 0,
                                         "webhooks_refused": 0}

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load the suppression list, pick up the queue a previous run left, start workers."""
        await self.suppressions.load()
        await self._recover()
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work(), name=f"email:worker{i}")
                         for i in range(self.config.concurrency)]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.repo.writer.wait_idle()
        for provider in self.providers:
            try:
                await provider.client.close()
            except Exception:
                log.exception("closing email provider %s failed", provider.type)

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    @contextlib.asynccontextmanager
    async def _lock(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        async with lock:
            yield

    # --- sending -------------------------------------------------------------------

    async def send(self, request: SendEmail, *, notification_id: str | None = None,
                   idempotency_key: str | None = None, wait: bool = True,
                   new_key: bool = False) -> dict[str, Any]:
        """Send (``wait=True``: return once a provider accepted it, status SENT) or
        queue (``wait=False``: return the QUEUED record). Raises
        :class:`InvalidEmail` (a ``PermanentError``) for a request that breaks a
        rule, :class:`Suppressed` for a suppressed recipient, ``PermanentError``
        when the message failed and ``TransientError`` when it is queued for a
        retry. The same ``idempotency_key`` always yields the same message.

        ``new_key=True`` is the caller's promise that no earlier process (nor
        another collector) can have used ``idempotency_key`` — a notification
        created by this process, on its first attempt: only the keys this
        process created are then consulted (in memory), not storage."""
        if idempotency_key is not None:
            if not idempotency_key or len(idempotency_key) > 256:
                raise InvalidEmail("idempotency_key", "must be 1–256 characters")
            async with self._lock("key:" + idempotency_key):
                existing_id = self._keys.get(idempotency_key)
                if existing_id is None and not (new_key and not self._keys_evicted):
                    existing_id = await self.repo.idempotent_email_id(idempotency_key)
                if existing_id is None:
                    record = await self._create(request, notification_id, idempotency_key, wait)
                else:
                    self.counters["duplicates"] += 1
                    return await self._existing(existing_id, wait)
        else:
            record = await self._create(request, notification_id, None, wait)
        if not wait:
            self.queue.push(record["id"], self.clock())
            return public(record)
        return public(await self._deliver(record["id"]))

    def _remember_key(self, key: str, email_id: str) -> None:
        """Keys this process stored (bounded; ``_keys_evicted`` says it is no longer complete)."""
        self._keys[key] = email_id
        if len(self._keys) > 100_000:
            self._keys.popitem(last=False)
            self._keys_evicted = True

    async def _existing(self, email_id: str, wait: bool) -> dict[str, Any]:
        record = self._records.get(email_id) or await self.repo.get(email_id)
        if record is None:
            raise TransientError("the message of this idempotency key is not readable yet")
        if wait and record["status"] == FAILED:
            raise PermanentError(record.get("error_message") or "the message failed")
        if wait and record["status"] == QUEUED:
            return public(await self._deliver(email_id))
        return public(record)

    async def _create(self, request: SendEmail, notification_id: str | None,
                      idempotency_key: str | None, wait: bool) -> dict[str, Any]:
        cfg = self.config
        checked = validate_request(request, default_from=cfg.from_, max_recipients=cfg.max_recipients,
                                   max_size=cfg.max_size)
        rendered = self.renderer.render(template_id=request.template_id, data=request.template_data,
                                        subject=request.subject, html_body=request.html_body,
                                        text_body=request.text_body)
        check_rendered(rendered.subject, rendered.html, rendered.text)
        assert rendered.subject is not None
        now = self._now()
        email_id = str(uuid.uuid4())
        header_id = make_message_id(email_id, checked.from_)
        headers = dict(checked.headers)
        if not request.transactional:
            token = self.unsubscribe_signer.sign({"k": "u", "e": email_id,
                                                  "a": self.cipher.encrypt(bare_address(checked.to[0]))})
            headers["List-Unsubscribe"] = f"<{self.public_url}/t/u/{token}>"
            headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        html = rendered.html
        if html is not None and cfg.tracking.clicks:
            html, _ = wrap_links(html, email_id=email_id, base_url=self.public_url, signer=self.signer)
        if html is not None and cfg.tracking.opens:
            html = add_open_pixel(html, email_id=email_id, base_url=self.public_url, signer=self.signer)
        out = OutgoingEmail(
            email_id=email_id, message_id=header_id, from_=checked.from_, to=checked.to, cc=checked.cc,
            bcc=checked.bcc, subject=rendered.subject, html=html, text=rendered.text,
            attachments=checked.attachments, headers=headers, tags=checked.tags, reply_to=checked.reply_to,
            idempotency_key=email_id,
        )
        if out.size() > cfg.max_size:
            raise InvalidEmail("attachments", f"the rendered message is {out.size()} bytes; at most {cfg.max_size}")
        record: dict[str, Any] = {
            "id": email_id, "message_id": "", "header_message_id": header_id, "from": checked.from_,
            "to": checked.to, "cc": checked.cc or None, "bcc": checked.bcc or None, "subject": rendered.subject,
            "html_body": rendered.html, "text_body": rendered.text,
            "attachments": [{"filename": a.filename, "size": len(a.content), "content_type": a.content_type,
                             **({"content_id": a.content_id} if a.content_id else {})}
                            for a in checked.attachments] or None,
            "template_id": request.template_id, "template_data": request.template_data,
            "provider": None, "status": QUEUED, "created_at": now, "retry_count": 0,
            "notification_id": notification_id, "idempotency_key": idempotency_key or "",
            "tags": checked.tags, "transactional": request.transactional,
        }
        suppressed = self.suppressions.find(out.recipients) if self.config.suppression.enabled else []
        override = request.ignore_suppression and self.config.suppression.allow_override
        if suppressed and not override:
            reasons = "; ".join(f"{bare_address(a)} is suppressed ({s.reason}"
                                f"{': ' + s.detail if s.detail else ''})" for a, s in suppressed)
            record.update(status=FAILED, error_message=reasons)
            await self._store_new(record, idempotency_key, None)
            self.counters["failed"] += 1
            raise Suppressed(reasons, [a for a, _ in suppressed])
        # Made durable before any send: the idempotency key, our Message-ID and
        # the content (so a restart can still send it). A waiting caller learns
        # the id only from the answer, so its message row is written once, with
        # the outcome (one insert less on the hot path); until then the outbox
        # holds the row.
        if wait:
            record["sending_since"] = now
        record["_in_outbox"] = True
        await self._store_new(record, idempotency_key, out, row=not wait)
        self._records[email_id] = record
        self._outgoing[email_id] = out
        return record

    async def _store_new(self, record: dict[str, Any], idempotency_key: str | None,
                         outbox: OutgoingEmail | None, *, row: bool = True) -> None:
        writes = [self.repo.save(record)] if row else []
        if outbox is not None:
            writes.append(self.repo.outbox_put(outbox, record["created_at"], None if row else record))
        if idempotency_key is not None:
            writes.append(self.repo.remember_key(idempotency_key, record["id"], record["created_at"]))
        await asyncio.gather(*writes)
        if idempotency_key is not None:
            self._remember_key(idempotency_key, record["id"])

    async def _load_for_send(self, email_id: str) -> tuple[dict[str, Any] | None, OutgoingEmail | None]:
        record = self._records.get(email_id)
        if record is None:
            record = await self.repo.get(email_id)
            if record is not None and record["status"] == QUEUED:
                self._records[email_id] = record
        out = self._outgoing.get(email_id)
        if out is None and record is not None and record["status"] == QUEUED:
            out = await self.repo.outbox_get(email_id)
            if out is not None:
                self._outgoing[email_id] = out
        return record, out

    def _forget(self, email_id: str) -> None:
        self._records.pop(email_id, None)
        self._outgoing.pop(email_id, None)

    async def _deliver(self, email_id: str) -> dict[str, Any]:
        """One round through the providers for a QUEUED message; the record after it."""
        self._inflight += 1
        try:
            return await self._deliver_locked(email_id)
        finally:
            self._inflight -= 1

    async def _deliver_locked(self, email_id: str) -> dict[str, Any]:
        async with self._lock("send:" + email_id):
            record, out = await self._load_for_send(email_id)
            if record is None:
                raise PermanentError(f"no email {email_id}")
            if record["status"] != QUEUED:
                # Sent (or failed) meanwhile: never a second send.
                self._forget(email_id)
                if record["status"] == FAILED:
                    raise PermanentError(record.get("error_message") or "the message failed")
                return record
            if out is None:
                return await self._fail(record, "the message content was lost (not in the outbox)")
            if not self.providers:
                return await self._fail(record, "no email providers are configured (collector.email.providers)")
            if record.get("sending_since") is None:
                record["sending_since"] = self._now()
                await self.repo.save(record)
            errors: list[str] = []
            async with self._slots:
                for position, provider in enumerate(self.providers):
                    try:
                        async with asyncio.timeout(self.config.send_timeout):
                            result = await provider.client.send(out)
                    except PermanentError as exc:
                        return await self._fail(record, f"{provider.type}: {exc}", provider=provider.label)
                    except (TransientError, TimeoutError) as exc:
                        reason = str(exc) or f"no answer within {self.config.send_timeout:g} s"
                        errors.append(f"{provider.type}: {reason}")
                        log.warning("email provider failed, trying the next", extra={
                            "email_id": email_id, "provider": provider.type, "error": reason})
                        continue
                    except Exception as exc:
                        errors.append(f"{provider.type}: {exc.__class__.__name__}: {exc}")
                        log.exception("email provider %s raised", provider.type)
                        continue
                    if position:
                        self.counters["failover"] += 1
                    return await self._sent(record, provider, result, errors)
            return await self._retry_later(record, out, errors)

    async def _sent(self, record: dict[str, Any], provider: ConfiguredProvider, result: Any,
                    errors: list[str]) -> dict[str, Any]:
        metadata = getattr(result, "metadata", None) or {}
        refused = metadata.get("refused") or {}
        notes = [*errors, *(f"refused {address}: {reason}" for address, reason in refused.items())]
        record.update(status=SENT, sent_at=self._now(), provider=provider.label,
                      provider_name=provider.label, message_id=result.provider_message_id,
                      error_message="; ".join(notes) or None, sending_since=None, next_attempt_at=None)
        await self.repo.save(record)
        self._drop_outbox(record)
        self._forget(record["id"])
        self.counters["sent"] += 1
        return record

    async def _fail(self, record: dict[str, Any], reason: str, *, provider: str | None = None) -> dict[str, Any]:
        record.update(status=FAILED, error_message=reason, sending_since=None, next_attempt_at=None)
        if provider:
            record["provider"] = record["provider_name"] = provider
        await self.repo.save(record)
        self._drop_outbox(record)
        self._forget(record["id"])
        self.counters["failed"] += 1
        raise PermanentError(reason)

    def _drop_outbox(self, record: dict[str, Any]) -> None:
        """Delete the stored content of a message that is done, off the send path
        (a leftover row is harmless: only QUEUED messages are read back)."""
        if not record.pop("_in_outbox", False):
            return
        task = asyncio.get_running_loop().create_task(self.repo.outbox_delete(record["id"], self._now()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _retry_later(self, record: dict[str, Any], out: OutgoingEmail, errors: list[str]) -> dict[str, Any]:
        record["retry_count"] = int(record.get("retry_count") or 0) + 1
        reason = "; ".join(errors)
        retries = self.config.retries
        if record["retry_count"] >= retries.max_attempts:
            return await self._fail(record, f"gave up after {record['retry_count']} attempts: {reason}")
        delay = backoff_delay(record["retry_count"], base=retries.base_delay, cap=retries.max_delay,
                              jitter=self.jitter())
        due = self.clock() + delay
        record.update(error_message=reason, sending_since=None,
                      next_attempt_at=dt.datetime.fromtimestamp(due, dt.UTC))
        if not record.get("_in_outbox"):
            await self.repo.outbox_put(out, self._now())
            record["_in_outbox"] = True
        await self.repo.save(record)
        # The content waits in the outbox, not in memory (attachments can be 25 MB).
        self._outgoing.pop(record["id"], None)
        self.queue.push(record["id"], due)
        self.counters["retried"] += 1
        raise TransientError(f"queued for retry {record['retry_count']} in {delay:.0f} s: {reason}",
                             retry_after=delay)

    async def _work(self) -> None:
        while True:
            email_id = await self.queue.pop()
            try:
                await self._deliver(email_id)
            except (PermanentError, TransientError):
                pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("email queue worker failed on %s", email_id)
                self.queue.push(email_id, self.clock() + self.config.retries.base_delay)

    async def _recover(self) -> None:
        """Re-queue what a previous run left QUEUED. A message whose send was in
        progress when the collector stopped is resent only if the first
        provider honours idempotency keys; otherwise it fails with the reason."""
        idempotent = bool(self.providers) and getattr(self.providers[0].client, "idempotent", False)
        for record in [*await self.repo.recoverable(), *await self.repo.unrecorded_sends()]:
            record["_in_outbox"] = True
            if record.get("sending_since") is not None and not idempotent:
                record.update(status=FAILED, sending_since=None,
                              error_message="the collector stopped during the send; not resent so that it "
                                            "is never delivered twice")
                await self.repo.save(record)
                self._drop_outbox(record)
                continue
            due = record["next_attempt_at"].timestamp() if record.get("next_attempt_at") else self.clock()
            self._records[record["id"]] = record
            self.queue.push(record["id"], due)

    async def drain(self) -> None:
        """Return when nothing is due in the queue and no send is in flight (wrap in a timeout)."""
        while self.queue.due() or self._inflight:  # noqa: ASYNC110 - two conditions, many writers
            await asyncio.sleep(0.01)

    # --- reading ------------------------------------------------------------------------

    async def get(self, email_id: str) -> dict[str, Any] | None:
        try:
            uuid.UUID(email_id)
        except ValueError:
            return None
        record = await self.repo.get(email_id)
        return public(record) if record is not None else None

    async def search(self, *, status: str | None = None, to: str | None = None, tag: str | None = None,
                     before: tuple[dt.datetime, str] | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Stored messages, newest first (``to`` matches any recipient by keyed hash)."""
        recipient_hash = self.cipher.email_hash(bare_address(to)) if to else None
        records = await self.repo.search(status=status, recipient_hash=recipient_hash, tag=tag, before=before,
                                         limit=limit)
        return [public(r) for r in records]

    async def stats(self, days: int) -> list[dict[str, Any]]:
        rows = await self.repo.stats(days)
        return [{**row, "date": str(row["date"])} for row in rows]

    # --- events: webhooks and tracking ----------------------------------------------------

    async def record_event(self, parsed: ParsedEvent) -> dict[str, Any] | None:
        """Apply a normalised event to its message, suppress if it says so,
        store it and publish it (``email_event``). None when the message is unknown."""
        event = parsed.event
        email_id = event.email_id
        if email_id is not None:
            try:
                uuid.UUID(email_id)
            except ValueError:
                email_id = None
        if email_id is None and parsed.provider_message_id:
            email_id = await self.repo.find_id_by_provider_message_id(parsed.provider_message_id)
        if email_id is None:
            log.info("email event for an unknown message", extra={
                "provider": event.provider, "type": event.type, "provider_message_id": parsed.provider_message_id})
            return None
        event.email_id = email_id
        if parsed.recipient:
            event.recipient_hash = self.cipher.email_hash(bare_address(parsed.recipient))
        async with self._lock("event:" + email_id):
            record = await self.repo.get(email_id)
            if record is None:
                log.info("email event for an unknown message", extra={"email_id": email_id, "type": event.type})
                return None
            changes = apply_event(record, event)
            counted = not event.suspected_scanner
            if event.type == "opened" and counted:
                changes.fields["open_count"] = int(record.get("open_count") or 0) + 1
            if event.type == "clicked" and counted:
                changes.fields["click_count"] = int(record.get("click_count") or 0) + 1
            if changes.fields:
                record.update(changes.fields)
                await self.repo.save(record)
        if changes.suppress_reason and self.config.suppression.enabled:
            targets = [parsed.recipient] if parsed.recipient else list(record["to"])
            for address in targets:
                await self.suppressions.add(address, changes.suppress_reason, event.reason or "")
        payload = msgspec.to_builtins(event)
        await self.repo.add_event(payload, self._now())
        if self.events is not None:
            self.events.publish(EMAIL_EVENT, [{**payload, "occurred_at": event.occurred_at}])
        return payload

    async def accept_webhook(self, source: str, receipt_id: str, parsed: ParsedEvent | None) -> str:
        """Process one verified webhook delivery exactly once: ``"duplicate"`` when
        ``receipt_id`` (a Svix id, a Mailgun token) was already processed — across
        restarts too — else ``"matched"`` or ``"unmatched"`` (no such message).
        The receipt is stored only after the event was applied, so a delivery
        that failed half-way is processed again when the provider retries it."""
        async with self._lock(f"webhook:{source}:{receipt_id}"):
            if await self.repo.receipt_seen(source, receipt_id):
                return "duplicate"
            result = await self.record_event(parsed) if parsed is not None else None
            await self.repo.remember_receipt(source, receipt_id, self._now())
        return "matched" if result is not None else "unmatched"

    def now(self) -> dt.datetime:
        return self._now()

    def seconds_since_send(self, record: dict[str, Any] | None) -> float | None:
        if record is None:
            return None
        at = record.get("delivered_at") or record.get("sent_at")
        if not isinstance(at, dt.datetime):
            return None
        return self.clock() - at.timestamp()

    async def track(self, kind: str, email_id: str, *, url: str | None, user_agent: str | None,
                    method: str) -> dict[str, Any] | None:
        """An open (``kind="opened"``) or click seen by our tracking endpoints."""
        record = await self.repo.get(email_id)
        if record is None:
            return None
        cfg = self.config.tracking
        scanner = is_scanner_prefetch(user_agent=user_agent, method=method,
                                      seconds_since_send=self.seconds_since_send(record),
                                      window=cfg.scanner_window, scanner_agents=cfg.scanner_agents)
        event = EmailEvent(type=kind, email_id=email_id, provider="logferry", occurred_at=self._now(), url=url,
                           suspected_scanner=scanner, raw={"user_agent": (user_agent or "")[:300]})
        recipient = record["to"][0] if len(record["to"]) == 1 else None
        return await self.record_event(ParsedEvent(event=event, recipient=recipient))

    async def unsubscribe(self, email_id: str, sealed_address: str) -> str | None:
        """Suppress the address of an unsubscribe token; returns it (None if the token is stale)."""
        try:
            address = self.cipher.decrypt(sealed_address)
        except Exception:
            return None
        await self.suppressions.add(address, "unsubscribed", f"List-Unsubscribe of {email_id}")
        event = EmailEvent(type="unsubscribed", email_id=email_id, provider="logferry", occurred_at=self._now())
        try:
            uuid.UUID(email_id)
            await self.record_event(ParsedEvent(event=event, recipient=address))
        except ValueError:
            pass
        return address

    async def erase_recipient(self, address: str) -> int:
        """The right to erasure: delete every stored message that was sent to
        ``address`` (to, cc or bcc), with its events and outbox content; returns
        how many. A suppression entry stays: it is what keeps the person unmailed."""
        email_hash = self.cipher.email_hash(bare_address(address))
        await self.repo.writer.wait_idle()
        return await self.repo.erase_by_hash(email_hash)
