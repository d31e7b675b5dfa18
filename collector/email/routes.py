"""HTTP endpoints of the email feature, and ``setup(app)``.

- ``POST /v1/emails`` (admin, service): send; ``?wait=true`` answers once a
  provider accepted it (200), otherwise 202 with the QUEUED message.
  ``Idempotency-Key`` header (or ``idempotency_key`` parameter) makes retries safe.
- ``GET /v1/emails/{id}``, ``GET /v1/emails/stats?days=30`` (admin, service).
- ``POST /v1/webhooks/mailgun``, ``POST /v1/webhooks/resend`` (signed by the provider).
- ``GET /t/o/{token}`` (open pixel), ``GET /t/c/{token}`` (click redirect),
  ``GET|POST /t/u/{token}`` (List-Unsubscribe, RFC 8058 one-click POST).
- ``GET/POST /v1/email/suppressions``, ``DELETE /v1/email/suppressions/{address}`` (admin).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import html
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import orjson
from aiohttp import web

from collector import appkeys
from collector.audit import record_audit
from collector.auth import principal_of, requires
from collector.email.message import STATUSES, InvalidEmail, SendEmail, Suppressed, check_address
from collector.email.providers import create_providers
from collector.email.service import EmailService
from collector.email.suppression import REASONS
from collector.email.templates import TemplateRenderer
from collector.email.tracking import PIXEL_GIF, safe_redirect_target
from collector.email.webhooks import (
    WebhookRejected,
    parse_mailgun,
    parse_resend,
    verify_mailgun,
    verify_svix,
)
from collector.errors import ApiError
from plugins.types import PermanentError, TransientError

log = logging.getLogger("logferry.email.http")

# Built-in provider plugins, used when the app runs without a plugin manager.
BUILTIN_PROVIDER_PLUGINS = (
    "collector.email.providers.smtp",
    "collector.email.providers.resend",
    "collector.email.providers.mailgun",
)
_send_decoder = msgspec.json.Decoder(SendEmail)
NO_STORE = {"Cache-Control": "no-store, no-cache, must-revalidate, private", "Pragma": "no-cache"}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), status=status, content_type="application/json")


def _service(request: web.Request) -> EmailService:
    return request.app[appkeys.EMAIL]


def _bool_param(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ApiError(400, "bad_request", f"{name} must be true or false")


# --- sending and reading --------------------------------------------------------------


@requires("admin", "service")
async def send_email(request: web.Request) -> web.Response:
    try:
        body = _send_decoder.decode(await request.read())
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid_email", str(exc)) from None
    except msgspec.DecodeError:
        raise ApiError(400, "bad_request", "the body must be a JSON object") from None
    key = request.headers.get("Idempotency-Key") or request.query.get("idempotency_key")
    wait = _bool_param(request, "wait", False)
    service = _service(request)
    try:
        record = await service.send(body, idempotency_key=key, wait=wait)
    except InvalidEmail as exc:
        raise ApiError(400, "invalid_email", str(exc)) from None
    except Suppressed as exc:
        raise ApiError(422, "suppressed", str(exc)) from None
    except PermanentError as exc:
        raise ApiError(422, "send_failed", str(exc)) from None
    except TransientError as exc:
        headers = {"Retry-After": str(int(exc.retry_after or 60))}
        raise ApiError(503, "send_deferred", str(exc), headers) from None
    return _json(record, status=200 if wait or record["status"] != "QUEUED" else 202)


@requires("admin", "service")
async def list_emails(request: web.Request) -> web.Response:
    """Newest first; filters ``status``, ``to`` (an address, matched by keyed hash), ``tag``;
    ``limit`` (default 50, at most 500) and ``cursor`` from the previous page."""
    service = _service(request)
    q = request.query
    status = q.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(400, "bad_request", f"status must be one of {', '.join(STATUSES)}")
    limit = q.get("limit", "50")
    if not limit.isdigit() or not 1 <= int(limit) <= 500:
        raise ApiError(400, "bad_request", "limit must be 1–500")
    before = None
    if q.get("cursor"):
        try:
            at, _, email_id = base64.urlsafe_b64decode(q["cursor"].encode()).decode().partition("|")
            before = (dt.datetime.fromisoformat(at), str(uuid.UUID(email_id)))
        except ValueError:
            raise ApiError(400, "bad_request", "cursor is not one this API gave out") from None
    records = await service.search(status=status, to=q.get("to"), tag=q.get("tag"), before=before,
                                   limit=int(limit))
    cursor = None
    if len(records) == int(limit):
        last = records[-1]
        cursor = base64.urlsafe_b64encode(f"{last['created_at']}|{last['id']}".encode()).decode()
    return _json({"emails": records, "next_cursor": cursor})


@requires("admin", "service")
async def get_email(request: web.Request) -> web.Response:
    record = await _service(request).get(request.match_info["id"])
    if record is None:
        raise ApiError(404, "not_found", "no such email")
    if _bool_param(request, "events", False):
        events = await _service(request).repo.events_of(record["id"])
        record["events"] = [{**e, "occurred_at": e["occurred_at"].isoformat() + "Z"} for e in events]
    return _json(record)


@requires("admin", "service")
async def email_stats(request: web.Request) -> web.Response:
    raw = request.query.get("days", "30")
    if not raw.isdigit() or not 1 <= int(raw) <= 365:
        raise ApiError(400, "bad_request", "days must be 1–365")
    days = await _service(request).stats(int(raw))
    totals = {k: sum(int(d[k]) for d in days) for k in
              ("total", "delivered", "bounced", "failed", "opened", "clicked", "opens", "clicks")}
    return _json({"days": days, "totals": totals})


# --- webhooks --------------------------------------------------------------------------------


async def mailgun_webhook(request: web.Request) -> web.Response:
    service = _service(request)
    cfg = request.app[appkeys.CONFIG].email.webhooks
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "bad_request", "the body must be JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    try:
        token = verify_mailgun(body, cfg.mailgun_signing_key, now=service.clock(), tolerance=cfg.tolerance)
    except WebhookRejected as exc:
        log.warning("mailgun webhook refused: %s", exc)
        service.counters["webhooks_refused"] += 1
        raise ApiError(401, "bad_signature", "the webhook signature is not valid") from None
    outcome = await service.accept_webhook("mailgun", token, parse_mailgun(body, now=service.now()))
    if outcome == "duplicate":
        # Mailgun stops retrying on 406: a replayed token is refused, not processed.
        raise ApiError(406, "replayed", "this webhook token was already used")
    return _json({"status": "ok", "matched": outcome == "matched"})


async def resend_webhook(request: web.Request) -> web.Response:
    service = _service(request)
    cfg = request.app[appkeys.CONFIG].email.webhooks
    raw = await request.read()
    try:
        msg_id = verify_svix(request.headers, raw, cfg.resend_secret, now=service.clock(), tolerance=cfg.tolerance)
    except WebhookRejected as exc:
        log.warning("resend webhook refused: %s", exc)
        service.counters["webhooks_refused"] += 1
        raise ApiError(401, "bad_signature", "the webhook signature is not valid") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "bad_request", "the body must be JSON") from None
    parsed = parse_resend(body, now=service.now()) if isinstance(body, dict) else None
    outcome = await service.accept_webhook("resend", msg_id, parsed)
    if outcome == "duplicate":
        # Svix retries with the same id: acknowledge, do nothing twice.
        return _json({"status": "duplicate"})
    return _json({"status": "ok", "matched": outcome == "matched"})


# --- tracking ------------------------------------------------------------------------------------


async def open_pixel(request: web.Request) -> web.Response:
    service = _service(request)
    payload = service.signer.verify(request.match_info["token"], "o")
    if payload is not None:
        try:
            await service.track("opened", payload["e"], url=None, user_agent=request.headers.get("User-Agent"),
                                method=request.method)
        except Exception:
            log.exception("recording an open failed")
    return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=NO_STORE)


async def click_redirect(request: web.Request) -> web.Response:
    service = _service(request)
    payload = service.signer.verify(request.match_info["token"], "c")
    target = safe_redirect_target(payload.get("u")) if payload is not None else None
    if payload is None or target is None:
        # Never redirect anywhere we did not sign.
        return web.Response(status=404, text="This link is not valid.", content_type="text/plain")
    try:
        await service.track("clicked", payload["e"], url=target, user_agent=request.headers.get("User-Agent"),
                            method=request.method)
    except Exception:
        log.exception("recording a click failed")
    return web.Response(status=302, headers={"Location": target, **NO_STORE})


_UNSUB_PAGE = """<!doctype html><html><head><meta charset="utf-8"><meta name="robots" content="noindex">
<title>{title}</title></head><body style="font-family:sans-serif;max-width:32em;margin:3em auto">
<h1>{title}</h1><p>{text}</p>{form}</body></html>"""


async def unsubscribe(request: web.Request) -> web.Response:
    service = _service(request)
    payload = service.unsubscribe_signer.verify(request.match_info["token"], "u")
    if payload is None or not isinstance(payload.get("a"), str):
        return web.Response(status=404, text="This unsubscribe link is not valid.", content_type="text/plain")
    if request.method == "GET":
        # A GET only asks: scanners fetch links, and must not unsubscribe anyone.
        form = '<form method="post"><button type="submit">Unsubscribe</button></form>'
        page = _UNSUB_PAGE.format(title="Unsubscribe", text="Stop receiving these emails?", form=form)
        return web.Response(text=page, content_type="text/html", headers=NO_STORE)
    address = await service.unsubscribe(payload["e"], payload["a"])
    if address is None:
        return web.Response(status=404, text="This unsubscribe link is not valid.", content_type="text/plain")
    page = _UNSUB_PAGE.format(title="Unsubscribed",
                              text=f"{html.escape(address)} will not receive these emails any more.", form="")
    return web.Response(text=page, content_type="text/html", headers=NO_STORE)


# --- suppression admin -----------------------------------------------------------------------------


@requires("admin")
async def list_suppressions(request: web.Request) -> web.Response:
    service = _service(request)
    address = request.query.get("address")
    if address:
        entry = service.suppressions.get(address)
        items = [msgspec.to_builtins(entry)] if entry is not None else []
    else:
        reason = request.query.get("reason")
        if reason is not None and reason not in REASONS:
            raise ApiError(400, "bad_request", f"reason must be one of {', '.join(REASONS)}")
        limit = request.query.get("limit", "100")
        offset = request.query.get("offset", "0")
        if not limit.isdigit() or not 1 <= int(limit) <= 1000 or not offset.isdigit():
            raise ApiError(400, "bad_request", "limit must be 1–1000 and offset a number")
        items = service.suppressions.list(reason=reason, limit=int(limit), offset=int(offset))
    return _json({"suppressions": items, "total": len(service.suppressions)})


@requires("admin")
async def add_suppression(request: web.Request) -> web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise ApiError(400, "bad_request", "the body must be JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    try:
        address = check_address(body.get("address"), "address")
    except InvalidEmail as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    entry = await _service(request).suppressions.add(address, "manual", str(body.get("detail") or "")[:500])
    await record_audit(request.app, actor=principal_of(request).token_id, action="email.suppression.add",
                       target="suppression", request=request)
    return _json(msgspec.to_builtins(entry), status=201)


@requires("admin")
async def lift_suppression(request: web.Request) -> web.Response:
    entry = await _service(request).suppressions.lift(request.match_info["address"])
    if entry is None:
        raise ApiError(404, "not_found", "that address is not suppressed")
    await record_audit(request.app, actor=principal_of(request).token_id, action="email.suppression.lift",
                       target="suppression", details={"reason": entry.reason}, request=request)
    return _json({"lifted": True, "reason": entry.reason})


# --- wiring ---------------------------------------------------------------------------------------


def _provider_registry(app: web.Application) -> dict[str, Any]:
    manager = app.get(appkeys.PLUGINS)
    if manager is None:
        from plugins.manager import build_plugin_manager

        manager = build_plugin_manager(entry_points=False, default_plugins=BUILTIN_PROVIDER_PLUGINS)
    return {name: entry.obj for name, entry in manager.email_providers().items()}


def build_service(app: web.Application) -> EmailService:
    """The EmailService for ``app`` (providers validated and created from the config)."""
    config = app[appkeys.CONFIG]
    registry = _provider_registry(app)
    providers = create_providers(config.email.providers, registry, app.get(appkeys.HTTP))
    filters: dict[str, Any] = {}
    manager = app.get(appkeys.PLUGINS)
    if manager is not None:
        filters = manager.template_filters()
    return EmailService(
        storage=app[appkeys.STORAGE], config=config.email, secret_key=config.secret_key,
        public_url=config.public_url, providers=providers,
        renderer=TemplateRenderer(config.email.templates, filters=filters), events=app.get(appkeys.EVENTS),
    )


async def _email_ctx(app: web.Application) -> AsyncIterator[None]:
    service = build_service(app)
    await service.start()
    app[appkeys.EMAIL] = service
    metrics = app.get(appkeys.METRICS)
    if metrics is not None:
        metrics.gauge("logferry_email_queue_length", lambda: len(service.queue))
        metrics.gauge("logferry_email_suppressed_addresses", lambda: len(service.suppressions))
        for name in service.counters:
            metrics.gauge(f"logferry_email_{name}_total", _counter_reader(service, name))
    yield
    # Let sends that are due or in flight finish (briefly); the rest waits in the outbox.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(service.drain(), 5.0)
    await service.stop()


def _counter_reader(service: EmailService, name: str) -> Callable[[], float]:
    return lambda: float(service.counters[name])


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_email_ctx)
    r = app.router
    r.add_post("/v1/emails", send_email)
    r.add_get("/v1/emails", list_emails)
    r.add_get("/v1/emails/stats", email_stats)
    r.add_get("/v1/emails/{id}", get_email)
    r.add_post("/v1/webhooks/mailgun", mailgun_webhook)
    r.add_post("/v1/webhooks/resend", resend_webhook)
    r.add_get("/t/o/{token}", open_pixel)
    r.add_get("/t/c/{token}", click_redirect)
    r.add_get("/t/u/{token}", unsubscribe)
    r.add_post("/t/u/{token}", unsubscribe)
    r.add_get("/v1/email/suppressions", list_suppressions)
    r.add_post("/v1/email/suppressions", add_suppression)
    r.add_delete("/v1/email/suppressions/{address}", lift_suppression)


