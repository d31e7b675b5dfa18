"""The cap on open files (``max_open_files``) and ``close_inactive``: files
beyond the cap wait their turn (oldest first) and are read in full, exactly
once; an idle file gives its descriptor up and is continued from its offset
when it grows; a file that reused the inode of a closed one is read from 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, SourceConfig
from agent.configfile import ConfigInvalid, convert
from agent.tailer import Tailer
from tests.agent.conftest import AgentProcess, agent_config, eventually, write_lines
from tests.agent.ingest_stub import IngestStub
from tests.helpers import wait_for


def src(tmp_path: Path, pattern: str = "logs/*.log", **kw: object) -> dict[str, object]:
    return {"path": str(tmp_path / pattern), "source": "app", "format": "plain", **kw}


def count(stub: IngestStub, prefix: str) -> list[str]:
    return sorted(m for m in stub.messages() if m.startswith(prefix))


async def one_idle_closing_file(tmp_path: Path, stub: IngestStub, start_agent: Any, lines: list[str],
                                close_inactive: str) -> tuple[Path, Any]:
    """``logs/app.log`` holding ``lines``, tailed by an agent that closes idle files after ``close_inactive``."""
    logs = tmp_path / "logs"
    logs.mkdir()
    app = logs / "app.log"
    write_lines(app, lines)
    running = await start_agent(agent_config(tmp_path, stub.url, [src(tmp_path)], close_inactive=close_inactive))
    return app, running


class OpenFilesWatch:
    """Samples the agent's open and waiting files while the test runs."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.max_open = 0
        self.max_waiting = 0
        self.task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            tailer = getattr(self.agent, "tailer", None)
            if tailer is not None:
                self.max_open = max(self.max_open, tailer.open_count())
                self.max_waiting = max(self.max_waiting, len(tailer.waiting))
            await asyncio.sleep(0.005)

    def stop(self) -> None:
        self.task.cancel()


async def test_many_files_under_a_small_cap_are_all_shipped_exactly_once(tmp_path, stub, start_agent) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(50):
        write_lines(logs / f"f{i:02d}.log", [f"file {i:02d} line {j:03d}" for j in range(40)])
    cfg = agent_config(tmp_path, stub.url, [src(tmp_path)], max_open_files=5, close_inactive="150ms")
    running = await start_agent(cfg)
    watch = OpenFilesWatch(running.agent)
    try:
        await eventually(lambda: len(stub.messages()) >= 2000, timeout=60, what="2000 lines of 50 files")
        # Files already closed as inactive grow again; a file created now waits its turn too.
        for i in range(0, 50, 7):
            write_lines(logs / f"f{i:02d}.log", [f"file {i:02d} line {j:03d}" for j in range(40, 45)])
        write_lines(logs / "late.log", [f"file late line {j:03d}" for j in range(10)])
        await eventually(lambda: len(stub.messages()) >= 2000 + 8 * 5 + 10, timeout=60, what="the later lines")
        await asyncio.sleep(0.5)  # a duplicate would arrive now
    finally:
        watch.stop()
    expected = [f"file {i:02d} line {j:03d}" for i in range(50) for j in range(40)]
    expected += [f"file {i:02d} line {j:03d}" for i in range(0, 50, 7) for j in range(40, 45)]
    expected += [f"file late line {j:03d}" for j in range(10)]
    assert sorted(stub.messages()) == sorted(expected)
    assert watch.max_open <= 5 and watch.max_waiting >= 40
    metrics = running.agent.metrics
    assert metrics.files_open <= 5
    assert "logferry_agent_files_waiting " in metrics.prometheus() and "files_waiting=" in metrics.summary()
    # Every file stays known (with its offset) while its descriptor is closed.
    await eventually(lambda: running.agent.metrics.files_open == 0, what="every file closed as inactive")
    assert await running.stop() == 0
    saved = json.loads((tmp_path / "state" / "checkpoints.json").read_text())["files"]
    sizes = {str(p): p.stat().st_size for p in logs.iterdir()}
    assert sorted((e["path"], e["offset"]) for e in saved.values()) == sorted(sizes.items())


