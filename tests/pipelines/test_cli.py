"""`pipelines check` and `pipelines test`, called as the CLI calls them."""

from __future__ import annotations

import io
from pathlib import Path

import yaml

from pipelines.cli import check_command
from pipelines.cli import test_command as dry_run_command
from tests.conftest import SECRET

ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, pipelines: list[str], **extra: object) -> str:
    path = tmp_path / "logferry.yaml"
    path.write_text(yaml.safe_dump({"collector": {
        "secret_key": SECRET, "storage": {"dsn": f"chdb://{tmp_path}/unused"}, "pipelines": pipelines, **extra}}))
    return str(path)


def run_check(path: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = check_command(path, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_check_accepts_every_example_pipeline(tmp_path: Path) -> None:
    code, out, err = run_check(config(tmp_path, [str(ROOT / "pipelines" / "examples" / "*.yaml")]))
    assert code == 0, err
    assert out.splitlines()[-1] == "5 pipelines in 5 files: no errors"
    for name in ("error-burst-oncall", "source-quiet-email", "new-error-webhook", "daily-error-digest",
                 "contact-form-triage"):
        assert f": {name}: on " in out


def test_check_prints_every_error_with_file_line_and_path(tmp_path: Path) -> None:
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "a.yaml").write_text("name: a\nsteps:\n  - type: webhook\n    options: {url: 5}\n")
    (folder / "b.yaml").write_text("name: b\nrule: {type: spike}\nsteps: [{type: log, options: {message: x}}]\n")
    code, out, err = run_check(config(tmp_path, [str(folder / "*.yaml")]))
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[0] == f"{folder}/a.yaml:4: steps[0].options.url: Expected `str`, got `int` (in the `webhook` step)"
    assert lines[1] == f"{folder}/b.yaml:2: rule: a spike rule needs `window`"
    assert lines[2] == "2 errors"


def test_check_fails_clearly_on_a_blocked_step_in_use(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text("name: a\nsteps: [{type: webhook, options: {url: 'http://x'}}]\n")
    code, _, err = run_check(config(tmp_path, [str(tmp_path / "*.yml")], plugins={"block": ["webhook"]}))
    assert code == 2 and "unknown step type 'webhook'" in err


def test_check_reports_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("collector:\n  pipelines: 5\n  secret_key: short\n")
    code, _, err = run_check(str(path))
    assert code == 2 and "collector.pipelines" in err


def test_test_prints_what_each_step_would_do(tmp_path: Path) -> None:
    events = tmp_path / "events.ndjson"
    events.write_text("\n".join(
        f'{{"timestamp": "2026-03-02T12:00:{i:02d}Z", "level": "error", "source": "payments-api", '
        f'"message": "card declined {i}"}}' for i in range(6)) + "\n"
        '{"timestamp": "2026-03-02T12:00:30Z", "level": "INFO", "source": "payments-api", "message": "ok"}\n')
    out, err = io.StringIO(), io.StringIO()
    code = dry_run_command(str(ROOT / "pipelines" / "examples" / "error-burst-oncall.yaml"), str(events),
                        out=out, err=err)
    assert code == 0, err.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0] == "▶ run at 2026-03-02T12:00:04+00:00 source=payments-api: count 5"
    assert lines[1].startswith("  1. notify (notify): ")
    assert "5 errors in payments-api within 1m" in lines[1]
    assert lines[2] == ("  2. log (log): write a WARN log to source 'alerts': "
                        "error burst in payments-api: 5 errors in 1m")
    assert lines[-1] == "7 events, 6 matched, 1 run"


def test_test_reports_bad_event_lines(tmp_path: Path) -> None:
    events = tmp_path / "events.ndjson"
    events.write_text('{"level": "ERROR"}\nnot json\n{"level": "LOUD"}\n')
    err = io.StringIO()
    code = dry_run_command(str(ROOT / "pipelines" / "examples" / "error-burst-oncall.yaml"), str(events),
                        out=io.StringIO(), err=err)
    assert code == 2
    lines = err.getvalue().splitlines()
    assert lines[0].startswith(f"{events}:2: (top level): invalid JSON")
    assert lines[1] == f"{events}:3: level: not a level: 'LOUD'"


def test_test_runs_a_scheduled_pipeline_once(tmp_path: Path) -> None:
    events = tmp_path / "none.ndjson"
    events.write_text("")
    out = io.StringIO()
    code = dry_run_command(str(ROOT / "pipelines" / "examples" / "daily-error-digest.yaml"), str(events), out=out)
    assert code == 0
    text = out.getvalue()
    assert "1. top_errors (query_logs): count ERROR+ logs between" in text
    assert "by source, message, top 10" in text
    # The email step depends on the query's output, unknown in a dry run: said, not failed.
    assert "2. email (email): " in text and "depend on earlier steps" in text
