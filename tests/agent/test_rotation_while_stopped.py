"""Files rotated or deleted while the agent is stopped: the unread tail of a
file renamed to a name no glob matches is read at start, exactly once, with
the source it belonged to; a file that is gone is reported (what was lost)
and its checkpoint entry dropped."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.checkpoint import CheckpointFile, FileCheckpoint
from agent.config import SourceConfig
from agent.tailer import Tailer, glob_matches
from tests.agent.conftest import AgentProcess, agent_config, eventually, write_lines
from tests.agent.ingest_stub import IngestStub, json_answer
from tests.helpers import wait_for

# --- a real `logferry-agent run` process against the ingest stub -------------------


class RotationAgent(AgentProcess):
    def __init__(self, workdir: Path, url: str, **agent: Any) -> None:
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.other = workdir / "other"
        self.other.mkdir()
        self.state = workdir / "state"
        super().__init__(workdir, {
            "collector": {"url": url, "token": "test-token", "retry_initial": "20ms", "retry_max": "200ms",
                          **agent.pop("collector", {})},
            "state_dir": str(self.state),
            "sources": [
                # A second source first: the rotated file must be read with its own one.
                {"path": str(self.other / "*.txt"), "source": "other", "format": "plain"},
                {"path": str(self.logs / "*.log"), "source": "rot", "format": "json", "tags": ["rotated-test"]},
            ],
            "batch": {"max_wait": "30ms", **agent.pop("batch", {})},
            "poll_interval": "20ms",
            "discover_interval": "50ms",
            "release_after": "300ms",
            "shutdown_timeout": "3s",
            "metrics": {"summary_interval": 0},
            **agent,
        })

    def checkpoint(self) -> dict[str, Any]:
        return json.loads((self.state / "checkpoints.json").read_text())["files"]  # type: ignore[no-any-return]


@pytest.fixture
def agent_process(agent_processes: Callable[..., Any]) -> Callable[..., RotationAgent]:
    def make(url: str, **agent: Any) -> RotationAgent:
        return agent_processes(RotationAgent, url, **agent)  # type: ignore[no-any-return]

    return make


def json_lines(path: Path, prefix: str, start: int, stop: int) -> None:
    write_lines(path, [json.dumps({"level": "info", "msg": f"{prefix} {i:05d}"}) for i in range(start, stop)])


def run_then_stop(agent: RotationAgent, app: Path, stub: IngestStub, stop_signal: int) -> int:
    """Ship "old" lines of ``app`` and stop: SIGTERM once 300 are stored, or
    SIGKILL while busy (lines keep arriving: some shipped, some spooled, some
    unread). Returns how many lines the file holds."""
    json_lines(app, "old", 0, 300)
    agent.start()
    if stop_signal == signal.SIGKILL:
        json_lines(app, "old", 300, 2000)
        wait_for(lambda: len(stub.messages()) > 0, what="first batches stored")
        assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
        return 2000
    wait_for(lambda: len(stub.messages()) == 300, what="the first lines shipped")
    assert agent.signal(signal.SIGTERM) == 0
    return 300


def restart_and_expect_every_line(agent: RotationAgent, stub: IngestStub, total_old: int) -> list[str]:
    """Start the agent again: the old file's ``total_old + 500`` lines and the
    new file's 200 are each stored once, the old ones with the source they
    belonged to (its name and tags)."""
    agent.start()
    expected = sorted([f"old {i:05d}" for i in range(total_old + 500)] + [f"new {i:05d}" for i in range(200)])
    wait_for(lambda: len(stub.messages()) >= len(expected), what="every line of both files")
    time.sleep(0.5)  # a duplicate would arrive now
    assert sorted(stub.messages()) == expected
    old = [r for r in stub.records if r.message.startswith("old")]
    assert {r.source for r in old} == {"rot"} and all(r.tags == ["rotated-test"] for r in old)
    return expected


@pytest.mark.parametrize("rotated_name", ["app.log.1", "app.log-20261201"])
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_file_rotated_while_stopped_to_an_unmatched_name_is_read_to_its_end_exactly_once(
        stub: IngestStub, agent_process: Callable[..., RotationAgent], stop_signal: int, rotated_name: str) -> None:
    agent = agent_process(stub.url, batch={"max_records": 50})
    app = agent.logs / "app.log"
    total_old = run_then_stop(agent, app, stub, stop_signal)
    shipped_before = len(stub.messages())
    assert 0 < shipped_before <= total_old
    # While the agent is stopped: more lines, then logrotate renames the file
    # to a name `*.log` does not match and the application opens a new one.
    json_lines(app, "old", total_old, total_old + 500)
    app.rename(agent.logs / rotated_name)
    json_lines(app, "new", 0, 200)
    expected = restart_and_expect_every_line(agent, stub, total_old)
    assert {r.level for r in stub.records if r.message.startswith("old")} == {"INFO"}
    # Then released: only the new file stays in the checkpoint.
    wait_for(lambda: [e["ino"] for e in agent.checkpoint().values()] == [app.stat().st_ino],
             what="the rotated file's checkpoint entry dropped")
    assert "unread lines lost" not in agent.output()
    assert agent.signal(signal.SIGTERM) == 0
    assert sorted(stub.messages()) == expected


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_copytruncate_while_stopped_reads_the_unread_tail_from_the_copy(
        stub: IngestStub, agent_process: Callable[..., RotationAgent], stop_signal: int) -> None:
    agent = agent_process(stub.url, batch={"max_records": 50})
    app = agent.logs / "app.log"
    total_old = run_then_stop(agent, app, stub, stop_signal)
    # While the agent is stopped: more lines, then logrotate's copytruncate
    # copies the file to app.log.1 and empties app.log, which the application
    # keeps writing (an older, unrelated copy lies beside it too).
    json_lines(app, "old", total_old, total_old + 500)
    json_lines(agent.logs / "app.log.2", "ancient", 0, 5000)
    (agent.logs / "app.log.1").write_bytes(app.read_bytes())
    with app.open("r+") as f:
        f.truncate(0)
    json_lines(app, "new", 0, 200)
    restart_and_expect_every_line(agent, stub, total_old)
    assert "unread lines lost" not in agent.output()
    assert "was copied to" in agent.output()
    # The copy is released once read: only the live file stays in the checkpoint.
    wait_for(lambda: [e["ino"] for e in agent.checkpoint().values()] == [app.stat().st_ino],
             what="the copy's checkpoint entry dropped")
    assert agent.signal(signal.SIGTERM) == 0


def test_file_deleted_while_stopped_is_reported_and_the_new_file_is_read(
        stub: IngestStub, agent_process: Callable[..., RotationAgent]) -> None:
    agent = agent_process(stub.url)
    app = agent.logs / "app.log"
    json_lines(app, "old", 0, 100)
    agent.start()
    wait_for(lambda: len(stub.messages()) == 100, what="the first lines shipped")
    assert agent.signal(signal.SIGTERM) == 0
    json_lines(app, "old", 100, 150)  # written while stopped, then the file is gone
    size_at_stop = 100 * len(json.dumps({"level": "info", "msg": "old 00000"}) + "\n")
    # The new file is made before the old one goes, so it cannot get the old inode.
    json_lines(agent.logs / "app.log.tmp", "new", 0, 20)
    app.unlink()
    (agent.logs / "app.log.tmp").rename(app)
    agent.start()
    wait_for(lambda: len([m for m in stub.messages() if m.startswith("new")]) == 20, what="the new file")
    (warning,) = [line for line in agent.output().splitlines() if "unread lines lost" in line]
    assert "WARNING" in warning and f'path="{app}"' in warning and 'reason="deleted"' in warning
    assert f"read_up_to={size_at_stop}" in warning and "unread_bytes_at_least=0" in warning
    assert [e["ino"] for e in agent.checkpoint().values()] == [app.stat().st_ino]
    assert len(stub.messages()) == 120
    assert agent.signal(signal.SIGTERM) == 0


def test_deleted_file_with_lines_read_but_not_shipped_reports_how_many_bytes(
        stub: IngestStub, agent_process: Callable[..., RotationAgent]) -> None:
    # The collector is away: one batch is read and spooled, the rest waits in the file.
    stub.responder = lambda n: json_answer(503, {"error": {"code": "down", "message": "down"}})
    agent = agent_process(stub.url, batch={"max_records": 50}, collector={"max_in_flight": 1})
    app = agent.logs / "app.log"
    json_lines(app, "old", 0, 1000)
    size = app.stat().st_size
    line = len(json.dumps({"level": "info", "msg": "old 00000"}) + "\n")
    agent.start()
    wait_for(lambda: stub.posts >= 2, what="delivery attempts")
    assert agent.signal(signal.SIGTERM) == 0
    app.unlink()
    stub.responder = None
    agent.start()
    # The spooled batch is not lost: it is sent; the rest of the file is reported.
    wait_for(lambda: len(stub.messages()) == 50, what="the spooled batch")
    wait_for(lambda: "unread lines lost" in agent.output(), what="the warning")
    (warning,) = [x for x in agent.output().splitlines() if "unread lines lost" in x]
    assert f"read_up_to={50 * line}" in warning and f"last_seen_size={size}" in warning
    assert f"unread_bytes_at_least={size - 50 * line}" in warning
    assert sorted(stub.messages()) == [f"old {i:05d}" for i in range(50)]


# --- in process: multiline state across the stop ------------------------------------------


async def test_multiline_entry_pending_at_stop_is_joined_from_the_rotated_file(tmp_path, stub, start_agent) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = logs / "app.log"
    write_lines(app, ["2026-11-25 04:00:00 INFO before", "2026-11-25 04:00:01 ERROR failed",
                      "Traceback (most recent call last):"])
    source = {"path": str(logs / "*.log"), "source": "app", "format": "plain",
              "multiline": {"mode": "continuation", "timeout": "2s"}}
    cfg = agent_config(tmp_path, stub.url, [source])
    running = await start_agent(cfg)
    await eventually(lambda: [r.message for r in stub.records] == ["before"], what="the complete entry")
    assert await running.stop() == 0  # the traceback is still pending
    write_lines(app, ['  File "a.py", line 1', "ZeroDivisionError: division by zero"])
    app.rename(logs / "app.log.1")
    write_lines(app, ["2026-11-25 04:00:02 INFO fresh"])
    await start_agent(cfg)
    await eventually(lambda: len(stub.records) == 3, what="the joined entry and the new file")
    by_message = {r.message: r for r in stub.records}
    assert set(by_message) == {"before", "failed", "fresh"}
    stack = by_message["failed"].error_stack
    assert stack is not None and stack.startswith("Traceback") and stack.endswith("division by zero")


# --- the tailer's lookup, directly ------------------------------------------------------------


def _entry(path: Path, st: os.stat_result, content: bytes, offset: int, **kw: Any) -> FileCheckpoint:
    fp_len = min(len(content), 1024)
    return FileCheckpoint(str(path), st.st_dev, st.st_ino, hashlib.sha256(content[:fp_len]).hexdigest(), fp_len,
                          offset, **kw)


def _tailer(tmp_path: Path, entries: dict[str, FileCheckpoint]) -> Tailer:
    sources = [SourceConfig(path=str(tmp_path / "logs" / "*.log"), source="app")]
    return Tailer(sources, CheckpointFile(files=entries), 65536)


def test_an_inode_reused_by_an_unrelated_file_is_never_read_as_the_old_one(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    notes = logs / "notes.txt"
    notes.write_bytes(b"unrelated content that is not a log\n" * 10)
    # The checkpoint says app.log had notes.txt's device and inode, with other first bytes.
    entry = _entry(logs / "app.log", notes.stat(), b"the old app.log's first line\n", 20, size=300)
    tailer = _tailer(tmp_path, {"old": entry})
    assert tailer.discover(0.0) == []
    assert [(lost.file_id, lost.reason) for lost in tailer.lost] == [("old", "inode reused by another file")]
    assert tailer.files == {} and tailer.saved == {}


def test_the_old_identity_is_found_under_its_new_name_and_read_from_the_offset(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    content = b"".join(b"line %d\n" % i for i in range(20))
    rotated = logs / "app.log.1"
    rotated.write_bytes(content)
    entry = _entry(logs / "app.log", rotated.stat(), content, 35, size=35, source="app",
                   source_path=str(logs / "*.log"))
    tailer = _tailer(tmp_path, {"old": entry})
    (tracked,) = tailer.discover(0.0)
    assert (tracked.id, tracked.path, tracked.pos, tracked.source_index) == ("old", str(logs / "app.log"), 35, 0)
    assert tracked.rotated and tracked.unmatched and not tailer.lost
    chunk = tailer.read(tracked, 1024)
    assert chunk is not None and chunk.lines[0] == b"line 5" and chunk.end == len(content)
    tailer.close_all()


def test_an_empty_fingerprint_is_trusted_only_for_a_rotation_style_name(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    other = logs / "unrelated.dat"
    other.write_bytes(b"x\n")
    empty = FileCheckpoint(str(logs / "app.log"), other.stat().st_dev, other.stat().st_ino,
                           hashlib.sha256(b"").hexdigest(), 0, 0, size=0)
    tailer = _tailer(tmp_path, {"e": empty})
    assert tailer.discover(0.0) == [] and tailer.lost[0].reason == "inode reused by another file"
    other.rename(logs / "app.log.1")
    tailer = _tailer(tmp_path, {"e": empty})
    (tracked,) = tailer.discover(0.0)
    assert tracked.pos == 0
    tailer.close_all()


def test_glob_matching_without_the_file() -> None:
    assert glob_matches("/var/log/*.log", "/var/log/app.log")
    assert not glob_matches("/var/log/*.log", "/var/log/app.log.1")
    assert glob_matches("/var/log/**/*.log", "/var/log/a/b/app.log")
    assert glob_matches("/var/log/**/*.log", "/var/log/app.log")
    assert not glob_matches("/var/log/**/*.log", "/srv/app.log")


@pytest.mark.parametrize("how", ["rename", "copytruncate"])
async def test_a_file_rotated_into_olddir_while_stopped_is_read_from_there(tmp_path, stub, start_agent,
                                                                           how: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    app = logs / "app.log"
    json_lines(app, "old", 0, 100)
    source = {"path": str(logs / "*.log"), "source": "app", "format": "json", "olddir": "archive"}
    running = await start_agent(agent_config(tmp_path, stub.url, [source]))
    await eventually(lambda: len(stub.messages()) == 100, what="the first lines")
    assert await running.stop() == 0
    # While stopped: more lines, then logrotate (olddir archive) moves or copies the file there.
    json_lines(app, "old", 100, 150)
    (logs / "archive").mkdir()
    if how == "rename":
        app.rename(logs / "archive" / "app.log.1")
    else:
        (logs / "archive" / "app.log.1").write_bytes(app.read_bytes())
        with app.open("r+") as f:
            f.truncate(0)
    json_lines(app, "new", 0, 20)
    await start_agent(agent_config(tmp_path, stub.url, [source]))
    expected = sorted([f"old {i:05d}" for i in range(150)] + [f"new {i:05d}" for i in range(20)])
    await eventually(lambda: len(stub.messages()) >= len(expected), what="every line of both files")
    await asyncio.sleep(0.3)  # a duplicate would arrive now
    assert sorted(stub.messages()) == expected
