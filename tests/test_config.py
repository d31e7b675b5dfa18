"""Config loading: typed, every error with its YAML path and line, ${ENV} substitution."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.configfile import ConfigInvalid, load_yaml, parse_yaml, section
from collector.config import CollectorConfig, load_collector_config
from tests.helpers import cli

ROOT = Path(__file__).resolve().parent.parent


def test_every_error_is_reported_with_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "collector:\n"
        "  listen: nowhere\n"
        "  storage: {dsn: 'mysql://x'}\n"
        "  secret_key: short\n"
        "  ingest:\n"
        "    max_body: lots\n"
        "  colour: blue\n"
    )
    with pytest.raises(ConfigInvalid) as info:
        load_collector_config(str(path))
    text = str(info.value)
    assert f"{path}:3: collector.storage: dsn must start with chdb://" in text
    assert f"{path}:6: collector.ingest.max_body: expected a size" in text
    assert f"{path}:7: collector.colour: unknown key" in text


def test_cross_field_rules_are_checked_once_the_types_are_right(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("collector:\n  listen: nowhere\n  secret_key: short\n")
    with pytest.raises(ConfigInvalid) as info:
        load_collector_config(str(path))
    assert "collector: secret_key must be at least 32 characters" in str(info.value)


def test_environment_variables_are_substituted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SECRET", "s" * 40)
    doc = parse_yaml("collector:\n  secret_key: ${TEST_SECRET}\n  public_url: ${UNSET_VAR:-http://x:1}\n")
    config = section(doc, "collector", CollectorConfig)
    assert config.secret_key == "s" * 40
    assert config.public_url == "http://x:1"


def test_yaml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("collector:\n  listen: [unclosed\n  secret_key: x\n")
    with pytest.raises(ConfigInvalid) as info:
        load_yaml(path)
    assert info.value.errors[0].line is not None
    assert "invalid YAML" in str(info.value)


def test_serve_prints_every_config_error_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("collector:\n  storage: {dsn: 'ftp://x'}\n  secret_key: short\n  bogus: 1\n")
    out = subprocess.run([cli("logferry-collector"), "serve", "-c", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "collector.storage: dsn must start with" in out.stderr
    assert "collector.bogus: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_fields_mapping_may_not_send_two_record_fields_to_one_key(tmp_path: Path) -> None:
    from agent.config import load_agent_config

    path = tmp_path / "agent.yaml"
    path.write_text("agent:\n  sources:\n    - path: /var/log/app.log\n      source: app\n      format: json\n"
                    "      fields: {message: level, level: level}\n")
    with pytest.raises(ConfigInvalid) as info:
        load_agent_config(str(path))
    assert "agent.sources[0]: `fields` maps several record fields to the same key: ['level']" in str(info.value)
