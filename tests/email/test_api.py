"""The email HTTP API over the real collector app: sending, reading, stats,
signed webhooks (valid, invalid, stale, replayed), tracking and suppression."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import time
import uuid
from typing import Any

import orjson
import pytest

from collector import appkeys
from tests.email.conftest import MAILGUN_SIGNING_KEY, SVIX_KEY, mailgun_provider

BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0 Safari/537.36"


async def send(client: Any, body: dict[str, Any] | None = None, **params: str) -> dict[str, Any]:
    payload = body or {"to": ["alice@example.com"], "subject": "Hi",
                       "html_body": '<p><a href="https://example.com/a?x=1&amp;y=2">go</a></p>'}
    response = await client.post("/v1/emails", json=payload, headers=client.service, params=params or None)
    assert response.status in (200, 202), await response.text()
    return await response.json()  # type: ignore[no-any-return]


def mailgun_payload(event_data: dict[str, Any], *, timestamp: int | None = None, token: str | None = None,
                    key: str = MAILGUN_SIGNING_KEY) -> dict[str, Any]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    token = token or uuid.uuid4().hex * 2
    signature = hmac.new(key.encode(), (ts + token).encode(), hashlib.sha256).hexdigest()
    return {"signature": {"timestamp": ts, "token": token, "signature": signature}, "event-data": event_data}


def svix(body: bytes, *, msg_id: str | None = None, timestamp: int | None = None,
         key: bytes = SVIX_KEY) -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    ts = str(int(time.time()) if timestamp is None else timestamp)
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    return {"svix-id": msg_id, "svix-timestamp": ts, "svix-signature": "v1," + base64.b64encode(mac).decode(),
            "Content-Type": "application/json"}


async def get_email(client: Any, email_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/emails/{email_id}", headers=client.service)
    assert response.status == 200
    return await response.json()  # type: ignore[no-any-return]


# --- sending -------------------------------------------------------------------------------


async def test_post_emails_queues_then_sends(email_app: Any) -> None:
    queued = await send(email_app)
    assert queued["status"] == "QUEUED"
    await asyncio.wait_for(email_app.app[appkeys.EMAIL].drain(), 5)
    record = await get_email(email_app, queued["id"])
    assert record["status"] == "SENT" and record["provider"] == "SMTP" and record["to"] == ["alice@example.com"]
    assert record["sent_at"].endswith("Z")


async def test_post_emails_wait_answers_with_the_sent_message(email_app: Any) -> None:
    record = await send(email_app, wait="true")
    assert record["status"] == "SENT"
    assert len(email_app.smtp.messages) == 1


async def test_idempotency_key_header_returns_the_same_message(email_app: Any) -> None:
    headers = {**email_app.service, "Idempotency-Key": "order-7-receipt"}
    body = {"to": ["alice@example.com"], "subject": "Receipt", "text_body": "thanks"}
    first = await (await email_app.post("/v1/emails?wait=true", json=body, headers=headers)).json()
    second = await (await email_app.post("/v1/emails?wait=true", json=body, headers=headers)).json()
    assert first["id"] == second["id"] and first["idempotency_key"] == "order-7-receipt"
    assert len(email_app.smtp.messages) == 1


@pytest.mark.parametrize(("body", "words"), [
    ({"to": ["nope"], "subject": "s", "text_body": "x"}, "to[0]"),
    ({"to": ["a@example.com"], "subject": "s" * 201, "text_body": "x"}, "subject: at most 200 characters"),
    ({"to": ["a@example.com"], "subject": "s"}, "html_body or text_body"),
    ({"to": ["a@example.com"], "subject": "s", "text_body": "x", "attachments": [{"filename": "a"}]},
     "content"),
    ({"to": ["a@example.com"], "template_id": "no-such-template"}, "no template 'no-such-template'"),
])
async def test_bad_requests_get_400_naming_the_field(email_app: Any, body: dict[str, Any], words: str) -> None:
    response = await email_app.post("/v1/emails", json=body, headers=email_app.service)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "invalid_email" and words in error["message"]


async def test_only_admin_and_service_tokens_may_send_or_read(email_app: Any) -> None:
    body = {"to": ["a@example.com"], "subject": "s", "text_body": "x"}
    assert (await email_app.post("/v1/emails", json=body)).status == 401
    assert (await email_app.post("/v1/emails", json=body, headers=email_app.user)).status == 403
    assert (await email_app.get(f"/v1/emails/{uuid.uuid4()}", headers=email_app.admin)).status == 404
    assert (await email_app.get("/v1/emails/not-a-uuid", headers=email_app.admin)).status == 404


async def test_list_emails_filters_by_recipient_status_and_pages(email_app: Any) -> None:
    for i in range(3):
        await send(email_app, {"to": [f"user{i}@example.com"], "subject": f"s{i}", "text_body": "x",
                               "tags": ["weekly"] if i else []}, wait="true")
    page = await (await email_app.get("/v1/emails?limit=2", headers=email_app.admin)).json()
    assert [e["subject"] for e in page["emails"]] == ["s2", "s1"] and page["next_cursor"]
    rest = await (await email_app.get(f"/v1/emails?limit=2&cursor={page['next_cursor']}",
                                      headers=email_app.admin)).json()
    assert [e["subject"] for e in rest["emails"]] == ["s0"] and rest["next_cursor"] is None
    mine = await (await email_app.get("/v1/emails?to=USER1@example.com", headers=email_app.admin)).json()
    assert [e["to"] for e in mine["emails"]] == [["user1@example.com"]]
    tagged = await (await email_app.get("/v1/emails?tag=weekly&status=SENT", headers=email_app.admin)).json()
    assert len(tagged["emails"]) == 2
    assert (await email_app.get("/v1/emails?status=LOST", headers=email_app.admin)).status == 400


# --- webhooks --------------------------------------------------------------------------------


async def test_mailgun_webhook_marks_delivered_and_refuses_replays(email_app: Any) -> None:
    record = await send(email_app, wait="true")
    body = mailgun_payload({"event": "delivered", "timestamp": time.time(), "recipient": "alice@example.com",
                            "user-variables": {"logferry_email_id": record["id"]}})
    response = await email_app.post("/v1/webhooks/mailgun", json=body)
    assert response.status == 200 and (await response.json())["matched"] is True
    stored = await get_email(email_app, record["id"])
    assert stored["status"] == "DELIVERED" and stored["delivered_at"] is not None
    replay = await email_app.post("/v1/webhooks/mailgun", json=body)
    assert replay.status == 406
    with_events = await (await email_app.get(f"/v1/emails/{record['id']}?events=true",
                                             headers=email_app.admin)).json()
    assert [e["type"] for e in with_events["events"]] == ["delivered"]


async def test_mailgun_webhook_finds_the_message_by_message_id(email_app: Any) -> None:
    record = await send(email_app, wait="true")
    body = mailgun_payload({"event": "failed", "severity": "permanent", "recipient": "alice@example.com",
                            "delivery-status": {"code": 550, "message": "No such user"},
                            "message": {"headers": {"message-id": record["message_id"]}}})
    assert (await email_app.post("/v1/webhooks/mailgun", json=body)).status == 200
    stored = await get_email(email_app, record["id"])
    assert stored["status"] == "BOUNCED" and stored["bounce_type"] == "hard"
    assert "550 No such user" in stored["error_message"]


@pytest.mark.parametrize("breakage", ["wrong_key", "stale", "future", "tampered", "unsigned"])
async def test_mailgun_webhook_with_a_bad_signature_is_401(email_app: Any, breakage: str) -> None:
    record = await send(email_app, wait="true")
    event = {"event": "delivered", "user-variables": {"logferry_email_id": record["id"]}}
    now = int(time.time())
    body = {
        "wrong_key": lambda: mailgun_payload(event, key="not-the-key"),
        "stale": lambda: mailgun_payload(event, timestamp=now - 600),
        "future": lambda: mailgun_payload(event, timestamp=now + 600),
        "tampered": lambda: {**mailgun_payload(event), "signature": {
            **mailgun_payload(event)["signature"], "token": "x" * 50}},
        "unsigned": lambda: {"event-data": event},
    }[breakage]()
    response = await email_app.post("/v1/webhooks/mailgun", json=body)
    assert response.status == 401
    assert (await get_email(email_app, record["id"]))["status"] == "SENT"


async def test_resend_webhook_hard_bounce_suppresses_and_duplicates_are_ignored(email_app: Any) -> None:
    record = await send(email_app, wait="true")
    raw = orjson.dumps({"type": "email.bounced", "created_at": "2026-01-01T00:00:00.000Z", "data": {
        "email_id": "resend-id", "to": ["alice@example.com"], "tags": {"logferry_email_id": record["id"]},
        "bounce": {"type": "Permanent", "subType": "General", "message": "mailbox does not exist"}}})
    headers = svix(raw, msg_id="msg_2Lh9KRb0pzN4LePd3XiA4v12Axj")
    response = await email_app.post("/v1/webhooks/resend", data=raw, headers=headers)
    assert response.status == 200 and (await response.json())["status"] == "ok"
    assert (await get_email(email_app, record["id"]))["status"] == "BOUNCED"
    # Svix retries with the same svix-id: acknowledged, not processed again.
    again = await email_app.post("/v1/webhooks/resend", data=raw, headers=headers)
    assert again.status == 200 and (await again.json())["status"] == "duplicate"
    events = await email_app.app[appkeys.STORAGE].query("SELECT type FROM email_events")
    assert [e["type"] for e in events] == ["bounced"]
    # The address is suppressed now: the next send fails fast.
    response = await email_app.post("/v1/emails", headers=email_app.service,
                                    json={"to": ["alice@example.com"], "subject": "s", "text_body": "x"})
    assert response.status == 422
    assert "alice@example.com is suppressed (hard_bounce" in (await response.json())["error"]["message"]


@pytest.mark.parametrize("breakage", ["wrong_key", "stale", "body_changed", "no_headers"])
async def test_resend_webhook_with_a_bad_signature_is_401(email_app: Any, breakage: str) -> None:
    raw = orjson.dumps({"type": "email.delivered", "data": {"email_id": "x"}})
    headers = {
        "wrong_key": lambda: svix(raw, key=b"another-key"),
        "stale": lambda: svix(raw, timestamp=int(time.time()) - 360),
        "body_changed": lambda: svix(raw + b" "),
        "no_headers": lambda: {"Content-Type": "application/json"},
    }[breakage]()
    response = await email_app.post("/v1/webhooks/resend", data=raw, headers=headers)
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "bad_signature"


async def test_webhook_for_an_unknown_message_is_acknowledged(email_app: Any) -> None:
    raw = orjson.dumps({"type": "email.delivered", "data": {"email_id": "never-sent-by-us"}})
    response = await email_app.post("/v1/webhooks/resend", data=raw, headers=svix(raw))
    assert response.status == 200 and (await response.json())["matched"] is False


async def test_replays_are_refused_after_a_restart(email_app: Any, make_client: Any) -> None:
    record = await send(email_app, wait="true")
    body = mailgun_payload({"event": "delivered", "user-variables": {"logferry_email_id": record["id"]}})
    assert (await email_app.post("/v1/webhooks/mailgun", json=body)).status == 200
    config = email_app.app[appkeys.CONFIG]
    await email_app.close()
    restarted = await make_client(config)
    assert (await restarted.post("/v1/webhooks/mailgun", json=body)).status == 406


# --- tracking ----------------------------------------------------------------------------------


def tracking_paths(client: Any) -> tuple[str, str]:
    html = client.smtp.messages[-1][1].get_body(("html",)).get_content()
    click = re.search(r'href="http://127\.0\.0\.1:8080(/t/c/[^"]+)"', html)
    pixel = re.search(r'src="http://127\.0\.0\.1:8080(/t/o/[^"]+)"', html)
    assert click and pixel
    return click.group(1), pixel.group(1)


async def test_click_redirects_to_the_unescaped_original_and_is_recorded(email_app: Any) -> None:
    record = await send(email_app, wait="true")
    click, pixel = tracking_paths(email_app)
    await asyncio.sleep(0)
    service = email_app.app[appkeys.EMAIL]
    service.clock = lambda: time.time() + 60  # past the scanner window
    opened = await email_app.get(pixel, headers={"User-Agent": BROWSER})
    assert opened.status == 200 and opened.content_type == "image/gif"
    assert "no-store" in opened.headers["Cache-Control"]
    response = await email_app.get(click, allow_redirects=False, headers={"User-Agent": BROWSER})
    assert response.status == 302
    assert response.headers["Location"] == "https://example.com/a?x=1&y=2"
    stored = await get_email(email_app, record["id"])
    assert stored["opened_at"] is not None and stored["clicked_at"] is not None
    assert stored["open_count"] == 1 and stored["click_count"] == 1


async def test_a_scanner_click_right_after_the_send_is_flagged_not_counted(email_app: Any) -> None:
    record = await send(email_app, wait="true")
    click, _ = tracking_paths(email_app)
    response = await email_app.get(click, allow_redirects=False, headers={"User-Agent": "Mimecast Scanner"})
    assert response.status == 302  # the scanner still gets the page
    stored = await get_email(email_app, record["id"])
    assert stored["clicked_at"] is None and stored["click_count"] == 0
    events = await email_app.app[appkeys.STORAGE].query("SELECT type, suspected_scanner FROM email_events")
    assert events == [{"type": "clicked", "suspected_scanner": True}]


@pytest.mark.parametrize("token", [
    "eyJrIjoiYyIsImUiOiJ4IiwidSI6Imh0dHBzOi8vZXZpbC5leGFtcGxlLyJ9.AAAAAAAAAAAAAAAAAAAAAA",  # forged MAC
    "https%3A%2F%2Fevil.example",
    "..%2F..%2Fevil",
    "not-a-token",
])
async def test_click_tokens_that_we_did_not_sign_never_redirect(email_app: Any, token: str) -> None:
    response = await email_app.get(f"/t/c/{token}", allow_redirects=False)
    assert response.status == 404 and "Location" not in response.headers


async def test_an_open_token_is_not_a_click_token(email_app: Any) -> None:
    await send(email_app, wait="true")
    _, pixel = tracking_paths(email_app)
    response = await email_app.get(pixel.replace("/t/o/", "/t/c/"), allow_redirects=False)
    assert response.status == 404


async def test_one_click_unsubscribe_needs_a_post(email_app: Any) -> None:
    await send(email_app, {"to": ["bob@example.com"], "subject": "News", "text_body": "x",
                           "transactional": False}, wait="true")
    header = email_app.smtp.messages[-1][1]["List-Unsubscribe"]
    path = re.search(r"<http://127\.0\.0\.1:8080(/t/u/[^>]+)>", header).group(1)  # type: ignore[union-attr]
    page = await email_app.get(path)
    assert page.status == 200 and "<form method=\"post\">" in await page.text()
    service = email_app.app[appkeys.EMAIL]
    assert service.suppressions.get("bob@example.com") is None
    done = await email_app.post(path, data="List-Unsubscribe=One-Click",
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert done.status == 200
    assert service.suppressions.get("bob@example.com").reason == "unsubscribed"


# --- stats and suppressions -------------------------------------------------------------------------


async def test_stats_count_per_day_with_opens_and_clicks(email_app: Any) -> None:
    delivered = await send(email_app, wait="true")
    bounced = await send(email_app, {"to": ["carol@example.com"], "subject": "s", "text_body": "x"}, wait="true")
    await send(email_app, wait="true")
    for email_id, event in ((delivered["id"], {"event": "delivered"}),
                            (bounced["id"], {"event": "failed", "severity": "permanent"}),
                            (delivered["id"], {"event": "opened"}), (delivered["id"], {"event": "clicked",
                                                                                       "url": "https://x/"})):
        body = mailgun_payload({**event, "user-variables": {"logferry_email_id": email_id}})
        assert (await email_app.post("/v1/webhooks/mailgun", json=body)).status == 200
    response = await email_app.get("/v1/emails/stats?days=30", headers=email_app.admin)
    assert response.status == 200
    stats = await response.json()
    assert len(stats["days"]) == 1
    day = stats["days"][0]
    assert (day["total"], day["delivered"], day["bounced"], day["opened"], day["clicked"]) == (3, 1, 1, 1, 1)
    assert stats["totals"]["total"] == 3
    assert (await email_app.get("/v1/emails/stats?days=0", headers=email_app.admin)).status == 400


async def test_suppression_admin_api_lists_adds_and_lifts(email_app: Any) -> None:
    base = "/v1/email/suppressions"
    added = await email_app.post(base, json={"address": "Dave@Example.com", "detail": "asked by phone"},
                                 headers=email_app.admin)
    assert added.status == 201
    listing = await (await email_app.get(base, headers=email_app.admin)).json()
    assert [(s["address"], s["reason"]) for s in listing["suppressions"]] == [("dave@example.com", "manual")]
    assert (await email_app.get(base, headers=email_app.service)).status == 403
    response = await email_app.post("/v1/emails", headers=email_app.service,
                                    json={"to": ["dave@example.com"], "subject": "s", "text_body": "x"})
    assert response.status == 422
    lifted = await email_app.delete(f"{base}/dave@example.com", headers=email_app.admin)
    assert lifted.status == 200
    assert (await email_app.delete(f"{base}/dave@example.com", headers=email_app.admin)).status == 404
    assert (await send(email_app, {"to": ["dave@example.com"], "subject": "s", "text_body": "x"},
                       wait="true"))["status"] == "SENT"


async def test_a_provider_config_error_names_the_yaml_path(make_config: Any) -> None:
    from agent.configfile import ConfigInvalid
    from collector.app import create_app
    from collector.email.providers import validate_provider_options
    from collector.email.routes import _provider_registry

    config = make_config(email={"providers": [{"type": "smtp", "host": "127.0.0.1", "port": 25},
                                              mailgun_provider("http://127.0.0.1:1", api_key="", region="mars")]})
    registry = _provider_registry(create_app(config))
    with pytest.raises(ConfigInvalid) as info:
        validate_provider_options(config.email.providers, registry)
    paths = {e.path for e in info.value.errors}
    assert "collector.email.providers[1].region" in paths
    with pytest.raises(ConfigInvalid) as info:
        validate_provider_options([{"type": "resend", "api_key": ""}, {"type": "pigeon"}], registry)
    messages = {e.path: e.message for e in info.value.errors}
    assert "api_key is required" in messages["collector.email.providers[0]"]
    assert "unknown email provider 'pigeon'" in messages["collector.email.providers[1].type"]
