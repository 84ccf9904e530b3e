"""Each dvc.yaml stage lists exactly the code it runs: every repo module its command imports, and no other.

The imports are read statically (ast), transitively, function-level ones included, so a stage reruns
when code it runs changes and only then: a change to common/reviews.py does not retrain the model.
"""

from __future__ import annotations

import ast
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT

STAGES: dict[str, dict[str, Any]] = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def stage_module(stage: dict[str, Any]) -> str | None:
    """The module of a `python -m <module> ...` command; None for any other command."""
    cmd = stage["cmd"]
    argv = shlex.split(" ".join(cmd) if isinstance(cmd, list) else cmd)
    return argv[2] if argv[:2] == ["python", "-m"] and len(argv) > 2 else None


def module_file(name: str) -> Path | None:
    """The repo file Python runs for module `name` (the repo root is first on sys.path); None if not in the repo."""
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement in `path` may load, at any depth of the file, with its parents."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    with_parents = set()
    for name in names:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_parents


@cache
def imported_files(module: str) -> frozenset[Path]:
    """The repo files running `python -m module` may execute: the module and everything it imports, transitively."""
    seen: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        pending.extend(imported_names(path, name))
    return frozenset(path for path in seen.values() if is_code(path))


def is_code(path: Path) -> bool:
    """A package's __init__.py holding only a docstring runs nothing a stage could depend on."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return bool(body)


def repo_code_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*.py") if ".venv" not in p.parts and is_code(p)} if path.is_dir() else set()


def dep_paths(stage: dict[str, Any]) -> list[Path]:
    return [REPO_ROOT / (entry if isinstance(entry, str) else next(iter(entry))) for entry in stage.get("deps") or []]


def relative(paths: set[Path] | frozenset[Path]) -> list[str]:
    return sorted(p.relative_to(REPO_ROOT).as_posix() for p in paths)


PYTHON_STAGES = [name for name, stage in STAGES.items() if stage_module(stage)]


def test_every_stage_runs_a_repo_module():
    assert PYTHON_STAGES == list(STAGES), "a stage command that is not `python -m <module>` escapes these checks"
    for name in PYTHON_STAGES:
        assert module_file(stage_module(STAGES[name])), f"stage {name}: no module {stage_module(STAGES[name])}"


@pytest.mark.parametrize("name", PYTHON_STAGES)
def test_stage_depends_on_every_repo_module_it_imports(name):
    deps = dep_paths(STAGES[name])
    runs = imported_files(stage_module(STAGES[name]))
    missing = {path for path in runs if not any(path == dep or path.is_relative_to(dep) for dep in deps)}
    assert not missing, f"stage {name} runs code it does not list in deps: {relative(missing)}"


@pytest.mark.parametrize("name", PYTHON_STAGES)
def test_stage_lists_no_code_it_does_not_run(name):
    runs = imported_files(stage_module(STAGES[name]))
    listed: set[Path] = set()
    for dep in dep_paths(STAGES[name]):
        listed |= {dep} if dep.suffix == ".py" else repo_code_under(dep)
    extra = listed - runs
    assert not extra, f"stage {name} lists code it never imports (a change there reruns it): {relative(extra)}"


def test_the_import_walk_sees_function_level_and_from_package_imports():
    # evaluate reads images through common.data inside its functions only; build_kb imports siblings by package.
    assert REPO_ROOT / "common" / "data.py" in imported_files("components.evaluate")
    assert REPO_ROOT / "recommender" / "kb_schema.py" in imported_files("recommender.build_kb")
    assert REPO_ROOT / "recommender" / "ranking.py" not in imported_files("recommender.build_kb")
    assert REPO_ROOT / "components" / "train.py" not in imported_files("components.evaluate")
