"""The users directory: where a user's notifications go.

``PUT /v1/users/{user_id}`` (admin and service tokens) stores a user's email,
phone, timezone and Web Push subscriptions. Personal data is sealed at rest
(data-model.md): the email and phone encrypted (AES-GCM) with keyed hashes for
lookups, the push subscriptions (their endpoints are capabilities) encrypted.

Addresses are resolved through the ``logferry_resolve_user_address`` hook
first, so a host application that knows its users better can answer; the
directory is the fallback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson
from email_validator import EmailNotValidError, validate_email

from collector.notifications.hotstate import MISSING, HotState
from collector.notifications.model import EMAIL, IN_APP, PUSH, SMS, iso, utc
from collector.notifications.preferences import check_timezone
from collector.notifications.repository import ms
from collector.pii import PiiCipher, normalise_phone
from collector.storage import Storage, new_version

E164 = re.compile(r"^\+[1-9]\d{6,14}$")
MAX_SUBSCRIPTIONS = 20
MAX_ATTRIBUTES_BYTES = 8 * 1024
USER_CACHE = "user"


class PushKeys(msgspec.Struct, forbid_unknown_fields=True):
    p256dh: str
    auth: str

    def __post_init__(self) -> None:
        if not 80 <= len(self.p256dh) <= 100 or not 16 <= len(self.auth) <= 32:
            raise ValueError("push subscription keys: p256dh must be a base64url P-256 point, auth 16 bytes")


class PushSubscription(msgspec.Struct, kw_only=True):
    """A browser's ``PushSubscription.toJSON()``."""

    endpoint: str
    keys: PushKeys
    # The browser's own field name.
    expirationTime: int | None = None

    def __post_init__(self) -> None:
        url = urllib.parse.urlsplit(self.endpoint)
        if url.scheme not in ("https", "http") or not url.hostname or len(self.endpoint) > 2048:
            raise ValueError("push subscription endpoint must be an https URL")
        if url.scheme == "http":
            try:
                loopback = ipaddress.ip_address(url.hostname).is_loopback
            except ValueError:
                loopback = url.hostname == "localhost"
            if not loopback:
                raise ValueError("push subscription endpoint must be an https URL")


