"""Redaction rules, validators, modes, records, and the properties the spec asks for."""

from __future__ import annotations

import re
import string
import subprocess
import sys
import time
from typing import Any

import msgspec
import pytest
import re2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import CustomRedactRule, RedactConfig, without_boundaries
from agent.configfile import ConfigInvalid, convert
from agent.redact import Redactor, card_issuer, card_windows, is_card_number, is_ssn, luhn_valid
from agent.wire import Record


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor.from_config(RedactConfig())


def luhn_complete(prefix_and_body: str) -> str:
    """Append the Luhn check digit."""
    for check in "0123456789":
        if luhn_valid(prefix_and_body + check):
            return prefix_and_body + check
    raise AssertionError


ISSUERS = [("4", 16), ("4", 13), ("4", 19), ("51", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15),
           ("37", 15), ("6011", 16), ("644", 16), ("65", 19), ("3528", 16), ("3589", 19), ("36", 14),
           ("38", 14), ("300", 14), ("305", 16), ("62", 16)]


@st.composite
def card_numbers(draw: st.DrawFn) -> str:
    prefix, length = draw(st.sampled_from(ISSUERS))
    body = draw(st.text("0123456789", min_size=length - len(prefix) - 1, max_size=length - len(prefix) - 1))
    number = luhn_complete(prefix + body)
    style = draw(st.sampled_from(["plain", "spaces", "dashes", "plus", "percent", "escaped"]))
    if style == "plain":
        return number
    # A space in a URL: "+", "%20"; an encoder that escapes all but letters and digits: "%2D", "%2B".
    sep = {"spaces": " ", "dashes": "-", "plus": "+", "percent": "%20"}.get(style) \
        or draw(st.sampled_from(["%2D", "%2d", "%2B", "%2b"]))
    return sep.join(number[i:i + 4] for i in range(0, len(number), 4))


def _without_separators(text: str) -> str:
    """``text`` without the separators a card's digit groups may have."""
    return re.sub(r"[ +-]|%2[0BDbd]", "", text)


@st.composite
def ssns(draw: st.DrawFn) -> str:
    area = draw(st.integers(1, 899).filter(lambda a: a != 666))
    group = draw(st.integers(1, 99))
    serial = draw(st.integers(1, 9999))
    sep = draw(st.sampled_from(["-", " ", "+", "%20", "%2D", "%2d", "%2B", "%2b"]))  # as between a card's groups
    return f"{area:03d}{sep}{group:02d}{sep}{serial:04d}"


# Surrounding text: anything, as long as it does not glue more digits onto the
# number (then it is a longer number, not a card) and has no separator run
# that would make it part of a digit group.
surrounding = st.text(string.ascii_letters + " .,:;!?()[]{}\"'=/_\n\tüé€", max_size=40)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(card=card_numbers(), before=surrounding, after=surrounding)
def test_every_valid_card_number_in_any_text_is_redacted(redactor: Redactor, card: str, before: str,
                                                         after: str) -> None:
    text = f"{before} {card} {after}"
    out = redactor.redact_text(text)
    assert card not in out
    # A card right after "Bearer" (or "token=", …) goes as that secret: secrets come first.
    assert "[REDACTED:credit_card]" in out or "[REDACTED:secrets]" in out
    digits = _without_separators(card)
    assert digits[-8:] not in _without_separators(out)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ssn=ssns(), before=surrounding, after=surrounding)
def test_every_valid_ssn_in_any_text_is_redacted(redactor: Redactor, ssn: str, before: str, after: str) -> None:
    out = redactor.redact_text(f"{before} {ssn} {after}")
    assert ssn not in out
    # An SSN right after "Bearer" (or "token=", …) goes as that secret: secrets come first.
    assert "[REDACTED:ssn]" in out or "[REDACTED:secrets]" in out


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(digits=st.text("0123456789", min_size=13, max_size=19))
def test_luhn_invalid_digit_runs_are_kept(redactor: Redactor, digits: str) -> None:
    if luhn_valid(digits):
        digits = digits[:-1] + str((int(digits[-1]) + 1) % 10)
    assert not luhn_valid(digits)
    text = f"order {digits} shipped"
    assert redactor.redact_text(text) == text


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(millis=st.integers(946_684_800_000, 3_999_999_999_999))
def test_epoch_millisecond_timestamps_are_kept(redactor: Redactor, millis: int) -> None:
    # Years 2000–2096. From 2096 on, 13-digit milliseconds start with 4 and a
    # tenth of them are valid Visa-13 numbers: no validator can tell them apart.
    text = f'{{"ts": {millis}, "msg": "tick at {millis}"}}'
    assert redactor.redact_text(text) == text


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.uuids())
def test_uuids_are_kept(redactor: Redactor, value: object) -> None:
    text = f"request {value} done"
    assert redactor.redact_text(text) == text


def test_uuid_digit_groups_that_pass_the_card_checks_are_kept(redactor: Redactor) -> None:
    # 5453853284707646 is a valid Mastercard number (Luhn, prefix, length).
    for text in ("request 54538532-8470-7646-3511-b677c3e44a22 done",
                 '{"request_id": "54538532-8470-7646-3511-b677c3e44a22"}'):
        assert redactor.redact_text(text) == text
    assert redactor.redact_text("card 5453-8532-8470-7646 ok") == "card [REDACTED:credit_card] ok"


def test_card_validation_needs_luhn_issuer_and_length() -> None:
    assert is_card_number("4111111111111111")
    assert not is_card_number("4111111111111112")  # Luhn
    assert not is_card_number("1111111111111117")  # no issuer starts with 1
    nine = luhn_complete("911111111111111")
    assert luhn_valid(nine) and not is_card_number(nine)
    assert card_issuer("378282246310005") == "amex"
    assert not is_card_number(luhn_complete("3782822463100"))  # amex needs 15 digits, this is 14
    assert card_issuer("5555555555554444") == "mastercard"


