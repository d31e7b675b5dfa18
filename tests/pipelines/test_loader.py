"""Loading pipeline files: every error with file, line, YAML path and step."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.configfile import ConfigInvalid
from pipelines.loader import load_pipeline_file, load_pipelines
from pipelines.templates import Templates
from plugins.manager import build_plugin_manager

MANAGER = build_plugin_manager(entry_points=False)
STEPS = MANAGER.steps()
TEMPLATES = Templates(MANAGER.template_filters())


def load_errors(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigInvalid) as info:
        load_pipeline_file(str(path), STEPS, TEMPLATES)
    return [str(e).replace(str(tmp_path) + "/", "") for e in info.value.errors]


def test_a_valid_pipeline_loads_with_on_as_a_key(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("name: ok\non: log\nmatch: {level: ERROR}\nsteps:\n  - type: log\n    options: {message: hi}\n")
    pipeline = load_pipeline_file(str(path), STEPS, TEMPLATES)
    assert pipeline.spec.on == "log"  # not YAML 1.1's `true`
    assert [s.id for s in pipeline.steps] == ["log"]


def test_step_option_errors_name_file_line_step_and_field(tmp_path: Path) -> None:
    errors = load_errors(tmp_path, """\
name: burst
on: log
steps:
  - type: log
    options: {message: ok}
  - type: webhook
    options:
      method: GET
      timeout: soon
""")
    assert errors == [
        "p.yaml:7: steps[1].options.url: required key is missing (str) (in the `webhook` step)",
        "p.yaml:8: steps[1].options.method: Invalid enum value 'GET' (in the `webhook` step)",
        "p.yaml:9: steps[1].options.timeout: expected a duration such as `100ms`, `30s`, `5m`, `1h` or `7d`, "
        "got 'soon' (in the `webhook` step)",
    ]


def test_unknown_step_type_lists_the_registered_ones(tmp_path: Path) -> None:
    errors = load_errors(tmp_path, "name: x\nsteps:\n  - type: pager\n")
    registered = ", ".join(sorted(STEPS))
    assert "query_logs, webhook" in registered
    assert errors == [f"p.yaml:3: steps[0].type: unknown step type 'pager' (registered: {registered})"]


def test_yaml_syntax_error_has_its_line(tmp_path: Path) -> None:
    errors = load_errors(tmp_path, "name: x\nsteps:\n  - type: log\n    options: {message: [unclosed\n")
    assert len(errors) == 1 and errors[0].startswith("p.yaml:5: (top level): invalid YAML")


def test_match_rule_and_template_errors_together(tmp_path: Path) -> None:
    errors = load_errors(tmp_path, """\
name: x
match:
  regex: "("
rule: {type: frequency, window: 1m}
steps:
  - type: log
    when: "count >"
    options: {message: "{{ evnt.message }}"}
""")
    assert "p.yaml:4: rule: a frequency rule needs `threshold`" in errors
    # The shape error stops before match and steps are looked at; fix it and see the rest.
    errors = load_errors(tmp_path, """\
name: x
match:
  regex: "("
steps:
  - type: log
    when: "count >"
    options: {message: "{{ evnt.message }}", level: "{{ 'ERROR' }}"}
""")
    assert errors[0].startswith("p.yaml:3: match.regex: invalid regex")
    assert errors[1].startswith("p.yaml:6: steps[0].when: template error")
    assert errors[2].startswith("p.yaml:7: steps[0].options.message: unknown template variable evnt")
    assert len(errors) == 3  # a templated level is checked when rendered, not now


def test_schedule_and_trigger_rules(tmp_path: Path) -> None:
    errors = load_errors(tmp_path, """\
name: digest
on: schedule
schedule: {cron: "0 8 * *", timezone: Mars/Olympus}
steps: [{type: log, options: {message: hi}}]
""")
    assert any("schedule.timezone" in e or "unknown timezone" in e for e in errors)
    errors = load_errors(tmp_path, "name: c\non: contact_form\nmatch: {level: ERROR}\nsteps: [{type: log, "
                                   "options: {message: hi}}]\n")
    assert errors == ["p.yaml:3: match: `level` and `source` apply to logs; `on: contact_form` events "
                      "are matched with `where`"]


def test_duplicate_names_across_files_are_errors(tmp_path: Path) -> None:
    for n in ("a", "b"):
        (tmp_path / f"{n}.yaml").write_text("name: same\nsteps: [{type: log, options: {message: hi}}]\n")
    with pytest.raises(ConfigInvalid) as info:
        load_pipelines([str(tmp_path / "*.yaml")], STEPS, TEMPLATES)
    assert len(info.value.errors) == 1
    assert "pipeline name 'same' is already used in" in info.value.errors[0].message


def test_errors_of_every_file_are_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: a\nsteps: [{type: nope}]\n")
    (tmp_path / "b.yaml").write_text("name: b\nsteps: []\n")
    with pytest.raises(ConfigInvalid) as info:
        load_pipelines([str(tmp_path / "*.yaml")], STEPS, TEMPLATES)
    assert [Path(e.file or "").name for e in info.value.errors] == ["a.yaml", "b.yaml"]


def test_yaml_booleans_where_a_string_belongs_get_a_hint(tmp_path: Path) -> None:
    errors = load_errors(tmp_path, "name: off\nsteps: [{type: log, options: {message: x, level: no}}]\n")
    assert errors == [
        "p.yaml:1: name: Expected `str`, got `bool`: unquoted yes/no/on/off/true/false are booleans in YAML; "
        "quote the value",
    ]
