"""Through make, DVC stages run the venv's python from any shell, and the pipeline compiles with its documented image.

dvc.yaml's commands say bare `python` (rewriting them would rerun every stage), so a `dvc exp run` from a shell
whose PATH lacks the venv runs whatever `python` that shell finds, or none. The Makefile puts the venv first.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pipelines.training_pipeline import DEFAULT_IMAGE_REPOSITORY
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

# A login shell that never activated the venv: the shell the issue's `.venv/bin/dvc exp run` came from.
PLAIN_SHELL = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def make(*args: str) -> str:
    completed = subprocess.run(
        ["make", "--silent", "--no-print-directory", "-C", str(REPO_ROOT), *args],
        env=PLAIN_SHELL, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_stage_python_is_the_venv_python_from_a_shell_without_the_venv():
    assert make("which-python").strip() == str(REPO_ROOT / ".venv" / "bin" / "python")


def test_make_exp_runs_dvc_exp_run_from_the_venv_with_the_given_args():
    commands = make("--dry-run", "exp", "ARGS=-S train.epochs=2 -n two-epochs").splitlines()
    assert commands[-1] == ".venv/bin/dvc exp run -S train.epochs=2 -n two-epochs"


@pytest.mark.parametrize(
    ("target", "dvc_command"),
    [("repro", ".venv/bin/dvc repro"), ("retrain-check", ".venv/bin/dvc repro --force --no-run-cache gate")],
)
def test_make_targets_that_run_stages_use_the_venv_dvc(target, dvc_command):
    assert dvc_command in make("--dry-run", target).splitlines()


def test_make_compile_names_the_registry_qualified_default_image():
    compile_command = make("--dry-run", "compile").splitlines()[-1]
    assert f"--image-repository {DEFAULT_IMAGE_REPOSITORY} " in compile_command
