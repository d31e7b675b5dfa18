"""Provider webhooks: signature schemes and normalisation. No HTTP, no storage.

- Mailgun: the JSON body holds ``signature: {timestamp, token, signature}``
  with ``signature = hex(HMAC-SHA256(signing_key, timestamp + token))``.
  Mailgun documents no tolerance: we take ±5 minutes and the caller refuses
  tokens it has seen (replays).
- Resend (Svix): ``svix-id``, ``svix-timestamp`` and ``svix-signature`` (a
  space-separated list of ``v1,<base64>``); the key is the base64 after
  ``whsec_``; the signed content is ``{id}.{timestamp}.{raw body}``. ``svix-id``
  is stable across retries, so the caller deduplicates on it.

Events become :class:`~collector.email.message.EmailEvent`: delivered,
bounced (hard/soft by severity), complained, opened, clicked, unsubscribed,
failed, delayed. Anything else is ignored (``None``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import msgspec

from collector.email.message import EmailEvent

EMAIL_ID_VARIABLE = "logferry_email_id"


class WebhookRejected(Exception):
    """The request is not a genuine, fresh provider event (answer 401)."""


class ParsedEvent(msgspec.Struct, kw_only=True):
    event: EmailEvent
    # The provider's message id, to find the message when no email id was echoed back.
    provider_message_id: str | None = None
    recipient: str | None = None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _check_fresh(timestamp: float, now: float, tolerance: float) -> None:
    if abs(now - timestamp) > tolerance:
        raise WebhookRejected(f"timestamp is {int(now - timestamp)} s off (tolerance {int(tolerance)} s)")


# --- Mailgun ------------------------------------------------------------------------


def mailgun_signature(signing_key: str, timestamp: str, token: str) -> str:
    return hmac.new(signing_key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def verify_mailgun(body: Mapping[str, Any], signing_key: str, *, now: float, tolerance: float) -> str:
    """Check a Mailgun webhook body; returns the signature token (for replay checks)."""
    if not signing_key:
        raise WebhookRejected("no mailgun_signing_key is configured")
    sig = body.get("signature")
    if not isinstance(sig, Mapping):
        raise WebhookRejected("no signature")
    timestamp, token, signature = (str(sig.get(k) or "") for k in ("timestamp", "token", "signature"))
    if not timestamp or not token or not signature:
        raise WebhookRejected("incomplete signature")
    expected = mailgun_signature(signing_key, timestamp, token)
    if not hmac.compare_digest(expected.encode(), signature.lower().encode()):
        raise WebhookRejected("bad signature")
    try:
        ts = float(timestamp)
    except ValueError:
        raise WebhookRejected("bad timestamp") from None
    _check_fresh(ts, now, tolerance)
    return token


def _utc_from_epoch(value: Any, default: dt.datetime) -> dt.datetime:
    try:
        return dt.datetime.fromtimestamp(float(value), dt.UTC)
    except (TypeError, ValueError, OverflowError):
        return default


def parse_mailgun(body: Mapping[str, Any], *, now: dt.datetime) -> ParsedEvent | None:
    data = body.get("event-data")
    if not isinstance(data, Mapping):
        return None
    kind = str(data.get("event") or "").lower()
    user_vars = _mapping(data.get("user-variables"))
    headers = _mapping(_mapping(data.get("message")).get("headers"))
    status = _mapping(data.get("delivery-status"))
    reason = " ".join(str(x) for x in (status.get("code"), status.get("message") or status.get("description"),
                                       data.get("reason")) if x) or None
    severity = None
    if kind == "delivered":
        kind_out = "delivered"
    elif kind == "failed":
        kind_out = "bounced"
        severity = "hard" if str(data.get("severity") or "").lower() == "permanent" else "soft"
    elif kind == "rejected":
        kind_out = "failed"
    elif kind in ("complained", "opened", "clicked", "unsubscribed"):
        kind_out = kind
    else:
        return None
    event = EmailEvent(
        type=kind_out,
        email_id=str(user_vars.get(EMAIL_ID_VARIABLE)) if user_vars.get(EMAIL_ID_VARIABLE) else None,
        provider="mailgun",
        occurred_at=_utc_from_epoch(data.get("timestamp"), now),
        severity=severity,
        reason=reason,
        url=str(data["url"]) if data.get("url") else None,
        raw={"id": data.get("id"), "event": kind, "severity": data.get("severity"),
             "reason": data.get("reason"), "delivery_status": dict(status)},
    )
    msg_id = headers.get("message-id")
    return ParsedEvent(event=event, provider_message_id=str(msg_id).strip("<>") if msg_id else None,
                       recipient=str(data["recipient"]) if data.get("recipient") else None)


# --- Resend (Svix) ---------------------------------------------------------------------


def svix_key(secret: str) -> bytes:
    if not secret.startswith("whsec_"):
        raise WebhookRejected("the resend secret must start with whsec_")
    try:
        return base64.b64decode(secret[len("whsec_"):])
    except (binascii.Error, ValueError):
        raise WebhookRejected("the resend secret is not base64 after whsec_") from None


def svix_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(svix_key(secret), signed, hashlib.sha256).digest()).decode()


def verify_svix(headers: Mapping[str, str], body: bytes, secret: str, *, now: float, tolerance: float) -> str:
    """Check a Svix-signed request; returns the ``svix-id`` (for deduplication)."""
    if not secret:
        raise WebhookRejected("no resend_secret is configured")
    msg_id = headers.get("svix-id") or headers.get("webhook-id") or ""
    timestamp = headers.get("svix-timestamp") or headers.get("webhook-timestamp") or ""
    signatures = headers.get("svix-signature") or headers.get("webhook-signature") or ""
    if not msg_id or not timestamp or not signatures:
        raise WebhookRejected("missing svix-id, svix-timestamp or svix-signature")
    try:
        ts = int(timestamp)
    except ValueError:
        raise WebhookRejected("bad svix-timestamp") from None
    expected = svix_signature(secret, msg_id, timestamp, body).split(",", 1)[1].encode()
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(expected, value.encode()):
            break
    else:
        raise WebhookRejected("bad signature")
    _check_fresh(ts, now, tolerance)
    return msg_id


def _iso(value: Any, default: dt.datetime) -> dt.datetime:
    if not isinstance(value, str):
        return default
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return default
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _resend_tag(tags: Any, name: str) -> str | None:
    if isinstance(tags, Mapping):
        value = tags.get(name)
        return str(value) if value else None
    if isinstance(tags, list):
        for tag in tags:
            if isinstance(tag, Mapping) and tag.get("name") == name and tag.get("value"):
                return str(tag["value"])
    return None


_RESEND_TYPES = {
    "email.delivered": "delivered", "email.bounced": "bounced", "email.complained": "complained",
    "email.opened": "opened", "email.clicked": "clicked", "email.failed": "failed",
    "email.delivery_delayed": "delayed", "email.sent": "sent",
}


def parse_resend(body: Mapping[str, Any], *, now: dt.datetime) -> ParsedEvent | None:
    kind = _RESEND_TYPES.get(str(body.get("type") or ""))
    data = body.get("data")
    if kind is None or not isinstance(data, Mapping):
        return None
    bounce = _mapping(data.get("bounce"))
    click = _mapping(data.get("click"))
    failed = _mapping(data.get("failed"))
    severity = None
    reason = None
    if kind == "bounced":
        severity = "hard" if str(bounce.get("type") or "").lower() == "permanent" else "soft"
        reason = " ".join(str(x) for x in (bounce.get("type"), bounce.get("subType"), bounce.get("message")) if x)
    elif kind == "failed":
        reason = str(failed.get("reason") or "failed")
    to = data.get("to")
    recipient = str(to[0]) if isinstance(to, list) and to else (str(to) if isinstance(to, str) else None)
    event = EmailEvent(
        type=kind,
        email_id=_resend_tag(data.get("tags"), EMAIL_ID_VARIABLE),
        provider="resend",
        occurred_at=_iso(body.get("created_at"), now),
        severity=severity,
        reason=reason or None,
        url=str(click["link"]) if click.get("link") else None,
        raw={"type": body.get("type"), "email_id": data.get("email_id"), "bounce": dict(bounce)},
    )
    return ParsedEvent(event=event, provider_message_id=str(data["email_id"]) if data.get("email_id") else None,
                       recipient=recipient)