def test_never_issued_ssns_are_kept(redactor: Redactor) -> None:
    for value in ("000-12-3456", "666-12-3456", "900-12-3456", "999-12-3456", "123-00-4567", "123-45-0000"):
        assert not is_ssn(*value.split("-"))
        assert redactor.redact_text(f"id {value}") == f"id {value}"
    assert redactor.redact_text("dates 2026-11-25 and 12-34-5678") == "dates 2026-11-25 and 12-34-5678"


@pytest.mark.parametrize(("text", "kept", "gone"), [
    ("Authorization: Bearer abc.def.ghijkl123", "Authorization: Bearer ", "ghijkl123"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_abcdef", "jwt ", "eyJhbGciOiJIUzI1NiJ9"),
    ("login password=hunter2 user=bob", "user=bob", "hunter2"),
    ('cfg {"db_password": "s3 cr3t"}', '"db_password": "', "s3 cr3t"),
    ("postgres://bob:pw123@db:5432/x", "postgres://bob:", "pw123"),
    ("key AKIAIOSFODNN7EXAMPLE used", "key ", "AKIAIOSFODNN7EXAMPLE"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "", "MIIEow"),
    ("api_key: sk_live_abcdefghijklmnop1234", "api_key: ", "abcdefghijklmnop1234"),
])
def test_secrets_are_redacted_and_their_labels_kept(redactor: Redactor, text: str, kept: str, gone: str) -> None:
    out = redactor.redact_text(text)
    assert gone not in out
    assert kept in out
    assert "[REDACTED:secrets]" in out


def test_ordinary_words_near_secret_keywords_are_kept(redactor: Redactor) -> None:
    for text in ("token validation failed", "basic authentication is disabled", "the password was changed"):
        assert redactor.redact_text(text) == text


def test_opt_in_rules_email_and_ip() -> None:
    plain = Redactor(RedactConfig())
    text = "mail bob@example.com from 10.1.2.3 and 2001:db8::1 at 12:30:45"
    assert plain.redact_text(text) == text
    full = Redactor(RedactConfig(rules=["email", "ipv4", "ipv6"]))
    out = full.redact_text(text)
    assert "bob@example.com" not in out and "10.1.2.3" not in out and "2001:db8::1" not in out
    assert "12:30:45" in out  # a time is not an address
    assert full.redact_text("version 1.2.3.999") == "version 1.2.3.999"


def test_custom_rule_and_per_rule_modes() -> None:
    cfg = RedactConfig(custom=[CustomRedactRule("employee", r"EMP-\d{6}")], mode="hash", hash_key="k1",
                       modes={"credit_card": "partial"})
    r = Redactor(cfg)
    out = r.redact_text("EMP-123456 paid with 4111 1111 1111 1111")
    assert "EMP-123456" not in out and out.startswith("[REDACTED:employee:")
    assert "[REDACTED:credit_card:…1111]" in out
    assert r.counts["employee"] == 1 and r.counts["credit_card"] == 1


def test_hash_mode_is_keyed_and_joinable() -> None:
    a = Redactor(RedactConfig(mode="hash", hash_key="one"))
    b = Redactor(RedactConfig(mode="hash", hash_key="two"))
    first = a.redact_text("ssn 123-45-6789")
    assert first == a.redact_text("ssn 123 45 6789")  # same value, same token
    assert first != b.redact_text("ssn 123-45-6789")  # another key, another token
    assert "6789" not in first


def test_hash_mode_without_key_is_a_config_error() -> None:
    with pytest.raises(ConfigInvalid) as info:
        convert({"mode": "hash"}, RedactConfig, base_path="agent.redact")
    assert "hash_key" in str(info.value)
    with pytest.raises(ConfigInvalid) as info:
        convert({"custom": [{"name": "x", "pattern": "("}]}, RedactConfig, base_path="agent.redact")
    assert "agent.redact.custom[0]" in str(info.value)


def test_record_fields_context_keys_stack_and_tags_are_redacted(redactor: Redactor) -> None:
    record = Record(
        "2026-01-01T00:00:00Z", "ERROR", "web", "paid 4111111111111111",
        context={"Password": "hunter2", "nested": {"api-key": 12345, "note": "ssn 123-45-6789"},
                 "items": [{"card": "5555 5555 5555 4444"}], "count": 3},
        error_stack="Traceback\n  token=abcdef123", tags=["user 123-45-6789"], user_agent="curl",
    )
    out = redactor.redact_record(record)
    assert out.message == "paid [REDACTED:credit_card]"
    assert out.context == {"Password": "[REDACTED:key]", "nested": {"api-key": "[REDACTED:key]",
                           "note": "ssn [REDACTED:ssn]"}, "items": [{"card": "[REDACTED:credit_card]"}], "count": 3}
    assert out.error_stack is not None and "abcdef123" not in out.error_stack
    assert out.tags == ["user [REDACTED:ssn]"]
    assert record.message == "paid 4111111111111111"  # the input is not mutated
    clean = Record("2026-01-01T00:00:00Z", "INFO", "web", "all good", context={"n": 1})
    assert redactor.redact_record(clean) is clean


def test_disabled_redaction_changes_nothing() -> None:
    r = Redactor(RedactConfig(enabled=False))
    assert r.redact_text("4111 1111 1111 1111") == "4111 1111 1111 1111"


def test_hit_positions_point_at_candidate_lines(redactor: Redactor) -> None:
    data = b'{"msg":"ok"}\n{"msg":"card 4111111111111111"}\n{"msg":"fine"}\n'
    hits = redactor.hit_positions(data)
    assert hits and all(13 <= h < 46 for h in hits)


def test_redact_command_prints_stdin_redacted(tmp_path: object) -> None:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "redact", "--counts"],
                         input="card 4111 1111 1111 1111\nnothing here\n", capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "card [REDACTED:credit_card]\nnothing here\n"
    assert "credit_card: 1" in out.stderr


