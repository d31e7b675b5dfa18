"""The agent → collector wire format (api.md, "Wire format").

Both sides import this module; it depends on msgspec only, so the agent stays
light. Structs are dict-shaped (not array-like) so JSON clients can speak the
same format, and new fields are only ever appended at the end with a default
(msgspec's schema-evolution rules), so an old collector ignores what a new
agent adds and a new collector accepts what an old agent sends.

A batch is decoded in two steps: the envelope with its records kept as raw
bytes, then each record on its own. One malformed record is then rejected by
index with msgspec's message naming the field, and the valid records of the
same batch are still stored.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import msgspec


class Level(enum.IntEnum):
    """Severity, ordered: comparisons such as ``level >= Level.WARN`` work."""

    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


# Names parsers and clients use, mapped onto the five levels of the spec.
LEVEL_ALIASES: dict[str, Level] = {
    "debug": Level.DEBUG,
    "dbg": Level.DEBUG,
    "trace": Level.DEBUG,
    "verbose": Level.DEBUG,
    "fine": Level.DEBUG,
    "finer": Level.DEBUG,
    "finest": Level.DEBUG,
    "info": Level.INFO,
    "information": Level.INFO,
    "informational": Level.INFO,
    "inf": Level.INFO,
    "notice": Level.INFO,
    "log": Level.INFO,
    "warn": Level.WARN,
    "warning": Level.WARN,
    "wrn": Level.WARN,
    "error": Level.ERROR,
    "err": Level.ERROR,
    "eror": Level.ERROR,
    "severe": Level.ERROR,
    "critical": Level.CRITICAL,
    "crit": Level.CRITICAL,
    "fatal": Level.CRITICAL,
    "panic": Level.CRITICAL,
    "alert": Level.CRITICAL,
    "emerg": Level.CRITICAL,
    "emergency": Level.CRITICAL,
}


def parse_level(value: object) -> Level | None:
    """Map a level name (any case, common aliases) or a syslog severity number onto
    a :class:`Level`; ``None`` when it is not a level."""
    if isinstance(value, str):
        found = LEVEL_ALIASES.get(value.strip().lower())
        if found is not None:
            return found
        if value.strip().isdigit():
            value = int(value.strip())
        else:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        # syslog severities 0 (emerg) … 7 (debug)
        return {0: Level.CRITICAL, 1: Level.CRITICAL, 2: Level.CRITICAL, 3: Level.ERROR,
                4: Level.WARN, 5: Level.INFO, 6: Level.INFO, 7: Level.DEBUG}.get(value)
    return None


class Record(msgspec.Struct, omit_defaults=True):
    """One log record as shipped. ``timestamp`` is an RFC 3339 string, Unix
    epoch seconds, or msgpack's timestamp extension (decoded to a datetime)."""

    timestamp: Any
    level: str
    source: str
    message: str
    context: dict[str, Any] | None = None
    user_id: str | None = None
    session_id: str | None = None
    request_id: str | None = None
    ip_address: str | None = None
    user_agent: str | None = None
    duration_ms: float | None = None
    error_stack: str | None = None
    tags: list[str] | None = None
    file: str | None = None
    offset: int | None = None
    host: str | None = None


class LinesMultiline(msgspec.Struct, omit_defaults=True):
    """How the lines of a :class:`Lines` group join into entries
    (:class:`agent.config.MultilineConfig` without the agent's flush timeout)."""

    mode: str
    pattern: str | None = None
    max_lines: int = 500
    max_bytes: int = 1024 * 1024


# A collector that joins multiline groups (Lines.multiline) names this feature.
MULTILINE_FEATURE = "lines:multiline"


