"""Typed YAML configuration: load, substitute ``${ENV}``, convert into msgspec
Structs, and report *every* error with its YAML path and line.

msgspec stops at the first error. Users fixing a config want them all, so on
failure :func:`convert` walks the value alongside the target type and converts
each field on its own, collecting one :class:`ConfigError` per bad leaf. The
Structs stay the single source of truth for shapes and defaults.

Shared by the agent and the collector (and by pipeline files); depends on
msgspec and PyYAML only.
"""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import msgspec
import yaml

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MSGSPEC_PATH = re.compile(r" - at `\$([^`]*)`$")


class Duration(float):
    """Seconds, written ``100ms``, ``30s``, ``5m``, ``1h``, ``7d`` (or a number of seconds)."""

    _UNITS: typing.ClassVar[dict[str, float]] = {
        "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0,
    }
    _RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, bool):
            raise ValueError("expected a duration such as `100ms`, `30s`, `5m`, `1h` or `7d`")
        if isinstance(value, int | float):
            if value < 0:
                raise ValueError("a duration cannot be negative")
            return cls(value)
        if isinstance(value, str):
            m = cls._RE.match(value)
            if m:
                return cls(float(m.group(1)) * cls._UNITS[m.group(2) or "s"])
        raise ValueError(f"expected a duration such as `100ms`, `30s`, `5m`, `1h` or `7d`, got {value!r}")


class ByteSize(int):
    """Bytes, written ``512KiB``, ``1MiB``, ``10MB``, ``2GiB`` (or a number of bytes)."""

    _UNITS: typing.ClassVar[dict[str, int]] = {
        "": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
        "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
    }
    _RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

    @classmethod
    def parse(cls, value: object) -> ByteSize:
        if isinstance(value, bool):
            raise ValueError("expected a size such as `512KiB` or `1MiB`")
        if isinstance(value, int):
            if value < 0:
                raise ValueError("a size cannot be negative")
            return cls(value)
        if isinstance(value, str):
            m = cls._RE.match(value)
            if m and m.group(2).lower() in cls._UNITS:
                return cls(int(float(m.group(1)) * cls._UNITS[m.group(2).lower()]))
        raise ValueError(f"expected a size such as `512KiB`, `1MiB` or `10MB`, got {value!r}")


def parse_duration(value: object) -> Duration:
    return Duration.parse(value)


def parse_size(value: object) -> ByteSize:
    return ByteSize.parse(value)


def _dec_hook(tp: type, obj: object) -> object:
    if tp is Duration:
        return Duration.parse(obj)
    if tp is ByteSize:
        return ByteSize.parse(obj)
    raise NotImplementedError(f"unsupported config type {tp!r}")


class ConfigError(msgspec.Struct, frozen=True):
    """One problem in a config file: where it is and what was expected."""

    path: str
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        elif self.line:
            where = f"line {self.line}: "
        return f"{where}{self.path or '(top level)'}: {self.message}"


class ConfigInvalid(Exception):
    """Raised with every :class:`ConfigError` found."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


# --- YAML ------------------------------------------------------------------


class YamlDocument(msgspec.Struct):
    """A parsed YAML file: its plain data and a map from paths to line numbers."""

    data: Any
    lines: dict[str, int]
    file: str | None = None

    def line_of(self, path: str) -> int | None:
        """The line of ``path`` or of its nearest parent that has one."""
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def _index_lines(node: yaml.Node, path: str, out: dict[str, int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            child = _join(path, key)
            out[child] = key_node.start_mark.line + 1
            _index_lines(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = _join(path, i)
            out[child] = item.start_mark.line + 1
            _index_lines(item, child, out)


def substitute_env(value: Any, environ: typing.Mapping[str, str] | None = None) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string value.
    An unset variable without a default becomes the empty string, so the Struct's
    own rules (required, minimum length) decide whether that is an error."""
    env = os.environ if environ is None else environ
    if isinstance(value, str):
        if "${" not in value:
            return value
        return _ENV.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: substitute_env(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env) for v in value]
    return value


