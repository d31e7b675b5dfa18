"""HTTP endpoints of notifications and the users directory.

- ``POST /v1/notifications`` (admin, service): create. 201 with the new
  notification, or 200 with the existing one and ``"deduplicated": true``
  when ``dedup_key`` matched one of the same user in the last 5 minutes.
- ``GET /v1/notifications/{id}`` (admin, service): with its deliveries.
- ``POST /v1/notifications/{id}/cancel`` (admin, service): PENDING → CANCELLED.
- ``GET /v1/users/{user_id}/notifications/pending`` (admin, service): the
  spec's query 2, a user's PENDING queue with the channels each will use.
- ``PUT /v1/users/{user_id}``, ``GET /v1/users/{user_id}`` (admin, service):
  the users directory.
- ``GET /v1/me/notifications`` (user): own in-app notifications, newest first;
  ``unread=true``, ``limit`` (≤ 200), ``cursor``; with ``unread_count``.
- ``POST /v1/me/notifications/{id}/read``, ``POST /v1/me/notifications/read-all`` (user).
- ``GET /v1/me/notifications/stream`` (user): server-sent events
  (``notification``, ``read``), a comment every ``stream_heartbeat``.
- ``GET /v1/me/preferences``, ``PUT /v1/me/preferences/{type}`` (user).
- ``POST /v1/me/push-subscriptions`` (user): register this browser's subscription.
- ``GET /v1/push/vapid-public-key`` (public): the applicationServerKey.
- ``POST /v1/webhooks/twilio/status`` (signed by Twilio): SMS delivery reports.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
from typing import Any

import msgspec
import orjson
from aiohttp import web

from collector import appkeys
from collector.auth import principal_of, requires
from collector.errors import ApiError
from collector.notifications.model import TYPE_PATTERN, CreateNotification, DeliveryStatus, InvalidTransition
from collector.notifications.preferences import PreferenceInput
from collector.notifications.service import NotFound, NotificationService, UnknownChannel
from collector.notifications.users import MAX_SUBSCRIPTIONS, PushSubscription, UserInput

MAX_BODY = 256 * 1024
MAX_PAGE = 200
_create_decoder = msgspec.json.Decoder(CreateNotification)
_preference_decoder = msgspec.json.Decoder(PreferenceInput)
_user_decoder = msgspec.json.Decoder(UserInput)
_subscription_decoder = msgspec.json.Decoder(PushSubscription)

# Each configured channel's validated Options, by channel name (set at start-up).
CHANNEL_OPTIONS: web.AppKey[dict[str, Any]] = web.AppKey("notification_channel_options", dict)

# Twilio MessageStatus → our delivery status (others are intermediate).
TWILIO_STATUSES = {"delivered": DeliveryStatus.DELIVERED, "undelivered": DeliveryStatus.FAILED,
                   "failed": DeliveryStatus.FAILED}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _service(request: web.Request) -> NotificationService:
    return request.app[appkeys.NOTIFIER]


async def _body(request: web.Request, decoder: msgspec.json.Decoder[Any]) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, "body_too_large", f"the body must be at most {MAX_BODY} bytes")
    raw = await request.read()
    if len(raw) > MAX_BODY:
        raise ApiError(413, "body_too_large", f"the body must be at most {MAX_BODY} bytes")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ApiError(400, "invalid", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "bad_request", f"the body is not valid JSON: {exc}") from None


def _user_id_param(request: web.Request) -> str:
    user_id = request.match_info["user_id"]
    if not user_id or len(user_id) > 200:
        raise ApiError(400, "bad_request", "user_id must be 1–200 characters")
    return user_id


def _own_user(request: web.Request) -> str:
    principal = principal_of(request)
    if not principal.user_id:
        raise ApiError(403, "forbidden", "this user token names no user")
    return principal.user_id


# --- notifications ---------------------------------------------------------------------


@requires("admin", "service")
async def create_notification(request: web.Request) -> web.Response:
    body: CreateNotification = await _body(request, _create_decoder)
    principal = principal_of(request)
    try:
        notification, created = await _service(request).create(
            body, created_by=f"{principal.kind}:{principal.name}")
    except UnknownChannel as exc:
        raise ApiError(400, "invalid", str(exc)) from None
    except TimeoutError as exc:
        raise ApiError(503, "unavailable", str(exc), {"Retry-After": "1"}) from None
    notification["deduplicated"] = not created
    response = _json(notification, 201 if created else 200)
    if not created:
        response.headers["X-Deduplicated"] = "true"
    return response


@requires("admin", "service")
async def get_notification(request: web.Request) -> web.Response:
    found = await _service(request).get(request.match_info["id"]) if _is_uuid(request.match_info["id"]) else None
    if found is None:
        raise ApiError(404, "not_found", "no such notification")
    return _json(found)


@requires("admin", "service")
async def cancel_notification(request: web.Request) -> web.Response:
    if not _is_uuid(request.match_info["id"]):
        raise ApiError(404, "not_found", "no such notification")
    try:
        return _json(await _service(request).cancel(request.match_info["id"]))
    except NotFound:
        raise ApiError(404, "not_found", "no such notification") from None
    except InvalidTransition as exc:
        raise ApiError(409, "conflict", str(exc)) from None


@requires("admin", "service")
async def pending_queue(request: web.Request) -> web.Response:
    user_id = _user_id_param(request)
    return _json({"user_id": user_id, "pending": await _service(request).pending_queue(user_id)})


def _is_uuid(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# --- the inbox ----------------------------------------------------------------------------


def _cursor(value: str | None) -> tuple[dt.datetime, str] | None:
    if not value:
        return None
    try:
        raw = orjson.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        return dt.datetime.fromisoformat(raw[0].replace("Z", "+00:00")), str(raw[1])
    except Exception:
        raise ApiError(400, "bad_request", "cursor is not one this API returned") from None


def _make_cursor(item: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([item["created_at"], item["id"]])).decode().rstrip("=")


@requires("user")
async def my_notifications(request: web.Request) -> web.Response:
    user_id = _own_user(request)
    unread = request.query.get("unread", "false").lower()
    if unread not in ("true", "false", "1", "0"):
        raise ApiError(400, "bad_request", "unread must be true or false")
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise ApiError(400, "bad_request", "limit must be a number") from None
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, "bad_request", f"limit must be between 1 and {MAX_PAGE}")
    items, unread_count = await _service(request).inbox(
        user_id, unread_only=unread in ("true", "1"), limit=limit, before=_cursor(request.query.get("cursor")))
    next_cursor = _make_cursor(items[-1]) if len(items) == limit else None
    return _json({"notifications": items, "unread_count": unread_count, "next_cursor": next_cursor})


@requires("user")
async def mark_read(request: web.Request) -> web.Response:
    user_id = _own_user(request)
    if not _is_uuid(request.match_info["id"]):
        raise ApiError(404, "not_found", "no such notification")
    try:
        notification, unread = await _service(request).mark_read(user_id, request.match_info["id"])
    except NotFound:
        raise ApiError(404, "not_found", "no such notification") from None
    return _json({**notification, "unread_count": unread})


@requires("user")
async def mark_all_read(request: web.Request) -> web.Response:
    user_id = _own_user(request)
    changed = await _service(request).mark_all_read(user_id)
    return _json({"marked": changed, "unread_count": 0})


@requires("user")
async def stream(request: web.Request) -> web.StreamResponse:
    user_id = _own_user(request)
    service = _service(request)
    heartbeat = float(request.app[appkeys.CONFIG].notifications.stream_heartbeat)
    queue = service.live.subscribe(user_id)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        unread = await service.unread_count(user_id)
        await response.write(b"retry: 3000\n" + _sse("unread_count", {"unread_count": unread}))
        while True:
            try:
                async with asyncio.timeout(heartbeat):  # not wait_for: see NotificationService._run
                    event, data = await queue.get()
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if event == "notification":
                data = {**data, "unread_count": await service.unread_count(user_id)}
            await response.write(_sse(event, data, data.get("id")))
    except ConnectionResetError:
        pass  # the client went away
    finally:
        service.live.unsubscribe(user_id, queue)
    return response


def _sse(event: str, data: dict[str, Any], event_id: str | None = None) -> bytes:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return head.encode() + b"data: " + orjson.dumps(data) + b"\n\n"


# --- preferences ------------------------------------------------------------------------------


@requires("user")
async def my_preferences(request: web.Request) -> web.Response:
    user_id = _own_user(request)
    service = _service(request)
    found = await service.preferences(user_id)
    return _json({
        "preferences": [p.to_dict() for p in found],
        "defaults": {"channels": {c: c in service.config.default_channels for c in service.configured_channels()},
                     "frequency": "INSTANT", "enabled": True},
        "channels": service.configured_channels(),
    })


@requires("user")
async def put_preference(request: web.Request) -> web.Response:
    user_id = _own_user(request)
    notification_type = request.match_info["type"]
    if len(notification_type) > 100 or not TYPE_PATTERN.match(notification_type):
        raise ApiError(400, "bad_request", "type must be 1–100 letters, digits, '_', '.', ':' or '-'")
    body: PreferenceInput = await _body(request, _preference_decoder)
    try:
        preference = await _service(request).set_preference(user_id, notification_type, body)
    except UnknownChannel as exc:
        raise ApiError(400, "invalid", str(exc)) from None
    return _json(preference.to_dict())


# --- users directory ------------------------------------------------------------------------------


@requires("admin", "service")
async def put_user(request: web.Request) -> web.Response:
    user_id = _user_id_param(request)
    body: UserInput = await _body(request, _user_decoder)
    record, created = await request.app[appkeys.USERS].put(user_id, body)
    return _json(record.to_dict(), 201 if created else 200)


@requires("admin", "service")
async def get_user(request: web.Request) -> web.Response:
    record = await request.app[appkeys.USERS].get(_user_id_param(request))
    if record is None:
        raise ApiError(404, "not_found", "no such user")
    return _json(record.to_dict())


@requires("user")
async def add_my_push_subscription(request: web.Request) -> web.Response:
    user_id = _own_user(request)
    subscription: PushSubscription = await _body(request, _subscription_decoder)
    record = await request.app[appkeys.USERS].add_push_subscription(user_id, subscription)
    return _json({"push_subscriptions": len(record.push_subscriptions), "max": MAX_SUBSCRIPTIONS}, 201)


async def vapid_public_key(request: web.Request) -> web.Response:
    options = request.app[CHANNEL_OPTIONS].get("push")
    key = getattr(options, "vapid_public_key", None)
    if not key:
        raise ApiError(404, "not_found", "web push is not configured")
    return _json({"public_key": key})


# --- provider callbacks ------------------------------------------------------------------------------


async def twilio_status(request: web.Request) -> web.Response:
    """Twilio's status callback: verified, then applied to the delivery."""
    options = request.app[CHANNEL_OPTIONS].get("sms")
    if options is None:
        raise ApiError(404, "not_found", "sms is not configured")
    from collector.notifications.channels.sms import verify_twilio_signature

    form = await request.post()
    params = {k: str(v) for k, v in form.items()}
    url = request.app[appkeys.CONFIG].public_url.rstrip("/") + request.path_qs
    if not verify_twilio_signature(options.auth_token, url, params, request.headers.get("X-Twilio-Signature", "")):
        raise ApiError(401, "unauthorized", "bad or missing X-Twilio-Signature")
    sid = params.get("MessageSid") or params.get("SmsSid")
    status = TWILIO_STATUSES.get(params.get("MessageStatus", params.get("SmsStatus", "")).lower())
    if sid and status is not None:
        error = None
        if status is DeliveryStatus.FAILED:
            error = f"twilio {params.get('MessageStatus')}: error {params.get('ErrorCode') or 'unknown'}"
        await _service(request).delivery_status(
            "sms", sid, status, error=error, metadata={"twilio_status": params.get("MessageStatus")})
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/notifications", create_notification)
    r.add_get("/v1/notifications/{id}", get_notification)
    r.add_post("/v1/notifications/{id}/cancel", cancel_notification)
    r.add_get("/v1/users/{user_id}/notifications/pending", pending_queue)
    r.add_put("/v1/users/{user_id}", put_user)
    r.add_get("/v1/users/{user_id}", get_user)
    r.add_get("/v1/me/notifications", my_notifications)
    r.add_get("/v1/me/notifications/stream", stream)
    r.add_post("/v1/me/notifications/read-all", mark_all_read)
    r.add_post("/v1/me/notifications/{id}/read", mark_read)
    r.add_get("/v1/me/preferences", my_preferences)
    r.add_put("/v1/me/preferences/{type}", put_preference)
    r.add_post("/v1/me/push-subscriptions", add_my_push_subscription)
    r.add_get("/v1/push/vapid-public-key", vapid_public_key)
    r.add_post("/v1/webhooks/twilio/status", twilio_status)

