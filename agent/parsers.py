"""Turn log lines into :class:`agent.wire.Record` values.

One :class:`LineParser` per source. ``parse_lines`` takes the raw lines of a
read chunk (bytes, without their newline) with their file offsets and returns
one record per non-blank line; ``parse_entry`` parses one multiline entry.
A line that does not parse is never dropped: it becomes a plain record tagged
``parse_error``.

Formats: ``json`` (common field names mapped onto the record, the rest kept in
``context``), ``logfmt``, ``regex`` (named groups), ``plain`` (a leading
timestamp and level are recognised), ``syslog`` (RFC 3164 and RFC 5424) and
``combined`` (the nginx/Apache combined access log; ``nginx`` and ``apache``
are the same parser).

The JSON path is the hot one: a chunk's lines are decoded by msgspec in one
call as a JSON array. Once a source's lines are seen to share one key set,
chunks are decoded straight into typed structs (:class:`_TypedChunk`: no dict
per line, type checks in C); otherwise fields are mapped with plain dict
operations. Both give the same records.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from bisect import bisect_left
from collections.abc import Callable, Sequence
from itertools import accumulate
from operator import add
from typing import Any, Literal

import msgspec
import re2

from agent.config import MultilineConfig, SourceConfig
from agent.configfile import ByteSize
from agent.multiline import MultilineJoiner
from agent.re2direct import UNANCHORED as _UNANCHORED
from agent.redact import ESCAPED_SEPARATOR
from agent.wire import Level, Lines, LinesMultiline, parse_level, parse_timestamp
from agent.wire import Record as Record

# The collector refuses longer messages and contexts (data-model: message max
# 10KB, context max 50KB); cutting here keeps the rest of the record.
MAX_MESSAGE_BYTES = 10_000
MAX_CONTEXT_BYTES = 50_000
MAX_STACK_BYTES = 256 * 1024

_LEVEL_NAMES: dict[Any, str] = {}
for _name in ("debug", "info", "warn", "warning", "error", "err", "critical", "fatal", "panic", "trace",
              "notice", "crit", "alert", "emerg", "dbg", "inf", "wrn", "eror", "severe", "verbose"):
    for _variant in (_name, _name.upper(), _name.capitalize()):
        _lvl = parse_level(_variant)
        if _lvl is not None:
            _LEVEL_NAMES[_variant] = _lvl.name


def normalise_level(value: Any, default: str = "INFO") -> str:
    """The canonical level name (``DEBUG`` … ``CRITICAL``) of ``value``;
    ``default`` when it is not a level."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        return default
    name = _LEVEL_NAMES.get(value)
    if name is not None:
        return name
    if isinstance(value, str | int) and not isinstance(value, bool):
        level = parse_level(value)
        if level is not None:
            return level.name
    return default


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _timestamp_ok(value: Any) -> bool:
    """Whether the collector will accept ``value`` as a timestamp."""
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            return parse_timestamp(value) is not None
        return 1970 <= parsed.year <= 2261
    return parse_timestamp(value) is not None


# Digits (and the separators between digit groups a card may have, see
# agent.redact: space, dash, "+", and "%20", "%2B" or "%2D" in either case, or
# part of one) at the end of a cut text.
_ESCAPED = ESCAPED_SEPARATOR.encode()
_TRAILING_DIGITS = re.compile(rb"\d(?:(?:[ +-]|" + _ESCAPED + rb")?\d)*(?:[ +-]|" + _ESCAPED + rb"|%2|%)?\Z")
_ESCAPE_THEN_DIGIT = re.compile(_ESCAPED + rb"\d")  # an escaped separator, then more of the run


def _head(raw: bytes, size: int) -> bytes:
    """``raw[:size]``, less a run of digits the cut goes through: half a card
    number or SSN is no longer one the redaction rules recognise, and would be
    stored as it is."""
    head = raw[:size]
    after = raw[size:size + 4]
    if after[:1].isdigit() or (after[:1] in (b" ", b"-", b"+") and after[1:2].isdigit()) \
            or (after[:1] == b"%" and _ESCAPE_THEN_DIGIT.match(raw, size) is not None) \
            or (after[:1] in (b"B", b"D", b"b", b"d") and head[-2:] == b"%2" and after[1:2].isdigit()):
        run = _TRAILING_DIGITS.search(head)
        if run is not None:
            head = head[:run.start()]
    return head


def _cut(text: str, limit: int, what: str) -> tuple[str, bool]:
    if len(text) * 4 <= limit:
        return text, False
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text, False
    marker = f"…[{what} truncated, {len(raw)} bytes]"
    return _head(raw, limit - len(marker.encode()) - 4).decode("utf-8", "ignore") + marker, True


# Aliases of record fields in JSON and logfmt lines, most common first.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "timestamp": ("timestamp", "ts", "time", "@timestamp", "datetime", "date", "t", "eventTime", "asctime"),
    "level": ("level", "lvl", "severity", "loglevel", "log_level", "levelname", "@level", "log.level"),
    "message": ("message", "msg", "@message", "event", "text", "log"),
    "error_stack": ("error_stack", "stack", "stacktrace", "stack_trace", "exception", "exc_info",
                    "traceback", "error.stack"),
    "user_id": ("user_id", "userId", "uid", "user.id"),
    "session_id": ("session_id", "sessionId", "session"),
    "request_id": ("request_id", "requestId", "req_id", "x_request_id"),
    "ip_address": ("ip_address", "ip", "client_ip", "remote_addr", "remote_ip", "clientIp"),
    "user_agent": ("user_agent", "userAgent", "ua", "http_user_agent"),
    "duration_ms": ("duration_ms", "elapsed_ms", "latency_ms", "response_time_ms", "took_ms"),
}
_STRING_FIELDS = ("user_id", "session_id", "request_id", "ip_address", "user_agent")


