"""Shared fixtures: real chDB storage, a collector app, real collector processes.

chDB allows one data path per process (field-notes.md): this pytest process
opens one path for the whole session and isolates tests by giving each its
own database. A collector started as a subprocess gets its own data folder.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from agent.configfile import convert
from collector.app import create_app
from collector.auth import TokenScope, TokenService
from collector.config import CollectorConfig
from collector.storage import Storage
from tests.helpers import SECRET, cli, free_port

if TYPE_CHECKING:
    from plugins.testing import DatabasePool

# database_pool, and the fixtures plugin authors use, for every test. (Not
# imported above at run time: pytest must import it itself to rewrite asserts.)
pytest_plugins = ["plugins.testing"]


@pytest.fixture(scope="session")
def chdb_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="logferry-chdb-") as path:
        yield path


@pytest.fixture(scope="session")
def chdb_dsn(chdb_dir: str) -> str:
    return f"chdb://{chdb_dir}"


@pytest.fixture
def storage(database_pool: DatabasePool) -> Iterator[Storage]:
    """A migrated, empty Storage that only this test uses (from the session's pool)."""
    store = database_pool.acquire()
    yield store
    database_pool.release(store)


@pytest.fixture
def make_config(chdb_dsn: str) -> Callable[..., CollectorConfig]:
    """``make_config(**section_overrides)`` → a CollectorConfig for tests."""

    def make(**overrides: Any) -> CollectorConfig:
        data: dict[str, Any] = {
            "secret_key": SECRET,
            "storage": {"dsn": chdb_dsn, "database": "unused"},
            "listen": "127.0.0.1:0",
            "public_url": "http://127.0.0.1:8080",
        }
        data.update(overrides)
        if data["listen"].endswith(":0"):
            data["listen"] = data["listen"][:-2] + ":8080"
        return convert(data, CollectorConfig)

    return make


@pytest.fixture
async def make_client(storage: Storage) -> AsyncIterator[Callable[..., Any]]:
    """``await make_client(config)`` → an aiohttp TestClient over the real app on
    this test's database. Several may run (e.g. a restart) on the same storage."""
    clients: list[TestClient[Any, Any]] = []

    async def make(config: CollectorConfig) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(config, storage=storage)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def app_client(make_client: Callable[..., Any], make_config: Callable[..., CollectorConfig]) -> Any:
    """A TestClient over the collector app with default test config."""
    return await make_client(make_config())


class Tokens:
    """Mint tokens of each kind straight into the test's storage."""

    def __init__(self, storage: Storage):
        self.service = TokenService(storage, SECRET)

    def create(self, kind: str, *, name: str | None = None, user_id: str | None = None,
               scope: TokenScope | None = None, ip_whitelist: list[str] | None = None,
               expires_in: dt.timedelta | None = None) -> str:
        if kind == "logs" and scope is None:
            scope = TokenScope(sources=["*"])
        if kind == "user" and user_id is None:
            user_id = f"user-{uuid.uuid4().hex[:8]}"
        _, token = self.service.create_sync(
            kind=kind, name=name or f"test-{kind}", created_by="tests", user_id=user_id, permissions=scope,
            ip_whitelist=ip_whitelist or [], expires_in=expires_in,
        )
        return token

    def headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def tokens(storage: Storage) -> Tokens:
    """Create tokens BEFORE starting the client (the app loads them at start),
    or call ``await app[TOKENS].load()`` after."""
    return Tokens(storage)


@pytest.fixture
def admin_token(tokens: Tokens) -> str:
    return tokens.create("admin")


# --- real processes ---------------------------------------------------------


class CollectorProcess:
    """``logferry-collector serve`` as a real process on its own data folder."""

    def __init__(self, workdir: Path, extra: dict[str, Any] | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "logferry.yaml"
        collector: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "storage": {"dsn": f"chdb://{workdir / 'clickhouse'}"},
            "secret_key": SECRET,
            "public_url": self.url,
        }
        collector.update(extra or {})
        self.config_path.write_text(yaml.safe_dump({"collector": collector}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "collector.log"
        self.admin_token = self.create_token("admin", "tests-admin")
        self.ingest_token = self.create_token("ingest", "tests-ingest")

    def create_token(self, kind: str, name: str, *extra: str) -> str:
        out = subprocess.run(
            [cli("logferry-collector"), "token", "create", "-c", str(self.config_path), "--kind", kind,
             "--name", name, "--expires-in", "7d", *extra],
            capture_output=True, text=True, timeout=120, cwd=self.workdir,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    def start(self, timeout: float = 60.0) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [cli("logferry-collector"), "serve", "-c", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        import urllib.request

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"collector did not become ready: {self.log_path.read_text()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def query_logs(self, **params: Any) -> dict[str, Any]:
        """GET /v1/logs with the admin token (lists for repeated parameters)."""
        import urllib.parse
        import urllib.request

        query = urllib.parse.urlencode(params, doseq=True)
        req = urllib.request.Request(f"{self.url}/v1/logs?{query}",
                                     headers={"Authorization": f"Bearer {self.admin_token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return msgspec.json.decode(r.read())  # type: ignore[no-any-return]

    def all_logs(self, **params: Any) -> list[dict[str, Any]]:
        """Every matching log, following next_cursor."""
        out: list[dict[str, Any]] = []
        params.setdefault("limit", 1000)
        while True:
            page = self.query_logs(**params)
            out.extend(page["logs"])
            if not page["next_cursor"]:
                return out
            params["cursor"] = page["next_cursor"]


@pytest.fixture
def collector_process(tmp_path: Path) -> Iterator[CollectorProcess]:
    """A running collector process; ``.stop()``/``.start()`` for outage and restart tests."""
    proc = CollectorProcess(tmp_path)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def collector_process_factory(tmp_path: Path) -> Iterator[Callable[..., CollectorProcess]]:
    """Build a collector process with extra ``collector:`` config (not started)."""
    made: list[CollectorProcess] = []

    def make(extra: dict[str, Any] | None = None, name: str = "collector") -> CollectorProcess:
        workdir = tmp_path / name
        workdir.mkdir()
        proc = CollectorProcess(workdir, extra)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests talk to 127.0.0.1 only; never through a proxy from the environment.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
