"""The agent's configuration: the ``agent:`` section of a logferry YAML file.

Every section is a msgspec Struct with ``forbid_unknown_fields=True`` and its
defaults written here, so ``AgentConfig()`` is the documented default and a
typo in a key is an error with its YAML path (see :mod:`agent.configfile`).
Cross-field rules live in ``__post_init__``; a ``ValueError`` raised there is
reported against the Struct's path.

:class:`RedactConfig` is shared with the collector, which applies the same
rules to records that arrive without an agent (``collector.redact``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

import msgspec

from agent.configfile import ByteSize, Duration

RedactRuleName = Literal["ssn", "credit_card", "email", "ipv4", "ipv6", "secrets"]
RedactMode = Literal["mask", "hash", "partial"]
Format = Literal["json", "logfmt", "regex", "plain", "syslog", "combined", "nginx", "apache"]

# Context keys whose whole value is sensitive, matched case-insensitively with
# `-` read as `_`; a key ending in `_<one of these>` (`db_password`) matches too.
DEFAULT_SENSITIVE_KEYS = [
    "password", "passwd", "pwd", "pass", "secret", "client_secret", "token", "access_token",
    "refresh_token", "id_token", "auth", "authorization", "api_key", "apikey", "x_api_key",
    "private_key", "cookie", "set_cookie", "session_token", "credentials", "credit_card",
    "card_number", "cvv", "ssn",
]


def _check_regex(pattern: str, what: str) -> None:
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"{what} is not a valid RE2 regular expression: {detail}") from None


def _pattern_parts(pattern: str) -> Iterator[tuple[str, str]]:
    """An RE2 pattern in parts, as (kind, text): ``class`` (a character class
    whole), ``quote`` (``\\Q…\\E``), ``escape`` (a backslash and the character
    after it) and ``char`` (any other character)."""
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if pattern[i + 1:i + 2] == "Q":
                end = pattern.find("\\E", i + 2)
                end = n if end < 0 else end + 2
                yield "quote", pattern[i:end]
                i = end
            else:
                yield "escape", pattern[i:i + 2]
                i += 2
            continue
        if c != "[":
            yield "char", c
            i += 1
            continue
        j = i + 1
        if pattern[j:j + 1] == "^":
            j += 1
        if pattern[j:j + 1] == "]":  # a leading "]" is a member
            j += 1
        while j < n:
            d = pattern[j]
            if d == "\\":
                j += 2
                continue
            if d == "[" and pattern[j + 1:j + 2] == ":":  # [:alpha:]
                end = pattern.find(":]", j + 2)
                if end >= 0:
                    j = end + 2
                    continue
            j += 1
            if d == "]":
                break
        yield "class", pattern[i:j]
        i = j


def _anchor(pattern: str) -> str | None:
    """The first anchor (``^``, ``$``, ``\\A``, ``\\z``) in ``pattern`` outside
    a character class, else ``None``."""
    for kind, text in _pattern_parts(pattern):
        if (kind == "escape" and text in ("\\A", "\\z", "\\Z")) or (kind == "char" and text in "^$"):
            return text
    return None


def without_boundaries(pattern: str) -> str:
    """``pattern`` with its word-boundary assertions (``\\b``, ``\\B``, outside
    character classes and ``\\Q…\\E``) replaced by empty groups: it matches
    every text ``pattern`` matches, and more. A prefilter must: a field's text
    can have a boundary its line lacks (``x\\nacct1`` in a JSON line is
    ``x``, a newline and ``acct1`` once decoded; a regex group can start mid-word)."""
    return "".join("(?:)" if kind == "escape" and text in ("\\b", "\\B") else text
                   for kind, text in _pattern_parts(pattern))


class CustomRedactRule(msgspec.Struct, forbid_unknown_fields=True):
    """A user's own pattern; every match is replaced (``[REDACTED:<name>]`` by default).

    A rule is searched for anywhere in a record's text (a line, a field, a
    context value), so anchors (``^``, ``$``, ``\\A``, ``\\z``) are refused:
    they would match at the start of whatever text the search happened to
    cover, and a value elsewhere would go unredacted."""

    name: Annotated[str, msgspec.Meta(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    pattern: Annotated[str, msgspec.Meta(min_length=1)]
    mode: RedactMode | None = None

    def __post_init__(self) -> None:
        _check_regex(self.pattern, "pattern")
        anchor = _anchor(self.pattern)
        if anchor is not None:
            raise ValueError(f"pattern may not use the anchor `{anchor}`: a rule is searched for anywhere "
                             "in a record's text (use \\b for a word boundary)")


class RedactConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Redaction rules. ``RedactConfig()`` is redaction on with the rules
    ``ssn``, ``credit_card`` and ``secrets`` plus key-based redaction of
    ``context`` values, replacing matches by ``[REDACTED:<rule>]``.

    ``mode``: ``mask`` (``[REDACTED:<rule>]``), ``hash`` (a keyed HMAC of the
    value, so equal values stay joinable; needs ``hash_key``) or ``partial``
    (the last four digits or characters stay visible). ``modes`` overrides it per rule.
    """

    enabled: bool = True
    rules: list[RedactRuleName] = msgspec.field(default_factory=lambda: ["ssn", "credit_card", "secrets"])
    custom: list[CustomRedactRule] = msgspec.field(default_factory=list)
    keys: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_SENSITIVE_KEYS))
    mode: RedactMode = "mask"
    modes: dict[str, RedactMode] = msgspec.field(default_factory=dict)
    hash_key: str = ""

    def __post_init__(self) -> None:
        names = set(self.rules) | {c.name for c in self.custom} | {"key"}
        unknown = sorted(set(self.modes) - names)
        if unknown:
            raise ValueError(f"`modes` names rules that are not enabled: {', '.join(unknown)}")
        uses_hash = self.mode == "hash" or "hash" in self.modes.values() or any(
            c.mode == "hash" for c in self.custom
        )
        if uses_hash and not self.hash_key:
            raise ValueError("`hash` mode needs a `hash_key` (for example \"${LOGFERRY_REDACT_KEY}\")")
        seen: set[str] = set()
        for rule in self.custom:
            builtin = {"ssn", "credit_card", "email", "ipv4", "ipv6", "secrets", "key"}
            if rule.name in seen or rule.name in builtin:
                raise ValueError(f"custom rule name `{rule.name}` is used twice or by a built-in rule")
            seen.add(rule.name)