class _FieldPlan:
    """Which key of a mapping fills which record field, for one set of keys."""

    __slots__ = ("keys",)

    def __init__(self, keys: dict[str, str]) -> None:
        self.keys = keys


_json_array = msgspec.json.Decoder(list[Any])
_json_value = msgspec.json.Decoder()
_json_encode = msgspec.json.Encoder().encode


class LineParser:
    """Parses the lines of one source into records."""

    def __init__(self, cfg: SourceConfig, host: str) -> None:
        self.cfg = cfg
        self.source = cfg.source
        self.host = host
        self.static_tags = list(cfg.tags) or None
        self.encoding = cfg.encoding
        # Whether the lines are read as UTF-8 (``decode``'s encoding).
        self.utf8 = cfg.encoding.replace("-", "").lower() in ("utf8", "utf_8")
        aliases = {field: (cfg.fields[field], *names) if field in cfg.fields else names
                   for field, names in FIELD_ALIASES.items()}
        self._aliases = aliases
        self._alias_set = frozenset(k for names in aliases.values() for k in names)
        self._plans: dict[frozenset[str], _FieldPlan] = {}
        self._builders: dict[tuple[str, ...], Callable[[dict[str, Any], int, str | None], Record]] = {}
        self._typed: _TypedChunk | None = None
        self._typed_plans: dict[tuple[str, ...], _TypedChunk | None] = {}
        self._typed_wait = 0
        fmt = cfg.format
        self._regex: Any = None
        self._regex_match: Any = None
        self._regex_groups: list[tuple[str, int]] = []
        if fmt == "regex":
            assert cfg.pattern is not None
            self._regex = re2.compile(cfg.pattern)
            # The compiled RE2 object's Match, on UTF-8 bytes: the binding's
            # search wraps each call in a generator, a Match object and offset
            # conversions, ~20 µs a line for six groups (see _Scanner in agent.redact).
            if _UNANCHORED is not None:
                self._regex_match = getattr(getattr(self._regex, "_regexp", None), "Match", None)
            self._regex_groups = list(self._regex.groupindex.items())  # groupdict's order
        parse_text: dict[str, Callable[[str], dict[str, Any] | None]] = {
            "logfmt": parse_logfmt,
            "syslog": self._parse_syslog,
            "combined": parse_combined,
            "nginx": parse_combined,
            "apache": parse_combined,
            "regex": self._parse_regex,
            "plain": parse_plain,
        }
        self._parse_text = parse_text.get(fmt)
        self.errors = 0
        # When set, the time given to lines without a timestamp (lines parsed
        # by the collector get the time the agent read them).
        self.fixed_now: str | None = None
        # When set, the local time (and its UTC offset) that RFC 3164 syslog
        # timestamps, which have neither year nor zone, are read against: the
        # agent's clock when it read the lines. Otherwise now, here.
        self.fixed_local_now: dt.datetime | None = None

    def clock(self) -> str:
        """The timestamp of a line that has none: now, or :attr:`fixed_now`."""
        return self.fixed_now or now_iso()

    # --- entry points ------------------------------------------------------

    def parse_lines(self, lines: Sequence[bytes], starts: Sequence[int], file: str | None,
                    body: bytes | None = None) -> list[Record]:
        """One record per non-blank line; ``starts[i]`` is the file offset of ``lines[i]``.
        ``body``, when given, is the lines as read: each followed by a newline."""
        if self.cfg.format == "json" and self.utf8:
            return self._parse_json_lines(lines, starts, file, body)
        out: list[Record] = []
        for line, start in zip(lines, starts, strict=False):
            text = self.decode(line)
            if not text.strip():
                continue
            out.append(self.parse_entry(text, None, start, file))
        return out

    def _parse_syslog(self, text: str) -> dict[str, Any] | None:
        return parse_syslog(text, self.fixed_local_now)

    def decode(self, line: bytes) -> str:
        text = line.decode(self.encoding, "replace")
        return text[:-1] if text.endswith("\r") else text

    def parse_entry(self, first: str, rest: list[str] | None, start: int | None, file: str | None) -> Record:
        """A record from one line, or from a multiline entry (``rest`` are the
        continuation lines; they become ``error_stack``)."""
        fields: dict[str, Any] | None
        if self.cfg.format == "json":
            try:
                value = _json_value.decode(first.encode("utf-8", "replace"))
            except msgspec.DecodeError:
                value = None
            fields = value if isinstance(value, dict) else None
            if fields is not None:
                fields = self._map_fields(fields)
        else:
            assert self._parse_text is not None
            try:
                fields = self._parse_text(first)
            except (ValueError, TypeError, IndexError):
                fields = None
            if fields is not None and self.cfg.format in ("logfmt", "regex"):
                fields = self._map_fields(fields)
        tags = None
        if fields is None:
            self.errors += 1
            fields = parse_plain(first)
            tags = ["parse_error"]
        if rest:
            stack = "\n".join(rest)
            previous = fields.get("error_stack")
            fields["error_stack"] = f"{previous}\n{stack}" if previous else stack
        return self._record(fields, start, file, tags)

    # --- JSON -------------------------------------------------------------

    def _parse_json_lines(self, lines: Sequence[bytes], starts: Sequence[int],
                          file: str | None, body: bytes | None = None) -> list[Record]:
        joined = body[:-1] if body is not None and body[-1:] == b"\n" else b"\n".join(lines)
        # Every line one object, or the array below could read a value that
        # spans lines (a line cut short, pretty-printed JSON) as one line's record.
        n = len(lines) - 1
        if joined[:1] != b"{" or joined.count(b"\n{") != n or not joined.endswith((b"}", b"}\r")) \
                or joined.count(b"}\n") + joined.count(b"}\r\n") != n:
            return self._parse_json_one_by_one(lines, starts, file)
        # The same bytes as joining the lines with commas; one join, not two concatenations (each a copy).
        blob = b"".join((b"[", joined.replace(b"\n", b","), b"]"))
        typed = self._typed
        if typed is not None:
            records = typed.parse(blob, lines, starts, file)
            if records is not None:
                return records
            # Another shape of line in this chunk: the general path, then learn again.
            self._typed = None
            self._typed_wait = _TYPED_RETRY_CHUNKS
        values: list[Any] | None
        try:
            values = _json_array.decode(blob)
        except msgspec.DecodeError:
            values = None
        if values is None or len(values) != len(lines):
            # Blank lines, a malformed line or invalid UTF-8 somewhere: one by one.
            return self._parse_json_one_by_one(lines, starts, file)
        out: list[Record] = []
        append = out.append
        builders = self._builders
        shapes: set[tuple[str, ...] | None] = set()
        for value, line, start in zip(values, lines, starts, strict=False):
            if type(value) is dict and len(line) <= _FAST_LINE_BYTES:
                keys = tuple(value)
                shapes.add(keys)
                build = builders.get(keys) or self._builder_for(keys)
                append(build(value, start, file))
            elif type(value) is dict:
                shapes.add(None)
                append(self._record(self._map_fields(value), start, file, None))
            else:
                shapes.add(None)
                append(self.parse_entry(self.decode(line), None, start, file))
        if self._typed_wait:
            self._typed_wait -= 1
        elif len(shapes) == 1:
            shape = shapes.pop()
            if shape is not None:
                self._typed = self._typed_for(shape)
        return out

    def _typed_for(self, keys: tuple[str, ...]) -> _TypedChunk | None:
        """The typed decoder for chunks whose lines all have exactly these keys
        (see :class:`_TypedChunk`), or ``None`` when the key set is not one
        the straight-line builder handles."""
        if keys in self._typed_plans:
            return self._typed_plans[keys]
        present = set(keys)
        plan = self._field_plan(present)
        typed = None
        extras = [k for k in keys if k not in plan.values()]
        # One extra key at most: the context dict then has the key order of the line.
        if len(present) == len(keys) and len(set(plan.values())) == len(plan) and len(extras) <= 1 \
                and "tags" not in present and "context" not in present \
                and not any(_ODD_KEY.search(k) for k in keys):
            typed = _TypedChunk(keys, plan, self)
        if len(self._typed_plans) < 256:
            self._typed_plans[keys] = typed
        return typed

    def _field_plan(self, present: set[str]) -> dict[str, str]:
        """Record field -> the key of the line that fills it (first alias present wins)."""
        plan: dict[str, str] = {}
        for field, names in self._aliases.items():
            for name in names:
                if name in present:
                    plan[field] = name
                    break
        return plan

    def _builder_for(self, keys: tuple[str, ...]) -> Callable[[dict[str, Any], int, str | None], Record]:
        """A function that turns a decoded JSON object with exactly these keys
        (in this order) into a record.

        Log lines of one application nearly always have the same keys, so the
        mapping is worked out once per key set and compiled into straight-line
        code: a few ``dict.pop`` calls, type checks, one ``Record(...)``. A
        value of an unexpected type (or an odd timestamp) takes the general
        path, :meth:`_record`, which coerces and annotates.
        """
        present = set(keys)
        plan = self._field_plan(present)
        extras = len(present) - len(plan)
        if "tags" in present or "context" in present or extras > 64:
            def general(value: dict[str, Any], start: int, file: str | None) -> Record:
                return self._record(self._map_fields(value), start, file, None)

            built: Callable[[dict[str, Any], int, str | None], Record] = general
        else:
            built = _compile_builder(plan, self)
        if len(self._builders) < 4096:
            self._builders[keys] = built
        return built

    def _parse_json_one_by_one(self, lines: Sequence[bytes], starts: Sequence[int],
                               file: str | None) -> list[Record]:
        out: list[Record] = []
        for line, start in zip(lines, starts, strict=False):
            if not line.strip():
                continue
            try:
                value = _json_value.decode(line)
            except msgspec.DecodeError:
                out.append(self.parse_entry(self.decode(line), None, start, file))
                continue
            if type(value) is dict:
                out.append(self._record(self._map_fields(value), start, file, None))
            else:
                out.append(self.parse_entry(self.decode(line), None, start, file))
        return out

    def _plan_for(self, keys: frozenset[str]) -> _FieldPlan:
        chosen: dict[str, str] = {}
        for field, names in self._aliases.items():
            for name in names:
                if name in keys:
                    chosen[field] = name
                    break
        plan = _FieldPlan(chosen)
        if len(self._plans) < 1024:
            self._plans[keys] = plan
        return plan

    def _map_fields(self, value: dict[str, Any]) -> dict[str, Any]:
        """Move the record fields of a parsed mapping to their record names;
        everything else lands under ``context``. Mutates and returns ``value``."""
        present = frozenset(value.keys() & self._alias_set)
        plan = self._plans.get(present) or self._plan_for(present)
        out: dict[str, Any] = {}
        for field, key in plan.keys.items():
            out[field] = value.pop(key)
        if value:
            tags = value.get("tags")
            if type(tags) is list and all(type(t) is str for t in tags):
                out["tags"] = value.pop("tags")
            if value:
                out["context"] = value
        return out

    # --- regex ---------------------------------------------------------------

    def regex_groups(self) -> list[str]:
        """The names of a regex source's groups (none for other formats)."""
        return [name for name, _ in self._regex_groups]

    def field_keys(self, field: str) -> tuple[str, ...]:
        """The keys whose parsed value goes to record field ``field``."""
        return tuple(self._aliases.get(field, ()))

    def is_record_field(self, key: str) -> bool:
        """Whether a parsed value under ``key`` goes to a record field (not to ``context``)."""
        return key in self._alias_set

    def _parse_regex(self, text: str) -> dict[str, Any] | None:
        match = self._regex_match
        if match is None:
            m = self._regex.search(text)
            if m is None:
                return None
            return {k: v for k, v in m.groupdict().items() if v is not None}
        data = text.encode()
        spans = match(_UNANCHORED, data, 0, len(data))
        if spans[0][0] < 0:
            return None
        out = {}
        for name, index in self._regex_groups:
            start, end = spans[index]
            if start >= 0:  # a group that took part (RE2 matches whole UTF-8 characters)
                out[name] = data[start:end].decode()
        return out

    # --- building records ---------------------------------------------------------

    def _record(self, fields: dict[str, Any], start: int | None, file: str | None,
                tags: list[str] | None) -> Record:
        """A record from mapped fields (record names; ``context`` holds the rest)."""
        get = fields.get
        ts = get("timestamp")
        context = get("context")
        if ts is None:
            ts = self.clock()
        elif not _timestamp_ok(ts):
            context = dict(context or {})
            context["timestamp_raw"] = ts
            ts = self.clock()
            tags = [*(tags or ()), "bad_timestamp"]
        level = get("level")
        if level is None:
            level = "INFO"
        else:
            level = (_LEVEL_NAMES.get(level) if type(level) is str else None) or normalise_level(level)
        message = get("message")
        if message is None:
            message = ""
        elif type(message) is not str:
            message = _json_encode(message).decode()
        if len(message) > MAX_MESSAGE_BYTES // 4:
            message, cut = _cut(message, MAX_MESSAGE_BYTES, "message")
            if cut:
                tags = [*(tags or ()), "truncated"]
        strings: list[Any] = []
        for name in _STRING_FIELDS:
            v = get(name)
            if v is not None and type(v) is not str:
                v = _json_encode(v).decode() if isinstance(v, dict | list) else str(v)
            strings.append(v)
        duration = get("duration_ms")
        if duration is not None and type(duration) is not float:
            try:
                duration = float(duration)
            except (TypeError, ValueError):
                context = dict(context or {})
                context["duration_ms_raw"] = duration
                duration = None
        stack = get("error_stack")
        if stack is not None:
            if type(stack) is not str:
                if isinstance(stack, list):
                    stack = "\n".join(map(str, stack))
                else:
                    stack = _json_encode(stack).decode()
            if len(stack) > MAX_STACK_BYTES // 4:
                stack, _ = _cut(stack, MAX_STACK_BYTES, "error_stack")
        if context is not None:
            if type(context) is not dict:
                context = {"value": context}
            elif not context:
                context = None
            elif len(context) > 64 or sum(map(len, context)) > 4096:
                # Only large contexts are measured: encoding each one costs time.
                encoded = _json_encode(context)
                if len(encoded) > MAX_CONTEXT_BYTES:
                    context = {"truncated": True, "context_prefix": _head(encoded, 1000).decode("utf-8", "ignore")}
                    tags = [*(tags or ()), "truncated"]
        line_tags = get("tags")
        if line_tags is not None or tags is not None or self.static_tags is not None:
            tags = [*(self.static_tags or ()), *(line_tags or ()), *(tags or ())] or None
        return Record(ts, level, self.source, message, context, strings[0], strings[1], strings[2],
                      strings[3], strings[4], duration, stack, tags, file, start, self.host)


