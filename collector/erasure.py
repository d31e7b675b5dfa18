"""``DELETE /v1/users/{user_id}/data``: erase a user's personal data (GDPR art. 17).

What goes: the user's logs (by ``user_id``), notifications and their
deliveries, preferences, the users-directory row, contact-form submissions
(and their attachments) sent from the user's email address or phone (matched
by keyed hash, as they are stored), emails sent to that address or for the
user's notifications (with their outbox rows and delivery events), and every
token bound to the user (revoked). What stays: the audit trail, which records
the erasure itself with counts and no personal data, and email suppressions
(a hashed address kept so the user is never emailed again by mistake).

Rows are removed with lightweight ``DELETE``: they are masked from every
query at once and physically dropped by the next merges. Each table is
touched only when it exists (features add tables in their own migrations).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from collector import appkeys
from collector.audit import actor_of, record_audit
from collector.auth import principal_of, requires
from collector.errors import ApiError
from collector.events import EventBus
from collector.pii import PiiCipher
from collector.storage import Storage

log = logging.getLogger("logferry.collector.erasure")

# Event published after an erasure, so services holding users in memory
# (queues, caches, digests) can drop them: [{"user_id": ...}].
USER_ERASED = "user_erased"


class ErasurePlan:
    """The rows of one user, found before anything is deleted."""

    def __init__(self, user_id: str):
        self.user_id = user_id
        self.email_hashes: list[str] = []
        self.phone_hashes: list[str] = []
        self.notification_ids: list[str] = []
        self.submission_ids: list[str] = []
        self.email_ids: list[str] = []


# (table, WHERE over the plan's binds) in deletion order: dependants first.
_STEPS: tuple[tuple[str, str, str], ...] = (
    ("logs", "application_logs", "user_id = {user:String}"),
    ("notification_deliveries", "notification_deliveries",
     "user_id = {user:String} OR notification_id IN {notifications:Array(String)}"),
    ("notifications", "notifications", "user_id = {user:String}"),
    ("notification_preferences", "notification_preferences", "user_id = {user:String}"),
    ("contact_attachments", "contact_attachments", "submission_id IN {submissions:Array(String)}"),
    ("contact_submissions", "contact_submissions", "toString(id) IN {submissions:Array(String)}"),
    ("email_outbox", "email_outbox", "email_id IN {emails:Array(String)}"),
    ("email_events", "email_events",
     "email_id IN {emails:Array(String)} OR (recipient_hash != '' AND recipient_hash IN {email_hashes:Array(String)})"),
    ("email_messages", "email_messages", "toString(id) IN {emails:Array(String)}"),
    ("users", "users", "user_id = {user:String}"),
)


class UserEraser:
    """Finds and deletes one user's rows; sync, run in the storage pool."""

    def __init__(self, storage: Storage, cipher: PiiCipher):
        self.storage = storage
        self.cipher = cipher

    def _tables(self) -> set[str]:
        rows = self.storage.query_sync("SELECT name FROM system.tables WHERE database = currentDatabase()")
        return {r["name"] for r in rows}

    def plan_sync(self, user_id: str, tables: set[str]) -> ErasurePlan:
        plan = ErasurePlan(user_id)
        q = self.storage.query_sync
        user = {"user": user_id}
        if "users" in tables:
            for row in q("SELECT email, email_hash, phone_hash FROM users FINAL WHERE user_id = {user:String}", user):
                if row["email_hash"]:
                    plan.email_hashes.append(row["email_hash"])
                elif row["email"]:
                    try:
                        plan.email_hashes.append(self.cipher.email_hash(self.cipher.decrypt(row["email"])))
                    except ValueError:
                        plan.email_hashes.append(self.cipher.email_hash(row["email"]))
                if row["phone_hash"]:
                    plan.phone_hashes.append(row["phone_hash"])
        if "notifications" in tables:
            plan.notification_ids = [r["id"] for r in q(
                "SELECT DISTINCT toString(id) AS id FROM notifications WHERE user_id = {user:String}", user)]
        if "contact_submissions" in tables and (plan.email_hashes or plan.phone_hashes):
            plan.submission_ids = [r["id"] for r in q(
                "SELECT DISTINCT toString(id) AS id FROM contact_submissions "
                "WHERE email_hash IN {e:Array(String)} OR phone_hash IN {p:Array(String)}",
                {"e": plan.email_hashes, "p": plan.phone_hashes})]
        if "email_messages" in tables:
            plan.email_ids = [r["id"] for r in q(
                "SELECT DISTINCT toString(id) AS id FROM email_messages "
                "WHERE hasAny(to_hash, {e:Array(String)}) OR notification_id IN {n:Array(String)}",
                {"e": plan.email_hashes, "n": plan.notification_ids})]
        return plan

    def erase_sync(self, user_id: str) -> dict[str, int]:
        """Delete every row of the user; returns the rows removed per kind."""
        tables = self._tables()
        plan = self.plan_sync(user_id, tables)
        params: dict[str, Any] = {
            "user": user_id, "notifications": plan.notification_ids, "submissions": plan.submission_ids,
            "emails": plan.email_ids, "email_hashes": plan.email_hashes,
        }
        counts: dict[str, int] = {}
        for kind, table, where in _STEPS:
            if table not in tables:
                continue
            used = {k: v for k, v in params.items() if "{" + k + ":" in where}
            if "user" not in used and not any(used.values()):
                counts[kind] = 0
                continue
            found = self.storage.query_sync(f"SELECT count() AS n FROM {table} WHERE {where}", used)
            counts[kind] = int(found[0]["n"]) if found else 0
            if counts[kind]:
                self.storage.command_sync(f"DELETE FROM {table} WHERE {where}", used,
                                          settings={"lightweight_deletes_sync": 2})
        return counts


