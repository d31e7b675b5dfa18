"""Pipelines inside the real collector: HTTP ingest → pipeline → real HTTP
target, restarts that keep windows and throttles, SIGHUP reloads, failures
stored in ClickHouse, the log step, and the scheduled log digest."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from collector import appkeys
from pipelines.service import PIPELINES
from plugins.builtin.webhook import verify
from plugins.testing import Receiver

SECRET = "s3cret-for-hmac"


async def ingest_token(client: Any) -> str:
    tokens = client.app[appkeys.TOKENS]
    _, token = await tokens.storage.run(lambda: tokens.create_sync(kind="ingest", name="t", created_by="tests"))
    await tokens.load()
    return str(token)


async def ship(client: Any, token: str, *records: dict[str, Any]) -> None:
    now = dt.datetime.now(dt.UTC).isoformat()
    body = b"\n".join(orjson.dumps({"timestamp": now, "level": "ERROR", "source": "payments", **r})
                      for r in records)
    response = await client.post("/v1/ingest", data=body, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"})
    assert response.status == 200, await response.text()
    assert (await response.json())["accepted"] == len(records)


def burst_pipeline(url: str, threshold: int = 3, name: str = "burst", body: str = "") -> str:
    return f"""\
name: {name}
on: log
match: {{level: ERROR, source: "pay*"}}
rule: {{type: frequency, threshold: {threshold}, window: 1h, group_by: [source], throttle: 1h}}
steps:
  - type: webhook
    options:
      url: "{url}/{name}"
      secret: {SECRET}
      {body}
"""


async def settle(client: Any) -> None:
    engine = client.app[PIPELINES]
    await asyncio.sleep(0.05)
    await engine.drain()
    await engine.recorder.flush()


async def test_ingested_errors_fire_a_signed_webhook_and_ingest_never_waits(
        collector_app: Callable[..., Any], http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    target.gate = asyncio.Event()  # the target hangs until released
    client = await collector_app([burst_pipeline(target.url)])
    token = await ingest_token(client)
    started = time.perf_counter()
    await ship(client, token, {"message": "card declined"}, {"message": "card declined"},
               {"message": "gateway timeout"}, {"message": "not payments", "source": "web"})
    assert time.perf_counter() - started < 2  # answered while the step hangs
    [request] = await target.wait_for(1)
    target.gate.set()
    await settle(client)
    assert verify(SECRET, request["headers"]["X-Logferry-Signature"], request["body"])
    payload = orjson.loads(request["body"])
    assert payload["pipeline"] == "burst" and payload["count"] == 3
    assert payload["group"] == {"source": "payments"} and payload["event"]["message"] == "gateway timeout"


async def test_a_restart_keeps_windows_and_throttles(collector_app: Callable[..., Any],
                                                    http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    first = await collector_app([burst_pipeline(target.url)])
    database = first.app[appkeys.STORAGE].database
    token = await ingest_token(first)
    await ship(first, token, {"message": "a"}, {"message": "b"})
    await settle(first)
    await first.close()

    second = await collector_app([burst_pipeline(target.url)], database=database)
    await ship(second, token, {"message": "c"})  # the third within the window, across the restart
    await target.wait_for(1)
    await settle(second)
    assert target.json()["count"] == 3
    await second.close()

    third = await collector_app([burst_pipeline(target.url)], database=database)
    await ship(third, token, {"message": "d"}, {"message": "e"}, {"message": "f"})
    await settle(third)
    assert len(target.requests) == 1  # the throttle survived the restart too
    assert third.app[PIPELINES].runtimes["burst"].counters["fired"] == 0


async def test_failed_steps_are_stored_with_their_event(collector_app: Callable[..., Any],
                                                       http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    target.respond(422, "no such channel")
    client = await collector_app([burst_pipeline(target.url, threshold=1)])
    token = await ingest_token(client)
    await ship(client, token, {"message": "lost? never"})
    await target.wait_for(1)
    await settle(client)
    rows = await client.app[appkeys.STORAGE].query(
        "SELECT toString(status) AS status, steps, event, error FROM pipeline_runs WHERE pipeline = 'burst'")
    assert len(rows) == 1
    assert rows[0]["status"] == "failed" and "422" in rows[0]["error"]
    assert orjson.loads(rows[0]["event"])["message"] == "lost? never"
    assert orjson.loads(rows[0]["steps"])[0]["status"] == "failed"
    metrics = client.app[appkeys.METRICS].render()
    assert "logferry_pipeline_steps_failed_total 1" in metrics


async def test_sighup_reloads_pipelines_without_dropping_state(collector_app: Callable[..., Any],
                                                              http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    client = await collector_app([burst_pipeline(target.url)])
    folder = Path(client.app[appkeys.CONFIG].pipelines[0]).parent
    token = await ingest_token(client)
    await ship(client, token, {"message": "a"}, {"message": "b"})
    await settle(client)
    (folder / "pipeline-0.yaml").write_text(burst_pipeline(target.url, body='body: "reloaded {{ count }}"'))
    (folder / "new.yaml").write_text(burst_pipeline(target.url, name="added"))
    engine = client.app[PIPELINES]
    os.kill(os.getpid(), signal.SIGHUP)
    async with asyncio.timeout(5):
        while "added" not in engine.runtimes:
            await asyncio.sleep(0.01)
    await ship(client, token, {"message": "c"})
    await target.wait_for(1)
    await settle(client)
    assert [r["body"] for r in target.requests if r["path"] == "/burst"] == [b"reloaded 3"]


async def test_a_reload_with_errors_keeps_the_running_pipelines(collector_app: Callable[..., Any],
                                                               http_receiver: Callable[[], Any]) -> None:
    from pipelines.service import reload

    target: Receiver = await http_receiver()
    client = await collector_app([burst_pipeline(target.url)])
    folder = Path(client.app[appkeys.CONFIG].pipelines[0]).parent
    (folder / "broken.yaml").write_text("name: broken\nsteps: [{type: nope}]\n")
    result = await reload(client.app)
    assert not result.ok and "unknown step type 'nope'" in result.errors[0]
    assert list(client.app[PIPELINES].runtimes) == ["burst"]


async def test_the_log_step_writes_a_derived_record_others_see_but_not_itself(
        collector_app: Callable[..., Any], http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    derive = """\
