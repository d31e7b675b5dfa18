"""Token administration: ``POST/GET /v1/tokens``, ``DELETE /v1/tokens/{id}``."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import orjson
from aiohttp import web

from agent.configfile import Duration
from collector import appkeys
from collector.audit import actor_of, record_audit
from collector.auth import KINDS, TokenScope, principal_of, requires
from collector.errors import ApiError


class CreateToken(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    name: str
    expires_in: str | float | None = None
    permissions: TokenScope | None = None
    ip_whitelist: list[str] = []
    user_id: str | None = None


async def read_json(request: web.Request, tp: type[Any], limit: int = 1024 * 1024) -> Any:
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise ApiError(413, "body_too_large", f"body is larger than {limit} bytes")
    try:
        return msgspec.json.decode(body, type=tp)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "bad_request", str(exc).replace("`$.", "`")) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "bad_request", f"invalid JSON: {exc}") from None


def _public(record: Any) -> dict[str, Any]:
    out: dict[str, Any] = record.public()
    for key in ("created_at", "expires_at", "last_used"):
        if isinstance(out.get(key), dt.datetime):
            out[key] = out[key].isoformat()
    return out


@requires("admin")
async def create_token(request: web.Request) -> web.Response:
    body: CreateToken = await read_json(request, CreateToken)
    if body.kind not in KINDS:
        raise ApiError(400, "bad_request", f"kind: expected one of {', '.join(KINDS)}")
    try:
        expires_in = dt.timedelta(seconds=Duration.parse(body.expires_in)) if body.expires_in is not None else None
    except ValueError as exc:
        raise ApiError(400, "bad_request", f"expires_in: {exc}") from None
    try:
        record, token = await request.app[appkeys.TOKENS].create(
            kind=body.kind, name=body.name, created_by=actor_of(principal_of(request)), expires_in=expires_in,
            permissions=body.permissions, ip_whitelist=body.ip_whitelist, user_id=body.user_id,
        )
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    await record_audit(request.app, actor=actor_of(principal_of(request)), action="token.create", target=record.id,
                       details={"kind": record.kind, "name": record.name}, request=request)
    out = _public(record)
    out["token"] = token
    return web.Response(body=orjson.dumps(out), status=201, content_type="application/json")


@requires("admin")
async def list_tokens(request: web.Request) -> web.Response:
    tokens = [_public(r) for r in request.app[appkeys.TOKENS].list()]
    return web.Response(body=orjson.dumps({"tokens": tokens}), content_type="application/json")


@requires("admin")
async def get_token(request: web.Request) -> web.Response:
    record = request.app[appkeys.TOKENS].get(request.match_info["id"])
    if record is None:
        raise ApiError(404, "not_found", "no token with that id")
    return web.Response(body=orjson.dumps(_public(record)), content_type="application/json")


@requires("admin")
async def revoke_token(request: web.Request) -> web.Response:
    token_id = request.match_info["id"]
    if len(token_id) > 64:
        raise ApiError(404, "not_found", "no token with that id")
    record = await request.app[appkeys.TOKENS].revoke(token_id)
    if record is None:
        raise ApiError(404, "not_found", "no token with that id")
    await record_audit(request.app, actor=actor_of(principal_of(request)), action="token.revoke", target=token_id,
                       request=request)
    return web.Response(body=orjson.dumps(_public(record)), content_type="application/json")


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/tokens", create_token)
    app.router.add_get("/v1/tokens", list_tokens)
    app.router.add_get("/v1/tokens/{id}", get_token)
    app.router.add_delete("/v1/tokens/{id}", revoke_token)
