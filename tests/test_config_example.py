"""config.example.yaml is valid and documents every key of both sections, each with a comment."""

from __future__ import annotations

import re
import types
import typing
from typing import Any

import msgspec
import pytest

from agent.config import AgentConfig
from agent.configfile import load_yaml, section
from collector.config import CollectorConfig
from tests.helpers import ROOT

EXAMPLE = ROOT / "config.example.yaml"
ENV = {
    "LOGFERRY_SECRET_KEY": "x" * 40,
    "LOGFERRY_INGEST_TOKEN": "token",
    "MAILGUN_WEBHOOK_SIGNING_KEY": "key",
    "RESEND_WEBHOOK_SECRET": "whsec_c2VjcmV0",
}


def struct_paths(tp: Any, prefix: str) -> list[str]:
    """Every key path a Struct accepts (lists of Structs as ``key[]``; free-form dicts stop there)."""
    out = []
    for field in msgspec.structs.fields(tp):
        path = f"{prefix}.{field.encode_name}"
        out.append(path)
        inner = field.type
        suffix = ""
        for _ in range(3):
            origin = typing.get_origin(inner)
            args = [a for a in typing.get_args(inner) if a is not type(None)]
            if origin is typing.Annotated:
                inner = args[0]
            elif origin in (typing.Union, types.UnionType) and len(args) == 1:
                inner = args[0]
            elif origin is list and args:
                inner, suffix = args[0], suffix + "[]"
            else:
                break
        if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
            out.extend(struct_paths(inner, path + suffix))
    return out


def example_paths(data: Any, prefix: str) -> set[str]:
    found = set()
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            found.add(path)
            found |= example_paths(value, path)
    elif isinstance(data, list):
        for item in data:
            found |= example_paths(item, prefix + "[]")
    return found


def commented_keys(text: str) -> set[str]:
    """Keys shown in commented-out examples (``# key: value``)."""
    return set(re.findall(r"#\s*-?\s*([A-Za-z_][A-Za-z0-9_]*):", text))


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return load_yaml(EXAMPLE)


def test_the_example_config_is_valid_for_both_sections(example: Any) -> None:
    agent = section(example, "agent", AgentConfig)
    collector = section(example, "collector", CollectorConfig)
    assert agent.sources and agent.redact.enabled
    assert collector.storage.dsn.startswith("chdb://")


@pytest.mark.parametrize(("name", "tp"), [("agent", AgentConfig), ("collector", CollectorConfig)])
def test_the_example_documents_every_key(example: Any, name: str, tp: Any) -> None:
    present = example_paths(example.data, "")
    shown_in_comments = commented_keys(EXAMPLE.read_text())
    missing = [p for p in struct_paths(tp, name)
               if p not in present and p.rsplit(".", 1)[-1] not in shown_in_comments]
    assert not missing, f"config.example.yaml does not show: {missing}"


def test_every_key_line_has_a_comment() -> None:
    lines = EXAMPLE.read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not re.match(r"^-?\s*[A-Za-z_][A-Za-z0-9_]*:", stripped):
            continue  # list items and continuation lines
        above = lines[i - 1].strip() if i else ""
        if "#" not in line and not above.startswith("#"):
            undocumented.append(f"line {i + 1}: {stripped}")
    assert not undocumented, "\n".join(undocumented)
