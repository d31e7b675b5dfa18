"""The pagerduty step against a local server speaking PagerDuty's Events API v2."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

PIPELINE = (Path(__file__).parent.parent / "pipelines" / "errors-to-pagerduty.yaml").read_text()
T0 = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)


def errors(n, source="payments"):
    return [{"timestamp": T0 + dt.timedelta(seconds=i), "level": "ERROR", "source": source,
             "message": f"card declined #{i}", "context": {}, "tags": []} for i in range(n)]


def pointed_at(url):
    return PIPELINE.replace("      severity:", f"      url: {url}/v2/enqueue\n      severity:")


async def test_ten_errors_trigger_one_incident_per_source_and_quiet_resolves_it(run_pipeline, http_receiver):
    pagerduty = await http_receiver()
    pagerduty.respond(202, {"status": "success", "message": "Event processed", "dedup_key": "k1"})
    runs = await run_pipeline(pointed_at(pagerduty.url), errors(9) + errors(12, source="web"))
    # The trigger, then (the clock moves on a window after the last event) the resolve.
    assert [r.status for r in runs] == ["ok", "ok"]
    resolve = pagerduty.json(1)
    assert resolve["event_action"] == "resolve" and "payload" not in resolve
    assert resolve["dedup_key"] == 'logferry:errors-to-pagerduty:["web"]'
    event = pagerduty.json(0)
    assert event["routing_key"] == "0123456789abcdef0123456789abcdef"
    assert event["event_action"] == "trigger"
    assert event["dedup_key"] == 'logferry:errors-to-pagerduty:["web"]'
    assert event["payload"]["severity"] == "error"
    assert event["payload"]["source"] == "web"
    assert event["payload"]["summary"].startswith("10 errors in web within 5m: card declined #9")
    assert runs[0].steps[0].output == {"dedup_key": "k1", "status": "success"}


async def test_throttling_by_pagerduty_is_retried(run_pipeline, http_receiver):
    pagerduty = await http_receiver()
    pagerduty.respond(429, {"status": "throttle event"})
    runs = await run_pipeline(pointed_at(pagerduty.url), errors(10))
    assert runs[0].status == "ok" and runs[0].steps[0].attempts == 2
    assert len(pagerduty.requests) == 3  # throttled, retried, then the resolve


async def test_an_invalid_event_is_not_retried(run_pipeline, http_receiver):
    pagerduty = await http_receiver()
    pagerduty.respond(400, {"status": "invalid event", "errors": ["'routing_key' is invalid"]})
    runs = await run_pipeline(pointed_at(pagerduty.url), errors(10))
    assert runs[0].status == "failed" and runs[0].steps[0].attempts == 1  # not retried
    assert "'routing_key' is invalid" in runs[0].error


async def test_a_dry_run_says_what_would_be_paged(run_pipeline, http_receiver):
    pagerduty = await http_receiver()
    runs = await run_pipeline(pointed_at(pagerduty.url), errors(10), dry_run=True)
    assert pagerduty.requests == []
    assert runs[0].steps[0].description.startswith(
        "trigger PagerDuty incident 'logferry:errors-to-pagerduty:[\"payments\"]' (error): 10 errors in payments")
    assert runs[1].steps[0].description.startswith(
        "resolve PagerDuty incident 'logferry:errors-to-pagerduty:[\"payments\"]'")


def test_the_step_is_registered_through_the_entry_point(logferry_plugins):
    manager = logferry_plugins()
    assert manager.steps()["pagerduty"].plugin == "pagerduty"
    assert "pd_severity" in manager.template_filters()


async def test_a_real_collector_pages_on_ingested_errors(collector_app, http_receiver):
    """The whole path: HTTP ingest into a collector (embedded ClickHouse) with
    this plugin installed, the pipeline's rule, the step, PagerDuty."""
    from plugins.testing import ship_logs

    pagerduty = await http_receiver()
    client = await collector_app([pointed_at(pagerduty.url)])
    await ship_logs(client, *({"source": "checkout", "message": f"boom {i}"} for i in range(10)))
    assert len(await pagerduty.wait_for(1)) == 1
    event = pagerduty.json(0)
    assert event["payload"]["summary"] == "10 errors in checkout within 5m: boom 9"
