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
import fnmatch
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
from collector.storage import Storage, new_version

log = logging.getLogger("logferry.collector.auth")

ALGORITHM = "HS256"
ISSUER = "logferry"
KINDS = ("admin", "ingest", "logs", "user", "service")
DEFAULT_TTL = dt.timedelta(hours=24)
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
        return not self.sources or any(fnmatch.fnmatchcase(source, p) for p in self.sources)


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

    def public(self) -> dict[str, Any]:
        """Everything but the secret (and its hash)."""
        out = msgspec.to_builtins(self)
        out.pop("token_hash", None)
        return out


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
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


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
    """Mints, stores and checks tokens; keeps every record in memory."""

    def __init__(self, storage: Storage, secret_key: str, *, clock: Callable[[], float] = time.time):
        self.storage = storage
        self._secret = secret_key
        self._clock = clock
        self._by_hash: dict[str, TokenRecord] = {}
        self._by_id: dict[str, TokenRecord] = {}
        self._dirty: set[str] = set()

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
            ip_whitelist=list(row["ip_whitelist"]), revoked=bool(row["revoked"]),
        )

    def load_sync(self) -> None:
        rows = self.storage.query_sync("SELECT * FROM log_access_tokens FINAL")
        for row in rows:
            record = self._row_to_record(row)
            current = self._by_id.get(record.id)
            if current is not None and record.id in self._dirty:
                # Keep our unsaved usage counts; take the stored revocation.
                current.revoked = current.revoked or record.revoked
                continue
            self._by_id[record.id] = record
            self._by_hash[record.token_hash] = record

    def _lookup_sync(self, digest: str) -> TokenRecord | None:
        rows = self.storage.query_sync(
            "SELECT * FROM log_access_tokens FINAL WHERE token_hash = {h:String}", {"h": digest})
        if not rows:
            return None
        record = self._row_to_record(rows[0])
        self._by_id[record.id] = record
        self._by_hash[record.token_hash] = record
        return record

    async def load(self) -> None:
        await self.storage.run(self.load_sync)

    def _record_row(self, r: TokenRecord) -> dict[str, Any]:
        return {
            "id": r.id, "token_hash": r.token_hash, "kind": r.kind, "name": r.name,
            "created_by": r.created_by, "created_at": _ms(r.created_at), "expires_at": _ms(r.expires_at),
            "permissions": orjson.dumps(msgspec.to_builtins(r.permissions)).decode(),
            "user_id": r.user_id, "last_used": _ms(r.last_used), "use_count": r.use_count,
            "ip_whitelist": r.ip_whitelist, "revoked": r.revoked, "version": new_version(),
        }

    def save_sync(self, record: TokenRecord) -> None:
        self.storage.insert_rows_sync("log_access_tokens", [self._record_row(record)])

    def flush_usage_sync(self) -> int:
        """Write back usage counters of tokens used since the last flush."""
        dirty, self._dirty = self._dirty, set()
        rows = [self._record_row(self._by_id[i]) for i in dirty if i in self._by_id]
        if rows:
            self.storage.insert_rows_sync("log_access_tokens", rows)
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
        (the only time it exists outside the caller's hands)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if not name or len(name) > 200:
            raise ValueError("name must be 1–200 characters")
        ttl = DEFAULT_TTL if expires_in is None else expires_in
        if ttl.total_seconds() <= 0:
            raise ValueError("expires_in must be in the future")
        if kind == "logs" and (permissions is None or (not permissions.sources and permissions.min_level is None
                                                       and permissions.levels is None)):
            raise ValueError("permissions must define the allowed sources and/or levels of a logs token")
        if kind == "user" and not user_id:
            raise ValueError("user_id is required for a user token")
        parse_networks(ip_whitelist)  # raises ValueError naming the bad entry
        now = self._now()
        token_id = uuid.uuid4().hex
        expires_at = now + ttl
        token = self.mint(token_id, kind, expires_at, user_id=user_id)
        record = TokenRecord(
            id=token_id, token_hash=hash_token(token), kind=kind, name=name, created_by=created_by,
            created_at=now, expires_at=expires_at, permissions=permissions or TokenScope(),
            user_id=user_id, ip_whitelist=list(ip_whitelist),
        )
        self.save_sync(record)
        self._by_id[token_id] = record
        self._by_hash[record.token_hash] = record
        return record, token

    async def create(self, **kwargs: Any) -> tuple[TokenRecord, str]:
        return await self.storage.run(lambda: self.create_sync(**kwargs))

    def revoke_sync(self, token_id: str) -> TokenRecord | None:
        record = self._by_id.get(token_id)
        if record is None:
            return None
        record.revoked = True
        self.save_sync(record)
        return record

    async def revoke(self, token_id: str) -> TokenRecord | None:
        return await self.storage.run(self.revoke_sync, token_id)

    def list(self) -> list[TokenRecord]:
        return sorted(self._by_id.values(), key=lambda r: r.created_at)

    # --- checking ------------------------------------------------------------

    async def verify(self, token: str, ip: str | None) -> Principal:
        """The principal of a token, or AuthError(401) for anything wrong with the
        token itself and AuthError(403) for a valid token used from outside its
        IP whitelist."""
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], issuer=ISSUER,
                options={"require": ["jti", "exp", "iat"]},
            )
        except jwt.PyJWTError:
            raise AuthError(401) from None
        kind = claims.get("knd")
        if kind not in KINDS:
            raise AuthError(401)
        if claims.get("bst") is True:
            # A short-lived admin token the CLI mints from secret_key to reach a
            # running collector; only from this machine.
            if kind != "admin" or claims["exp"] - claims["iat"] > BOOTSTRAP_TTL.total_seconds():
                raise AuthError(401)
            if ip is None or not ipaddress.ip_address(ip).is_loopback:
                raise AuthError(401)
            return Principal(token_id=str(claims["jti"]), kind="admin", name="cli")
        digest = hash_token(token)
        record = self._by_hash.get(digest)
        if record is None:
            # Signed by our key but not yet known here: created by another
            # process or collector. Only correctly signed tokens get this far.
            record = await self.storage.run(self._lookup_sync, digest)
        if record is None or not hmac.compare_digest(record.token_hash, digest):
            raise AuthError(401)
        now = self._now()
        if record.revoked or record.expires_at <= now or record.id != claims["jti"] or record.kind != kind:
            raise AuthError(401)
        if record.ip_whitelist and not ip_in(ip, parse_networks(record.ip_whitelist)):
            raise AuthError(403, "forbidden")
        record.last_used = now
        record.use_count += 1
        self._dirty.add(record.id)
        return Principal(
            token_id=record.id, kind=record.kind, name=record.name, user_id=record.user_id,
            scope=record.permissions if record.kind == "logs" else None,
        )


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


async def usage_flusher(service: TokenService, interval: float = 10.0) -> None:
    """Background task: write usage counters back and pick up tokens other
    collectors created or revoked."""
    while True:
        await asyncio.sleep(interval)
        try:
            await service.storage.run(service.flush_usage_sync)
            await service.load()
        except Exception:
            log.exception("token usage flush failed")