_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str, file: str | None = None, environ: typing.Mapping[str, str] | None = None) -> YamlDocument:
    """Parse YAML text; a syntax error becomes a :class:`ConfigInvalid` with its line."""
    # One parse for the values and their lines, in C where PyYAML has libyaml.
    loader = _YAML_LOADER(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = mark.line + 1 if mark is not None else None
        raise ConfigInvalid([ConfigError("", f"invalid YAML: {problem}", file, line)]) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        _index_lines(node, "", lines)
    return YamlDocument(substitute_env(data, environ), lines, file)


def load_yaml(path: str | os.PathLike[str], environ: typing.Mapping[str, str] | None = None) -> YamlDocument:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigInvalid([ConfigError("", f"cannot read config file: {exc.strerror}", str(p))]) from None
    return parse_yaml(text, str(p), environ)


# --- conversion with every error --------------------------------------------


def _strip_msgspec_path(message: str) -> tuple[str, str]:
    m = _MSGSPEC_PATH.search(message)
    if not m:
        return message, ""
    return message[: m.start()], m.group(1)


def _msgspec_path_to_ours(base: str, suffix: str) -> str:
    # msgspec writes `$.a.b[0]`; we write `a.b[0]` relative to base.
    if not suffix:
        return base
    if suffix.startswith("."):
        suffix = suffix[1:]
        return f"{base}.{suffix}" if base else suffix
    return f"{base}{suffix}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _struct_in(tp: Any) -> Any | None:
    """The single Struct type inside ``tp`` (``S``, ``S | None``), if any."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _struct_in(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        structs = [a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, msgspec.Struct)]
        if len(structs) == 1:
            return structs[0]
    return None


def _container_in(tp: Any) -> tuple[Any, Any] | None:
    """``(origin, args)`` of the list/dict inside ``tp`` (also ``list[S] | None``)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _container_in(typing.get_args(tp)[0])
    if origin in (list, dict):
        return origin, typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        found = [c for c in (_container_in(a) for a in typing.get_args(tp)) if c is not None]
        if len(found) == 1:
            return found[0]
    return None


def _walk(value: Any, tp: Any, path: str, errors: list[tuple[str, str]]) -> None:
    """Append (path, message) for every error found converting ``value`` to ``tp``."""
    try:
        msgspec.convert(value, tp, dec_hook=_dec_hook)
        return
    except msgspec.ValidationError as exc:
        whole_message, whole_suffix = _strip_msgspec_path(str(exc))
    before = len(errors)
    struct = _struct_in(tp)
    container = _container_in(tp)
    if struct is not None and isinstance(value, dict):
        fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
        forbid = getattr(struct.__struct_config__, "forbid_unknown_fields", False)
        for key in value:
            if key not in fields and forbid:
                known = ", ".join(sorted(fields))
                errors.append((_join(path, str(key)), f"unknown key (expected one of: {known})"))
        unknown = len(errors) - before
        for name, info in fields.items():
            if name in value:
                _walk(value[name], info.type, _join(path, name), errors)
            elif info.required:
                errors.append((_join(path, name), f"required key is missing ({_type_name(info.type)})"))
        if unknown and len(errors) - before == unknown:
            # Only unknown keys so far: the cross-field checks still deserve a say.
            known_only = {k: v for k, v in value.items() if k in fields}
            try:
                msgspec.convert(known_only, struct, dec_hook=_dec_hook)
            except msgspec.ValidationError as exc:
                message, suffix = _strip_msgspec_path(str(exc))
                errors.append((_msgspec_path_to_ours(path, suffix), message))
    elif container is not None and container[0] is list and isinstance(value, list) and container[1]:
        for i, item in enumerate(value):
            _walk(item, container[1][0], _join(path, i), errors)
    elif container is not None and container[0] is dict and isinstance(value, dict) and len(container[1]) == 2:
        for key, item in value.items():
            _walk(item, container[1][1], _join(path, str(key)), errors)
    if len(errors) == before:
        # The parts are fine on their own: the error belongs here (a cross-field
        # check in __post_init__, a wrong type, or a constraint on the whole).
        errors.append((_msgspec_path_to_ours(path, whole_suffix), whole_message))


T = typing.TypeVar("T")


def convert(value: Any, tp: type[T], *, base_path: str = "", doc: YamlDocument | None = None) -> T:
    """Convert plain data into ``tp``; raise :class:`ConfigInvalid` with every error."""
    try:
        return typing.cast(T, msgspec.convert(value, tp, dec_hook=_dec_hook))
    except msgspec.ValidationError:
        pass
    found: list[tuple[str, str]] = []
    _walk(value, tp, base_path, found)
    errors = []
    for path, message in found:
        line = doc.line_of(path) if doc else None
        errors.append(ConfigError(path, message, doc.file if doc else None, line))
    raise ConfigInvalid(errors)


def section(doc: YamlDocument, key: str, tp: type[T]) -> T:
    """Convert the ``key:`` section of a document (missing means all defaults)."""
    data = doc.data if isinstance(doc.data, dict) else {}
    if doc.data is not None and not isinstance(doc.data, dict):
        raise ConfigInvalid([ConfigError("", "the config file must be a mapping", doc.file, 1)])
    value = data.get(key)
    if value is None:
        value = {}
    return convert(value, tp, base_path=key, doc=doc)


def to_builtins(obj: Any) -> Any:
    return msgspec.to_builtins(obj, enc_hook=_enc_hook)


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Duration | ByteSize):
        return float(obj) if isinstance(obj, Duration) else int(obj)
    raise NotImplementedError