def _iso_ok(value: str) -> bool:
    try:
        parsed = _fromisoformat(value)
    except ValueError:
        return False
    return 1970 <= parsed.year <= 2261


_fromisoformat = dt.datetime.fromisoformat
_FAST_LINE_BYTES = 8192  # longer lines may hit the message/context limits: general path

# Record's positional order after timestamp, level, source, message, context.
_RECORD_TAIL = ("user_id", "session_id", "request_id", "ip_address", "user_agent", "duration_ms",
                "error_stack")


def _compile_builder(plan: dict[str, str], parser: LineParser) -> Callable[[dict[str, Any], int, str | None],
                                                                           Record]:
    """Straight-line code for one key plan (see :meth:`LineParser._builder_for`).
    Keys enter the source only through ``repr``."""
    lines = ["def build(d, offset, file):", "    pop = d.pop"]
    checks = []
    for field, key in plan.items():
        lines.append(f"    v_{field} = pop({key!r})")
        if field == "timestamp":
            checks.append("type(v_timestamp) is not str or not iso_ok(v_timestamp)")
        elif field == "level":
            checks.append("type(v_level) is not str or v_level not in LEVELS")
        elif field == "duration_ms":
            checks.append("(type(v_duration_ms) is not float and type(v_duration_ms) is not int)")
        elif field in ("message", "error_stack") or field in _STRING_FIELDS:
            checks.append(f"type(v_{field}) is not str")
    mapped = ", ".join(f"{field!r}: v_{field}" for field in plan)
    if checks:
        lines.append("    if " + " or ".join(checks) + ":")
        lines.append(f"        fields = {{{mapped}}}")
        lines.append("        if d:")
        lines.append("            fields['context'] = d")
        lines.append("        return general(fields, offset, file, None)")
    ts = "v_timestamp" if "timestamp" in plan else "now_iso()"
    level = "LEVELS[v_level]" if "level" in plan else "'INFO'"
    message = "v_message" if "message" in plan else "''"
    tail = ", ".join(f"v_{f}" if f in plan else "None" for f in _RECORD_TAIL)
    lines.append(f"    return Record({ts}, {level}, SOURCE, {message}, d or None, {tail}, TAGS, file, offset, HOST)")
    namespace: dict[str, Any] = {
        "iso_ok": _iso_ok, "LEVELS": _LEVEL_NAMES, "Record": Record, "now_iso": parser.clock,
        "general": parser._record, "SOURCE": parser.source, "TAGS": parser.static_tags, "HOST": parser.host,
    }
    exec(compile("\n".join(lines), f"<json builder {sorted(plan.values())}>", "exec"), namespace)  # noqa: S102
    return namespace["build"]  # type: ignore[no-any-return]


