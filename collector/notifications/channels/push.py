"""The ``push`` channel: Web Push (RFC 8030) with VAPID (RFC 8292) and
aes128gcm payload encryption (RFC 8291), through pywebpush.

Options (``collector.notifications.channels.push``)::

    push:
      vapid_private_key: "${VAPID_PRIVATE_KEY}"   # base64url raw P-256 key (or DER)
      vapid_public_key: "BEl6…"                  # optional: served to browsers
      subject: "mailto:ops@example.com"           # the VAPID `sub` claim
      ttl: 1d                                     # how long push services keep it

Each of the user's subscriptions (from the users directory) gets the
encrypted JSON payload ``{"title", "body", "data", "notification_id",
"priority", "type"}``. A push service answering 404 or 410 says the
subscription is gone: it is removed from the user's record. The delivery is
SENT when at least one subscription accepted it; it is retried only when
every subscription failed transiently (429/5xx/network), so a device that got
it is not pushed again. ``Topic`` is derived from the notification, so a
push service replaces, rather than repeats, an undelivered copy.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import Any, ClassVar

import aiohttp
import msgspec
from py_vapid import Vapid
from pywebpush import WebPushException, webpush_async

from agent.configfile import Duration
from collector.notifications.channels.base import ChannelContext, ChannelMessage
from plugins import hookimpl
from plugins.types import ChannelResult, PermanentError, TransientError

log = logging.getLogger("logferry.notifications.push")

URGENCY = {"CRITICAL": "high", "HIGH": "high", "MEDIUM": "normal", "LOW": "low"}
MAX_PAYLOAD_BYTES = 3800  # push services accept 4096 bytes after encryption


class PushOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The VAPID private key: base64url of the raw 32-byte P-256 key, or of its DER.
    vapid_private_key: str
    # The `sub` claim: a mailto: address or https URL push services may contact.
    subject: str
    # The matching public key (base64url, uncompressed point), for browsers' applicationServerKey.
    vapid_public_key: str | None = None
    # How long a push service keeps a message for an offline device.
    ttl: Duration = Duration(86400.0)
    # Upper bound of one request to a push service.
    timeout: Duration = Duration(10.0)

    def __post_init__(self) -> None:
        if not self.subject.startswith(("mailto:", "https://")):
            raise ValueError("subject must be a mailto: address or an https:// URL")
        try:
            Vapid.from_string(private_key=self.vapid_private_key)
        except Exception:
            raise ValueError("vapid_private_key is not a base64url P-256 private key (raw or DER)") from None


def topic_for(notification_id: str) -> str:
    digest = hashlib.sha256(notification_id.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")[:32]


def push_payload(message: ChannelMessage) -> bytes:
    body = message.text or message.message
    payload = {
        "title": message.title, "body": body, "data": message.data,
        "notification_id": message.notification_id, "priority": message.priority, "type": message.type,
    }
    encoded = msgspec.json.encode(payload)
    if len(encoded) > MAX_PAYLOAD_BYTES:
        payload["data"] = None
        payload["body"] = body[:1000]
        encoded = msgspec.json.encode(payload)
    return encoded


class PushSender:
    needs_address = True
    # A push service takes no idempotency key; Topic only collapses undelivered copies.
    idempotent = False

    def __init__(self, options: PushOptions, context: ChannelContext):
        self.options = options
        self.context = context
        self.vapid = Vapid.from_string(private_key=options.vapid_private_key)

    async def send(self, message: ChannelMessage) -> ChannelResult:
        subscriptions = message.address if isinstance(message.address, list) else [message.address]
        payload = push_payload(message).decode()
        sent: list[str] = []
        expired: list[str] = []
        failed: list[str] = []
        transient: list[str] = []
        location = None
        for sub in subscriptions:
            endpoint = str(sub.get("endpoint", "")) if isinstance(sub, dict) else ""
            try:
                response = await webpush_async(
                    subscription_info=sub, data=payload, vapid_private_key=self.vapid,
                    vapid_claims={"sub": self.options.subject}, ttl=int(self.options.ttl),
                    headers={"Urgency": URGENCY.get(message.priority, "normal"),
                             "Topic": topic_for(message.notification_id)},
                    aiohttp_session=self.context.http(),
                    timeout=aiohttp.ClientTimeout(total=self.options.timeout),  # type: ignore[arg-type]
                )
            except WebPushException as exc:
                status = exc.status_code
                if status in (404, 410):
                    expired.append(endpoint)
                elif status is None or status == 429 or status >= 500:
                    transient.append(f"{endpoint}: {status}")
                else:
                    failed.append(f"{endpoint}: {status}")
                continue
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                transient.append(f"{endpoint}: {type(exc).__name__}")
                continue
            sent.append(endpoint)
            if location is None and not isinstance(response, str):
                location = response.headers.get("Location")
        for endpoint in expired:
            try:
                await self.context.users.remove_push_subscription(message.user_id, endpoint)
                log.info("push subscription expired and removed", extra={"user_id": message.user_id})
            except Exception:
                log.exception("could not remove an expired push subscription")
        meta = {"sent": len(sent), "expired": len(expired), "failed": failed + transient}
        if sent:
            return ChannelResult(provider_message_id=location or topic_for(message.notification_id), metadata=meta)
        if transient:
            raise TransientError("every push subscription failed: " + "; ".join(transient + failed))
        if expired and not failed:
            raise PermanentError(f"every push subscription has expired ({len(expired)} removed)")
        raise PermanentError("push rejected: " + "; ".join(failed or ["no subscriptions"]))

    async def close(self) -> None:
        return None


class PushChannel:
    name: ClassVar[str] = "push"
    Options: ClassVar[type[msgspec.Struct]] = PushOptions

    def create(self, options: PushOptions, context: ChannelContext) -> PushSender:
        return PushSender(options, context)


@hookimpl
def logferry_register_channels(register: Any) -> None:
    register(PushChannel())
