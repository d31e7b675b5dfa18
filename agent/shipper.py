"""HTTP delivery of encoded batches to the collector.

``POST {url}/v1/ingest`` with the batch as msgpack, compressed, over one
keep-alive session. :meth:`Shipper.deliver` retries until the collector
answers for good:

- ``200``: stored (``duplicate: true`` means an earlier attempt was stored);
  records the collector rejected one by one come back in ``rejected``.
- ``400``/``413``/``415``: retrying cannot help; the batch is dead-lettered
  with the collector's reason.
- anything else (network errors, timeouts, ``401``/``403`` while a token is
  being fixed, ``429``/``5xx``): exponential backoff with full jitter, capped
  at ``retry_max``, honouring ``Retry-After``; unlimited unless ``max_retries``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec

from agent.config import CollectorTarget

log = logging.getLogger("logferry.agent.shipper")

PERMANENT_STATUSES = frozenset({400, 413, 415})


class IngestResponse(msgspec.Struct):
    accepted: int = 0
    rejected: list[dict[str, Any]] = []
    duplicate: bool = False
    # What the collector can do (agent.wire.LINES_FEATURE), and how many shipped lines it read.
    features: list[str] = []
    lines: int = 0


class Delivery(msgspec.Struct):
    """How a batch ended: ``stored`` (with the collector's answer) or ``dead``
    (with the reason it was refused or given up on)."""

    stored: bool
    status: int | None
    response: IngestResponse | None = None
    reason: str = ""
    attempts: int = 1


class Stopped(Exception):
    """Delivery was abandoned because the agent is stopping; the batch stays spooled."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, initial: float, cap: float,
                  rng: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, initial * 2**attempt))."""
    return rng() * min(cap, initial * (2 ** min(attempt, 30)))


_response_decoder = msgspec.json.Decoder(IngestResponse)


class Shipper:
    """Sends batches; one instance per agent, sharing one HTTP session."""

    def __init__(self, cfg: CollectorTarget, on_retry: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.url = cfg.url.rstrip("/") + "/v1/ingest"
        self._session: aiohttp.ClientSession | None = None
        self._on_retry = on_retry
        self._stopping = asyncio.Event()
        self.last_error: str | None = None

    async def __aenter__(self) -> Shipper:
        connector = aiohttp.TCPConnector(limit=self.cfg.max_in_flight, ssl=bool(self.cfg.verify_tls))
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            headers={"User-Agent": "logferry-agent/0.1"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def stop(self) -> None:
        """Abandon retries (the batches stay spooled for the next run)."""
        self._stopping.set()

    def update(self, cfg: CollectorTarget) -> None:
        """Take a new token or URL (SIGHUP); the session is kept."""
        self.cfg = cfg
        self.url = cfg.url.rstrip("/") + "/v1/ingest"

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise Stopped

    async def deliver(self, body: bytes, content_encoding: str) -> Delivery:
        """Send one encoded batch until it is stored or refused for good.
        Raises :class:`Stopped` when :meth:`stop` is called meanwhile."""
        assert self._session is not None, "use `async with Shipper(...)`"
        attempt = 0
        while True:
            if self._stopping.is_set():
                raise Stopped
            headers = {
                "Authorization": f"Bearer {self.cfg.token}",
                "Content-Type": "application/msgpack",
            }
            if content_encoding != "identity":
                headers["Content-Encoding"] = content_encoding
            retry_after: float | None = None
            try:
                async with self._session.post(self.url, data=body, headers=headers) as resp:
                    status = resp.status
                    text = await resp.read()
                    if status == 200:
                        try:
                            answer = _response_decoder.decode(text)
                        except msgspec.DecodeError:
                            answer = IngestResponse()
                        self.last_error = None
                        return Delivery(True, status, answer, attempts=attempt + 1)
                    reason = _error_message(text) or resp.reason or ""
                    if status in PERMANENT_STATUSES:
                        return Delivery(False, status, reason=f"HTTP {status}: {reason}",
                                        attempts=attempt + 1)
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    problem = f"HTTP {status}: {reason}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            attempt += 1
            if self.cfg.max_retries and attempt > self.cfg.max_retries:
                return Delivery(False, None, reason=f"gave up after {attempt} attempts; last: {problem}",
                                attempts=attempt)
            if problem != self.last_error:
                log.warning("collector %s: %s; retrying", self.url, problem)
            self.last_error = problem
            if self._on_retry is not None:
                self._on_retry(problem)
            delay = backoff_delay(attempt - 1, self.cfg.retry_initial, self.cfg.retry_max)
            if retry_after is not None:
                delay = max(retry_after, delay if retry_after == 0 else 0.0)
                delay = min(delay, max(self.cfg.retry_max, 1.0) * 10)
            await self._sleep(delay)


def _error_message(body: bytes) -> str:
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body[:500].decode("utf-8", "replace").strip()
    if isinstance(value, dict):
        error = value.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error.get("code") or value)
        if error:
            return str(error)
    return str(value)[:500]
