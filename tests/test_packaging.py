"""The agent stays light: importing it pulls in none of the collector's dependencies."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import agent

HEAVY = ["collector", "clickhouse_connect", "chdb", "orjson", "pluggy", "jinja2", "jwt", "aiosmtplib",
         "cryptography", "pipelines", "plugins", "aiohttp"]


def test_importing_every_agent_module_imports_no_collector_dependency() -> None:
    modules = ["agent"] + [f"agent.{m.name}" for m in pkgutil.iter_modules([str(Path(agent.__file__).parent)])]
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [], f"agent imported {out.stdout}"
    assert len(modules) > 3


def test_agent_dependencies_are_the_base_install_only() -> None:
    import tomllib

    meta = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    base = " ".join(meta["project"]["dependencies"]).lower()
    for heavy in ("clickhouse", "chdb", "pluggy", "jinja2", "pyjwt", "aiosmtplib", "aiohttp"):
        assert heavy not in base
    assert meta["project"]["scripts"]["logferry-agent"] == "agent.cli:main"
    assert meta["project"]["scripts"]["logferry-collector"] == "collector.cli:main"
