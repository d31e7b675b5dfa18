"""The notify step, channel config validation, and the digest templates."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from agent.configfile import ConfigInvalid, convert, parse_yaml, section
from collector.config import CollectorConfig
from collector.notifications.channels.base import DigestItem
from collector.notifications.channels.digest import TemplateDigestRenderer
from collector.notifications.channels.notify import NotifyOptions, NotifyStep
from collector.notifications.config import NotificationsConfig
from collector.notifications.lifecycle import channel_options
from pipelines.engine import RunContext
from pipelines.templates import Templates
from plugins.manager import build_plugin_manager
from tests.helpers import SECRET
from tests.notifications.conftest import Collector, SmtpSink, notification_config
from tests.notifications.test_api import Env


def registry() -> dict[str, Any]:
    return {name: r.obj for name, r in build_plugin_manager(entry_points=False).channels().items()}


def test_channel_options_errors_name_the_yaml_path() -> None:
    doc = parse_yaml(f"""
collector:
  secret_key: {SECRET}
  notifications:
    channels:
      sms: {{auth_token: t, from: "+15550100000"}}
      push: {{vapid_private_key: nope, subject: "ops@example.com"}}
      fax: {{}}
""", file="logferry.yaml")
    config = section(doc, "collector", CollectorConfig)
    with pytest.raises(ConfigInvalid) as caught:
        channel_options(config.notifications, registry())
    messages = [str(e) for e in caught.value.errors]
    assert any(m.startswith("collector.notifications.channels.sms.account_sid: required key is missing")
               for m in messages), messages
    assert any("collector.notifications.channels.push" in m and "mailto:" in m for m in messages), messages
    assert any("collector.notifications.channels.fax: no channel plugin named 'fax'" in m for m in messages)


def test_unconfigured_channels_are_off_and_enabled_false_turns_one_off() -> None:
    options = channel_options(NotificationsConfig(), registry())
    assert sorted(options) == ["email", "in_app"]
    off = convert({"channels": {"email": {"enabled": False}}}, NotificationsConfig)
    assert sorted(channel_options(off, registry())) == ["in_app"]


def test_notifications_config_defaults_follow_the_spec() -> None:
    config = NotificationsConfig()
    assert config.dedup_window == 300 and config.default_channels == ["email"]
    with pytest.raises(ConfigInvalid, match="digest_time must be a local time"):
        convert({"digest_time": "9am"}, NotificationsConfig, base_path="collector.notifications")


def test_digest_templates_escape_html_and_list_every_item() -> None:
    items = [DigestItem(notification_id=str(i), type="t", priority="HIGH" if i == 0 else "LOW",
                        title=f"<b>title {i}</b>", message=f"body {i}", data=None, created_at="2026-01-01T00:00:00Z")
             for i in range(3)]
    subject, text, html = TemplateDigestRenderer().render(channel="email", user_id="u", frequency="DAILY_DIGEST",
                                                          items=items)
    assert subject == "3 new notifications (today)"
    assert "1. [HIGH] <b>title 0</b>" in text and "body 2" in text
    assert html is not None and "&lt;b&gt;title 0&lt;/b&gt;" in html and "<b>title" not in html
    _, sms, none = TemplateDigestRenderer().render(channel="sms", user_id="u", frequency="BATCHED_5MIN",
                                                               items=items)
    assert sms.startswith("3 new: <b>title 0</b>;") and none is None


@pytest.fixture
async def env(make_config: Callable[..., CollectorConfig], collector_factory: Callable[..., Collector],
              tokens: Any, smtp: tuple[SmtpSink, int]) -> Env:
    sink, port = smtp
    collector = collector_factory(notification_config(make_config, smtp_port=port))
    e = Env(collector, tokens, sink)
    await collector.start()
    await e.put_user("oncall", email="oncall@example.com")
    return e


def context(app: Any, run_id: str, *, dry_run: bool = False) -> RunContext:
    return RunContext(app=app, http=None, pipeline="payments-errors", step_id="page", dry_run=dry_run,
                      logger=logging.getLogger("test"), run_id=run_id, attempt=1, variables={},
                      templates=Templates({}))


async def test_the_notify_step_creates_once_per_run_even_when_retried(env: Env) -> None:
    step = NotifyStep()
    options = NotifyOptions(user_id="oncall", type="payments.errors", priority="HIGH", title="5 errors",
                            message="payments failing", channels=["email", "in_app"])
    run_id = str(uuid.uuid4())
    first = await step.run({}, options, context(env.collector.app, run_id))
    retry = await step.run({}, options, context(env.collector.app, run_id))
    assert first["ids"] == retry["ids"] and first["notifications"][0]["created"] is True
    assert retry["notifications"][0]["created"] is False
    await env.drain()
    assert [m["Subject"] for m in env.smtp.to("oncall@example.com")] == ["5 errors"]
    assert "notify oncall (HIGH" in step.describe({}, options, context(None, run_id, dry_run=True))


def test_notify_options_need_a_recipient() -> None:
    with pytest.raises(ValueError, match="user_id or user_ids"):
        NotifyOptions(title="t", message="m")


async def test_the_example_pipeline_pages_oncall_through_the_notify_step(env: Env) -> None:
    from pipelines.engine import PipelineEngine
    from pipelines.loader import load_pipeline_file
    from pipelines.simulate import clock_for, simulate
    from tests.helpers import ROOT

    manager = build_plugin_manager(entry_points=False)
    templates = Templates(manager.template_filters())
    await env.set_preference("oncall", "error_burst", channels={"email": True, "in_app": True})
    pipeline = load_pipeline_file(str(ROOT / "pipelines/examples/error-burst-oncall.yaml"), manager.steps(),
                                  templates)
    start = env.collector.clock().timestamp()
    events = [{"timestamp": start + i, "level": "ERROR", "source": "payments-api", "message": f"charge failed {i}",
               "tags": [], "context": {}} for i in range(6)]
    clock = clock_for(pipeline, events)
    engine = PipelineEngine(templates=templates, app=env.collector.app, http=None, clock=clock)
    engine.set_pipelines([pipeline])
    await simulate(engine, pipeline, events, clock=clock)
    await env.drain()
    inbox = await env.inbox("oncall")
    assert [(n["title"], n["priority"]) for n in inbox["notifications"]] == [
        ("5 errors in payments-api within 1m", "HIGH")]
    assert inbox["notifications"][0]["dedup_key"] == "error-burst:payments-api"
    assert [m["Subject"] for m in env.smtp.to("oncall@example.com")] == ["5 errors in payments-api within 1m"]
