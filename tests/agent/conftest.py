"""Agent test fixtures: a scriptable local ingest endpoint and an in-process agent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.configfile import convert
from agent.runner import Agent
from tests.agent.ingest_stub import IngestStub
from tests.helpers import cli


@pytest.fixture
def stub() -> Iterator[IngestStub]:
    server = IngestStub().start()
    yield server
    server.stop()


def agent_config(tmp_path: Path, url: str, sources: list[dict[str, Any]], **overrides: Any) -> AgentConfig:
    """A fast-polling agent config for tests."""
    data: dict[str, Any] = {
        "collector": {"url": url, "token": "test-token", "retry_initial": "20ms", "retry_max": "200ms"},
        "state_dir": str(tmp_path / "state"),
        "sources": sources,
        "batch": {"max_wait": "30ms"},
        "poll_interval": "20ms",
        "discover_interval": "50ms",
        "release_after": "300ms",
        "shutdown_timeout": "3s",
        "metrics": {"summary_interval": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return convert(data, AgentConfig)


class RunningAgent:
    def __init__(self, agent: Agent, task: asyncio.Task[int]) -> None:
        self.agent = agent
        self.task = task

    async def stop(self) -> int:
        self.agent.request_stop()
        return await asyncio.wait_for(self.task, 15)


@pytest.fixture
async def start_agent() -> AsyncIterator[Callable[[AgentConfig], Any]]:
    """``await start_agent(cfg)`` runs an Agent in this loop; stopped at teardown."""
    running: list[RunningAgent] = []

    async def start(cfg: AgentConfig) -> RunningAgent:
        agent = Agent(cfg)
        task = asyncio.get_running_loop().create_task(agent.run())
        handle = RunningAgent(agent, task)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        if not handle.task.done():
            await handle.stop()


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def write_lines(path: Path, lines: list[str], mode: str = "a") -> None:
    with path.open(mode) as out:
        out.write("".join(line + "\n" for line in lines))


class AgentProcess:
    """A real ``logferry-agent run`` process with the given ``agent:`` section;
    its output goes to ``workdir/agent.log``."""

    def __init__(self, workdir: Path, section: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config = workdir / "agent.yaml"
        self.config.write_text(json.dumps({"agent": section}))
        self.log_path = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}  # set in the process's environment, over this one's

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([cli("logferry-agent"), "run", "-c", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})

    def signal(self, signum: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        code = self.proc.wait(30)
        self.proc = None
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)

    def output(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def agent_processes(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``make(Kind, *args)``: a ``Kind`` (an :class:`AgentProcess`) in its own
    folder under ``tmp_path``; every one still running is stopped at the end."""
    made: list[AgentProcess] = []

    def make(kind: type[AgentProcess], *args: Any, **kwargs: Any) -> Any:
        workdir = tmp_path / f"agent{len(made)}"
        workdir.mkdir()
        proc = kind(workdir, *args, **kwargs)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()
