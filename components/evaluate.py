"""Evaluate step: score the trained model on the held-out test split, and choose its "not sure" threshold.

On the test split's labels (`test.csv`: the reviewed labels once preprocess applies labels/reviews.csv):
accuracy, macro F1, per-class precision/recall/F1, top-k accuracy, expected calibration error, the
majority-class baseline on the same split, the most confused class pairs, and a confusion matrix as a
CSV (one row per image: actual,predicted, what DVC's confusion template reads) and a PNG. When
`test_original.csv` exists (every test image with its original folder label), the same figures on those
labels go under `original_labels`, for continuity.

All of it goes to the evaluation report (`--report`, what the gate judges and export puts in the model
card); the DVC metrics file (`--metrics`) holds only the headline figures, accuracy and macro F1 first;
per-class precision/recall/F1 also go to a CSV for a DVC bar plot (`--per-class-csv`).

The "not sure" threshold is chosen on val, never on test: the lowest top-1 probability whose selective
accuracy (accuracy among the images at or above it) reaches `evaluate.target_precision`, i.e. the
largest coverage that keeps that precision. Export puts it in the model, so every model version brings
its own. Coverage and selective accuracy at that threshold are reported for val and test, with the
test split's risk-coverage curve as a CSV (coverage, selective_accuracy, threshold) and a PNG.
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from common.cli import require_file, run_main
from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from common.params import load_section
from serving.contract import RESIZE_LAYER

if TYPE_CHECKING:
    from common.data import Split

log = logging.getLogger("components.evaluate")

THRESHOLD_SPLIT = "val"  # the not-sure threshold is chosen here; the test split only reports it
ORIGINAL_SUFFIX = "_original"  # <split>_original.csv: the same images with their original folder labels
PER_CLASS_COLUMNS = ("recall", "precision", "f1", "support")  # the per-class CSV, after its class column


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 64
    top_k: int = 3
    ece_bins: int = 15
    most_confused: int = 10  # how many (actual, predicted) pairs to report
    target_precision: float = 0.95  # selective accuracy on val the not-sure threshold is chosen for

    def __post_init__(self) -> None:
        if not 0.0 < self.target_precision <= 1.0:
            raise ValueError(f"evaluate.target_precision must be in (0, 1], got {self.target_precision}")


@dataclass(frozen=True)
class NotSureThreshold:
    """The chosen threshold and what it gives on the split it was chosen on."""

    threshold: float
    coverage: float  # share of images with top-1 probability >= threshold
    selective_accuracy: float  # accuracy among those images
    target_reached: bool


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


def top_k_accuracy(labels: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the k most probable."""
    num_classes = probabilities.shape[1]
    if k >= num_classes:
        return 1.0
    if num_classes == 2:  # k == 1; scikit-learn reads a two-column score of a binary problem as an error
        return float(accuracy_score(labels, probabilities.argmax(axis=1)))
    return float(top_k_accuracy_score(labels, probabilities, k=k, labels=np.arange(num_classes)))


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
    every_class = np.arange(num_classes)
    matrix = confusion_matrix(labels, predictions, labels=every_class)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=every_class, zero_division=0
    )
    present = np.flatnonzero(support > 0)  # macro averages over the classes this split contains
    macro_precision, macro_recall, macro_f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=present, average="macro", zero_division=0
    )
    k = min(params.top_k, num_classes)
    majority = int(np.argmax(np.bincount(labels, minlength=num_classes)))
    worst = int(present[np.argmin(recall[present])])
    off_diagonal = [
        (int(matrix[a, p]), class_names[a], class_names[p])
        for a in range(num_classes)
        for p in range(num_classes)
        if a != p and matrix[a, p] > 0
    ]
    off_diagonal.sort(key=lambda item: (-item[0], item[1], item[2]))
    return {
        "images": int(len(labels)),
        "accuracy": round(float(accuracy_score(labels, predictions)), 6),
        "macro_f1": round(float(macro_f1), 6),
        "macro_precision": round(float(macro_precision), 6),
        "macro_recall": round(float(macro_recall), 6),
        "top_k": k,
        "top_k_accuracy": round(top_k_accuracy(labels, probabilities, k), 6),
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


# ----- selective prediction: the "not sure" threshold ---------------------------------------------------
def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> pd.DataFrame:
    """Coverage and selective accuracy for every distinct top-1 probability used as the threshold.

    A threshold t admits the images with confidence >= t; rows go from the highest threshold (least
    coverage) to the lowest (coverage 1.0). Columns: coverage, selective_accuracy, threshold.
    """
    if len(confidence) == 0 or len(confidence) != len(correct):
        raise ValueError(f"need as many confidences as correctness flags, at least one ({len(confidence)})")
    order = np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")
    ranked = np.asarray(confidence, dtype=np.float64)[order]
    covered = np.arange(1, len(ranked) + 1)
    accuracy = np.cumsum(np.asarray(correct, dtype=np.float64)[order]) / covered
    last_of_tie = np.r_[ranked[1:] != ranked[:-1], True]  # a threshold admits every image of equal confidence
    return pd.DataFrame(
        {
            "coverage": covered[last_of_tie] / len(ranked),
            "selective_accuracy": accuracy[last_of_tie],
            "threshold": ranked[last_of_tie],
        }
    )


def choose_not_sure_threshold(confidence: np.ndarray, correct: np.ndarray, target_precision: float) -> NotSureThreshold:
    """The lowest threshold whose selective accuracy reaches `target_precision` (the largest coverage).

    When none reaches it, the threshold with the best selective accuracy (the largest coverage among
    equals), with `target_reached` False. The threshold is floored to 6 decimals, so every image it was
    chosen on stays at or above the stored value.
    """
    curve = risk_coverage(confidence, correct)
    reaching = curve[curve["selective_accuracy"] >= target_precision - 1e-12]
    if len(reaching):
        row = reaching.iloc[-1]
    else:
        best = curve["selective_accuracy"].max()
        row = curve[curve["selective_accuracy"] >= best - 1e-12].iloc[-1]
    threshold = math.floor(float(row["threshold"]) * 1e6) / 1e6
    return NotSureThreshold(threshold, float(row["coverage"]), float(row["selective_accuracy"]), bool(len(reaching)))


def selective_figures(confidence: np.ndarray, correct: np.ndarray, threshold: float) -> dict[str, Any]:
    """Coverage and selective accuracy at `threshold` (None when no image reaches it)."""
    admitted = np.asarray(confidence) >= threshold
    covered = int(admitted.sum())
    return {
        "images": int(len(admitted)),
        "covered": covered,
        "coverage": round(covered / len(admitted), 6),
        "selective_accuracy": round(float(np.asarray(correct)[admitted].mean()), 6) if covered else None,
    }


def correctness(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 probability, top-1 is the label) per image."""
    return probabilities.max(axis=1), probabilities.argmax(axis=1) == labels


def not_sure_report(
    choice: NotSureThreshold,
    target_precision: float,
    chosen_on: dict[str, Any],
    reported_on: dict[str, Any],
    split: str,
) -> dict[str, Any]:
    """The `selective` section of the metrics: the target, whether val reached it, and both splits' figures."""
    report: dict[str, Any] = {
        "target_precision": target_precision,
        "chosen_on": THRESHOLD_SPLIT,
        "target_reached": choice.target_reached,
        THRESHOLD_SPLIT: chosen_on,
        split: reported_on,
    }
    if not choice.target_reached:
        report["note"] = (
            f"no threshold reaches a selective accuracy of {target_precision:.3f} on {THRESHOLD_SPLIT}: using the "
            f"one with the best, {choice.selective_accuracy:.3f} at coverage {choice.coverage:.3f}"
        )
    return report


def headline_metrics(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics of an evaluation: scalars only, in the order `dvc metrics show` and `dvc exp show` print
    them (accuracy and macro F1 first). Selective accuracy and coverage are at the not-sure threshold."""
    at_threshold = evaluation["selective"][evaluation["split"]]
    return {
        "accuracy": evaluation["accuracy"],
        "macro_f1": evaluation["macro_f1"],
        "worst_class_recall": evaluation["worst_class_recall"],
        "worst_class": evaluation["worst_class"],
        "top_k_accuracy": evaluation["top_k_accuracy"],
        "ece": evaluation["ece"],
        "not_sure_threshold": evaluation["not_sure_threshold"],
        "selective_accuracy": at_threshold["selective_accuracy"],
        "coverage": at_threshold["coverage"],
        "images": evaluation["images"],
    }


def per_class_rows(evaluation: dict[str, Any]) -> pd.DataFrame:
    """One row per class (class, recall, precision, f1, support): the DVC bar plot of per-class figures."""
    return pd.DataFrame(
        [
            {"class": name, **{k: figures[k] for k in PER_CLASS_COLUMNS}}
            for name, figures in evaluation["per_class"].items()
        ],
        columns=["class", *PER_CLASS_COLUMNS],
    )


def predict_probabilities(model: Any, split: Split, batch_size: int) -> np.ndarray:
    """Class probabilities for every image of `split`, in manifest order."""
    from common.data import batches, image_dataset  # TensorFlow: only where images are read

    image_size = int(model.get_layer(RESIZE_LAYER).height)
    dataset = batches(image_dataset(split, image_size), batch_size).map(lambda x, y: x)
    return np.asarray(model.predict(dataset, verbose=0), dtype=np.float64)


def confusion_rows(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """One row per image (actual, predicted class names): the input of DVC's confusion template, which dvc.yaml
    draws with actual on y (rows) and predicted on x (columns), the layout of confusion_png."""
    names = np.asarray(class_names, dtype=object)
    return pd.DataFrame({"actual": names[labels], "predicted": names[predictions]})


def confusion_png(matrix: np.ndarray, class_names: list[str], title: str) -> bytes:
    """The confusion matrix (`matrix[actual, predicted]`, scikit-learn's layout) as a PNG: counts in cells,
    rows = actual on y, columns = predicted on x, as dvc.yaml draws the CSV."""
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


def risk_coverage_png(curve: pd.DataFrame, threshold: float, target_precision: float, title: str) -> bytes:
    """Selective accuracy against coverage, with the target and the operating point of the chosen threshold."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5), dpi=100)
    axes.plot(curve["coverage"], curve["selective_accuracy"], color="tab:blue", label="selective accuracy")
    axes.axhline(target_precision, color="tab:gray", linestyle="--", label=f"target {target_precision:.2f}")
    admitted = curve[curve["threshold"] >= threshold]
    if len(admitted):
        point = admitted.iloc[-1]
        axes.plot(
            [point["coverage"]], [point["selective_accuracy"]], "o", color="tab:red",
            label=f"not-sure threshold {threshold:.3f}: coverage {point['coverage']:.2f}",
        )  # fmt: skip
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(max(0.0, float(curve["selective_accuracy"].min()) - 0.05), 1.01)
    axes.set_xlabel("coverage (share of images at or above the threshold)")
    axes.set_ylabel("accuracy among them")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(figure)
    return buffer.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help=".keras file written by train")
    parser.add_argument(
        "--splits",
        type=Path,
        required=True,
        help="folder with class_names.json, val.csv (the threshold is chosen on it), test.csv and, "
        "optionally, test_original.csv",
    )
    parser.add_argument("--split", default="test", help="which split CSV to score (default test)")
    parser.add_argument("--images", type=Path, required=True, help="root the split paths are relative to")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--metrics", type=Path, required=True, help="output: the headline figures (DVC metrics)")
    parser.add_argument(
        "--report", type=Path, required=True, help="output: the whole evaluation JSON (what the gate judges)"
    )
    parser.add_argument(
        "--per-class-csv", type=Path, default=None, help="output: class,recall,precision,f1,support per class"
    )
    parser.add_argument("--confusion-csv", type=Path, required=True, help="output: actual,predicted per image")
    parser.add_argument("--confusion-png", type=Path, required=True)
    parser.add_argument(
        "--risk-coverage-csv", type=Path, default=None, help="output: coverage,selective_accuracy,threshold"
    )
    parser.add_argument("--risk-coverage-png", type=Path, default=None, help="output: the risk-coverage curve")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    params = load_section(EvaluateParams, "evaluate", args.params)

    import keras

    from common.data import read_split, unlabelled

    class_names = json.loads((args.splits / "class_names.json").read_text(encoding="utf-8"))
    model = keras.models.load_model(require_file(args.model, "model", "run the train stage first"), compile=False)
    val = read_split(args.splits / f"{THRESHOLD_SPLIT}.csv", args.images, class_names)
    split = read_split(args.splits / f"{args.split}.csv", args.images, class_names)
    original_csv = args.splits / f"{args.split}{ORIGINAL_SUFFIX}.csv"
    original = read_split(original_csv, args.images, class_names) if original_csv.is_file() else None
    if original is None:
        log.info("no %s: the original_labels section is skipped", original_csv)

    val_probabilities = predict_probabilities(model, val, params.batch_size)
    # The original-label file repeats the split's images: predict each distinct image once.
    paths = list(dict.fromkeys(split.paths + (original.paths if original is not None else [])))
    every = predict_probabilities(model, unlabelled(paths), params.batch_size)
    row_of = {path: row for row, path in enumerate(paths)}
    probabilities = every[[row_of[p] for p in split.paths]]

    choice = choose_not_sure_threshold(*correctness(val.labels, val_probabilities), params.target_precision)
    threshold = choice.threshold
    confidence, correct = correctness(split.labels, probabilities)
    evaluation: dict[str, Any] = {
        "split": args.split,
        **classification_metrics(split.labels, probabilities, class_names, params),
        "not_sure_threshold": threshold,
        "selective": not_sure_report(
            choice,
            params.target_precision,
            selective_figures(*correctness(val.labels, val_probabilities), threshold),
            selective_figures(confidence, correct, threshold),
            args.split,
        ),
    }
    if original is not None:
        original_probabilities = every[[row_of[p] for p in original.paths]]
        evaluation["original_labels"] = {
            "labels_file": original_csv.name,
            **classification_metrics(original.labels, original_probabilities, class_names, params),
            "selective": selective_figures(*correctness(original.labels, original_probabilities), threshold),
        }

    predictions = probabilities.argmax(axis=1)
    atomic_write_text(args.confusion_csv, confusion_rows(split.labels, predictions, class_names).to_csv(index=False))
    matrix = confusion_matrix(split.labels, predictions, labels=np.arange(len(class_names)))
    title = f"{args.split}: accuracy {evaluation['accuracy']:.3f}, macro F1 {evaluation['macro_f1']:.3f}"
    atomic_write_bytes(args.confusion_png, confusion_png(matrix, class_names, title))
    curve = risk_coverage(confidence, correct)
    reported = evaluation["selective"][args.split]
    if args.risk_coverage_csv is not None:
        atomic_write_text(args.risk_coverage_csv, curve.round(6).to_csv(index=False))
    if args.risk_coverage_png is not None:
        curve_title = (
            f"{args.split} risk-coverage: threshold {threshold:.3f} (chosen on {THRESHOLD_SPLIT}) keeps "
            f"{reported['coverage']:.0%}"
        )
        atomic_write_bytes(
            args.risk_coverage_png, risk_coverage_png(curve, threshold, params.target_precision, curve_title)
        )
    if args.per_class_csv is not None:
        atomic_write_text(args.per_class_csv, per_class_rows(evaluation).to_csv(index=False))
    atomic_write_json(args.report, evaluation)
    atomic_write_json(args.metrics, headline_metrics(evaluation))
    log.info(
        "%s: accuracy %.4f, macro F1 %.4f, worst recall %.2f (%s), majority baseline %.4f -> %s, %s",
        args.split,
        evaluation["accuracy"],
        evaluation["macro_f1"],
        evaluation["worst_class_recall"],
        evaluation["worst_class"],
        evaluation["majority_baseline_accuracy"],
        args.metrics,
        args.report,
    )
    log.info(
        "not-sure threshold %.4f (chosen on %s for precision %.2f%s): %s coverage %.3f, selective accuracy %s",
        threshold,
        THRESHOLD_SPLIT,
        params.target_precision,
        "" if choice.target_reached else ", NOT reached",
        args.split,
        reported["coverage"],
        reported["selective_accuracy"],
    )
    if original is not None:
        log.info(
            "%s on original labels: accuracy %.4f, macro F1 %.4f (%d images)",
            args.split,
            evaluation["original_labels"]["accuracy"],
            evaluation["original_labels"]["macro_f1"],
            evaluation["original_labels"]["images"],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