# Keys msgspec cannot take as a field's name (quotes, backslashes, control
# characters): lines with one take the general path.
_ODD_KEY = re.compile(r'["\\\x00-\x1f]')
_TYPED_RETRY_CHUNKS = 8  # after a chunk of mixed lines, chunks parsed the general way before learning again
_LEVEL_LITERAL: Any = Literal[tuple(k for k in _LEVEL_NAMES if isinstance(k, str))]  # type: ignore[valid-type]


class _Slow(Exception):
    """A line the typed path does not take as is: the chunk goes the general way."""


class _TypedChunk:
    """A chunk's lines decoded in one call into typed structs, for sources
    whose lines have one key set (the usual case).

    The struct has one field per key, typed as the straight-line builder
    (:func:`_compile_builder`) requires: strings, a known level name, a number
    for ``duration_ms``; it forbids other keys and requires every key. So
    msgspec does the checks in C, without building a dict per line, and a
    chunk that decodes is built into records by a loop with one ``Record(...)``
    per line and a timestamp check. Any line that does not fit (another key
    set, another type, a bad timestamp, a long line) makes :meth:`parse`
    return ``None``, and the caller parses the chunk the general way, so the
    records are the same either way.
    """

    __slots__ = ("_build", "_decoder")

    def __init__(self, keys: tuple[str, ...], plan: dict[str, str], parser: LineParser) -> None:
        field_of = {key: field for field, key in plan.items()}
        struct_fields: list[tuple[str, Any]] = []
        rename: dict[str, str] = {}
        attr: dict[str, str] = {}
        extras: list[tuple[str, str]] = []
        for i, key in enumerate(keys):
            name = f"f{i}"
            rename[name] = key
            field = field_of.get(key)
            if field is None:
                kind: Any = Any
                extras.append((key, name))
            elif field == "level":
                kind = _LEVEL_LITERAL
            elif field == "duration_ms":
                kind = int | float
            else:
                kind = str
            struct_fields.append((name, kind))
            if field is not None:
                attr[field] = f"v.{name}"
        struct = msgspec.defstruct("TypedLine", struct_fields, rename=rename, forbid_unknown_fields=True,
                                   gc=False)
        self._decoder: Any = msgspec.json.Decoder(list[struct])  # type: ignore[valid-type]
        lines = ["def build(values, starts, file):", "    out = []", "    append = out.append",
                 "    for v, offset in zip(values, starts):"]
        if "timestamp" in attr:
            lines += [f"        ts = {attr['timestamp']}",
                      "        try:",
                      "            year = fromiso(ts).year",
                      "        except ValueError:",
                      "            raise Slow from None",
                      "        if year < 1970 or year > 2261:",
                      "            raise Slow"]
        ts = "ts" if "timestamp" in attr else "now_iso()"
        level = f"LEVELS[{attr['level']}]" if "level" in attr else "'INFO'"
        message = attr.get("message", "''")
        context = "{" + ", ".join(f"{key!r}: v.{name}" for key, name in extras) + "}" if extras else "None"
        tail = ", ".join(attr.get(f, "None") for f in _RECORD_TAIL)
        lines.append(f"        append(Record({ts}, {level}, SOURCE, {message}, {context}, {tail}, TAGS, file, "
                     "offset, HOST))")
        lines.append("    return out")
        namespace: dict[str, Any] = {
            "fromiso": _fromisoformat, "LEVELS": _LEVEL_NAMES, "Record": Record, "now_iso": parser.clock,
            "Slow": _Slow, "SOURCE": parser.source, "TAGS": parser.static_tags, "HOST": parser.host,
        }
        exec(compile("\n".join(lines), f"<typed json builder {list(keys)}>", "exec"), namespace)  # noqa: S102
        self._build: Callable[[list[Any], Sequence[int], str | None], list[Record]] = namespace["build"]

    def parse(self, blob: bytes, lines: Sequence[bytes], starts: Sequence[int],
              file: str | None) -> list[Record] | None:
        """The records of a chunk (``blob``: its lines as a JSON array), or
        ``None`` when some line needs the general path."""
        if lines and max(map(len, lines)) > _FAST_LINE_BYTES:
            return None
        try:
            values = self._decoder.decode(blob)
        except msgspec.DecodeError:
            return None
        if len(values) != len(lines):
            return None
        try:
            return self._build(values, starts, file)
        except _Slow:
            return None


