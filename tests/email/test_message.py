"""The email domain rules: validation and the EmailMessage state machine (no I/O)."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest

from collector.email.message import (
    EmailEvent,
    InvalidEmail,
    SendEmail,
    apply_event,
    backoff_delay,
    check_rendered,
    validate_request,
)

LIMITS = {"default_from": "logferry <noreply@example.com>", "max_recipients": 5, "max_size": 1000}
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def check(**fields: Any) -> Any:
    base: dict[str, Any] = {"to": ["alice@example.com"], "subject": "s", "text_body": "hi"}
    base.update(fields)
    return validate_request(SendEmail(**base), **LIMITS)  # type: ignore[arg-type]


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"to": []}, "to", "at least one recipient"),
    ({"to": ["alice@example.com", "not-an-address"]}, "to[1]", "not a valid email address"),
    ({"cc": ["bob@@example.com"]}, "cc[0]", "not a valid email address"),
    ({"bcc": ["x@example.com\nBcc: evil@example.com"]}, "bcc[0]", "not a valid email address"),
    ({"to": [f"u{i}@example.com" for i in range(6)]}, "to", "at most 5 recipients"),
    ({"subject": "x" * 201}, "subject", "at most 200 characters (201 given)"),
    ({"subject": "a\r\nBcc: evil@example.com"}, "subject", "one line"),
    ({"text_body": None}, "html_body", "html_body or text_body"),
    ({"from_": "nobody"}, "from", "not a valid email address"),
    ({"tags": ["has space"]}, "tags[0]", "letters, digits"),
    ({"headers": {"Bcc": "evil@example.com"}}, "headers.Bcc", "not a header a caller may set"),
    ({"attachments": [{"filename": "../etc/passwd", "content": "aGk="}]}, "attachments[0].filename", "without /"),
    ({"attachments": [{"filename": "a.txt", "content": "***"}]}, "attachments[0].content", "base64"),
    ({"attachments": [{"filename": "a.txt", "content": "aGk=", "content_type": "text"}]},
     "attachments[0].content_type", "not a MIME type"),
    ({"attachments": [{"filename": "a.bin", "content": base64.b64encode(b"x" * 999).decode()}]},
     "attachments", "at most 1000"),
    ({"to": "alice@example.com"}, "to", "Expected `array`"),
])
def test_broken_rules_name_the_field_and_the_limit(fields: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidEmail) as info:
        check(**fields)
    assert info.value.field == field
    assert words in str(info.value)


def test_a_valid_request_is_normalised() -> None:
    checked = check(to=["Alice <Alice@Example.COM>"], attachments=[
        {"filename": "logo.png", "content": base64.b64encode(b"png").decode().rstrip("="),
         "content_type": "image/PNG", "content_id": "<logo>"}])
    assert checked.to == ["Alice <Alice@example.com>"]
    assert checked.from_ == "logferry <noreply@example.com>"
    att = checked.attachments[0]
    assert (att.content, att.content_type, att.content_id) == (b"png", "image/png", "logo")


def test_a_template_may_supply_subject_and_body_but_then_they_are_checked() -> None:
    check(subject=None, text_body=None, template_id="welcome")
    with pytest.raises(InvalidEmail, match="subject: is required"):
        check_rendered(None, "<p>x</p>", "x")
    with pytest.raises(InvalidEmail, match="subject: at most 200"):
        check_rendered("y" * 201, None, "x")
    with pytest.raises(InvalidEmail, match="html_body or text_body"):
        check_rendered("s", " ", "")


def event(kind: str, **extra: Any) -> EmailEvent:
    return EmailEvent(type=kind, email_id="e", provider="mailgun", occurred_at=NOW, **extra)


def test_delivery_and_hard_bounce_end_the_message() -> None:
    sent = {"status": "SENT"}
    assert apply_event(sent, event("delivered")).fields == {"status": "DELIVERED", "delivered_at": NOW}
    hard = apply_event(sent, event("bounced", severity="hard", reason="550 no such user"))
    assert hard.fields == {"status": "BOUNCED", "bounce_type": "hard", "error_message": "550 no such user"}
    assert hard.suppress_reason == "hard_bounce"


def test_a_soft_bounce_is_recorded_without_ending_the_message() -> None:
    changes = apply_event({"status": "SENT"}, event("bounced", severity="soft", reason="mailbox full"))
    assert "status" not in changes.fields and changes.fields["bounce_type"] == "soft"
    assert changes.suppress_reason is None


def test_a_late_delivery_does_not_undo_a_bounce() -> None:
    assert "status" not in apply_event({"status": "BOUNCED"}, event("delivered")).fields


def test_first_open_and_click_are_kept_and_scanners_are_not_counted() -> None:
    later = NOW + dt.timedelta(hours=1)
    assert apply_event({"status": "SENT", "opened_at": later}, event("opened")).fields == {}
    assert apply_event({"status": "SENT"}, event("clicked")).fields == {"clicked_at": NOW, "opened_at": NOW}
    assert apply_event({"status": "SENT"}, event("clicked", suspected_scanner=True)).fields == {}


def test_complaints_suppress() -> None:
    assert apply_event({"status": "DELIVERED"}, event("complained")).suppress_reason == "complaint"


def test_backoff_doubles_and_is_capped() -> None:
    delays = [backoff_delay(n, base=30, cap=300, jitter=0.5) for n in range(1, 7)]
    assert delays == [30, 60, 120, 240, 300, 300]
    assert backoff_delay(1, base=30, cap=300, jitter=0.0) == 22.5
