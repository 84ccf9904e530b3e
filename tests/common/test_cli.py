"""common.cli.run_main: one line and exit 1 for an expected error, the traceback with --debug, exit 2 for usage."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.cli import describe, require_file, run_main
from tests.conftest import REPO_ROOT


@pytest.fixture(autouse=True)
def in_an_empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relative paths below name files that the repo root may hold; here they are missing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PRODUCTLENS_DEBUG", raising=False)


class GateRefused(RuntimeError):
    """A step's own refusal, which its __main__ guard passes to run_main as expected."""


CANDIDATE_MISSING = "error: candidate metrics not found: metrics/evaluate.json (run the evaluate stage first)\n"


def missing_candidate(argv: list[str]) -> int:
    require_file(Path("metrics/evaluate.json"), "candidate metrics", "run the evaluate stage first")
    return 0


def test_an_expected_error_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(missing_candidate, []) == 1
    captured = capsys.readouterr()
    assert captured.err == CANDIDATE_MISSING
    assert captured.out == ""


def test_an_os_error_names_its_reason_and_path(capsys: pytest.CaptureFixture[str]) -> None:
    def reads_a_missing_file(argv: list[str]) -> int:
        Path("artifacts/splits/class_names.json").read_text(encoding="utf-8")
        return 0

    assert run_main(reads_a_missing_file, []) == 1
    assert capsys.readouterr().err == "error: no such file or directory: artifacts/splits/class_names.json\n"


def test_a_refusal_the_command_expects_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def refuses(argv: list[str]) -> int:
        raise GateRefused("accuracy 0.41 is below gate.min_accuracy 0.60")

    assert run_main(refuses, [], expected=(GateRefused,)) == 1
    assert capsys.readouterr().err == "error: accuracy 0.41 is below gate.min_accuracy 0.60\n"


def test_main_gets_the_arguments_without_debug_and_its_exit_code_is_kept() -> None:
    seen: list[list[str]] = []

    def records(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    assert run_main(records, ["--output", "x.json", "--debug", "--", "--debug"]) == 3
    assert seen == [["--output", "x.json", "--", "--debug"]]  # after `--` it is an argument, not the flag


def test_debug_flag_shows_the_traceback() -> None:
    with pytest.raises(FileNotFoundError, match="candidate metrics not found"):
        run_main(missing_candidate, ["--debug"])


def test_debug_variable_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRODUCTLENS_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_main(missing_candidate, [])


def test_a_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    def parses(argv: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="python -m components.gate")
        parser.add_argument("--candidate", required=True)
        parser.parse_args(argv)
        return 0

    with pytest.raises(SystemExit) as exited:
        run_main(parses, ["--no-such-flag"])
    assert exited.value.code == 2
    assert "the following arguments are required: --candidate" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback() -> None:
    def has_a_bug(argv: list[str]) -> int:
        return {"accuracy": 0.9}["macro_f1"]

    with pytest.raises(KeyError):
        run_main(has_a_bug, [])


def test_a_value_error_of_the_project_is_a_message_one_from_a_library_is_a_bug(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def rejects_a_param(argv: list[str]) -> int:
        raise ValueError("train.mobilenet_v2.alpha 0.6 is not one of (0.35, 0.5)")

    def misreads_json(argv: list[str]) -> int:
        return json.loads("{not json")  # raised inside the json package: a bug in how it was called

    assert run_main(rejects_a_param, []) == 1
    assert capsys.readouterr().err == "error: train.mobilenet_v2.alpha 0.6 is not one of (0.35, 0.5)\n"
    with pytest.raises(json.JSONDecodeError):
        run_main(misreads_json, [])


def test_ctrl_c_is_one_line_and_exit_130(capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    assert run_main(interrupted, []) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_a_message_that_wraps_is_printed_on_one_line() -> None:
    assert describe(ValueError("catalog/mouse.csv cannot be loaded:\n  price is not a number")) == (
        "catalog/mouse.csv cannot be loaded: price is not a number"
    )


SCRIPT = """
    from pathlib import Path
    from common.cli import require_file, run_main

    def main(argv):
        if argv and argv[0] == "--bad":
            import argparse
            argparse.ArgumentParser(prog="step").parse_args(argv)
        require_file(Path("metrics/evaluate.json"), "candidate metrics", "run the evaluate stage first")
        return 0

    raise SystemExit(run_main(main))
"""


@pytest.mark.parametrize(
    ("args", "env", "code", "traceback"),
    [
        ([], {}, 1, False),
        (["--debug"], {}, 1, True),
        ([], {"PRODUCTLENS_DEBUG": "1"}, 1, True),
        (["--bad"], {}, 2, False),
    ],
    ids=["expected-error", "debug-flag", "debug-variable", "usage-error"],
)
def test_what_a_shell_sees(tmp_path: Path, args: list[str], env: dict[str, str], code: int, traceback: bool) -> None:
    script = tmp_path / "step.py"
    script.write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    environment = {k: v for k, v in os.environ.items() if k != "PRODUCTLENS_DEBUG"}
    environment.update(PYTHONPATH=str(REPO_ROOT), **env)
    done = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == code, done.stderr
    assert ("Traceback (most recent call last)" in done.stderr) == traceback, done.stderr
    if code == 1 and not traceback:
        assert done.stderr == CANDIDATE_MISSING
    if code == 2:
        assert done.stderr.startswith("usage: step") and "unrecognized arguments: --bad" in done.stderr