name: derive
on: log
match: {level: ERROR}
steps:
  - type: log
    options: {level: CRITICAL, source: alerts, message: "derived from {{ event.message }}", tags: [alert]}
"""
    watch = f"""\
name: watch-alerts
on: log
match: {{source: alerts, tags: [alert]}}
steps: [{{type: webhook, options: {{url: "{target.url}/alerts"}}}}]
"""
    client = await collector_app([derive, watch])
    token = await ingest_token(client)
    await ship(client, token, {"message": "disk full"})
    await target.wait_for(1)
    await settle(client)
    assert target.json()["event"]["message"] == "derived from disk full"
    # `derive` matched its own CRITICAL record? No: it never triggers on what it derived.
    assert client.app[PIPELINES].runtimes["derive"].counters["runs"] == 1
    await client.app[appkeys.LOG_WRITER].logs.stop()
    rows = await client.app[appkeys.STORAGE].query(
        "SELECT message, toString(level) AS level, context FROM application_logs WHERE source = 'alerts'")
    assert [(r["message"], r["level"]) for r in rows] == [("derived from disk full", "CRITICAL")]
    assert orjson.loads(rows[0]["context"])["derived_from"]["pipeline"] == "derive"


async def test_daily_log_digest_counts_top_errors_per_source(collector_app: Callable[..., Any],
                                                           http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    body = (
        "{{ steps.top.total }} errors\n"
        "{% for source, rows in steps.top.groups | dictsort %}{{ source }}:"
        "{% for r in rows %} {{ r.count }}x {{ r.message }} ({{ r.sample }});{% endfor %}\n{% endfor %}"
    )
    digest = f"""\
