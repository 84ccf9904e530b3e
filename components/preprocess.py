"""Preprocess step: split the validated manifest into train/val/test by content hash.

An image's split is a pure function of its bytes (sha256) and a fixed salt, so adding or
removing other images never moves it across splits: no test-set leakage after a data update,
and the same data always gives the same splits. Hashing within each class keeps the splits
stratified up to sampling noise.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from components.common.io import atomic_directory, atomic_write_json
from components.common.params import load_section

log = logging.getLogger("components.preprocess")

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ["path", "class_name", "label", "sha256"]


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


def make_splits(manifest: pd.DataFrame, params: PreprocessParams) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Assign each usable image to a split; returns the split tables and the sorted class names."""
    images = usable_images(manifest)
    class_names = sorted(images["class_name"].unique())
    label_of = {name: index for index, name in enumerate(class_names)}
    images = images.assign(
        label=images["class_name"].map(label_of).astype("int64"),
        split=[split_of(sha, params) for sha in images["sha256"]],
    )
    splits = {
        name: images[images["split"] == name][SPLIT_COLUMNS].sort_values("path").reset_index(drop=True)
        for name in SPLITS
    }
    return splits, class_names


def split_metrics(splits: dict[str, pd.DataFrame], class_names: list[str]) -> dict[str, Any]:
    total = sum(len(frame) for frame in splits.values())
    return {
        "n_images": total,
        "n_classes": len(class_names),
        "split_sizes": {name: len(frame) for name, frame in splits.items()},
        "split_fractions": {name: round(len(frame) / total, 4) if total else 0.0 for name, frame in splits.items()},
        "per_class": {
            name: {c: int((frame["class_name"] == c).sum()) for c in class_names} for name, frame in splits.items()
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="manifest CSV written by validate")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--output", type=Path, required=True, help="folder for {train,val,test}.csv")
    parser.add_argument("--metrics", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    params = load_section(PreprocessParams, "preprocess", args.params)
    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    splits, class_names = make_splits(manifest, params)
    if any(frame.empty for frame in splits.values()):
        raise SystemExit(f"a split is empty ({ {k: len(v) for k, v in splits.items()} }): too few images")
    with atomic_directory(args.output) as staging:
        for name, frame in splits.items():
            frame.to_csv(staging / f"{name}.csv", index=False)
        atomic_write_json(staging / "class_names.json", class_names)
    metrics = split_metrics(splits, class_names)
    atomic_write_json(args.metrics, metrics)
    log.info("splits %s over %d classes -> %s", metrics["split_sizes"], len(class_names), args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