def test_redact_command_parses_as_a_source_and_prints_the_redacted_records(tmp_path: Any) -> None:
    import json

    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({"agent": {
        "collector": {"url": "http://127.0.0.1:9", "token": "t"}, "state_dir": str(tmp_path / "state"),
        "sources": [{"path": "/x/*.log", "source": "jobs", "format": "regex", "tags": ["batch"],
                     "pattern": r"(?P<level>[A-Z]+) (?P<message>.*?)(?: pan=(?P<pan>\d+))?$"},
                    {"path": "/y/*.log", "source": "app", "format": "plain", "multiline": {"mode": "continuation"}}]}}))

    def run(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent.cli", "redact", *args], input=stdin,
                              capture_output=True, text=True, timeout=60)

    # Structured data is unescaped: the record holds a card no raw line does.
    out = run("--format", "syslog", stdin='<134>1 - web app - - [c@1 n="4111\\ 1111\\ 1111\\ 1111"] paid\n')
    assert out.returncode == 0, out.stderr
    [record] = [json.loads(line) for line in out.stdout.splitlines()]
    assert record["message"] == "paid"
    assert record["context"]["structured_data"] == {"c@1": {"n": "[REDACTED:credit_card]"}}
    # A configured source: its pattern and tags; a number in a group is text.
    out = run("-c", str(config), "--source", "jobs", "--counts", stdin="WARN paid pan=4111111111111111\nINFO ok\n")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["level"], r["message"], r.get("context"), r["tags"]) for r in records] == [
        ("WARN", "paid", {"pan": "[REDACTED:credit_card]"}, ["batch"]), ("INFO", "ok", None, ["batch"])]
    assert "credit_card: 1" in out.stderr
    # A multiline source's entries are joined (the last one at the end of input).
    out = run("-c", str(config), "--source", "app", stdin="ERROR charge failed\nTraceback (most recent call last):\n"
              "  File \"pay.py\", line 3, in charge\nValueError: card 4111 1111 1111 1111\nINFO next\nINFO last")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["level"], r["message"], r.get("error_stack")) for r in records] == [
        ("ERROR", "charge failed", 'Traceback (most recent call last):\n  File "pay.py", line 3, in charge\n'
                                   "ValueError: card [REDACTED:credit_card]"),
        ("INFO", "next", None), ("INFO", "last", None)]
    # Mistakes are named, with exit status 2.
    unknown = run("-c", str(config), "--source", "web", stdin="")
    assert unknown.returncode == 2 and "no source named 'web' (there are: app, jobs)" in unknown.stderr
    assert run("--source", "jobs", stdin="").stderr.strip() == "logferry-agent redact: --source needs -c FILE"
    assert "needs a `pattern`" in run("--format", "regex", stdin="").stderr


def test_chunk_prefilter_dismisses_digit_runs_without_a_card_or_ssn(redactor: Redactor) -> None:
    lines = [b'{"id":"845e0070-6377-1412-9312-aa"}', b'{"m":"card 4111 1111 1111 1111"}',
             b'{"m":"ts 1732512000000"}', b'{"m":"x 123-45-6789-1234"}', b'{"password":"x"}']
    data = b"\n".join(lines) + b"\n"
    starts = [sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines))]
    hit_lines = {max(i for i, s in enumerate(starts) if s <= pos) for pos in redactor.hit_positions(data)}
    assert hit_lines == {1, 3, 4}


def test_the_fingerprint_names_what_the_rules_find_not_how_they_replace() -> None:
    from agent.config import CustomRedactRule

    base = Redactor(RedactConfig()).fingerprint
    assert base and base == Redactor(RedactConfig()).fingerprint
    assert Redactor(RedactConfig(mode="hash", hash_key="k" * 32)).fingerprint == base
    assert Redactor(RedactConfig(modes={"ssn": "partial"})).fingerprint == base
    for other in (RedactConfig(rules=["ssn", "credit_card", "secrets", "email"]),
                  RedactConfig(keys=["password"]),
                  RedactConfig(custom=[CustomRedactRule(name="emp", pattern=r"EMP-\d{6}")])):
        assert Redactor(other).fingerprint not in ("", base)
    assert Redactor(RedactConfig(enabled=False)).fingerprint == ""


def test_the_fingerprint_changes_with_what_the_built_in_rules_find(monkeypatch: pytest.MonkeyPatch) -> None:
    # An agent of an earlier version, same configuration, found less: a
    # collector must not take its batches as redacted with the current rules.
    import agent.redact

    current = Redactor(RedactConfig()).fingerprint
    monkeypatch.setattr(agent.redact, "RULES_VERSION", agent.redact.RULES_VERSION - 1)
    assert Redactor(RedactConfig()).fingerprint not in ("", current)


# --- the whole-chunk prefilter: lines it lets through must need no redaction --

def _parsed(lines: list[bytes], fmt: str = "json") -> list[Record]:
    from agent.config import SourceConfig
    from agent.parsers import LineParser

    parser = LineParser(SourceConfig(path="x", source="app", format=fmt), "host")  # type: ignore[arg-type]
    records = parser.parse_lines(lines, list(range(len(lines))), "/f")
    assert len(records) == len(lines)
    return records


