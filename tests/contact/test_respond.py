"""The whole triage loop, end to end over real parts: a submission triggers the
``contact_form`` pipeline (acknowledgement email to the submitter, in-app and
email notification to an admin), then an admin responds through the email
service; aiosmtpd receives every message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from collector import appkeys
from collector.app import create_app
from collector.config import CollectorConfig
from collector.storage import Storage
from plugins.testing import SmtpServer
from tests.contact.conftest import ContactHarness, FakeClock

PIPELINE = """\
name: contact-ack
on: contact_form
steps:
  - id: acknowledge
    type: email
    options:
      to: "{{ event.email }}"
      subject: "We received your message: {{ event.subject }}"
      text: "Hi {{ event.name }}, thanks for writing to us. We will answer within one working day."
  - id: tell-support
    type: notify
    options:
      user_id: support-lead
      type: contact_form
      priority: MEDIUM
      channels: [in_app, email]
      title: "New contact form: {{ event.subject }}"
      message: "From {{ event.name }}: {{ event.message }}"
      data: {submission_id: "{{ event.id }}"}
"""


async def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.05)


@pytest.fixture
async def triage(storage: Storage, make_config: Callable[..., CollectorConfig], tokens: Any,
                 smtp_server: SmtpServer, tmp_path: Path) -> AsyncIterator[tuple[ContactHarness, str]]:
    pipeline = tmp_path / "contact-ack.yaml"
    pipeline.write_text(PIPELINE)
    config = make_config(
        pipelines=[str(pipeline)],
        email={"from": "Acme Support <support@example.com>", "providers": [smtp_server.provider()]},
        notifications={"default_channels": ["email", "in_app"]},
        contact={"admin_recipients": ["support-lead"]},
    )
    admin = tokens.create("admin", name="support-admin")
    lead = tokens.create("user", user_id="support-lead")
    app = create_app(config, storage=storage)
    # The plugin host and the pipeline engine, when the app factory does not set them up itself.
    from pipelines.service import PIPELINES
    from plugins import host

    if appkeys.PLUGINS not in app:
        host.setup(app, entry_points=False)
    if PIPELINES not in app:
        from pipelines import service

        service.setup(app, tick_interval=0.05)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    harness = ContactHarness(client, FakeClock(), admin, tokens)
    put = await client.put("/v1/users/support-lead", json={"email": "lead@example.com"}, headers=harness.admin)
    assert put.status in (200, 201), await put.text()
    yield harness, lead
    await client.close()


async def test_submission_acknowledged_admin_notified_then_response_sent(triage: Any,
                                                                         smtp_server: SmtpServer) -> None:
    h, lead_token = triage
    spam = await h.submit(email="promo@yopmail.com", subject="SEO", message="We guarantee first page of Google "
                          "with our SEO services! https://bit.ly/x1")
    resp = await h.submit(name="Grace Hopper", email="grace@example.net", subject="Broken compiler",
                          message="The compiler you sold me emits moths. Please advise.")
    sid = (await resp.json())["id"]

    # The pipeline acknowledges the submitter and tells support (email and in-app).
    await wait_for(lambda: bool(smtp_server.to("grace@example.net")) and bool(smtp_server.to("lead@example.com")))
    [ack] = smtp_server.to("grace@example.net")
    assert ack["Subject"] == "We received your message: Broken compiler"
    assert "Hi Grace Hopper" in ack.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    [admin_mail] = smtp_server.to("lead@example.com")
    assert "Broken compiler" in admin_mail["Subject"]
    titles: list[str] = []
    for _ in range(100):  # the in-app delivery is stored by the notifier's own worker
        inbox = await h.client.get("/v1/me/notifications", headers={"Authorization": f"Bearer {lead_token}"})
        assert inbox.status == 200
        titles = [n["title"] for n in (await inbox.json())["notifications"]]
        if titles:
            break
        await asyncio.sleep(0.05)
    assert titles == ["New contact form: Broken compiler"]
    # Spam got no acknowledgement and raised no notification.
    assert smtp_server.to("promo@yopmail.com") == []
    assert (await h.stored((await spam.json())["id"]))["status"] == "SPAM"

    # An admin responds; the email service sends it and the submission records it.
    answer = {"text_body": "Dear Grace, please update to version 2.1, which removes the moths."}
    sent = await h.client.post(f"/v1/contact/{sid}/respond", json=answer, headers=h.admin)
    assert sent.status == 200, await sent.text()
    result = await sent.json()
    await wait_for(lambda: len(smtp_server.to("grace@example.net")) == 2)
    response = smtp_server.to("grace@example.net")[1]
    assert response["Subject"] == "Re: Broken compiler"
    assert "version 2.1" in response.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert response["X-Logferry-Contact-Id"] == sid
    row = await h.stored(sid)
    assert row["status"] == "RESPONDED"
    assert row["response_email_id"] == result["email"]["id"]
    assert row["responded_at"] is not None
    assert row["assigned_to"] == "support-admin"
    email = await h.client.get(f"/v1/emails/{row['response_email_id']}", headers=h.admin)
    assert email.status == 200

    # A retried request (double click, proxy retry) sends nothing twice.
    again = await h.client.post(f"/v1/contact/{sid}/respond", json=answer, headers=h.admin)
    assert (await again.json())["email"]["id"] == result["email"]["id"]
    await asyncio.sleep(0.2)
    assert len(smtp_server.to("grace@example.net")) == 2


async def test_respond_refuses_closed_and_spam_submissions_and_bad_bodies(triage: Any,
                                                                         smtp_server: SmtpServer) -> None:
    h, _ = triage
    ham = (await (await h.submit()).json())["id"]
    spam = (await (await h.submit(email="b@example.org", website="bot")).json())["id"]
    body = {"text_body": "Thanks!"}
    assert (await h.client.post(f"/v1/contact/{spam}/respond", json=body, headers=h.admin)).status == 409
    assert (await h.client.post(f"/v1/contact/{ham}/respond", json={}, headers=h.admin)).status == 400
    assert (await h.client.post(f"/v1/contact/{ham}/respond", json={"body": "x"}, headers=h.admin)).status == 400
    missing = "00000000-0000-0000-0000-000000000000"
    assert (await h.client.post(f"/v1/contact/{missing}/respond", json=body, headers=h.admin)).status == 404
    await h.client.patch(f"/v1/contact/{ham}", json={"status": "CLOSED"}, headers=h.admin)
    closed = await h.client.post(f"/v1/contact/{ham}/respond", json=body, headers=h.admin)
    assert closed.status == 409 and "reopen" in (await closed.json())["error"]["message"]


async def test_respond_and_close_with_an_explicit_idempotency_key(triage: Any, smtp_server: SmtpServer) -> None:
    h, _ = triage
    sid = (await (await h.submit(email="kim@example.org", subject="Hours?")).json())["id"]
    await wait_for(lambda: len(smtp_server.to("kim@example.org")) == 1)  # the acknowledgement
    headers = {**h.admin, "Idempotency-Key": "reply-1"}
    first = await h.client.post(f"/v1/contact/{sid}/respond", headers=headers,
                                json={"subject": "Our opening hours", "text_body": "9 to 5.", "close": True})
    assert first.status == 200
    row = await h.stored(sid)
    assert row["status"] == "CLOSED" and row["response_email_id"]
    await wait_for(lambda: len(smtp_server.to("kim@example.org")) == 2)
    assert smtp_server.to("kim@example.org")[1]["Subject"] == "Our opening hours"


async def test_a_refused_response_is_422_and_leaves_the_submission_unanswered(triage: Any,
                                                                           smtp_server: SmtpServer) -> None:
    h, _ = triage
    smtp_server.handler.refuse.add("gone@example.org")
    sid = (await (await h.submit(email="gone@example.org")).json())["id"]
    resp = await h.client.post(f"/v1/contact/{sid}/respond", json={"text_body": "Hello?"}, headers=h.admin)
    assert resp.status == 422
    assert (await resp.json())["error"]["code"] == "email_failed"
    row = await h.stored(sid)
    assert row["status"] == "NEW" and row["response_email_id"] is None and row["responded_at"] is None
