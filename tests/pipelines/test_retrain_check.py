"""make retrain-check's verdict: metrics within the tolerance pass, moved or missing ones fail with a sentence."""

from __future__ import annotations

import yaml

from pipelines.retrain_check import RetrainCheckParams, changes_of, problems_of
from tests.conftest import REPO_ROOT

DIFF = {  # the shape of `dvc metrics diff --json --all`
    "metrics/evaluate.json": {
        "accuracy": {"old": 0.91, "new": 0.915, "diff": 0.005},
        "macro_f1": {"old": 0.90, "new": 0.85, "diff": -0.05},
        "not_sure_threshold": {"old": 0.70, "new": 0.73, "diff": 0.03},
    },
    "metrics/preprocess.json": {"test_images": {"old": 342, "new": 342, "diff": 0}},
}
COMMITTED = RetrainCheckParams(**yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["retrain_check"])


def test_metrics_within_the_tolerance_pass():
    changes = changes_of(DIFF, ["metrics/evaluate.json:accuracy", "metrics/preprocess.json:test_images"])
    assert problems_of(changes, tolerance=0.01) == []


def test_a_metric_that_moved_beyond_the_tolerance_fails():
    (problem,) = problems_of(changes_of(DIFF, ["metrics/evaluate.json:macro_f1"]), tolerance=0.01)
    assert "macro_f1 moved -0.0500" in problem and "tolerance 0.01" in problem


def test_a_moved_not_sure_threshold_fails():
    (problem,) = problems_of(changes_of(DIFF, ["metrics/evaluate.json:not_sure_threshold"]), tolerance=0.01)
    assert "not_sure_threshold moved +0.0300" in problem


def test_a_metric_missing_from_the_reproduction_fails():
    (problem,) = problems_of(changes_of(DIFF, ["metrics/evaluate.json:top_k_accuracy"]), tolerance=0.01)
    assert "missing" in problem


def test_the_check_compares_the_model_figures_and_the_split_sizes():
    compared = set(COMMITTED.metrics)
    assert {f"metrics/evaluate.json:{key}" for key in ("accuracy", "macro_f1", "not_sure_threshold")} <= compared
    assert {f"metrics/preprocess.json:{split}_images" for split in ("train", "val", "test")} <= compared
    assert 0 < COMMITTED.tolerance <= 0.01
