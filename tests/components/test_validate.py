"""The validate step rejects broken data with a message that names the problem and the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from components import validate
from components.validate import ValidateParams, validate_dataset
from tests.conftest import REPO_ROOT
from tests.fixtures.images import png_bomb, synthetic_image, write_dataset

CLASSES = ["keyboard", "monitor", "mouse"]


def small_params(**overrides) -> ValidateParams:
    values = dict(
        expected_classes=CLASSES,
        image_formats=["JPEG", "PNG"],
        min_width=32,
        min_height=32,
        max_pixels=40_000_000,
        min_images_per_class=3,
        max_class_ratio=4.0,
        split_folder_names=["train", "test", "val", "validation", "train data", "test data", "validation data"],
        catalog_required_columns=["name", "price"],
    )
    values.update(overrides)
    return ValidateParams(**values)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = write_dataset(tmp_path / "images", CLASSES, per_class=4, size=64)
    (tmp_path / "catalog").mkdir()
    (tmp_path / "catalog" / "mouse.csv").write_text("name,price,wireless\nLogitech G305,29.99,true\nRazer X,,false\n")
    return root


def failures_of(images: Path, params: ValidateParams | None = None) -> list[str]:
    _, report, _ = validate_dataset(images, images.parent / "catalog", params or small_params())
    return [outcome.sentence() for outcome in report.failures]


def the_failure(failures: list[str], words: str) -> str:
    matching = [sentence for sentence in failures if words in sentence]
    assert matching, f"no failure mentions {words!r}; failures: {failures}"
    return matching[0]


def test_clean_dataset_passes(dataset: Path) -> None:
    manifest, report, summary = validate_dataset(dataset, dataset.parent / "catalog", small_params())
    assert report.success, [o.sentence() for o in report.failures]
    assert summary["n_images"] == 12 and summary["n_classes"] == 3
    assert set(manifest.columns) >= {"path", "class_name", "bytes", "sha256", "format", "width", "height", "mode"}
    assert manifest["decodes"].all()


def test_paper_split_layout_is_rejected_with_an_explanation(tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    for split in ["Train Data", "Test Data", "Validation Data"]:
        write_dataset(images / split, CLASSES, per_class=3, size=64)
    (tmp_path / "catalog").mkdir()
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"validate": small_params().__dict__}))
    manifest = tmp_path / "out" / "manifest.csv"

    exit_code = validate.main(
        ["--images", str(images), "--catalog", str(tmp_path / "catalog"), "--params", str(params_file),
         "--manifest", str(manifest), "--metrics", str(tmp_path / "out" / "validate.json"),
         "--report-dir", str(tmp_path / "out" / "report")]
    )  # fmt: skip

    assert exit_code != 0
    assert not manifest.exists(), "nothing downstream may consume a failed validation"
    message = the_failure(capsys.readouterr().err.splitlines(), "look like a train/test/validation split")
    assert "Train Data" in message and "images/<class>/<file>" in message
    assert (tmp_path / "out" / "report" / "data_docs" / "index.html").exists()
    # The metrics say it failed and how often; the report's summary names each expectation.
    metrics = json.loads((tmp_path / "out" / "validate.json").read_text())
    summary = json.loads((tmp_path / "out" / "report" / validate.SUMMARY_FILE).read_text())
    assert metrics["success"] is False and metrics["failed_expectations"] == sum(
        not e["success"] for e in summary["expectations"]
    )
    assert any(not e["success"] and "train/test/validation split" in e["fails_when"] for e in summary["expectations"])


def test_truncated_jpeg_is_named(dataset: Path) -> None:
    victim = dataset / "mouse" / "mouse_0001.jpg"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert "mouse/mouse_0001.jpg" in the_failure(failures_of(dataset), "does not decode")


def test_zero_byte_file_is_named(dataset: Path) -> None:
    (dataset / "keyboard" / "empty.jpg").write_bytes(b"")
    failure = the_failure(failures_of(dataset), "does not decode")
    assert "keyboard/empty.jpg" in failure and "0 bytes" in failure


def test_text_file_named_jpg_is_named(dataset: Path) -> None:
    (dataset / "monitor" / "notes.jpg").write_text("this is not a picture")
    assert "monitor/notes.jpg" in the_failure(failures_of(dataset), "does not decode")


def test_unsupported_format_is_named(dataset: Path) -> None:
    synthetic_image(0, 99, 64).save(dataset / "keyboard" / "odd.gif", format="GIF")
    assert "keyboard/odd.gif" in the_failure(failures_of(dataset), "format is not one of")


def test_too_small_image_is_named(dataset: Path) -> None:
    Image.new("RGB", (16, 16), (10, 20, 30)).save(dataset / "mouse" / "tiny.png")
    assert "mouse/tiny.png" in the_failure(failures_of(dataset), "narrower than 32 px")


def test_png_bomb_is_named_with_its_size_and_never_decoded(dataset: Path) -> None:
    (dataset / "mouse" / "huge.png").write_bytes(png_bomb(20_000, 20_000))  # 48 KB; 1.2 GB decoded
    failures = failures_of(dataset)
    failure = the_failure(failures, "more than validate.max_pixels (40,000,000) pixels")
    assert "mouse/huge.png (20000x20000 = 400,000,000 pixels)" in failure
    assert "mouse/huge.png (not decoded: 20000x20000" in the_failure(failures, "does not decode")


def test_108_megapixel_jpeg_is_named_not_just_warned_about(dataset: Path) -> None:
    # A real, decodable photo: Pillow only warns about it (past 89 MP, no file named) and decodes it.
    Image.new("L", (12_000, 9_000), 128).save(dataset / "monitor" / "panorama.jpg", quality=50)
    failure = the_failure(failures_of(dataset), "more than validate.max_pixels")
    assert "monitor/panorama.jpg (12000x9000 = 108,000,000 pixels)" in failure


def test_image_over_a_lower_limit_is_named(dataset: Path) -> None:
    synthetic_image(2, 7, 100).save(dataset / "keyboard" / "big.jpg")  # 10,000 pixels
    failure = the_failure(failures_of(dataset, small_params(max_pixels=9_999)), "more than validate.max_pixels")
    assert "keyboard/big.jpg (100x100 = 10,000 pixels)" in failure
    assert failures_of(dataset, small_params(max_pixels=10_000)) == []  # the limit itself is allowed


def test_png_named_jpg_is_named(dataset: Path) -> None:
    synthetic_image(1, 5, 64).save(dataset / "monitor" / "screenshot.jpg", format="PNG")
    failure = the_failure(failures_of(dataset), "extension does not match the image's real format")
    assert "monitor/screenshot.jpg (a PNG file)" in failure


def test_any_extension_of_the_real_format_is_accepted(dataset: Path) -> None:
    synthetic_image(0, 5, 64).save(dataset / "mouse" / "photo.jpeg", format="JPEG")
    synthetic_image(0, 6, 64).save(dataset / "mouse" / "PHOTO2.JPG", format="JPEG")
    assert failures_of(dataset) == []


def test_empty_class_is_named(dataset: Path) -> None:
    shutil.rmtree(dataset / "monitor")
    (dataset / "monitor").mkdir()
    assert "monitor" in the_failure(failures_of(dataset), "fewer than 3 valid images")


def test_same_image_in_two_classes_is_a_label_conflict(dataset: Path) -> None:
    shutil.copy(dataset / "mouse" / "mouse_0000.jpg", dataset / "keyboard" / "looks_like_a_mouse.jpg")
    failure = the_failure(failures_of(dataset), "label conflict")
    assert "keyboard/looks_like_a_mouse.jpg" in failure and "mouse/mouse_0000.jpg" in failure


def test_duplicate_within_a_class_is_reported_not_failed(dataset: Path) -> None:
    shutil.copy(dataset / "mouse" / "mouse_0000.jpg", dataset / "mouse" / "again.jpg")
    _, report, summary = validate_dataset(dataset, dataset.parent / "catalog", small_params())
    assert report.success
    assert summary["duplicates_within_class"] == 1
    assert summary["duplicate_examples"] == ["mouse/mouse_0000.jpg"]


def test_stray_file_outside_class_folders_is_named(dataset: Path) -> None:
    synthetic_image(1, 1, 64).save(dataset / "loose.jpg")
    assert "loose.jpg" in the_failure(failures_of(dataset), "stray file")


def test_unexpected_class_folder_is_named(dataset: Path) -> None:
    write_dataset(dataset, ["toaster"], per_class=4, size=64)
    assert "unexpected ['toaster']" in the_failure(failures_of(dataset), "not exactly the expected classes")


def test_catalog_problems_are_named(dataset: Path) -> None:
    (dataset.parent / "catalog" / "keyboard.csv").write_text("name,price\nGood One,10\n,5\nFree Lunch,0\nOdd,abc\n")
    failures = failures_of(dataset)
    assert "row 3" in the_failure(failures, "product name is empty")
    assert "row 4" in the_failure(failures, "price is not > 0")
    assert "row 5" in the_failure(failures, "neither empty nor a number")


def test_catalog_without_price_column_is_rejected(dataset: Path) -> None:
    (dataset.parent / "catalog" / "keyboard.csv").write_text("name,colour\nGood One,black\n")
    assert "catalog/keyboard.csv" in the_failure(failures_of(dataset), "required column 'price' is missing")


@pytest.mark.slow
def test_dataset_v1_passes_validation(tmp_path: Path) -> None:
    images = REPO_ROOT / "data" / "images"
    if not images.is_dir():
        pytest.fail("dataset v1 is not pulled: run `make pull` (CI pulls it from ../shared/dvc-remote)")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["validate"]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"validate": params}))
    exit_code = validate.main(
        ["--images", str(images), "--catalog", str(REPO_ROOT / "data" / "catalog"), "--params", str(params_file),
         "--manifest", str(tmp_path / "manifest.csv"), "--metrics", str(tmp_path / "validate.json"),
         "--report-dir", str(tmp_path / "report")]
    )  # fmt: skip
    metrics = json.loads((tmp_path / "validate.json").read_text())
    assert exit_code == 0
    # DVC metrics: one row of a few scalars in `dvc metrics show`; the tables are in the report's summary.
    assert metrics == {
        "success": True, "failed_expectations": 0, "n_images": 2632, "n_classes": 14, "duplicates_within_class": 0
    }  # fmt: skip
    compared = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["retrain_check"]["metrics"]
    assert {n.partition(":")[2] for n in compared if n.startswith("metrics/validate.json:")} <= set(metrics)
    summary = json.loads((tmp_path / "report" / validate.SUMMARY_FILE).read_text())
    assert sum(summary["per_class"].values()) == 2632
    assert sum(summary["catalog_rows"].values()) > 50_000


def test_review_of_a_missing_image_fails_naming_the_row(dataset: Path) -> None:
    from components.validate import build_manifest

    image = build_manifest(dataset).iloc[0]
    good = {"sha256": image["sha256"], "file": image["path"], "given_label": image["class_name"],
            "decision": "mouse", "reviewer": "alice", "reviewed_at": "2026-12-01", "note": ""}  # fmt: skip
    missing = dict(good, sha256="0" * 64, file="mouse/gone.jpg")
    reviews = pd.DataFrame([good, missing])
    _, report, _ = validate_dataset(dataset, dataset.parent / "catalog", small_params(), reviews=reviews)
    failure = the_failure([o.sentence() for o in report.failures], "not in the dataset")
    assert "labels/reviews.csv line 3 (mouse/gone.jpg)" in failure


def test_review_with_an_unknown_decision_fails_naming_the_row(dataset: Path) -> None:
    from components.validate import build_manifest

    image = build_manifest(dataset).iloc[0]
    row = {"sha256": image["sha256"], "file": image["path"], "given_label": image["class_name"],
           "decision": "printer", "reviewer": "alice", "reviewed_at": "2026-12-01", "note": ""}  # fmt: skip
    _, report, _ = validate_dataset(dataset, dataset.parent / "catalog", small_params(), reviews=pd.DataFrame([row]))
    failure = the_failure([o.sentence() for o in report.failures], "decision is not one of")
    assert f"labels/reviews.csv line 2 ({image['path']})" in failure
