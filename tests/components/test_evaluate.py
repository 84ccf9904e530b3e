"""Evaluation numbers are right on hand-checked cases, and the CLI writes what DVC and the gate read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components import evaluate
from components.evaluate import EvaluateParams, classification_metrics, expected_calibration_error
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


def test_cli_writes_metrics_and_confusion_matrix(
    separable_model, synthetic_data: SyntheticData, tmp_path: Path
) -> None:
    model = tmp_path / "model.keras"
    separable_model.save(model)
    metrics, csv, png = tmp_path / "m" / "evaluate.json", tmp_path / "p" / "confusion.csv", tmp_path / "p" / "c.png"
    argv = ["--model", str(model), "--splits", str(synthetic_data.splits), "--images", str(synthetic_data.images),
            "--params", str(REPO_ROOT / "params.yaml"), "--metrics", str(metrics), "--confusion-csv", str(csv),
            "--confusion-png", str(png)]  # fmt: skip
    assert evaluate.main(argv) == 0
    written = json.loads(metrics.read_text())
    test_rows = pd.read_csv(synthetic_data.splits / "test.csv")
    assert written["split"] == "test" and written["images"] == len(test_rows)
    assert set(written["per_class"]) == set(synthetic_data.class_names)
    rows = pd.read_csv(csv)
    assert list(rows.columns) == ["actual", "predicted"]  # DVC's confusion template: x actual, y predicted
    assert list(rows["actual"]) == list(test_rows["class_name"])
    assert (rows["actual"] == rows["predicted"]).mean() == pytest.approx(written["accuracy"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