def _hit_lines(redactor: Redactor, lines: list[bytes], json: bool = True) -> set[int]:
    data = b"".join(line + b"\n" for line in lines)
    starts = [sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines))]
    return {max(i for i, s in enumerate(starts) if s <= pos) for pos in redactor.hit_positions(data, json=json)}


def _assert_misses_need_no_redaction(config: RedactConfig, lines: list[bytes], fmt: str = "json") -> set[int]:
    """The prefilter's promise: a line it does not hit comes out of
    redact_record unchanged. Returns the hit lines."""
    hits = _hit_lines(Redactor(config), lines)
    check = Redactor(config)
    for i, record in enumerate(_parsed(lines, fmt)):
        if i not in hits:
            assert check.redact_record(record) == record, lines[i]
    return hits


# 5453853284707646 and 4111111111111111 pass every card check.
UUID_CARD = "54538532-8470-7646-3511-b677c3e44a22"
_hex_groups = st.tuples(*(st.text("0123456789" * 3 + "abcdef", min_size=n, max_size=n) for n in (8, 4, 4, 4, 12)))


@st.composite
def uuid_contexts(draw: st.DrawFn) -> str:
    """A UUID (its groups mostly digits, sometimes forming a valid card) in a
    JSON string value, with what may glue it to other digits around it."""
    groups = list(draw(st.one_of(_hex_groups, st.just(tuple(UUID_CARD.split("-"))),
                                 st.just(("41111111", "1111", "1111", "1111", "111111111111")))))
    if draw(st.booleans()):  # a group of another length: not a UUID
        index = draw(st.integers(0, 4))
        groups[index] = groups[index] + draw(st.sampled_from(["1", "a", ""]))
    uuid = "-".join(groups)
    before = draw(st.sampled_from(["", "x", "1", "4", "id ", "\\u0034", "\\\\", "\\\"", "a-", "1-", "1 ", "id=", "a=1",
                                   "=", "x=4"]))
    after = draw(st.sampled_from(["", "x", "1", "7", " 4111", "-1111", " 1111 1111", "\\u0031", "\\u0020",
                                  "\\u002d1111", "\\\"", "\\t", " done", "-"]))
    return before + uuid + after


@settings(max_examples=400, deadline=None)
@given(values=st.lists(uuid_contexts(), min_size=1, max_size=8), key=st.sampled_from(["request_id", "msg", "ctx"]))
def test_the_chunk_prefilter_never_lets_a_line_that_needs_redaction_through(values: list[str], key: str) -> None:
    lines = [b'{"ts":"2026-12-01T00:00:00Z","%s":"%s","user_id":"u1"}' % (key.encode(), v.encode())
             for v in values]
    _assert_misses_need_no_redaction(RedactConfig(), lines)


@settings(max_examples=400, deadline=None)
@given(values=st.lists(uuid_contexts(), min_size=1, max_size=8), quoted=st.booleans())
def test_the_chunk_prefilter_never_lets_a_logfmt_line_that_needs_redaction_through(values: list[str],
                                                                                   quoted: bool) -> None:
    # logfmt: a bare value follows "=" (the UUID check takes "=" as a token's start), a quoted one is JSON.
    lines = [b"ts=2026-12-01T00:00:00Z msg=done request_id=" + (b'"%s"' % v.encode() if quoted else v.encode())
             for v in values]
    _assert_misses_need_no_redaction(RedactConfig(), lines, "logfmt")


@settings(max_examples=400, deadline=None)
@given(values=st.lists(uuid_contexts(), min_size=1, max_size=8),
       prefix=st.sampled_from(["2026-12-01 10:00:00.123 INFO ", "[2026-12-01T10:00:00Z] ERROR: ", "WARN ", ""]),
       quoted=st.booleans())
def test_the_chunk_prefilter_never_lets_a_plain_line_that_needs_redaction_through(values: list[str], prefix: str,
                                                                                  quoted: bool) -> None:
    # A plain line's message is the line after its timestamp and level: a UUID token is whole in it.
    lines = [(prefix + ('done request_id="%s" x' if quoted else "done request_id=%s") % v).encode() for v in values]
    _assert_misses_need_no_redaction(RedactConfig(), lines, "plain")


def test_a_uuid_in_a_plain_line_is_no_hit() -> None:
    redactor = Redactor(RedactConfig())
    line = f"2026-12-01 10:00:00.123 INFO GET /x request_id={UUID_CARD} took 3 ms".encode()
    assert _hit_lines(redactor, [line]) == set()
    assert _hit_lines(redactor, [line], json=False) == {0}  # formats whose fields may split a token: looked at
    assert _hit_lines(redactor, [line + b" card 4111 1111 1111 1111"]) == {0}


def test_a_uuid_after_an_equals_sign_is_no_hit() -> None:
    lines = [b"ts=2026-12-01T00:00:00Z request_id=%s msg=done" % UUID_CARD.encode(),
             b"ts=2026-12-01T00:00:00Z request_id=x%s msg=done" % UUID_CARD.encode(),  # the UUID starts later
             b"ts=2026-12-01T00:00:00Z request_id=%s1 msg=done" % UUID_CARD.encode()]  # does not end its token
    assert _hit_lines(Redactor(RedactConfig()), lines) == {1, 2}
    assert _assert_misses_need_no_redaction(RedactConfig(), lines, "logfmt") == {1, 2}


