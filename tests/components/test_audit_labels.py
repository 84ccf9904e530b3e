"""The label audit finds labels flipped on purpose among its top issues, from real frozen features."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components import audit_labels
from components.audit_labels import AuditParams, audit
from components.model import MobileNetParams
from tests.fixtures.images import synthetic_image
from tests.fixtures.training import MOBILENET_035

CLASSES = ["gpu", "keyboard", "monitor", "mouse"]
PER_CLASS = 24
FLIPPED = 4
PARAMS = AuditParams(folds=4, seed=7, probe_c=0.05, image_size=96, batch_size=32)


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> tuple[Path, Path, set[str]]:
    """A generated dataset written as preprocess would (train/val/test CSVs), with a few labels flipped."""
    root = tmp_path_factory.mktemp("audit")
    images = root / "images"
    rows = []
    for class_index, name in enumerate(CLASSES):
        (images / name).mkdir(parents=True)
        for variant in range(PER_CLASS):
            path = images / name / f"{variant:03d}.jpg"
            synthetic_image(class_index, variant, 96).save(path, quality=92)
            rows.append({"path": f"{name}/{variant:03d}.jpg", "class_name": name,
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})  # fmt: skip
    frame = pd.DataFrame(rows)
    rng = np.random.default_rng(3)
    flipped_rows = rng.choice(len(frame), size=FLIPPED, replace=False)
    for index in flipped_rows:  # the folder says one class, the picture shows another
        frame.loc[index, "class_name"] = CLASSES[(CLASSES.index(frame.loc[index, "class_name"]) + 1) % len(CLASSES)]
    frame["label"] = frame["class_name"].map(CLASSES.index)
    frame["given_class_name"] = frame["class_name"]
    frame["review"] = ""
    split = np.array(["train", "val", "test"])[np.arange(len(frame)) % 3]
    out = root / "splits"
    out.mkdir()
    for name in ("train", "val", "test"):
        frame[split == name].to_csv(out / f"{name}.csv", index=False)
    (out / "class_names.json").write_text(json.dumps(CLASSES))
    return out, images, set(frame.loc[flipped_rows, "sha256"])


def test_flipped_labels_are_the_top_label_issues(splits: tuple[Path, Path, set[str]]) -> None:
    splits_dir, images_root, flipped = splits
    frame = audit_labels.load_split_frames(splits_dir)
    table, report = audit(frame, images_root, CLASSES, PARAMS, MobileNetParams(**MOBILENET_035), cache_path=None)
    label_issues = table[table["issue_type"] == "label"].sort_values("label_quality")
    top = set(label_issues["sha256"].head(2 * FLIPPED))
    assert len(flipped & top) >= FLIPPED - 1, label_issues.head(2 * FLIPPED)
    assert report["issues"]["label"] >= FLIPPED - 1
    flipped_rows = label_issues[label_issues["sha256"].isin(flipped)]
    # The suggestion is the class the picture shows: the one before the flip.
    assert (flipped_rows["suggested_label"] != flipped_rows["given_label"]).all()


def test_cli_writes_issues_metrics_report_and_a_feature_cache_it_reuses(
    splits: tuple[Path, Path, set[str]], tmp_path: Path
) -> None:
    splits_dir, images_root, _ = splits
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"audit_labels": PARAMS.__dict__, "train": {"mobilenet_v2": MOBILENET_035}}), encoding="utf-8"
    )
    cache = tmp_path / "features.npz"
    argv = ["--splits", str(splits_dir), "--images", str(images_root), "--params", str(params),
            "--feature-cache", str(cache), "--issues", str(tmp_path / "issues.csv"),
            "--metrics", str(tmp_path / "audit.json"), "--report", str(tmp_path / "report" / "audit.json")]  # fmt: skip
    assert audit_labels.main(argv) == 0
    issues = pd.read_csv(tmp_path / "issues.csv")
    assert list(issues.columns) == audit_labels.ISSUE_COLUMNS
    assert set(issues["issue_type"]) <= set(audit_labels.ISSUE_TYPES)
    report = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert report["n_images"] == len(CLASSES) * PER_CLASS
    assert set(report["label_issues_per_split"]) == {"train", "val", "test"}
    # The DVC metrics: a few scalars that add up to the issue table.
    metrics = json.loads((tmp_path / "audit.json").read_text())
    assert list(metrics) == [
        "out_of_fold_accuracy", "label_issues", "outliers", "near_duplicates", "issues_not_reviewed", "seconds"
    ]  # fmt: skip
    assert metrics["label_issues"] + metrics["outliers"] + metrics["near_duplicates"] == len(issues)
    assert metrics["issues_not_reviewed"] == int((~issues["reviewed"]).sum())
    key = audit_labels.feature_key(PARAMS, MobileNetParams(**MOBILENET_035))
    cached = audit_labels.read_feature_cache(cache, key)
    assert len(cached) == len(CLASSES) * PER_CLASS
    # A rerun reads the cache: the same issues, and nothing to compute.
    assert audit_labels.main(argv) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "issues.csv"), issues)
    assert audit_labels.read_feature_cache(cache, "another backbone") == {}
