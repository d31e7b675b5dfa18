"""The example plugin package (examples/logferry-pagerduty), installed for
real with pip and found through its `logferry` entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from plugins.testing import Receiver

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "logferry-pagerduty"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(site folder the package is installed into, a copy of its source tree)."""
    work = tmp_path_factory.mktemp("example-plugin")
    source = work / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True, timeout=300)
    assert (site / "logferry_pagerduty").is_dir()
    yield site, source


def env_with(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    return env


def test_the_example_plugins_own_tests_pass(installed: tuple[Path, Path]) -> None:
    site, source = installed
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=source,
                         env=env_with(site), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 passed" in out.stdout


def test_pipelines_test_dry_runs_a_pipeline_using_the_installed_plugin(installed: tuple[Path, Path]) -> None:
    site, source = installed
    out = subprocess.run(
        [str(BIN / "logferry-collector"), "pipelines", "test", "pipelines/errors-to-pagerduty.yaml",
         "--events", "pipelines/events.ndjson"],
        cwd=source, env=env_with(site), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "▶ run at 2026-03-02T12:00:50+00:00 source=payments: count 10"
    assert lines[1].startswith("  1. pagerduty (pagerduty): trigger PagerDuty incident "
                               "'logferry:errors-to-pagerduty:[\"payments\"]' (critical): "
                               "10 errors in payments within 5m: ledger out of balance")
    assert lines[2].startswith("▶ run at 2026-03-02T12:05:50+00:00 source=payments: count 0")
    assert lines[3].startswith("  1. pagerduty (pagerduty): resolve PagerDuty incident "
                               "'logferry:errors-to-pagerduty:[\"payments\"]'")
    assert lines[-1] == "11 events, 10 matched, 2 runs"


async def test_a_collector_runs_a_pipeline_with_the_installed_plugin(
        installed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        collector_app: Callable[..., Any], http_receiver: Callable[[], Any]) -> None:
    import datetime as dt

    import orjson

    from collector import appkeys
    from pipelines.service import PIPELINES

    site, source = installed
    monkeypatch.syspath_prepend(str(site))
    pagerduty: Receiver = await http_receiver()
    pagerduty.respond(202, {"status": "success", "dedup_key": "abc"})
    text = (source / "pipelines" / "errors-to-pagerduty.yaml").read_text().replace(
        "      severity:", f"      url: {pagerduty.url}/v2/enqueue\n      severity:")
    try:
        client = await collector_app([text])
        manager = client.app[appkeys.PLUGINS]
        assert manager.steps()["pagerduty"].plugin == "pagerduty"
        tokens = client.app[appkeys.TOKENS]
        _, token = await tokens.storage.run(lambda: tokens.create_sync(kind="ingest", name="t", created_by="t"))
        await tokens.load()
        now = dt.datetime.now(dt.UTC).isoformat()
        body = b"\n".join(orjson.dumps({"timestamp": now, "level": "ERROR", "source": "checkout",
                                        "message": f"boom {i}"}) for i in range(10))
        response = await client.post("/v1/ingest", data=body, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/x-ndjson"})
        assert response.status == 200
        [request] = await pagerduty.wait_for(1)
        await client.app[PIPELINES].drain()
        event = orjson.loads(request["body"])
        assert event["dedup_key"] == 'logferry:errors-to-pagerduty:["checkout"]'
        assert event["payload"]["summary"] == "10 errors in checkout within 5m: boom 9"
    finally:
        sys.modules.pop("logferry_pagerduty", None)
