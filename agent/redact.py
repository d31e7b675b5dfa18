"""Redaction of sensitive data in log records.

Built-in rules: ``ssn``, ``credit_card``, ``email``, ``ipv4``, ``ipv6``,
``secrets``; custom RE2 patterns from config; and key-based redaction of
``context`` values (``password``, ``token``, …).

Speed comes from a prefilter: one RE2 pattern that every rule's match must
also match (a run of 13+ digits, ``ddd-dd-dddd``, ``eyJ``, ``password``, …).
Text without a prefilter hit, the vast majority of log lines, costs one DFA
scan; the rules themselves and their validators (Luhn plus issuer prefix and
length for cards, the never-issued SSN ranges) run only on hits. The agent
runs the prefilter once over a whole read chunk (:meth:`Redactor.hit_positions`)
and redacts only the records of the lines it hit.

Validation is what keeps false positives down: a digit run is a card only if
Luhn holds *and* the prefix belongs to an issuer *and* the length fits that
issuer, so order ids, UUID fragments and epoch-millisecond timestamps survive.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import re
from bisect import bisect_right
from collections.abc import Callable
from itertools import accumulate
from typing import Any

import msgspec
import re2

from agent.config import RedactConfig, without_boundaries
from agent.re2direct import UNANCHORED as _UNANCHORED
from agent.wire import Record

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False
_OPTIONS.max_mem = 4 << 20


def _compile(pattern: str | bytes) -> Any:
    return re2.compile(pattern, _OPTIONS)


_NO_MATCH = (-1, -1)


class _Scanner:
    """Searches UTF-8 bytes with a compiled RE2 pattern, returning the spans of
    the first match (group 0, then each group; ``(-1, -1)`` for a group that
    took no part) or ``None``.

    The binding's ``search`` wraps every call in a Python generator and a
    ``Match`` object, several microseconds a call, more than the DFA scan of a
    short string; this calls the compiled RE2 object underneath directly (what
    ``search`` does for bytes), and falls back to ``search`` if the binding
    ever lacks it.
    """

    __slots__ = ("_match", "_regex")

    def __init__(self, regex: Any) -> None:
        self._regex = regex
        raw = getattr(regex, "_regexp", None)
        self._match: Any = getattr(raw, "Match", None) if _UNANCHORED is not None else None

    def spans(self, data: bytes, pos: int = 0, end: int | None = None) -> Any:
        """The spans of the first match in ``data[pos:end]``."""
        if end is None:
            end = len(data)
        match = self._match
        if match is not None:
            found = match(_UNANCHORED, data, pos, end)
            return None if found[0] == _NO_MATCH else found
        m = self._regex.search(data, pos, end)
        return None if m is None else [m.span(i) for i in range(self._regex.groups + 1)]


# --- validators --------------------------------------------------------------


_LUHN_DOUBLED = {str(d): (2 * d if d < 5 else 2 * d - 9) for d in range(10)}.__getitem__
# ASCII digits to their values, and to the digit sums of their doubles: the
# Luhn sums in C (``bytes.translate`` and ``sum``), not a Python call a digit.
_LUHN_VALUE = bytes.maketrans(b"0123456789", bytes(range(10)))
_LUHN_DOUBLE = bytes.maketrans(b"0123456789", bytes(2 * d if d < 5 else 2 * d - 9 for d in range(10)))


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (any script's: ``\\d`` in a
    text pattern matches "١٢٣" too, and a crash here would stop the reader)."""
    if not digits.isascii():
        digits = "".join(str(int(c)) for c in digits)
        return (sum(map(int, digits[-1::-2])) + sum(map(_LUHN_DOUBLED, digits[-2::-2]))) % 10 == 0
    data = digits.encode()
    return (sum(data[-1::-2].translate(_LUHN_VALUE)) + sum(data[-2::-2].translate(_LUHN_DOUBLE))) % 10 == 0


def card_issuer(digits: str) -> str | None:
    """The issuer whose prefix and length rules ``digits`` fits, else ``None``."""
    n = len(digits)
    d1 = digits[0]
    p2 = int(digits[:2])
    p3 = int(digits[:3])
    p4 = int(digits[:4])
    if d1 == "4":
        return "visa" if n in (13, 16, 19) else None
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return "mastercard" if n == 16 else None
    if p2 in (34, 37):
        return "amex" if n == 15 else None
    if p4 == 6011 or 644 <= p3 <= 649 or p2 == 65:
        return "discover" if 16 <= n <= 19 else None
    if 3528 <= p4 <= 3589:
        return "jcb" if 16 <= n <= 19 else None
    if p2 in (36, 38) or 300 <= p3 <= 305:
        return "diners" if 14 <= n <= 19 else None
    if p2 == 62:
        return "unionpay" if 16 <= n <= 19 else None
    return None


@functools.cache  # at most the 10,000 four-digit prefixes: is_card_number asks for no others
def _card_lengths(prefix: str) -> frozenset[int]:
    """The card lengths an issuer takes after the four ASCII digits ``prefix``
    (card_issuer looks at the first four digits and the length only)."""
    return frozenset(n for n in range(13, 20) if card_issuer(prefix + "0" * (n - 4)) is not None)


