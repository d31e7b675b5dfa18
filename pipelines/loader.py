"""Load pipeline files: YAML → :class:`Pipeline`, with every error at once.

Each error names the file, the line and the YAML path, and for step options
the step type too::

    pipelines/burst.yaml:12: steps[1].options.url: required key is missing (in the `webhook` step)

Checks, in order: YAML syntax; the pipeline's shape (:mod:`pipelines.model`);
the match language; that each step ``type`` is registered; each step's
options against that step type's ``Options`` Struct (a value that is a
template is checked when rendered instead); every template's syntax and
variables; pipeline names unique across files.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from agent.configfile import (
    ByteSize,
    ConfigError,
    ConfigInvalid,
    Duration,
    YamlDocument,
    convert,
    load_yaml,
    parse_yaml,
    to_builtins,
)
from pipelines.match import MatchError, Predicate, Prefilter, compile_match
from pipelines.model import PipelineSpec, StepSpec
from pipelines.rules import fingerprint
from pipelines.templates import Templates, is_template, template_paths

#: Where each trigger's events keep their time.
TIME_FIELDS = {
    "log": "timestamp",
    "contact_form": "submitted_at",
    "email_event": "occurred_at",
    "notification_event": "created_at",
    "schedule": "scheduled_at",
}


class StepPlan(msgspec.Struct, kw_only=True):
    """One step, validated: its type object and raw (unrendered) options."""

    index: int
    id: str
    spec: StepSpec
    step_type: Any
    # Paths (relative to options) of values that are templates.
    templated: frozenset[str]


class Pipeline(msgspec.Struct, kw_only=True):
    """A loaded pipeline: its spec plus everything compiled from it."""

    spec: PipelineSpec
    file: str | None
    match: Predicate
    prefilter: Prefilter
    steps: list[StepPlan]
    time_field: str
    # Changes when the trigger, match or rule changes: rule state is kept
    # across a reload only while this stays the same.
    state_fingerprint: str
    # The file's raw mapping, for `pipelines test` output.
    source: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.name


def _dec_hook(tp: type, obj: object) -> object:
    if tp is Duration:
        return Duration.parse(obj)
    if tp is ByteSize:
        return ByteSize.parse(obj)
    raise NotImplementedError(f"unsupported option type {tp!r}")


def convert_options(options: Mapping[str, Any], options_type: type[msgspec.Struct]) -> Any:
    """Rendered options → the step's Options (lenient: ``"5"`` becomes ``5``)."""
    return msgspec.convert(dict(options), options_type, strict=False, dec_hook=_dec_hook)


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") or path.startswith(p + "[") for p in prefixes)


def load_pipeline(doc: YamlDocument, steps: Mapping[str, Any], templates: Templates) -> Pipeline:
    """Build one pipeline from a parsed document; raise ConfigInvalid with every error."""
    file = doc.file
    errors: list[ConfigError] = []

    def err(path: str, message: str) -> None:
        errors.append(ConfigError(path, message, file, doc.line_of(path)))

    data = doc.data
    if not isinstance(data, dict):
        raise ConfigInvalid([ConfigError("", "a pipeline file is a mapping with name, on, match, rule, steps",
                                         file, 1)])
    # YAML 1.1 reads a bare `on` key as the boolean true (the GitHub Actions trap).
    if True in data:
        data = {("on" if k is True else k): v for k, v in data.items()}
    try:
        spec = convert(data, PipelineSpec, doc=doc)
    except ConfigInvalid as exc:
        raise ConfigInvalid([_hint(e) for e in exc.errors]) from None

    try:
        predicate, prefilter = compile_match(spec.match, "match")
    except MatchError as exc:
        for path, message in exc.errors:
            err(path, message)
        predicate, prefilter = (lambda event: False), Prefilter()
    if spec.on != "log" and (prefilter.min_level or prefilter.source_globs):
        err("match", f"`level` and `source` apply to logs; `on: {spec.on}` events are matched with `where`")

    plans: list[StepPlan] = []
    type_counts: dict[str, int] = {}
    for s in spec.steps:
        type_counts[s.type] = type_counts.get(s.type, 0) + 1
    used_ids: set[str] = set()
    for index, step in enumerate(spec.steps):
        base = f"steps[{index}]"
        step_id = step.id or (step.type if type_counts[step.type] == 1 else f"{step.type}_{index}")
        if step_id in used_ids:
            err(f"{base}.id", f"step id {step_id!r} is used twice")
        used_ids.add(step_id)
        if step.when is not None:
            problem = templates.check(_strip(step.when), expression=True)
            if problem:
                err(f"{base}.when", problem)
        registered = steps.get(step.type)
        if registered is None:
            known = ", ".join(sorted(steps)) or "none"
            err(f"{base}.type", f"unknown step type {step.type!r} (registered: {known})")
            continue
        step_type = getattr(registered, "obj", registered)
        tpaths = template_paths(step.options, f"{base}.options")
        for path, source in tpaths:
            problem = templates.check(source)
            if problem:
                err(path, problem)
        templated = {p for p, _ in tpaths}
        try:
            convert(step.options, step_type.Options, base_path=f"{base}.options", doc=doc)
        except ConfigInvalid as exc:
            for e in exc.errors:
                if _under(e.path, templated):
                    continue  # checked once rendered
                e = _hint(e)
                errors.append(ConfigError(e.path, f"{e.message} (in the `{step.type}` step)", e.file, e.line))
        prefix = f"{base}.options"
        plans.append(StepPlan(index=index, id=step_id, spec=step, step_type=step_type,
                              templated=frozenset(p[len(prefix) + 1:] for p in templated)))
    if errors:
        raise ConfigInvalid(errors)
    return Pipeline(
        spec=spec, file=file, match=predicate, prefilter=prefilter, steps=plans,
        time_field=TIME_FIELDS[spec.on],
        state_fingerprint=fingerprint(spec.on, spec.match, to_builtins(spec.rule)),
        source=data,
    )


def _hint(error: ConfigError) -> ConfigError:
    """Explain YAML 1.1's booleans where a string was expected (`name: off`)."""
    if error.message.startswith("Expected `str`") and error.message.endswith("got `bool`"):
        return ConfigError(error.path, f"{error.message}: unquoted yes/no/on/off/true/false are booleans "
                                       "in YAML; quote the value", error.file, error.line)
    return error


def _strip(expression: str) -> str:
    text = expression.strip()
    if is_template(text) and text.startswith("{{") and text.endswith("}}"):
        return text[2:-2].strip()
    return text


def expand_globs(patterns: Iterable[str], base_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Files matching the patterns (relative ones from ``base_dir``), sorted, once each."""
    found: dict[str, None] = {}
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) or base_dir is None else os.path.join(base_dir, pattern)
        for path in sorted(glob.glob(full, recursive=True)):
            if os.path.isfile(path):
                found[path] = None
    return list(found)


def load_pipeline_file(path: str, steps: Mapping[str, Any], templates: Templates,
                       environ: Mapping[str, str] | None = None) -> Pipeline:
    return load_pipeline(load_yaml(path, environ), steps, templates)


def load_pipeline_text(text: str, steps: Mapping[str, Any], templates: Templates,
                       file: str | None = None) -> Pipeline:
    return load_pipeline(parse_yaml(text, file), steps, templates)


def load_pipelines(
    patterns: Iterable[str],
    steps: Mapping[str, Any],
    templates: Templates,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    on_file: Callable[[str], None] | None = None,
) -> list[Pipeline]:
    """Every pipeline of every matching file; ConfigInvalid lists every error of every file."""
    pipelines: list[Pipeline] = []
    errors: list[ConfigError] = []
    names: dict[str, str] = {}
    for path in expand_globs(patterns, base_dir):
        if on_file is not None:
            on_file(path)
        try:
            pipeline = load_pipeline_file(path, steps, templates)
        except ConfigInvalid as exc:
            errors.extend(exc.errors)
            continue
        if pipeline.name in names:
            errors.append(ConfigError("name", f"pipeline name {pipeline.name!r} is already used in "
                                              f"{names[pipeline.name]}", path, 1))
            continue
        names[pipeline.name] = path
        pipelines.append(pipeline)
    if errors:
        raise ConfigInvalid(errors)
    return pipelines


def relative(path: str | None) -> str:
    if path is None:
        return "<pipeline>"
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path
