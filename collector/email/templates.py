"""Email templates: Jinja2 with HTML autoescaping, loaded by ``template_id``.

A template is up to three files in the configured folder (searched first)
or in the built-in ``collector/email/templates`` folder:

- ``<template_id>.subject.txt`` — the subject (one line; optional when the request has one),
- ``<template_id>.html`` — the HTML body (autoescaped),
- ``<template_id>.txt`` — the text body (not escaped); derived from the HTML when absent.

Undefined variables are errors (``StrictUndefined``; test optional ones with
``is defined``), so missing ``template_data`` is reported, naming the
variable, before anything is stored or sent.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

from collector.email.message import InvalidEmail

BUILTIN_FOLDER = Path(__file__).parent / "templates"
TEMPLATE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*(?:/[a-z0-9][a-z0-9_-]*)*$")


class RenderedEmail:
    __slots__ = ("html", "subject", "text")

    def __init__(self, subject: str | None, html: str | None, text: str):
        self.subject = subject
        self.html = html
        self.text = text


class TemplateRenderer:
    """Renders request bodies or folder templates; thread-safe after construction."""

    def __init__(self, folder: str | None = None, *, filters: Mapping[str, Callable[..., Any]] | None = None):
        folders = [str(Path(folder).expanduser())] if folder else []
        folders.append(str(BUILTIN_FOLDER))
        loader = jinja2.FileSystemLoader(folders)

        def autoescape(name: str | None) -> bool:
            return name is None or name.endswith((".html", ".htm"))

        # Sandboxed: template_data comes from API callers.
        self._env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            loader=loader, autoescape=autoescape, undefined=jinja2.StrictUndefined,
            trim_blocks=True, lstrip_blocks=True, auto_reload=False,
        )
        self._text_env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            loader=loader, autoescape=False, undefined=jinja2.StrictUndefined,
            trim_blocks=True, lstrip_blocks=True, auto_reload=False,
        )
        for env in (self._env, self._text_env):
            env.filters.update(filters or {})

    def exists(self, template_id: str) -> bool:
        return any(self._find(template_id, suffix) for suffix in (".html", ".txt"))

    def _find(self, template_id: str, suffix: str) -> str | None:
        name = template_id + suffix
        try:
            self._env.get_template(name)
        except jinja2.TemplateNotFound:
            return None
        return name

    def render(self, *, template_id: str | None, data: Mapping[str, Any] | None, subject: str | None,
               html_body: str | None, text_body: str | None) -> RenderedEmail:
        """Fill the gaps of a request from its template; raises :class:`InvalidEmail`."""
        if template_id is None:
            text = text_body if text_body else html_to_text(html_body or "")
            return RenderedEmail(subject, html_body or None, text)
        if not TEMPLATE_ID_RE.match(template_id) or len(template_id) > 200:
            raise InvalidEmail("template_id", "lower-case letters, digits, _ - and / between names")
        if not self.exists(template_id):
            raise InvalidEmail("template_id", f"no template {template_id!r} (expected {template_id}.html or "
                                              f"{template_id}.txt in the templates folder)")
        variables = dict(data or {})
        try:
            if subject is None and self._find(template_id, ".subject.txt"):
                subject = " ".join(self._text_env.get_template(template_id + ".subject.txt")
                                   .render(variables).split())
            html_out = html_body
            if html_out is None and self._find(template_id, ".html"):
                html_out = self._env.get_template(template_id + ".html").render(variables)
            text_out = text_body
            if text_out is None and self._find(template_id, ".txt"):
                text_out = self._text_env.get_template(template_id + ".txt").render(variables)
        except jinja2.UndefinedError as exc:
            raise InvalidEmail("template_data", f"{exc.message} (template {template_id!r})") from None
        except jinja2.TemplateError as exc:
            raise InvalidEmail("template_id", f"template {template_id!r} failed to render: {exc}") from None
        if text_out is None:
            text_out = html_to_text(html_out or "")
        return RenderedEmail(subject, html_out, text_out)


# --- text from HTML -------------------------------------------------------------

_BLOCK = {"p", "div", "section", "article", "header", "footer", "table", "tr", "ul", "ol", "h1", "h2", "h3",
          "h4", "h5", "h6", "blockquote", "pre", "hr"}
_SKIP = {"style", "script", "head", "title"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._links: list[str | None] = []
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self._skip += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag in _BLOCK:
            self.parts.append("\n\n")
            if tag == "pre":
                self._pre += 1
        elif tag == "a":
            self._links.append(dict(attrs).get("href"))
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.parts.append(alt)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK:
            self.parts.append("\n\n")
            if tag == "pre":
                self._pre = max(0, self._pre - 1)
        elif tag in ("td", "th"):
            self.parts.append(" ")
        elif tag == "a" and self._links:
            href = self._links.pop()
            if href and href.startswith(("http://", "https://")):
                self.parts.append(f" ({href})")
            elif href and href.startswith("mailto:"):
                self.parts.append(f" ({href[7:]})")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """A readable text alternative: paragraphs and line breaks kept, links as ``text (url)``."""
    if not markup:
        return ""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    lines = [line.strip() for line in text.splitlines()]
    out = "\n".join(lines)
    out = re.sub(r"\n{3,}", "\n\n", out).strip()
    return out