# --- text formats --------------------------------------------------------------

_PLAIN = re.compile(
    r"^\s*\[?(?P<timestamp>\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:[.,]\d{1,9})?(?:Z|[+-]\d{2}:?\d{2})?)\]?"
    r"\s*(?:[\[(]?(?P<level>TRACE|DEBUG|INFO|NOTICE|WARN(?:ING)?|ERROR|ERR|CRITICAL|CRIT|FATAL|PANIC|SEVERE)"
    r"[\])]?:?\s+)?(?P<message>.*)$",
    re.DOTALL,
)
_PLAIN_LEVEL = re.compile(
    r"^\s*[\[(]?(?P<level>TRACE|DEBUG|INFO|NOTICE|WARN(?:ING)?|ERROR|ERR|CRITICAL|CRIT|FATAL|PANIC|SEVERE)"
    r"[\])]?:?\s+(?P<message>.*)$",
    re.DOTALL | re.IGNORECASE,
)


def parse_plain(text: str) -> dict[str, Any]:
    """The whole line is the message; a leading timestamp and level are used when present."""
    if text[:1].isdigit() or text[:1] == "[":
        m = _PLAIN.match(text)
        if m:
            fields = {k: v for k, v in m.groupdict().items() if v is not None}
            ts = fields["timestamp"].replace(",", ".")
            if ts[10] == " ":
                ts = ts[:10] + "T" + ts[11:]
            parsed = parse_timestamp(ts)
            if parsed is not None:
                fields["timestamp"] = ts
            else:
                del fields["timestamp"]
            return fields
    m = _PLAIN_LEVEL.match(text)
    if m:
        return {"level": m.group("level"), "message": m.group("message")}
    return {"message": text}


