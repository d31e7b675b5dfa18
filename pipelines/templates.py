"""Step parameters as Jinja2 templates, rendered in a sandbox.

Templates are compiled when a pipeline loads, so a syntax error or a
misspelt variable (``{{ evnt.message }}``) is a load error with a line
number, not a surprise at 3 a.m. Missing attributes of known variables render
empty (``{{ event.context.tenant }}`` when there is none), so templates stay
short; ``| default("…")`` says what to print instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Variables every step template may use (docs/plugins.md describes each).
TEMPLATE_VARIABLES = frozenset({
    "event", "events", "group", "group_key", "count", "suppressed", "rule", "steps",
    "pipeline", "now", "run_id", "schedule", "resolved",
})


class TemplateError(Exception):
    pass


class Templates:
    """A sandboxed environment with the registered filters and a compile cache."""

    def __init__(self, filters: Mapping[str, Callable[..., Any]] | None = None):
        self.env = ImmutableSandboxedEnvironment(
            undefined=jinja2.ChainableUndefined, autoescape=False, keep_trailing_newline=True,
        )
        self.env.filters.update(filters or {})
        self._cache: dict[str, jinja2.Template] = {}
        self._expressions: dict[str, Any] = {}

    def check(self, source: str, *, expression: bool = False) -> str | None:
        """The problem with a template, or None: syntax, unknown variables, unknown filters."""
        text = f"{{{{ {source} }}}}" if expression else source
        try:
            ast = self.env.parse(text)
            self.env.compile(ast)
        except jinja2.TemplateSyntaxError as exc:
            return f"template error: {exc.message}"
        except jinja2.TemplateAssertionError as exc:  # unknown filter or test
            return f"template error: {exc.message}"
        unknown = jinja2.meta.find_undeclared_variables(ast) - TEMPLATE_VARIABLES
        if unknown:
            return (f"unknown template variable {', '.join(sorted(unknown))} "
                    f"(expected one of: {', '.join(sorted(TEMPLATE_VARIABLES))})")
        return None

    def template(self, source: str) -> jinja2.Template:
        found = self._cache.get(source)
        if found is None:
            found = self._cache[source] = self.env.from_string(source)
        return found

    def render(self, source: str, variables: Mapping[str, Any]) -> str:
        if "{" not in source:
            return source
        try:
            return self.template(source).render(variables)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"{type(exc).__name__}: {exc}") from exc

    def evaluate(self, expression: str, variables: Mapping[str, Any]) -> Any:
        """The value of a Jinja2 expression (``count > 10``); ``{{ … }}`` around it is allowed."""
        expression = strip_braces(expression)
        compiled = self._expressions.get(expression)
        if compiled is None:
            compiled = self._expressions[expression] = self.env.compile_expression(expression)
        try:
            return compiled(**variables)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"{type(exc).__name__}: {exc}") from exc


def strip_braces(expression: str) -> str:
    text = expression.strip()
    if text.startswith("{{") and text.endswith("}}"):
        return text[2:-2].strip()
    return text


def is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def render_tree(templates: Templates, value: Any, variables: Mapping[str, Any]) -> Any:
    """Render every template string inside nested dicts and lists."""
    if isinstance(value, str):
        return templates.render(value, variables) if is_template(value) else value
    if isinstance(value, dict):
        return {k: render_tree(templates, v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [render_tree(templates, v, variables) for v in value]
    return value


def template_paths(value: Any, path: str) -> list[tuple[str, str]]:
    """``(path, template)`` for every template string inside ``value``."""
    if isinstance(value, str):
        return [(path, value)] if is_template(value) else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in template_paths(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in template_paths(v, f"{path}[{i}]")]
    return []
