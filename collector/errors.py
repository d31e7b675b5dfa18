"""JSON errors (api.md: ``{"error": {"code", "message"}}``) and the middleware
that turns every failure into one: no stack traces reach a client."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from collector.auth import AuthError
from collector.journal import JournalFull

log = logging.getLogger("logferry.collector.http")


class ApiError(Exception):
    """Raise from a handler to answer with a JSON error."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def json_error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "body_too_large", 415: "unsupported_media_type",
               429: "too_many_requests"}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return json_error(exc.status, exc.code, exc.message, exc.headers)
    except AuthError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return json_error(exc.status, "unauthorized" if exc.status == 401 else "forbidden", str(exc), headers)
    except JournalFull as exc:
        log.warning("write refused: the journal is full", extra={"path": request.path, "error": str(exc)})
        return json_error(503, "storage_backlog", "storage is not keeping up; retry shortly", {"Retry-After": "5"})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "error")
        return json_error(exc.status, code, exc.reason, {k: v for k, v in exc.headers.items()
                                                          if k in ("Allow", "Retry-After")})
    except Exception:
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        return json_error(500, "internal_error", "internal error; the collector's log has the details")
