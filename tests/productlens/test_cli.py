"""The `productlens` command: one entry point for the recommender's, the review tool's and publishing's commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
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


# ----------------------------------------------------------------- feedback: users' answers -> blind review


def feedback_params(path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "validate": {
                    "expected_classes": CLASSES,
                    "image_formats": ["JPEG", "PNG"],
                    "min_width": 64,
                    "min_height": 64,
                    "max_pixels": 40_000_000,
                },
                "preprocess": {"val_fraction": 0.2, "test_fraction": 0.3, "split_salt": "cli-test"},
            }
        )
    )
    return path


def test_feedback_export_then_blind_review_of_the_candidates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from recommender.feedback import FeedbackBook
    from recommender.kb import sqlite_url
    from tests.fixtures.images import jpeg_bytes, synthetic_image

    for name in ("PRODUCTLENS_DB_URL", "PRODUCTLENS_FEEDBACK_DIR", "PRODUCTLENS_FEEDBACK_DB_URL"):
        monkeypatch.delenv(name, raising=False)
    images = write_dataset(tmp_path / "images", CLASSES, per_class=6, size=96)
    params = feedback_params(tmp_path / "params.yaml")
    store = tmp_path / "feedback"
    corrected, confirmed = jpeg_bytes(synthetic_image(2, 70, 96)), jpeg_bytes(synthetic_image(0, 71, 96))
    book = FeedbackBook.open(sqlite_url(store / "feedback.db"), store, params)
    try:
        corrected_sha = book.record(predicted_class="mouse", user_class="keyboard", image=corrected)[0].image_sha256
        confirmed_sha = book.record(predicted_class="keyboard", user_class="keyboard", image=confirmed)[0].image_sha256
        in_dataset = (images / "mouse" / "mouse_0001.jpg").read_bytes()
        in_dataset_sha = book.record(predicted_class="mouse", user_class="mouse", image=in_dataset)[0].image_sha256
    finally:
        book.close()

    reviews = tmp_path / "reviews.csv"
    candidates, report = tmp_path / "reports" / "candidates.csv", tmp_path / "reports" / "export.json"
    export = ["feedback", "export", "--dataset", str(images), "--candidates", str(candidates), "--report", str(report)]
    export += ["--reviews", str(reviews), "--params", str(params), "--feedback-dir", str(store)]
    assert main(export) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"3 answers in {sqlite_url(store / 'feedback.db')} (2 confirmed, 1 corrected) on 3 photos\n")
    assert "added 2 photos to" in out and "(keyboard 2)" in out and "1 photos already in the dataset" in out
    assert "3 review candidates (not reviewed yet)" in out
    assert (images / "keyboard" / f"feedback-{corrected_sha[:16]}.jpg").read_bytes() == corrected

    # The review tool sees the dataset once validate has listed it (its manifest), and shows only the candidates.
    manifest = tmp_path / "manifest.csv"
    build_manifest(images).to_csv(manifest, index=False)
    sheets = tmp_path / "sheets"
    review = ["review", "--manifest", str(manifest), "--images", str(images), "--params", str(params)]
    review += ["--reviews", str(reviews)]
    assert main([*review, "sheets", "--candidates", str(candidates), "--out", str(sheets)]) == 0
    assert capsys.readouterr().out.startswith("3 images to review on 1 sheets")
    sheet = json.loads((sheets / "candidates-001.json").read_text())
    assert sorted(sheet["tiles"].values()) == sorted([corrected_sha, confirmed_sha, in_dataset_sha])
    assert (sheets / sheet["sheet"]).stat().st_size > 1000
    tile_of = {sha: tile for tile, sha in sheet["tiles"].items()}

    # The reviewer's decision, not the users' answer, is the label; the answer is only the given label.
    decisions = [f"{tile_of[corrected_sha]}=mouse", f"{tile_of[confirmed_sha]}=np:a fan, not a keyboard"]
    decisions.append(f"{tile_of[in_dataset_sha]}=mouse")
    assert main([*review, "record", str(sheets / "candidates-001.json"), "--reviewer", "alice", *decisions]) == 0
    rows = pd.read_csv(reviews).set_index("sha256")
    assert rows.loc[corrected_sha, ["file", "given_label", "decision"]].tolist() == [
        f"keyboard/feedback-{corrected_sha[:16]}.jpg",
        "keyboard",
        "mouse",
    ]
    assert rows.loc[confirmed_sha, "decision"] == "exclude_not_product"
    capsys.readouterr()
    assert main([*review, "sheets", "--candidates", str(candidates), "--out", str(sheets)]) == 0
    assert capsys.readouterr().out.startswith("0 images to review")
    assert main(export) == 0
    out = capsys.readouterr().out
    assert "added 0 photos" in out and "3 photos already reviewed" in out and "0 review candidates" in out


def test_review_sheets_refuse_candidates_the_dataset_does_not_have_yet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = write_dataset(tmp_path / "images", CLASSES, per_class=6, size=96)
    manifest = tmp_path / "manifest.csv"
    build_manifest(images).to_csv(manifest, index=False)
    candidates = tmp_path / "candidates.csv"
    candidates.write_text("sha256\n" + "ab" * 32 + "\n")
    review = ["review", "--manifest", str(manifest), "--images", str(images)]
    review += ["--params", str(feedback_params(tmp_path / "params.yaml")), "--reviews", str(tmp_path / "r.csv")]
    assert main([*review, "sheets", "--candidates", str(candidates), "--out", str(tmp_path / "sheets")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: 1 of the 1 candidates in {candidates} are not in {manifest} (e.g. {'ab' * 32})")
    assert "run validate first" in err


def test_feedback_is_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["feedback", "export", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--dataset" in out and "--candidates" in out and "--corrected-only" in out