def test_a_quoted_uuid_whose_digits_pass_the_card_checks_is_no_hit() -> None:
    lines = [b'{"request_id":"%s","msg":"done"}' % UUID_CARD.encode(),
             # the run goes on past the UUID: 4111 1111 1111 1111 is a card
             b'{"request_id":"abcdef01-abcd-abcd-abcd-411111111111 1111","msg":"done"}',
             b'{"request_id":"x%s","msg":"done"}' % UUID_CARD.encode(),  # not where the UUID search starts
             b'{"request_id":"%s\\u0020","msg":"done"}' % UUID_CARD.encode()]
    redactor = Redactor(RedactConfig())
    assert _hit_lines(redactor, lines) == {1, 2, 3}
    assert _hit_lines(redactor, lines, json=False) == {0, 1, 2, 3}  # the UUID check is for JSON lines only
    assert _assert_misses_need_no_redaction(RedactConfig(), lines) == {1, 2, 3}


def test_patterns_that_match_inside_a_dismissed_digit_run_still_hit() -> None:
    # A digit run with no card is skipped whole, unless another enabled pattern could start inside it.
    lines = [b'{"msg":"acct 9876543210 1234"}', b'{"msg":"x 1234567890 123.45.67.89"}',
             b'{"msg":"order 1234567890123 fine"}']
    custom = RedactConfig(custom=[CustomRedactRule(name="acct", pattern=r"\b9\d{9}\b")])
    assert _assert_misses_need_no_redaction(custom, lines) == {0}
    ipv4 = RedactConfig(rules=["secrets", "ssn", "credit_card", "ipv4"])
    assert _assert_misses_need_no_redaction(ipv4, lines) == {1}
    assert _assert_misses_need_no_redaction(RedactConfig(), lines) == set()


def test_json_escapes_do_not_hide_secrets_from_the_prefilter() -> None:
    lines = [b'{"msg":"card 4111\\u00201111\\u00201111\\u00201111"}', b'{"msg":"ssn 123\\u002d45\\u002d6789"}',
             b'{"msg":"db https:\\/\\/bob:hunter2@db.example.com"}', b'{"msg":"\\u00e94111 1111 1111 1111"}',
             b'{"msg":"a\\u0026b \\/x \\u00e9 1234567890123"}']
    assert _assert_misses_need_no_redaction(RedactConfig(), lines) == {0, 1, 2, 3}
    redacted = [Redactor(RedactConfig()).redact_record(r).message for r in _parsed(lines)]
    assert redacted[:4] == ["card [REDACTED:credit_card]", "ssn [REDACTED:ssn]",
                            "db https://bob:[REDACTED:secrets]@db.example.com", "\u00e9[REDACTED:credit_card]"]


_rule_pieces = [*"0123456789 -.:/@_aAbBeEkKpPsStTyYJ", "key", "token", "eyJ", "://", "4111", "123-45-6789"]
_rule_text = st.lists(st.sampled_from(_rule_pieces), max_size=30).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_rule_text)
def test_the_rule_set_finds_the_rules_whose_prefilters_match(text: str) -> None:
    config = RedactConfig(rules=["secrets", "ssn", "credit_card", "email", "ipv4", "ipv6"],
                          custom=[CustomRedactRule(name="emp", pattern=r"EMP-\d{3}|k\d")])
    redactor = Redactor(config)
    data = text.encode()
    expected = [i for i, rule in enumerate(redactor._rules) if rule.prefilter_scan.spans(data) is not None]
    assert sorted(redactor._rule_set.Match(data)) == expected


def test_a_card_in_a_url_query_with_plus_for_spaces_is_redacted(redactor: Redactor) -> None:
    # Forms sent by GET encode spaces as "+": access logs hold such queries.
    out = redactor.redact_text("GET /pay?card=4111+1111+1111+1111&exp=12%2F29 HTTP/1.1")
    assert out == "GET /pay?card=[REDACTED:credit_card]&exp=12%2F29 HTTP/1.1"
    assert redactor.redact_text("q=5500+0000+0000+0004+and+more") == "q=[REDACTED:credit_card]+and+more"
    # "%20" is a space anywhere in a URL; its "20" is never read as digits of the card after it.
    assert redactor.redact_text("GET /find?q=4111%201111%201111%201111") == "GET /find?q=[REDACTED:credit_card]"
    assert redactor.redact_text("q=%204111111111111111%20x") == "q=%20[REDACTED:credit_card]%20x"
    assert redactor.redact_text("ssn=%20123-45-6789") == "ssn=%20[REDACTED:ssn]"
    assert redactor.redact_text("/files/report%202026%2011%2030.pdf") == "/files/report%202026%2011%2030.pdf"
    # Encoders that escape all but letters and digits write dashes and pluses "%2D" and "%2B" (either case).
    assert redactor.redact_text("q=4111%2D1111%2D1111%2D1111&x=1") == "q=[REDACTED:credit_card]&x=1"
    assert redactor.redact_text("q=4111%2b1111%2b1111%2b1111") == "q=[REDACTED:credit_card]"
    assert redactor.redact_text("q=%2D4111111111111111%2D") == "q=%2D[REDACTED:credit_card]%2D"
    assert redactor.redact_text("/d/2026%2D12%2D01%2D1234") == "/d/2026%2D12%2D01%2D1234"
    # No number starts on an escape's hex digits: "%2F4111…" is "/" and a card; "%24111…" is "$111…".
    assert redactor.redact_text("/pay%2F4111111111111111") == "/pay%2F[REDACTED:credit_card]"
    assert redactor.redact_text("x=%24111111111111111") == "x=%24111111111111111"
    # Nor on a digit of another script right after "%" and a hex digit: the card after it is one.
    assert redactor.redact_text("%2\u06604000000000000002") == "%2\u0660[REDACTED:credit_card]"
    # Pluses elsewhere stay: zone offsets, sums, phone numbers, a "+" run that holds no card.
    for kept in ("2026-12-01T10:00:00.123+05:30", "1764583200+0530", "sum 10+20+30+40=100",
                 "call +1 415 555 0100", "4111++1111+1111+1111", "order 1234+5678+9012+3456"):
        assert redactor.redact_text(kept) == kept


