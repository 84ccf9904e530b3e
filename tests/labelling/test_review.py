"""The blind review tool: a reviewer sees images and tile numbers only, and every decision is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from common.reviews import REVIEW_COLUMNS, read_reviews
from components.validate import build_manifest
from labelling import review
from tests.fixtures.images import write_dataset

CLASSES = ["keyboard", "monitor", "mouse"]


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Path]:
    images = write_dataset(tmp_path / "images", CLASSES, per_class=12, size=64)
    manifest = tmp_path / "manifest.csv"
    build_manifest(images).to_csv(manifest, index=False)
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "validate": {"expected_classes": CLASSES},
                "preprocess": {"val_fraction": 0.2, "test_fraction": 0.3, "split_salt": "review-test"},
            }
        )
    )
    return {"images": images, "manifest": manifest, "params": params, "reviews": tmp_path / "reviews.csv",
            "out": tmp_path / "sheets"}  # fmt: skip


def run(workspace: dict[str, Path], *args: str) -> int:
    common = ["--manifest", str(workspace["manifest"]), "--images", str(workspace["images"]),
              "--params", str(workspace["params"]), "--reviews", str(workspace["reviews"])]  # fmt: skip
    return review.main([*common, *args])


def test_sheets_show_no_label_and_their_index_names_images_by_hash_only(workspace, capsys) -> None:
    assert run(workspace, "sheets", "--split", "test", "--out", str(workspace["out"]), "--per-sheet", "4") == 0
    printed = capsys.readouterr().out
    sheets = sorted(workspace["out"].glob("test-*.json"))
    assert sheets
    for sheet in sheets:
        text = sheet.read_text()
        tiles = json.loads(text)["tiles"]
        assert all(len(sha) == 64 for sha in tiles.values())
        # Neither the index, nor the PNG's metadata, nor what the command printed names a class or a path.
        png = Image.open(sheet.with_suffix(".png"))
        for shown in (text, json.dumps(png.info, default=str), printed):
            assert not any(name in shown for name in CLASSES), shown


def test_sheets_mix_classes_instead_of_grouping_them(workspace) -> None:
    manifest = pd.read_csv(workspace["manifest"])
    images = review.dataset_images(manifest, review.PreprocessParams(0.2, 0.3, "review-test"))
    queue = review.review_queue(images, read_reviews(workspace["reviews"]))
    classes_in_order = images.set_index("sha256").loc[queue, "class_name"].tolist()
    changes = sum(a != b for a, b in zip(classes_in_order, classes_in_order[1:], strict=False))
    assert changes > len(CLASSES) * 2  # sorted by class would change class only twice


def test_a_tile_shows_the_image_itself(workspace) -> None:
    path = sorted((workspace["images"] / "mouse").iterdir())[0]
    sheet = review.contact_sheet([path], tile=64, columns=1)
    tile = np.asarray(sheet)[review.TILE_GAP : review.TILE_GAP + 64, review.TILE_GAP : review.TILE_GAP + 64]
    original = np.asarray(Image.open(path).convert("RGB"))
    # Apart from the number's box in the corner, the tile is the picture.
    assert np.abs(tile[32:, :].astype(int) - original[32:, :].astype(int)).mean() < 2


def test_record_writes_who_when_why_and_the_given_label_without_printing_it(workspace, capsys) -> None:
    run(workspace, "sheets", "--split", "test", "--out", str(workspace["out"]), "--per-sheet", "3")
    sheet = sorted(workspace["out"].glob("test-*.json"))[0]
    capsys.readouterr()
    code = run(workspace, "record", str(sheet), "--reviewer", "alice", "1=mouse", "2=amb:desk setup", "3=np:a fan")
    assert code == 0
    assert not any(name in capsys.readouterr().out for name in CLASSES)
    rows = read_reviews(workspace["reviews"])
    assert list(rows.columns) == REVIEW_COLUMNS and len(rows) == 3
    assert list(rows["decision"]) == ["mouse", "exclude_ambiguous", "exclude_not_product"]
    assert set(rows["reviewer"]) == {"alice"} and all(rows["reviewed_at"].str.startswith("20"))
    assert list(rows["note"])[1:] == ["desk setup", "a fan"]
    manifest = pd.read_csv(workspace["manifest"]).set_index("sha256")
    for row in rows.itertuples():
        assert row.given_label == manifest.at[row.sha256, "class_name"]
        assert row.file == manifest.at[row.sha256, "path"]
    # The reviewed images leave the queue.
    assert (
        run(workspace, "sheets", "--split", "test", "--out", str(workspace["out"] / "next"), "--per-sheet", "50") == 0
    )
    remaining = json.loads(next((workspace["out"] / "next").glob("*.json")).read_text())["tiles"].values()
    assert not set(remaining) & set(rows["sha256"])


def test_record_refuses_unknown_decisions_undecided_tiles_and_unexplained_exclusions(workspace, capsys) -> None:
    run(workspace, "sheets", "--split", "test", "--out", str(workspace["out"]), "--per-sheet", "2")
    sheet = str(sorted(workspace["out"].glob("test-*.json"))[0])
    assert run(workspace, "record", sheet, "--reviewer", "bob", "1=printer", "2=mouse") == 2
    assert "'printer' is not one of" in capsys.readouterr().err
    assert run(workspace, "record", sheet, "--reviewer", "bob", "1=mouse") == 2
    assert "no decision for tile(s) [2]" in capsys.readouterr().err
    assert run(workspace, "record", sheet, "--reviewer", "bob", "1=mouse", "2=exclude_ambiguous") == 2
    assert "needs a note" in capsys.readouterr().err
    assert not workspace["reviews"].exists()


def test_a_second_review_of_an_image_replaces_the_first(workspace) -> None:
    run(workspace, "sheets", "--split", "test", "--out", str(workspace["out"]), "--per-sheet", "2")
    sheet = str(sorted(workspace["out"].glob("test-*.json"))[0])
    run(workspace, "record", sheet, "--reviewer", "alice", "1-2=mouse")
    run(workspace, "record", sheet, "--reviewer", "bob", "--partial", "2=keyboard:on a second look")
    rows = read_reviews(workspace["reviews"]).set_index("reviewer")
    assert len(rows) == 2 and rows.at["bob", "decision"] == "keyboard" and rows.at["alice", "decision"] == "mouse"