def is_card_number(digits: str) -> bool:
    if len(digits) < 13 or len(digits) > 19:
        return False
    prefix = digits[:4]
    if not (prefix.isascii() and prefix.isdigit()):  # other scripts' digits
        return card_issuer(digits) is not None and luhn_valid(digits)
    return len(digits) in _card_lengths(prefix) and luhn_valid(digits)


def is_ssn(area: str, group: str, serial: str) -> bool:
    """Whether an SSN could have been issued (area 000, 666, 900–999, group 00
    and serial 0000 never are)."""
    a = int(area)
    return a != 0 and a != 666 and a < 900 and group != "00" and serial != "0000"


# --- rules ------------------------------------------------------------------

_Replace = Callable[[str, str], str]  # (rule, matched text) -> replacement


class _Rule:
    """A named pattern; ``apply`` substitutes the matches it accepts."""

    def __init__(self, name: str, pattern: str, prefilter: str, engine: str = "re2") -> None:
        self.name = name
        # Digit rules use Python's re: their patterns cannot backtrack badly,
        # and on the short strings the prefilter picks, re's C-level searches
        # cost a fraction of the RE2 binding's per-call overhead.
        self.regex: Any = re.compile(pattern) if engine == "re" else _compile(pattern)
        self.prefilter = prefilter
        self.prefilter_regex: Any = _compile(prefilter)
        self.prefilter_scan = _Scanner(self.prefilter_regex)

    def apply(self, text: str, replace: _Replace, count: list[int]) -> str:
        def sub(m: Any) -> str:
            count[0] += 1
            return replace(self.name, m.group(0))

        return str(self.regex.sub(sub, text))


_DIGIT_GROUP = re.compile(r"\d+")
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
# A number does not start on a hex digit of a URL's percent escape: "%204111…"
# is a space and a card, not the number 204111…, and "%24000…" is "$000…".
# Put before a pattern's first digit; the form after it (_NOT_IN_ESCAPE)
# keeps a leading character class, which re's search skips ahead with (a
# leading lookbehind makes it try every position). Its \d is the pattern's:
# a digit of any script ("%2٠4111…": "٠" cannot start the number either).
_OUTSIDE_ESCAPE = r"(?<!%)(?<!%[0-9A-Fa-f])"
_NOT_IN_ESCAPE = r"(?<!%\d)(?<!%[0-9A-Fa-f]\d)"
_HEX_OR_PERCENT = frozenset(b"%0123456789ABCDEFabcdef")
# A separator written as a URL's percent escape, in either case: "%20" (a
# space), "%2B" ("+") or "%2D" ("-"). Encoders that escape every byte but
# letters and digits write a card's dashes and an SSN's so.
ESCAPED_SEPARATOR = r"%2[0BDbd]"
# What separates a card's digit groups: a space, a dash, a space in a URL
# ("+" in a query), or one of those escaped (ESCAPED_SEPARATOR).
_CARD_SEPARATOR = re.compile(r"[ +-]|" + ESCAPED_SEPARATOR)


def _is_escaped_separator(text: str) -> bool:
    """Whether ``text`` is one escaped separator (ESCAPED_SEPARATOR)."""
    return len(text) == 3 and text[:2] == "%2" and text[2] in "0BDbd"


def _card_digits(run: str) -> str:
    """A card rule's run without its separators."""
    if "%" in run:
        run = _CARD_SEPARATOR.sub("", run)
    return run.replace(" ", "").replace("-", "").replace("+", "")


def _group_spans(run: str) -> list[tuple[int, int]]:
    """The spans of the digit groups of a card rule's run (digits and single separators)."""
    if "%" not in run:
        return [m.span() for m in _DIGIT_GROUP.finditer(run)]
    spans = []
    pos = 0
    for separator in _CARD_SEPARATOR.finditer(run):  # an escape ("%20", "%2D") is one separator: no group
        spans.append((pos, separator.start()))
        pos = separator.end()
    spans.append((pos, len(run)))
    return spans


def card_windows(run: str) -> list[tuple[int, int]]:
    """Spans of valid card numbers in a run of digits with single separators
    (_CARD_SEPARATOR): the run is split at its separators and, left to right, the
    longest sequence of whole groups that is a valid card number is taken.
    Contiguous digits are never split: 20 glued digits are an id, not a card."""
    # The whole run first (what the search below tries first), its digits
    # without splitting it into groups.
    digits = _card_digits(run)
    if is_card_number(digits):
        return [(0, len(run))]
    if len(digits) <= 13 or len(digits) == len(run):  # no window but the whole run: too short, or no separators
        return []
    if "%" in run:
        spans = _group_spans(run)
        texts = [run[start:end] for start, end in spans]
        starts = [start for start, _ in spans]
    else:
        texts = _DIGIT_GROUP.findall(run)
        # Offsets: groups are separated by exactly one character.
        starts = list(accumulate((len(t) + 1 for t in texts[:-1]), initial=0))
    counts = list(accumulate(map(len, texts), initial=0))  # digits before group k
    found: list[tuple[int, int]] = []
    n = len(texts)
    i = 0
    while i < n:
        head = "".join(texts[i:i + 4])[:4]
        if head.isascii() and len(head) == 4 and not _card_lengths(head):
            i += 1  # no issuer starts so: no window starts here
            continue
        # From the longest sequence of groups from i that holds at most 19
        # digits down (a bisection, not a walk from the run's end: a long run
        # of short groups, "0 1 0 1 …", would make that quadratic).
        top = bisect_right(counts, counts[i] + 19) - 2
        for j in range(top, i - 1, -1):
            if counts[j + 1] - counts[i] < 13:
                j = -1
                break
            if is_card_number("".join(texts[i:j + 1])):
                break
        else:
            j = -1
        if j < 0:
            i += 1
            continue
        found.append((starts[i], starts[j] + len(texts[j])))
        i = j + 1
    return found