async def test_an_inactive_file_that_grows_is_continued_from_its_offset(tmp_path, stub, start_agent) -> None:
    app, running = await one_idle_closing_file(
        tmp_path, stub, start_agent, [f"first {i:03d}" for i in range(100)], "200ms")
    await eventually(lambda: len(stub.messages()) == 100, what="the first lines")
    await eventually(lambda: running.agent.metrics.files_open == 0, what="the idle file closed")
    (tracked,) = running.agent.tailer.files.values()
    assert tracked.parked and tracked.pos == app.stat().st_size
    size = app.stat().st_size
    await eventually(lambda: [e["offset"] for e in json.loads((tmp_path / "state" / "checkpoints.json").read_text())
                              ["files"].values()] == [size], what="still in the checkpoint, with its offset")
    write_lines(app, [f"second {i:03d}" for i in range(30)])
    await eventually(lambda: len(stub.messages()) == 130, what="the lines written while closed")
    await asyncio.sleep(0.4)
    assert sorted(stub.messages()) == sorted([f"first {i:03d}" for i in range(100)]
                                             + [f"second {i:03d}" for i in range(30)])
    (again,) = running.agent.tailer.files.values()
    assert again is tracked and tracked.reopens >= 1  # same identity, continued
    # Closed again once idle, and continued again.
    await eventually(lambda: running.agent.metrics.files_open == 0, what="closed again")
    write_lines(app, ["third"])
    await eventually(lambda: "third" in stub.messages())
    assert len(stub.messages()) == 131


async def test_an_inactive_file_whose_inode_is_reused_while_closed_is_read_from_0(tmp_path, stub, start_agent,
                                                                                   caplog) -> None:
    caplog.set_level(logging.INFO, logger="logferry.agent.tailer")
    app, running = await one_idle_closing_file(
        tmp_path, stub, start_agent, [f"first file line {i}" for i in range(40)], "150ms")
    logs = app.parent
    await eventually(lambda: len(count(stub, "first")) == 40)
    await eventually(lambda: running.agent.metrics.files_open == 0, what="the idle file closed")
    ino = app.stat().st_ino
    app.unlink()
    # A new file, same inode (tmpfs/ext4 reuse freed inodes), longer than the old offset.
    reused = False
    for attempt in range(50):
        candidate = logs / f"tmp{attempt}.txt"
        write_lines(candidate, [f"second file line {i} with other content" for i in range(60)], mode="w")
        if candidate.stat().st_ino == ino:
            candidate.rename(app)
            reused = True
            break
        candidate.unlink()
    else:
        write_lines(app, [f"second file line {i} with other content" for i in range(60)], mode="w")
    await eventually(lambda: len(count(stub, "second")) == 60, what="every line of the new file")
    await asyncio.sleep(0.4)
    assert len(count(stub, "first")) == 40 and len(stub.messages()) == 100
    if reused and "forgetting closed file" not in caplog.text:
        # Reopened on the same inode: the first bytes differ, so it was read from 0.
        assert "reopened" in caplog.text and "reading it from the start" in caplog.text


async def test_an_inactive_file_that_grew_and_was_rotated_away_is_read_to_its_end(tmp_path, stub,
                                                                                  start_agent) -> None:
    app, running = await one_idle_closing_file(
        tmp_path, stub, start_agent, [f"old {i:03d}" for i in range(50)], "150ms")
    logs = app.parent
    await eventually(lambda: len(stub.messages()) == 50)
    await eventually(lambda: running.agent.metrics.files_open == 0, what="the idle file closed")
    # Lines, then logrotate renames it to a name no glob matches before the agent looks again.
    write_lines(app, [f"old {i:03d}" for i in range(50, 80)])
    app.rename(logs / "app.log.1")
    write_lines(app, [f"new {i:03d}" for i in range(10)])
    await eventually(lambda: len(stub.messages()) >= 90, what="the rotated file's tail and the new file")
    await asyncio.sleep(0.5)
    assert sorted(stub.messages()) == sorted([f"old {i:03d}" for i in range(80)] + [f"new {i:03d}" for i in range(10)])
    # The rotated file is released; only the new one stays in the checkpoint.
    await eventually(lambda: [e["ino"] for e in json.loads((tmp_path / "state" / "checkpoints.json").read_text())
                              ["files"].values()] == [app.stat().st_ino], what="the rotated file forgotten")


