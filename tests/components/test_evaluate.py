"""Evaluation numbers are right on hand-checked cases, the not-sure threshold is chosen on val for the target
precision, and the CLI writes what DVC, the gate and export read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from common.data import read_split
from components import evaluate
from components.evaluate import (
    EvaluateParams,
    choose_not_sure_threshold,
    classification_metrics,
    correctness,
    expected_calibration_error,
    predict_probabilities,
    risk_coverage,
    selective_figures,
)
from tests.conftest import REPO_ROOT
from tests.fixtures.training import SyntheticData

PARAMS = EvaluateParams(batch_size=8, top_k=2, ece_bins=10, most_confused=3)
NAMES = ["a", "b", "c"]


def test_metrics_on_a_hand_checked_example() -> None:
    labels = np.array([0, 0, 0, 1, 2, 2])
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],  # a -> a
            [0.6, 0.3, 0.1],  # a -> a
            [0.2, 0.7, 0.1],  # a -> b (a second)
            [0.1, 0.8, 0.1],  # b -> b
            [0.1, 0.2, 0.7],  # c -> c
            [0.5, 0.1, 0.4],  # c -> a (c second)
        ]
    )
    m = classification_metrics(labels, probabilities, NAMES, PARAMS)
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    assert m["top_k"] == 2 and m["top_k_accuracy"] == pytest.approx(1.0)
    third = pytest.approx(2 / 3, abs=1e-6)
    assert m["per_class"]["a"] == {"precision": third, "recall": third, "f1": third, "support": 3}
    assert m["per_class"]["c"]["recall"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 2 / 3) / 3, abs=1e-6)
    assert m["majority_class"] == "a" and m["majority_baseline_accuracy"] == pytest.approx(0.5)
    assert m["worst_class"] == "c" and m["worst_class_recall"] == pytest.approx(0.5)
    assert m["most_confused"] == [
        {"actual": "a", "predicted": "b", "count": 1},
        {"actual": "c", "predicted": "a", "count": 1},
    ]


def test_expected_calibration_error() -> None:
    labels = np.array([0, 0, 1, 1])
    # all predictions at confidence 0.9; half right -> |0.5 - 0.9| = 0.4
    probabilities = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    assert expected_calibration_error(labels, probabilities, 10) == pytest.approx(0.4)
    perfect = np.eye(2)[labels]
    assert expected_calibration_error(labels, perfect, 10) == pytest.approx(0.0)


def test_wrong_probability_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected"):
        classification_metrics(np.array([0, 1]), np.ones((2, 2)) / 2, NAMES, PARAMS)


def test_majority_model_scores_exactly_the_majority_baseline(majority_model_metrics: dict) -> None:
    assert majority_model_metrics["accuracy"] == majority_model_metrics["majority_baseline_accuracy"]
    assert majority_model_metrics["worst_class_recall"] == 0.0


# ----- the not-sure threshold ------------------------------------------------------------------------------
# Eight val images, most confident first; the 6th and 8th are wrong.
CONFIDENCE = np.array([0.99, 0.95, 0.90, 0.80, 0.70, 0.60, 0.50, 0.40])
CORRECT = np.array([True, True, True, True, True, False, True, False])


def test_threshold_is_the_lowest_that_reaches_the_target_precision() -> None:
    # Selective accuracy from the top: 1, 1, 1, 1, 1, 5/6, 6/7, 6/8.
    choice = choose_not_sure_threshold(CONFIDENCE, CORRECT, target_precision=0.85)
    assert choice.threshold == pytest.approx(0.50) and choice.target_reached
    assert choice.coverage == pytest.approx(7 / 8) and choice.selective_accuracy == pytest.approx(6 / 7)
    # 0.6 also reaches 0.80, but 0.5 covers one image more: the most coverage wins.
    assert choose_not_sure_threshold(CONFIDENCE, CORRECT, target_precision=0.80).threshold == pytest.approx(0.50)
    # 5/6 < 0.86 <= 1: only the thresholds above the first mistake keep it.
    choice = choose_not_sure_threshold(CONFIDENCE, CORRECT, target_precision=0.86)
    assert choice.threshold == pytest.approx(0.70) and choice.coverage == pytest.approx(5 / 8)
    # Every image when the whole split is precise enough.
    choice = choose_not_sure_threshold(CONFIDENCE, CORRECT, target_precision=0.75)
    assert choice.threshold == pytest.approx(0.40) and choice.coverage == 1.0


def test_threshold_keeps_every_image_of_equal_confidence_together() -> None:
    confidence = np.array([0.9, 0.9, 0.8, 0.8, 0.8, 0.7])
    correct = np.array([True, True, True, False, True, True])
    curve = risk_coverage(confidence, correct)
    assert list(curve["threshold"]) == [0.9, 0.8, 0.7]  # one row per distinct confidence, never half a tie
    assert list(curve["coverage"]) == pytest.approx([2 / 6, 5 / 6, 1.0])
    assert list(curve["selective_accuracy"]) == pytest.approx([1.0, 4 / 5, 5 / 6])
    assert choose_not_sure_threshold(confidence, correct, target_precision=0.81).threshold == pytest.approx(0.7)
    assert choose_not_sure_threshold(confidence, correct, target_precision=0.9).threshold == pytest.approx(0.9)


def test_unreachable_target_takes_the_best_selective_accuracy_and_says_so() -> None:
    confidence = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([False, True, True, False])  # from the top: 0, 1/2, 2/3, 2/4
    choice = choose_not_sure_threshold(confidence, correct, target_precision=0.95)
    assert not choice.target_reached
    assert choice.threshold == pytest.approx(0.7) and choice.selective_accuracy == pytest.approx(2 / 3)


def test_stored_threshold_never_drops_an_image_it_was_chosen_on() -> None:
    confidence = np.array([0.987654321, 0.5123456789])
    choice = choose_not_sure_threshold(confidence, np.array([True, True]), target_precision=0.95)
    assert choice.threshold == 0.512345  # floored to 6 decimals, not rounded up past the image
    assert selective_figures(confidence, np.array([True, True]), choice.threshold)["coverage"] == 1.0


def test_selective_figures_at_a_threshold() -> None:
    figures = selective_figures(CONFIDENCE, CORRECT, threshold=0.65)
    assert figures == {"images": 8, "covered": 5, "coverage": 0.625, "selective_accuracy": 1.0}
    assert selective_figures(CONFIDENCE, CORRECT, threshold=1.0)["selective_accuracy"] is None


def test_confusion_png_and_dvc_plot_both_put_actual_on_rows() -> None:
    """Every image of class a predicted as c: the PNG's one filled cell is top right (row a, column c), and
    dvc.yaml draws the CSV with actual on y and predicted on x, so the two read the same way."""
    import io

    import yaml
    from dvc_render.vega import VegaRenderer
    from PIL import Image
    from sklearn.metrics import confusion_matrix

    labels, predictions = np.zeros(50, dtype=int), np.full(50, 2)
    matrix = confusion_matrix(labels, predictions, labels=range(len(NAMES)))
    png = Image.open(io.BytesIO(evaluate.confusion_png(matrix, NAMES, "a predicted as c")))
    pixels = np.asarray(png.convert("RGB"), dtype=int)
    darkest_blue = np.array([8, 48, 107])  # matplotlib's Blues at the maximum count
    rows, columns = np.nonzero(np.abs(pixels - darkest_blue).sum(axis=2) < 30)
    height, width = pixels.shape[:2]
    assert columns.mean() > width / 2 and rows.mean() < height / 2, "the filled cell is not row a, column c"

    stage_plots = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]["plots"]
    properties = next(p for p in stage_plots if isinstance(p, dict) and "plots/evaluate/confusion.csv" in p)
    properties = {k: v for k, v in properties["plots/evaluate/confusion.csv"].items() if k != "cache"}
    points = evaluate.confusion_rows(labels, predictions, NAMES).assign(rev="workspace").to_dict("records")
    encoding = VegaRenderer(points, "confusion", **properties).get_filled_template()["spec"]["encoding"]
    assert (encoding["y"]["field"], encoding["x"]["field"]) == ("actual", "predicted")
    assert (encoding["y"]["title"], encoding["x"]["title"]) == ("actual", "predicted")  # the PNG's axis labels


# ----- the CLI ----------------------------------------------------------------------------------------------------
def run_cli(model_path: Path, splits: Path, images: Path, out: Path) -> dict[str, Path]:
    paths = {
        "metrics": out / "m" / "evaluate.json",
        "report": out / "r" / "evaluate.json",
        "per_class_csv": out / "p" / "per_class.csv",
        "confusion_csv": out / "p" / "confusion.csv",
        "confusion_png": out / "p" / "confusion.png",
        "risk_csv": out / "p" / "risk_coverage.csv",
        "risk_png": out / "p" / "risk_coverage.png",
    }
    argv = ["--model", str(model_path), "--splits", str(splits), "--images", str(images),
            "--params", str(REPO_ROOT / "params.yaml"), "--metrics", str(paths["metrics"]),
            "--report", str(paths["report"]), "--per-class-csv", str(paths["per_class_csv"]),
            "--confusion-csv", str(paths["confusion_csv"]), "--confusion-png", str(paths["confusion_png"]),
            "--risk-coverage-csv", str(paths["risk_csv"]), "--risk-coverage-png", str(paths["risk_png"])]  # fmt: skip
    assert evaluate.main(argv) == 0
    return paths


@pytest.fixture(scope="module")
def saved_model(separable_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("evaluate_model") / "model.keras"
    separable_model.save(path)
    return path


@pytest.fixture(scope="module")
def cli_outputs(saved_model: Path, synthetic_data: SyntheticData, tmp_path_factory: pytest.TempPathFactory):
    """What one CLI run on the synthetic splits wrote (the tests below read different files of it)."""
    return run_cli(saved_model, synthetic_data.splits, synthetic_data.images, tmp_path_factory.mktemp("evaluate_cli"))


def test_cli_writes_metrics_confusion_matrix_and_risk_coverage(
    cli_outputs: dict[str, Path], separable_model, synthetic_data: SyntheticData
) -> None:
    paths = cli_outputs
    written = json.loads(paths["report"].read_text())
    test_rows = pd.read_csv(synthetic_data.splits / "test.csv")
    assert written["split"] == "test" and written["images"] == len(test_rows)
    assert set(written["per_class"]) == set(synthetic_data.class_names)
    rows = pd.read_csv(paths["confusion_csv"])
    assert list(rows.columns) == ["actual", "predicted"]  # dvc.yaml: y (rows) actual, x (columns) predicted
    assert list(rows["actual"]) == list(test_rows["class_name"])
    assert (rows["actual"] == rows["predicted"]).mean() == pytest.approx(written["accuracy"])
    assert paths["confusion_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "original_labels" not in written  # no test_original.csv in these splits

    # The threshold is the one val gives, whatever test says.
    val = read_split(synthetic_data.splits / "val.csv", synthetic_data.images, synthetic_data.class_names)
    val_probabilities = predict_probabilities(separable_model, val, 32)
    target = EvaluateParams().target_precision
    expected = choose_not_sure_threshold(*correctness(val.labels, val_probabilities), target)
    assert written["not_sure_threshold"] == pytest.approx(expected.threshold, abs=1e-5)
    selective = written["selective"]
    assert selective["chosen_on"] == "val" and selective["target_precision"] == target
    assert selective["target_reached"] is expected.target_reached
    assert selective["val"]["images"] == len(val) and selective["test"]["images"] == len(test_rows)
    if expected.target_reached:
        assert selective["val"]["selective_accuracy"] >= target

    # The risk-coverage curve of test, and the reported test figures lie on it at the threshold.
    curve = pd.read_csv(paths["risk_csv"])
    assert list(curve.columns) == ["coverage", "selective_accuracy", "threshold"]
    assert curve["coverage"].is_monotonic_increasing and curve["threshold"].is_monotonic_decreasing
    assert curve["coverage"].iloc[-1] == pytest.approx(1.0)
    assert curve["selective_accuracy"].iloc[-1] == pytest.approx(written["accuracy"], abs=1e-5)
    at_threshold = curve[curve["threshold"] >= written["not_sure_threshold"] - 1e-6]
    if len(at_threshold):
        assert at_threshold["coverage"].iloc[-1] == pytest.approx(selective["test"]["coverage"], abs=1e-5)
    assert paths["risk_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_original_labels_when_test_original_exists(
    saved_model: Path, separable_model, synthetic_data: SyntheticData, tmp_path: Path
) -> None:
    splits = tmp_path / "splits"
    shutil.copytree(synthetic_data.splits, splits)
    reviewed = pd.read_csv(splits / "test.csv")
    # The original labels: two test images were filed under the wrong folder, and one was excluded by review.
    original = reviewed.copy()
    names = synthetic_data.class_names
    for row in (0, 1):
        wrong = names[(names.index(original.loc[row, "class_name"]) + 1) % len(names)]
        original.loc[row, ["class_name", "label"]] = [wrong, names.index(wrong)]
    excluded = pd.read_csv(splits / "val.csv").head(1)
    original = pd.concat([original, excluded], ignore_index=True)
    original.to_csv(splits / "test_original.csv", index=False)

    written = json.loads(run_cli(saved_model, splits, synthetic_data.images, tmp_path)["report"].read_text())
    section = written["original_labels"]
    assert section["labels_file"] == "test_original.csv" and section["images"] == len(original)
    assert sum(c["support"] for c in section["per_class"].values()) == len(original)
    original_split = read_split(splits / "test_original.csv", synthetic_data.images, names)
    expected = classification_metrics(
        original_split.labels,
        predict_probabilities(separable_model, original_split, 32),
        names,
        evaluate.load_section(EvaluateParams, "evaluate", REPO_ROOT / "params.yaml"),
    )
    for key in ("accuracy", "macro_f1", "top_k_accuracy", "ece", "worst_class_recall", "majority_baseline_accuracy"):
        assert section[key] == pytest.approx(expected[key], abs=1e-5), key
    assert section["selective"]["images"] == len(original)
    # The primary (top-level) figures stay those of the reviewed test.csv: what the gate reads.
    assert written["images"] == len(reviewed)


def test_cli_metrics_are_the_headline_scalars_and_per_class_figures_go_to_report_and_plot(
    cli_outputs: dict[str, Path], synthetic_data: SyntheticData
) -> None:
    """`dvc metrics show` / `dvc exp show` print metrics/evaluate.json as columns in key order: a handful of
    scalars, accuracy and macro F1 first; the per-class table is in the report and the bar-plot CSV."""
    paths = cli_outputs
    metrics = json.loads(paths["metrics"].read_text())
    report = json.loads(paths["report"].read_text())
    assert list(metrics)[:2] == ["accuracy", "macro_f1"]
    compared = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["retrain_check"]["metrics"]
    assert {n.partition(":")[2] for n in compared if n.startswith("metrics/evaluate.json:")} <= set(metrics)
    assert len(metrics) <= 10 and not any(isinstance(v, dict | list) for v in metrics.values()), metrics
    assert {k: report[k] for k in metrics if k in report} == {k: v for k, v in metrics.items() if k in report}
    assert metrics["selective_accuracy"] == report["selective"]["test"]["selective_accuracy"]
    assert metrics["coverage"] == report["selective"]["test"]["coverage"]
    per_class = pd.read_csv(paths["per_class_csv"])
    assert list(per_class.columns) == ["class", "recall", "precision", "f1", "support"]
    assert list(per_class["class"]) == synthetic_data.class_names
    for row in per_class.to_dict("records"):
        assert {k: row[k] for k in ("recall", "precision", "f1", "support")} == report["per_class"][row["class"]]