class _CardRule(_Rule):
    # A maximal run of digits with single space/dash separators; see
    # card_windows: "qty 1 4111 1111 1111 1111" and a card followed by a year
    # keep their other numbers.
    def __init__(self) -> None:
        super().__init__("credit_card", r"\d" + _NOT_IN_ESCAPE + r"(?:(?:[ +-]|" + ESCAPED_SEPARATOR + r")?\d){12,}",
                         r"\d(?:(?:[ +-]|" + ESCAPED_SEPARATOR + r")?\d){12}", engine="re")

    def apply(self, text: str, replace: _Replace, count: list[int]) -> str:
        # Digit groups of a UUID (8-4-4-4-12 hex) can pass every card check
        # (54538532-8470-7646-…), and so can the digits ending one UUID and
        # starting the next ("…-bbb4417 4003…"): no group of digits inside a
        # UUID is part of a card.
        uuids = [u.span() for u in _UUID.finditer(text)] if text.count("-") >= 4 else []
        uuid_ends = [end for _, end in uuids]
        out: list[str] = []
        pos = 0
        for at, run in _card_runs(text, self.regex):
            first = bisect_right(uuid_ends, at)  # the first UUID ending after the run's start
            if first < len(uuids) and uuids[first][0] < at + len(run):
                windows = _windows_outside_uuids(run, at, uuids, first)
            else:
                windows = card_windows(run)
            for start, end in windows:
                out.append(text[pos:at + start])
                out.append(replace(self.name, run[start:end]))
                count[0] += 1
                pos = at + end
        if not out:
            return text
        out.append(text[pos:])
        return "".join(out)


def _windows_outside_uuids(run: str, at: int, uuids: list[tuple[int, int]], first: int) -> list[tuple[int, int]]:
    """card_windows of ``run`` (at offset ``at`` of its text) without the
    digit groups that lie inside one of ``uuids`` (sorted spans, ``first`` the
    first ending after ``at``): those split the run into the stretches searched.
    A group only partly inside ("4111111111111111-e29b-…" holds a UUID's
    shape from its ninth digit) stays: in doubt, a card."""
    windows: list[tuple[int, int]] = []
    index = first
    piece_start: int | None = None  # where the current stretch of groups outside UUIDs starts
    piece_end = 0
    for start, end in _group_spans(run):
        while index < len(uuids) and uuids[index][1] <= at + start:
            index += 1  # UUIDs ending before this group
        if index < len(uuids) and uuids[index][0] <= at + start and at + end <= uuids[index][1]:  # in a UUID
            if piece_start is not None:
                windows += [(piece_start + s, piece_start + e) for s, e in card_windows(run[piece_start:piece_end])]
                piece_start = None
            continue
        if piece_start is None:
            piece_start = start
        piece_end = end
    if piece_start is not None:
        windows += [(piece_start + s, piece_start + e) for s, e in card_windows(run[piece_start:piece_end])]
    return windows


def _card_runs(text: str, regex: re.Pattern[str]) -> list[tuple[int, str]]:
    """The matches of the card rule's ``regex`` in ``text``, left to right,
    as (offset, run): the runs ``regex.sub`` would replace."""
    runs: list[tuple[int, str]] = []
    search = (_CARD_STRETCH_ESCAPES if "%" in text else _CARD_STRETCH)[0 if text.isascii() else 1].search
    stretch = search(text)
    while stretch is not None:  # see _CARD_STRETCH
        lo, hi = stretch.span()
        run = stretch.group().rstrip(" +-")
        while _is_escaped_separator(run[-3:]):
            run = run[:-3].rstrip(" +-")
        if ("%" in run and _DOUBLE_SEPARATOR.search(run)) or "  " in run or "--" in run or "++" in run \
                or " -" in run or "- " in run or " +" in run or "+ " in run or "-+" in run or "+-" in run:
            # Separators that end a run: the pattern tells the runs.
            m = regex.search(text, lo, hi)
            while m is not None:
                runs.append((m.start(), m.group()))
                m = regex.search(text, m.end(), hi)
        elif len(_card_digits(run)) >= 13:
            runs.append((lo, run))  # single separators between digits throughout: one run, if 13 digits
        stretch = search(text, hi)
    return runs


