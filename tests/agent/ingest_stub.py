"""A small local collector for agent tests: speaks ``POST /v1/ingest`` as the
real one does (msgpack, zstd/gzip, bearer token, 200 with accepted/rejected/
duplicate, 4xx/429/503 on demand) and remembers every stored record.

Used where a test needs to script the collector's answers (retries,
back-pressure, dead letters); end-to-end tests use the real collector.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from agent.parsers import SHIPPED_FORMATS, parse_shipped_lines
from agent.wire import MULTILINE_FEATURE, DecodedBatch, Lines, Record, decode_msgpack_batch, lines_feature


class IngestStub:
    """Run with ``start()`` (its own thread and loop); ``url`` once started."""

    def __init__(self, token: str = "test-token") -> None:
        self.token = token
        self.batches: dict[str, list[Record]] = {}
        self.rejections: dict[str, list[dict[str, Any]]] = {}  # batch id → its first answer's `rejected`
        self.posts = 0
        self.duplicates = 0
        # Called per request; return None to store, or (status, headers, body) to answer instead.
        self.responder: Callable[[int], tuple[int, dict[str, str], bytes] | None] | None = None
        self.reject: Callable[[Record], str | None] | None = None
        # A group of lines shipped as read refused whole, as the collector does
        # when it refuses the group's settings: every line rejected with the reason.
        self.refuse_group: Callable[[Lines], str | None] | None = None
        # Called per decoded batch: None to go on, or (status, headers, body) to answer instead.
        self.answer_batch: Callable[[DecodedBatch], tuple[int, dict[str, str], bytes] | None] | None = None
        self.delay = 0.0
        # Answers still to lose: the batch is stored, then the connection is
        # closed unanswered (a collector or network dying between the two).
        self.lose_answers = 0
        self.encodings: list[str] = []
        # As the real collector: parse lines shipped as read and say so. False
        # plays an older collector, which ignores them and does not say it.
        self.lines_feature = True
        self.lines_posts = 0  # requests that carried lines shipped as read
        self.redacted_with: list[str] = []  # each request's redaction fingerprint
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.lock = threading.Lock()

    @property
    def records(self) -> list[Record]:
        with self.lock:
            return [r for batch in self.batches.values() for r in batch]

    def messages(self) -> list[str]:
        return [r.message for r in self.records]

    async def _ingest(self, request: web.Request) -> web.Response:
        self.posts += 1
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": {"code": "unauthorized", "message": "bad token"}}, status=401)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.responder is not None:
            answer = self.responder(self.posts)
            if answer is not None:
                status, headers, body = answer
                return web.Response(status=status, headers=headers, body=body, content_type="application/json")
        # aiohttp decodes Content-Encoding (zstd, gzip) while reading.
        body = await request.read()
        self.encodings.append(request.headers.get("Content-Encoding", "identity"))
        batch = decode_msgpack_batch(body)
        if self.answer_batch is not None:
            scripted = self.answer_batch(batch)
            if scripted is not None:
                status, headers, data = scripted
                return web.Response(status=status, headers=headers, body=data, content_type="application/json")
        self.redacted_with.append(batch.redacted_with)
        features = sorted([*(lines_feature(fmt) for fmt in SHIPPED_FORMATS), MULTILINE_FEATURE]) \
            if self.lines_feature else []
        lines = 0
        if batch.lines:
            self.lines_posts += 1
        if batch.lines and self.lines_feature:
            index = batch.lines_index
            for group in batch.lines:
                refused = self.refuse_group(group) if self.refuse_group else None
                if refused:
                    count = group.data.count(b"\n")
                    batch.errors.extend((index + i, refused) for i in range(count))
                    index += count
                    lines += count
                    continue
                numbered, count, _ = parse_shipped_lines(group, batch.host)
                batch.records.extend((index + i, record) for i, record in numbered)
                index += count
                lines += count
        with self.lock:
            if batch.batch_id in self.batches:
                self.duplicates += 1
                # As the real collector: a resend learns what the first request rejected.
                return web.json_response({"accepted": 0, "rejected": self.rejections.get(batch.batch_id, []),
                                          "duplicate": True, "features": features})
            stored: list[Record] = []
            rejected: list[dict[str, Any]] = [{"index": i, "error": e} for i, e in batch.errors]
            for index, record in batch.records:
                reason = self.reject(record) if self.reject else None
                if reason:
                    rejected.append({"index": index, "error": reason})
                else:
                    stored.append(record)
            self.batches[batch.batch_id] = stored
            if rejected:
                self.rejections[batch.batch_id] = rejected
            lost = self.lose_answers > 0
            if lost:
                self.lose_answers -= 1
        if lost and request.transport is not None:
            request.transport.close()
            return web.Response(status=200)  # never reaches the closed connection
        answer: dict[str, Any] = {"accepted": len(stored), "rejected": rejected, "duplicate": False,
                                  "features": features}
        if lines:
            answer["lines"] = lines
        return web.json_response(answer)

    def start(self, port: int = 0, tls: ssl.SSLContext | None = None) -> IngestStub:
        """Serve on 127.0.0.1 (HTTPS with ``tls``, a server-side context)."""

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application(client_max_size=64 << 20)
            app.router.add_post("/v1/ingest", self._ingest)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=tls)
            loop.run_until_complete(site.start())
            sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
            scheme = "https" if tls is not None else "http"
            self.url = f"{scheme}://127.0.0.1:{sockets[0].getsockname()[1]}"
            self._ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None


def json_answer(status: int, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return status, headers or {}, msgspec.json.encode(payload)
