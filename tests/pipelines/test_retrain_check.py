"""make retrain-check's verdict: metrics within the tolerance pass, moved or missing ones fail with a sentence."""

from __future__ import annotations

from pipelines.retrain_check import changes_of, problems_of

DIFF = {  # the shape of `dvc metrics diff --json --all`
    "metrics/evaluate.json": {
        "accuracy": {"old": 0.91, "new": 0.915, "diff": 0.005},
        "macro_f1": {"old": 0.90, "new": 0.85, "diff": -0.05},
    },
    "metrics/preprocess.json": {"split_sizes.test": {"old": 388, "new": 388, "diff": 0}},
}


def test_metrics_within_the_tolerance_pass():
    changes = changes_of(DIFF, ["metrics/evaluate.json:accuracy", "metrics/preprocess.json:split_sizes.test"])
    assert problems_of(changes, tolerance=0.01) == []


def test_a_metric_that_moved_beyond_the_tolerance_fails():
    (problem,) = problems_of(changes_of(DIFF, ["metrics/evaluate.json:macro_f1"]), tolerance=0.01)
    assert "macro_f1 moved -0.0500" in problem and "tolerance 0.01" in problem


def test_a_metric_missing_from_the_reproduction_fails():
    (problem,) = problems_of(changes_of(DIFF, ["metrics/evaluate.json:top_k_accuracy"]), tolerance=0.01)
    assert "missing" in problem