def test_a_closed_file_rewritten_in_place_is_read_from_0_and_the_oldest_waiting_file_goes_first(
        tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in "abcd":
        (logs / f"{name}.log").write_bytes(f"{name} old line\n".encode() * 10)
    tailer = Tailer([SourceConfig(path=str(logs / "*.log"), source="app")], None, 65536, max_open=2)
    opened = tailer.discover(0.0)
    assert [Path(t.path).name for t in opened] == ["a.log", "b.log"]
    assert [Path(w.path).name for w in tailer.waiting.values()] == ["c.log", "d.log"]
    a, b = opened
    for tracked in opened:
        while tailer.read(tracked, 1024) is not None:
            pass
        tracked.acked = tracked.pos
    # `a` is closed as inactive; it grows, but `c` and `d` waited longer.
    tailer.park(a)
    (logs / "a.log").write_bytes(b"A new file on the same inode, longer than before\n" * 10)  # same inode
    assert [Path(t.path).name for t in tailer.discover(1.0)] == ["c.log"]  # the slot `a` gave up
    assert tailer.open_count() == 2
    assert [Path(w.path).name for w in tailer.waiting.values()] == ["d.log", "a.log"]
    tailer.park(b)
    (c,) = [t for t in tailer.files.values() if Path(t.path).name == "c.log"]
    tailer.park(c)
    reopened = tailer.fill(2.0)
    assert [Path(t.path).name for t in reopened] == ["d.log", "a.log"]
    assert a in reopened and a.pos == len(b"a old line\n") * 10 and not a.parked
    # Reopened with other first bytes: read from 0 as a new file.
    assert tailer.check_truncation(a)
    fresh = tailer.renew(a)
    chunk = tailer.read(fresh, 1024)
    assert chunk is not None and chunk.starts[0] == 0 and chunk.lines[0].startswith(b"A new file")
    tailer.close_all()


def test_config_limits() -> None:
    cfg = convert({"max_open_files": 3, "close_inactive": "10s"}, AgentConfig)
    assert (cfg.max_open_files, cfg.close_inactive) == (3, 10.0)
    assert (AgentConfig().max_open_files, AgentConfig().close_inactive) == (1024, 300.0)
    for bad, key in (({"max_open_files": 0}, "max_open_files"), ({"close_inactive": 0}, "close_inactive")):
        with pytest.raises(ConfigInvalid, match=key):
            convert(bad, AgentConfig)


# --- a real agent process killed with -9 while the cap is in force ---------------------------


class CappedAgent(AgentProcess):
    def __init__(self, workdir: Path, url: str) -> None:
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.state = workdir / "state"
        super().__init__(workdir, {
            "collector": {"url": url, "token": "test-token", "retry_initial": "20ms", "retry_max": "200ms"},
            "state_dir": str(self.state),
            "sources": [{"path": str(self.logs / "*.log"), "source": "capped", "format": "plain"}],
            "batch": {"max_wait": "30ms", "max_records": 50},
            "poll_interval": "20ms",
            "discover_interval": "50ms",
            "release_after": "300ms",
            "shutdown_timeout": "3s",
            "metrics": {"summary_interval": 0},
            "max_open_files": 3,
            "close_inactive": "100ms",
        })


def test_kill_9_with_the_cap_in_force_loses_and_duplicates_nothing(
        stub: IngestStub, agent_processes: Callable[..., Any]) -> None:
    agent: CappedAgent = agent_processes(CappedAgent, stub.url)
    expected: list[str] = []

    def lines(i: int, start: int, stop: int) -> None:
        new = [f"file {i:02d} line {j:05d}" for j in range(start, stop)]
        write_lines(agent.logs / f"f{i:02d}.log", new)
        expected.extend(new)

    def log_descriptors() -> int:
        """The agent's descriptors on files under logs/, checked against the cap."""
        assert agent.proc is not None
        fds = Path(f"/proc/{agent.proc.pid}/fd")
        held = []
        with contextlib.suppress(OSError):
            for fd in fds.iterdir():
                with contextlib.suppress(OSError):
                    # Files in logs/, not logs/ itself (a glob's scandir holds it for a moment).
                    target = os.readlink(fd)
                    if target.startswith(str(agent.logs) + os.sep):
                        held.append(target)
        assert len(held) <= 3, held
        return len(held)

    for i in range(20):
        lines(i, 0, 150)
    agent.start()
    wait_for(lambda: log_descriptors() >= 0 and len(stub.messages()) >= 600, interval=0.01,
             what="some files shipped")
    for i in range(0, 20, 3):  # some closed as inactive, some open, some still waiting
        lines(i, 150, 250)
    assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
    shipped_before = len(stub.messages())
    assert 0 < shipped_before < len(expected)
    for i in range(0, 20, 2):
        lines(i, 250, 300)
    lines(20, 0, 100)  # a new file while stopped
    agent.start()
    wait_for(lambda: log_descriptors() >= 0 and len(stub.messages()) >= len(expected), interval=0.01,
             what="every line of every file")
    time.sleep(0.5)  # a duplicate would arrive now
    assert sorted(stub.messages()) == sorted(expected)
    assert agent.signal(signal.SIGTERM) == 0
    assert sorted(stub.messages()) == sorted(expected)
    # The checkpoint covers everything shipped (also batches re-sent for files
    # that waited for a slot): one more start reads nothing again.
    agent.start()
    # Files read to their end are known again without being opened; one whose
    # checkpoint lagged behind would be read (again) at once.
    time.sleep(2)
    assert agent.signal(signal.SIGTERM) == 0
    assert sorted(stub.messages()) == sorted(expected)
    assert "unread lines lost" not in agent.output()


async def test_files_waiting_for_a_descriptor_count_in_the_lag_metric(tmp_path, stub, start_agent) -> None:
    from tests.agent.ingest_stub import json_answer

    stub.responder = lambda n: json_answer(503, {"error": {"code": "busy", "message": "later"}})
    logs = tmp_path / "logs"
    logs.mkdir()
    sizes = {}
    for i in range(6):
        path = logs / f"f{i}.log"
        write_lines(path, [f"file {i} line {j}" for j in range(10 + i)])
        sizes[str(path)] = path.stat().st_size
    running = await start_agent(agent_config(tmp_path, stub.url, [src(tmp_path)], max_open_files=2))
    def waiting() -> int:
        tailer = getattr(running.agent, "tailer", None)  # set once the agent runs
        return len(tailer.waiting) if tailer is not None else 0

    await eventually(lambda: waiting() >= 3, what="files waiting for a descriptor")
    lag = {path: behind for _, path, behind in running.agent.metrics.file_lag()}
    assert lag == sizes, "every file, open or waiting, lags by its unacknowledged bytes"
    text = running.agent.metrics.prometheus()
    assert f'logferry_agent_file_lag_bytes{{source="app",path="{logs / "f5.log"}"}} {sizes[str(logs / "f5.log")]}' \
        in text


async def test_busy_files_take_turns_with_waiting_ones(tmp_path, stub, start_agent) -> None:
    # Four files that never stop growing under a cap of two: without turns the
    # first two would keep their slots (never idle) and the others never be read.
    logs = tmp_path / "logs"
    logs.mkdir()
    paths = [logs / f"busy{i}.log" for i in range(4)]
    for path in paths:
        write_lines(path, [f"{path.stem} line 0000"])
    running = await start_agent(agent_config(tmp_path, stub.url, [src(tmp_path)], max_open_files=2,
                                             file_turn="300ms", discover_interval="50ms"))
    watch = OpenFilesWatch(running.agent)
    written = 1
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for path in paths:
                write_lines(path, [f"{path.stem} line {written:04d}"])
            written += 1
            await asyncio.sleep(0.02)
            if all(count(stub, f"{p.stem} ") for p in paths) and written > 150:
                break
        assert all(count(stub, f"{p.stem} ") for p in paths), "every busy file had a turn"
        assert watch.max_open <= 2
    finally:
        watch.stop()
    # Stopped writing: every line of every file arrives, once.
    await eventually(lambda: all(len(count(stub, f"{p.stem} ")) == written for p in paths), timeout=20,
                     what="every line of the four files")
    for path in paths:
        assert count(stub, f"{path.stem} ") == sorted(f"{path.stem} line {i:04d}" for i in range(written))