class Lines(msgspec.Struct, omit_defaults=True):
    """Lines of one file shipped as they were read, for the collector to parse
    with the agent's parser settings (an extension of api.md's batch).

    The agent ships the lines of a source in SHIPPED_FORMATS this way when its redaction
    prefilter found nothing in them: parsing is then done once, by the
    collector, with the same code (:func:`agent.parsers.parse_shipped_lines`),
    so the records are the ones the agent would have built. ``data`` is the
    file's bytes from ``offset`` on, each line ending with a newline;
    ``read_at`` (Unix seconds) stamps lines that carry no timestamp of their
    own, as the agent would have when it read them. Their record indexes
    follow the batch's ``records``, one per line, blank lines included.
    ``utc_offset`` (syslog only, where it is required): the agent's UTC
    offset in seconds when it read the lines, which RFC 3164 timestamps
    (local time without year or zone) are read in. ``pattern`` (regex only,
    where it is required): the source's pattern, named groups and all.
    ``multiline``: the lines join into entries as the agent's joiner joins
    them (the group holds whole entries, the first starting at ``offset``);
    each entry is a record numbered by its first line.
    """

    source: str
    data: bytes
    read_at: float
    format: str = "json"
    file: str | None = None
    offset: int | None = None
    tags: list[str] | None = None
    fields: dict[str, str] | None = None
    utc_offset: int | None = None
    pattern: str | None = None
    multiline: LinesMultiline | None = None


class Batch(msgspec.Struct, omit_defaults=True):
    """What one ``POST /v1/ingest`` carries."""

    agent_id: str
    batch_id: str
    host: str
    records: list[Record]
    # True when the sender already applied redaction rules (the agent does).
    redacted: bool = False
    lines: list[Lines] = []
    # The fingerprint of the redaction rules the sender applied
    # (agent.redact.Redactor.fingerprint): a collector with the same rules
    # has nothing left to find in the batch and does not redact it again.
    redacted_with: str = ""


# What a collector that parses shipped lines says in its ingest answers; an
# agent ships Lines only to a collector that said it. "lines" covers JSON;
# other formats have their own (lines_feature).
LINES_FEATURE = "lines"


def lines_feature(fmt: str) -> str:
    """The feature a collector names when it parses lines of format ``fmt``
    shipped as read: ``lines`` for JSON (the first), ``lines:<format>`` for the others."""
    return LINES_FEATURE if fmt == "json" else f"{LINES_FEATURE}:{fmt}"


class _RawBatch(msgspec.Struct):
    agent_id: str
    batch_id: str
    host: str = ""
    records: list[msgspec.Raw] = []
    redacted: bool = False
    lines: list[Lines] = []
    redacted_with: str = ""


class _WholeBatch(msgspec.Struct):
    """A batch whose every record decodes: all of them in one call (the usual
    case; 3 µs a record less than one call per record)."""

    agent_id: str
    batch_id: str
    host: str = ""
    records: list[Record] = []
    redacted: bool = False
    lines: list[Lines] = []
    redacted_with: str = ""


class _JsonBatch(msgspec.Struct):
    agent_id: str = "http"
    batch_id: str = ""
    host: str = ""
    records: list[msgspec.Raw] = []
    redacted: bool = False


class _WholeJsonBatch(msgspec.Struct):
    agent_id: str = "http"
    batch_id: str = ""
    host: str = ""
    records: list[Record] = []
    redacted: bool = False


class DecodedBatch(msgspec.Struct):
    """A batch whose records were decoded one by one."""

    agent_id: str
    batch_id: str
    host: str
    records: list[tuple[int, Record]]
    errors: list[tuple[int, str]]
    redacted: bool = False
    lines: list[Lines] = []
    # Index of the first shipped line: the number of records in the body.
    lines_index: int = 0
    redacted_with: str = ""


_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()
_msgpack_envelope = msgspec.msgpack.Decoder(_RawBatch)
_msgpack_whole = msgspec.msgpack.Decoder(_WholeBatch)
_json_whole = msgspec.json.Decoder(_WholeJsonBatch)
_msgpack_record = msgspec.msgpack.Decoder(Record)
_json_envelope = msgspec.json.Decoder(_JsonBatch)
_json_record = msgspec.json.Decoder(Record)


class WireError(ValueError):
    """The body as a whole cannot be decoded (HTTP 400)."""


def encode_batch(batch: Batch) -> bytes:
    """msgpack bytes of a batch."""
    return _msgpack_encoder.encode(batch)