_LOGFMT = re.compile(r'([^\s=]+)=("[^"\\]*(?:\\.[^"\\]*)*"|\S*)|(\S+)')  # quoted: an unrolled loop


def parse_logfmt(text: str) -> dict[str, Any] | None:
    """``key=value key2="quoted value" flag`` into a mapping; ``None`` when the
    line has no ``key=value`` pair at all."""
    out: dict[str, Any] = {}
    pairs = 0
    for key, value, bare in _LOGFMT.findall(text):
        if bare:
            out[bare] = True
            continue
        pairs += 1
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = msgspec.json.decode(value.encode())
            except msgspec.DecodeError:
                value = value[1:-1]
        out[key] = value
    return out if pairs else None


# Bracketed and quoted parts as unrolled loops, as _COMBINED's (the same strings).
_SYSLOG_5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
    r"(?P<sd>-|(?:\[[^\]\\]*(?:\\.[^\]\\]*)*\])+)(?: (?P<msg>.*))?$",
    re.DOTALL,
)
_SYSLOG_3164 = re.compile(
    r"^(?:<(?P<pri>\d{1,3})>)?(?P<ts>[A-Z][a-z]{2} [ \d]\d \d{2}:\d{2}:\d{2}) (?P<host>\S+) "
    r"(?P<tag>[^\s:\[]+)(?:\[(?P<pid>[^\]]+)\])?: ?(?P<msg>.*)$",
    re.DOTALL,
)
_SD_ELEMENT = re.compile(r"\[(\S+?)((?: \S+?=\"[^\"\\]*(?:\\.[^\"\\]*)*\")*)\]")
_SD_PARAM = re.compile(r" (\S+?)=\"([^\"\\]*(?:\\.[^\"\\]*)*)\"")
_SD_ESCAPE = re.compile(r"\\(.)")
# (level, facility and severity) of each PRI value a 3-digit PRI can hold.
_SYSLOG_PRI: dict[str, tuple[str, int, int]] = {}
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}


def _syslog_severity(pri: str | None) -> tuple[str | None, dict[str, Any]]:
    if pri is None:
        return None, {}
    known = _SYSLOG_PRI.get(pri)
    if known is None:
        value = int(pri)
        severity = value & 7
        known = ((parse_level(severity) or Level.INFO).name, value >> 3, severity)
        if len(_SYSLOG_PRI) < 4096:  # "007" and "7" are both keys: at most 1,110 of them
            _SYSLOG_PRI[pri] = known
    return known[0], {"facility": known[1], "severity": known[2]}


def parse_syslog(text: str, now: dt.datetime | None = None) -> dict[str, Any] | None:
    """RFC 5424 (``<165>1 2003-10-11T22:14:15.003Z host app 123 ID47 [sd] msg``)
    or RFC 3164 / the classic file format (``<34>Oct 11 22:14:15 host su[12]: msg``,
    PRI optional). RFC 3164 timestamps have no year and are local time: the
    current year is assumed, or the previous one if that lands in the future."""
    m = _SYSLOG_5424.match(text)
    if m:
        pri, host, app, procid, msgid, sd = m.group("pri", "host", "app", "procid", "msgid", "sd")
        level, context = _syslog_severity(pri)
        if host != "-":
            context["hostname"] = host
        if app != "-":
            context["appname"] = app
        if procid != "-":
            context["procid"] = procid
        if msgid != "-":
            context["msgid"] = msgid
        if sd != "-":
            structured: dict[str, dict[str, str]] = {}
            for sd_id, params in _SD_ELEMENT.findall(sd):
                structured[sd_id] = {k: _SD_ESCAPE.sub(r"\1", v) if "\\" in v else v
                                     for k, v in _SD_PARAM.findall(params)}
            context["structured_data"] = structured
        msg = m.group("msg") or ""
        if msg.startswith("\ufeff"):
            msg = msg[1:]
        fields: dict[str, Any] = {"message": msg, "context": context}
        if m.group("ts") != "-":
            fields["timestamp"] = m.group("ts")
        if level:
            fields["level"] = level
        return fields
    m = _SYSLOG_3164.match(text)
    if m:
        level, context = _syslog_severity(m.group("pri"))
        context["hostname"] = m.group("host")
        context["appname"] = m.group("tag")
        if m.group("pid"):
            context["procid"] = m.group("pid")
        month_name, day, clock = m.group("ts").split(None, 2)
        month = _MONTHS.get(month_name)
        if month is None:
            return None
        local_now = now or dt.datetime.now().astimezone()
        hour, minute, second = (int(x) for x in clock.split(":"))
        stamp = local_now.replace(month=month, day=int(day), hour=hour, minute=minute, second=second,
                                  microsecond=0)
        if stamp - local_now > dt.timedelta(days=1):
            stamp = stamp.replace(year=stamp.year - 1)
        fields = {"timestamp": stamp.isoformat(), "message": m.group("msg"), "context": context}
        if level:
            fields["level"] = level
        return fields
    return None


