"""The real CLIs with an input missing: one line `error: ...` and exit 1, no traceback, none of TensorFlow's
start-up lines; `--debug` brings the traceback back; a usage error exits 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e

PYTHON = sys.executable
PRODUCTLENS = str(Path(sys.executable).with_name("productlens"))  # the console script pyproject.toml installs
NOISE = ("Traceback", "oneDNN", "cuda", "absl", "cpu_feature_guard", "I0000", "FutureWarning")
MAX_STDERR_LINES = 3  # the error, and at most the step's own INFO lines before it


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # As a user runs them: no TF_CPP_MIN_LOG_LEVEL of the test suite's, no debugging.
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PRODUCTLENS_DEBUG")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_splits(tmp: Path) -> Path:
    """class_names.json and train/val CSVs naming two images (train fails before it reads any pixel)."""
    splits = tmp / "splits"
    splits.mkdir()
    (splits / "class_names.json").write_text(json.dumps(["monitor", "mouse"]), encoding="utf-8")
    rows = "path,class_name,label,sha256\nmonitor/a.jpg,monitor,0,0\nmouse/b.jpg,mouse,1,1\n"
    for name in ("train.csv", "val.csv"):
        (splits / name).write_text(rows, encoding="utf-8")
    return splits


def params_with_missing_weights(tmp: Path) -> tuple[Path, Path]:
    """The project's params.yaml with train.mobilenet_v2.weights moved to an empty folder."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["train"]["architecture"] = "mobilenet_v2"
    weights = tmp / "shared" / "weights" / Path(params["train"]["mobilenet_v2"]["weights"]).name
    weights.parent.mkdir(parents=True)
    params["train"]["mobilenet_v2"]["weights"] = str(weights)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path, weights


def train_argv(tmp: Path) -> list[str]:
    """`python -m components.train` with every option it requires: the tiny splits and the params with missing
    weights, and a path under `tmp` for each output (read from its parser, so a new output needs no change here)."""
    from components.train import parse_args

    refusal = io.StringIO()
    with contextlib.redirect_stderr(refusal), pytest.raises(SystemExit):
        parse_args([])
    required = re.search(r"arguments are required: (.*)", refusal.getvalue())
    assert required, refusal.getvalue()
    given = {"--splits": str(tiny_splits(tmp)), "--images": f"{tmp}/images"}
    argv = [PYTHON, "-m", "components.train", "--params", str(params_with_missing_weights(tmp)[0])]
    for option in required.group(1).split(", "):
        argv += [option, given.get(option, f"{tmp}/out/{option.strip('-')}")]
    return argv


@dataclass(frozen=True)
class Case:
    argv: Callable[[Path], list[str]]
    error: Callable[[Path], str]  # what the error line starts with
    mentions: tuple[str, ...] = ()  # further words the error line holds


CASES = {
    "gate-without-candidate": Case(
        lambda t: [PYTHON, "-m", "components.gate", "--candidate", f"{t}/metrics/evaluate.json",
                   "--output", f"{t}/gate.json", "--params", str(REPO_ROOT / "params.yaml")],
        lambda t: f"error: candidate metrics not found: {t}/metrics/evaluate.json (run the evaluate stage first)",
    ),
    "validate-without-images": Case(
        lambda t: [PYTHON, "-m", "components.validate", "--images", f"{t}/images", "--catalog", f"{t}/catalog",
                   "--params", str(REPO_ROOT / "params.yaml"), "--manifest", f"{t}/manifest.csv",
                   "--metrics", f"{t}/validate.json", "--report-dir", f"{t}/report"],
        lambda t: f"error: images folder {t}/images does not exist",
    ),
    "train-without-weights": Case(
        train_argv,
        lambda t: f"error: pretrained weights not found at {t}/shared/weights/mobilenet_v2_",
        ("holds no .h5 file", "../shared/weights/README.md"),
    ),
    "export-without-model": Case(
        lambda t: [PYTHON, "-m", "components.export", "--model", f"{t}/model.keras",
                   "--class-names", f"{t}/class_names.json", "--gate", f"{t}/gate.json",
                   "--evaluation", f"{t}/evaluate.json", "--samples", f"{t}/test.csv", "--output", f"{t}/candidate"],
        lambda t: f"error: model not found: {t}/model.keras (run the train stage first)",
    ),
    "submit-to-an-unreachable-host": Case(
        lambda t: [PYTHON, "-m", "pipelines.submit", "--host", f"http://127.0.0.1:{closed_port()}",
                   "--package", str(REPO_ROOT / "pipelines" / "training_pipeline.yaml")],
        lambda t: "error: cannot reach the KFP API at http://127.0.0.1:",
        ("connection refused",),
    ),
    "productlens-without-knowledge-base": Case(
        lambda t: [PRODUCTLENS, "--db-url", f"sqlite:///{t}/missing/kb.db", "kb", "info"],
        lambda t: "error: the knowledge base cannot be opened: unable to open database file",
        ("make kb",),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_a_missing_input_is_one_line_and_exit_1(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    done = run(case.argv(tmp_path), cwd=tmp_path)
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    assert not [word for word in NOISE if word in done.stderr], done.stderr
    assert lines and len(lines) <= MAX_STDERR_LINES, done.stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], done.stderr
    assert lines[-1].startswith(case.error(tmp_path)), done.stderr
    assert all(word in lines[-1] for word in case.mentions), done.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = run([*CASES["gate-without-candidate"].argv(tmp_path), "--debug"], cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    missing = f"{tmp_path}/metrics/evaluate.json"
    last = done.stderr.rstrip().splitlines()[-1]
    assert last == f"FileNotFoundError: candidate metrics not found: {missing} (run the evaluate stage first)"


def test_a_usage_error_exits_2_with_argparse_usage(tmp_path: Path) -> None:
    done = run([PYTHON, "-m", "components.gate", "--output", f"{tmp_path}/gate.json"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: python -m components.gate")
    assert "the following arguments are required: --candidate" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_of_a_tensorflow_step_is_only_help(tmp_path: Path) -> None:
    done = run([PYTHON, "-m", "components.train", "--help"], cwd=tmp_path)
    assert done.returncode == 0
    assert done.stderr == ""
    assert done.stdout.startswith("usage: python -m components.train")