def test_an_ssn_in_a_url_or_a_form_body_is_redacted(redactor: Redactor) -> None:
    # The same separators as a card's groups: "+" and "%20" for a space; one kind throughout.
    assert redactor.redact_text("POST /apply ssn=123+45+6789&name=x") == "POST /apply ssn=[REDACTED:ssn]&name=x"
    assert redactor.redact_text("GET /find?q=123%2045%206789 HTTP/1.1") == "GET /find?q=[REDACTED:ssn] HTTP/1.1"
    assert redactor.redact_text("q=123%2D45%2D6789&x") == "q=[REDACTED:ssn]&x"
    assert redactor.redact_text("q=123%2d45%2D6789") == "q=[REDACTED:ssn]"  # one separator, its case aside
    # As with spaces, "100+20+3000" is one (a URL's "100 20 3000"); other shapes stay.
    for kept in ("123+45-6789", "123%2045 6789", "123+45+67890", "000+12+3456", "sum 100+20+300",
                 "%2123+45+6789", "12+345+6789", "123%2D45-6789", "123%2D45%2B6789"):
        assert redactor.redact_text(kept) == kept
    # Whole chunks: the lines holding one are hits, as read and as JSON.
    lines = [b'{"msg":"ssn=123+45+6789"}', b'{"msg":"q=123%2045%206789"}', b'{"msg":"sum 100+20+300"}',
             b"GET /x?ssn=123+45+6789 HTTP/1.1", b'{"msg":"ssn 123\\u002b45\\u002b6789"}',
             b'{"msg":"q=123%2D45%2D6789"}', b"GET /x?c=4111%2D1111%2D1111%2D1111 HTTP/1.1"]
    assert _hit_lines(redactor, lines) == {0, 1, 3, 4, 5, 6}
    hashed = Redactor(RedactConfig(modes={"ssn": "hash"}, hash_key="k" * 32))
    # One value, one token, however it was written.
    assert len({hashed.redact_text(f"ssn {v}")
                for v in ("123-45-6789", "123+45+6789", "123%2045%206789", "123%2D45%2D6789")}) == 1


@settings(max_examples=300, deadline=None)
@given(ssn=ssns(), key=st.sampled_from(["msg", "request_id", "ctx"]), before=st.sampled_from(["", "ssn=", "x "]))
def test_a_json_line_holding_an_ssn_is_a_hit_and_redacted(ssn: str, key: str, before: str) -> None:
    line = b'{"ts":"2026-12-01T00:00:00Z","%s":"%s%s"}' % (key.encode(), before.encode(), ssn.encode())
    redactor = Redactor(RedactConfig())
    assert _hit_lines(redactor, [line]) == {0}
    [record] = _parsed([line])
    assert ssn not in msgspec.json.encode(redactor.redact_record(record)).decode()


def test_a_json_escaped_plus_between_card_digits_makes_the_line_a_hit(redactor: Redactor) -> None:
    # "\u002b" decodes to "+": the raw line holds no card, the record does.
    line = b'{"msg": "paid 4111\\u002b1111\\u002b1111\\u002b1111"}\n{"msg": "fine"}\n'
    [hit] = redactor.hit_positions(line, json=True)
    assert line.index(b"4111") <= hit < line.index(b"\n")


def test_a_card_number_logged_as_a_json_number_is_redacted(redactor: Redactor) -> None:
    # {"pan": 4111111111111111}: a number in the context is text to the rules
    # as its digits would be in a line; other numbers stay numbers.
    context = {"pan": 4111111111111111, "neg": -5500000000000004, "whole": 4111111111111111.0,
               "cents": 4111111111111111.5, "items": [4111111111111111, 7, True, None],
               "at": 1764583200000, "order": 4111111111111112, "big": 1e300, "ok": False}
    before = redactor.counts["credit_card"]
    out = redactor.redact_record(Record(timestamp="t", level="INFO", source="s", message="paid", context=context))
    assert out.context == {"pan": "[REDACTED:credit_card]", "neg": "-[REDACTED:credit_card]",
                           "whole": "[REDACTED:credit_card].0", "cents": "[REDACTED:credit_card].5",
                           "items": ["[REDACTED:credit_card]", 7, True, None], "at": 1764583200000,
                           "order": 4111111111111112, "big": 1e300, "ok": False}
    assert redactor.counts["credit_card"] - before == 5
    # Hashed, a number and the same card in text stay joinable.
    hashing = Redactor(RedactConfig(mode="hash", hash_key="k" * 32))
    as_number = hashing.redact_value({"pan": 4111111111111111})["pan"]
    assert as_number == hashing.redact_text("4111 1111 1111 1111") and as_number.startswith("[REDACTED:credit_card:")


def test_digits_of_other_scripts_next_to_a_card_never_crash_the_redactor(redactor: Redactor) -> None:
    # Python's \d matches Arabic-Indic digits; the Luhn table was ASCII-only (KeyError in the read loop).
    assert luhn_valid("4111111111111١١١")
    out = redactor.redact_text("card 4111111111111١١١ then 4111 1111 1111 1111")
    assert "4111 1111 1111 1111" not in out and "4111111111111" not in out
    record = redactor.redact_record(Record(timestamp="t", level="INFO", source="s",
                                           message="٤١١١١١١١١١١١١١١١ 4111111111111١١١"))
    assert "4111111111111" not in record.message


# --- the fast paths against the straightforward forms they replace ------------

def _reference_luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        total += (2 * d if d < 5 else 2 * d - 9) if i % 2 else d
    return total % 10 == 0