# Quoted fields as "unrolled loops" ([^"\\]* runs between escapes): the same
# strings as (?:[^"\\]|\\.)*, without a group entered per character.
_COMBINED = re.compile(
    r'^(?P<ip>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<request>[^"\\]*(?:\\.[^"\\]*)*)" (?P<status>\d{3}) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>[^"\\]*(?:\\.[^"\\]*)*)" "(?P<agent>[^"\\]*(?:\\.[^"\\]*)*)")?'
    r'(?P<extra>.*)$'
)
_NUMBER = re.compile(r"(?:^|\s)(?:(?:rt|request_time|upstream_response_time)=)?(\d+(?:\.\d+)?)(?=\s|$)")


@functools.lru_cache(maxsize=1024)
def _combined_time(text: str) -> str | None:
    """``02/Dec/2026:09:00:00 +0000`` in RFC 3339, or ``None``. Cached: an
    access log's lines share their second, and strptime costs several µs."""
    try:
        return dt.datetime.strptime(text, "%d/%b/%Y:%H:%M:%S %z").isoformat()
    except ValueError:
        return None


def parse_combined(text: str) -> dict[str, Any] | None:
    """The nginx/Apache combined log format, optionally followed by the request
    time: seconds with a decimal point (nginx ``$request_time``) or integer
    microseconds (Apache ``%D``)."""
    m = _COMBINED.match(text)
    if m is None:
        return None
    g = m.groupdict()
    timestamp = _combined_time(g["time"])
    if timestamp is None:
        return None
    status = int(g["status"])
    context: dict[str, Any] = {"status": status}
    request = g["request"]
    parts = request.split(" ")
    if len(parts) == 3:
        context["method"], context["path"], context["protocol"] = parts
    if g["bytes"] != "-":
        context["bytes"] = int(g["bytes"])
    if g["user"] != "-":
        context["remote_user"] = g["user"]
    if g["referer"] and g["referer"] != "-":
        context["referer"] = g["referer"]
    fields: dict[str, Any] = {
        "timestamp": timestamp,
        "level": "ERROR" if status >= 500 else "WARN" if status >= 400 else "INFO",
        "message": f"{request} {status}",
        "ip_address": g["ip"],
        "context": context,
    }
    if g["agent"] and g["agent"] != "-":
        fields["user_agent"] = g["agent"]
    extra = (g["extra"] or "").strip()
    if extra:
        n = _NUMBER.search(extra)
        if n:
            value = n.group(1)
            fields["duration_ms"] = float(value) * 1000.0 if "." in value else int(value) / 1000.0
        else:
            context["extra"] = extra
    return fields


# --- lines shipped as read (parsed by the collector) ----------------------------------

_SHIPPED_PARSERS: dict[tuple[Any, ...], LineParser] = {}
_MAX_UTC_OFFSET = 18 * 3600  # the widest zone offsets ISO 8601 / RFC 3339 allow
# Formats an agent ships as read when the redaction prefilter finds nothing
# in a line. JSON, logfmt and plain records hold only text of the line
# (substrings, or JSON strings decoded, whose escapes the prefilter counts as
# hits), so the prefilter's verdict on the raw line holds for the record.
# combined/nginx/apache records also join text: the message is the request and the
# status ("GET /1-2-3 200"), which no raw line holds in one piece, so the
# collector redacts the records of JOINED_FORMATS whatever rules the agent
# applied. syslog records hold substrings too, except structured-data values,
# which are unescaped ("4111\\ 1111\\ …" is a card): in BACKSLASH_FORMATS a line
# with a backslash is a hit, parsed and redacted on the agent. regex records
# are the pattern's groups, substrings too; the pattern travels with the lines
# (RE2: linear time whatever an agent sends), and a source whose group names are
# sensitive keys (a group "password" is redacted whole) is parsed on the agent.
JOINED_FORMATS = frozenset({"combined", "nginx", "apache"})  # parse_combined's names
BACKSLASH_FORMATS = frozenset({"syslog"})
SHIPPED_FORMATS = frozenset({"json", "logfmt", "plain", "syslog", "regex", *JOINED_FORMATS})
MAX_SHIPPED_PATTERN = 4096  # characters of a regex source's pattern in Lines (and of a multiline pattern)
MAX_SHIPPED_MULTILINE_LINES = 100_000  # Lines.multiline.max_lines
MAX_SHIPPED_MULTILINE_BYTES = 64 * 1024 * 1024  # Lines.multiline.max_bytes
_MAX_REGEX_PARSERS = 32  # cached parsers of shipped regex lines (each an RE2 program and its DFA memory)


