"""Evaluate step: score the trained model on the held-out test split.

Accuracy, macro F1, per-class precision/recall/F1, top-k accuracy, expected calibration error,
the majority-class baseline on the same split, the most confused class pairs, and a confusion
matrix as a CSV (one row per image: actual,predicted, what DVC's confusion template reads) and
a PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from components.common.params import load_section

log = logging.getLogger("components.evaluate")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 64
    top_k: int = 3
    ece_bins: int = 15
    most_confused: int = 10  # how many (actual, predicted) pairs to report


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """matrix[actual, predicted] = count."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], params: EvaluateParams
) -> dict[str, Any]:
    """Every number the gate and the README report, from true labels and predicted probabilities."""
    num_classes = len(class_names)
    if probabilities.shape != (len(labels), num_classes):
        raise ValueError(f"probabilities have shape {probabilities.shape}, expected {(len(labels), num_classes)}")
    if len(labels) == 0:
        raise ValueError("cannot evaluate on an empty split")
    predictions = probabilities.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, num_classes)
    true_positive = np.diag(matrix).astype(float)
    support = matrix.sum(axis=1).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    precision = np.divide(true_positive, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros(num_classes), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_classes), where=precision + recall > 0)
    present = support > 0  # macro averages over the classes this split contains
    k = min(params.top_k, num_classes)
    top_k = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    majority = int(np.argmax(np.bincount(labels, minlength=num_classes)))
    worst = int(np.argmin(np.where(present, recall, np.inf)))
    off_diagonal = [
        (int(matrix[a, p]), class_names[a], class_names[p])
        for a in range(num_classes)
        for p in range(num_classes)
        if a != p and matrix[a, p] > 0
    ]
    off_diagonal.sort(key=lambda item: (-item[0], item[1], item[2]))
    return {
        "images": int(len(labels)),
        "accuracy": round(float((predictions == labels).mean()), 6),
        "macro_f1": round(float(f1[present].mean()), 6),
        "macro_precision": round(float(precision[present].mean()), 6),
        "macro_recall": round(float(recall[present].mean()), 6),
        "top_k": k,
        "top_k_accuracy": round(float((top_k == labels[:, None]).any(axis=1).mean()), 6),
        "ece": round(expected_calibration_error(labels, probabilities, params.ece_bins), 6),
        "mean_confidence": round(float(probabilities.max(axis=1).mean()), 6),
        "majority_class": class_names[majority],
        "majority_baseline_accuracy": round(float((labels == majority).mean()), 6),
        "worst_class": class_names[worst],
        "worst_class_recall": round(float(recall[worst]), 6),
        "per_class": {
            name: {
                "precision": round(float(precision[i]), 6),
                "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "most_confused": [
            {"actual": actual, "predicted": predicted_name, "count": count}
            for count, actual, predicted_name in off_diagonal[: params.most_confused]
        ],
    }


def predict_probabilities(model: Any, split: Any, batch_size: int) -> np.ndarray:
    """Class probabilities for every image of `split`, in manifest order."""
    from components.model import RESIZE_LAYER
    from components.train import batches, image_dataset

    image_size = int(model.get_layer(RESIZE_LAYER).height)
    dataset = batches(image_dataset(split, image_size), batch_size).map(lambda x, y: x)
    return np.asarray(model.predict(dataset, verbose=0), dtype=np.float64)


def confusion_rows(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """One row per image (actual, predicted class names): the input of DVC's confusion template."""
    names = np.asarray(class_names, dtype=object)
    return pd.DataFrame({"actual": names[labels], "predicted": names[predictions]})


def confusion_png(matrix: np.ndarray, class_names: list[str], title: str) -> bytes:
    """The confusion matrix as a PNG (counts in cells, rows = actual)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 8), dpi=100)
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    axes.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, column), count in np.ndenumerate(matrix):
        if count:
            colour = "white" if count > threshold else "black"
            axes.text(column, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(figure)
    return buffer.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help=".keras file written by train")
    parser.add_argument("--splits", type=Path, required=True, help="folder with test.csv and class_names.json")
    parser.add_argument("--split", default="test", help="which split CSV to score (default test)")
    parser.add_argument("--images", type=Path, required=True, help="root the split paths are relative to")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--metrics", type=Path, required=True, help="output metrics JSON")
    parser.add_argument("--confusion-csv", type=Path, required=True, help="output: actual,predicted per image")
    parser.add_argument("--confusion-png", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    params = load_section(EvaluateParams, "evaluate", args.params)

    import keras

    from components.train import read_split

    class_names = json.loads((args.splits / "class_names.json").read_text(encoding="utf-8"))
    split = read_split(args.splits / f"{args.split}.csv", args.images, class_names)
    model = keras.models.load_model(args.model, compile=False)
    probabilities = predict_probabilities(model, split, params.batch_size)
    metrics = {"split": args.split, **classification_metrics(split.labels, probabilities, class_names, params)}
    predictions = probabilities.argmax(axis=1)
    atomic_write_text(args.confusion_csv, confusion_rows(split.labels, predictions, class_names).to_csv(index=False))
    matrix = confusion_matrix(split.labels, predictions, len(class_names))
    title = f"{args.split}: accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}"
    atomic_write_bytes(args.confusion_png, confusion_png(matrix, class_names, title))
    atomic_write_json(args.metrics, metrics)
    log.info(
        "%s: accuracy %.4f, macro F1 %.4f, worst recall %.2f (%s), majority baseline %.4f -> %s",
        args.split,
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["worst_class_recall"],
        metrics["worst_class"],
        metrics["majority_baseline_accuracy"],
        args.metrics,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
