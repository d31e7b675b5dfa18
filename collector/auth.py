"""Tokens: minting, storing (hashed), checking, scoping.

A token is a JWT (HS256, algorithm pinned) signed with ``secret_key``; its
``jti`` is the token's id. Storage holds only the SHA-256 of the token string
(``token_hash``) and the spec's LogAccessToken fields. A request's token must
both verify as a JWT *and* match a stored, unrevoked, unexpired record, so a
leaked database yields no usable token and a forged JWT without a record is
refused. Usage (``last_used``, ``use_count``) is counted in memory and written
back periodically, never one storage write per request.

Token kinds (api.md): admin, ingest, logs (scoped log access), user (an end
user), service (an application that creates notifications and emails).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import hmac
import ipaddress
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import jwt
import msgspec
import orjson
from aiohttp import web

from agent.wire import Level, parse_level
from collector.source_globs import glob_match
from collector.storage import Storage, new_version

log = logging.getLogger("logferry.collector.auth")

ALGORITHM = "HS256"
ISSUER = "logferry"
KINDS = ("admin", "ingest", "logs", "user", "service")
DEFAULT_TTL = dt.timedelta(hours=24)
MAX_TTL = dt.timedelta(days=3650)
BOOTSTRAP_TTL = dt.timedelta(minutes=5)
PRINCIPAL = web.RequestKey("principal", object)


class AuthError(Exception):
    """A request that may not proceed; the message never says which check failed."""

    def __init__(self, status: int, message: str = "invalid or missing token"):
        super().__init__(message)
        self.status = status


class TokenScope(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What a ``logs`` token may read: sources (globs) and levels."""

    sources: list[str] = []
    min_level: str | None = None
    levels: list[str] | None = None

    def __post_init__(self) -> None:
        if self.min_level is not None:
            level = parse_level(self.min_level)
            if level is None:
                raise ValueError(f"min_level: unknown level {self.min_level!r}")
            self.min_level = level.name
        if self.levels is not None:
            names = []
            for name in self.levels:
                level = parse_level(name)
                if level is None:
                    raise ValueError(f"levels: unknown level {name!r}")
                names.append(level.name)
            self.levels = names
        for pattern in self.sources:
            if not pattern or len(pattern) > 200:
                raise ValueError("sources: each glob must be 1–200 characters")

    def allowed_levels(self) -> list[str] | None:
        """The level names this scope admits, or None for all."""
        names = [lv.name for lv in Level]
        if self.min_level is not None:
            names = [n for n in names if Level[n] >= Level[self.min_level]]
        if self.levels is not None:
            names = [n for n in names if n in self.levels]
        return None if len(names) == len(Level) else names

    def allows_source(self, source: str) -> bool:
        return not self.sources or any(glob_match(p, source) for p in self.sources)


