"""What each training option buys, measured cheaply on frozen ImageNet MobileNetV2 features.

The default model's accuracy comes mostly from the frozen backbone (a head on cached features
reaches about what fine-tuning does), so the options that change the features -- input size,
alpha, ensembling the two alphas, flip test-time augmentation, aspect-preserving padding --
can be compared with one fixed, deterministic head (multinomial logistic regression, balanced
class weights) on the same splits, in one run, in minutes instead of one full training each.
Each row: val and test accuracy and macro F1, and the feature-extraction seconds; ratios are
against the first variant (the default: alpha 0.5, 224 px, squashed to square).

    python -m bench.train_options [--variants a050_224,a050_320,...] [--output reports/bench/train_options.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from keras.applications.mobilenet_v2 import preprocess_input

from common.data import AUTOTUNE, Split, image_dataset, read_split
from common.io import atomic_write_json, sha256_of_file
from common.params import load_params, section
from components.audit_labels import linear_probe
from components.model import MobileNetParams, mobilenet_v2_base

WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_224_no_top.h5"


@dataclass(frozen=True)
class FeatureSpec:
    """One backbone configuration: which alpha, input size, whether to pad to square, flip-average."""

    alpha: float
    size: int
    pad: bool = True  # letterbox to square (keeps the aspect ratio, the pipeline's decoding) instead of squashing
    flip_tta: bool = False  # features of the image and its mirror, averaged


VARIANTS: dict[str, list[FeatureSpec]] = {
    "a050_224": [FeatureSpec(0.5, 224)],
    "a035_224": [FeatureSpec(0.35, 224)],
    "a050_288": [FeatureSpec(0.5, 288)],
    "a050_320": [FeatureSpec(0.5, 320)],
    "a050_224_squash": [FeatureSpec(0.5, 224, pad=False)],
    "a050_224_flip": [FeatureSpec(0.5, 224, flip_tta=True)],
    "a035+a050_224": [FeatureSpec(0.35, 224), FeatureSpec(0.5, 224)],
    "a035+a050_288": [FeatureSpec(0.35, 288), FeatureSpec(0.5, 288)],
    "a050_224+320": [FeatureSpec(0.5, 224), FeatureSpec(0.5, 320)],
}


def _squashed(path: tf.Tensor, size: int) -> tf.Tensor:
    """The pre-letterbox decoding: stretched to a square (the aspect ratio is lost)."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=True)


def features(split: Split, spec: FeatureSpec, weights: MobileNetParams) -> np.ndarray:
    """Global-average-pooled MobileNetV2 features of every image in `split`, in manifest order."""
    base = mobilenet_v2_base(spec.size, weights)
    if spec.pad:  # the training pipeline's own decoding (letterboxed)
        pixels = image_dataset(split, spec.size).map(lambda x, y: x)
    else:
        pixels = tf.data.Dataset.from_tensor_slices(split.paths).map(lambda p: _squashed(p, spec.size))
    scaled = pixels.batch(64).map(preprocess_input).prefetch(AUTOTUNE)
    out = base.predict(scaled, verbose=0)
    if spec.flip_tta:
        out = (out + base.predict(scaled.map(tf.image.flip_left_right), verbose=0)) / 2.0
    return out


def head_scores(train: tuple[np.ndarray, np.ndarray], others: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Fit the fixed head on train features; accuracy and macro F1 on each other split."""
    from sklearn.metrics import accuracy_score, f1_score

    head = linear_probe(c=0.05, class_weight="balanced").fit(*train)
    scores = {}
    for name, (x, y) in others.items():
        predicted = head.predict(x)
        scores[f"{name}_accuracy"] = round(float(accuracy_score(y, predicted)), 4)
        scores[f"{name}_macro_f1"] = round(float(f1_score(y, predicted, average="macro")), 4)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_options", description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=Path, default=Path("artifacts/splits"))
    parser.add_argument("--images", type=Path, default=Path("data/images"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--output", type=Path, default=Path("reports/bench/train_options.json"))
    args = parser.parse_args(argv)
    configured = section(load_params(args.params), "train")["mobilenet_v2"]
    weights_root = Path(configured["weights"]).parent
    class_names = json.loads((args.splits / "class_names.json").read_text(encoding="utf-8"))
    splits = {
        name: read_split(args.splits / f"{name}.csv", args.images, class_names) for name in ("train", "val", "test")
    }

    cache: dict[tuple[FeatureSpec, str], np.ndarray] = {}
    seconds: dict[FeatureSpec, float] = {}
    rows: list[dict[str, Any]] = []
    for variant in args.variants.split(","):
        specs = VARIANTS[variant]
        for spec in specs:
            if spec in seconds:
                continue
            path = weights_root / WEIGHTS_FILE.format(alpha=spec.alpha)
            weights = MobileNetParams(spec.alpha, str(path), sha256_of_file(path))  # the other alpha is not pinned
            started = time.perf_counter()
            for name, split in splits.items():
                cache[(spec, name)] = features(split, spec, weights)
            seconds[spec] = round(time.perf_counter() - started, 1)
        stacked = {
            name: (np.concatenate([cache[(s, name)] for s in specs], axis=1), splits[name].labels) for name in splits
        }
        row = {"variant": variant, "feature_seconds": sum(seconds[s] for s in specs)}
        row.update(head_scores(stacked["train"], {"val": stacked["val"], "test": stacked["test"]}))
        rows.append(row)
        print(json.dumps(row), flush=True)

    baseline = rows[0]
    print(f"\n{'variant':<16} {'val acc':>8} {'val F1':>8} {'test acc':>9} {'test F1':>8} {'x base':>7} {'feat s':>7}")
    for row in rows:
        ratio = row["test_accuracy"] / baseline["test_accuracy"]
        print(
            f"{row['variant']:<16} {row['val_accuracy']:>8.4f} {row['val_macro_f1']:>8.4f} "
            f"{row['test_accuracy']:>9.4f} {row['test_macro_f1']:>8.4f} {ratio:>7.3f} {row['feature_seconds']:>7.1f}"
        )
    atomic_write_json(args.output, {"baseline": baseline["variant"], "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
