"""HTTP for contact forms: the public intake and hosted page, and the admin API.

Public: ``POST /v1/contact`` (JSON, urlencoded or multipart with files),
``GET /contact`` (a plain HTML form, no JavaScript), ``GET /contact/thanks``,
``GET /v1/contact/form-token`` (for forms built elsewhere), with CORS for the
configured origins. Every intake outcome (stored, spam, honeypot) answers the
same way, so a bot learns nothing from the answer.

Admin (admin tokens only): ``GET /v1/contact``, ``GET/PATCH /v1/contact/{id}``,
``POST /v1/contact/{id}/respond``, ``GET /v1/contact/{id}/attachments/{idx}``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
import orjson
from aiohttp import BodyPartReader, web
from jinja2 import Environment, PackageLoader, select_autoescape

from collector import appkeys
from collector.audit import record_audit
from collector.auth import client_ip, principal_of, requires
from collector.contact.config import ContactConfig
from collector.contact.intake import (
    ContactQuery,
    ContactService,
    EmailUnavailable,
    NotFound,
    RateLimited,
    RequestMeta,
    RespondRequest,
)
from collector.contact.submission import (
    MAX_USER_AGENT,
    AttachmentUpload,
    ContactInput,
    InvalidSubmission,
)
from collector.contact.triage import ContactPatch, TransitionError
from collector.errors import ApiError
from plugins.types import PermanentError, TransientError

FIELDS = ("name", "email", "phone", "subject", "message")
FILE_FIELDS = ("attachments", "attachment", "file", "files")
TOKEN_FIELD = "_form_token"
REFERRER_FIELD = "_referrer"
NEXT_FIELD = "_next"
CHUNK = 64 * 1024

_templates = Environment(loader=PackageLoader("collector.contact", "templates"),
                         autoescape=select_autoescape(["html"]), auto_reload=False)
_patch_decoder = msgspec.json.Decoder(ContactPatch)
_respond_decoder = msgspec.json.Decoder(RespondRequest)


def _service(request: web.Request) -> ContactService:
    return request.app[appkeys.CONTACT]


def _config(request: web.Request) -> ContactConfig:
    return request.app[appkeys.CONFIG].contact


def body_cap(config: ContactConfig) -> int:
    """The largest intake body: the message, the other fields, the files (as
    base64 in JSON) and multipart framing."""
    files = config.attachments.max_total if config.attachments.max_count else 0
    return int(config.max_message * 4 + files * 4 // 3 + 64 * 1024)


# --- CORS -----------------------------------------------------------------------------


def cors_headers(request: web.Request, *, preflight: bool = False) -> dict[str, str]:
    origins = _config(request).cors_origins
    origin = request.headers.get("Origin")
    if not origin or not origins:
        return {}
    if "*" in origins:
        allow = "*"
    elif origin in origins:
        allow = origin
    else:
        return {}
    headers = {"Access-Control-Allow-Origin": allow, "Vary": "Origin"}
    if preflight:
        headers["Access-Control-Allow-Methods"] = "POST, GET, OPTIONS"
        headers["Access-Control-Allow-Headers"] = "Content-Type, Accept"
        headers["Access-Control-Max-Age"] = "86400"
    return headers


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=cors_headers(request, preflight=True))


def with_cors(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Add the CORS headers to the answer, errors included (a browser hides an
    error without them from the embedding page's script)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        headers = cors_headers(request)
        try:
            response = await handler(request)
        except ApiError as exc:
            exc.headers.update(headers)
            raise
        response.headers.update(headers)
        return response

    wrapped.__name__ = handler.__name__
    return wrapped


# --- reading intake bodies ---------------------------------------------------------------


def _too_large(cap: int) -> InvalidSubmission:
    return InvalidSubmission("body", f"the request body may be at most {cap} bytes", status=413)


async def _read_capped(request: web.Request, cap: int) -> bytes:
    chunks = []
    total = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        total += len(chunk)
        if total > cap:
            raise _too_large(cap)
        chunks.append(chunk)
    return b"".join(chunks)


def _text_fields(values: Mapping[str, Any], honeypot: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in (*FIELDS, honeypot, TOKEN_FIELD, REFERRER_FIELD, NEXT_FIELD):
        value = values.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidSubmission(field, "must be a string")
        out[field] = value
    return out


def _to_input(fields: Mapping[str, str], files: list[AttachmentUpload], honeypot: str) -> ContactInput:
    return ContactInput(
        name=fields.get("name", ""), email=fields.get("email", ""), phone=fields.get("phone") or None,
        subject=fields.get("subject", ""), message=fields.get("message", ""), attachments=files,
        honeypot=fields.get(honeypot, ""), form_token=fields.get(TOKEN_FIELD),
        referrer=fields.get(REFERRER_FIELD),
    )


async def read_submission(request: web.Request, config: ContactConfig) -> tuple[ContactInput, dict[str, str]]:
    """The submission of a JSON, urlencoded or multipart body, and its raw text
    fields (to re-fill the hosted form). Raises InvalidSubmission."""
    cap = body_cap(config)
    if request.content_length is not None and request.content_length > cap:
        raise _too_large(cap)
    ctype = request.content_type
    honeypot = config.honeypot_field
    limits = config.attachments
    if ctype == "application/json":
        try:
            data = orjson.loads(await _read_capped(request, cap))
        except orjson.JSONDecodeError:
            raise InvalidSubmission("body", "not valid JSON") from None
        if not isinstance(data, dict):
            raise InvalidSubmission("body", "must be a JSON object")
        fields = _text_fields(data, honeypot)
        raw_files = data.get("attachments") or []
        if not isinstance(raw_files, list):
            raise InvalidSubmission("attachments", "must be a list of {filename, content_type, content (base64)}")
        if len(raw_files) > limits.max_count:
            raise InvalidSubmission("attachments", f"at most {limits.max_count} files (got {len(raw_files)})",
                                    status=413)
        files = []
        for i, item in enumerate(raw_files):
            if not isinstance(item, dict) or not isinstance(item.get("content"), str):
                raise InvalidSubmission(f"attachments[{i}]", "must be {filename, content_type, content (base64)}")
            try:
                content = base64.b64decode(item["content"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidSubmission(f"attachments[{i}].content", "not valid base64") from None
            files.append(AttachmentUpload(filename=str(item.get("filename") or ""),
                                          content_type=str(item.get("content_type") or ""), content=content))
        return _to_input(fields, files, honeypot), fields
    if ctype == "application/x-www-form-urlencoded":
        raw = await _read_capped(request, cap)
        try:
            pairs = urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise InvalidSubmission("body", "not UTF-8") from None
        fields = _text_fields(dict(pairs), honeypot)
        return _to_input(fields, [], honeypot), fields
    if ctype == "multipart/form-data":
        return await _read_multipart(request, config, cap)
    raise InvalidSubmission("Content-Type", "use application/json, application/x-www-form-urlencoded or "
                                            "multipart/form-data", status=415)


async def _read_part(part: BodyPartReader, limit: int, error: InvalidSubmission) -> bytes:
    buf = bytearray()
    while True:
        chunk = await part.read_chunk(CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise error


async def _read_multipart(request: web.Request, config: ContactConfig, cap: int
                          ) -> tuple[ContactInput, dict[str, str]]:
    limits = config.attachments
    honeypot = config.honeypot_field
    text_limit = int(config.max_message) * 4 + 1024
    fields: dict[str, str] = {}
    files: list[AttachmentUpload] = []
    total = 0
    # Every part counts against the body cap, known fields or not (a chunked
    # body has no Content-Length to refuse up front).
    read = 0
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError):
        raise InvalidSubmission("body", "not a valid multipart body") from None
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise InvalidSubmission("body", "nested multipart bodies are not accepted")
        name = part.name or ""
        if part.filename is not None or name in FILE_FIELDS:
            if not part.filename:
                await part.release()  # an empty <input type=file> sends a nameless empty part
                continue
            if len(files) >= limits.max_count:
                raise InvalidSubmission("attachments", f"at most {limits.max_count} files", status=413)
            idx = len(files)
            content = await _read_part(part, int(limits.max_size), InvalidSubmission(
                f"attachments[{idx}]", f"{part.filename!r} exceeds {limits.max_size} bytes", status=413))
            if not content:
                continue
            read += len(content)
            total += len(content)
            if total > limits.max_total:
                raise InvalidSubmission("attachments", f"the files total more than {limits.max_total} bytes",
                                        status=413)
            files.append(AttachmentUpload(filename=part.filename,
                                          content_type=part.headers.get("Content-Type", ""), content=content))
            continue
        raw = await _read_part(part, text_limit, InvalidSubmission(
            name or "field", f"too long (the message may be at most {config.max_message} bytes)", status=413))
        read += len(raw)
        if read > cap:
            raise _too_large(cap)
        if name in (*FIELDS, honeypot, TOKEN_FIELD, REFERRER_FIELD, NEXT_FIELD):
            try:
                fields[name] = raw.decode(part.get_charset("utf-8"))
            except (UnicodeDecodeError, LookupError):
                raise InvalidSubmission(name, "not UTF-8 text") from None
    return _to_input(fields, files, honeypot), fields


# --- public handlers ------------------------------------------------------------------------


def wants_html(request: web.Request) -> bool:
    """A browser posting the hosted form (Accept: text/html…) gets pages; API
    clients (application/json, */*) get JSON."""
    accept = request.headers.get("Accept", "")
    return "text/html" in accept and "application/json" not in accept


def _safe_next(value: str | None, config: ContactConfig) -> str | None:
    """Where to send the browser after success: a local path, or a page on an
    origin allowed by CORS; never anywhere else (no open redirect)."""
    if not value:
        return None
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    parsed = urllib.parse.urlsplit(value)
    origin = f"{parsed.scheme}://{parsed.netloc}"
    if parsed.scheme in ("http", "https") and origin in config.cors_origins:
        return value
    return None


def render_form(request: web.Request, *, errors: list[str] | None = None,
                values: Mapping[str, str] | None = None, status: int = 200) -> web.Response:
    config = _config(request)
    service = _service(request)
    limits = config.attachments
    referrer = (values or {}).get(REFERRER_FIELD) or request.headers.get("Referer") or ""
    html = _templates.get_template("form.html").render(
        title=config.form_title, action="/v1/contact", form_token=service.form_token(),
        honeypot=config.honeypot_field, referrer=referrer[:2000], errors=errors or [],
        values={f: (values or {}).get(f, "") for f in FIELDS},
        next_url=(values or {}).get(NEXT_FIELD) or request.query.get("next", ""),
        max_message_kb=int(config.max_message) // 1024, max_files=limits.max_count,
        max_file_mb=round(limits.max_size / (1024 * 1024), 1), accept=",".join(limits.allowed_types),
    )
    # Sites allowed by CORS may also frame the page and be redirected to after posting.
    sites = " ".join(o for o in config.cors_origins if o != "*")
    others = f" {sites}" if sites else ""
    headers = {
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                   f"form-action 'self'{others}; frame-ancestors 'self'{others}",
    }
    if not sites:
        headers["X-Frame-Options"] = "SAMEORIGIN"
    return web.Response(text=html, content_type="text/html", status=status, headers=headers)


async def contact_page(request: web.Request) -> web.Response:
    return render_form(request)


async def thanks_page(request: web.Request) -> web.Response:
    config = _config(request)
    html = _templates.get_template("thanks.html").render(title=config.form_title, message=config.thank_you_message,
                                                         back="/contact")
    return web.Response(text=html, content_type="text/html")


@with_cors
async def form_token(request: web.Request) -> web.Response:
    """A signed timestamp for forms hosted elsewhere (fetch it when the form is shown)."""
    config = _config(request)
    return web.json_response({"form_token": _service(request).form_token(), "field": TOKEN_FIELD,
                              "honeypot_field": config.honeypot_field},
                             headers={"Cache-Control": "no-store"})


@with_cors
async def submit(request: web.Request) -> web.StreamResponse:
    config = _config(request)
    service = _service(request)
    html = wants_html(request)
    ip = client_ip(request, request.app[appkeys.TRUSTED_PROXIES]) or ""
    fields: dict[str, str] = {}
    try:
        service.check_flood(ip)
        data, fields = await read_submission(request, config)
        meta = RequestMeta(ip_address=ip, user_agent=request.headers.get("User-Agent", "")[:MAX_USER_AGENT],
                           referrer=(request.headers.get("Referer") or None))
        accepted = await service.submit(data, meta)
    except InvalidSubmission as exc:
        if html:
            return render_form(request, errors=[str(exc)], values=fields, status=exc.status)
        raise ApiError(exc.status, "invalid_submission", str(exc)) from None
    except RateLimited as exc:
        retry = str(int(exc.retry_after) + 1)
        if html:
            return web.Response(text="Too many messages from your network; please try again later.",
                                status=429, headers={"Retry-After": retry})
        raise ApiError(429, "too_many_requests", str(exc), {"Retry-After": retry}) from None
    # The same answer whatever the verdict: spam and honeypot hits look like success.
    if html:
        target = _safe_next(fields.get(NEXT_FIELD), config) or "/contact/thanks"
        return web.Response(status=303, headers={"Location": target})
    return web.json_response({"id": accepted.id, "received": True}, status=201)


# --- admin handlers ---------------------------------------------------------------------------


def _actor(request: web.Request) -> str:
    principal = principal_of(request)
    return principal.user_id or principal.name


def _parse_time(name: str, value: str) -> dt.datetime:
    try:
        if len(value) == 10:
            return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, "bad_request", f"{name}: expected RFC 3339 or YYYY-MM-DD, got {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@requires("admin")
async def list_submissions(request: web.Request) -> web.Response:
    q = request.query
    statuses = [s.strip().upper() for v in q.getall("status", []) for s in v.split(",") if s.strip()]
    try:
        limit = int(q.get("limit", "50"))
    except ValueError:
        raise ApiError(400, "bad_request", "limit: expected a number (1–200)") from None
    if not 1 <= limit <= 200:
        raise ApiError(400, "bad_request", "limit: between 1 and 200")
    assignee = q.get("assigned_to", q.get("assignee"))
    if assignee is not None and assignee.lower() in ("none", "null", ""):
        assignee = ""
    query = ContactQuery(
        statuses=statuses, assigned_to=assignee,
        start=_parse_time("start", q["start"]) if "start" in q else None,
        end=_parse_time("end", q["end"]) if "end" in q else None,
        q=q.get("q") or None, email=q.get("email") or None, phone=q.get("phone") or None, limit=limit,
        cursor=q.get("cursor") or None,
    )
    try:
        result = await _service(request).list(query)
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    return web.json_response(result)


@requires("admin")
async def get_submission(request: web.Request) -> web.Response:
    try:
        return web.json_response(await _service(request).get(request.match_info["id"]))
    except NotFound:
        raise ApiError(404, "not_found", "no such contact submission") from None


@requires("admin")
async def patch_submission(request: web.Request) -> web.Response:
    sid = request.match_info["id"]
    try:
        patch = _patch_decoder.decode(await request.read())
    except msgspec.ValidationError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    except msgspec.DecodeError:
        raise ApiError(400, "bad_request", "the body must be a JSON object") from None
    try:
        before, after = await _service(request).update(sid, patch)
    except NotFound:
        raise ApiError(404, "not_found", "no such contact submission") from None
    except TransitionError as exc:
        raise ApiError(409, "invalid_transition", str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    changes = {k: [before[k], after[k]] for k in ("status", "assigned_to") if before[k] != after[k]}
    if changes:
        await record_audit(request.app, actor=_actor(request), action="contact.update", target=sid,
                           details=changes, request=request)
    return web.json_response(after)


@requires("admin")
async def respond(request: web.Request) -> web.Response:
    sid = request.match_info["id"]
    try:
        body = _respond_decoder.decode(await request.read())
    except msgspec.ValidationError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    except msgspec.DecodeError:
        raise ApiError(400, "bad_request", "the body must be a JSON object") from None
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 0 < len(key) <= 200:
        raise ApiError(400, "bad_request", "Idempotency-Key: 1–200 characters")
    try:
        result = await _service(request).respond(sid, body, actor=_actor(request), idempotency_key=key)
    except NotFound:
        raise ApiError(404, "not_found", "no such contact submission") from None
    except TransitionError as exc:
        raise ApiError(409, "invalid_transition", str(exc)) from None
    except EmailUnavailable as exc:
        raise ApiError(503, "email_unavailable", str(exc)) from None
    except TransientError as exc:
        headers = {"Retry-After": str(int(exc.retry_after or 30))}
        raise ApiError(503, "email_delayed", f"the response could not be sent yet ({exc}); retry with the same "
                                             "Idempotency-Key", headers) from None
    except PermanentError as exc:
        raise ApiError(422, "email_failed", f"the response email was refused: {exc}") from None
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    await record_audit(request.app, actor=_actor(request), action="contact.respond", target=sid,
                       details={"email_id": result["email"]["id"]}, request=request)
    return web.json_response(result)


@requires("admin")
async def get_attachment(request: web.Request) -> web.Response:
    sid = request.match_info["id"]
    try:
        idx = int(request.match_info["idx"])
        meta, content = await _service(request).attachment(sid, idx)
    except (NotFound, ValueError):
        raise ApiError(404, "not_found", "no such attachment") from None
    quoted = urllib.parse.quote(meta.filename)
    return web.Response(body=content, content_type=meta.content_type, headers={
        # Always a download: an uploaded HTML or SVG must never render in the admin's origin.
        "Content-Disposition": f"attachment; filename*=UTF-8''{quoted}",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    })


def add_routes(app: web.Application, config: ContactConfig) -> None:
    r = app.router
    if config.enabled:
        r.add_post("/v1/contact", submit)
        r.add_get("/v1/contact/form-token", form_token)
        r.add_route("OPTIONS", "/v1/contact", preflight)
        r.add_route("OPTIONS", "/v1/contact/form-token", preflight)
        r.add_get("/contact", contact_page)
        r.add_get("/contact/thanks", thanks_page)
    r.add_get("/v1/contact", list_submissions)
    r.add_get("/v1/contact/{id}", get_submission)
    r.add_patch("/v1/contact/{id}", patch_submission)
    r.add_post("/v1/contact/{id}/respond", respond)
    r.add_get("/v1/contact/{id}/attachments/{idx}", get_attachment)
