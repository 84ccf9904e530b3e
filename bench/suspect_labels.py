"""Suspect labels: the train+val images a cross-validated model is most confidently wrong about.

Every image gets an out-of-fold prediction (k-fold over train+val: the model that scores an image
never saw it), from a logistic regression on frozen ImageNet MobileNetV2 features (the default
backbone and image size of `train:`, original + mirrored image), cheap enough for 2 cores.
Images whose prediction differs from their folder's class are listed, most confident first, in
reports/suspect_labels.csv (path, given_class, predicted_class, confidence, ...) for a person to
review for dataset v2. Nothing is dropped or relabelled here.

    python -m bench.suspect_labels [--params params.yaml] [--folds 5] [--output reports/suspect_labels.csv]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.suspect_labels")


def frozen_features(paths: list[str], labels: np.ndarray, params) -> np.ndarray:  # noqa: ANN001
    """Pooled MobileNetV2 features of each image and its mirror image, concatenated."""
    import tensorflow as tf

    from components.model import mobilenet_v2_base
    from components.train import Split, batches, image_dataset, set_determinism

    set_determinism(params.seed)
    base = mobilenet_v2_base(params.image_size, params.mobilenet_v2)
    images = batches(image_dataset(Split(paths, labels), params.image_size), 64).map(lambda x, y: x / 127.5 - 1.0)
    plain = base.predict(images, verbose=0)
    mirrored = base.predict(images.map(tf.image.flip_left_right), verbose=0)
    return np.concatenate([plain, mirrored], axis=1)


def linear_probe(c: float = 0.01, class_weight: str | None = None):  # noqa: ANN201
    """Standardised features -> multinomial logistic regression: a cheap, deterministic head on frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight=class_weight))


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return cross_val_predict(linear_probe(), features, labels, cv=splitter, method="predict_proba")


def suspects(frame: pd.DataFrame, probabilities: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Rows whose out-of-fold prediction is not their given class, most confident first."""
    predicted = probabilities.argmax(axis=1)
    given = frame["label"].to_numpy()
    table = pd.DataFrame(
        {
            "path": frame["path"],
            "given_class": frame["class_name"],
            "predicted_class": [class_names[i] for i in predicted],
            "confidence": probabilities.max(axis=1).round(4),
            "given_class_probability": probabilities[np.arange(len(given)), given].round(4),
            "split": frame["split"],
        }
    )
    wrong = table[predicted != given]
    return wrong.sort_values(["confidence", "path"], ascending=[False, True]).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m bench.suspect_labels", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--splits", type=Path, default=REPO_ROOT / "artifacts" / "splits")
    parser.add_argument("--images", type=Path, default=REPO_ROOT / "data" / "images")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "reports" / "suspect_labels.csv")
    args = parser.parse_args(argv)

    from components.common.io import atomic_write_text
    from components.train import load_train_params

    params = load_train_params(args.params)
    if params.mobilenet_v2 is None:
        raise SystemExit("train.mobilenet_v2 is needed for the frozen features")
    class_names = json.loads((args.splits / "class_names.json").read_text(encoding="utf-8"))
    frame = pd.concat(
        [pd.read_csv(args.splits / f"{s}.csv").assign(split=s) for s in ("train", "val")], ignore_index=True
    )
    started = time.perf_counter()
    features = frozen_features([str(args.images / p) for p in frame["path"]], frame["label"].to_numpy(), params)
    probabilities = out_of_fold_probabilities(features, frame["label"].to_numpy(), args.folds, params.seed)
    accuracy = float((probabilities.argmax(axis=1) == frame["label"].to_numpy()).mean())
    table = suspects(frame, probabilities, class_names)
    atomic_write_text(args.output, table.to_csv(index=False))
    confident = int((table["confidence"] >= 0.8).sum())
    log.info(
        "%d-fold out-of-fold accuracy %.3f on %d train+val images; %d disagree with their label "
        "(%d with confidence >= 0.8) -> %s (%.0f s)",
        args.folds,
        accuracy,
        len(frame),
        len(table),
        confident,
        args.output,
        time.perf_counter() - started,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
