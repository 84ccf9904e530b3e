"""dvc.yaml and params.yaml agree with the code: each stage runs its own module, reads keys that exist."""

from __future__ import annotations

import importlib.util
import shlex
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
