"""``make run``: a collector, an agent and a log generator, on this machine.

Starts ``logferry-collector serve`` on the embedded default (chDB under
./data/clickhouse) with ``config.example.yaml``, an agent tailing
./data/logs/*.log, and a generator writing realistic JSON log lines there
(some with card numbers, to show redaction). Prints a query to paste; Ctrl-C
stops everything cleanly.
"""

from __future__ import annotations

import email
import http.server
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path.cwd()
DATA = ROOT / "data"
CONFIG = ROOT / "config.example.yaml"
BIN = Path(sys.executable).parent

SOURCES = ["web", "payments", "auth", "search", "worker"]
MESSAGES = [
    ("INFO", "GET /api/orders/{n} 200"),
    ("INFO", "user signed in"),
    ("DEBUG", "cache hit for key order:{n}"),
    ("WARN", "slow query took {ms} ms"),
    ("ERROR", "payment declined for card 4111 1111 1111 1111"),
    ("ERROR", "upstream timeout calling the inventory service"),
    ("INFO", "charge created for order {n}"),
    ("CRITICAL", "database connection pool exhausted"),
]


def _secret_key() -> str:
    key = os.environ.get("LOGFERRY_SECRET_KEY")
    if key:
        return key
    path = DATA / "secret_key"
    if path.exists():
        return path.read_text().strip()
    key = secrets.token_urlsafe(32)
    path.write_text(key)
    path.chmod(0o600)
    return key


def _token(env: dict[str, str], kind: str, name: str) -> str:
    out = subprocess.run(
        [str(BIN / "logferry-collector"), "token", "create", "-c", str(CONFIG), "--kind", kind, "--name", name,
         "--expires-in", "24h"],
        env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"could not create a {kind} token:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def _generate(path: Path, stop: threading.Event) -> None:
    rng = random.Random()
    with path.open("a", encoding="utf-8") as f:
        while not stop.is_set():
            for _ in range(rng.randint(1, 20)):
                level, text = rng.choice(MESSAGES)
                line = {
                    "ts": time.time(),
                    "level": level.lower(),
                    "service": rng.choice(SOURCES),
                    "msg": text.format(n=rng.randint(1000, 9999), ms=rng.randint(200, 9000)),
                    "request_id": uuid.uuid4().hex[:16],
                    "user_id": f"user-{rng.randint(1, 50)}",
                }
                f.write(json.dumps(line) + "\n")
            f.flush()
            stop.wait(0.2)


class _WebhookPrinter(http.server.BaseHTTPRequestHandler):
    """Stands in for the chat webhook of pipelines/examples/new-error-webhook.yaml."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            text = json.loads(body).get("text", body[:200].decode(errors="replace"))
        except ValueError:
            text = body[:200].decode(errors="replace")
        print(f"[pipeline webhook] {text}", flush=True)
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _start_webhook_receiver() -> http.server.ThreadingHTTPServer | None:
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 9000), _WebhookPrinter)
    except OSError:
        print("(port 9000 is taken: the example webhook pipeline will log delivery failures)")
        return None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _start_smtp_sink() -> object | None:
    """A local SMTP server on 127.0.0.1:1025 (the example config's provider) that prints what arrives."""
    try:
        from aiosmtpd.controller import Controller
    except ImportError:
        return None

    class Printer:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            message = email.message_from_bytes(envelope.content)  # type: ignore[attr-defined]
            print(f"[email] to {', '.join(envelope.rcpt_tos)}: {message['Subject']}", flush=True)  # type: ignore[attr-defined]
            return "250 OK"

    controller = Controller(Printer(), hostname="127.0.0.1", port=1025)
    try:
        controller.start()
    except Exception:
        print("(port 1025 is taken: emails go to whatever listens there)")
        return None
    return controller


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the collector exited; see its log lines above")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:  # noqa: S310 - our own collector
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the collector did not become ready in time")


def main() -> int:
    (DATA / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["LOGFERRY_SECRET_KEY"] = _secret_key()
    print("logferry demo: creating tokens ...", flush=True)
    env["LOGFERRY_INGEST_TOKEN"] = _token(env, "ingest", "demo-agent")
    admin = _token(env, "admin", "demo-admin")

    webhooks = _start_webhook_receiver()
    smtp = _start_smtp_sink()
    collector_log = (DATA / "collector.log").open("ab")
    agent_log = (DATA / "agent.log").open("ab")
    collector = subprocess.Popen([str(BIN / "logferry-collector"), "serve", "-c", str(CONFIG)], env=env,
                                 stdout=collector_log, stderr=subprocess.STDOUT)
    url = "http://127.0.0.1:8080"
    agent: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    generator = threading.Thread(target=_generate, args=(DATA / "logs" / "demo.log", stop), daemon=True)
    try:
        _wait_ready(url, collector)
        agent = subprocess.Popen([str(BIN / "logferry-agent"), "run", "-c", str(CONFIG)], env=env,
                                 stdout=agent_log, stderr=subprocess.STDOUT)
        generator.start()
        print(
            "\nlogferry is running: a collector on 127.0.0.1:8080 (chDB under ./data/clickhouse) and an agent\n"
            "tailing ./data/logs/*.log. Logs are queryable within a second. Try:\n\n"
            f"  curl -s -H 'Authorization: Bearer {admin}' \\\n"
            f"    '{url}/v1/logs?level=WARN&start=-15m&limit=5'\n\n"
            f"  curl -s -H 'Authorization: Bearer {admin}' '{url}/v1/logs?q=payment&limit=3'\n\n"
            "Logs of the processes: ./data/collector.log, ./data/agent.log. The example pipelines'\n"
            "webhooks and emails are received locally and printed below as they fire.\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while collector.poll() is None and (agent.poll() is None):
            time.sleep(0.5)
        print("a process exited unexpectedly; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        stop.set()
        for proc in (agent, collector):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        collector_log.close()
        agent_log.close()
        if webhooks is not None:
            webhooks.shutdown()
        if smtp is not None:
            smtp.stop()  # type: ignore[attr-defined]
        print("stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
