"""Preprocess step: split the validated manifest into train/val/test by content hash, reviewed labels applied.

An image's split is a pure function of its bytes (sha256) and a fixed salt, so adding or
removing other images never moves it across splits: no test-set leakage after a data update,
and the same data always gives the same splits. Hashing within each class keeps the splits
stratified up to sampling noise. Reviewed labels (labels/reviews.csv) relabel or exclude images
after the split is decided, so a review never moves an image to another split. test_original.csv
keeps every test image with its folder's label, for figures comparable with earlier runs.

The DVC metrics (`--metrics`) are the split sizes and how many labels the review changed; the report
(`--report`) adds the split fractions, images per class and split, and the review outcomes per given class.
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from common.cli import run_main
from common.io import atomic_directory, atomic_write_json
from common.params import load_section
from common.reviews import EXCLUDE_DECISIONS, apply_reviews, empty_reviews, read_reviews, review_counts

log = logging.getLogger("components.preprocess")

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["path", "class_name", "label", "sha256", "given_class_name", "review"]


@dataclass(frozen=True)
class PreprocessParams:
    val_fraction: float
    test_fraction: float
    split_salt: str

    def __post_init__(self) -> None:
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in (0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave room for a training split")


def hash_fraction(sha256: str, salt: str) -> float:
    """Map an image's content hash to a stable number in [0, 1)."""
    digest = hashlib.sha256(f"{salt}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(sha256: str, params: PreprocessParams) -> str:
    position = hash_fraction(sha256, params.split_salt)
    if position < params.test_fraction:
        return "test"
    if position < params.test_fraction + params.val_fraction:
        return "val"
    return "train"


def usable_images(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows that validate accepted as images inside a class folder; one row per (class, content)."""
    decodes = manifest["decodes"].astype(str).str.lower() == "true"
    in_class = manifest["in_class_folder"].astype(str).str.lower() == "true"
    usable = manifest[decodes & in_class]
    # Exact duplicates within a class would land in the same split anyway; keep one so they don't
    # count twice in training or evaluation.
    return usable.sort_values("path").drop_duplicates(["class_name", "sha256"], keep="first")


@dataclass
class Splits:
    """The split tables (reviewed labels), the test split with its folder labels, and what reviews removed."""

    splits: dict[str, pd.DataFrame]
    test_original: pd.DataFrame
    excluded: pd.DataFrame
    class_names: list[str]


def make_splits(manifest: pd.DataFrame, params: PreprocessParams, reviews: pd.DataFrame | None = None) -> Splits:
    """Assign each usable image to a split by its hash, then apply the reviewed labels."""
    images = usable_images(manifest)
    class_names = sorted(images["class_name"].unique())
    label_of = {name: index for index, name in enumerate(class_names)}
    images = images.assign(split=[split_of(sha, params) for sha in images["sha256"]])
    kept, excluded = apply_reviews(images, reviews if reviews is not None else empty_reviews())
    # An image filed under two folders and reviewed once ends up twice in one class: keep it once.
    kept = kept.sort_values("path").drop_duplicates(["class_name", "sha256"], keep="first")
    unknown = sorted(set(kept["class_name"]) - set(label_of))
    if unknown:
        raise ValueError(f"reviewed labels {unknown} are not classes of the dataset {class_names}")

    def table(frame: pd.DataFrame, split: str) -> pd.DataFrame:
        frame = frame[frame["split"] == split].assign(label=lambda f: f["class_name"].map(label_of).astype("int64"))
        return frame[SPLIT_COLUMNS].sort_values("path").reset_index(drop=True)

    original = images.assign(given_class_name=images["class_name"], review="")
    return Splits(
        splits={name: table(kept, name) for name in SPLITS},
        test_original=table(original, "test"),
        excluded=excluded[["path", "sha256", "split", "given_class_name", "review"]].sort_values("path"),
        class_names=class_names,
    )


def split_report(result: Splits) -> dict[str, Any]:
    """Everything about the splits: sizes, fractions, images per class and split, review outcomes."""
    splits, class_names = result.splits, result.class_names
    total = sum(len(frame) for frame in splits.values())
    kept = pd.concat(splits.values(), ignore_index=True)
    counts = review_counts(kept, result.excluded)
    return {
        "n_images": total,
        "n_classes": len(class_names),
        "split_sizes": {name: len(frame) for name, frame in splits.items()},
        "split_fractions": {name: round(len(frame) / total, 4) if total else 0.0 for name, frame in splits.items()},
        "per_class": {
            name: {c: int((frame["class_name"] == c).sum()) for c in class_names} for name, frame in splits.items()
        },
        "reviews": {
            "reviewed": int((kept["review"] != "").sum() + len(result.excluded)),
            "confirmed": sum(c["confirmed"] for c in counts.values()),
            "relabelled": sum(c["relabelled"] for c in counts.values()),
            **{decision: sum(c[decision] for c in counts.values()) for decision in EXCLUDE_DECISIONS},
            "reviewed_per_split": {
                name: int((frame["review"] != "").sum() + (result.excluded["split"] == name).sum())
                for name, frame in splits.items()
            },
            "per_given_class": counts,
        },
    }


def headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics of a split report: a few scalars (images per split, labels the review changed)."""
    reviews = report["reviews"]
    return {
        **{f"{name}_images": size for name, size in report["split_sizes"].items()},
        "relabelled": reviews["relabelled"],
        "excluded": sum(reviews[decision] for decision in EXCLUDE_DECISIONS),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="manifest CSV written by validate")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--reviews", type=Path, default=None, help="labels/reviews.csv (validated): relabel/exclude")
    parser.add_argument("--output", type=Path, required=True, help="folder for {train,val,test}.csv")
    parser.add_argument("--metrics", type=Path, required=True, help="output: images per split, labels reviewed away")
    parser.add_argument("--report", type=Path, default=None, help="output: the split report JSON (per class, ...)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    params = load_section(PreprocessParams, "preprocess", args.params)
    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    reviews = read_reviews(args.reviews) if args.reviews is not None else None
    result = make_splits(manifest, params, reviews)
    if any(frame.empty for frame in result.splits.values()):
        sizes = {k: len(v) for k, v in result.splits.items()}
        raise SystemExit(f"a split is empty ({sizes}): too few images")
    with atomic_directory(args.output) as staging:
        for name, frame in result.splits.items():
            frame.to_csv(staging / f"{name}.csv", index=False)
        result.test_original.to_csv(staging / "test_original.csv", index=False)
        result.excluded.to_csv(staging / "excluded.csv", index=False)
        atomic_write_json(staging / "class_names.json", result.class_names)
    report = split_report(result)
    if args.report is not None:
        atomic_write_json(args.report, report)
    atomic_write_json(args.metrics, headline_metrics(report))
    reviewed = report["reviews"]
    log.info(
        "splits %s over %d classes -> %s; reviews: %d confirmed, %d relabelled, %d excluded",
        report["split_sizes"],
        len(result.class_names),
        args.output,
        reviewed["confirmed"],
        reviewed["relabelled"],
        sum(reviewed[d] for d in EXCLUDE_DECISIONS),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
