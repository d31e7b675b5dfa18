"""Email in the plugin system, end to end: a real pipeline whose ``email``
step sends through aiosmtpd, and a plugin observing ``logferry_email_event``."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Mapping
from typing import Any

from collector import appkeys
from plugins import hookimpl
from plugins.testing import collector_app, run_pipeline  # noqa: F401 - fixtures
from tests.email.conftest import MAILGUN_SIGNING_KEY
from tests.email.test_api import mailgun_payload

PIPELINE = """
name: payments-errors
on: log
match:
  level: ERROR
steps:
  - type: email
    id: mail
    retry: {attempts: 3, backoff: 1s}
    options:
      to: ["oncall@example.com"]
      subject: "{{ event.source }}: {{ event.message | truncate(40) }}"
      template_id: notification
      template_data: {title: "Error in {{ event.source }}", message: "{{ event.message }}"}
"""


async def test_a_pipeline_email_step_sends_through_the_service(email_app: Any, run_pipeline: Any) -> None:  # noqa: F811
    event = {"timestamp": dt.datetime.now(dt.UTC), "level": "ERROR", "source": "payments",
             "message": "card <declined> for order 7", "tags": [], "context": {}}
    runs = await run_pipeline(PIPELINE, [event], app=email_app.app)
    assert [r.status for r in runs] == ["ok"], runs
    assert len(email_app.smtp.messages) == 1
    envelope, message = email_app.smtp.messages[0]
    assert envelope.rcpt_tos == ["oncall@example.com"]
    assert message["Subject"] == "payments: card <declined> for order 7"
    html = message.get_body(("html",)).get_content()
    assert "card &lt;declined&gt; for order 7" in html


class EmailObserver:
    def __init__(self) -> None:
        self.events: list[Mapping[str, Any]] = []

    @hookimpl
    async def logferry_email_event(self, event: Mapping[str, Any]) -> None:
        self.events.append(event)


async def test_plugins_observe_normalised_email_events(collector_app: Any, smtp_server: Any) -> None:  # noqa: F811
    observer = EmailObserver()
    client = await collector_app(plugins=[("email-observer", observer)], config={"email": {
        "providers": [smtp_server.provider()], "webhooks": {"mailgun_signing_key": MAILGUN_SIGNING_KEY}}})
    service = client.app[appkeys.EMAIL]
    from collector.email.message import SendEmail

    record = await service.send(SendEmail(to=["alice@example.com"], subject="s", text_body="x"))
    body = mailgun_payload({"event": "failed", "severity": "temporary", "timestamp": time.time(),
                            "recipient": "alice@example.com", "delivery-status": {"code": 452, "message": "full"},
                            "user-variables": {"logferry_email_id": record["id"]}})
    assert (await client.post("/v1/webhooks/mailgun", json=body)).status == 200
    for _ in range(100):
        if observer.events:
            break
        await asyncio.sleep(0.02)
    assert len(observer.events) == 1
    event = observer.events[0]
    assert (event["type"], event["severity"], event["email_id"]) == ("bounced", "soft", record["id"])
    assert (await service.get(record["id"]))["status"] == "SENT"  # a soft bounce does not end it
