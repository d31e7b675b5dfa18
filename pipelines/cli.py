"""``logferry-collector pipelines check`` and ``pipelines test``.

``check`` loads every plugin and every configured pipeline file and prints
each error as ``file:line: path: message`` (exit 2), or a summary (exit 0).

``test`` runs one pipeline over events from an NDJSON file in a dry run:
rules and windows work as live (on the events' own timestamps), and for each
run the steps *describe* what they would do; nothing is sent or stored.
After the last event the clock moves on one window, so flatline and
spike-down rules get their say.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from typing import Any, TextIO

import orjson

from agent.configfile import ConfigError, ConfigInvalid
from pipelines.engine import PipelineEngine, RunRecord
from pipelines.loader import Pipeline, expand_globs, load_pipeline_file, load_pipelines
from pipelines.match import normalize_level
from pipelines.simulate import clock_for, simulate
from pipelines.templates import Templates
from plugins.manager import LogferryPluginManager, PluginLoadError, build_plugin_manager


def _print_errors(errors: list[ConfigError], out: TextIO) -> None:
    for error in errors:
        print(str(error), file=out)
    print(f"{len(errors)} error{'s' if len(errors) != 1 else ''}", file=out)


def check_command(config_path: str, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Validate plugins and pipelines of a config file; 0 when all is well, 2 otherwise."""
    out = out or sys.stdout
    err = err or sys.stderr
    from collector.config import load_collector_config

    try:
        config, _ = load_collector_config(config_path)
    except ConfigInvalid as exc:
        _print_errors(exc.errors, err)
        return 2
    try:
        manager = build_plugin_manager(block=config.plugins.block)
    except PluginLoadError as exc:
        print(f"error: {exc}", file=err)
        return 2
    templates = Templates(manager.template_filters())
    files: list[str] = []
    try:
        pipelines = load_pipelines(config.pipelines, manager.steps(), templates, on_file=files.append)
    except ConfigInvalid as exc:
        _print_errors(exc.errors, err)
        return 2
    for pattern in config.pipelines:
        if not expand_globs([pattern]):
            print(f"warning: collector.pipelines: {pattern!r} matches no file", file=err)
    for pipeline in pipelines:
        spec = pipeline.spec
        if spec.on == "log" and spec.rule.type == "any" and not spec.rule.throttle and not spec.match:
            print(f"warning: {pipeline.file}: {pipeline.name}: runs for every log record "
                  "(no match, no rule, no throttle)", file=err)
    infos = manager.plugins()
    builtin = sum(1 for p in infos if p.builtin)
    installed = [f"{p.name} {p.version or ''}".strip() for p in infos if not p.builtin]
    print(f"plugins: {builtin} built-in; installed: {', '.join(installed) or 'none'}"
          + (f"; blocked: {', '.join(manager.blocked)}" if manager.blocked else ""), file=out)
    print(f"steps: {', '.join(sorted(manager.steps()))}", file=out)
    for pipeline in pipelines:
        trigger: str = pipeline.spec.on
        if pipeline.spec.schedule is not None:
            s = pipeline.spec.schedule
            trigger = f"schedule {s.cron or f'every {float(s.every or 0):g}s'} ({s.timezone})"
        rule = pipeline.spec.rule.type
        state = "" if pipeline.spec.enabled else " (disabled)"
        steps = " → ".join(p.spec.type for p in pipeline.steps)
        print(f"ok {pipeline.file}: {pipeline.name}{state}: on {trigger}, rule {rule}: {steps}", file=out)
    print(f"{len(pipelines)} pipeline{'s' if len(pipelines) != 1 else ''} in {len(files)} "
          f"file{'s' if len(files) != 1 else ''}: no errors", file=out)
    return 0