class _SsnRule(_Rule):
    def __init__(self) -> None:
        # Digits glued on either side make it some other number; they are
        # captured so the callback can refuse the match.
        super().__init__(
            "ssn",
            _OUTSIDE_ESCAPE + r"(\d?)(\d{3})([ +-]|" + ESCAPED_SEPARATOR + r")(\d{2})([ +-]|"
            + ESCAPED_SEPARATOR + r")(\d{4})(\d?)",
            r"\d{3}(?:[ +-]|" + ESCAPED_SEPARATOR + r")\d{2}(?:[ +-]|" + ESCAPED_SEPARATOR + r")\d{4}",
            engine="re",
        )

    def apply(self, text: str, replace: _Replace, count: list[int]) -> str:
        out: list[str] = []
        pos = 0
        search = (_SSN_STRETCH_ESCAPES if "%" in text else _SSN_STRETCH)[0 if text.isascii() else 1].search
        find = self.regex.search
        stretch = search(text)
        while stretch is not None:  # see _CARD_STRETCH
            lo, hi = stretch.span()
            m = find(text, lo, hi)
            while m is not None:
                before, area, sep1, group, sep2, serial, after = m.groups()
                # Kept: digits glued on, mixed separators, a number never issued.
                if not before and not after and sep1.upper() == sep2.upper() and is_ssn(area, group, serial):
                    out.append(text[pos:m.start()])
                    out.append(replace(self.name, f"{area}-{group}-{serial}"))
                    count[0] += 1
                    pos = m.end()
                m = find(text, m.end(), hi)
            stretch = search(text, hi)
        if not out:
            return text
        out.append(text[pos:])
        return "".join(out)


# Stretches of digits, spaces and dashes, from a digit on, at least as long
# as a card (13) or an SSN (11): every match of those rules' patterns lies in
# one, and cannot reach past its end, so searching each stretch (up to its
# end) finds the matches ``regex.sub`` would, left to right. Finding them
# first spares re's search for the rule's pattern, which tries the pattern's
# groups and repeats at every digit of the text (most of a rule's cost on a
# short text), everywhere but in the stretches. The ASCII forms are for ASCII
# text, where they mean the same and search faster.
# Texts holding a "%" (percent escapes) have their own: a repeated group is
# several times slower than a repeated character class.
_CARD_STRETCH = (re.compile(r"[0-9][0-9 +-]{12,}"), re.compile(r"\d[\d +-]{12,}"))
_CARD_STRETCH_ESCAPES = (re.compile(r"[0-9]" + _NOT_IN_ESCAPE + r"(?:[0-9 +-]|" + ESCAPED_SEPARATOR + r"){12,}"),
                         re.compile(r"\d" + _NOT_IN_ESCAPE + r"(?:[\d +-]|" + ESCAPED_SEPARATOR + r"){12,}"))
_DOUBLE_SEPARATOR = re.compile(r"(?:[ +-]|" + ESCAPED_SEPARATOR + r"){2}")  # ends a card's run of digits
_SSN_STRETCH = (re.compile(r"[0-9][0-9 +-]{10,}"), re.compile(r"\d[\d +-]{10,}"))
_SSN_STRETCH_ESCAPES = (re.compile(r"[0-9]" + _NOT_IN_ESCAPE + r"(?:[0-9 +-]|" + ESCAPED_SEPARATOR + r"){10,}"),
                        re.compile(r"\d" + _NOT_IN_ESCAPE + r"(?:[\d +-]|" + ESCAPED_SEPARATOR + r"){10,}"))


class _ValueRule(_Rule):
    """A rule whose pattern has groups (keep, value, keep): only the value is replaced."""

    def apply(self, text: str, replace: _Replace, count: list[int]) -> str:
        def sub(m: Any) -> str:
            groups = m.groups()
            # Alternatives each have three groups (prefix, secret, suffix);
            # the first group that took part in the match opens the alternative.
            for base in range(0, len(groups), 3):
                if groups[base] is not None:
                    prefix, secret, suffix = groups[base], groups[base + 1], groups[base + 2]
                    break
            else:
                count[0] += 1
                return replace(self.name, m.group(0))
            count[0] += 1
            quote = ""
            if len(secret) >= 2 and secret[0] in "\"'" and secret[-1] == secret[0]:
                quote, secret = secret[0], secret[1:-1]
            return f"{prefix}{quote}{replace(self.name, secret)}{quote}{suffix}"

        return str(self.regex.sub(sub, text))


class _IpRule(_Rule):
    def __init__(self, name: str, pattern: str, prefilter: str) -> None:
        super().__init__(name, pattern, prefilter)

    def apply(self, text: str, replace: _Replace, count: list[int]) -> str:
        def sub(m: Any) -> str:
            value = m.group(0)
            try:
                ipaddress.ip_address(value)
            except ValueError:
                return str(value)
            count[0] += 1
            return replace(self.name, value)

        return str(self.regex.sub(sub, text))


_SECRET_KEYS = (
    r"password|passwd|pwd|passphrase|secret|client_secret|token|access_token|refresh_token|api[_-]?key"
    r"|apikey|auth_token|private_key|secret_key|access_key"
)

