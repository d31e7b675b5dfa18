"""Pipeline state in storage: recording runs and firings, and rebuilding rule
windows after a restart by replaying stored logs.

The rebuild replays, per pipeline, the stored logs of the last
``rule.lookback()`` seconds through the same compiled match and rule
(``replay=True``: records, never fires), after restoring throttles from
``pipeline_firings`` and flatline groups from ``pipeline_groups``. The SQL
narrows by time, minimum level and source globs only (never more than the
match), so Python decides exactly as it would have live.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

import orjson

from collector import source_globs
from collector.storage import Storage
from pipelines.engine import PipelineEngine, PipelineRuntime, Recorder, RunRecord
from pipelines.match import LEVEL_RANK
from pipelines.rules import Firing

log = logging.getLogger("logferry.pipelines.state")

#: Most stored logs replayed per pipeline on start-up; beyond it the window
#: starts from the newest rows (logged as a warning).
REBUILD_LIMIT = 500_000
#: Buffered rows beyond this are dropped with an error when storage is down.
MAX_BUFFER = 100_000


def _ts(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _epoch(value: Any) -> float:
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    return float(value)


class StorageRecorder(Recorder):
    """Keeps recent runs in memory and writes runs, firings and groups to
    ClickHouse in batches (on every engine tick and at shutdown)."""

    def __init__(self, storage: Storage, keep: int = 1000):
        super().__init__(keep)
        self.storage = storage
        self._runs: list[dict[str, Any]] = []
        self._firings: list[dict[str, Any]] = []
        self._groups: dict[tuple[str, str], float] = {}
        self._saved_groups: dict[tuple[str, str], float] = {}
        self.write_failures = 0

    def run(self, record: RunRecord) -> None:
        super().run(record)
        event = record.event if record.trigger == "log" else redact_contact_details(record.event)
        self._runs.append({
            "run_id": record.run_id, "pipeline": record.pipeline, "trigger": record.trigger,
            "group_key": record.group_key, "started_at": _ts(record.started_at),
            "finished_at": _ts(record.finished_at), "status": record.status, "count": record.count,
            "steps": orjson.dumps([_outcome(o) for o in record.steps], default=str).decode(),
            "event": orjson.dumps(event, default=str).decode(), "error": record.error,
        })
        self._trim(self._runs)

    def firing(self, pipeline: str, rule_type: str, firing: Firing) -> None:
        super().firing(pipeline, rule_type, firing)
        self._firings.append({"pipeline": pipeline, "rule": rule_type, "group_key": firing.group_key,
                              "fired_at": _ts(firing.at), "count": firing.count})
        self._trim(self._firings)

    def groups(self, pipeline: str, groups: Mapping[str, float]) -> None:
        for key, last_seen in groups.items():
            if self._saved_groups.get((pipeline, key)) != last_seen:
                self._groups[(pipeline, key)] = last_seen

    def _trim(self, rows: list[dict[str, Any]]) -> None:
        if len(rows) > MAX_BUFFER:
            del rows[: len(rows) - MAX_BUFFER]
            self.write_failures += 1
            log.error("pipeline records could not be stored for a while; oldest dropped")

    async def flush(self) -> None:
        for table, rows in (("pipeline_firings", self._firings), ("pipeline_runs", self._runs)):
            if not rows:
                continue
            batch = rows[:]
            try:
                await self.storage.insert_rows(table, batch)
            except Exception as exc:
                log.error("storing %d %s rows failed (kept for the next try): %s", len(batch), table, exc)
                return
            del rows[: len(batch)]
        if self._groups:
            pending = dict(self._groups)
            rows = [{"pipeline": p, "group_key": k, "last_seen": _ts(t)} for (p, k), t in pending.items()]
            try:
                await self.storage.insert_rows("pipeline_groups", rows)
            except Exception as exc:
                log.error("storing flatline groups failed: %s", exc)
                return
            for key, value in pending.items():
                self._saved_groups[key] = value
                if self._groups.get(key) == value:
                    del self._groups[key]


#: Fields of contact-form, email and notification events kept out of
#: ``pipeline_runs``: those tables store them encrypted, this one must not
#: hold them in the clear. Logs arrive redacted by the agent already.
CONTACT_FIELDS = frozenset({"email", "phone", "to", "cc", "bcc", "recipient", "reply_to", "address"})


def redact_contact_details(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("[redacted]" if k in CONTACT_FIELDS and v else redact_contact_details(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact_contact_details(v) for v in value]
    return value


async def erase_user_runs(storage: Storage, user_id: str) -> None:
    """Delete the stored runs whose event belongs to ``user_id`` (GDPR erasure)."""
    await storage.command(
        "DELETE FROM pipeline_runs WHERE JSONExtractString(event, 'user_id') = {user:String}",
        {"user": user_id}, settings={"lightweight_deletes_sync": 2})


def _outcome(o: Any) -> dict[str, Any]:
    return {"id": o.id, "type": o.type, "status": o.status, "attempts": o.attempts,
            "duration_ms": o.duration_ms, "error": o.error}


def glob_to_like(glob: str) -> str | None:
    """A LIKE pattern equivalent to a glob, or None if it has classes (``[ab]``)."""
    return None if "[" in glob else source_globs.glob_to_like(glob)


def row_to_event(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored ``application_logs`` row as the event ingest would have published."""
    event = dict(row)
    if "level_name" in event:  # an alias of its own: ClickHouse aliases are query-wide
        event["level"] = event.pop("level_name")
    ts = event.get("timestamp")
    if isinstance(ts, dt.datetime) and ts.tzinfo is None:
        event["timestamp"] = ts.replace(tzinfo=dt.UTC)
    context = event.get("context")
    if isinstance(context, str):
        try:
            event["context"] = orjson.loads(context) if context else {}
        except orjson.JSONDecodeError:
            event["context"] = {}
    if event.get("id") is not None:
        event["id"] = str(event["id"])
    event["tags"] = list(event.get("tags") or [])
    return event