def _reference_groups(run: str) -> list[tuple[int, int]]:
    """The spans between a run's separators (space, dash, "+", "%20", "%2B", "%2D")."""
    cuts = [m.span() for m in re.finditer(r"[ +-]|%2[0BDbd]", run)]
    ends = [a for a, _ in cuts] + [len(run)]
    starts = [0] + [b for _, b in cuts]
    return list(zip(starts, ends, strict=True))


def _reference_card_windows(run: str) -> list[tuple[int, int]]:
    """card_windows as it was first written: every split of the groups, left to right."""
    groups = _reference_groups(run)
    texts = [run[a:b] for a, b in groups]
    starts = [a for a, _ in groups]
    found: list[tuple[int, int]] = []
    i = 0
    while i < len(texts):
        for j in range(len(texts) - 1, i - 1, -1):
            digits = "".join(texts[i:j + 1])
            if 13 <= len(digits) <= 19 and card_issuer(digits) is not None and _reference_luhn(digits):
                found.append((starts[i], starts[j] + len(texts[j])))
                i = j + 1
                break
        else:
            i += 1
    return found


_digit = st.sampled_from("0123456789" * 6 + "٠١٢٣٤٥٦٧٨٩")
_digit_runs = st.lists(st.text(_digit, min_size=1, max_size=8), min_size=1, max_size=6).flatmap(
    lambda groups: st.lists(st.sampled_from([" ", "-", "+", "%20", "%2D", "%2b"]), min_size=len(groups) - 1,
                            max_size=len(groups) - 1).map(
        lambda seps: groups[0] + "".join(s + g for s, g in zip(seps, groups[1:], strict=True))))


@settings(max_examples=500, deadline=None)
@given(run=st.one_of(_digit_runs, card_numbers(), st.builds(lambda a, b: f"{a} {b}", card_numbers(), _digit_runs)))
def test_card_windows_and_validators_agree_with_their_reference_forms(run: str) -> None:
    assert card_windows(run) == _reference_card_windows(run)
    digits = _without_separators(run)
    assert luhn_valid(digits) == _reference_luhn(digits)
    assert is_card_number(digits) == (13 <= len(digits) <= 19 and card_issuer(digits) is not None
                                      and _reference_luhn(digits))


_rule_texts = st.lists(st.one_of(card_numbers(), ssns(), _digit_runs, st.uuids().map(str),
                                 st.sampled_from([" ", "-", "+", "  ", "--", " -", "+-", " +", "++", "x", "é", "1",
                                                  "\n", UUID_CARD, "%20", "%2", "%", "%20%20", "%20 ", "%24",
                                                  "%2F", "%a", "%2D", "%2d", "%2B", "%2D%2D", "%2D-", "%2",
                                                  "123%2D45%2D6789", "123%2d45%2D6789", "123%2D45-6789", "%2D123",
                                                  "123-45 6789", "1123-45-6789", "123-45-67890", "٤١١١",
                                                  "123+45+6789", "123%2045%206789", "123+45-6789", "%20123"])),
                       max_size=8).map("".join)


def _reference_apply(rule_name: str, text: str) -> tuple[str, int]:
    """The card and SSN rules as one ``re.sub`` over the whole text."""
    count = 0

    def card(m: re.Match[str]) -> str:
        nonlocal count
        run, at = m.group(), m.start()
        # Groups of digits inside a UUID split the run; the pieces between are searched.
        groups = _reference_groups(run)
        inside = [any(u.start() <= at + s and at + e <= u.end() for u in uuids) for s, e in groups]
        windows: list[tuple[int, int]] = []
        k = 0
        while k < len(groups):
            if inside[k]:
                k += 1
                continue
            j = k
            while j + 1 < len(groups) and not inside[j + 1]:
                j += 1
            lo, hi = groups[k][0], groups[j][1]
            windows += [(lo + s, lo + e) for s, e in _reference_card_windows(run[lo:hi])]
            k = j + 1
        out, pos = [], 0
        for s, e in windows:
            out += [run[pos:s], "[REDACTED:credit_card]"]
            count += 1
            pos = e
        return "".join([*out, run[pos:]])

    def ssn(m: re.Match[str]) -> str:
        nonlocal count
        before, area, sep1, group, sep2, serial, after = m.groups()
        if before or after or sep1.upper() != sep2.upper() or not is_ssn(area, group, serial):
            return m.group()
        count += 1
        return "[REDACTED:ssn]"

    uuids = list(re.finditer(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}", text))
    if rule_name == "credit_card":
        return re.sub(r"(?<!%)(?<!%[0-9A-Fa-f])\d(?:(?:[ +-]|%2[0BDbd])?\d){12,}", card, text), count
    return re.sub(r"(?<!%)(?<!%[0-9A-Fa-f])(\d?)(\d{3})([ +-]|%2[0BDbd])(\d{2})([ +-]|%2[0BDbd])(\d{4})(\d?)",
                  ssn, text), count


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_rule_texts)
def test_card_and_ssn_rules_replace_what_a_plain_substitution_would(redactor: Redactor, text: str) -> None:
    for rule in redactor._rules:
        if rule.name in ("credit_card", "ssn"):
            count = [0]
            assert (rule.apply(text, redactor._replace, count), count[0]) == _reference_apply(rule.name, text)


_field_texts = st.one_of(st.none(), _rule_texts, st.sampled_from(["u1", "password=x", "a@b.co", "é 4111111111111111",
                                                                  "api\x00key", "api", "key=1"]))


@settings(max_examples=300, deadline=None)
@given(message=_rule_texts, user_id=_field_texts, request_id=_field_texts, error_stack=_field_texts,
       tags=st.one_of(st.none(), st.lists(_field_texts.map(lambda t: t or "t"), min_size=1, max_size=3)),
       rules=st.sampled_from([["ssn", "credit_card", "secrets"], ["credit_card"],
                              ["secrets", "ssn", "credit_card", "email", "ipv4", "ipv6"]]))