# (prefix, secret, suffix) per alternative; see _ValueRule.
_SECRETS = "|".join(
    [
        # private key blocks, whole
        r"()(-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY-----)()",
        # JWTs
        r"()(eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,})()",
        # Authorization: Bearer/Basic credentials
        r"((?i:\bbearer\s+|authorization\W{1,3}basic\s+))([A-Za-z0-9._~+/=-]{8,})()",
        # AWS access key ids
        r"()(\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b)()",
        # GitHub, Slack, Stripe, Google API keys
        r"()(\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}|xox[abprs]-[A-Za-z0-9-]{10,}"
        r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}|AIza[0-9A-Za-z_-]{35}))()",
        # passwords in URLs: scheme://user:password@host
        r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/:@]+:)([^\s/@]+)(@)",
        # key=value, key: value, "key": "value"
        r"((?i:\b[A-Za-z0-9_.-]*?(?:" + _SECRET_KEYS + r"))\\?[\"']?\s*[=:]\s*)"
        r"(\"(?:[^\"\\]|\\.)*\"|'[^']*'|\\\"[^\"\\]*\\\"|[^\s\"',;&}\\]+)()",
    ]
)
_SECRETS_PREFILTER = (
    r"PRIVATE KEY|eyJ|(?i:bearer|basic|token|passw|pwd|secret|api.?key|apikey|private|access.?key)"
    r"|AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA|gh[pousr]_|github_pat_|xox[abprs]-|k_live_|k_test_|AIza"
    # "\/" is JSON's escaped slash: the prefilter also runs on lines as read
    r"|:\\?/\\?/[^\s/:@]+:[^\s/@]+@"
)


def _builtin_rules() -> dict[str, _Rule]:
    return {
        "ssn": _SsnRule(),
        "credit_card": _CardRule(),
        "email": _Rule(
            "email",
            r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
            r"@",
        ),
        "ipv4": _IpRule(
            "ipv4",
            r"\b(?:\d{1,3}\.){3}\d{1,3}\b",
            r"\d\.\d{1,3}\.\d{1,3}\.\d",
        ),
        "ipv6": _IpRule(
            "ipv6",
            r"(?i:\b(?:[0-9a-f]{1,4}:){2,7}(?::|[0-9a-f]{1,4})(?::[0-9a-f]{1,4})*\b|::(?:[0-9a-f]{1,4}:?){1,7})",
            r"(?i:[0-9a-f]{0,4}:[0-9a-f]{0,4}:[0-9a-f]{0,4})",
        ),
        "secrets": _ValueRule("secrets", _SECRETS, _SECRETS_PREFILTER),
    }


