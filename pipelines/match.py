"""The match language: a YAML mapping compiled once into a fast predicate.

::

    match:
      level: WARN                      # minimum level
      source: ["payments*", "billing"] # globs, any of
      contains: ["timeout", "refused"] # substrings of message, any of
      regex: "upstream \\d+ failed"    # Python regex searched in message
      tags: [db]                       # the record has every one of these tags
      where:                           # record fields and context paths
        context.http.status: {gte: 500}
        user_id: {exists: true}
        duration_ms: {gt: 1000}
        host: web-1                    # a bare value means equality
      any: [{source: "web*"}, {level: CRITICAL}]
      all: [...]
      not: {contains: healthcheck}

Every key present must hold (they are and-ed). Operators under ``where``:
``eq ne gt gte lt lte in not_in exists contains regex glob``.

This module knows nothing of storage or HTTP; :func:`compile_match` returns
the predicate plus a :class:`Prefilter` that storage-side code may use to
narrow a rebuild query (it may match more than the predicate, never less).
"""

from __future__ import annotations

import fnmatch
import functools
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

LEVELS = ("DEBUG", "INFO", "WARN", "ERROR", "CRITICAL")
LEVEL_RANK = {name: i for i, name in enumerate(LEVELS)}
_LEVEL_ALIASES = {"WARNING": "WARN", "ERR": "ERROR", "FATAL": "CRITICAL", "CRIT": "CRITICAL",
                  "TRACE": "DEBUG", "NOTICE": "INFO", "INFORMATION": "INFO", "EMERG": "CRITICAL",
                  "ALERT": "CRITICAL", "PANIC": "CRITICAL"}

Predicate = Callable[[Mapping[str, Any]], bool]
MATCH_KEYS = ("level", "source", "contains", "regex", "tags", "where", "any", "all", "not")
OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "exists", "contains", "regex", "glob")