def test_a_record_is_redacted_as_its_fields_are_one_by_one(message: str, user_id: str | None,
                                                           request_id: str | None, error_stack: str | None,
                                                           tags: list[str] | None, rules: list[str]) -> None:
    config = RedactConfig(rules=rules)  # type: ignore[arg-type]
    record = Record("2026-01-01T00:00:00Z", "INFO", "web", message, user_id=user_id, request_id=request_id,
                    error_stack=error_stack, tags=tags)
    by_record, by_field = Redactor(config), Redactor(config)
    out = by_record.redact_record(record)
    assert out.message == by_field.redact_text(message)
    for name in ("user_id", "request_id", "error_stack"):
        value = getattr(record, name)
        assert getattr(out, name) == (by_field.redact_text(value) if value else value)
    assert out.tags == ([by_field.redact_text(t) for t in tags] if tags else tags)
    assert by_record.counts == by_field.counts


@pytest.mark.parametrize("pattern", [r"^u\d+", r"u\d+$", r"(?:a|^b)", r"\Asecret", r"key\z", r"[a]^x"])
def test_anchored_custom_patterns_are_a_config_error(pattern: str) -> None:
    # A rule is searched for in whole chunks and in a probe of a record's
    # fields: "^" would match at the start of whatever the search covered.
    with pytest.raises(ConfigInvalid) as info:
        convert({"custom": [{"name": "ok", "pattern": "x"}, {"name": "uid", "pattern": pattern}]}, RedactConfig,
                base_path="agent.redact")
    assert "agent.redact.custom[1]" in str(info.value)
    assert "anchor" in str(info.value)


@pytest.mark.parametrize("pattern", [r"[^a-z]\d{4}", r"\bu\d+\b", r"cost \$\d+", r"[$^]x", r"[]^]x", r"[[:digit:]^]+",
                                     r"\Q^$\E\d"])
def test_carets_and_dollars_that_are_not_anchors_are_accepted(pattern: str) -> None:
    rule = convert({"name": "r", "pattern": pattern}, CustomRedactRule, base_path="agent.redact.custom[0]")
    assert rule.pattern == pattern


@pytest.mark.parametrize(("pattern", "expected"), [
    (r"\bacct\d+\b", r"(?:)acct\d+(?:)"), (r"x\By", r"x(?:)y"), (r"\\b", r"\\b"), (r"\Q\b\E\b", r"\Q\b\E(?:)"),
    (r"[]b]\b", r"[]b](?:)"), (r"[^]b]\B", r"[^]b](?:)"), (r"[\]\\]\b", r"[\]\\](?:)"),
    (r"[[:alpha:]]\b*", r"[[:alpha:]](?:)*"), (r"\d{3}\b", r"\d{3}(?:)")])
def test_a_prefilter_drops_word_boundaries_outside_classes_and_quotes(pattern: str, expected: str) -> None:
    assert without_boundaries(pattern) == expected
    re2.compile(expected)


@settings(max_examples=300, deadline=None)
@given(pattern=st.lists(st.sampled_from([r"\b", r"\B", "a", "1", r"\d", r"\w+", " ", "-", "(?:", ")", "|", "[ab]",
                                         "[]b]", "?", r"\Qa\bb\E"]), max_size=8).map("".join),
       text=st.text(alphabet="ab1 -\bxé\n", max_size=20))
def test_a_pattern_without_word_boundaries_matches_wherever_the_pattern_does(pattern: str, text: str) -> None:
    try:
        original = re2.compile(pattern)
    except re2.error:
        return
    if original.search(text) is not None:
        assert re2.compile(without_boundaries(pattern)).search(text) is not None


def test_a_long_run_of_short_digit_groups_is_redacted_in_linear_time(redactor: Redactor) -> None:
    # "0 1 0 1 …" (a matrix or a byte dump): every start once, a few windows
    # each, not every pair of groups. 128k groups took minutes when the
    # search walked from the run's end.
    noise = " ".join(["1"] * 65_536)
    line = f"{noise} 4111 1111 1111 1111 {noise}"
    started = time.process_time()
    out = redactor.redact_text(line)
    assert time.process_time() - started < 5
    assert out == f"{noise} [REDACTED:credit_card] {noise}"
    assert card_windows(line) == [(len(noise) + 1, len(noise) + 20)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.uuids().map(str), min_size=2, max_size=6), seps=st.sampled_from([" ", "-"]),
       card=card_numbers())
def test_digits_across_two_uuids_are_no_card_and_a_card_beside_them_is(redactor: Redactor, ids: list[str],
                                                                        seps: str, card: str) -> None:
    # "…-bbb4417 4003…": the digits ending one UUID and starting the next can
    # pass every card check; no group of digits inside a UUID is part of a card.
    text = seps.join(ids)
    assert redactor.redact_text(text) == text
    redacted = redactor.redact_text(f"{text} {card} {text}")
    assert redacted == f"{text} [REDACTED:credit_card] {text}"


def test_uuid_pairs_whose_boundary_digits_pass_the_card_checks_are_kept(redactor: Redactor) -> None:
    pair = "f893470c-74ed-4498-bbb3-840097435791 8400fb3c-ad8b-41a2-94cd-ea585b26714d"
    assert is_card_number("3" + "840097435791" + "8400")  # what the search used to take for a card
    assert redactor.redact_text(pair) == pair
    # A group only partly inside a UUID's shape stays a card.
    assert redactor.redact_text("4111111111111111-e29b-41d4-a716-446655440000") == \
        "[REDACTED:credit_card]-e29b-41d4-a716-446655440000"