name: digest
on: schedule
schedule: {{cron: "0 8 * * *", timezone: Europe/Berlin}}
steps:
  - type: query_logs
    id: top
    options: {{since: 24h, min_level: ERROR, group_by: [source, message], top: 2}}
  - type: webhook
    when: "steps.top.total > 0"
    options:
      url: "{target.url}/digest"
      content_type: text/plain
      body: {orjson.dumps(body).decode()}
"""
    client = await collector_app([digest])
    token = await ingest_token(client)
    await ship(client, token,
               *[{"message": f"timeout after {n} ms"} for n in (31, 45, 77)],
               *[{"message": "card declined"}] * 2,
               {"message": "rare"},
               *[{"message": "db down", "source": "web"}] * 4,
               {"message": "just info", "level": "INFO", "source": "web"})
    await client.app[appkeys.LOG_WRITER].logs.stop()
    engine = client.app[PIPELINES]
    runtime = engine.runtimes["digest"]
    runtime.next_due = engine.clock()  # "08:00" is now
    await engine.tick()
    await target.wait_for(1)
    await settle(client)
    text = target.requests[0]["body"].decode()
    lines = text.splitlines()
    assert lines[0] == "10 errors"
    assert lines[1] == "payments: 3x timeout after # ms (timeout after 31 ms); 2x card declined (card declined);"
    assert lines[2] == "web: 4x db down (db down);"
    rows = await client.app[appkeys.STORAGE].query(
        "SELECT rule, count() AS n FROM pipeline_firings WHERE pipeline = 'digest' GROUP BY rule")
    assert rows == [{"rule": "schedule", "n": 1}]


async def test_a_flatline_remembers_sources_that_went_quiet_before_a_restart(
        collector_app: Callable[..., Any], http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    quiet = f"""\
name: quiet
on: log
rule: {{type: flatline, threshold: 1, window: 2s, group_by: [source], throttle: 1h}}
steps: [{{type: webhook, options: {{url: "{target.url}/quiet"}}}}]
"""
    first = await collector_app([quiet])
    database = first.app[appkeys.STORAGE].database
    token = await ingest_token(first)
    await ship(first, token, {"source": "nightly-batch", "message": "started", "level": "INFO"})
    await asyncio.sleep(1.2)  # one tick records the group
    await settle(first)
    await first.close()
    assert target.requests == []
    await asyncio.sleep(2.1)  # its last log is now older than the window a restart replays

    second = await collector_app([quiet], database=database)
    [request] = await target.wait_for(1, within=5)
    assert orjson.loads(request["body"])["group"] == {"source": "nightly-batch"}
    await settle(second)


async def test_erasing_a_user_removes_their_runs_and_rule_state(collector_app: Callable[..., Any],
                                                               http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    per_user = f"""\
name: per-user
on: log
match: {{level: ERROR}}
rule: {{type: frequency, threshold: 1, window: 1h, group_by: [user_id], throttle: 1h}}
steps: [{{type: webhook, options: {{url: "{target.url}/u"}}}}]
"""
    client = await collector_app([per_user])
    token = await ingest_token(client)
    await ship(client, token, {"message": "x", "user_id": "alice"}, {"message": "y", "user_id": "bob"})
    await target.wait_for(2)
    await settle(client)
    storage = client.app[appkeys.STORAGE]
    count = "SELECT count() AS n FROM pipeline_runs WHERE JSONExtractString(event, 'user_id') = {u:String}"
    assert (await storage.query(count, {"u": "alice"}))[0]["n"] == 1
    client.app[appkeys.EVENTS].publish("user_erased", [{"user_id": "alice"}])
    await asyncio.sleep(0.2)
    assert (await storage.query(count, {"u": "alice"}))[0]["n"] == 0
    assert (await storage.query(count, {"u": "bob"}))[0]["n"] == 1
    rule = client.app[PIPELINES].runtimes["per-user"].rule
    assert list(rule.last_fired) == ['["bob"]']


async def test_contact_details_never_reach_pipeline_runs(collector_app: Callable[..., Any],
                                                        http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    triage = f"""\
