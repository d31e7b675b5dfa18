"""The providers' signature schemes, computed as their documentation says."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac

import pytest

from collector.email.webhooks import (
    WebhookRejected,
    parse_mailgun,
    parse_resend,
    verify_mailgun,
    verify_svix,
)

MAILGUN_KEY = "mailgun-signing-key"
SVIX_RAW_KEY = b"0123456789abcdef0123456789abcdef"
SVIX_SECRET = "whsec_" + base64.b64encode(SVIX_RAW_KEY).decode()
NOW = 1_760_000_000.0


def mailgun_body(timestamp: float = NOW, token: str = "t" * 50, key: str = MAILGUN_KEY) -> dict[str, object]:
    ts = str(int(timestamp))
    signature = hmac.new(key.encode(), (ts + token).encode(), hashlib.sha256).hexdigest()
    return {"signature": {"timestamp": ts, "token": token, "signature": signature}, "event-data": {}}


def svix_headers(body: bytes, msg_id: str = "msg_1", timestamp: float = NOW,
                 key: bytes = SVIX_RAW_KEY) -> dict[str, str]:
    ts = str(int(timestamp))
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {"svix-id": msg_id, "svix-timestamp": ts, "svix-signature": "v1," + base64.b64encode(mac).decode()}


def test_mailgun_valid_signature_returns_the_token() -> None:
    assert verify_mailgun(mailgun_body(), MAILGUN_KEY, now=NOW + 10, tolerance=300) == "t" * 50


@pytest.mark.parametrize(("body", "now", "reason"), [
    (mailgun_body(key="wrong-key"), NOW, "bad signature"),
    (mailgun_body(timestamp=NOW - 301), NOW, "off"),
    (mailgun_body(timestamp=NOW + 301), NOW, "off"),
    ({"event-data": {}}, NOW, "no signature"),
    ({"signature": {"timestamp": "1", "token": "", "signature": "x"}}, NOW, "incomplete"),
])
def test_mailgun_invalid_or_stale_signatures_are_refused(body: dict[str, object], now: float, reason: str) -> None:
    with pytest.raises(WebhookRejected, match=reason):
        verify_mailgun(body, MAILGUN_KEY, now=now, tolerance=300)


def test_mailgun_without_a_configured_key_refuses_everything() -> None:
    with pytest.raises(WebhookRejected):
        verify_mailgun(mailgun_body(key=""), "", now=NOW, tolerance=300)


def test_svix_valid_signature_returns_the_message_id() -> None:
    body = b'{"type":"email.delivered"}'
    assert verify_svix(svix_headers(body), body, SVIX_SECRET, now=NOW, tolerance=300) == "msg_1"


def test_svix_any_one_of_several_signatures_is_enough() -> None:
    body = b'{"type":"email.delivered"}'
    headers = svix_headers(body)
    headers["svix-signature"] = "v1,bm9wZQ== v2,whatever " + headers["svix-signature"]
    assert verify_svix(headers, body, SVIX_SECRET, now=NOW, tolerance=300) == "msg_1"


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda h, b: (h, b + b" "), "bad signature"),                           # body changed
    (lambda h, b: ({**h, "svix-id": "msg_2"}, b), "bad signature"),          # id changed
    (lambda h, b: (svix_headers(b, key=b"another key"), b), "bad signature"),
    (lambda h, b: (svix_headers(b, timestamp=NOW - 400), b), "off"),
    (lambda h, b: ({k: v for k, v in h.items() if k != "svix-signature"}, b), "missing"),
    (lambda h, b: ({**h, "svix-timestamp": "soon"}, b), "bad svix-timestamp"),
])
def test_svix_invalid_or_stale_requests_are_refused(mutate: object, reason: str) -> None:
    body = b'{"type":"email.delivered"}'
    headers, sent = mutate(svix_headers(body), body)  # type: ignore[operator]
    with pytest.raises(WebhookRejected, match=reason):
        verify_svix(headers, sent, SVIX_SECRET, now=NOW, tolerance=300)


def test_mailgun_events_are_normalised() -> None:
    now = dt.datetime.fromtimestamp(NOW, dt.UTC)
    failed = parse_mailgun({"event-data": {
        "event": "failed", "severity": "permanent", "timestamp": NOW - 5, "recipient": "a@example.com",
        "reason": "bounce", "delivery-status": {"code": 550, "message": "No such user"},
        "message": {"headers": {"message-id": "abc@mg.example.com"}},
        "user-variables": {"logferry_email_id": "e-1"}}}, now=now)
    assert failed is not None
    assert (failed.event.type, failed.event.severity, failed.event.email_id) == ("bounced", "hard", "e-1")
    assert failed.event.reason == "550 No such user bounce"
    assert failed.provider_message_id == "abc@mg.example.com" and failed.recipient == "a@example.com"
    temporary = parse_mailgun({"event-data": {"event": "failed", "severity": "temporary"}}, now=now)
    assert temporary is not None and temporary.event.severity == "soft"
    assert parse_mailgun({"event-data": {"event": "stored"}}, now=now) is None


def test_resend_events_are_normalised() -> None:
    now = dt.datetime.fromtimestamp(NOW, dt.UTC)
    bounced = parse_resend({"type": "email.bounced", "created_at": "2026-01-02T03:04:05.000Z", "data": {
        "email_id": "re-1", "to": ["a@example.com"], "tags": {"logferry_email_id": "e-1"},
        "bounce": {"type": "Permanent", "subType": "General", "message": "mailbox does not exist"}}}, now=now)
    assert bounced is not None
    assert (bounced.event.type, bounced.event.severity, bounced.event.email_id) == ("bounced", "hard", "e-1")
    assert bounced.event.occurred_at == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert bounced.provider_message_id == "re-1" and bounced.recipient == "a@example.com"
    soft = parse_resend({"type": "email.bounced", "data": {"bounce": {"type": "Transient"}}}, now=now)
    assert soft is not None and soft.event.severity == "soft"
    clicked = parse_resend({"type": "email.clicked", "data": {
        "tags": [{"name": "logferry_email_id", "value": "e-2"}], "click": {"link": "https://x.example/"}}}, now=now)
    assert clicked is not None and clicked.event.url == "https://x.example/" and clicked.event.email_id == "e-2"
    assert parse_resend({"type": "contact.created", "data": {}}, now=now) is None
