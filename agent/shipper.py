"""HTTP delivery of encoded batches to the collector.

``POST {url}/v1/ingest`` with the batch as msgpack, compressed, over
keep-alive connections (the standard library's ``http.client``, one per batch
in flight, each used from a worker thread: the agent imports no HTTP
framework, which spares it ~0.1 s of start-up and a few MiB). :meth:`Shipper.deliver` retries until the collector
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
import http.client
import logging
import queue
import random
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

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


class _Answer(msgspec.Struct):
    status: int
    reason: str
    retry_after: str | None
    body: bytes


# A kept-alive connection the collector closed meanwhile fails on first use:
# the request is sent again at once on a new connection (ingest is idempotent).
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, http.client.BadStatusLine)


class Shipper:
    """Sends batches; one instance per agent, sharing a pool of connections."""

    def __init__(self, cfg: CollectorTarget, on_retry: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self._on_retry = on_retry
        self._stopping = asyncio.Event()
        self.last_error: str | None = None
        self._idle: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()
        self._closed = False  # past __aexit__: a request still running closes its connection
        self._tls: ssl.SSLContext | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None]] | None = None
        self._workers = 0
        self._busy = 0
        self._target(cfg)

    def _target(self, cfg: CollectorTarget) -> None:
        self.url = cfg.url.rstrip("/") + "/v1/ingest"
        parts = urllib.parse.urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port
        self._path = parts.path
        # Which collector pooled connections lead to (with the TLS settings).
        self._key = (self.url, cfg.verify_tls, cfg.ca_file)

    async def __aenter__(self) -> Shipper:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closed = True
        self._close_idle()

    def _close_idle(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def stop(self) -> None:
        """Abandon retries (the batches stay spooled for the next run)."""
        self._stopping.set()

    def update(self, cfg: CollectorTarget) -> None:
        """Take a new token or URL (SIGHUP); connections to another URL are dropped."""
        before = self._key
        self.cfg = cfg
        self._target(cfg)
        if self._key != before:
            self._tls = None
            self._close_idle()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive connection (True) or a new one (False)."""
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            pass
        if self._https:
            if self._tls is None:
                self._tls = ssl.create_default_context(cafile=self.cfg.ca_file or None)
                if not self.cfg.verify_tls:
                    self._tls.check_hostname = False
                    self._tls.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.cfg.timeout,
                                               context=self._tls), False
        return http.client.HTTPConnection(self._host, self._port, timeout=self.cfg.timeout), False

    def _post(self, body: bytes, headers: dict[str, str]) -> _Answer:
        """One POST (blocking: runs in a worker thread)."""
        target = self._key
        while True:
            conn, reused = self._connection()
            try:
                conn.request("POST", self._path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except _STALE:
                conn.close()
                if reused:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            if resp.will_close or target != self._key or self._closed:
                # Closed by the collector, for a URL changed meanwhile
                # (SIGHUP), or for a shipper closed while this ran.
                conn.close()
            else:
                self._idle.put(conn)
                if self._closed:  # closed between the check and the put
                    self._close_idle()
            return _Answer(resp.status, resp.reason or "", resp.getheader("Retry-After"), data)

    async def _in_thread(self, body: bytes, headers: dict[str, str]) -> _Answer:
        """:meth:`_post` on a daemon worker thread: a request stuck on a
        collector that does not answer never holds up the agent's exit."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Answer] = loop.create_future()

        def settle(result: _Answer | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def work() -> None:
            try:
                result = self._post(body, headers)
            except BaseException as exc:  # handed to the awaiting task
                loop.call_soon_threadsafe(settle, None, exc)
            else:
                loop.call_soon_threadsafe(settle, result, None)

        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
        self._jobs.put(work)
        if self._workers < self._busy + 1 and self._workers < self.cfg.max_in_flight + 1:
            self._workers += 1
            threading.Thread(target=self._work, name="ship", daemon=True).start()
        self._busy += 1
        try:
            return await future
        finally:
            self._busy -= 1

    def _work(self) -> None:
        jobs = self._jobs
        assert jobs is not None
        while True:
            jobs.get()()

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):  # not wait_for: no inner task to outlive a cancel
                await self._stopping.wait()
        except TimeoutError:
            return
        raise Stopped

    async def deliver(self, body: bytes, content_encoding: str) -> Delivery:
        """Send one encoded batch until it is stored or refused for good.
        Raises :class:`Stopped` when :meth:`stop` is called meanwhile."""
        attempt = 0
        while True:
            if self._stopping.is_set():
                raise Stopped
            headers = {
                "Authorization": f"Bearer {self.cfg.token}",
                "Content-Type": "application/msgpack",
                "User-Agent": "logferry-agent/0.1",
            }
            if content_encoding != "identity":
                headers["Content-Encoding"] = content_encoding
            retry_after: float | None = None
            try:
                answer = await self._in_thread(body, headers)
            except (http.client.HTTPException, OSError, TimeoutError, ssl.SSLError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                status = answer.status
                if status == 200:
                    try:
                        response = _response_decoder.decode(answer.body)
                    except msgspec.DecodeError:
                        response = IngestResponse()
                    self.last_error = None
                    return Delivery(True, status, response, attempts=attempt + 1)
                reason = _error_message(answer.body) or answer.reason
                if status in PERMANENT_STATUSES:
                    return Delivery(False, status, reason=f"HTTP {status}: {reason}", attempts=attempt + 1)
                retry_after = parse_retry_after(answer.retry_after)
                problem = f"HTTP {status}: {reason}"
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
