"""Audit labels step: find likely label errors, outliers and near-duplicates for people to review.

Confident learning (Northcutt et al.) with `cleanlab`'s Datalab: every image gets an out-of-fold
predicted probability (k-fold over all splits, a linear head on frozen ImageNet MobileNetV2
features: the model that scores an image never saw it), and Datalab ranks label quality from
those probabilities and finds outliers and near-duplicates from the same embeddings. Features
are cached per image content hash, so a rerun after a few reviews takes seconds, not minutes.
Nothing is relabelled here: people decide, blind, with `productlens review`.

Outputs: the issue table (`--issues`, one row per image and issue type), the DVC metrics (`--metrics`: issue
counts, out-of-fold accuracy, seconds) and the report (`--report`: the same plus issues per split and class).
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.cli import run_main
from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.params import load_params, section
from components.model import MobileNetParams, WeightsError
from components.preprocess import SPLITS

log = logging.getLogger("components.audit_labels")

ISSUE_TYPES = ("label", "outlier", "near_duplicate")
ISSUE_COLUMNS = [
    "file", "sha256", "split", "given_label", "suggested_label", "label_quality", "issue_type",
    "issue_score", "reviewed", "near_duplicate_of",
]  # fmt: skip


@dataclass(frozen=True)
class AuditParams:
    folds: int
    seed: int
    probe_c: float  # inverse L2 strength of the logistic-regression head
    image_size: int
    batch_size: int


def load_audit_params(path: Path) -> tuple[AuditParams, MobileNetParams]:
    from common.params import build

    params = load_params(path)
    audit = build(AuditParams, section(params, "audit_labels"), f"{path}:audit_labels")
    weights = build(MobileNetParams, section(params, "train")["mobilenet_v2"], f"{path}:train.mobilenet_v2")
    return audit, weights


def feature_key(params: AuditParams, weights: MobileNetParams) -> str:
    """What the cached features depend on: a different backbone or size invalidates the cache."""
    return f"mobilenet_v2:{weights.sha256}:alpha={weights.alpha}:size={params.image_size}"


def read_feature_cache(path: Path, key: str) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    with np.load(path, allow_pickle=False) as cached:
        if str(cached["key"]) != key:
            return {}
        return dict(zip(cached["sha256"].tolist(), cached["features"], strict=True))


def write_feature_cache(path: Path, key: str, features: dict[str, np.ndarray]) -> None:
    import io

    shas = sorted(features)
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), sha256=np.array(shas), features=np.stack([features[s] for s in shas]))
    atomic_write_bytes(path, buffer.getvalue())


def frozen_features(paths: list[str], image_size: int, weights: MobileNetParams, batch_size: int) -> np.ndarray:
    """Global-average-pooled MobileNetV2 features of each image (the training pipeline's decoding), with a
    progress bar on a terminal (minutes for the whole dataset on a few cores)."""
    import keras
    from keras.applications.mobilenet_v2 import preprocess_input
    from tqdm import tqdm

    from common.data import AUTOTUNE, image_dataset, unlabelled
    from components.model import mobilenet_v2_base

    class ImagesDone(keras.callbacks.Callback):
        def __init__(self, bar: tqdm) -> None:
            super().__init__()
            self.bar = bar

        def on_predict_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self.bar.update(min(batch_size, self.bar.total - self.bar.n))

    base = mobilenet_v2_base(image_size, weights)
    pixels = image_dataset(unlabelled(paths), image_size).map(lambda x, y: x)
    batched = pixels.batch(batch_size).map(preprocess_input).prefetch(AUTOTUNE)
    # tqdm on stderr, off when stderr is not a terminal (CI logs get the log line instead); keras' own bar
    # would write ANSI escapes to stdout either way. The callback only counts: the features are predict's.
    with tqdm(total=len(paths), desc="frozen features", unit="image", disable=None) as bar:
        return base.predict(batched, verbose=0, callbacks=[ImagesDone(bar)])


def linear_probe(c: float, class_weight: str | None = None) -> Any:
    """Standardised features -> multinomial logistic regression: a cheap, deterministic head on frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight=class_weight))


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int, c: float) -> np.ndarray:
    """Each row predicted by a head trained on the other folds (stratified, seeded)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(linear_probe(c), features, labels, cv=splitter, method="predict_proba")


def find_issues(features: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> tuple[pd.DataFrame, Any]:
    """cleanlab Datalab over the images: label, outlier and near-duplicate issues with their scores."""
    from cleanlab import Datalab

    lab = Datalab(data={"label": labels}, label_name="label", verbosity=0)
    lab.find_issues(pred_probs=probabilities, features=features, issue_types={t: {} for t in ISSUE_TYPES})
    return lab.get_issues(), lab


def issue_table(
    images: pd.DataFrame, issues: pd.DataFrame, probabilities: np.ndarray, class_names: list[str], duplicate_sets: Any
) -> pd.DataFrame:
    """One row per (image, issue type), label issues first, each type ranked worst first."""
    suggested = [class_names[i] for i in probabilities.argmax(axis=1)]
    rows = []
    for issue_type in ISSUE_TYPES:
        flagged = np.flatnonzero(issues[f"is_{issue_type}_issue"].to_numpy())
        for index in flagged:
            image = images.iloc[index]
            duplicates = duplicate_sets[index] if issue_type == "near_duplicate" else []
            rows.append(
                {
                    "file": image["path"],
                    "sha256": image["sha256"],
                    "split": image["split"],
                    "given_label": image["class_name"],
                    "suggested_label": suggested[index],
                    "label_quality": round(float(issues["label_score"].iloc[index]), 4),
                    "issue_type": issue_type,
                    "issue_score": round(float(issues[f"{issue_type}_score"].iloc[index]), 4),
                    "reviewed": bool(image["review"]),
                    "near_duplicate_of": ";".join(images.iloc[j]["path"] for j in duplicates),
                }
            )
    table = pd.DataFrame(rows, columns=ISSUE_COLUMNS)
    order = {t: i for i, t in enumerate(ISSUE_TYPES)}
    table = table.assign(_order=table["issue_type"].map(order))
    return table.sort_values(["_order", "issue_score", "file"]).drop(columns="_order").reset_index(drop=True)


def audit_report(images: pd.DataFrame, table: pd.DataFrame, probabilities: np.ndarray) -> dict[str, Any]:
    """Issue counts by type, per split and per given class, and how many are not reviewed yet."""
    labels = images["label"].to_numpy()
    out_of_fold_accuracy = float((probabilities.argmax(axis=1) == labels).mean()) if len(labels) else 0.0
    pending = table[~table["reviewed"]]
    return {
        "n_images": len(images),
        "out_of_fold_accuracy": round(out_of_fold_accuracy, 4),
        "issues": {t: int((table["issue_type"] == t).sum()) for t in ISSUE_TYPES},
        "issues_not_reviewed": {t: int((pending["issue_type"] == t).sum()) for t in ISSUE_TYPES},
        "label_issues_per_split": {
            s: int(((table["issue_type"] == "label") & (table["split"] == s)).sum()) for s in SPLITS
        },
        "label_issues_per_class": {
            name: int(count)
            for name, count in table[table["issue_type"] == "label"]["given_label"].value_counts().sort_index().items()
        },
        "near_duplicates_across_splits": int(
            sum(
                1
                for row in table[table["issue_type"] == "near_duplicate"].itertuples()
                if any(
                    images.loc[images["path"] == other, "split"].iloc[0] != row.split
                    for other in row.near_duplicate_of.split(";")
                    if other
                )
            )
        ),
    }


def load_split_frames(splits_dir: Path) -> pd.DataFrame:
    """Every image of every split (path, class_name, label, sha256, split, review), reviewed labels applied."""
    frames = []
    for split in SPLITS:
        frame = pd.read_csv(
            splits_dir / f"{split}.csv", dtype={"path": "string", "sha256": "string"}, keep_default_na=False
        )
        if "review" not in frame.columns:  # splits written before reviews existed
            frame = frame.assign(review="")
        frames.append(frame.assign(split=split))
    return pd.concat(frames, ignore_index=True)


def audit(
    images: pd.DataFrame,
    images_root: Path,
    class_names: list[str],
    params: AuditParams,
    weights: MobileNetParams,
    cache_path: Path | None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Label issues of `images` (path, class_name, label, sha256, split, review) and the audit report."""
    started = time.perf_counter()
    key = feature_key(params, weights)
    cached = read_feature_cache(cache_path, key) if cache_path else {}
    missing = [sha for sha in images["sha256"] if sha not in cached]
    if missing:
        paths = images.set_index("sha256").loc[missing, "path"]
        log.info("computing frozen features of %d images (%d cached)", len(missing), len(cached))
        computed = frozen_features([str(images_root / p) for p in paths], params.image_size, weights, params.batch_size)
        cached.update(zip(missing, computed, strict=True))
        if cache_path:
            write_feature_cache(cache_path, key, {sha: cached[sha] for sha in images["sha256"]})
    features = np.stack([cached[sha] for sha in images["sha256"]]).astype(np.float32)
    features_seconds = time.perf_counter() - started
    labels = images["label"].to_numpy()
    probabilities = out_of_fold_probabilities(features, labels, params.folds, params.seed, params.probe_c)
    issues, lab = find_issues(features, labels, probabilities)
    duplicate_sets = lab.get_info("near_duplicate")["near_duplicate_sets"]
    table = issue_table(images, issues, probabilities, class_names, duplicate_sets)
    report = audit_report(images, table, probabilities)
    report["feature_seconds"] = round(features_seconds, 1)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return table, report


def headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics of an audit report: a few scalars (issues by type, how many still to review, time)."""
    return {
        "out_of_fold_accuracy": report["out_of_fold_accuracy"],
        "label_issues": report["issues"]["label"],
        "outliers": report["issues"]["outlier"],
        "near_duplicates": report["issues"]["near_duplicate"],
        "issues_not_reviewed": sum(report["issues_not_reviewed"].values()),
        "seconds": report["seconds"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.audit_labels", description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=Path, required=True, help="folder with train/val/test.csv, class_names.json")
    parser.add_argument("--images", type=Path, required=True, help="root the split paths are relative to")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--feature-cache", type=Path, default=None, help=".npz of features per sha256 (reused)")
    parser.add_argument("--issues", type=Path, required=True, help="output CSV, one row per (image, issue type)")
    parser.add_argument("--metrics", type=Path, required=True, help="output: issue counts (DVC metrics)")
    parser.add_argument("--report", type=Path, default=None, help="output: issue counts per split and class")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    params, weights = load_audit_params(args.params)
    class_names = json.loads((args.splits / "class_names.json").read_text(encoding="utf-8"))
    images = load_split_frames(args.splits)
    table, report = audit(images, args.images, class_names, params, weights, args.feature_cache)
    atomic_write_text(args.issues, table.to_csv(index=False))
    if args.report is not None:
        atomic_write_json(args.report, report)
    atomic_write_json(args.metrics, headline_metrics(report))
    log.info(
        "%d images, out-of-fold accuracy %.3f: %s (not yet reviewed: %s) -> %s",
        report["n_images"],
        report["out_of_fold_accuracy"],
        report["issues"],
        report["issues_not_reviewed"],
        args.issues,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, expected=(WeightsError,)))
