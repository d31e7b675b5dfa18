"""The plugin guide stays in step with the code (datasette's test_docs idea):
every hook, every built-in step type and every example pipeline is in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from plugins import hookspecs
from plugins.manager import build_plugin_manager

ROOT = Path(__file__).resolve().parent.parent
GUIDE = (ROOT / "docs" / "plugins.md").read_text()
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("logferry_"))
DOCUMENTED = re.findall(r"^### (logferry_\w+)$", GUIDE, re.MULTILINE)


def test_there_are_hooks_to_document() -> None:
    assert len(HOOKS) >= 10


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_section_in_the_plugin_guide(hook: str) -> None:
    assert hook in DOCUMENTED, f"docs/plugins.md has no `### {hook}` section"


def test_the_guide_documents_no_hook_that_does_not_exist() -> None:
    assert sorted(DOCUMENTED) == HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_docstring(hook: str) -> None:
    doc = getattr(hookspecs, hook).__doc__ or ""
    assert len(doc.strip()) > 40


def test_every_registered_step_type_is_in_the_guide() -> None:
    for name in build_plugin_manager(entry_points=False).steps():
        assert f"| `{name}` |" in GUIDE, f"step type {name!r} is missing from the built-in steps table"


def test_every_example_pipeline_is_mentioned() -> None:
    for path in sorted((ROOT / "pipelines" / "examples").glob("*.yaml")):
        assert f"`{path.name}`" in GUIDE


def test_every_match_key_operator_and_rule_type_is_in_the_guide() -> None:
    from pipelines.match import MATCH_KEYS, OPERATORS
    from pipelines.rules import RULE_TYPES

    for key in MATCH_KEYS:
        assert f"`{key}" in GUIDE, f"match key {key!r} is not documented"
    operators = re.search(r"Operators under `where`: `([^`]+)`", GUIDE)
    assert operators is not None and operators.group(1).split() == list(OPERATORS)
    for rule_type in RULE_TYPES:
        assert f"| `{rule_type}`" in GUIDE, f"rule type {rule_type!r} is not documented"


def test_every_template_variable_is_in_the_guide() -> None:
    from pipelines.templates import TEMPLATE_VARIABLES

    for name in TEMPLATE_VARIABLES:
        assert f"`{name}`" in GUIDE, f"template variable {name!r} is not documented"
