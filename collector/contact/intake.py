"""The contact-form service: intake, scoring, storage, triage, the response, erasure.

Intake, for each submission: validate → refuse floods (429 beyond the hard
per-IP limit) → observe behaviour (honeypot, form-token timing, recent counts
per keyed hash of IP, email and content) → ask every registered spam
classifier → store (email and phone encrypted, keyed hashes for lookups;
attachments in their own bounded table) → publish a ``contact_form`` event
unless it is spam. Spam is kept (status SPAM) so an admin can rescue it.

Rows are ReplacingMergeTree versions: every change inserts the whole row
again with a new version; reads use FINAL.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import orjson

from collector.contact.config import ContactConfig
from collector.contact.spam import (
    ClassifierContext,
    Observations,
    RecentActivity,
    SpamRules,
    Verdict,
    content_fingerprint,
    decide,
    issue_form_token,
    read_form_token,
)
from collector.contact.submission import (
    AttachmentMeta,
    ContactInput,
    attachment_meta,
    normalise_email_address,
    validate,
)
from collector.contact.triage import (
    NEW,
    RESPONDED,
    SPAM,
    STATUSES,
    ContactPatch,
    check_respondable,
    plan_change,
)
from collector.events import CONTACT_FORM, EventBus
from collector.pii import PiiCipher
from collector.storage import Storage, new_version
from plugins.types import SpamSignal

log = logging.getLogger("logferry.collector.contact")

MAX_LIST_LIMIT = 200
# Rows read back to rebuild the rate and repeat counters after a restart.
WARM_UP_ROWS = 50_000


class RateLimited(Exception):
    """Too many submissions from one IP: answer 429 and store nothing."""

    def __init__(self, retry_after: float):
        super().__init__("too many submissions; try again later")
        self.retry_after = retry_after


class NotFound(LookupError):
    pass


class EmailUnavailable(RuntimeError):
    """The collector runs without the email service."""


class RequestMeta(msgspec.Struct, kw_only=True):
    """What the HTTP layer knows about the request besides the fields."""

    ip_address: str = ""
    user_agent: str = ""
    referrer: str | None = None


class Accepted(msgspec.Struct, kw_only=True):
    """The intake's answer. ``status`` and ``verdict`` are for the caller's logs and
    tests; the HTTP answer must not reveal them (bots learn nothing)."""

    id: str
    status: str
    verdict: Verdict


class ContactQuery(msgspec.Struct, kw_only=True):
    statuses: list[str] = []
    # An assignee, or "" for unassigned ones.
    assigned_to: str | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    q: str | None = None
    email: str | None = None
    phone: str | None = None
    limit: int = 50
    cursor: str | None = None


class RespondRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/contact/{id}/respond``: bodies or a template, like ``POST /v1/emails``."""

    subject: str | None = None
    text_body: str | None = None
    html_body: str | None = None
    template_id: str | None = None
    template_data: dict[str, Any] | None = None
    # Close the submission once the response is sent.
    close: bool = False


