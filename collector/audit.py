"""The audit trail: who did what, append-only, exempt from erasure and retention.

Token creation and revocation, erasures, retention re-tiering and other admin
actions are recorded here. The table has no TTL and erasure never touches it;
rows name the actor by token (and user id when the token has one), never by
secret.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from collector import appkeys
from collector.auth import Principal, client_ip

log = logging.getLogger("logferry.collector.audit")


def actor_of(principal: Principal) -> str:
    """How the audit trail names a caller: ``name (kind token id[, user u])``."""
    who = f"{principal.name} ({principal.kind} token {principal.token_id}"
    if principal.user_id:
        who += f", user {principal.user_id}"
    return who + ")"


async def record_audit(app: web.Application, *, actor: str, action: str, target: str,
                       details: Mapping[str, Any] | None = None, request: web.Request | None = None) -> None:
    ip = ""
    if request is not None:
        ip = client_ip(request, app[appkeys.TRUSTED_PROXIES]) or ""
    row = {
        "id": str(uuid.uuid4()),
        "at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
        "actor": actor,
        "action": action,
        "target": target,
        "details": orjson.dumps(dict(details or {}), default=str).decode(),
        "ip_address": ip,
    }
    await app[appkeys.STORAGE].insert_rows("audit_log", [row])
    log.info("audit", extra={"action": action, "actor": actor, "target": target})