_json_encode = msgspec.json.Encoder().encode
# What the built-in rules find changes now and then (2: cards with "+" and
# "%20" between groups, numbers in contexts, custom rules' \b, syslog's
# escapes; 3: SSNs with "+" and "%20" between groups too; 4: "%2B" and "%2D"
# between groups, either case). It is part of the fingerprint, so a collector does not take a
# batch from an agent whose rules of the same names found less as redacted
# with its own: it redacts the batch again.
RULES_VERSION = 4
_DIGIT_RUN = re.compile(rb"\d(?:[ +-]?\d)*")
# For a run an escaped separator continues.
_DIGIT_RUN_ESCAPES = re.compile(rb"\d(?:(?:[ +-]|" + ESCAPED_SEPARATOR.encode() + rb")?\d)*")
_SSN_SHAPE = re.compile(r"\d{3}(?:[ +-]|" + ESCAPED_SEPARATOR + r")\d{2}(?:[ +-]|" + ESCAPED_SEPARATOR + r")\d{4}")
_TEXT_FIELDS = ("message", "error_stack", "user_agent", "user_id", "session_id", "request_id")
# Rules none of whose matches can start inside a run of digits (past its first
# character): a dismissed run is then skipped whole.
_RUN_SAFE_RULES = frozenset({"secrets", "ssn", "credit_card", "email"})
_UUID_AT = re.compile(rb"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
# What may follow a quoted UUID for the UUID to end its token, in the text as
# decoded too: ASCII, neither hex nor "-" (nor "\", which may start an escape).
_TOKEN_END = frozenset(c for c in range(128) if chr(c) not in "0123456789ABCDEFabcdef-\\")


def _rule_set(patterns: list[str]) -> Any:
    """An RE2 set of ``patterns`` (``Match(data)``: the indexes of those that
    match), or ``None`` if the binding has none or one does not compile."""
    set_type = getattr(getattr(re2, "_re2", None), "Set", None)
    if set_type is None or _UNANCHORED is None or not patterns:
        return None
    try:
        rules = set_type(_UNANCHORED, _OPTIONS)
        for index, pattern in enumerate(patterns):
            if rules.Add(pattern.encode()) != index:
                return None
        return rules if rules.Compile() else None
    except Exception:  # a binding whose Set works otherwise: the prefilters, one by one
        return None


def _in_uuid_token(data: bytes, start: int, run_end: int) -> bool:
    """Whether the digit run ``data[start:run_end]`` lies inside a UUID that
    directly follows a double quote or an equals sign and ends its token
    (``"5d9dc9f8-1818-e811-892f-902bd23f0824"``, logfmt's ``id=5d9dc9f8-…``).
    The card rule's search for UUIDs (left to right, in the decoded text) then
    finds that UUID, since no match before the quote or "=" can reach into it,
    so no card window of the run is outside a UUID; an SSN does not fit in a
    UUID's groups. Anywhere else (or in doubt): ``False``."""
    lo = start - 36 if start > 36 else 0
    quote = max(data.rfind(b'"', lo, start), data.rfind(b"=", lo, start))
    if quote < 0:
        return False
    token = quote + 1
    after = token + 36
    return (run_end <= after < len(data) and data[after] in _TOKEN_END
            and _UUID_AT.match(data, token) is not None)


def _normalise_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


class Redactor:
    """Applies the configured rules. ``counts`` holds matches redacted per rule
    (``key`` for key-based redaction of context values) since creation."""

    def __init__(self, cfg: RedactConfig) -> None:
        self.enabled = cfg.enabled
        self.counts: dict[str, int] = {}
        builtins = _builtin_rules()
        self._rules: list[_Rule] = []
        for rule_name in cfg.rules:
            # secrets first: a card inside a JWT or URL password is one secret, not two.
            self._rules.append(builtins[rule_name])
        self._rules.sort(key=lambda r: r.name != "secrets")
        for custom in cfg.custom:
            # Its prefilter without \b and \B: a field's text can have a word
            # boundary that the line it came from lacks (see without_boundaries).
            self._rules.append(_Rule(custom.name, custom.pattern, without_boundaries(custom.pattern)))
        self._modes: dict[str, str] = {r.name: cfg.mode for r in self._rules}
        self._modes["key"] = cfg.mode
        for custom in cfg.custom:
            if custom.mode:
                self._modes[custom.name] = custom.mode
        self._modes.update(cfg.modes)
        self._hash_key = cfg.hash_key.encode()
        self._keys = {_normalise_key(k) for k in cfg.keys}
        self._key_suffixes = tuple("_" + k for k in self._keys)
        for name in self._modes:
            self.counts[name] = 0
        # Which rules' prefilters match a text, in one pass (see redact_text).
        self._rule_set = _rule_set([r.prefilter for r in self._rules])
        parts = [f"(?:{r.prefilter})" for r in self._rules]
        # Key names make a line worth a look too (context keys), and JSON's
        # escapes could hide what the rules find in the decoded text: digits
        # and letters (\u0034, \u0061), separators of cards and SSNs (\u0020,
        # \u002d, and a URL's \u002b and \u0025), dots and slashes (\u002e,
        # \u002f), and an escape ending in a digit glued to a number
        # ("\u00e94111…" is "é4111…", not "94111…").
        key_words = sorted({k for k in self._keys} | {k.replace("_", "-") for k in self._keys})
        if key_words:
            parts.append("(?i:" + "|".join(re2.escape(k) for k in key_words) + ")")
        parts.append(r"\\u(?:00(?:[3-9]|2[05bBdDeEfF])|[0-9A-Fa-f]{3}\d\d)")
        self.active = self.enabled and bool(self._rules or self._keys)
        self._fingerprint = self._make_fingerprint(cfg)
        combined = "|".join(parts) if parts else "$^"
        self._prefilter = _compile(combined)
        # Whether redact_record looks at the message on its own (reusing the
        # rule set's answer for it when it is redacted), and at the other
        # fields in a probe without it; with custom rules, one probe holds
        # every field, the rule set being asked again per field hit. Either
        # way a probe's scan finds every field whose own text matches,
        # whatever else the probe holds, as patterns have no anchors (config
        # refuses them): a match reaching across the "\x00" into the next
        # field only adds a field whose redaction finds nothing.
        self._fields_alone = not cfg.custom
        self._custom_rules = bool(cfg.custom)
        # Short strings (one record's fields): Python's re has less call overhead.
        # Custom patterns are user input, so with any, RE2 stays in charge.
        self._prefilter_bytes = _compile(combined.encode())
        self._scan = _Scanner(self._prefilter_bytes)
        # For whole chunks: a match that starts with a digit (a run of 13, the
        # card prefilter, or an SSN's shape) is followed up in Python, and a run
        # that holds no valid card and no SSN (UUID fragments, long ids, epoch
        # milliseconds) is dismissed without redacting the record; see hit_positions.
        self._cards_only = any(r.name == "credit_card" for r in self._rules)
        # A dismissed run is skipped whole, so the other patterns must not be
        # able to match from inside it (a custom rule `\d{10}`, ipv4 "…123.4.5.6",
        # a key name starting with a digit): with any such, what follows the
        # run's start is searched again without the card pattern.
        self._others_scan: _Scanner | None = None
        if self._cards_only and not (all(r.name in _RUN_SAFE_RULES for r in self._rules)
                                     and not any(k[:1] in "0123456789 -" for k in key_words)):
            others = [p for r, p in zip(self._rules, parts, strict=False) if r.name != "credit_card"]
            others += parts[len(self._rules):]
            self._others_scan = _Scanner(_compile("|".join(others).encode() if others else b"$^"))

    @property
    def has_custom_rules(self) -> bool:
        return self._custom_rules

    @classmethod
    def from_config(cls, cfg: RedactConfig) -> Redactor:
        return cls(cfg)

    @property
    def fingerprint(self) -> str:
        """What these rules find, as a digest: two redactors with the same
        fingerprint redact the same spans (replacement modes and the hash key
        only change what a span becomes, so they are left out). "" when off."""
        return self._fingerprint

    def _make_fingerprint(self, cfg: RedactConfig) -> str:
        if not self.active:
            return ""
        what = [sorted(cfg.rules), sorted((c.name, c.pattern) for c in cfg.custom), sorted(self._keys),
                RULES_VERSION]
        return hashlib.sha256(msgspec.json.encode(what)).hexdigest()[:32]

    # --- replacement ---------------------------------------------------------

    def _replace(self, rule: str, value: str) -> str:
        mode = self._modes.get(rule, "mask")
        if mode == "hash":
            canonical = value
            if rule in ("credit_card", "ssn"):
                canonical = "".join(ch for ch in value if ch.isdigit())
            digest = hmac.new(self._hash_key, f"{rule}:{canonical}".encode(), hashlib.sha256).hexdigest()
            return f"[REDACTED:{rule}:{digest[:16]}]"
        if mode == "partial":
            kept = "".join(ch for ch in value if ch.isalnum())[-4:]
            if len(kept) * 2 > len(value):
                kept = ""
            return f"[REDACTED:{rule}:…{kept}]" if kept else f"[REDACTED:{rule}]"
        return f"[REDACTED:{rule}]"

    # --- text ------------------------------------------------------------------

    def might_match(self, text: str) -> bool:
        """Whether ``text`` could contain anything to redact (the prefilter)."""
        return self.active and self._scan.spans(text.encode()) is not None

    def hit_positions(self, data: bytes, end: int | None = None, json: bool = False) -> list[int]:
        """Byte offsets in ``data[:end]`` (whole lines) where the prefilter
        matches, at least the first of each line that has a match; lines
        without one need no redaction. ``json``: a UUID that follows a
        double quote or "=" in a line is whole in the text the rules see (JSON
        and logfmt lines, or parsed as plain text when they are not: a quoted
        string's text is the bytes between its quotes where they hold no
        backslash; plain lines, whose message is the line after its timestamp
        and level), so digit runs inside it are dismissed (_in_uuid_token)."""
        if not self.active:
            return []
        if end is None:
            end = len(data)
        raw = self._scan._match
        if raw is not None:
            def scan(data: bytes, pos: int, end: int) -> Any:
                found = raw(_UNANCHORED, data, pos, end)
                return None if found[0] == _NO_MATCH else found
        else:
            scan = self._scan.spans
        cards = self._cards_only
        others = self._others_scan
        find = data.find
        digit_run = _DIGIT_RUN.match
        hits = []
        pos = 0
        while pos < end:
            spans = scan(data, pos, end)
            if spans is None:
                break
            start, stop = spans[0]
            if cards and 48 <= data[start] <= 57:
                # A run of digits (with the default rules, only the card and SSN
                # patterns start with a digit). The search goes on after it
                # only if the run holds no valid card and no SSN: a longer run
                # would have matched from its own start, which is at or after
                # ``pos`` (a line's start or the end of a run dismissed before).
                run_end = digit_run(data, start).end()  # type: ignore[union-attr]
                if data[run_end:run_end + 1] == b"%":
                    run_end = _DIGIT_RUN_ESCAPES.match(data, start).end()  # type: ignore[union-attr]
                # Digits of a percent escape ("%20", "%24") are not the number's (_OUTSIDE_ESCAPE).
                lead = 0
                if start and data[start - 1] in _HEX_OR_PERCENT:
                    lead = 2 if data[start - 1] == 37 else 1 if start > 1 and data[start - 2] == 37 else 0
                if (json and _in_uuid_token(data, start, run_end)) or self._no_card_or_ssn(data[start + lead:run_end]):
                    found = None if others is None else others.spans(data, start, end)
                    if found is None or found[0][0] >= run_end:
                        pos = run_end
                        continue
                    start = found[0][0]
            hits.append(start)
            # The line is redacted as a whole: its other matches add nothing.
            newline = find(b"\n", stop)
            if newline < 0:
                break
            pos = newline + 1
        return hits

    @staticmethod
    def _no_card_or_ssn(run: bytes) -> bool:
        text = run.decode()
        return not card_windows(text) and not _SSN_SHAPE.search(text)

    def redact_text(self, text: str, prefiltered: bool = False) -> str:
        """``text`` with every match of every rule replaced. ``prefiltered``:
        the caller saw the prefilter match ``text`` itself."""
        if not self.active or not text:
            return text
        data = text.encode()
        if not prefiltered and self._scan.spans(data) is None:
            return text
        matched = self._rule_set.Match(data) if self._rule_set is not None else None
        return self._apply_rules(text, data, matched)

    def _apply_rules(self, text: str, data: bytes, matched: list[int] | None) -> str:
        """``text`` (``data``, its UTF-8) with every rule whose prefilter
        matches it applied; ``matched``: the rule set's answer for ``data``."""
        # The rules whose prefilters match, from one pass of the rule set, as
        # long as no rule has changed the text; then each rule's own prefilter.
        # An empty answer may be the set's failure (out of DFA memory): the
        # prefilters decide then too.
        replace = self._replace
        for index, rule in enumerate(self._rules):
            if matched:
                if index not in matched:
                    continue
            elif rule.prefilter_scan.spans(data) is None:
                continue
            count = [0]
            redacted = rule.apply(text, replace, count)
            if count[0]:
                self.counts[rule.name] += count[0]
            if redacted is not text:
                text = redacted
                data = text.encode()
                matched = None
        return text

    def is_sensitive_key(self, key: str) -> bool:
        """Whether a context value under ``key`` is redacted whole (key-based redaction)."""
        return self.active and bool(self._keys) and self._is_sensitive_key(key)

    def _is_sensitive_key(self, key: str) -> bool:
        k = _normalise_key(key)
        return k in self._keys or k.endswith(self._key_suffixes)

    def redact_value(self, value: Any) -> Any:
        """A JSON-like value with strings redacted, recursively; values under
        sensitive keys are replaced whole, and numbers whose digits the rules
        find something in (``{"pan": 4111111111111111}``) by the redacted text."""
        if isinstance(value, str):
            return self.redact_text(value)
        if type(value) is int or type(value) is float:
            return self._redact_number(value)
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for k, v in value.items():
                if isinstance(k, str) and self._keys and self._is_sensitive_key(k) and v not in (None, ""):
                    self.counts["key"] += 1
                    text = v if isinstance(v, str) else msgspec.json.encode(v).decode()
                    out[k] = self._replace("key", text)
                else:
                    out[k] = self.redact_value(v)
            return out
        if isinstance(value, list):
            return [self.redact_value(v) for v in value]
        return value

    def _redact_number(self, value: int | float) -> Any:
        """``value``, or its JSON text redacted if any rule finds something in
        it (a number's digits are text to the rules as they are in a line:
        ``4111111111111111`` is a card, ``1764583200000`` a timestamp)."""
        text = _json_encode(value).decode()
        if len(text) < 9 and not self._custom_rules:  # shorter than anything a built-in rule finds in digits
            return value
        redacted = self.redact_text(text)
        return value if redacted == text else redacted

    def _hit_fields(self, texts: list[tuple[str, str]], probe: str, encoded: bytes,
                    found: Any) -> tuple[set[str], set[str]]:
        """The fields of ``texts`` (name, value) that the prefilter's matches
        in ``probe`` (their values joined by "\\x00"; ``encoded``, its UTF-8)
        fall in, the first being ``found``, and those of them a match lies
        within."""
        if len(encoded) != len(probe):
            return {name for name, _ in texts}, set()  # offsets may count bytes: redact every field
        # One search per field with a hit (ASCII: byte offsets are character offsets).
        hit_fields: set[str] = set()
        prefiltered: set[str] = set()
        scan = self._scan.spans
        ends = list(accumulate(len(value) + 1 for _, value in texts))
        last = len(texts) - 1
        while found is not None:
            index = bisect_right(ends, found[0][0])
            if index > last:
                break
            hit_fields.add(texts[index][0])
            if found[0][1] < ends[index]:
                prefiltered.add(texts[index][0])
            if index == last:
                break  # no field after it
            found = scan(encoded, ends[index])
        return hit_fields, prefiltered

    def redact_record(self, record: Record) -> Record:
        """A copy of ``record`` with message, context (values, recursively, and
        by key), error_stack, tags and the free-text identity fields redacted.
        Returns ``record`` itself when nothing needed redaction."""
        if not self.active:
            return record
        scan = self._scan.spans
        hit_fields: set[str] | tuple[str, ...] = ()
        prefiltered: set[str] | tuple[str, ...] = ()  # fields a match lies within: their own text matches
        message = record.message
        message_data = b""
        message_matched: list[int] | None = None  # the rule set's answer for the message, when it hits
        if self._fields_alone:
            # The message, where most hits are, on its own: the rule set says
            # which rules to apply (any means the prefilter matches), and
            # only when it finds none (or cannot tell) does the prefilter
            # decide. Then one scan of the other fields together.
            if message:
                message_data = message.encode()
                matched = self._rule_set.Match(message_data) if self._rule_set is not None else None
                if matched or scan(message_data) is not None:
                    message_matched = matched
                    hit_fields = prefiltered = ("message",)
            values = [value for value in (record.error_stack, record.user_agent, record.user_id,
                                          record.session_id, record.request_id) if value]
            if record.tags:
                values.extend(record.tags)
            probe = "\x00".join(values)
            if probe:
                encoded = probe.encode()
                found = scan(encoded)
                if found is not None:
                    texts = [(name, value) for name in _TEXT_FIELDS[1:] if (value := getattr(record, name))]
                    if record.tags:
                        texts.extend([("tags", tag) for tag in record.tags])
                    others, others_prefiltered = self._hit_fields(texts, probe, encoded, found)
                    hit_fields = others | set(hit_fields)
                    prefiltered = others_prefiltered | set(prefiltered)
        else:
            # One prefilter scan over every text field at once; most records
            # stop here, and on a hit only the fields the hits fall in are redacted.
            texts = [(name, value) for name in _TEXT_FIELDS if (value := getattr(record, name))]
            if record.tags:
                texts.extend([("tags", tag) for tag in record.tags])
            probe = "\x00".join([value for _, value in texts])
            if probe:
                encoded = probe.encode()
                found = scan(encoded)
                if found is not None:
                    hit_fields, prefiltered = self._hit_fields(texts, probe, encoded, found)
        context_hit = bool(record.context) and self._scan.spans(_json_encode(record.context)) is not None
        if not hit_fields and not context_hit:
            return record
        changes: dict[str, Any] = {}
        for name in hit_fields:
            if name == "message" and message_data:
                redacted = self._apply_rules(message, message_data, message_matched)
                if redacted != message:
                    changes[name] = redacted
            elif name != "tags":
                value = getattr(record, name)
                redacted = self.redact_text(value, name in prefiltered)
                if redacted != value:
                    changes[name] = redacted
        if record.tags and "tags" in hit_fields:
            tags = [self.redact_text(t) for t in record.tags]
            if tags != record.tags:
                changes["tags"] = tags
        if context_hit:
            context = self.redact_value(record.context)
            if context != record.context:
                changes["context"] = context
        if not changes:
            return record
        return msgspec.structs.replace(record, **changes)
