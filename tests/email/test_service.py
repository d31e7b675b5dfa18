"""The EmailService against real providers' stand-ins: aiosmtpd, local Resend
and Mailgun servers, and chDB."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest

from collector.email.message import InvalidEmail, SendEmail, Suppressed
from collector.pii import PiiCipher
from collector.storage import Storage
from plugins.types import PermanentError, TransientError
from tests.email.conftest import FakeClock, mailgun_provider, resend_provider
from tests.helpers import SECRET


def hello(**extra: Any) -> SendEmail:
    fields: dict[str, Any] = {"to": ["Alice <alice@example.com>"], "subject": "Hello",
                              "html_body": '<p>Hi <a href="https://example.com/a?x=1&amp;y=2">there</a></p>'}
    fields.update(extra)
    return SendEmail(**fields)


async def test_smtp_send_is_stored_sent_with_our_message_id(make_service: Any, smtp_server: Any) -> None:
    service = await make_service(providers=[smtp_server.provider()])
    record = await service.send(hello(cc=["carol@example.com"], bcc=["bob@example.com"]))
    assert record["status"] == "SENT"
    assert record["provider"] == "SMTP"
    assert record["retry_count"] == 0
    envelope, message = smtp_server.messages[0]
    assert sorted(envelope.rcpt_tos) == ["alice@example.com", "bob@example.com", "carol@example.com"]
    assert "Bcc" not in message and message["Cc"] == "carol@example.com"
    assert message["Message-ID"] == record["header_message_id"]
    assert record["message_id"] == record["header_message_id"].strip("<>")
    text = message.get_body(("plain",)).get_content()
    assert "there (https://example.com/a?x=1&y=2)" in text
    stored = await service.get(record["id"])
    assert stored["status"] == "SENT" and stored["to"] == ["Alice <alice@example.com>"]
    assert stored["sent_at"] is not None


async def test_addresses_are_encrypted_at_rest_with_keyed_hashes(make_service: Any, smtp_server: Any,
                                                                 storage: Storage) -> None:
    service = await make_service(providers=[smtp_server.provider()])
    record = await service.send(hello(bcc=["bob@example.com"]))
    rows = await storage.query("SELECT `to`, to_hash, bcc FROM email_messages FINAL WHERE id = {id:UUID}",
                               {"id": record["id"]})
    row = rows[0]
    assert "alice" not in str(row["to"]) and "bob" not in str(row["bcc"])
    cipher = PiiCipher(SECRET)
    assert cipher.decrypt(row["to"][0]) == "Alice <alice@example.com>"
    assert cipher.email_hash("ALICE@example.com") in row["to_hash"]
    assert cipher.email_hash("bob@example.com") in row["to_hash"]


async def test_transient_failure_fails_over_to_the_next_provider(make_service: Any, resend_api: Any,
                                                                 mailgun_api: Any) -> None:
    resend, resend_url = resend_api
    mailgun, mailgun_url = mailgun_api
    resend.fail_with = [503]
    service = await make_service(providers=[resend_provider(resend_url), mailgun_provider(mailgun_url)])
    record = await service.send(hello(tags=["welcome"]))
    assert record["status"] == "SENT" and record["provider"] == "MAILGUN"
    assert record["message_id"] == mailgun.sent[0]["_id"]
    assert "resend answered 503" in record["error_message"]
    sent = mailgun.sent[0]
    assert sent["to"] == ["Alice <alice@example.com>"] and sent["o:tag"] == ["welcome"]
    assert sent["v:logferry_email_id"] == [record["id"]]
    assert sent["h:Message-Id"] == [record["header_message_id"]]
    assert service.counters["failover"] == 1


async def test_permanent_rejection_fails_the_message_without_failover(make_service: Any, resend_api: Any,
                                                                      mailgun_api: Any) -> None:
    resend, resend_url = resend_api
    mailgun, mailgun_url = mailgun_api
    resend.fail_with = [422]
    service = await make_service(providers=[resend_provider(resend_url), mailgun_provider(mailgun_url)])
    with pytest.raises(PermanentError, match="resend answered 422"):
        await service.send(hello())
    assert mailgun.requests == 0
    rows = await service.storage.query("SELECT status, error_message FROM email_messages FINAL")
    assert rows[0]["status"] == "FAILED" and "422" in rows[0]["error_message"]


async def test_resend_gets_bearer_key_idempotency_key_and_fields(make_service: Any, resend_api: Any) -> None:
    resend, url = resend_api
    service = await make_service(providers=[resend_provider(url)])
    png = base64.b64encode(b"\x89PNG fake").decode()
    record = await service.send(hello(attachments=[
        {"filename": "logo.png", "content": png, "content_type": "image/png", "content_id": "logo"},
        {"filename": "report.csv", "content": base64.b64encode(b"a,b\n").decode(), "content_type": "text/csv"},
    ], reply_to="support@example.com"))
    sent = resend.sent[0]
    assert sent["_idempotency_key"] == record["id"]
    assert sent["reply_to"] == "support@example.com"
    assert sent["headers"]["Message-ID"] == record["header_message_id"]
    assert {"name": "logferry_email_id", "value": record["id"]} in sent["tags"]
    assert [a["filename"] for a in sent["attachments"]] == ["logo.png", "report.csv"]
    assert sent["attachments"][0]["content_id"] == "logo"
    assert record["attachments"] == [
        {"filename": "logo.png", "size": 9, "content_type": "image/png", "content_id": "logo"},
        {"filename": "report.csv", "size": 4, "content_type": "text/csv"},
    ]
    assert record["provider"] == "RESEND" and record["message_id"] == sent["_id"]


async def test_same_idempotency_key_is_one_message_sent_once(make_service: Any, resend_api: Any) -> None:
    resend, url = resend_api
    service = await make_service(providers=[resend_provider(url)])
    results = await asyncio.gather(*(service.send(hello(), idempotency_key="signup-42") for _ in range(5)))
    assert len({r["id"] for r in results}) == 1
    assert resend.requests == 1 and len(resend.sent) == 1
    again = await service.send(hello(subject="Changed"), idempotency_key="signup-42")
    assert again["id"] == results[0]["id"] and again["subject"] == "Hello"
    assert resend.requests == 1


async def test_transient_failures_retry_with_backoff_until_sent(make_service: Any, resend_api: Any,
                                                                clock: FakeClock) -> None:
    resend, url = resend_api
    resend.fail_with = [503, 502]
    service = await make_service(providers=[resend_provider(url)])
    with pytest.raises(TransientError) as info:
        await service.send(hello())
    assert info.value.retry_after == pytest.approx(10.0)  # base delay, jitter centred
    rows = await service.storage.query("SELECT toString(id) AS id, status, retry_count FROM email_messages FINAL")
    record = rows[0]
    assert record["status"] == "QUEUED" and record["retry_count"] == 1
    clock.advance(9)
    service.queue.wake()
    await asyncio.wait_for(service.drain(), 5)
    assert resend.requests == 1
    clock.advance(2)
    service.queue.wake()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(service.drain(), 5)
    assert resend.requests == 2  # second failure: next wait doubles
    stored = await service.get(record["id"])
    assert stored["status"] == "QUEUED" and stored["retry_count"] == 2
    clock.advance(21)
    service.queue.wake()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(service.drain(), 5)
    stored = await service.get(record["id"])
    assert stored["status"] == "SENT" and stored["retry_count"] == 2
    assert len(resend.sent) == 1


async def test_retries_give_up_after_max_attempts(make_service: Any, resend_api: Any, clock: FakeClock) -> None:
    resend, url = resend_api
    resend.fail_with = [500] * 10
    service = await make_service(providers=[resend_provider(url)],
                                 retries={"base_delay": "1s", "max_delay": "2s", "max_attempts": 3})
    with pytest.raises(TransientError):
        await service.send(hello())
    for _ in range(3):
        clock.advance(5)
        service.queue.wake()
        await asyncio.sleep(0.05)
        await asyncio.wait_for(service.drain(), 5)
    rows = await service.storage.query("SELECT status, retry_count, error_message FROM email_messages FINAL")
    assert rows[0]["status"] == "FAILED" and rows[0]["retry_count"] == 3
    assert rows[0]["error_message"].startswith("gave up after 3 attempts")
    assert resend.requests == 3


async def test_queued_send_returns_at_once_and_is_sent_by_the_queue(make_service: Any, smtp_server: Any) -> None:
    service = await make_service(providers=[smtp_server.provider()])
    record = await service.send(hello(), wait=False)
    assert record["status"] == "QUEUED"
    await asyncio.wait_for(service.drain(), 5)
    assert (await service.get(record["id"]))["status"] == "SENT"
    assert len(smtp_server.messages) == 1


async def test_a_restarted_service_sends_what_was_queued(make_service: Any, smtp_server: Any,
                                                         resend_api: Any) -> None:
    resend, url = resend_api
    first = await make_service(providers=[resend_provider(url)], start=False)
    record = await first.send(hello(attachments=[{"filename": "a.txt", "content": "aGk="}]), wait=False)
    # The first collector stops before its queue ran; a new one starts on the same storage.
    second = await make_service(providers=[resend_provider(url)])
    await asyncio.wait_for(second.drain(), 5)
    assert (await second.get(record["id"]))["status"] == "SENT"
    assert len(resend.sent) == 1 and resend.sent[0]["attachments"][0]["filename"] == "a.txt"


async def test_a_send_cut_short_is_not_repeated_through_a_provider_without_idempotency(
        make_service: Any, smtp_server: Any) -> None:
    first = await make_service(providers=[smtp_server.provider()], start=False)
    record = await first._create(hello(), None, None, True)  # stored, "sending", then the process died
    second = await make_service(providers=[smtp_server.provider()])
    await asyncio.wait_for(second.drain(), 5)
    stored = await second.get(record["id"])
    assert stored["status"] == "FAILED" and "never delivered twice" in stored["error_message"]
    assert smtp_server.messages == []


async def test_a_send_cut_short_is_repeated_safely_through_an_idempotent_provider(
        make_service: Any, resend_api: Any) -> None:
    resend, url = resend_api
    first = await make_service(providers=[resend_provider(url)], start=False)
    record = await first._create(hello(), None, None, True)
    # Resend accepted it, then the process died before SENT was stored.
    await first.providers[0].client.send(first._outgoing[record["id"]])
    second = await make_service(providers=[resend_provider(url)])
    await asyncio.wait_for(second.drain(), 5)
    stored = await second.get(record["id"])
    assert stored["status"] == "SENT" and stored["message_id"] == resend.sent[0]["_id"]
    assert resend.requests == 2 and len(resend.sent) == 1  # Resend deduplicated the repeat


async def test_smtp_partial_refusal_is_recorded(make_service: Any, smtp_server: Any) -> None:
    smtp_server.handler.refuse.add("ghost@example.com")
    service = await make_service(providers=[smtp_server.provider()])
    record = await service.send(hello(to=["alice@example.com", "ghost@example.com"]))
    assert record["status"] == "SENT"
    assert "refused ghost@example.com: 550" in record["error_message"]
    assert smtp_server.messages[0][0].rcpt_tos == ["alice@example.com"]


async def test_smtp_every_recipient_refused_is_permanent(make_service: Any, smtp_server: Any) -> None:
    smtp_server.handler.refuse.add("ghost@example.com")
    service = await make_service(providers=[smtp_server.provider()])
    with pytest.raises(PermanentError, match="every recipient refused"):
        await service.send(hello(to=["ghost@example.com"]))


async def test_smtp_4xx_is_transient_and_fails_over(make_service: Any, smtp_server: Any, resend_api: Any) -> None:
    _, url = resend_api
    smtp_server.handler.data_reply = "451 4.3.0 try again later"
    service = await make_service(providers=[smtp_server.provider(), resend_provider(url)])
    record = await service.send(hello())
    assert record["provider"] == "RESEND" and "451" in record["error_message"]


async def test_smtp_starttls_is_required_by_default(make_service: Any, smtp_server: Any) -> None:
    service = await make_service(providers=[smtp_server.provider(starttls="required")],
                                 retries={"base_delay": "1s", "max_delay": "1s", "max_attempts": 1})
    with pytest.raises(PermanentError, match="STARTTLS"):
        await service.send(hello())
    assert smtp_server.messages == []


async def test_smtp_connection_refused_is_transient(make_service: Any, resend_api: Any) -> None:
    from tests.helpers import free_port

    _, url = resend_api
    dead = {"type": "smtp", "host": "127.0.0.1", "port": free_port(), "starttls": "off"}
    service = await make_service(providers=[dead, resend_provider(url)])
    record = await service.send(hello())
    assert record["provider"] == "RESEND" and "smtp 127.0.0.1" in record["error_message"]


async def test_a_25_mb_message_goes_through_smtp(make_service: Any, smtp_server: Any) -> None:
    service = await make_service(providers=[smtp_server.provider(timeout="60s", deadline="120s")],
                                 send_timeout="120s")
    payload = bytes(range(256)) * (24 * 1024 * 1024 // 256)
    record = await service.send(hello(attachments=[{
        "filename": "big.bin", "content": base64.b64encode(payload).decode(),
        "content_type": "application/octet-stream"}]))
    assert record["status"] == "SENT"
    part = next(p for p in smtp_server.messages[0][1].iter_attachments())
    assert part.get_content() == payload
    with pytest.raises(InvalidEmail, match=r"attachments: the message is \d+ bytes with attachments; at most"):
        await service.send(hello(attachments=[{"filename": "big.bin",
                                               "content": base64.b64encode(payload + payload[:2 * 1024 * 1024])
                                               .decode()}]))


async def test_sends_to_a_suppressed_address_fail_fast_unless_overridden(make_service: Any,
                                                                          smtp_server: Any) -> None:
    service = await make_service(providers=[smtp_server.provider()])
    await service.suppressions.add("alice@example.com", "hard_bounce", "550 no such user")
    with pytest.raises(Suppressed, match=r"alice@example.com is suppressed \(hard_bounce: 550 no such user\)"):
        await service.send(hello())
    assert smtp_server.messages == []
    rows = await service.storage.query("SELECT status FROM email_messages FINAL")
    assert [r["status"] for r in rows] == ["FAILED"]
    record = await service.send(hello(ignore_suppression=True))
    assert record["status"] == "SENT"


async def test_non_transactional_mail_has_list_unsubscribe(make_service: Any, smtp_server: Any) -> None:
    service = await make_service(providers=[smtp_server.provider()])
    await service.send(hello(transactional=False))
    await service.send(hello())
    marketing, transactional = (m for _, m in smtp_server.messages)
    assert marketing["List-Unsubscribe"].startswith("<http://collector.test/t/u/")
    assert marketing["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert "List-Unsubscribe" not in transactional


async def test_tracking_wraps_links_and_adds_a_pixel(make_service: Any, smtp_server: Any) -> None:
    service = await make_service(providers=[smtp_server.provider()])
    await service.send(hello(html_body='<html><body><a href="https://example.com/?a=1&amp;b=2">x</a>'
                                       '<a href="mailto:help@example.com">mail</a></body></html>'))
    html = smtp_server.messages[0][1].get_body(("html",)).get_content()
    assert "http://collector.test/t/c/" in html and "https://example.com" not in html
    assert 'href="mailto:help@example.com"' in html
    assert html.index("/t/o/") < html.index("</body>")


async def test_template_send_renders_subject_html_and_text(make_service: Any, smtp_server: Any) -> None:
    service = await make_service(providers=[smtp_server.provider()])
    record = await service.send(SendEmail(to=["alice@example.com"], template_id="notification",
                                          template_data={"title": "Disk <full>", "message": "90% used"}))
    assert record["subject"] == "Disk <full>"
    assert "Disk &lt;full&gt;" in record["html_body"]
    assert record["text_body"].startswith("Disk <full>")
    assert record["template_id"] == "notification"
    with pytest.raises(InvalidEmail, match="template_data: 'message' is undefined"):
        await service.send(SendEmail(to=["alice@example.com"], template_id="notification",
                                     template_data={"title": "x"}))


async def test_erasing_a_recipient_deletes_their_messages(make_service: Any, smtp_server: Any) -> None:
    service = await make_service(providers=[smtp_server.provider()])
    mine = await service.send(hello(to=["erin@example.com"], bcc=["Other <other@example.com>"]))
    theirs = await service.send(hello(to=["frank@example.com"]))
    assert await service.erase_recipient("OTHER@example.com") == 1
    assert await service.get(mine["id"]) is None
    assert await service.get(theirs["id"]) is not None


async def test_templates_come_from_the_configured_folder_first(make_service: Any, smtp_server: Any,
                                                               tmp_path: Any) -> None:
    (tmp_path / "welcome.subject.txt").write_text("Welcome, {{ name }}!\n")
    (tmp_path / "welcome.html").write_text('<p>Hello {{ name }}, <a href="{{ url }}">start here</a>.</p>')
    (tmp_path / "notification.txt").write_text("ours: {{ title }}")
    service = await make_service(providers=[smtp_server.provider()], templates=str(tmp_path))
    record = await service.send(SendEmail(to=["alice@example.com"], template_id="welcome", template_data={
        "name": "<Bob & co>", "url": "https://example.com/start?a=1&b=2"}))
    assert record["subject"] == "Welcome, <Bob & co>!"
    assert "Hello &lt;Bob &amp; co&gt;" in record["html_body"]
    assert 'href="https://example.com/start?a=1&amp;b=2"' in record["html_body"]
    assert record["text_body"] == "Hello <Bob & co>, start here (https://example.com/start?a=1&b=2)."
    sent_html = smtp_server.messages[0][1].get_body(("html",)).get_content()
    assert "/t/c/" in sent_html  # the escaped link was wrapped (and unescaped inside the token)
    overridden = await service.send(SendEmail(to=["alice@example.com"], template_id="notification",
                                              template_data={"title": "T", "message": "M"}))
    assert overridden["text_body"] == "ours: T"


async def test_a_queued_message_and_callers_retrying_it_send_once(make_service: Any, resend_api: Any) -> None:
    resend, url = resend_api
    resend.delay = 0.2  # the queue worker is mid-send while the callers retry
    service = await make_service(providers=[resend_provider(url)])
    queued = await service.send(hello(), idempotency_key="k-1", wait=False)
    await asyncio.sleep(0.05)
    retries = await asyncio.gather(*(service.send(hello(), idempotency_key="k-1", wait=True) for _ in range(3)))
    assert {r["id"] for r in retries} == {queued["id"]}
    assert {r["status"] for r in retries} == {"SENT"}
    await asyncio.wait_for(service.drain(), 5)
    assert resend.requests == 1
