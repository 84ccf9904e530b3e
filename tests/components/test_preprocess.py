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
    first, names_first = make_splits(manifest, PARAMS)
    second, names_second = make_splits(manifest.sample(frac=1, random_state=3), PARAMS)
    assert names_first == names_second == sorted(CLASSES)
    for name in preprocess.SPLITS:
        pd.testing.assert_frame_equal(first[name], second[name])


def test_splits_are_stratified_within_tolerance(manifest: pd.DataFrame) -> None:
    splits, _ = make_splits(manifest, PARAMS)
    for class_name in CLASSES:
        counts = {name: int((frame["class_name"] == class_name).sum()) for name, frame in splits.items()}
        total = sum(counts.values())
        assert abs(counts["test"] / total - PARAMS.test_fraction) < 0.07, counts
        assert abs(counts["val"] / total - PARAMS.val_fraction) < 0.07, counts


def test_adding_images_never_moves_existing_ones(manifest: pd.DataFrame, tmp_path: Path) -> None:
    before = split_of_each_path(make_splits(manifest, PARAMS)[0])
    extra = build_manifest(write_dataset(tmp_path, CLASSES, per_class=40, size=32, start=1000))
    grown = pd.concat([manifest, extra], ignore_index=True)
    after = split_of_each_path(make_splits(grown, PARAMS)[0])
    assert len(after) == len(before) + len(extra)
    assert {path: after[path] for path in before} == before


def test_labels_index_the_class_names(manifest: pd.DataFrame) -> None:
    splits, class_names = make_splits(manifest, PARAMS)
    for frame in splits.values():
        assert (frame["class_name"] == [class_names[label] for label in frame["label"]]).all()


def test_cli_writes_split_files_and_class_names(manifest: pd.DataFrame, tmp_path: Path) -> None:
    manifest_csv = tmp_path / "manifest.csv"
    manifest.to_csv(manifest_csv, index=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"preprocess": PARAMS.__dict__}))
    out = tmp_path / "splits"
    exit_code = preprocess.main(
        ["--manifest", str(manifest_csv), "--params", str(params_file), "--output", str(out),
         "--metrics", str(tmp_path / "preprocess.json")]
    )  # fmt: skip
    assert exit_code == 0
    assert json.loads((out / "class_names.json").read_text()) == sorted(CLASSES)
    sizes = {name: len(pd.read_csv(out / f"{name}.csv")) for name in preprocess.SPLITS}
    assert sum(sizes.values()) == len(CLASSES) * 150
    assert list(pd.read_csv(out / "train.csv").columns) == ["path", "class_name", "label", "sha256"]
    assert json.loads((tmp_path / "preprocess.json").read_text())["split_sizes"] == sizes


def test_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match="room for a training split"):
        PreprocessParams(val_fraction=0.5, test_fraction=0.5, split_salt="x")
