"""Splits are deterministic, stratified, and stable when the dataset grows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components import preprocess
from components.preprocess import PreprocessParams, make_splits
from components.validate import build_manifest
from tests.conftest import REPO_ROOT
from tests.fixtures.images import write_dataset

CLASSES = ["cables", "gpu", "keyboard", "mouse"]
PARAMS = PreprocessParams(val_fraction=0.15, test_fraction=0.15, split_salt="test-salt")


def split_of_each_path(splits: dict[str, pd.DataFrame]) -> dict[str, str]:
    return {path: name for name, frame in splits.items() for path in frame["path"]}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> pd.DataFrame:
    root = write_dataset(tmp_path_factory.mktemp("images"), CLASSES, per_class=150, size=32)
    return build_manifest(root)


def test_splits_are_deterministic(manifest: pd.DataFrame) -> None:
    first = make_splits(manifest, PARAMS)
    second = make_splits(manifest.sample(frac=1, random_state=3), PARAMS)
    assert first.class_names == second.class_names == sorted(CLASSES)
    for name in preprocess.SPLITS:
        pd.testing.assert_frame_equal(first.splits[name], second.splits[name])


def test_splits_are_stratified_within_tolerance(manifest: pd.DataFrame) -> None:
    splits = make_splits(manifest, PARAMS).splits
    for class_name in CLASSES:
        counts = {name: int((frame["class_name"] == class_name).sum()) for name, frame in splits.items()}
        total = sum(counts.values())
        assert abs(counts["test"] / total - PARAMS.test_fraction) < 0.07, counts
        assert abs(counts["val"] / total - PARAMS.val_fraction) < 0.07, counts


def test_adding_images_never_moves_existing_ones(manifest: pd.DataFrame, tmp_path: Path) -> None:
    before = split_of_each_path(make_splits(manifest, PARAMS).splits)
    extra = build_manifest(write_dataset(tmp_path, CLASSES, per_class=40, size=32, start=1000))
    grown = pd.concat([manifest, extra], ignore_index=True)
    after = split_of_each_path(make_splits(grown, PARAMS).splits)
    assert len(after) == len(before) + len(extra)
    assert {path: after[path] for path in before} == before


def test_labels_index_the_class_names(manifest: pd.DataFrame) -> None:
    result = make_splits(manifest, PARAMS)
    for frame in result.splits.values():
        assert (frame["class_name"] == [result.class_names[label] for label in frame["label"]]).all()


def test_cli_writes_split_files_and_class_names(manifest: pd.DataFrame, tmp_path: Path) -> None:
    manifest_csv = tmp_path / "manifest.csv"
    manifest.to_csv(manifest_csv, index=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"preprocess": PARAMS.__dict__}))
    out = tmp_path / "splits"
    exit_code = preprocess.main(
        ["--manifest", str(manifest_csv), "--params", str(params_file), "--output", str(out),
         "--metrics", str(tmp_path / "preprocess.json"), "--report", str(tmp_path / "report" / "preprocess.json")]
    )  # fmt: skip
    assert exit_code == 0
    assert json.loads((out / "class_names.json").read_text()) == sorted(CLASSES)
    sizes = {name: len(pd.read_csv(out / f"{name}.csv")) for name in preprocess.SPLITS}
    assert sum(sizes.values()) == len(CLASSES) * 150
    assert list(pd.read_csv(out / "train.csv").columns) == [
        "path", "class_name", "label", "sha256", "given_class_name", "review"
    ]  # fmt: skip
    assert json.loads((tmp_path / "report" / "preprocess.json").read_text())["split_sizes"] == sizes
    # The DVC metrics: a few scalars, one column each in `dvc metrics show`; retrain-check compares the sizes.
    metrics = json.loads((tmp_path / "preprocess.json").read_text())
    compared = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["retrain_check"]["metrics"]
    assert {n.partition(":")[2] for n in compared if n.startswith("metrics/preprocess.json:")} <= set(metrics)
    assert metrics == {
        "train_images": sizes["train"], "val_images": sizes["val"], "test_images": sizes["test"],
        "relabelled": 0, "excluded": 0,
    }  # fmt: skip


def test_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match="room for a training split"):
        PreprocessParams(val_fraction=0.5, test_fraction=0.5, split_salt="x")


def review_row(image: pd.Series, decision: str) -> dict[str, str]:
    return {
        "sha256": image["sha256"], "file": image["path"], "given_label": image["class_name"], "decision": decision,
        "reviewer": "tester", "reviewed_at": "2026-12-01T00:00:00+00:00", "note": "",
    }  # fmt: skip


def test_reviews_relabel_and_exclude_without_moving_any_image_across_splits(manifest: pd.DataFrame) -> None:
    plain = make_splits(manifest, PARAMS)
    split_before = split_of_each_path(plain.splits)
    test_images = plain.splits["test"]
    relabelled, excluded = test_images.iloc[0], test_images.iloc[1]
    new_class = next(c for c in CLASSES if c != relabelled["class_name"])
    reviews = pd.DataFrame([review_row(relabelled, new_class), review_row(excluded, "exclude_ambiguous")])

    reviewed = make_splits(manifest, PARAMS, reviews)

    split_after = split_of_each_path(reviewed.splits)
    assert set(split_after) == set(split_before) - {excluded["path"]}
    assert all(split_after[path] == split_before[path] for path in split_after)
    test_after = reviewed.splits["test"].set_index("path")
    assert test_after.at[relabelled["path"], "class_name"] == new_class
    assert test_after.at[relabelled["path"], "label"] == reviewed.class_names.index(new_class)
    assert test_after.at[relabelled["path"], "given_class_name"] == relabelled["class_name"]
    unreviewed = test_after.drop(index=relabelled["path"])
    assert (unreviewed["class_name"] == unreviewed["given_class_name"]).all()
    assert list(reviewed.excluded["path"]) == [excluded["path"]]
    # The original test labels stay available for figures comparable with earlier runs.
    pd.testing.assert_frame_equal(
        reviewed.test_original[["path", "class_name", "label"]], test_images[["path", "class_name", "label"]]
    )


def test_review_counts_reach_the_metrics_and_the_report(manifest: pd.DataFrame, tmp_path: Path) -> None:
    train_images = make_splits(manifest, PARAMS).splits["train"]
    first, second, third = (train_images.iloc[i] for i in range(3))
    other = next(c for c in CLASSES if c != second["class_name"])
    reviews_csv = tmp_path / "reviews.csv"
    pd.DataFrame(
        [review_row(first, first["class_name"]), review_row(second, other), review_row(third, "exclude_not_product")]
    ).to_csv(reviews_csv, index=False)
    manifest_csv = tmp_path / "manifest.csv"
    manifest.to_csv(manifest_csv, index=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"preprocess": PARAMS.__dict__}))
    assert preprocess.main(
        ["--manifest", str(manifest_csv), "--params", str(params_file), "--reviews", str(reviews_csv),
         "--output", str(tmp_path / "splits"), "--metrics", str(tmp_path / "preprocess.json"),
         "--report", str(tmp_path / "report.json")]
    ) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "preprocess.json").read_text())
    assert (metrics["relabelled"], metrics["excluded"]) == (1, 1)
    reviews = json.loads((tmp_path / "report.json").read_text())["reviews"]
    assert (reviews["reviewed"], reviews["confirmed"], reviews["relabelled"]) == (3, 1, 1)
    assert reviews["exclude_not_product"] == 1 and reviews["exclude_ambiguous"] == 0
    assert reviews["reviewed_per_split"]["train"] == 3
    assert len(pd.read_csv(tmp_path / "splits" / "excluded.csv")) == 1