def _ms(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return str(value)


def _encode_cursor(submitted_at: dt.datetime, sid: str) -> str:
    raw = orjson.dumps([_ms(submitted_at), sid])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        at, sid = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        uuid.UUID(sid)
        dt.datetime.strptime(at, "%Y-%m-%d %H:%M:%S.%f")
        return at, sid
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise ValueError("cursor: not a cursor this API returned") from None


class ContactService:
    """Everything the contact routes (and the erasure endpoint) do, on storage."""

    def __init__(self, storage: Storage, config: ContactConfig, *, secret_key: str, events: EventBus,
                 classifiers: Sequence[tuple[str, Any]] = (), app: Any = None, http: Any = None,
                 email: Callable[[], Any] | None = None, public_url: str = "",
                 clock: Callable[[], float] = time.time,
                 metrics: Any = None):
        self.storage = storage
        self.config = config
        self.cipher = PiiCipher(secret_key)
        self._form_key = hmac.new(secret_key.encode(), b"logferry-contact-form-token", hashlib.sha256).digest()
        self.events = events
        # Looked up when needed: the email service starts after this one.
        self._email = email
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self.metrics = metrics
        spam = config.spam
        self.rules = SpamRules.from_config(config)
        disabled = set(spam.disabled_classifiers)
        self.classifiers = [(name, obj) for name, obj in classifiers if name not in disabled]
        self.context = ClassifierContext(rules=self.rules, app=app, http=http)
        window = config.rate_limits.window
        bound = config.rate_limits.hard_per_ip + 1
        self.by_ip = RecentActivity(window, clock=clock, max_per_key=bound)
        self.by_email = RecentActivity(window, clock=clock, max_per_key=bound)
        self.by_content = RecentActivity(spam.duplicate_window, clock=clock, max_per_key=bound)
        self.by_token = RecentActivity(spam.form_token_max_age, clock=clock, max_per_key=bound)
        self._locks: dict[str, asyncio.Lock] = {}

    def set_clock(self, clock: Callable[[], float]) -> None:
        """Use another clock from now on (tests inject a controllable one)."""
        self.clock = clock
        for activity in (self.by_ip, self.by_email, self.by_content, self.by_token):
            activity.set_clock(clock)

    # --- helpers ---------------------------------------------------------------------

    def _count(self, name: str, value: float = 1.0) -> None:
        if self.metrics is not None:
            self.metrics.inc(f"logferry_contact_{name}", value)

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    def ip_key(self, ip: str) -> str:
        return self.cipher.lookup_hash("ip:" + ip)

    def form_token(self) -> str:
        """A fresh signed timestamp for a served form."""
        return issue_form_token(self._form_key, self.clock())

    @asynccontextmanager
    async def _locked(self, sid: str) -> Any:
        lock = self._locks.setdefault(sid, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._locks.get(sid) is lock:
                del self._locks[sid]

    # --- intake ----------------------------------------------------------------------

    def check_flood(self, ip: str) -> None:
        """Raise RateLimited when this IP is beyond the hard limit (call before
        reading a large body, and again in :meth:`submit`)."""
        limits = self.config.rate_limits
        if ip and self.by_ip.count(self.ip_key(ip)) >= limits.hard_per_ip:
            self._count("rate_limited_total")
            raise RateLimited(self.by_ip.retry_after(self.ip_key(ip)))

    async def submit(self, data: ContactInput, meta: RequestMeta) -> Accepted:
        """Validate, score, store and (unless spam) publish one submission.

        Raises ``InvalidSubmission`` (naming the field) and :class:`RateLimited`.
        """
        clean = validate(data, self.config)
        self.check_flood(meta.ip_address)
        now = self.clock()
        email_hash = self.cipher.email_hash(clean.email)
        fingerprint = content_fingerprint(clean.message)
        duplicates = self.by_content.count(fingerprint)
        token_key = hashlib.sha256(clean.form_token.encode()).hexdigest() if clean.form_token else None
        observations = Observations(
            token_reuses=self.by_token.count(token_key) if token_key else 0,
            honeypot_filled=bool(clean.honeypot),
            form=read_form_token(self._form_key, clean.form_token, now, self.config.spam.form_token_max_age),
            ip_count=self.by_ip.record(self.ip_key(meta.ip_address)) if meta.ip_address else 1,
            email_count=self.by_email.record(email_hash),
            duplicates=duplicates,
        )
        self.by_content.record(fingerprint)
        if token_key:
            self.by_token.record(token_key)
        metas = attachment_meta(clean.attachments)
        referrer = clean.referrer or meta.referrer
        candidate = {
            "name": clean.name, "email": clean.email, "phone": clean.phone, "subject": clean.subject,
            "message": clean.message, "attachments": [msgspec.to_builtins(m) for m in metas],
            "ip_address": meta.ip_address, "user_agent": meta.user_agent, "referrer": referrer,
            "observations": observations,
        }
        verdict = await self.classify(candidate)
        status = SPAM if verdict.is_spam else NEW
        sid = str(uuid.uuid4())
        submitted_at = self._now()
        if clean.attachments:
            retention_days = max(1, int(self.config.attachments.retention // 86400))
            await self.storage.insert_rows("contact_attachments", [
                {"submission_id": sid, "idx": m.idx, "filename": m.filename, "content_type": m.content_type,
                 "size": m.size, "sha256": m.sha256, "data": base64.b64encode(u.content).decode("ascii"),
                 "stored_at": _ms(submitted_at), "retention_days": retention_days}
                for m, u in zip(metas, clean.attachments, strict=True)
            ])
        row = {
            "id": sid, "name": clean.name, "email": self.cipher.encrypt(clean.email), "email_hash": email_hash,
            "phone": self.cipher.encrypt(clean.phone) if clean.phone else None,
            "phone_hash": self.cipher.phone_hash(clean.phone) if clean.phone else None,
            "subject": clean.subject, "message": clean.message,
            "attachments": orjson.dumps([msgspec.to_builtins(m) for m in metas]).decode(),
            "ip_address": meta.ip_address, "user_agent": meta.user_agent, "referrer": referrer,
            "submitted_at": _ms(submitted_at), "status": status, "assigned_to": None, "responded_at": None,
            "response_email_id": None, "spam_score": verdict.score,
            "spam_signals": orjson.dumps([msgspec.to_builtins(s) for s in verdict.signals]).decode(),
            "version": new_version(),
        }
        await self.storage.insert_rows("contact_submissions", [row])
        self._count("submissions_total")
        if verdict.is_spam:
            self._count("spam_total")
            log.info("contact submission stored as spam",
                     extra={"submission_id": sid, "score": verdict.score,
                            "signals": [s.name for s in verdict.signals]})
        else:
            self.events.publish(CONTACT_FORM, [self._event(row, clean.email, clean.phone)])
        return Accepted(id=sid, status=status, verdict=verdict)

    async def classify(self, submission: Mapping[str, Any]) -> Verdict:
        """Every classifier's signals, summed. A classifier that fails or is too
        slow is skipped (and logged): a spam service outage must not stop intake."""
        timeout = self.config.spam.classifier_timeout

        async def run(name: str, classifier: Any) -> list[SpamSignal]:
            try:
                found = await asyncio.wait_for(classifier.classify(submission, self.context), timeout)
            except Exception:
                self._count("classifier_failures_total")
                log.warning("spam classifier %r failed; its verdict is skipped", name, exc_info=True)
                return []
            out = []
            for signal in found or ():
                if isinstance(signal, SpamSignal):
                    out.append(signal)
                elif isinstance(signal, Mapping):
                    out.append(msgspec.convert(signal, SpamSignal))
            return out

        results = await asyncio.gather(*(run(name, c) for name, c in self.classifiers))
        return decide([s for found in results for s in found], self.config.spam.threshold)

    def _event(self, row: Mapping[str, Any], email: str, phone: str | None, *, rescued: bool = False
               ) -> dict[str, Any]:
        """The ``contact_form`` event: the submission with the email in the clear,
        so a pipeline's acknowledgement step can send to it."""
        attachments = row["attachments"]
        return {
            "id": str(row["id"]), "name": row["name"], "email": email, "phone": phone,
            "subject": row["subject"], "message": row["message"],
            "attachments": orjson.loads(attachments) if isinstance(attachments, str) else attachments,
            "submitted_at": _iso(row["submitted_at"]) if not isinstance(row["submitted_at"], str)
            else row["submitted_at"].replace(" ", "T") + "Z",
            "status": row["status"], "spam_score": row["spam_score"], "ip_address": row["ip_address"],
            "user_agent": row["user_agent"], "referrer": row["referrer"],
            "admins": list(self.config.admin_recipients), "rescued": rescued,
            "admin_url": f"{self.public_url}/v1/contact/{row['id']}",
        }

    # --- reading ---------------------------------------------------------------------

    async def _row(self, sid: str) -> dict[str, Any]:
        try:
            uuid.UUID(sid)
        except ValueError:
            raise NotFound(sid) from None
        rows = await self.storage.query(
            "SELECT * FROM contact_submissions FINAL WHERE id = {id:UUID}", {"id": sid})
        if not rows:
            raise NotFound(sid)
        return rows[0]

    def _decrypt(self, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return self.cipher.decrypt(value)
        except Exception:
            return None

    def public(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A stored row as the admin API shows it (the spec's field names, PII decrypted)."""
        sid = str(row["id"])
        attachments = orjson.loads(row["attachments"] or "[]")
        for a in attachments:
            a["url"] = f"/v1/contact/{sid}/attachments/{a['idx']}"
        return {
            "id": sid, "name": row["name"], "email": self._decrypt(row["email"]),
            "phone": self._decrypt(row["phone"]), "subject": row["subject"], "message": row["message"],
            "attachments": attachments or None, "ip_address": row["ip_address"], "user_agent": row["user_agent"],
            "referrer": row["referrer"], "submitted_at": _iso(row["submitted_at"]), "status": row["status"],
            "assigned_to": row["assigned_to"], "responded_at": _iso(row["responded_at"]),
            "response_email_id": row["response_email_id"], "spam_score": round(float(row["spam_score"]), 2),
            "spam_signals": orjson.loads(row["spam_signals"] or "[]"),
        }

    async def get(self, sid: str) -> dict[str, Any]:
        return self.public(await self._row(sid))

    async def attachment(self, sid: str, idx: int) -> tuple[AttachmentMeta, bytes]:
        await self._row(sid)
        rows = await self.storage.query(
            "SELECT filename, content_type, size, sha256, data FROM contact_attachments "
            "WHERE submission_id = {sid:String} AND idx = {idx:UInt8} LIMIT 1", {"sid": sid, "idx": idx})
        if not rows:
            raise NotFound(f"{sid}/{idx}")
        r = rows[0]
        meta = AttachmentMeta(idx=idx, filename=r["filename"], size=r["size"], content_type=r["content_type"],
                              sha256=r["sha256"])
        return meta, base64.b64decode(r["data"])

    async def list(self, query: ContactQuery) -> dict[str, Any]:
        where = ["1"]
        params: dict[str, Any] = {}
        if query.statuses:
            bad = [s for s in query.statuses if s not in STATUSES]
            if bad:
                raise ValueError(f"status: {', '.join(bad)} is not one of {', '.join(STATUSES)}")
            where.append("toString(status) IN {statuses:Array(String)}")
            params["statuses"] = query.statuses
        if query.assigned_to is not None:
            if query.assigned_to == "":
                where.append("assigned_to IS NULL")
            else:
                where.append("assigned_to = {assignee:String}")
                params["assignee"] = query.assigned_to
        if query.start is not None:
            where.append("submitted_at >= {start:DateTime64(3)}")
            params["start"] = _ms(query.start)
        if query.end is not None:
            where.append("submitted_at < {end:DateTime64(3)}")
            params["end"] = _ms(query.end)
        if query.email:
            where.append("email_hash = {email_hash:String}")
            params["email_hash"] = self.cipher.email_hash(query.email)
        if query.phone:
            # Phones are encrypted too: found through their keyed hash (of the digits).
            where.append("phone_hash = {phone_hash:String}")
            params["phone_hash"] = self.cipher.phone_hash(query.phone)
        if query.q:
            q = query.q.strip()
            if len(q) > 200:
                raise ValueError("q: at most 200 characters")
            if "@" in q and " " not in q:
                # Addresses are encrypted: an address is found through its keyed hash.
                where.append("(email_hash = {q_hash:String} OR positionCaseInsensitiveUTF8("
                             "concat(name, ' ', subject, ' ', message), {q:String}) > 0)")
                params["q_hash"] = self.cipher.email_hash(q)
            else:
                where.append("positionCaseInsensitiveUTF8(concat(name, ' ', subject, ' ', message), {q:String}) > 0")
            params["q"] = q
        if query.cursor:
            at, sid = _decode_cursor(query.cursor)
            where.append("(submitted_at, id) < ({c_at:DateTime64(3)}, {c_id:UUID})")
            params["c_at"] = at
            params["c_id"] = sid
        limit = max(1, min(query.limit, MAX_LIST_LIMIT))
        params["limit"] = limit + 1
        rows = await self.storage.query(
            f"SELECT * FROM contact_submissions FINAL WHERE {' AND '.join(where)} "
            "ORDER BY submitted_at DESC, id DESC LIMIT {limit:UInt32}", params)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1]["submitted_at"], str(rows[-1]["id"])) if more else None
        return {"submissions": [self.public(r) for r in rows], "next_cursor": next_cursor}

    # --- triage ----------------------------------------------------------------------

    async def _store(self, row: dict[str, Any]) -> None:
        out = dict(row)
        out["id"] = str(out["id"])
        for key in ("submitted_at", "responded_at"):
            if isinstance(out.get(key), dt.datetime):
                out[key] = _ms(out[key])
        out["version"] = new_version()
        await self.storage.insert_rows("contact_submissions", [out])

    async def update(self, sid: str, patch: ContactPatch) -> tuple[dict[str, Any], dict[str, Any]]:
        """Apply a PATCH; returns (before, after) in public form. Raises NotFound,
        ``triage.TransitionError`` or ValueError."""
        async with self._locked(sid):
            row = await self._row(sid)
            before = self.public(row)
            change = plan_change(row["status"], row["assigned_to"], patch)
            row["status"] = change.status
            row["assigned_to"] = change.assigned_to
            if change.status == RESPONDED and row["responded_at"] is None:
                row["responded_at"] = self._now()
            await self._store(row)
        if change.status != before["status"]:
            self._count(f"marked_{change.status.lower()}_total")
        if change.rescued and self.config.publish_on_rescue:
            self.events.publish(CONTACT_FORM, [self._event(row, before["email"] or "", before["phone"],
                                                           rescued=True)])
        return before, self.public(row)

    async def respond(self, sid: str, request: RespondRequest, *, actor: str,
                      idempotency_key: str | None = None) -> dict[str, Any]:
        """Send the response email through the email service and record it:
        response_email_id, responded_at, status RESPONDED.

        The same ``idempotency_key`` (default: a hash of the response's content)
        sends one email however often it is retried. Raises NotFound,
        ``TransitionError``, and the email service's PermanentError/TransientError.
        """
        from collector.email.message import SendEmail

        email = self._email() if self._email is not None else None
        if email is None:
            raise EmailUnavailable("the email service is not running")
        if not (request.text_body or request.html_body or request.template_id):
            raise ValueError("text_body, html_body or template_id is required")
        row = await self._row(sid)
        check_respondable(row["status"])
        address = self._decrypt(row["email"])
        if not address:
            raise ValueError("the submission has no readable email address")
        subject = request.subject
        if subject is None and not request.template_id:
            original = row["subject"] or "your message"
            subject = (original if original.lower().startswith("re:") else f"Re: {original}")[:200]
        content_key = hashlib.sha256(orjson.dumps(
            [subject, request.text_body, request.html_body, request.template_id, request.template_data],
            option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
        key = f"contact-response:{sid}:{idempotency_key or content_key}"
        send = SendEmail(to=[address], subject=subject, text_body=request.text_body, html_body=request.html_body,
                         template_id=request.template_id, template_data=request.template_data,
                         tags=["contact-response"],
                         headers={"X-Logferry-Contact-Id": sid})
        sent = await email.send(send, idempotency_key=key, wait=True)
        async with self._locked(sid):
            row = await self._row(sid)
            row["response_email_id"] = str(sent["id"])
            row["responded_at"] = self._now()
            if row["status"] != SPAM:
                row["status"] = "CLOSED" if request.close else RESPONDED
            if row["assigned_to"] is None:
                row["assigned_to"] = actor
            await self._store(row)
        self._count("responses_total")
        return {"submission": self.public(row), "email": sent}

    # --- erasure ---------------------------------------------------------------------

    async def erase_by_email(self, email: str) -> int:
        """Erase every submission from this address, with its attachments and
        its traces in the in-memory counters. Returns how many were erased."""
        try:
            address = normalise_email_address(email)
        except ValueError:
            address = email
        email_hash = self.cipher.email_hash(address)
        rows = await self.storage.query(
            "SELECT DISTINCT toString(id) AS id FROM contact_submissions WHERE email_hash = {h:String}",
            {"h": email_hash})
        ids = [r["id"] for r in rows]
        if ids:
            await self.storage.command(
                "DELETE FROM contact_attachments WHERE submission_id IN {ids:Array(String)}", {"ids": ids})
            await self.storage.command(
                "DELETE FROM contact_submissions WHERE email_hash = {h:String}", {"h": email_hash})
        self.by_email.forget(email_hash)
        self._count("erased_total", len(ids))
        return len(ids)

    # --- start-up ----------------------------------------------------------------------

    async def warm_up(self) -> int:
        """Rebuild the rate and repeat counters from the last window's rows, so a
        restart does not reset them. Returns the rows read."""
        limits = self.config.rate_limits
        horizon = max(limits.window, self.config.spam.duplicate_window)
        since = self._now() - dt.timedelta(seconds=horizon)
        rows = await self.storage.query(
            "SELECT ip_address, email_hash, message, submitted_at FROM contact_submissions FINAL "
            "WHERE submitted_at >= {since:DateTime64(3)} ORDER BY submitted_at LIMIT {n:UInt32}",
            {"since": _ms(since), "n": WARM_UP_ROWS})
        for r in rows:
            at = r["submitted_at"].replace(tzinfo=dt.UTC).timestamp()
            if r["ip_address"]:
                self.by_ip.record(self.ip_key(r["ip_address"]), at)
            self.by_email.record(r["email_hash"], at)
            self.by_content.record(content_fingerprint(r["message"]), at)
        return len(rows)
