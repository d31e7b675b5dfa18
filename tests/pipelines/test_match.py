"""The match language: each key, operators, combinators, and errors with paths."""

from __future__ import annotations

from typing import Any

import pytest

from pipelines.match import MatchError, compile_match
from tests.pipelines.conftest import T0, log_event


def matches(spec: dict[str, Any], **fields: Any) -> bool:
    predicate, _ = compile_match(spec)
    return predicate(log_event(T0, **fields))


def test_level_is_a_minimum_and_accepts_aliases() -> None:
    assert matches({"level": "WARN"}, level="ERROR")
    assert matches({"level": "warning"}, level="WARN")
    assert not matches({"level": "ERROR"}, level="WARN")
    assert matches({"level": "fatal"}, level="CRITICAL")


def test_source_globs_any_of() -> None:
    spec = {"source": ["payments*", "billing"]}
    assert matches(spec, source="payments-api")
    assert matches(spec, source="billing")
    assert not matches(spec, source="billing-worker")


def test_contains_any_of_and_regex() -> None:
    assert matches({"contains": ["timeout", "refused"]}, message="connection refused by db")
    assert not matches({"contains": "Timeout"}, message="timeout")  # case-sensitive
    assert matches({"regex": r"(?i)upstream \d+ failed"}, message="Upstream 3 failed")
    assert not matches({"regex": r"^upstream"}, message="an upstream")


def test_tags_must_all_be_present() -> None:
    assert matches({"tags": ["db", "prod"]}, tags=["prod", "db", "x"])
    assert not matches({"tags": ["db", "prod"]}, tags=["db"])


def test_where_on_fields_and_context_paths() -> None:
    spec = {"where": {"context.http.status": {"gte": 500}, "duration_ms": {"gt": 1000}, "host": "web-1"}}
    good = {"context": {"http": {"status": 503}}, "duration_ms": 1500.0, "host": "web-1"}
    assert matches(spec, **good)
    assert not matches(spec, **{**good, "context": {"http": {"status": 404}}})
    assert not matches(spec, **{**good, "duration_ms": None})  # missing compares as false
    assert not matches(spec, **{**good, "context": {}})


@pytest.mark.parametrize(("condition", "value", "expected"), [
    ({"eq": "a"}, "a", True), ({"ne": "a"}, "a", False), ({"lt": 5}, 4, True), ({"lte": 5}, 5, True),
    ({"in": ["a", "b"]}, "b", True), ({"not_in": ["a", "b"]}, "c", True), ({"exists": True}, None, False),
    ({"exists": False}, None, True), ({"contains": "ell"}, "hello", True), ({"glob": "u-*"}, "u-1", True),
    ({"regex": "^u-\\d$"}, "u-12", False), ({"gt": 5}, "text", False),
])
def test_where_operators(condition: dict[str, Any], value: Any, expected: bool) -> None:
    assert matches({"where": {"user_id": condition}}, user_id=value) is expected


def test_where_level_compares_by_severity() -> None:
    assert matches({"where": {"level": {"gte": "warn"}}}, level="ERROR")
    assert not matches({"where": {"level": {"lt": "WARN"}}}, level="ERROR")


def test_any_all_not_nest() -> None:
    spec = {"any": [{"level": "CRITICAL"},
                    {"all": [{"source": "api-*"}, {"not": {"contains": "healthcheck"}}]}]}
    assert matches(spec, level="INFO", source="api-1", message="GET /orders")
    assert not matches(spec, level="INFO", source="api-1", message="GET /healthcheck")
    assert matches(spec, level="CRITICAL", source="db", message="healthcheck")


def test_empty_match_matches_everything() -> None:
    assert matches({}, level="DEBUG")


def test_every_error_is_reported_with_its_path() -> None:
    with pytest.raises(MatchError) as info:
        compile_match({"level": "LOUD", "regex": "(", "where": {"x": {"near": 1}}, "colour": "red",
                       "any": [{"contains": 5}]})
    paths = [p for p, _ in info.value.errors]
    assert paths == ["match.colour", "match.level", "match.where.x.near", "match.regex", "match.any[0].contains"]
    messages = dict(info.value.errors)
    assert "invalid regex" in messages["match.regex"]
    assert "unknown operator `near`" in messages["match.where.x.near"]


def test_prefilter_is_never_narrower_than_the_match() -> None:
    _, prefilter = compile_match({"level": "ERROR", "source": ["pay*"], "any": [{"source": "x"}]})
    assert prefilter.min_level == "ERROR" and prefilter.source_globs == ["pay*"]
    _, nested = compile_match({"any": [{"level": "ERROR"}, {"source": "x"}]})
    assert nested.min_level is None and nested.source_globs is None
