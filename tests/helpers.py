"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SECRET = "test-secret-key-0123456789abcdef0123456789"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (aiosmtpd cannot take port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(name: str) -> str:
    """Path of one of our console scripts in the running venv."""
    return str(VENV_BIN / name)


def wait_for(check: Callable[[], bool], timeout: float = 60.0, what: str = "condition",
             interval: float = 0.05) -> None:
    """Poll ``check`` (blocking: for tests driving real processes) until it
    holds; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class FakeClock:
    """Epoch seconds that move only when a test says so. Starts at the real
    time by default: tables have TTLs, so rows stamped months ago would vanish."""

    def __init__(self, now: float | None = None):
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def set(self, now: float) -> None:
        self.now = now
