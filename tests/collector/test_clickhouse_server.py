"""The same schema, ingest and query on a ClickHouse server (the http:// DSN).

Needs a Docker engine for testcontainers; skipped, with the reason, where none runs.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.schema import all_migrations, migrate
from collector.storage import Storage


def _docker_available() -> str | None:
    """None when a Docker engine answers, else why not."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return "no Docker engine for testcontainers here (no DOCKER_HOST and no /var/run/docker.sock)"
    import docker

    # docker-py leaves a socket open when the engine does not answer; keep
    # that library's ResourceWarning inside this probe.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=3)
            client.ping()
            client.close()
        except Exception as exc:
            return f"no Docker engine for testcontainers here ({type(exc).__name__})"
        finally:
            gc.collect()
    return None


pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def server_dsn() -> Iterator[str]:
    reason = _docker_available()
    if reason is not None:
        pytest.skip(reason)
    from testcontainers.community.clickhouse import ClickHouseContainer

    with ClickHouseContainer("clickhouse/clickhouse-server:26.9", username="logferry", password="secret") as ch:
        host = ch.get_container_host_ip()
        port = ch.get_exposed_port(8123)
        yield f"http://logferry:secret@{host}:{port}/default"


def test_migrations_and_log_round_trip_on_a_clickhouse_server(server_dsn: str) -> None:
    storage = Storage(server_dsn, f"t_{uuid.uuid4().hex[:8]}")
    try:
        assert [m.version for m in migrate(storage)] == [m.version for m in all_migrations()]
        assert migrate(storage) == []
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.000")
        storage.insert_rows_sync("application_logs", [
            {"id": str(uuid.uuid4()), "timestamp": now, "level": "ERROR", "source": "payments",
             "message": "Card declined", "tags": ["billing"]}])
        rows = storage.query_sync(
            "SELECT level, source FROM application_logs WHERE hasAllTokens(message, {w:Array(String)})",
            {"w": ["declined"]})
        assert rows == [{"level": "ERROR", "source": "payments"}]
    finally:
        storage.command_sync(f"DROP DATABASE IF EXISTS `{storage.database}`")
        storage.close()