@requires("admin")
async def erase_user(request: web.Request) -> web.Response:
    app = request.app
    user_id = request.match_info["user_id"]
    if not user_id or len(user_id) > 256 or "\x00" in user_id:
        raise ApiError(400, "bad_parameter", "user_id: must be 1–256 characters")
    eraser = app[appkeys.ERASER]
    try:
        counts = await app[appkeys.STORAGE].run(eraser.erase_sync, user_id)
    except Exception as exc:
        log.error("erasure failed", extra={"error": str(exc)[:500]})
        raise ApiError(503, "storage_unavailable", "the erasure did not complete; it is safe to retry") from None
    tokens = app[appkeys.TOKENS]
    revoked = await tokens.storage.run(tokens.revoke_user_tokens_sync, user_id)
    counts["tokens_revoked"] = len(revoked)
    events: EventBus = app[appkeys.EVENTS]
    events.publish(USER_ERASED, [{"user_id": user_id}])
    principal = principal_of(request)
    # The audit row says that and how much was erased, never what.
    await record_audit(app, actor=actor_of(principal), action="user.erase", target=user_id,
                       details={"counts": counts}, request=request)
    return web.Response(body=orjson.dumps({"user_id": user_id, "erased": counts}), content_type="application/json")


def on_erasure(app: web.Application, callback: Callable[[str], None]) -> Callable[[], None]:
    """Subscribe ``callback(user_id)`` to erasures (for services with in-memory user state)."""

    def handler(events: Sequence[Mapping[str, Any]]) -> None:
        for event in events:
            callback(str(event["user_id"]))

    return app[appkeys.EVENTS].subscribe(USER_ERASED, handler)


async def _eraser_ctx(app: web.Application) -> AsyncIterator[None]:
    app[appkeys.ERASER] = UserEraser(app[appkeys.STORAGE], PiiCipher(app[appkeys.CONFIG].secret_key))
    yield


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_eraser_ctx)
    app.router.add_delete("/v1/users/{user_id}/data", erase_user)
