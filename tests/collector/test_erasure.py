"""DELETE /v1/users/{user_id}/data: every row of the user goes, nobody else's, the audit stays."""

from __future__ import annotations

import datetime as dt
import uuid

import orjson

from collector.pii import PiiCipher
from tests.conftest import SECRET

NOW = dt.datetime.now(dt.UTC)
T = (NOW - dt.timedelta(minutes=10)).strftime("%Y-%m-%d %H:%M:%S.000")


def seed_user(storage, user_id: str, email: str, phone: str) -> dict[str, str]:
    """One user's rows in every table that holds personal data."""
    cipher = PiiCipher(SECRET)
    email_hash, phone_hash = cipher.email_hash(email), cipher.phone_hash(phone)
    notification_id, submission_id, email_id = (str(uuid.uuid4()) for _ in range(3))
    insert = storage.insert_rows_sync
    insert("users", [{"user_id": user_id, "email": cipher.encrypt(email), "email_hash": email_hash,
                      "phone": cipher.encrypt(phone), "phone_hash": phone_hash, "updated_at": T, "version": 1}])
    insert("application_logs", [{"id": str(uuid.uuid4()), "timestamp": T, "level": "INFO", "source": "web",
                                 "message": f"login {user_id}", "user_id": user_id} for _ in range(3)])
    insert("notifications", [{"id": notification_id, "user_id": user_id, "type": "welcome", "priority": "LOW",
                              "title": "hi", "message": "welcome", "channels": ["email"], "created_at": T,
                              "status": "SENT", "version": 1}])
    insert("notification_deliveries", [{"id": str(uuid.uuid4()), "notification_id": notification_id,
                                        "channel": "EMAIL", "status": "SENT", "created_at": T, "version": 1}])
    insert("notification_preferences", [{"id": str(uuid.uuid4()), "user_id": user_id, "notification_type": "welcome",
                                         "channels": {"email": True}, "frequency": "INSTANT", "created_at": T,
                                         "updated_at": T, "version": 1}])
    insert("contact_submissions", [{"id": submission_id, "name": "N", "email": cipher.encrypt(email),
                                    "email_hash": email_hash, "subject": "help", "message": "please",
                                    "ip_address": "10.0.0.1", "user_agent": "ua", "submitted_at": T,
                                    "status": "NEW", "version": 1}])
    insert("contact_attachments", [{"submission_id": submission_id, "idx": 0, "filename": "a.txt",
                                    "content_type": "text/plain", "size": 1, "sha256": "x", "data": "x",
                                    "stored_at": T}])
    insert("email_messages", [{"id": email_id, "from": "noreply@example.com", "to": [cipher.encrypt(email)],
                               "to_hash": [email_hash], "subject": "hello", "text_body": "hi", "provider": "SMTP",
                               "status": "SENT", "created_at": T, "version": 1}])
    insert("email_events", [{"email_id": email_id, "type": "delivered", "provider": "smtp", "occurred_at": T,
                             "received_at": T, "recipient_hash": email_hash}])
    return {"email_hash": email_hash, "notification_id": notification_id, "submission_id": submission_id,
            "email_id": email_id}


def counts(storage, user_id: str, ids: dict[str, str]) -> dict[str, int]:
    def n(sql: str, **params) -> int:
        return int(storage.query_sync(sql, params)[0]["n"])

    return {
        "users": n("SELECT count() n FROM users WHERE user_id = {u:String}", u=user_id),
        "logs": n("SELECT count() n FROM application_logs WHERE user_id = {u:String}", u=user_id),
        "notifications": n("SELECT count() n FROM notifications WHERE user_id = {u:String}", u=user_id),
        "deliveries": n("SELECT count() n FROM notification_deliveries WHERE notification_id = {i:String}",
                        i=ids["notification_id"]),
        "preferences": n("SELECT count() n FROM notification_preferences WHERE user_id = {u:String}", u=user_id),
        "submissions": n("SELECT count() n FROM contact_submissions WHERE email_hash = {h:String}",
                         h=ids["email_hash"]),
        "attachments": n("SELECT count() n FROM contact_attachments WHERE submission_id = {i:String}",
                         i=ids["submission_id"]),
        "emails": n("SELECT count() n FROM email_messages WHERE has(to_hash, {h:String})", h=ids["email_hash"]),
        "email_events": n("SELECT count() n FROM email_events WHERE email_id = {i:String}", i=ids["email_id"]),
    }


async def test_erasure_removes_every_row_of_the_user_and_only_theirs(app_client, admin_token, tokens, storage):
    gone = seed_user(storage, "u-gone", "Gone@Example.com", "+1 555 0100")
    kept = seed_user(storage, "u-kept", "kept@example.com", "+1 555 0199")
    user_token = tokens.create("user", user_id="u-gone")
    resp = await app_client.delete("/v1/users/u-gone/data", headers=tokens.headers(admin_token))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["user_id"] == "u-gone"
    assert body["erased"]["logs"] == 3
    assert body["erased"]["notifications"] == body["erased"]["users"] == body["erased"]["contact_submissions"] == 1
    assert body["erased"]["email_messages"] == body["erased"]["email_events"] == 1
    assert body["erased"]["tokens_revoked"] == 1

    assert set(counts(storage, "u-gone", gone).values()) == {0}
    assert set(counts(storage, "u-kept", kept).values()) == {1, 3}

    # No query returns the erased logs; the user's token is dead.
    resp = await app_client.get("/v1/logs", params={"user_id": "u-gone", "start": "-1d"},
                                headers=tokens.headers(admin_token))
    assert (await resp.json())["logs"] == []
    resp = await app_client.get("/v1/logs", params={"q": "u-gone", "start": "-1d"},
                                headers=tokens.headers(admin_token))
    assert (await resp.json())["logs"] == []
    resp = await app_client.get("/v1/me/notifications", headers=tokens.headers(user_token))
    assert resp.status == 401

    # The audit trail keeps the erasure, with counts and without personal data.
    [audit] = storage.query_sync("SELECT actor, target, details FROM audit_log WHERE action = 'user.erase'")
    assert audit["target"] == "u-gone"
    assert orjson.loads(audit["details"])["counts"]["logs"] == 3
    assert "example.com" not in audit["details"].lower()


async def test_erasure_is_idempotent_and_admin_only(app_client, admin_token, tokens, storage):
    seed_user(storage, "u1", "u1@example.com", "+1 555 0101")
    service = tokens.create("service")
    logs = tokens.create("logs")
    for token in (service, logs):
        resp = await app_client.delete("/v1/users/u1/data", headers=tokens.headers(token))
        assert resp.status in (401, 403)
    first = await app_client.delete("/v1/users/u1/data", headers=tokens.headers(admin_token))
    second = await app_client.delete("/v1/users/u1/data", headers=tokens.headers(admin_token))
    assert first.status == second.status == 200
    assert set((await second.json())["erased"].values()) == {0}