async def last_schedule_runs(storage: Storage, names: list[str]) -> dict[str, float]:
    if not names:
        return {}
    rows = await storage.query(
        "SELECT pipeline, max(fired_at) AS last FROM pipeline_firings "
        "WHERE rule = 'schedule' AND pipeline IN {names:Array(String)} GROUP BY pipeline",
        {"names": names},
    )
    return {r["pipeline"]: _epoch(r["last"]) for r in rows}


async def rebuild_runtime(storage: Storage, engine: PipelineEngine, runtime: PipelineRuntime,
                          *, limit: int = REBUILD_LIMIT) -> int:
    """Restore one pipeline's rule state; returns the number of logs replayed."""
    rule = runtime.rule
    now = engine.clock()
    lookback = rule.lookback()
    since = now - lookback
    if rule.type == "any" and not rule.throttle and not rule.spec.resolve:
        rule.covered_since = now
        return 0
    horizon = max(lookback, rule.effective_throttle)
    if rule.spec.resolve:
        # An incident may have fired long before the window: look further back.
        horizon = max(horizon, 30 * 86400.0)
    for row in await storage.query(
        "SELECT group_key, maxIf(fired_at, rule != 'resolved') AS last, "
        "maxIf(fired_at, rule = 'resolved') AS resolved FROM pipeline_firings "
        "WHERE pipeline = {p:String} AND fired_at > {since:DateTime64(3)} GROUP BY group_key",
        {"p": runtime.name, "since": _ts(now - horizon)},
    ):
        last, resolved = _epoch(row["last"]), _epoch(row["resolved"])
        if last <= 0:
            continue
        if now - last < max(lookback, rule.effective_throttle):
            rule.restore_firing(row["group_key"], last)
        if last > resolved:
            rule.restore_incident(row["group_key"], last)
    restore_group = getattr(rule, "restore_group", None)
    if restore_group is not None:
        for row in await storage.query(
            "SELECT group_key, max(last_seen) AS last FROM pipeline_groups "
            "WHERE pipeline = {p:String} AND last_seen > {since:DateTime64(3)} GROUP BY group_key",
            {"p": runtime.name, "since": _ts(now - float(runtime.spec.rule.forget_after))},
        ):
            restore_group(row["group_key"], _epoch(row["last"]))
    replayed = 0
    if runtime.spec.on == "log" and lookback > 0:
        where = ["timestamp > {since:DateTime64(3)}", "timestamp <= {until:DateTime64(3)}"]
        params: dict[str, Any] = {"since": _ts(since), "until": _ts(now), "limit": limit}
        prefilter = runtime.pipeline.prefilter
        if prefilter.min_level:
            where.append("toInt8(level) >= {rank:Int8}")
            params["rank"] = LEVEL_RANK[prefilter.min_level] + 1
        if prefilter.source_globs:
            likes = [glob_to_like(g) for g in prefilter.source_globs]
            if all(like is not None for like in likes):
                ors = " OR ".join(f"source LIKE {{s{i}:String}}" for i in range(len(likes)))
                where.append(f"({ors})")
                params.update({f"s{i}": like for i, like in enumerate(likes)})
        # Newest first under the limit, so a truncated replay keeps the recent end.
        rows = await storage.query(
            "SELECT * FROM (SELECT id, timestamp, toString(level) AS level_name, source, message, context,"
            " user_id, session_id, request_id, ip_address, user_agent, duration_ms, error_stack, tags, host"
            f" FROM application_logs WHERE {' AND '.join(where)}"
            " ORDER BY timestamp DESC LIMIT {limit:UInt64}) ORDER BY timestamp",
            params,
        )
        if len(rows) >= limit:
            log.warning("pipeline %r: replayed only the newest %d stored logs of its %gs window",
                        runtime.name, limit, lookback)
        match = runtime.pipeline.match
        for row in rows:
            event = row_to_event(row)
            if match(event):
                rule.observe(event, replay=True)
                replayed += 1
    rule.covered_since = since
    return replayed


async def rebuild(storage: Storage, engine: PipelineEngine, names: list[str] | None = None) -> dict[str, int]:
    """Rebuild the rule state of the engine's pipelines (or of ``names``)."""
    replayed = {}
    for name, runtime in list(engine.runtimes.items()):
        if names is not None and name not in names:
            continue
        if runtime.spec.schedule is not None:
            continue
        try:
            replayed[name] = await rebuild_runtime(storage, engine, runtime)
        except Exception:
            log.exception("rebuilding the state of pipeline %r failed; its windows start empty", name)
            runtime.rule.covered_since = engine.clock()
    return replayed