def _parse_event(value: Any, kind: str, line: int, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigInvalid([ConfigError("", "each line must be a JSON object", path, line)])
    event = dict(value)
    from agent.wire import parse_timestamp

    for field in ("timestamp", "submitted_at", "occurred_at", "created_at"):
        if field in event and not isinstance(event[field], dt.datetime):
            ts = parse_timestamp(event[field])
            if ts is None:
                raise ConfigInvalid([ConfigError(field, f"not a time: {event[field]!r}", path, line)])
            event[field] = ts
    if kind == "log":
        event.setdefault("timestamp", dt.datetime.now(dt.UTC))
        level = normalize_level(event.get("level", "INFO"))
        if level is None:
            raise ConfigInvalid([ConfigError("level", f"not a level: {event.get('level')!r}", path, line)])
        event["level"] = level
        event.setdefault("source", "")
        event.setdefault("message", "")
        if not isinstance(event.get("context"), dict):
            event["context"] = {}
        event["tags"] = list(event.get("tags") or [])
        for name in ("id", "user_id", "session_id", "request_id", "ip_address", "user_agent",
                     "duration_ms", "error_stack"):
            event.setdefault(name, None)
    return event


def read_events(path: str, kind: str) -> list[dict[str, Any]]:
    events = []
    errors = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                events.append(_parse_event(orjson.loads(line), kind, number, path))
            except orjson.JSONDecodeError as exc:
                errors.append(ConfigError("", f"invalid JSON: {exc}", path, number))
            except ConfigInvalid as exc:
                errors.extend(exc.errors)
    if errors:
        raise ConfigInvalid(errors)
    return events


def _describe_run(record: RunRecord, out: TextIO) -> None:
    at = dt.datetime.fromtimestamp(record.started_at, dt.UTC).isoformat(timespec="seconds")
    group = " " + " ".join(f"{k}={v}" for k, v in record.group.items()) if record.group else ""
    print(f"▶ run at {at}{group}: count {record.count}", file=out)
    for i, step in enumerate(record.steps, 1):
        if step.status == "dry_run":
            print(f"  {i}. {step.id} ({step.type}): {step.description}", file=out)
        elif step.status == "failed":
            print(f"  {i}. {step.id} ({step.type}): ERROR {step.error}", file=out)
        else:
            print(f"  {i}. {step.id} ({step.type}): {step.status}", file=out)


async def dry_run(pipeline: Pipeline, events: list[dict[str, Any]], manager: LogferryPluginManager,
                  out: TextIO) -> list[RunRecord]:
    """Run ``pipeline`` over ``events`` with describing steps; print and return the runs."""
    clock = clock_for(pipeline, events)
    engine = PipelineEngine(templates=Templates(manager.template_filters()), dry_run=True, clock=clock)
    engine.set_pipelines([pipeline])
    if pipeline.name not in engine.runtimes:
        print(f"pipeline {pipeline.name} is disabled", file=out)
        return []
    runs = await simulate(engine, pipeline, events, clock=clock, on_run=lambda r: _describe_run(r, out))
    matched = engine.runtimes[pipeline.name].counters["matched"]
    print(f"{len(events)} events, {matched} matched, {len(runs)} run{'s' if len(runs) != 1 else ''}",
          file=out)
    return runs


def test_command(pipeline_path: str, events_path: str, config_path: str | None = None, *,
                 out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Dry-run a pipeline over NDJSON events. 0: ran; 1: a step failed; 2: invalid input."""
    out = out or sys.stdout
    err = err or sys.stderr
    block: list[str] = []
    if config_path:
        from collector.config import load_collector_config

        try:
            block = list(load_collector_config(config_path)[0].plugins.block)
        except ConfigInvalid as exc:
            _print_errors(exc.errors, err)
            return 2
    try:
        manager = build_plugin_manager(block=block)
    except PluginLoadError as exc:
        print(f"error: {exc}", file=err)
        return 2
    templates = Templates(manager.template_filters())
    try:
        pipeline = load_pipeline_file(pipeline_path, manager.steps(), templates)
        events = read_events(events_path, pipeline.spec.on) if pipeline.spec.on != "schedule" else []
    except ConfigInvalid as exc:
        _print_errors(exc.errors, err)
        return 2
    except OSError as exc:
        print(f"error: {events_path}: {exc.strerror}", file=err)
        return 2
    runs = asyncio.run(dry_run(pipeline, events, manager, out))
    return 1 if any(s.status == "failed" for r in runs for s in r.steps) else 0
