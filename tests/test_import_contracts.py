"""The layers drawn in the README hold: a back-reference (components -> recommender, bench -> tests, ...) fails CI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def root_packages() -> list[str]:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return config["tool"]["importlinter"]["root_packages"]


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with the repository's contracts, over the packages under `root`."""
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def repository_copy(tmp_path: Path) -> Path:
    """The Python packages and pyproject.toml of the repository, copied so a test can add a bad import."""
    for package in root_packages():
        shutil.copytree(REPO_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copyfile(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_repository_keeps_every_import_contract() -> None:
    result = lint_imports(REPO_ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "back_reference", "complaint"),
    [
        ("common/io.py", "import components.gate", "common is not allowed to import components"),
        ("components/gate.py", "import recommender.kb", "components is not allowed to import recommender"),
        ("recommender/client.py", "import serving.core", "recommender.client -> serving.core"),
        ("bench/serving.py", "import tests.fixtures.images", "bench is not allowed to import tests"),
    ],
)
def test_a_back_reference_fails_the_contracts(
    repository_copy: Path, module: str, back_reference: str, complaint: str
) -> None:
    path = repository_copy / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{back_reference}  # noqa\n", encoding="utf-8")
    result = lint_imports(repository_copy)
    assert result.returncode != 0
    assert complaint in " ".join(result.stdout.split())