def encode_batch_into(batch: Batch, buffer: bytearray) -> None:
    """msgpack of a batch into ``buffer`` (resized to fit): a buffer reused
    batch after batch spares the agent a large allocation per batch."""
    _msgpack_encoder.encode_into(batch, buffer)


def encode_json(obj: object) -> bytes:
    return _json_encoder.encode(obj)


def _record_error(exc: msgspec.DecodeError) -> str:
    # msgspec says "… - at `$.level`"; inside a record "$" is the record itself.
    return str(exc).replace("`$.", "`").replace("`$`", "record")


def _decode_records(raws: list[msgspec.Raw], decoder: Any) -> tuple[list[tuple[int, Record]], list[tuple[int, str]]]:
    records: list[tuple[int, Record]] = []
    errors: list[tuple[int, str]] = []
    for index, raw in enumerate(raws):
        try:
            records.append((index, decoder.decode(raw)))
        except msgspec.DecodeError as exc:
            errors.append((index, _record_error(exc)))
    return records, errors


def decode_msgpack_batch(body: bytes) -> DecodedBatch:
    try:
        whole = _msgpack_whole.decode(body)
    except msgspec.DecodeError:
        pass  # a record (or the envelope) is invalid: one at a time, to say which
    else:
        return DecodedBatch(whole.agent_id, whole.batch_id, whole.host, list(enumerate(whole.records)), [],
                            whole.redacted, whole.lines, len(whole.records), whole.redacted_with)
    try:
        env = _msgpack_envelope.decode(body)
    except msgspec.DecodeError as exc:
        raise WireError(f"undecodable msgpack batch: {exc}") from None
    records, errors = _decode_records(env.records, _msgpack_record)
    return DecodedBatch(env.agent_id, env.batch_id, env.host, records, errors, env.redacted, env.lines,
                        len(env.records), env.redacted_with)


def decode_json_batch(body: bytes) -> DecodedBatch:
    try:
        whole = _json_whole.decode(body)
    except msgspec.DecodeError:
        pass
    else:
        return DecodedBatch(whole.agent_id, whole.batch_id, whole.host, list(enumerate(whole.records)), [],
                            whole.redacted)
    try:
        env = _json_envelope.decode(body)
    except msgspec.DecodeError as exc:
        raise WireError(f"undecodable JSON batch: {exc}") from None
    records, errors = _decode_records(env.records, _json_record)
    return DecodedBatch(env.agent_id, env.batch_id, env.host, records, errors, env.redacted)


def decode_ndjson(body: bytes) -> DecodedBatch:
    """One record per line; blank lines are skipped but keep their index."""
    records: list[tuple[int, Record]] = []
    errors: list[tuple[int, str]] = []
    index = 0
    for line in body.split(b"\n"):
        if not line.strip():
            continue
        try:
            records.append((index, _json_record.decode(line)))
        except msgspec.DecodeError as exc:
            errors.append((index, _record_error(exc)))
        index += 1
    return DecodedBatch("http", "", "", records, errors)


def parse_timestamp(value: object) -> dt.datetime | None:
    """A timezone-aware UTC datetime from an RFC 3339 string, epoch seconds
    (float or int; milliseconds are detected by magnitude), or a datetime;
    ``None`` if the value is not a valid timestamp."""
    if isinstance(value, dt.datetime):
        result = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    elif isinstance(value, bool):
        return None
    elif isinstance(value, int | float):
        seconds = float(value)
        if seconds > 1e14:  # microseconds
            seconds /= 1e6
        elif seconds > 1e11:  # milliseconds
            seconds /= 1e3
        try:
            result = dt.datetime.fromtimestamp(seconds, dt.UTC)
        except (OverflowError, OSError, ValueError):
            return None
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            result = dt.datetime.fromisoformat(text)
        except ValueError:
            return None
        if result.tzinfo is None:
            result = result.replace(tzinfo=dt.UTC)
    else:
        return None
    result = result.astimezone(dt.UTC)
    if not (1970 <= result.year <= 2261):  # DateTime64(3) range
        return None
    return result