name: triage
on: contact_form
match: {{where: {{status: {{ne: SPAM}}}}}}
steps: [{{type: webhook, options: {{url: "{target.url}/t", body: "{{{{ event.subject }}}}"}}}}]
"""
    client = await collector_app([triage])
    client.app[appkeys.EVENTS].publish("contact_form", [
        {"id": "c1", "status": "NEW", "subject": "refund", "email": "ann@example.com", "phone": "+4915112345",
         "submitted_at": dt.datetime.now(dt.UTC).isoformat()},
        {"id": "c2", "status": "SPAM", "subject": "cheap pills", "email": "x@spam.example"}])
    await target.wait_for(1)
    await settle(client)
    assert [r["body"] for r in target.requests] == [b"refund"]
    [row] = await client.app[appkeys.STORAGE].query("SELECT event FROM pipeline_runs WHERE pipeline = 'triage'")
    event = orjson.loads(row["event"])
    assert event["email"] == "[redacted]" and event["phone"] == "[redacted]" and event["subject"] == "refund"


async def test_admins_can_list_pipelines_and_reload_over_http(collector_app: Callable[..., Any],
                                                             http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    target.respond(500, times=10)
    client = await collector_app([burst_pipeline(target.url, threshold=1).replace("secret: s3cret-for-hmac",
                                                                                   "secret: s3cret-for-hmac\n"
                                                                                   "    retry: {attempts: 1}")])
    tokens = client.app[appkeys.TOKENS]
    _, admin = await tokens.storage.run(lambda: tokens.create_sync(kind="admin", name="a", created_by="t"))
    await tokens.load()
    headers = {"Authorization": f"Bearer {admin}"}
    await ship(client, await ingest_token(client), {"message": "boom"})
    await target.wait_for(1)
    await settle(client)
    response = await client.get("/v1/pipelines", headers=headers)
    assert response.status == 200
    body = await response.json()
    [pipeline] = body["pipelines"]
    assert (pipeline["name"], pipeline["rule"], pipeline["steps"]) == ("burst", "frequency", ["webhook"])
    assert pipeline["stats"]["runs_failed"] == 1
    assert body["recent_failures"][0]["error"].endswith("answered 500")
    assert (await client.get("/v1/pipelines")).status == 401

    folder = Path(client.app[appkeys.CONFIG].pipelines[0]).parent
    (folder / "broken.yaml").write_text("name: broken\nsteps: [{type: nope}]\n")
    response = await client.post("/v1/pipelines/reload", headers=headers)
    assert response.status == 422
    assert "broken.yaml:2: steps[0].type: unknown step type 'nope'" in (await response.json())["errors"][0]
    (folder / "broken.yaml").unlink()
    response = await client.post("/v1/pipelines/reload", headers=headers)
    assert (response.status, (await response.json())["kept"]) == (200, ["burst"])


async def test_an_open_incident_is_resolved_after_a_restart(collector_app: Callable[..., Any],
                                                           http_receiver: Callable[[], Any]) -> None:
    target: Receiver = await http_receiver()
    incident = f"""\
name: incident
on: log
match: {{level: ERROR}}
rule: {{type: frequency, threshold: 2, window: 1h, group_by: [source], throttle: 1h, resolve: true,
        resolve_after: 1s}}
steps:
  - type: webhook
    options: {{url: "{target.url}/i", body: "{{{{ 'resolved' if resolved else 'triggered' }}}} {{{{ group.source }}}}"}}
"""
    first = await collector_app([incident])
    database = first.app[appkeys.STORAGE].database
    token = await ingest_token(first)
    await ship(first, token, {"message": "a"}, {"message": "b"})
    await target.wait_for(1)
    await settle(first)
    await first.close()  # before the incident is over

    second = await collector_app([incident], database=database)
    await target.wait_for(2, within=5)
    await settle(second)
    assert [r["body"] for r in target.requests] == [b"triggered payments", b"resolved payments"]