class TokenRecord(msgspec.Struct, kw_only=True):
    id: str
    token_hash: str
    kind: str
    name: str
    created_by: str
    created_at: dt.datetime
    expires_at: dt.datetime
    permissions: TokenScope = msgspec.field(default_factory=TokenScope)
    user_id: str | None = None
    last_used: dt.datetime | None = None
    use_count: int = 0
    ip_whitelist: list[str] = []
    revoked: bool = False
    version: int = 0

    def public(self) -> dict[str, Any]:
        """Everything but the secret (and its hash)."""
        out = msgspec.to_builtins(self)
        out.pop("token_hash", None)
        out.pop("version", None)
        out["active"] = not self.revoked and self.expires_at > dt.datetime.now(dt.UTC)
        return out

    @property
    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return _networks(tuple(self.ip_whitelist))


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: the token's id, kind and scope."""

    token_id: str
    kind: str
    name: str
    user_id: str | None = None
    scope: TokenScope | None = None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _utc(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return dt.datetime.fromisoformat(str(value)).replace(tzinfo=dt.UTC)


def _ms(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def parse_networks(cidrs: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """CIDRs (or single addresses) as networks; ValueError names a bad entry."""
    out = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError:
            raise ValueError(f"ip_whitelist: {cidr!r} is not an IPv4 or IPv6 address or CIDR") from None
    return out


@functools.lru_cache(maxsize=1024)
def _networks(cidrs: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return parse_networks(cidrs)


def ip_in(ip: str | None, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    if ip is None:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


def client_ip(request: web.Request, trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """The caller's address. ``X-Forwarded-For`` is believed only when the peer is
    a trusted proxy, and then read right to left, skipping further trusted hops."""
    peer = request.remote
    if not trusted or not ip_in(peer, trusted):
        return peer
    forwarded = request.headers.get("X-Forwarded-For", "")
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    for hop in reversed(hops):
        if not ip_in(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer
    return hops[0] if hops else peer


def mint_token(secret: str, token_id: str, kind: str, expires_at: dt.datetime, *, issued_at: float,
               user_id: str | None = None, bootstrap: bool = False) -> str:
    """A signed JWT. ``bootstrap`` marks the short-lived admin token the CLI uses
    to reach a running collector (accepted from loopback only, without a record)."""
    claims: dict[str, Any] = {
        "jti": token_id, "knd": kind, "iss": ISSUER, "iat": int(issued_at), "exp": int(expires_at.timestamp()),
    }
    if user_id is not None:
        claims["sub"] = user_id
    if bootstrap:
        claims["bst"] = True
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


class TokenService:
    """Mints, stores and checks tokens; keeps every record in memory.

    Revocation is immediate on this collector (the record in memory changes
    first) and reaches other collectors sharing the storage within
    ``reload_interval`` (a cheap ``version >`` poll of the small tokens table).
    Usage is counted in memory and appended as deltas to ``log_token_usage``
    every ``flush_interval``: no storage write per request, and no lost counts
    between collectors.
    """

    def __init__(self, storage: Storage, secret_key: str, *, clock: Callable[[], float] = time.time):
        self.storage = storage
        self._secret = secret_key
        self._clock = clock
        self._by_hash: dict[str, TokenRecord] = {}
        self._by_id: dict[str, TokenRecord] = {}
        # Usage not yet written: token id → (uses, last used).
        self._pending: dict[str, tuple[int, dt.datetime]] = {}
        # Stored usage sums: token id → (uses, last used).
        self._stored_usage: dict[str, tuple[int, dt.datetime | None]] = {}
        self._max_version = 0
        self.reload_interval = 1.0
        self.flush_interval = 10.0

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    # --- loading and persisting --------------------------------------------

    def _row_to_record(self, row: dict[str, Any]) -> TokenRecord:
        return TokenRecord(
            id=row["id"], token_hash=row["token_hash"], kind=row["kind"], name=row["name"],
            created_by=row["created_by"], created_at=_utc(row["created_at"]) or self._now(),
            expires_at=_utc(row["expires_at"]) or self._now(),
            permissions=msgspec.convert(orjson.loads(row["permissions"] or "{}"), TokenScope),
            user_id=row["user_id"], last_used=_utc(row["last_used"]), use_count=row["use_count"],
            ip_whitelist=list(row["ip_whitelist"]), revoked=bool(row["revoked"]), version=int(row["version"]),
        )

    def _apply_rows(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            record = self._row_to_record(row)
            self._max_version = max(self._max_version, record.version)
            current = self._by_id.get(record.id)
            if current is not None:
                if current.version >= record.version:
                    continue
                # A revocation is never undone by an older writer's row.
                record.revoked = record.revoked or current.revoked
            self._with_usage(record)
            self._by_id[record.id] = record
            self._by_hash[record.token_hash] = record

    def _with_usage(self, record: TokenRecord) -> None:
        uses, last = self._stored_usage.get(record.id, (0, None))
        pending = self._pending.get(record.id)
        if pending is not None:
            uses += pending[0]
            last = pending[1] if last is None or pending[1] > last else last
        record.use_count = uses
        record.last_used = last

    def load_sync(self) -> None:
        """Every token and its usage (on start)."""
        self._load_usage_sync()
        self._apply_rows(self.storage.query_sync("SELECT * FROM log_access_tokens FINAL"))

    def reload_sync(self) -> int:
        """Pick up tokens created, revoked or changed elsewhere since the last look."""
        rows = self.storage.query_sync(
            "SELECT * FROM log_access_tokens WHERE version > {v:UInt64} ORDER BY version", {"v": self._max_version})
        self._apply_rows(rows)
        return len(rows)

    def _load_usage_sync(self) -> None:
        rows = self.storage.query_sync(
            "SELECT token_id, sum(uses) AS uses, max(last_used) AS last_used FROM log_token_usage GROUP BY token_id")
        self._stored_usage = {r["token_id"]: (int(r["uses"]), _utc(r["last_used"])) for r in rows}
        for record in self._by_id.values():
            self._with_usage(record)

    def _lookup_sync(self, digest: str) -> TokenRecord | None:
        rows = self.storage.query_sync(
            "SELECT * FROM log_access_tokens FINAL WHERE token_hash = {h:String}", {"h": digest})
        self._apply_rows(rows)
        return self._by_hash.get(digest)

    async def load(self) -> None:
        await self.storage.run(self.load_sync)

    def _record_row(self, r: TokenRecord) -> dict[str, Any]:
        return {
            "id": r.id, "token_hash": r.token_hash, "kind": r.kind, "name": r.name,
            "created_by": r.created_by, "created_at": _ms(r.created_at), "expires_at": _ms(r.expires_at),
            "permissions": orjson.dumps(msgspec.to_builtins(r.permissions)).decode(),
            "user_id": r.user_id, "last_used": None, "use_count": 0,
            "ip_whitelist": r.ip_whitelist, "revoked": r.revoked, "version": r.version,
        }

    def save_sync(self, record: TokenRecord) -> None:
        record.version = new_version()
        self.storage.insert_rows_sync("log_access_tokens", [self._record_row(record)])
        self._max_version = max(self._max_version, record.version)

    def flush_usage_sync(self) -> int:
        """Append the usage counted since the last flush; returns the tokens written."""
        pending, self._pending = self._pending, {}
        rows = [{"token_id": token_id, "uses": uses, "last_used": _ms(last)}
                for token_id, (uses, last) in pending.items()]
        try:
            self.storage.insert_rows_sync("log_token_usage", rows)
        except Exception:
            # Keep the counts for the next flush.
            for token_id, (uses, last) in pending.items():
                more, later = self._pending.get(token_id, (0, last))
                self._pending[token_id] = (uses + more, max(last, later))
            raise
        for token_id, (uses, last) in pending.items():
            stored, stored_last = self._stored_usage.get(token_id, (0, None))
            self._stored_usage[token_id] = (stored + uses, last if stored_last is None else max(last, stored_last))
        return len(rows)

    # --- minting -------------------------------------------------------------

    def mint(self, token_id: str, kind: str, expires_at: dt.datetime, *, user_id: str | None = None,
             bootstrap: bool = False) -> str:
        return mint_token(self._secret, token_id, kind, expires_at, issued_at=self._clock(), user_id=user_id,
                          bootstrap=bootstrap)

    def create_sync(self, *, kind: str, name: str, created_by: str, expires_in: dt.timedelta | None = None,
                    permissions: TokenScope | None = None, ip_whitelist: Sequence[str] = (),
                    user_id: str | None = None) -> tuple[TokenRecord, str]:
        """Create and store a token; returns the record and the token string
        (the only time it exists outside the caller's hands). ValueError names
        the bad field."""
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(KINDS)}")
        if not name or len(name) > 200:
            raise ValueError("name: must be 1–200 characters")
        ttl = DEFAULT_TTL if expires_in is None else expires_in
        if ttl.total_seconds() <= 0:
            raise ValueError("expires_in: must be in the future")
        if ttl > MAX_TTL:
            raise ValueError(f"expires_in: at most {MAX_TTL.days} days")
        if kind == "logs" and (permissions is None or (not permissions.sources and permissions.min_level is None
                                                       and permissions.levels is None)):
            raise ValueError("permissions: a logs token must define its allowed sources and/or levels")
        if permissions is not None and kind not in ("logs",) and (permissions.sources or permissions.min_level
                                                                 or permissions.levels is not None):
            raise ValueError("permissions: only logs tokens are scoped by sources and levels")
        if kind == "user" and not user_id:
            raise ValueError("user_id: required for a user token")
        if user_id is not None and (not user_id or len(user_id) > 256):
            raise ValueError("user_id: must be 1–256 characters")
        if len(ip_whitelist) > 100:
            raise ValueError("ip_whitelist: at most 100 entries")
        networks = parse_networks(ip_whitelist)  # raises ValueError naming the bad entry
        now = self._now()
        token_id = uuid.uuid4().hex
        expires_at = now + ttl
        token = self.mint(token_id, kind, expires_at, user_id=user_id)
        record = TokenRecord(
            id=token_id, token_hash=hash_token(token), kind=kind, name=name, created_by=created_by,
            created_at=now, expires_at=expires_at, permissions=permissions or TokenScope(),
            user_id=user_id, ip_whitelist=[str(n) for n in networks],
        )
        self.save_sync(record)
        self._by_id[token_id] = record
        self._by_hash[record.token_hash] = record
        return record, token

    async def create(self, **kwargs: Any) -> tuple[TokenRecord, str]:
        return await self.storage.run(lambda: self.create_sync(**kwargs))

    def revoke_sync(self, token_id: str) -> TokenRecord | None:
        """Revoke (idempotent); None when no such token exists."""
        record = self._by_id.get(token_id)
        if record is None:
            self._apply_rows(self.storage.query_sync(
                "SELECT * FROM log_access_tokens FINAL WHERE id = {id:String}", {"id": token_id}))
            record = self._by_id.get(token_id)
            if record is None:
                return None
        record.revoked = True  # refused from this moment on, before the write
        self.save_sync(record)
        return record

    async def revoke(self, token_id: str) -> TokenRecord | None:
        record = self._by_id.get(token_id)
        if record is not None:
            record.revoked = True
        return await self.storage.run(self.revoke_sync, token_id)

    def revoke_user_tokens_sync(self, user_id: str) -> list[str]:
        """Revoke every token bound to ``user_id`` (erasure)."""
        self._apply_rows(self.storage.query_sync(
            "SELECT * FROM log_access_tokens FINAL WHERE user_id = {u:String}", {"u": user_id}))
        ids = [r.id for r in self._by_id.values() if r.user_id == user_id and not r.revoked]
        for token_id in ids:
            self.revoke_sync(token_id)
        return ids

    def list(self) -> list[TokenRecord]:
        return sorted(self._by_id.values(), key=lambda r: r.created_at)

    def get(self, token_id: str) -> TokenRecord | None:
        return self._by_id.get(token_id)

    def is_active(self, token_id: str) -> bool:
        """Whether a token still may be used (long-lived streams check this)."""
        record = self._by_id.get(token_id)
        if record is None:
            return token_id.startswith("bootstrap:")
        return not record.revoked and record.expires_at > self._now()

    # --- checking ------------------------------------------------------------

    async def verify(self, token: str, ip: str | None) -> Principal:
        """The principal of a token, or AuthError(401) for anything wrong with it:
        malformed, wrongly signed, another algorithm, expired, revoked, unknown,
        or used from outside its IP whitelist. The answer never says which."""
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], issuer=ISSUER,
                options={"require": ["jti", "exp", "iat", "iss"]},
            )
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError(401) from None
        kind = claims.get("knd")
        if kind not in KINDS or not isinstance(claims.get("jti"), str):
            raise AuthError(401)
        if claims.get("bst") is True:
            # A short-lived admin token the CLI mints from secret_key to reach a
            # running collector; only from this machine.
            if kind != "admin" or claims["exp"] - claims["iat"] > BOOTSTRAP_TTL.total_seconds():
                raise AuthError(401)
            if not _is_loopback(ip):
                raise AuthError(401)
            return Principal(token_id=f"bootstrap:{claims['jti']}", kind="admin", name="cli")
        digest = hash_token(token)
        record = self._by_hash.get(digest)
        if record is None:
            # Signed by our key but not known here yet: created by another
            # process or collector. Only correctly signed tokens get this far.
            record = await self.storage.run(self._lookup_sync, digest)
        if record is None or not hmac.compare_digest(record.token_hash, digest):
            raise AuthError(401)
        now = self._now()
        if record.revoked or record.expires_at <= now or record.id != claims["jti"] or record.kind != kind:
            raise AuthError(401)
        if record.ip_whitelist and not ip_in(ip, record.networks):
            raise AuthError(401)
        uses, _ = self._pending.get(record.id, (0, now))
        self._pending[record.id] = (uses + 1, now)
        record.last_used = now
        record.use_count += 1
        return Principal(
            token_id=record.id, kind=record.kind, name=record.name, user_id=record.user_id,
            scope=record.permissions if record.kind == "logs" else None,
        )


def _is_loopback(ip: str | None) -> bool:
    if ip is None:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def requires(*kinds: str) -> Callable[[Handler], Handler]:
    """Decorate a handler: only tokens of these kinds get through; the principal
    is then ``request[PRINCIPAL]``."""

    def decorate(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            from collector import appkeys

            app = request.app
            token = bearer(request)
            if token is None:
                raise AuthError(401)
            trusted = app[appkeys.TRUSTED_PROXIES]
            principal = await app[appkeys.TOKENS].verify(token, client_ip(request, trusted))
            if principal.kind not in kinds:
                raise AuthError(403, "this token may not do that")
            request[PRINCIPAL] = principal
            return await handler(request)

        wrapped.__name__ = handler.__name__
        wrapped.__doc__ = handler.__doc__
        return wrapped

    return decorate


def principal_of(request: web.Request) -> Principal:
    value = request[PRINCIPAL]
    assert isinstance(value, Principal)
    return value


async def usage_flusher(service: TokenService, interval: float | None = None) -> None:
    """Background task: every ``service.reload_interval`` pick up tokens other
    collectors created or revoked; every ``service.flush_interval`` write usage
    back and re-read the usage sums."""
    last_flush = time.monotonic()
    while True:
        await asyncio.sleep(service.reload_interval)
        try:
            await service.storage.run(service.reload_sync)
            if time.monotonic() - last_flush >= (interval or service.flush_interval):
                last_flush = time.monotonic()
                await service.storage.run(service.flush_usage_sync)
                await service.storage.run(service._load_usage_sync)
        except Exception:
            log.exception("token reload or usage flush failed")
