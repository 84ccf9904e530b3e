"""The `productlens` command: one entry point for the recommender's, the review tool's and publishing's commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.validate import build_manifest
from productlens.cli import main
from tests.conftest import REPO_ROOT
from tests.fixtures.images import write_dataset

CLASSES = ["keyboard", "monitor", "mouse"]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command in ("recommend", "kb", "review", "publish"):
        assert f"\n    {command} " in out, out


def test_publish_hands_its_arguments_to_the_publish_step(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["publish", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--candidate" in out and "--blessing" in out


def test_unknown_arguments_of_other_commands_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["kb", "info", "--no-such-flag"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_unusable_settings_are_one_line_of_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PRODUCTLENS_MODEL_TIMEOUT_S", "soon")
    assert main(["kb", "info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the settings cannot be used: PRODUCTLENS_MODEL_TIMEOUT_S: Input should be a valid")
    assert err.endswith("(got 'soon')\n") and "Traceback" not in err


def test_review_status_through_the_installed_command(tmp_path: Path) -> None:
    images = write_dataset(tmp_path / "images", CLASSES, per_class=6, size=48)
    manifest = tmp_path / "manifest.csv"
    build_manifest(images).to_csv(manifest, index=False)
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "validate": {"expected_classes": CLASSES},
                "preprocess": {"val_fraction": 0.2, "test_fraction": 0.3, "split_salt": "cli-test"},
            }
        )
    )
    command = Path(sys.executable).with_name("productlens")  # the console script pyproject.toml installs
    review = ["review", "--manifest", manifest, "--images", images, "--params", params, "--reviews", tmp_path / "r.csv"]
    done = subprocess.run(
        [command, *review, "status"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    counts = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()}
    assert set(counts) == {"train", "val", "test"}
    assert sum(int(words[-1]) for words in counts.values()) == 3 * 6
    assert all(words[:3] == ["0", "reviewed", "of"] for words in counts.values())