def normalize_level(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    name = value.strip().upper()
    name = _LEVEL_ALIASES.get(name, name)
    return name if name in LEVEL_RANK else None


class Prefilter(msgspec.Struct, kw_only=True):
    """What every matching record is known to satisfy (for rebuild queries)."""

    min_level: str | None = None
    source_globs: list[str] | None = None


class MatchError(Exception):
    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{p}: {m}" for p, m in errors))


_MISSING = object()


def field_getter(path: str) -> Callable[[Mapping[str, Any]], Any]:
    """A function reading ``path`` (``message``, ``context.http.status``) from an
    event; missing keys read as ``None``. A top-level key containing dots wins."""
    parts = path.split(".")
    if len(parts) == 1:
        return lambda event: event.get(path)

    def get(event: Mapping[str, Any]) -> Any:
        direct = event.get(path, _MISSING)
        if direct is not _MISSING:
            return direct
        value: Any = event
        for part in parts:
            # dict first: the ABC check is ten times slower and events are dicts.
            if type(value) is dict or isinstance(value, Mapping):
                value = value.get(part)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return None
            if value is None:
                return None
        return value

    return get


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _compile_globs(globs: list[str]) -> Callable[[Any], bool]:
    pattern = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
    cache: dict[str, bool] = {}

    def test(value: Any) -> bool:
        if not isinstance(value, str):
            return False
        hit = cache.get(value)
        if hit is None:
            hit = pattern.match(value) is not None
            if len(cache) < 50_000:
                cache[value] = hit
        return hit

    return test


def _safe_compare(op: Callable[[Any, Any], bool], expected: Any) -> Callable[[Any], bool]:
    def test(value: Any) -> bool:
        if value is None:
            return False
        try:
            return op(value, expected)
        except TypeError:
            return False

    return test


def _compile_operator(op: str, arg: Any, path: str,
                      errors: list[tuple[str, str]]) -> Callable[[Any], bool] | None:
    if op == "eq":
        return lambda v: v == arg
    if op == "ne":
        return lambda v: v != arg
    if op in ("gt", "gte", "lt", "lte"):
        if isinstance(arg, bool) or not isinstance(arg, int | float | str):
            errors.append((path, f"`{op}` needs a number or a string"))
            return None
        fn = {"gt": lambda a, b: a > b, "gte": lambda a, b: a >= b,
              "lt": lambda a, b: a < b, "lte": lambda a, b: a <= b}[op]
        return _safe_compare(fn, arg)
    if op in ("in", "not_in"):
        if not isinstance(arg, list):
            errors.append((path, f"`{op}` needs a list"))
            return None
        try:
            members: Any = frozenset(arg)
        except TypeError:
            members = list(arg)
        if op == "in":
            return lambda v: _member(v, members)
        return lambda v: not _member(v, members)
    if op == "exists":
        if not isinstance(arg, bool):
            errors.append((path, "`exists` needs true or false"))
            return None
        return (lambda v: v is not None) if arg else (lambda v: v is None)
    if op == "contains":
        def contains(v: Any) -> bool:
            if isinstance(v, str):
                return isinstance(arg, str) and arg in v
            if isinstance(v, list | tuple):
                return arg in v
            return False
        return contains
    if op == "regex":
        rx = _compile_regex(arg, path, errors)
        if rx is None:
            return None
        return lambda v: isinstance(v, str) and rx.search(v) is not None
    if op == "glob":
        if not isinstance(arg, str | list) or not all(isinstance(g, str) for g in _as_list(arg)):
            errors.append((path, "`glob` needs a pattern or a list of patterns"))
            return None
        return _compile_globs(_as_list(arg))
    errors.append((path, f"unknown operator `{op}` (expected one of: {', '.join(OPERATORS)})"))
    return None


def _member(value: Any, members: Any) -> bool:
    try:
        return value in members
    except TypeError:
        return False


def _compile_regex(arg: Any, path: str, errors: list[tuple[str, str]]) -> re.Pattern[str] | None:
    if not isinstance(arg, str):
        errors.append((path, "a regex must be a string"))
        return None
    try:
        return re.compile(arg)
    except re.error as exc:
        errors.append((path, f"invalid regex: {exc}"))
        return None


def _compile_where(where: Any, path: str, errors: list[tuple[str, str]]) -> list[Predicate]:
    if not isinstance(where, dict):
        errors.append((path, "`where` must map field paths to values or {operator: value}"))
        return []
    checks: list[Predicate] = []
    for field, condition in where.items():
        fpath = f"{path}.{field}"
        if not isinstance(field, str) or not field:
            errors.append((fpath, "field paths are strings such as `context.http.status`"))
            continue
        get = field_getter(field)
        if field == "level":
            condition = _normalize_level_condition(condition, fpath, errors)
        tests: list[Callable[[Any], bool]] = []
        if isinstance(condition, dict) and condition:
            for op, arg in condition.items():
                test = _compile_operator(str(op), arg, f"{fpath}.{op}", errors)
                if test is not None:
                    tests.append(test)
        else:
            tests.append(functools.partial(operator.eq, condition))
        ordered = ("gt", "gte", "lt", "lte")
        if field == "level" and isinstance(condition, dict) and any(o in condition for o in ordered):
            tests = _level_rank_tests(condition)
        checks.append(_all_of_field(get, tests))
    return checks


def _normalize_level_condition(condition: Any, path: str, errors: list[tuple[str, str]]) -> Any:
    def norm(v: Any, p: str) -> Any:
        level = normalize_level(v)
        if level is None:
            errors.append((p, f"{v!r} is not a level ({', '.join(LEVELS)})"))
        return level
    if isinstance(condition, dict):
        out: dict[str, Any] = {}
        for op, arg in condition.items():
            if op in ("in", "not_in") and isinstance(arg, list):
                out[op] = [norm(a, f"{path}.{op}") for a in arg]
            elif op in ("eq", "ne", "gt", "gte", "lt", "lte"):
                out[op] = norm(arg, f"{path}.{op}")
            else:
                out[op] = arg
        return out
    return norm(condition, path)


_RANK_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le,
    "eq": operator.eq, "ne": operator.ne,
}


def _rank_test(cmp: Callable[[Any, Any], bool], rank: int) -> Callable[[Any], bool]:
    return lambda v: v in LEVEL_RANK and cmp(LEVEL_RANK[v], rank)


def _membership(members: frozenset[Any], inside: bool) -> Callable[[Any], bool]:
    return (lambda v: v in members) if inside else (lambda v: v not in members)


def _level_rank_tests(condition: dict[str, Any]) -> list[Callable[[Any], bool]]:
    tests: list[Callable[[Any], bool]] = []
    for op, arg in condition.items():
        if arg is None:
            continue
        rank = LEVEL_RANK[arg] if isinstance(arg, str) else -1
        cmp = _RANK_OPS.get(op)
        if cmp is not None:
            tests.append(_rank_test(cmp, rank))
        elif op in ("in", "not_in"):
            tests.append(_membership(frozenset(arg), op == "in"))
    return tests


def _all_of_field(get: Callable[[Mapping[str, Any]], Any], tests: list[Callable[[Any], bool]]) -> Predicate:
    if len(tests) == 1:
        test = tests[0]
        return lambda event: test(get(event))

    def check(event: Mapping[str, Any]) -> bool:
        value = get(event)
        return all(t(value) for t in tests)

    return check


