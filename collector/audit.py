"""The audit trail: who did what, append-only, exempt from erasure and retention."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from collector import appkeys

log = logging.getLogger("logferry.collector.audit")


async def record_audit(app: web.Application, *, actor: str, action: str, target: str,
                       details: Mapping[str, Any] | None = None, request: web.Request | None = None) -> None:
    row = {
        "id": str(uuid.uuid4()),
        "at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
        "actor": actor,
        "action": action,
        "target": target,
        "details": orjson.dumps(dict(details or {})).decode(),
        "ip_address": (request.remote or "") if request is not None else "",
    }
    await app[appkeys.STORAGE].insert_rows("audit_log", [row])
    log.info("audit", extra={"action": action, "actor": actor, "target": target})
