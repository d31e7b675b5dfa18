"""The ``email`` pipeline step and the ``email_event`` observers."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import pytest

from collector import appkeys
from collector.email.step import EmailStep, EmailStepOptions
from collector.events import EMAIL_EVENT
from pipelines.engine import RunContext
from pipelines.templates import Templates
from plugins.manager import build_plugin_manager
from tests.email.test_api import mailgun_payload


def context(app: Any, *, run_id: str = "run-1", attempt: int = 1) -> Any:
    return RunContext(app=app, http=None, pipeline="errors", step_id="mail", dry_run=False,
                      logger=logging.getLogger("test"), run_id=run_id, attempt=attempt,
                      variables={"count": 5}, templates=Templates())


def test_the_email_step_and_providers_are_built_in_plugins() -> None:
    manager = build_plugin_manager(entry_points=False)
    assert "email" in manager.steps()
    assert {"smtp", "resend", "mailgun"} <= set(manager.email_providers())


def test_step_options_need_a_body_or_template() -> None:
    with pytest.raises(msgspec.ValidationError, match="set template_id, html or text"):
        msgspec.convert({"to": "a@example.com", "subject": "s"}, EmailStepOptions)


async def test_a_retried_step_sends_one_email(email_app: Any) -> None:
    step = EmailStep()
    options = msgspec.convert({"to": "oncall@example.com, lead@example.com", "template_id": "notification",
                               "template_data": {"title": "5 errors in payments", "message": "see the logs"}},
                              EmailStepOptions)
    first = await step.run({}, options, context(email_app.app))
    retry = await step.run({}, options, context(email_app.app, attempt=2))
    assert first["email_id"] == retry["email_id"] and first["status"] == "SENT"
    assert len(email_app.smtp.messages) == 1
    assert sorted(email_app.smtp.messages[0][0].rcpt_tos) == ["lead@example.com", "oncall@example.com"]
    other_run = await step.run({}, options, context(email_app.app, run_id="run-2"))
    assert other_run["email_id"] != first["email_id"]
    described = step.describe({}, options, context(email_app.app))
    assert described == "send email to oncall@example.com, lead@example.com (template 'notification')"


async def test_events_are_published_on_the_bus(email_app: Any) -> None:
    seen: list[Mapping[str, Any]] = []

    def collect(events: Sequence[Mapping[str, Any]]) -> None:
        seen.extend(events)

    email_app.app[appkeys.EVENTS].subscribe(EMAIL_EVENT, collect)
    response = await email_app.post("/v1/emails?wait=true", headers=email_app.service,
                                    json={"to": ["alice@example.com"], "subject": "s", "text_body": "x"})
    record = await response.json()
    body = mailgun_payload({"event": "delivered", "timestamp": time.time(), "recipient": "alice@example.com",
                            "user-variables": {"logferry_email_id": record["id"]}})
    assert (await email_app.post("/v1/webhooks/mailgun", json=body)).status == 200
    assert len(seen) == 1
    event = seen[0]
    assert (event["type"], event["email_id"], event["provider"]) == ("delivered", record["id"], "mailgun")
    cipher = email_app.app[appkeys.EMAIL].cipher
    assert event["recipient_hash"] == cipher.email_hash("alice@example.com")
    assert "alice" not in str(event)
