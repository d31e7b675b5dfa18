"""Step templates: rendered in a sandbox, checked at load, lenient on missing data."""

from __future__ import annotations

import datetime as dt

import pytest

from pipelines.templates import TemplateError, Templates
from plugins.manager import build_plugin_manager

TEMPLATES = Templates(build_plugin_manager(entry_points=False).template_filters())


def test_the_sandbox_refuses_python_internals() -> None:
    with pytest.raises(TemplateError, match="SecurityError"):
        TEMPLATES.render("{{ event.__class__.__mro__[1].__subclasses__() }}", {"event": {}})
    with pytest.raises(TemplateError, match="SecurityError"):
        TEMPLATES.render("{{ steps.update({'x': 1}) }}", {"steps": {}})  # no mutation either


def test_missing_data_renders_empty_and_default_fills_it() -> None:
    variables = {"event": {"context": {}}}
    assert TEMPLATES.render("[{{ event.context.tenant.name }}]", variables) == "[]"
    assert TEMPLATES.render("{{ event.context.tenant | default('none') }}", variables) == "none"


def test_registered_filters_are_available() -> None:
    when = dt.datetime(2026, 3, 29, 6, 30, tzinfo=dt.UTC)
    assert TEMPLATES.render("{{ t | datetime('%H:%M', 'Europe/Berlin') }}", {"t": when}) == "08:30"
    assert TEMPLATES.render("{{ 3600 | duration }} {{ 90 | duration }} {{ 0.25 | duration }}", {}) == "1h 90s 250ms"
    assert TEMPLATES.render("{{ x | tojson }}", {"x": {"at": when}}) == '{"at":"2026-03-29T06:30:00+00:00"}'
    assert TEMPLATES.render("{{ 'abcdefghij' | truncate_middle(5) }}", {}) == "ab…ij"


def test_load_time_checks_catch_typos() -> None:
    assert TEMPLATES.check("{{ evnt.message }}") is not None
    assert "unknown template variable evnt" in (TEMPLATES.check("{{ evnt.message }}") or "")
    assert "No filter named 'shout'" in (TEMPLATES.check("{{ event.message | shout }}") or "")
    assert TEMPLATES.check("{% for r in steps.q.rows %}{{ r.count }}{% endfor %}") is None
    assert TEMPLATES.check("count >= 10", expression=True) is None


def test_when_expressions_accept_braces() -> None:
    assert TEMPLATES.evaluate("{{ count > 3 }}", {"count": 5}) is True
    assert TEMPLATES.evaluate("event.level == 'ERROR'", {"event": {"level": "WARN"}}) is False
