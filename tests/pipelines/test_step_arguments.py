"""Each step's CLI arguments agree between dvc.yaml and its KFP wrapper (pipelines/steps.py), checked without kfp.local.

Both call the same `python -m <module>` CLI; this test reads the flags each passes (the dvc.yaml cmd, and the
string literals of the wrapper function that runs that module) so a flag added to one and not the other fails fast.
"""

from __future__ import annotations

import ast
import importlib.util
import shlex
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
STEPS_SOURCE = REPO_ROOT / "pipelines" / "steps.py"
# dvc stages with no KFP step, each with the reason.
NOT_IN_KFP = {
    "audit_labels": "finds label issues for people to review; it relabels nothing, so a training run does not need it",
    "build_kb": "builds the recommender's knowledge base from the catalog; a deployment step, not a training step",
}


def stage_module_and_flags(stage: dict) -> tuple[str, set[str]]:
    words = shlex.split(stage["cmd"])
    assert words[:2] == ["python", "-m"], f"stage cmd must be `python -m <module> ...`: {stage['cmd']}"
    return words[2], {word for word in words[3:] if word.startswith("--")}


def wrapper_flags() -> dict[str, set[str]]:
    """{module: flags} for every function in pipelines/steps.py that imports a step (`from X import Y as step`)."""
    found: dict[str, set[str]] = {}
    for function in ast.parse(STEPS_SOURCE.read_text(encoding="utf-8")).body:
        if not isinstance(function, ast.FunctionDef):
            continue
        modules = [
            f"{node.module}.{alias.name}"
            for node in ast.walk(function)
            if isinstance(node, ast.ImportFrom) and node.module
            for alias in node.names
            if alias.asname == "step"
        ]
        if not modules:
            continue
        flags = {
            node.value
            for node in ast.walk(function)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--")
        }
        for module in modules:
            assert module not in found, f"two wrappers in {STEPS_SOURCE.name} run {module}"
            found[module] = flags
    return found


WRAPPERS = wrapper_flags()


@pytest.mark.parametrize("stage_name", sorted(set(STAGES) - set(NOT_IN_KFP)))
def test_the_kfp_wrapper_passes_the_same_flags_as_the_dvc_stage(stage_name: str) -> None:
    module, dvc_flags = stage_module_and_flags(STAGES[stage_name])
    assert module in WRAPPERS, f"no function in pipelines/steps.py runs {module} (stage {stage_name})"
    assert WRAPPERS[module] == dvc_flags, (
        f"{stage_name}: only in dvc.yaml {sorted(dvc_flags - WRAPPERS[module])}, "
        f"only in the KFP wrapper {sorted(WRAPPERS[module] - dvc_flags)}"
    )


def test_every_stage_without_a_kfp_step_says_why() -> None:
    assert set(NOT_IN_KFP) <= set(STAGES)
    in_kfp = set(WRAPPERS)
    for stage_name in NOT_IN_KFP:
        module, _ = stage_module_and_flags(STAGES[stage_name])
        assert module not in in_kfp, f"{stage_name} has a KFP step now: remove it from NOT_IN_KFP"


def test_the_flags_compared_are_the_ones_the_step_parses() -> None:
    """A flag that no parser knows would make the comparison above meaningless (both sides wrong the same way)."""
    for stage_name, stage in STAGES.items():
        module_name, dvc_flags = stage_module_and_flags(stage)
        parser_source = Path(importlib.util.find_spec(module_name).origin).read_text(encoding="utf-8")
        unknown = sorted(flag for flag in dvc_flags if f'"{flag}"' not in parser_source)
        assert not unknown, f"{stage_name}: {module_name} does not define {unknown}"