class CollectorTarget(msgspec.Struct, forbid_unknown_fields=True):
    """Where batches go: ``POST {url}/v1/ingest`` with ``Authorization: Bearer {token}``."""

    url: Annotated[str, msgspec.Meta(pattern=r"^https?://")] = "http://127.0.0.1:8080"
    token: str = ""
    timeout: Duration = Duration(30.0)
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    compression: Literal["zstd", "gzip", "none"] = "zstd"
    # zstd's level: negative levels cost less CPU and compress less.
    zstd_level: Annotated[int, msgspec.Meta(ge=-7, le=19)] = 1
    retry_initial: Duration = Duration(0.2)
    retry_max: Duration = Duration(30.0)
    # 0 means retry for ever: files on disk and the spool are the buffer.
    max_retries: Annotated[int, msgspec.Meta(ge=0)] = 0
    verify_tls: bool = True
    # PEM file of the CA(s) that signed the collector's certificate (https), instead of the system's.
    ca_file: str = ""

    def __post_init__(self) -> None:
        if self.ca_file:
            import os

            if not os.path.isfile(self.ca_file):
                raise ValueError(f"`ca_file` {self.ca_file!r} is not a readable file")


class MultilineConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Join lines into one record.

    ``start``: a line matching ``pattern`` begins a record, every other line
    continues it. ``continuation``: a line matching ``pattern`` continues the
    previous record. Without a pattern, ``continuation`` recognises Python and
    Java tracebacks (indented lines, ``Traceback …``, ``Caused by:``,
    ``SomeError: …``) and ``start`` takes a line beginning with a date, a
    ``[`` or a ``{`` as a start. Continuation lines fill ``error_stack``.
    An entry ends at ``max_lines`` lines, or before a line that would take it
    past ``max_bytes`` (as read, newlines included; its first line is kept
    whole): what a pending entry holds in memory is bounded.
    """

    mode: Literal["start", "continuation"] = "continuation"
    pattern: str | None = None
    max_lines: Annotated[int, msgspec.Meta(ge=1)] = 500
    timeout: Duration = Duration(1.0)
    max_bytes: ByteSize = ByteSize(1024 * 1024)

    def __post_init__(self) -> None:
        if self.pattern is not None:
            _check_regex(self.pattern, "pattern")
        if self.max_bytes < 1024:
            raise ValueError("`max_bytes` must be at least 1KiB")


class SourceConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Files to tail. ``path`` is a glob (``**`` crosses directories) or ``-``
    for standard input; ``source`` becomes ``Record.source``."""

    path: Annotated[str, msgspec.Meta(min_length=1)]
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    format: Format = "plain"
    # For `format: regex`: named groups `timestamp`, `level`, `message`, any
    # Record field, anything else goes to context.
    pattern: str | None = None
    exclude: list[str] = msgspec.field(default_factory=list)
    tags: list[str] = msgspec.field(default_factory=list)
    start_at: Literal["beginning", "end"] = "beginning"
    max_line: ByteSize = ByteSize(256 * 1024)
    multiline: MultilineConfig | None = None
    encoding: str = "utf-8"
    # Record field -> name in the JSON/logfmt line, when the usual names do not fit.
    fields: dict[str, str] = msgspec.field(default_factory=dict)
    # Where logrotate's `olddir` puts rotated files (absolute, or relative to each
    # file's directory): searched, beside the file's own directory, for the unread
    # tail of a file rotated while the agent was stopped.
    olddir: str = ""

    def __post_init__(self) -> None:
        if self.max_line < 64:
            raise ValueError("`max_line` must be at least 64 bytes")
        if self.format == "regex":
            if not self.pattern:
                raise ValueError("`format: regex` needs a `pattern` with named groups")
            _check_regex(self.pattern, "pattern")
        elif self.pattern is not None:
            raise ValueError("`pattern` is only used with `format: regex`")
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"unknown encoding `{self.encoding}`") from None
        known = {"timestamp", "level", "message", "user_id", "session_id", "request_id", "ip_address",
                 "user_agent", "duration_ms", "error_stack"}
        bad = sorted(set(self.fields) - known)
        if bad:
            raise ValueError(f"`fields` keys must be record fields ({', '.join(sorted(known))}), not {bad}")
        shared = sorted({name for name in self.fields.values() if list(self.fields.values()).count(name) > 1})
        if shared:
            raise ValueError(f"`fields` maps several record fields to the same key: {shared}")


class BatchConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A batch closes when the first of these is reached."""

    max_wait: Duration = Duration(0.1)
    # Lines per batch (api.md's example says 1000): a batch costs the agent ~0.5 ms
    # whatever its size, so under load batches are about max_bytes (~10,000 lines
    # of 200 B). 2 MiB batches took 7% less CPU than 1 MiB ones on the bench (8 of
    # 8 pairs) for ~9 MiB more peak RSS (45 -> 54 MiB).
    max_records: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 10_000
    max_bytes: ByteSize = ByteSize(2 * 1024 * 1024)

    def __post_init__(self) -> None:
        if self.max_bytes < 1024:
            raise ValueError("`max_bytes` must be at least 1KiB")


class SpoolConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Batches written to disk before they are sent (always, under
    ``state_dir/spool``). ``max_bytes`` is how much may wait there: while the
    collector is away, files keep being read into the spool while one more
    batch (as large as the largest so far) still fits; with 0 only the batches
    in flight are spooled and reading pauses at once.

    ``sync``: each group of batches is fdatasynced before it is sent (the
    default). With ``false`` (Fluent Bit's ``storage.sync normal``) the spool
    is left to the page cache: a ``kill -9`` still loses and repeats nothing,
    but after a power loss or kernel crash the batches that were in flight
    are gone, so lines of files are read and sent again under new batch ids
    (stored twice if the collector had them) and stdin lines not yet
    acknowledged are lost. It saves about 0.2 ms of CPU a batch written
    (~0.04 CPU-s per million 190-byte lines)."""

    max_bytes: ByteSize = ByteSize(0)
    sync: bool = True


class DeadLetterConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``state_dir/dead-letter.ndjson`` holds records the collector refused for
    good. When a write would take it past ``max_bytes`` it is renamed to
    ``.1`` (``.1`` to ``.2`` …), keeping ``keep`` older files; 0 never rotates."""

    max_bytes: ByteSize = ByteSize(64 * 1024 * 1024)
    keep: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3

    def __post_init__(self) -> None:
        if self.max_bytes and self.max_bytes < 1024:
            raise ValueError("`max_bytes` must be 0 (no rotation) or at least 1KiB")


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``listen: "127.0.0.1:9188"`` serves ``GET /metrics`` (Prometheus text);
    ``summary_interval`` prints a one-line summary on stderr (0 turns it off)."""

    listen: str | None = None
    summary_interval: Duration = Duration(60.0)

    def __post_init__(self) -> None:
        if self.listen is not None:
            _, sep, port = self.listen.rpartition(":")
            if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
                raise ValueError("`listen` must be host:port, for example 127.0.0.1:9188")


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The ``agent:`` section."""

    collector: CollectorTarget = msgspec.field(default_factory=CollectorTarget)
    state_dir: str = "./data/agent"
    sources: list[SourceConfig] = msgspec.field(default_factory=list)
    redact: RedactConfig = msgspec.field(default_factory=RedactConfig)
    batch: BatchConfig = msgspec.field(default_factory=BatchConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    dead_letter: DeadLetterConfig = msgspec.field(default_factory=DeadLetterConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    # Empty: the machine's host name.
    host: str = ""
    # Wake on file events (Linux inotify on the watched files' directories)
    # instead of checking every poll_interval; globs are still expanded every
    # discover_interval, which catches what events miss.
    file_events: bool = True
    poll_interval: Duration = Duration(0.1)
    discover_interval: Duration = Duration(1.0)
    read_chunk: ByteSize = ByteSize(256 * 1024)
    # A deleted or rotated-away file read to its end is released after this long without growth.
    release_after: Duration = Duration(5.0)
    shutdown_timeout: Duration = Duration(10.0)
    # At most this many files are open for reading at once; files found beyond
    # it wait (oldest first) and are read, from their checkpoint, when a slot frees.
    max_open_files: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1024
    # A file read and acknowledged to its end that has not grown for this long
    # has its descriptor closed; it is reopened (same identity and offset) when it grows.
    close_inactive: Duration = Duration(300.0)
    # While files wait for a slot, an open file that had its slot this long
    # stops reading, and once what it read is acknowledged gives the slot to
    # the longest-waiting file (it queues again if it grew): busy files cannot
    # starve the rest.
    file_turn: Duration = Duration(10.0)

    def __post_init__(self) -> None:
        if self.read_chunk < 4096:
            raise ValueError("`read_chunk` must be at least 4KiB")
        if self.close_inactive <= 0:
            raise ValueError("`close_inactive` must be more than 0")
        if self.file_turn <= 0:
            raise ValueError("`file_turn` must be more than 0")
        if sum(1 for s in self.sources if s.path == "-") > 1:
            raise ValueError("only one source can read standard input (`path: \"-\"`)")


def load_agent_config(path: str) -> AgentConfig:
    """Read the ``agent:`` section of a YAML file; raise
    :class:`agent.configfile.ConfigInvalid` listing every error."""
    from agent.configfile import load_yaml, section

    return section(load_yaml(path), "agent", AgentConfig)
