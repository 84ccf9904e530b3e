"""dvc.yaml and params.yaml agree with the code: each stage runs its own module, reads keys that exist; the
metrics files are ones git commits, so `dvc metrics diff` reads them at HEAD."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))
PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
STAGES: dict[str, dict[str, Any]] = DVC_YAML["stages"]
# Stages whose module is not in components/.
OWN_PACKAGE = {"build_kb": "recommender"}
# Inputs a stage reads on purpose without a dep, each with the reason DVC can't express it.
READ_WITHOUT_DEP = {
    ("gate", "models/productlens"): "the champion is export's output: as a dep of the gate it would be a cycle",
}


def entry_paths(entries: list[Any] | None) -> list[str]:
    """Paths of a stage's deps/outs/metrics/plots list (entries are strings or {path: options})."""
    paths = []
    for entry in entries or []:
        paths.extend([entry] if isinstance(entry, str) else list(entry))
    return paths


def lookup(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def stage_argv(stage: dict[str, Any]) -> list[str]:
    cmd = stage["cmd"]
    return shlex.split(" ".join(cmd) if isinstance(cmd, list) else cmd)


def test_pipeline_has_the_first_stages_in_order():
    assert list(STAGES)[:2] == ["validate", "preprocess"]


def stage_module(name: str) -> str:
    """The module a stage runs: `python -m <module> ...`."""
    argv = stage_argv(STAGES[name])
    assert argv[:2] == ["python", "-m"], f"stage {name} must run python -m <module>"
    return argv[2]


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_runs_the_module_named_after_it(name):
    # Pipeline steps are components; the knowledge base's builder lives with the knowledge base.
    package = OWN_PACKAGE.get(name, "components")
    module = stage_module(name)
    assert module == f"{package}.{name}", f"stage {name} must run python -m {package}.{name}"
    assert importlib.util.find_spec(module) is not None, f"{package}/{name}.py does not exist"
    assert (REPO_ROOT / package / f"{name}.py").is_file()


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_depends_on_its_own_module(name):
    assert f"{stage_module(name).replace('.', '/')}.py" in entry_paths(STAGES[name].get("deps"))


@pytest.mark.parametrize("name", [n for n in STAGES if STAGES[n].get("params")])
def test_every_params_key_a_stage_lists_exists_in_params_yaml(name):
    missing = []
    for entry in STAGES[name]["params"]:
        keys = [entry] if isinstance(entry, str) else [k for keys in entry.values() for k in keys]
        for key in keys:
            try:
                lookup(PARAMS, key)
            except KeyError:
                missing.append(key)
    assert not missing, f"stage {name} lists params missing from params.yaml: {missing}"


@pytest.mark.parametrize("name", list(STAGES))
def test_every_path_a_stage_writes_is_an_argument_of_its_command(name):
    stage = STAGES[name]
    argv = stage_argv(stage)
    written = entry_paths(stage.get("outs")) + entry_paths(stage.get("metrics")) + entry_paths(stage.get("plots"))
    orphans = [
        path for path in written
        if not any(path == arg or Path(path).is_relative_to(arg) for arg in argv if not arg.startswith("-"))
    ]  # fmt: skip
    assert not orphans, f"stage {name} declares outputs its command is not told to write: {orphans}"


@pytest.mark.parametrize("name", list(STAGES))
def test_every_input_path_of_the_command_is_a_dependency(name):
    stage = STAGES[name]
    argv = stage_argv(stage)
    deps = entry_paths(stage.get("deps"))
    written = entry_paths(stage.get("outs")) + entry_paths(stage.get("metrics")) + entry_paths(stage.get("plots"))
    inputs = [
        value for flag, value in zip(argv, argv[1:], strict=False)
        if flag.startswith("--") and not value.startswith("-") and "/" in value
        and not any(Path(path).is_relative_to(value) or value == path for path in written)
    ]  # fmt: skip
    undeclared = [
        value for value in inputs
        if not any(Path(value).is_relative_to(d) for d in deps) and (name, value) not in READ_WITHOUT_DEP
    ]  # fmt: skip
    assert not undeclared, f"stage {name} reads {undeclared} without listing them in deps"


def declared_metrics() -> list[str]:
    """Every metrics file dvc.yaml declares: the top-level list and any stage's `metrics:`."""
    stage_metrics = [path for stage in STAGES.values() for path in entry_paths(stage.get("metrics"))]
    return entry_paths(DVC_YAML.get("metrics")) + stage_metrics


def out_options(path: str) -> dict[str, Any] | None:
    """The options of the stage output `path` (an out or a stage metric), None when no stage writes it."""
    for stage in STAGES.values():
        for entry in (stage.get("outs") or []) + (stage.get("metrics") or []):
            if entry == path:
                return {}
            if isinstance(entry, dict) and path in entry:
                return entry[path] or {}
    return None


def test_every_metrics_file_is_written_by_a_stage_and_kept_in_git_not_in_dvc_cache() -> None:
    for path in declared_metrics():
        options = out_options(path)
        assert options is not None, f"{path} is a metrics file no stage writes"
        # A cached metric is restored only from a DVC cache: on a fresh clone `dvc metrics diff` could not read it.
        assert options.get("cache") is False, f"{path}: metrics must be `cache: false` (committed in git)"


def test_the_model_metrics_come_first() -> None:
    """`dvc metrics show/diff` and `dvc exp show` print metrics files in the order dvc.yaml lists them."""
    assert declared_metrics()[:2] == ["metrics/evaluate.json", "metrics/train.json"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_dvc_metrics_diff_reads_every_metrics_file_at_head(tmp_path: Path) -> None:
    """In a git repo with this dvc.yaml and .gitignore, metrics committed at HEAD and changed in the workspace:
    `dvc metrics diff` loads every file at both revisions (a git-ignored one, e.g. under artifacts/, fails at HEAD)."""
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(REPO_ROOT / name, tmp_path / name)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false"]

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=True)

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    for value in (0.5, 0.75):  # committed, then the workspace
        for path in declared_metrics():
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(json.dumps({"accuracy": value}), encoding="utf-8")
        if value == 0.5:
            run("git", "add", "-A")
            run(*git, "commit", "-q", "-m", "metrics")
    diff = run(sys.executable, "-m", "dvc", "metrics", "diff", "HEAD", "--json")
    assert "failed to load" not in diff.stderr, diff.stderr
    changed = json.loads(diff.stdout)
    assert sorted(changed) == sorted(declared_metrics())
    assert all(metrics["accuracy"]["old"] == 0.5 for metrics in changed.values()), changed