def _any_of(predicates: list[Predicate]) -> Predicate:
    return lambda event: any(p(event) for p in predicates)


def _compile(spec: Any, path: str, errors: list[tuple[str, str]], prefilter: Prefilter | None) -> Predicate:
    if spec is None:
        return lambda event: True
    if not isinstance(spec, dict):
        errors.append((path, f"a match is a mapping ({', '.join(MATCH_KEYS)})"))
        return lambda event: False
    checks: list[Predicate] = []
    for key in spec:
        if key not in MATCH_KEYS:
            errors.append((f"{path}.{key}", f"unknown match key (expected one of: {', '.join(MATCH_KEYS)})"))

    if "level" in spec:
        level = normalize_level(spec["level"])
        if level is None:
            errors.append((f"{path}.level", f"{spec['level']!r} is not a level ({', '.join(LEVELS)})"))
        else:
            rank = LEVEL_RANK[level]
            # A dict lookup per record: the cheapest test goes first.
            ok = {name for name, r in LEVEL_RANK.items() if r >= rank}
            checks.append(lambda event: event.get("level") in ok)
            if prefilter is not None:
                prefilter.min_level = level
    if "source" in spec:
        globs = _as_list(spec["source"])
        if not globs or not all(isinstance(g, str) and g for g in globs):
            errors.append((f"{path}.source", "`source` is a glob or a list of globs"))
        else:
            test = _compile_globs(globs)
            checks.append(lambda event: test(event.get("source")))
            if prefilter is not None:
                prefilter.source_globs = globs
    if "tags" in spec:
        wanted = _as_list(spec["tags"])
        if not wanted or not all(isinstance(t, str) for t in wanted):
            errors.append((f"{path}.tags", "`tags` is a tag or a list of tags (all must be present)"))
        else:
            wanted_set = frozenset(wanted)
            checks.append(lambda event: wanted_set.issubset(event.get("tags") or ()))
    if "where" in spec:
        checks.extend(_compile_where(spec["where"], f"{path}.where", errors))
    if "contains" in spec:
        needles = _as_list(spec["contains"])
        if not needles or not all(isinstance(n, str) and n for n in needles):
            errors.append((f"{path}.contains", "`contains` is a string or a list of strings (any of)"))
        elif len(needles) == 1:
            needle = needles[0]
            checks.append(lambda event: needle in (event.get("message") or ""))
        else:
            # One C-level scan instead of a Python loop over the needles.
            search_any = re.compile("|".join(re.escape(n) for n in needles)).search
            checks.append(lambda event: search_any(event.get("message") or "") is not None)
    if "regex" in spec:
        rx = _compile_regex(spec["regex"], f"{path}.regex", errors)
        if rx is not None:
            search = rx.search
            checks.append(lambda event: search(event.get("message") or "") is not None)
    for combinator in ("any", "all"):
        if combinator in spec:
            items = spec[combinator]
            if not isinstance(items, list) or not items:
                errors.append((f"{path}.{combinator}", f"`{combinator}` is a non-empty list of matches"))
                continue
            subs = [_compile(item, f"{path}.{combinator}[{i}]", errors, None) for i, item in enumerate(items)]
            if combinator == "any":
                checks.append(_any_of(subs))
            else:
                checks.extend(subs)
    if "not" in spec:
        inner = _compile(spec["not"], f"{path}.not", errors, None)
        checks.append(lambda event: not inner(event))

    if not checks:
        return lambda event: True
    return _and(checks)


def _and(checks: list[Predicate]) -> Predicate:
    # Unrolled for the usual two or three checks: a generator per record costs
    # more than the checks themselves.
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        a, b = checks
        return lambda event: a(event) and b(event)
    if len(checks) == 3:
        a, b, c = checks
        return lambda event: a(event) and b(event) and c(event)
    first, *rest = checks

    def match(event: Mapping[str, Any]) -> bool:
        if not first(event):
            return False
        for check in rest:
            if not check(event):
                return False
        return True

    return match


def compile_match(spec: Mapping[str, Any] | None, path: str = "match") -> tuple[Predicate, Prefilter]:
    """Compile a match; raise :class:`MatchError` with every ``(path, message)``."""
    errors: list[tuple[str, str]] = []
    prefilter = Prefilter()
    predicate = _compile(dict(spec) if spec else None, path, errors, prefilter)
    if errors:
        raise MatchError(errors)
    return predicate, prefilter