class UserInput(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``PUT /v1/users/{user_id}``: the whole record (PUT replaces)."""

    email: str | None = None
    phone: str | None = None
    timezone: str = "UTC"
    push_subscriptions: list[PushSubscription] = []
    attributes: dict[str, Any] = {}

    def __post_init__(self) -> None:
        if self.email is not None:
            try:
                self.email = validate_email(self.email, check_deliverability=False).normalized
            except EmailNotValidError as exc:
                raise ValueError(f"email: {exc}") from None
        if self.phone is not None:
            phone = normalise_phone(self.phone)
            if not E164.match(phone):
                raise ValueError("phone must be an E.164 number such as +15550109999")
            self.phone = phone
        try:
            check_timezone(self.timezone)
        except ValueError as exc:
            raise ValueError(f"timezone: {exc}") from None
        if len(self.push_subscriptions) > MAX_SUBSCRIPTIONS:
            raise ValueError(f"push_subscriptions: at most {MAX_SUBSCRIPTIONS}")
        if len(orjson.dumps(self.attributes)) > MAX_ATTRIBUTES_BYTES:
            raise ValueError(f"attributes must be at most {MAX_ATTRIBUTES_BYTES} bytes as JSON")


class UserRecord(msgspec.Struct, kw_only=True):
    user_id: str
    email: str | None
    phone: str | None
    timezone: str
    push_subscriptions: list[PushSubscription]
    attributes: dict[str, Any]
    updated_at: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id, "email": self.email, "phone": self.phone, "timezone": self.timezone,
            "push_subscriptions": msgspec.to_builtins(self.push_subscriptions), "attributes": self.attributes,
            "updated_at": iso(self.updated_at),
        }


AddressHook = Callable[[str, str], Awaitable[Any]]


class UsersDirectory:
    """Users' addresses, cached in the hot state; writes invalidate the cache."""

    def __init__(self, storage: Storage, cipher: PiiCipher, hot: HotState, *,
                 clock: Callable[[], dt.datetime], cache_ttl: float = 60.0,
                 resolve_hook: AddressHook | None = None):
        self.storage = storage
        self.cipher = cipher
        self.hot = hot
        self.clock = clock
        self.cache_ttl = cache_ttl
        self.resolve_hook = resolve_hook
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, user_id: str) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            if len(self._locks) > 10_000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            lock = self._locks[user_id] = asyncio.Lock()
        return lock

    # --- storage ----------------------------------------------------------------

    def _row(self, record: UserRecord) -> dict[str, Any]:
        subs = orjson.dumps(msgspec.to_builtins(record.push_subscriptions)).decode()
        return {
            "user_id": record.user_id,
            "email": None if record.email is None else self.cipher.encrypt(record.email),
            "email_hash": None if record.email is None else self.cipher.email_hash(record.email),
            "phone": None if record.phone is None else self.cipher.encrypt(record.phone),
            "phone_hash": None if record.phone is None else self.cipher.phone_hash(record.phone),
            "timezone": record.timezone,
            "push_subscriptions": self.cipher.encrypt(subs),
            "attributes": orjson.dumps(record.attributes).decode(),
            "updated_at": ms(record.updated_at), "version": new_version(), "deleted": 0,
        }

    def _from_row(self, row: dict[str, Any]) -> UserRecord:
        subs_raw = row["push_subscriptions"] or "[]"
        subs_json = self.cipher.decrypt(subs_raw) if subs_raw.startswith("v1:") else subs_raw
        return UserRecord(
            user_id=row["user_id"],
            email=None if row["email"] is None else self.cipher.decrypt(row["email"]),
            phone=None if row["phone"] is None else self.cipher.decrypt(row["phone"]),
            timezone=row["timezone"] or "UTC",
            push_subscriptions=msgspec.convert(orjson.loads(subs_json), list[PushSubscription]),
            attributes=orjson.loads(row["attributes"] or "{}"),
            updated_at=utc(row["updated_at"]),
        )

    async def _load(self, user_id: str) -> UserRecord | None:
        rows = await self.storage.query(
            "SELECT * FROM users FINAL WHERE user_id = {u:String} AND deleted = 0 LIMIT 1", {"u": user_id})
        return self._from_row(rows[0]) if rows else None

    async def _save(self, record: UserRecord) -> None:
        await self.storage.insert_rows("users", [self._row(record)])
        await self.hot.cache_invalidate(USER_CACHE, record.user_id)

    # --- the API ----------------------------------------------------------------------

    async def get(self, user_id: str) -> UserRecord | None:
        now = self.clock().timestamp()
        cached = await self.hot.cache_get(USER_CACHE, user_id, now)
        if cached is not MISSING:
            return cached  # type: ignore[no-any-return]
        record = await self._load(user_id)
        await self.hot.cache_put(USER_CACHE, user_id, record, now, self.cache_ttl)
        return record

    async def put(self, user_id: str, data: UserInput) -> tuple[UserRecord, bool]:
        """Store the record; returns it and whether it is new."""
        async with self._lock(user_id):
            existing = await self._load(user_id)
            record = UserRecord(
                user_id=user_id, email=data.email, phone=data.phone, timezone=data.timezone,
                push_subscriptions=_unique_endpoints(data.push_subscriptions), attributes=data.attributes,
                updated_at=self.clock(),
            )
            await self._save(record)
            return record, existing is None

    async def add_push_subscription(self, user_id: str, subscription: PushSubscription) -> UserRecord:
        async with self._lock(user_id):
            record = await self._load(user_id) or UserRecord(
                user_id=user_id, email=None, phone=None, timezone="UTC", push_subscriptions=[],
                attributes={}, updated_at=self.clock())
            subs = [s for s in record.push_subscriptions if s.endpoint != subscription.endpoint]
            subs.append(subscription)
            record.push_subscriptions = subs[-MAX_SUBSCRIPTIONS:]
            record.updated_at = self.clock()
            await self._save(record)
            return record

    async def remove_push_subscription(self, user_id: str, endpoint: str) -> bool:
        """Forget an expired subscription (the push service answered 404/410)."""
        async with self._lock(user_id):
            record = await self._load(user_id)
            if record is None:
                return False
            kept = [s for s in record.push_subscriptions if s.endpoint != endpoint]
            if len(kept) == len(record.push_subscriptions):
                return False
            record.push_subscriptions = kept
            record.updated_at = self.clock()
            await self._save(record)
            return True

    async def erase(self, user_id: str) -> bool:
        """Delete the user's record (GDPR erasure); returns whether there was one."""
        async with self._lock(user_id):
            record = await self._load(user_id)
            if record is None:
                return False
            row = self._row(record)
            row.update({"email": None, "email_hash": None, "phone": None, "phone_hash": None,
                        "push_subscriptions": "[]", "attributes": "{}", "deleted": 1})
            await self.storage.insert_rows("users", [row])
            await self.hot.cache_invalidate(USER_CACHE, user_id)
            return True

    async def forget(self, user_id: str) -> None:
        """Drop the cached record (the row was erased elsewhere)."""
        await self.hot.cache_invalidate(USER_CACHE, user_id)

    async def find_by_phone(self, phone: str) -> str | None:
        rows = await self.storage.query(
            "SELECT user_id FROM users FINAL WHERE phone_hash = {h:String} AND deleted = 0 LIMIT 1",
            {"h": self.cipher.phone_hash(phone)})
        return rows[0]["user_id"] if rows else None

    async def timezone_of(self, user_id: str) -> str:
        record = await self.get(user_id)
        return record.timezone if record is not None else "UTC"

    async def address(self, user_id: str, channel: str) -> Any:
        """Where to reach ``user_id`` on ``channel``: the hook's answer first,
        then the directory's. An email or phone (str), a list of push
        subscriptions (dicts), or None when unknown."""
        if self.resolve_hook is not None:
            found = await self.resolve_hook(user_id, channel)
            if found is not None:
                return found
        if channel == IN_APP:
            return user_id
        record = await self.get(user_id)
        if record is None:
            return None
        if channel == EMAIL:
            return record.email
        if channel == SMS:
            return record.phone
        if channel == PUSH:
            return msgspec.to_builtins(record.push_subscriptions) or None
        return record.attributes.get(channel)


def _unique_endpoints(subs: list[PushSubscription]) -> list[PushSubscription]:
    seen: dict[str, PushSubscription] = {}
    for sub in subs:
        seen[sub.endpoint] = sub
    return list(seen.values())
