"""Real processes: ``logferry-agent run`` tailing real files and shipping to
``logferry-collector serve``; lines are looked up through ``GET /v1/logs``."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agent.conftest import AgentProcess
from tests.helpers import cli, wait_for

pytestmark = [pytest.mark.slow]


class E2EAgent(AgentProcess):
    def __init__(self, workdir: Path, target: Any, **agent: Any) -> None:
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.source = f"e2e-{uuid.uuid4().hex[:8]}"
        super().__init__(workdir, {
            "collector": {"url": target.url, "token": target.ingest_token, "retry_initial": "50ms",
                          "retry_max": "500ms", **agent.pop("collector", {})},
            "state_dir": str(workdir / "state"),
            "sources": [{"path": str(self.logs / "*.log"), "source": self.source, "format": "json"}],
            "poll_interval": "50ms",
            "discover_interval": "200ms",
            "metrics": {"summary_interval": 0},
            **agent,
        })


@pytest.fixture
def agent_process(agent_processes: Callable[..., Any]) -> Callable[..., E2EAgent]:
    def make(target: Any, **agent: Any) -> E2EAgent:
        return agent_processes(E2EAgent, target, **agent)  # type: ignore[no-any-return]

    return make


def json_lines(path: Path, start: int, stop: int, extra: str = "") -> None:
    now = dt.datetime.now(dt.UTC)
    with path.open("a") as out:
        for i in range(start, stop):
            ts = (now + dt.timedelta(milliseconds=i)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            out.write(json.dumps({"ts": ts, "level": "info", "msg": f"line {i:06d}{extra}"}) + "\n")


def keep_appending(path: Path, start: int, stop: int) -> threading.Thread:
    """A started thread appending lines ``start``..``stop`` to ``path``, 200 every ~20 ms."""
    def run() -> None:
        for first in range(start, stop, 200):
            json_lines(path, first, min(first + 200, stop))
            time.sleep(0.02)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def stored(collector: Any, source: str) -> list[dict[str, Any]]:
    return collector.all_logs(source=source, start="-1h")  # type: ignore[no-any-return]


def test_agent_ships_every_appended_line_to_the_collector_redacted(collector_process, agent_process) -> None:
    agent = agent_process(collector_process)
    app = agent.logs / "app.log"
    json_lines(app, 0, 200)
    agent.start()
    json_lines(app, 200, 300, extra=" card 4111 1111 1111 1111")
    wait_for(lambda: len(stored(collector_process, agent.source)) == 300, what="300 stored logs")
    logs = stored(collector_process, agent.source)
    assert sorted(log["message"] for log in logs) == sorted(
        [f"line {i:06d}" for i in range(200)] + [f"line {i:06d} card [REDACTED:credit_card]" for i in range(200, 300)])
    assert all(log["level"] == "INFO" and log["source"] == agent.source for log in logs)
    assert agent.signal(signal.SIGTERM) == 0


class AnswerDroppingProxy:
    """Passes ``POST /v1/ingest`` on to a collector; the first ``drop``
    successful answers are not passed back: the connection closes once the
    collector has stored the batch (a network or a load balancer failing)."""

    def __init__(self, collector: Any, drop: int) -> None:
        self.ingest_token = collector.ingest_token
        self.dropped = 0
        lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                forwarded = {name: value for name, value in self.headers.items()
                             if name.lower() in ("authorization", "content-type", "content-encoding")}
                request = urllib.request.Request(collector.url + self.path, data=body, headers=forwarded)
                try:
                    with urllib.request.urlopen(request, timeout=30) as answer:
                        status, data, headers = answer.status, answer.read(), answer.headers
                except urllib.error.HTTPError as refused:
                    status, data, headers = refused.code, refused.read(), refused.headers
                with lock:
                    lose = status == 200 and proxy.dropped < drop
                    proxy.dropped += lose
                if lose:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(status)
                for name in ("Content-Type", "Retry-After"):
                    if headers.get(name):
                        self.send_header(name, headers[name])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_rejections_whose_answer_was_lost_are_dead_lettered_once(collector_process, agent_process) -> None:
    """The collector stored a batch and rejected one of its records; the
    answer was lost. The agent's resend is answered as a duplicate carrying
    that rejection: the record is dead-lettered, the rest stored once."""
    proxy = AnswerDroppingProxy(collector_process, drop=1)
    try:
        agent = agent_process(proxy)
        app = agent.logs / "app.log"
        json_lines(app, 0, 20)
        with app.open("a") as out:
            out.write(json.dumps({"ts": "2099-01-01T00:00:00Z", "level": "info", "msg": "from the future"}) + "\n")
        json_lines(app, 20, 40)
        agent.start()
        wait_for(lambda: len(stored(collector_process, agent.source)) == 40, what="40 stored logs")
        dead = agent.workdir / "state" / "dead-letter.ndjson"
        wait_for(dead.exists, what="the dead-letter file")
        assert agent.signal(signal.SIGTERM) == 0
        entries = [json.loads(line) for line in dead.read_text().splitlines()]
        assert [entry["record"]["message"] for entry in entries] == ["from the future"]
        assert "future" in entries[0]["reason"]
        assert proxy.dropped == 1
        assert sorted(log["message"] for log in stored(collector_process, agent.source)) == \
            [f"line {i:06d}" for i in range(40)]
    finally:
        proxy.close()


def test_kill_9_during_shipping_then_restart_stores_every_line_exactly_once(
        collector_process, agent_process) -> None:
    agent = agent_process(collector_process, batch={"max_records": 100},
                          collector={"max_in_flight": 4})
    app = agent.logs / "app.log"
    total = 10_000
    json_lines(app, 0, 2000)
    agent.start()
    # Keep the agent busy while it is killed: lines keep arriving.
    writer = keep_appending(app, 2000, total)
    wait_for(lambda: len(collector_process.query_logs(source=agent.source, start="-1h", limit=10)["logs"]) > 0,
             what="first batches stored")
    assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
    writer.join()
    before = len(stored(collector_process, agent.source))
    assert 0 < before < total
    agent.start()
    wait_for(lambda: len(stored(collector_process, agent.source)) >= total, what="every line after restart")
    time.sleep(0.5)  # a duplicate would arrive now
    messages = [log["message"] for log in stored(collector_process, agent.source)]
    assert len(messages) == total
    assert sorted(messages) == [f"line {i:06d}" for i in range(total)]
    assert agent.signal(signal.SIGTERM) == 0


def test_collector_down_for_a_while_and_back_loses_nothing(collector_process, agent_process) -> None:
    agent = agent_process(collector_process)
    app = agent.logs / "app.log"
    agent.start()
    json_lines(app, 0, 50)
    wait_for(lambda: len(stored(collector_process, agent.source)) == 50, what="lines before the outage")
    collector_process.stop()
    json_lines(app, 50, 1050)
    time.sleep(2.0)  # the agent retries meanwhile
    collector_process.start()
    wait_for(lambda: len(stored(collector_process, agent.source)) == 1050, what="every line after the outage")
    messages = sorted(log["message"] for log in stored(collector_process, agent.source))
    assert messages == [f"line {i:06d}" for i in range(1050)]


def test_sigterm_flushes_the_open_batch_and_exits_0(collector_process, agent_process) -> None:
    agent = agent_process(collector_process, batch={"max_wait": "30s"})
    app = agent.logs / "app.log"
    agent.start()
    time.sleep(1.0)
    json_lines(app, 0, 10)
    time.sleep(1.0)  # read, but the batch waits for max_wait
    assert stored(collector_process, agent.source) == []
    assert agent.signal(signal.SIGTERM) == 0
    assert len(stored(collector_process, agent.source)) == 10
    checkpoint = json.loads((agent.workdir / "state" / "checkpoints.json").read_text())
    assert [e["offset"] for e in checkpoint["files"].values()] == [app.stat().st_size]


def test_check_command_lists_every_error_with_its_path(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("agent:\n  collector: {url: ftp://x}\n  sources:\n    - {path: a.log, source: web}\n"
                      "    - {source: api, format: xml, typo: 1}\n  batch: {max_wait: soon}\n")
    out = subprocess.run([cli("logferry-agent"), "check", "-c", str(config)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    for expected in ("agent.collector.url", "agent.sources[1].path", "agent.sources[1].format",
                     "agent.sources[1].typo", "agent.batch.max_wait"):
        assert expected in out.stderr, out.stderr
    assert f"{config}:5:" in out.stderr
    good = tmp_path / "good.yaml"
    good.write_text("agent:\n  collector: {url: 'http://127.0.0.1:1', token: t}\n"
                    "  sources: [{path: '/var/log/*.log', source: web, format: json}]\n")
    ok = subprocess.run([cli("logferry-agent"), "check", "-c", str(good)], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_collector_killed_while_shipping_then_restarted_stores_every_line_exactly_once(
        tmp_path: Path, agent_processes: Callable[..., Any]) -> None:
    """The collector acknowledges logs once they are in its write-ahead
    journal; killed (SIGKILL) with acknowledged logs only there and batches in
    flight, then restarted, it replays the journal and the agent resends what
    was not acknowledged: every line once."""
    from tests.conftest import CollectorProcess

    (tmp_path / "collector").mkdir()
    # Inserts into ClickHouse are a second away: most acknowledged logs are only in the journal when it dies.
    collector = CollectorProcess(tmp_path / "collector", {"storage": {
        "dsn": f"chdb://{tmp_path / 'collector' / 'clickhouse'}", "journal_flush_interval": "1s"}})
    collector.start()
    try:
        agent = agent_processes(E2EAgent, collector, batch={"max_records": 100}, collector={"max_in_flight": 4})
        app = agent.logs / "app.log"
        total = 6000
        json_lines(app, 0, 1000)
        agent.start()
        writer = keep_appending(app, 1000, total)
        time.sleep(0.4)  # some batches acknowledged, the flush not yet due
        assert collector.proc is not None
        collector.proc.kill()
        collector.proc.wait()
        collector.proc = None
        writer.join()
        collector.start()
        wait_for(lambda: len(stored(collector, agent.source)) >= total, timeout=60, what="every line after restart")
        time.sleep(1.5)  # a duplicate would arrive now (and the journal's next flush with it)
        messages = [log["message"] for log in stored(collector, agent.source)]
        assert len(messages) == total
        assert sorted(messages) == [f"line {i:06d}" for i in range(total)]
        assert agent.signal(signal.SIGTERM) == 0
    finally:
        collector.stop()


def test_nginx_logfmt_syslog_and_regex_lines_are_stored_parsed_and_redacted(collector_process,
                                                                            agent_process) -> None:
    # After the first answer, lines without a redaction hit go as read and the
    # collector parses them; an nginx message that joins a card is redacted there.
    # Syslog lines without year or zone are read in the agent's zone (UTC+05:30
    # here), not the collector's, and a card hidden by escapes in structured data is redacted.
    agent = agent_process(collector_process)
    agent.env["TZ"] = "XST-5:30"  # POSIX: 5 h 30 min east of UTC, no tz database needed
    web, app, sys_, job = f"{agent.source}-web", f"{agent.source}-app", f"{agent.source}-sys", f"{agent.source}-job"
    section = json.loads(agent.config.read_text())
    section["agent"]["sources"] = [
        {"path": str(agent.logs / "access.log"), "source": web, "format": "nginx"},
        {"path": str(agent.logs / "app.logfmt"), "source": app, "format": "logfmt"},
        {"path": str(agent.logs / "sys.log"), "source": sys_, "format": "syslog"},
        {"path": str(agent.logs / "jobs.txt"), "source": job, "format": "regex",
         "pattern": r"(?P<level>[A-Z]+) job=(?P<job>\d+) (?P<message>.*)"}]
    agent.config.write_text(json.dumps(section))
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    stamp, iso = now.strftime("%d/%b/%Y:%H:%M:%S +0000"), now.isoformat(timespec="milliseconds")
    local = (now + dt.timedelta(hours=5, minutes=30)).strftime("%b %e %H:%M:%S")

    def append(name: str, lines: list[str]) -> None:
        with (agent.logs / name).open("a") as out:
            out.writelines(line + "\n" for line in lines)

    def access(start: int, stop: int) -> list[str]:
        return [f'10.0.0.{i % 250} - - [{stamp}] "GET /item/{i} HTTP/1.1" 200 {i} "-" "curl"'
                for i in range(start, stop)]

    def jobs(start: int, stop: int) -> list[str]:
        return [f'ts={iso} level=warn msg="job {i}" job_id={i}' for i in range(start, stop)]

    def syslog(start: int, stop: int) -> list[str]:
        return [f"<30>{local} web cron[{i}]: run {i}" for i in range(start, stop)]

    append("access.log", access(0, 100))
    append("app.logfmt", jobs(0, 100))
    def runs(start: int, stop: int) -> list[str]:
        return [f"INFO job={i} run {i}" for i in range(start, stop)]

    append("sys.log", syslog(0, 100))
    append("jobs.txt", runs(0, 100))
    agent.start()
    wait_for(lambda: [len(stored(collector_process, s)) for s in (web, app, sys_, job)] == [100] * 4,
             what="the first lines")
    parsed_before = lines_parsed_by(collector_process)
    append("access.log", [f'10.0.0.1 - - [{stamp}] "GET /pay/4111-1111-1111-1" 103 5 "-" "curl"', *access(100, 300)])
    append("app.logfmt", [f'ts={iso} level=error msg="card 4111 1111 1111 1111" password=hunter2', *jobs(100, 300)])
    append("sys.log", [f'<11>1 {iso} web pay 7 - [card@1 number="4111\\ 1111\\ 1111\\ 1111"] declined',
                       *syslog(100, 300)])
    append("jobs.txt", ["ERROR job=300 card 4111+1111+1111+1111 declined", *runs(100, 300)])
    wait_for(lambda: [len(stored(collector_process, s)) for s in (web, app, sys_, job)] == [301] * 4,
             what="every line")
    web_logs, app_logs = stored(collector_process, web), stored(collector_process, app)
    sys_logs = stored(collector_process, sys_)
    assert sorted(log["message"] for log in web_logs) == sorted(
        [f"GET /item/{i} HTTP/1.1 200" for i in range(300)] + ["GET /pay/[REDACTED:credit_card]"])
    assert sorted(log["message"] for log in app_logs) == sorted([f"job {i}" for i in range(300)]
                                                                + ["card [REDACTED:credit_card]"])
    assert {log["level"] for log in app_logs} == {"WARN", "ERROR"}
    assert sorted(log["message"] for log in sys_logs) == sorted([f"run {i}" for i in range(300)] + ["declined"])
    declined = next(log for log in sys_logs if log["message"] == "declined")
    assert declined["context"]["structured_data"] == {"card@1": {"number": "[REDACTED:credit_card]"}}
    # RFC 3164 stamps are the agent's local time: stored as the instant they name.
    runs = [log for log in sys_logs if log["message"] != "declined"]
    assert {str(log["timestamp"])[:19] for log in runs} == {now.strftime("%Y-%m-%dT%H:%M:%S")}
    job_logs = stored(collector_process, job)
    assert sorted(log["message"] for log in job_logs) == sorted([f"run {i}" for i in range(300)]
                                                                + ["card [REDACTED:credit_card] declined"])
    assert {log["context"]["job"] for log in job_logs} == {str(i) for i in range(301)}
    assert "4111" not in json.dumps(web_logs + app_logs + sys_logs + job_logs, default=str)
    assert "hunter2" not in json.dumps(app_logs)
    # The later lines went as read (all but the lines with a hit): the collector counted them.
    assert lines_parsed_by(collector_process) - parsed_before >= 800
    assert agent.signal(signal.SIGTERM) == 0


def lines_parsed_by(collector: Any) -> float:
    """The collector's count of lines it parsed for agents (logferry_ingest_lines_total)."""
    request = urllib.request.Request(f"{collector.url}/metrics",
                                     headers={"Authorization": f"Bearer {collector.admin_token}"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        metrics = answer.read().decode()
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("logferry_ingest_lines_total"))


def test_multiline_entries_go_as_read_and_are_stored_joined_and_redacted(collector_process, agent_process) -> None:
    # Java-style entries: the collector joins the lines the agent ships as read
    # (the stack into error_stack); an entry with a card in a frame is
    # redacted on the agent, as a record.
    agent = agent_process(collector_process)
    section = json.loads(agent.config.read_text())
    section["agent"]["sources"] = [{"path": str(agent.logs / "app.log"), "source": agent.source, "format": "plain",
                                    "multiline": {"mode": "start", "timeout": "2s"}}]
    agent.config.write_text(json.dumps(section))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")

    def entries(start: int, stop: int) -> list[str]:
        lines = []
        for i in range(start, stop):
            lines.append(f"{stamp},{i % 1000:03d} ERROR order {i} failed")
            if i % 3 == 0:
                lines += [f"java.lang.IllegalStateException: order {i}", f"\tat shop.Orders.place(Orders.java:{i})"]
        return lines

    def append(lines: list[str]) -> None:
        with (agent.logs / "app.log").open("a") as out:
            out.write("".join(line + "\n" for line in lines))  # whole entries in one write

    append(entries(0, 30))
    agent.start()
    wait_for(lambda: len(stored(collector_process, agent.source)) == 30, what="the first entries")
    parsed_before = lines_parsed_by(collector_process)
    append([f"{stamp},999 WARN charge declined", "\tat shop.Pay.charge(card=4111 1111 1111 1111)", *entries(30, 300)])
    wait_for(lambda: len(stored(collector_process, agent.source)) == 301, what="every entry")
    logs = stored(collector_process, agent.source)
    assert sorted((log["message"], log["error_stack"] or "") for log in logs) == sorted(
        [(f"order {i} failed", f"java.lang.IllegalStateException: order {i}\n\tat shop.Orders.place(Orders.java:{i})"
          if i % 3 == 0 else "") for i in range(300)]
        + [("charge declined", "\tat shop.Pay.charge(card=[REDACTED:credit_card])")])
    assert "4111" not in json.dumps(logs, default=str)
    # The later entries went as read (the last one only after the flush timeout, as a record).
    assert lines_parsed_by(collector_process) - parsed_before >= 300
    assert agent.signal(signal.SIGTERM) == 0


def test_kill_9_while_shipping_multiline_entries_then_restart_stores_each_once(
        collector_process, agent_process) -> None:
    # Entries shipped as read, in batches split between entries, with the last
    # entry of a read pending in the joiner when the agent dies.
    agent = agent_process(collector_process, batch={"max_records": 100}, collector={"max_in_flight": 4})
    section = json.loads(agent.config.read_text())
    # The flush timeout is long enough that a busy machine's pause between two
    # writes of one entry does not end it early (the agent cannot tell that apart).
    section["agent"]["sources"][0].update(format="plain", multiline={"mode": "start", "timeout": "2s"})
    agent.config.write_text(json.dumps(section))
    app = agent.logs / "app.log"
    total = 6000
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")

    def entries(start: int, stop: int) -> None:
        text = "".join(f"{stamp},{i % 1000:03d} ERROR entry {i:06d}\n"
                       + (f"java.lang.Error: e{i}\n\tat F.f(F.java:{i})\n" if i % 3 == 0 else "")
                       for i in range(start, stop))
        with app.open("a") as out:
            out.write(text)  # whole entries in one write

    def keep_writing() -> None:
        for first in range(1000, total, 150):
            entries(first, min(first + 150, total))
            time.sleep(0.02)

    entries(0, 1000)
    parsed_before = lines_parsed_by(collector_process)
    agent.start()
    writer = threading.Thread(target=keep_writing)
    writer.start()
    wait_for(lambda: len(collector_process.query_logs(source=agent.source, start="-1h", limit=10)["logs"]) > 0,
             what="first batches stored")
    assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
    writer.join()
    assert 0 < len(stored(collector_process, agent.source)) < total
    agent.start()
    wait_for(lambda: len(stored(collector_process, agent.source)) >= total, what="every entry after restart")
    time.sleep(0.6)  # a duplicate would arrive now
    logs = stored(collector_process, agent.source)
    assert sorted((log["message"], log["error_stack"] or "") for log in logs) == [
        (f"entry {i:06d}", f"java.lang.Error: e{i}\n\tat F.f(F.java:{i})" if i % 3 == 0 else "") for i in range(total)]
    # Most entries went as read (not the first batch of each run, sent before
    # the collector said what it parses, nor entries begun in an earlier read).
    assert lines_parsed_by(collector_process) - parsed_before >= total // 2, "entries went as read"
    assert agent.signal(signal.SIGTERM) == 0
