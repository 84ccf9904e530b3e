"""`dvc repro` end to end on a tiny dataset, in a copy of the project: every stage runs and publishes nothing, a
second repro is a no-op, `make repro` publishes the validated candidate once, `dvc exp run -S train.epochs=...`
reruns train and what follows only and leaves the served models alone, metrics and plots show."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.reviews import REVIEW_COLUMNS
from pipelines.steps import apply_overrides
from serving.contract import MODEL_CARD_FILE, versions
from tests.conftest import REPO_ROOT
from tests.fixtures.pipeline_data import TINY_OVERRIDES, write_tiny_data

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

STAGES = list(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"])
UPSTREAM_OF_TRAIN = {"validate", "preprocess", "audit_labels", "build_kb"}
# Outputs of the real dataset's pipeline, never copied: the copy makes its own from the tiny data.
NOT_COPIED = ("data.dvc", "dvc.lock", "metrics/", "plots/", ".notes/", "labels/reviews.csv")


def project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    return [f for f in listed if not f.startswith(NOT_COPIED) and (REPO_ROOT / f).is_file()]


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        # dvc.yaml runs `python -m components.<stage>`: the interpreter running the tests, on the copy's code.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(cwd),
    }
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, (
        f"{' '.join(command)} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    )
    return completed


def dvc(*args: str, cwd: Path) -> str:
    completed = run([sys.executable, "-m", "dvc", *args], cwd)
    return completed.stdout + completed.stderr


def served_versions(project: Path) -> list[str]:
    return [str(version) for version in versions(project / "models" / "productlens")]


def ran_stages(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git repo holding the project's files, tiny data and the tiny params, after one `dvc repro`."""
    root = tmp_path_factory.mktemp("project")
    for name in project_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, root / name)
    write_tiny_data(root / "data")
    # The tiny images have not been reviewed: a reviews file with its header only.
    (root / "labels").mkdir(exist_ok=True)
    (root / "labels" / "reviews.csv").write_text(",".join(REVIEW_COLUMNS) + "\n", encoding="utf-8")
    params = apply_overrides(yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")), TINY_OVERRIDES)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    (root / ".gitignore").write_text((root / ".gitignore").read_text(encoding="utf-8") + "/data/\n", encoding="utf-8")
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@localhost", "-c", "commit.gpgsign=false"]
    run(["git", "init", "-q"], root)
    run([*git, "add", "-A"], root)
    run([*git, "commit", "-q", "-m", "tiny project"], root)
    output = dvc("repro", cwd=root)
    assert ran_stages(output) == set(STAGES), output
    return root


def test_repro_runs_every_stage_and_ends_with_a_validated_candidate_publishing_nothing(project):
    gate = json.loads((project / "artifacts" / "gate" / "gate.json").read_text())
    assert gate["blessed"], gate["reasons"]
    candidate = project / "artifacts" / "export" / "candidate"
    assert (candidate / "saved_model.pb").is_file()
    card = json.loads((candidate / MODEL_CARD_FILE).read_text())
    assert card["evaluation"] == json.loads((project / "reports" / "evaluate" / "evaluate.json").read_text())
    blessing = json.loads((project / "artifacts" / "infra_validate" / "blessing.json").read_text())
    assert blessing["blessed"] and blessing["candidate"]["weights_sha256"] == card["weights_sha256"]
    assert served_versions(project) == []  # experiments and repro never touch serving: publishing is its own step


def test_second_repro_is_a_no_op(project):
    output = dvc("repro", cwd=project)
    assert ran_stages(output) == set(), output


def test_make_repro_publishes_the_validated_candidate_once(project, tmp_path):
    # The real Makefile, with this interpreter's venv; `pull` needs ../shared, which the copy does not have.
    stamp = tmp_path / "installed"
    stamp.touch()  # newer than pyproject.toml and requirements.lock: `setup` has nothing to do
    make = ["make", "--no-print-directory", "-o", "pull", "repro", f"BIN={Path(sys.executable).parent}"]
    make.append(f"STAMP={stamp}")
    first = run(make, project).stdout
    assert f"published {Path('models') / 'productlens' / '1'}" in first, first
    assert served_versions(project) == ["1"]
    second = run(make, project).stdout
    assert "version 1 already serves this model" in second and "nothing published" in second, second
    assert served_versions(project) == ["1"]


def test_metrics_and_plots_show(project):
    shown = json.loads(run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], project).stdout)
    assert shown
    rendered = json.loads(run([sys.executable, "-m", "dvc", "plots", "show", "--json"], project).stdout)["data"]
    assert {"learning_curve_loss", "learning_curve_accuracy", "plots/evaluate/confusion.csv"} <= set(rendered)
    assert rendered["learning_curve_loss"], "the learning curves have no data"
    dvc("plots", "show", "-o", "dvc_plots", cwd=project)
    assert (project / "dvc_plots" / "index.html").exists()


def test_exp_run_with_a_new_epoch_count_reruns_train_and_what_follows_only(project):
    served_before = served_versions(project)
    output = dvc("exp", "run", "-S", "train.epochs=1", "-n", "one-epoch", cwd=project)
    rerun = ran_stages(output)
    assert "train" in rerun and not (rerun & UPSTREAM_OF_TRAIN), output
    assert served_versions(project) == served_before, "an experiment changed what is served"
    assert "one-epoch" in run([sys.executable, "-m", "dvc", "exp", "show", "--csv"], project).stdout
