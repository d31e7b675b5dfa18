"""Retention tiers for logs already stored.

New logs get their tier's ``retention_days`` at ingest (the ``retention:``
config: a default tier and rules by source glob; a tenant is a source prefix
such as ``acme-*``), and the table's TTL (``timestamp + retention_days``)
deletes them. When the tiers change, this module re-tiers stored logs on the
next start: it compares a fingerprint of the config with the last one
applied, and for each source whose tier changed runs one ``ALTER TABLE … UPDATE
retention_days`` (a background mutation; ClickHouse recomputes the TTL of the
parts it rewrites), then records the new fingerprint and an audit row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from collector import appkeys
from collector.config import CollectorConfig
from collector.ingest import RetentionPolicy
from collector.storage import Storage

log = logging.getLogger("logferry.collector.retention")


def retention_fingerprint(config: CollectorConfig) -> tuple[str, str]:
    """A stable fingerprint of the retention config, and the config as JSON."""
    rules = orjson.dumps({"default_tier": config.retention.default_tier,
                          "rules": [{"sources": r.sources, "tier": r.tier} for r in config.retention.rules]},
                         option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(rules).hexdigest(), rules.decode()


def retier_sync(storage: Storage, config: CollectorConfig, *, wait: bool = False) -> dict[int, list[str]] | None:
    """Re-tier stored logs if the retention config changed since it was last
    applied; returns the sources moved per number of days (None: unchanged)."""
    fingerprint, rules = retention_fingerprint(config)
    last = storage.query_sync("SELECT fingerprint FROM log_retention_state ORDER BY applied_at DESC LIMIT 1")
    if last and last[0]["fingerprint"] == fingerprint:
        return None
    policy = RetentionPolicy(config)
    stored = storage.query_sync("SELECT source, retention_days AS days FROM application_logs "
                                "GROUP BY source, retention_days")
    moves: dict[int, set[str]] = defaultdict(set)
    for row in stored:
        days = policy.days_for(row["source"])
        if days != row["days"]:
            moves[days].add(row["source"])
    settings = {"mutations_sync": 2} if wait else {}
    for days, sources in sorted(moves.items()):
        storage.command_sync(
            "ALTER TABLE application_logs UPDATE retention_days = {days:UInt16} "
            "WHERE source IN {sources:Array(String)} AND retention_days != {days:UInt16}",
            {"days": days, "sources": sorted(sources)}, settings=settings)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    storage.insert_rows_sync("log_retention_state", [{"fingerprint": fingerprint, "rules": rules, "applied_at": now}])
    moved = {days: sorted(sources) for days, sources in moves.items()}
    if moved or last:
        storage.insert_rows_sync("audit_log", [{
            "id": str(uuid.uuid4()), "at": now, "actor": "collector (config)", "action": "retention.retier",
            "target": "application_logs",
            "details": orjson.dumps({"rules": orjson.loads(rules),
                                     "moved": {str(d): s for d, s in moved.items()}}).decode(),
            "ip_address": "",
        }])
    if moved:
        log.info("retention tiers changed; re-tiering stored logs", extra={"moved": moved})
    return moved


async def _retention_ctx(app: web.Application) -> AsyncIterator[None]:
    storage = app[appkeys.STORAGE]
    config = app[appkeys.CONFIG]
    try:
        await storage.run(lambda: retier_sync(storage, config))
    except Exception as exc:
        # Never keep the collector from starting: the next start tries again.
        log.error("re-tiering stored logs failed", extra={"error": str(exc)[:500]})
    yield


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_retention_ctx)

