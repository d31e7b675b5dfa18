"""Notifications: POST → channel send latency, sustained rate, preference lookups.

Runs the real collector app (chDB in a temporary folder, with its write-ahead
journal unless ``--journal off``) behind a real HTTP
server on 127.0.0.1, email through the EmailService's ``smtp`` provider to an
aiosmtpd server, and prints

- p50/p99 from ``POST /v1/notifications`` (INSTANT preference, in-app +
  email) to each channel's send returning: the in-app inbox entry, and the
  email accepted by the SMTP server (the spec: dispatch < 500 ms; our goal:
  p99 < 50 ms);
- notifications/s sustained with ``--concurrency`` clients posting at once,
  counted until every one of them is SENT on both channels;
- cached preference lookup latency (the spec: < 10 ms; our goal: < 0.1 ms).

    python bench/bench_notifications.py [--posts 200] [--burst 1000] [--concurrency 32] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from agent.configfile import convert
from collector import appkeys
from collector.app import create_app
from collector.auth import TokenService
from collector.config import CollectorConfig
from collector.schema import migrate
from collector.storage import Storage

SECRET = "bench-secret-key-0123456789abcdef0123456789"


class Sink:
    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received += 1
        return "250 OK"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    return f"p50 {pct(values, 0.5) * 1000:6.2f} ms   p99 {pct(values, 0.99) * 1000:6.2f} ms   " \
           f"max {max(values) * 1000:6.2f} ms  (n={len(values)})"


async def main(args: argparse.Namespace) -> None:
    sink = Sink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    with tempfile.TemporaryDirectory(prefix="logferry-bench-notifications-") as folder:
        storage = Storage(f"chdb://{folder}", "bench")
        migrate(storage)
        tokens = TokenService(storage, SECRET)
        _, service_token = tokens.create_sync(kind="service", name="bench", created_by="bench")
        _, user_token = tokens.create_sync(kind="user", name="bench-user", created_by="bench", user_id="bench-user")
        config = convert({
            "secret_key": SECRET,
            "storage": {"dsn": f"chdb://{folder}", "database": "bench", "journal": args.journal or f"{folder}/journal"},
            "email": {"providers": [{"type": "smtp", "host": "127.0.0.1", "port": port, "starttls": "off"}],
                      "concurrency": args.email_concurrency},
        }, CollectorConfig)
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(config, storage=storage)))
        await client.start_server()
        try:
            await run(client, args, sink, service_token, user_token)
        finally:
            await client.close()
            storage.close()
    controller.stop()


async def run(client: TestClient[Any, Any], args: argparse.Namespace, sink: Sink, service_token: str,
              user_token: str) -> None:
    svc = {"Authorization": f"Bearer {service_token}"}
    user = {"Authorization": f"Bearer {user_token}"}
    r = await client.put("/v1/users/bench-user", json={"email": "bench@example.com"}, headers=svc)
    assert r.status == 201, await r.text()
    r = await client.put("/v1/me/preferences/bench", headers=user,
                         json={"channels": {"email": True, "in_app": True}, "frequency": "INSTANT"})
    assert r.status == 200, await r.text()
    service = client.app[appkeys.NOTIFIER]
    sent_at: dict[tuple[str, str], float] = {}
    all_sent: dict[str, asyncio.Future[None]] = {}

    def observe(notification_id: str, channel: str) -> None:
        sent_at[(notification_id, channel)] = time.perf_counter()
        if (notification_id, "email") in sent_at and (notification_id, "in_app") in sent_at:
            waiter = all_sent.get(notification_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    service.send_observer = observe
    body = {"user_id": "bench-user", "type": "bench", "priority": "MEDIUM", "title": "Deploy finished",
            "message": "All checks passed.", "channels": ["email", "in_app"]}

    async def post() -> tuple[str, float]:
        started = time.perf_counter()
        resp = await client.post("/v1/notifications", json=body, headers=svc)
        data = await resp.json()
        assert resp.status == 201, data
        return data["id"], started

    # Warm up connections, templates and caches.
    for _ in range(10):
        await post()
    await service.drain()

    # 1. Latency, one at a time.
    email_lat: list[float] = []
    in_app_lat: list[float] = []
    ack_lat: list[float] = []
    for _ in range(args.posts):
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        resp = await client.post("/v1/notifications", json=body, headers=svc)
        acked = time.perf_counter()
        notification_id = (await resp.json())["id"]
        waiter = all_sent.setdefault(notification_id, loop.create_future())
        if (notification_id, "email") in sent_at and (notification_id, "in_app") in sent_at:
            waiter.set_result(None) if not waiter.done() else None
        await asyncio.wait_for(waiter, 10)
        ack_lat.append(acked - started)
        email_lat.append(sent_at[(notification_id, "email")] - started)
        in_app_lat.append(sent_at[(notification_id, "in_app")] - started)
    print(f"POST acknowledged (stored PENDING):  {ms(ack_lat)}")
    print(f"POST → in-app send:                  {ms(in_app_lat)}")
    print(f"POST → email accepted by SMTP:       {ms(email_lat)}")

    # 2. Sustained rate with concurrent clients.
    total = args.burst
    sem = asyncio.Semaphore(args.concurrency)
    ids: list[str] = []

    async def one() -> None:
        async with sem:
            notification_id, _ = await post()
            ids.append(notification_id)

    before = sink.received
    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    posted = time.perf_counter()
    deadline = time.monotonic() + 120
    while any((i, "email") not in sent_at or (i, "in_app") not in sent_at for i in ids):
        if time.monotonic() > deadline:
            missing = [i for i in ids if (i, "email") not in sent_at or (i, "in_app") not in sent_at]
            raise SystemExit(f"{len(missing)} notifications did not all send within 120 s: "
                             f"{await service.get(missing[0])}; {service.stats}")
        await asyncio.sleep(0.005)
    finished = time.perf_counter()
    print(f"sustained: {total} notifications (in-app + email) in {finished - started:.2f} s "
          f"= {total / (finished - started):,.0f} notifications/s "
          f"(POSTs alone {total / (posted - started):,.0f}/s, concurrency {args.concurrency}, email concurrency "
          f"{args.email_concurrency}); "
          f"SMTP received {sink.received - before}")

    # 2b. The same with the in-app channel only (the notification pipeline without the email service).
    r = await client.put("/v1/me/preferences/bench-inbox", headers=user,
                         json={"channels": {"in_app": True}, "frequency": "INSTANT"})
    assert r.status == 200, await r.text()
    inbox_body = {**body, "type": "bench-inbox", "channels": ["in_app"]}
    inbox_ids: list[str] = []

    async def one_inbox() -> None:
        async with sem:
            resp = await client.post("/v1/notifications", json=inbox_body, headers=svc)
            inbox_ids.append((await resp.json())["id"])

    started = time.perf_counter()
    await asyncio.gather(*(one_inbox() for _ in range(total)))
    while any((i, "in_app") not in sent_at for i in inbox_ids):
        await asyncio.sleep(0.005)
    finished = time.perf_counter()
    print(f"sustained, in-app only: {total} in {finished - started:.2f} s "
          f"= {total / (finished - started):,.0f} notifications/s")

    # 3. Cached preference lookups.
    await service.preference("bench-user", "bench")
    samples: list[float] = []
    for _ in range(args.lookups):
        t0 = time.perf_counter()
        await service.preference("bench-user", "bench")
        samples.append(time.perf_counter() - t0)
    print(f"cached preference lookup:            p50 {pct(samples, 0.5) * 1e6:6.2f} µs   "
          f"p99 {pct(samples, 0.99) * 1e6:6.2f} µs   mean {statistics.fmean(samples) * 1e6:.2f} µs "
          f"(n={len(samples)})")
    stats = service.stats
    print(f"service counters: created {stats['created']}, sent {stats['sent']}, failed {stats['failed']}; "
          f"machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--posts", type=int, default=200)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--lookups", type=int, default=100_000)
    parser.add_argument("--email-concurrency", type=int, default=32, help="collector.email.concurrency")
    parser.add_argument("--journal", default="", help='collector.storage.journal ("off": straight to ClickHouse)')
    parser.add_argument("--quick", action="store_true", help="a short run")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.posts, arguments.burst, arguments.lookups = 50, 200, 10_000
    asyncio.run(main(arguments))