def parse_shipped_lines(group: Lines, host: str) -> tuple[list[tuple[int, Record]], int, int]:
    """The records of lines an agent shipped as read (:class:`agent.wire.Lines`),
    built by the same parser and settings the agent would have used: pairs of
    (line number in ``group.data``, record), the number of lines (blank ones
    included) and how many did not parse (kept as ``parse_error`` records).
    Raises ``ValueError`` naming the field when the group's settings are invalid."""
    if group.format not in SHIPPED_FORMATS:
        raise ValueError(f"lines.format: {group.format!r} is not a format shipped as lines "
                         f"({', '.join(sorted(SHIPPED_FORMATS))})")
    if len(group.source) > 200 or not group.source:
        raise ValueError("lines.source: must be 1 to 200 characters")
    data = group.data if type(group.data) is bytes else bytes(group.data)
    if not data:
        return [], 0, 0
    if data[-1:] != b"\n":
        data += b"\n"
    utc_offset = group.utc_offset
    if group.format == "syslog" and (utc_offset is None or not -_MAX_UTC_OFFSET <= utc_offset <= _MAX_UTC_OFFSET):
        raise ValueError(f"lines.utc_offset: syslog lines need the agent's UTC offset in seconds, "
                         f"at most {_MAX_UTC_OFFSET} (18 h) either way; got {utc_offset!r}")
    pattern = group.pattern
    if group.format == "regex":
        if not pattern or len(pattern) > MAX_SHIPPED_PATTERN:
            raise ValueError(f"lines.pattern: regex lines need their source's pattern, 1 to "
                             f"{MAX_SHIPPED_PATTERN} characters")
    elif pattern is not None:
        raise ValueError("lines.pattern: only regex lines carry a pattern")
    joiner = _shipped_joiner(group.multiline) if group.multiline is not None else None
    key = (group.source, group.format, tuple(sorted((group.fields or {}).items())), tuple(group.tags or ()),
           host, pattern)
    parser = _SHIPPED_PARSERS.get(key)
    if parser is None:
        try:
            cfg = SourceConfig(path="-", source=group.source, format=group.format,  # type: ignore[arg-type]
                               tags=list(group.tags or ()), fields=dict(group.fields or {}), pattern=pattern)
        except ValueError as exc:
            if pattern is not None and str(exc).startswith("pattern "):
                raise ValueError(f"lines.{exc}") from None
            raise
        parser = LineParser(cfg, host)
        if len(_SHIPPED_PARSERS) >= 256 or (pattern is not None and sum(
                1 for k in _SHIPPED_PARSERS if k[-1] is not None) >= _MAX_REGEX_PARSERS):
            _SHIPPED_PARSERS.clear()
        _SHIPPED_PARSERS[key] = parser
    lines = data[:-1].split(b"\n")
    base = group.offset or 0
    starts = list(map(add, accumulate(map(len, lines), initial=base), range(len(lines) + 1)))
    starts.pop()
    read_at = dt.datetime.fromtimestamp(group.read_at, dt.UTC) if 0 < group.read_at < 1e11 else None
    parser.fixed_now = read_at.isoformat(timespec="milliseconds").replace("+00:00", "Z") if read_at else None
    if utc_offset is not None and group.format == "syslog" and read_at is not None:
        parser.fixed_local_now = read_at.astimezone(dt.timezone(dt.timedelta(seconds=utc_offset)))
    errors_before = parser.errors
    try:
        if joiner is not None:
            return _parse_shipped_entries(parser, joiner, group, lines, starts), len(lines), \
                parser.errors - errors_before
        records = parser.parse_lines(lines, starts, group.file, data)
    finally:
        parser.fixed_now = None
        parser.fixed_local_now = None
    if len(records) == len(lines):
        numbered = list(enumerate(records))
    else:  # blank lines make no record but keep their number
        numbered = [(bisect_left(starts, r.offset), r) for r in records]  # type: ignore[arg-type]
    if group.offset is None:
        numbered = [(i, msgspec.structs.replace(r, offset=None)) for i, r in numbered]
    return numbered, len(lines), parser.errors - errors_before


def _shipped_joiner(settings: LinesMultiline) -> MultilineJoiner:
    """A fresh joiner for a group's ``multiline`` settings; ``ValueError``
    naming the field when they are invalid."""
    if settings.mode not in ("start", "continuation"):
        raise ValueError(f"lines.multiline.mode: must be start or continuation, not {settings.mode[:50]!r}")
    if not 1 <= settings.max_lines <= MAX_SHIPPED_MULTILINE_LINES:
        raise ValueError(f"lines.multiline.max_lines: must be 1 to {MAX_SHIPPED_MULTILINE_LINES}")
    if not 1024 <= settings.max_bytes <= MAX_SHIPPED_MULTILINE_BYTES:
        raise ValueError(f"lines.multiline.max_bytes: must be 1024 to {MAX_SHIPPED_MULTILINE_BYTES}")
    if settings.pattern is not None and not 1 <= len(settings.pattern) <= MAX_SHIPPED_PATTERN:
        raise ValueError(f"lines.multiline.pattern: must be 1 to {MAX_SHIPPED_PATTERN} characters")
    try:
        return MultilineJoiner(MultilineConfig(mode=settings.mode, pattern=settings.pattern,  # type: ignore[arg-type]
                                               max_lines=settings.max_lines,
                                               max_bytes=ByteSize(settings.max_bytes)))
    except ValueError as exc:  # the pattern (MultilineConfig checks it with RE2)
        raise ValueError(f"lines.multiline.{exc}") from None


def _parse_shipped_entries(parser: LineParser, joiner: MultilineJoiner, group: Lines, lines: list[bytes],
                           starts: list[int]) -> list[tuple[int, Record]]:
    """The records of a multiline group: its lines joined by a fresh joiner,
    as the agent's joined them (the group starts where an entry does and
    holds whole entries), each numbered by its first line."""
    entries = joiner.feed_lines(lines, starts, starts[-1] + len(lines[-1]) + 1, parser.decode, 0.0) if lines else []
    entries.extend(joiner.flush())
    file = group.file
    numbered = [(bisect_left(starts, start), parser.parse_entry(first, rest, start, file))
                for first, rest, start, _ in entries]
    if group.offset is None:
        numbered = [(i, msgspec.structs.replace(r, offset=None)) for i, r in numbered]
    return numbered
