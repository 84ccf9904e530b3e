"""The gate blesses a model that really classifies and refuses degenerate or regressing ones, with readable reasons.

Thresholds are the project's own `gate:` params, so these tests also check that the shipped thresholds
refuse what they must. The models are real: trained for a few steps on generated images
(tests/fixtures/training.py), or built on purpose to always answer the majority class.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.params import load_section
from components import gate
from components.gate import GateParams, champion_file, champion_metrics_from, gate_decision
from serving.contract import MODEL_CARD_FILE, ModelCardError
from tests.conftest import REPO_ROOT

THRESHOLDS = load_section(GateParams, "gate", REPO_ROOT / "params.yaml")


def metrics(accuracy: float, macro_f1: float, recalls: dict[str, float], baseline: float = 0.25) -> dict:
    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "majority_class": "speakers",
        "majority_baseline_accuracy": baseline,
        "per_class": {c: {"precision": r, "recall": r, "f1": r, "support": 10} for c, r in recalls.items()},
    }


GOOD = metrics(0.95, 0.95, {"gpu": 0.9, "mouse": 1.0, "speakers": 0.95})


def published_card(evaluation: dict) -> dict:
    """A published version's model card (serving.contract.ModelCard) whose evaluation is `evaluation`."""
    return {
        "model_name": "productlens", "version": 3, "image_size": 224, "class_names": ["gpu", "mouse", "speakers"],
        "not_sure_threshold": 0.7, "max_pixels": 40_000_000, "top_k": 3, "weights_sha256": "ab" * 32,
        "evaluation": evaluation,
    }  # fmt: skip


def test_gate_refuses_a_model_that_always_predicts_the_majority_class(majority_model_metrics: dict) -> None:
    decision = gate_decision(majority_model_metrics, None, THRESHOLDS)
    assert decision["blessed"] is False
    text = " ".join(decision["reasons"])
    assert f"accuracy {majority_model_metrics['accuracy']:.3f} < {THRESHOLDS.min_accuracy:.3f}" in text
    assert "beats the majority-class baseline" in text and "less than the required" in text
    # every class but the majority one has recall 0
    assert sum(r.startswith("recall of class ") and " 0.000 < " in r for r in decision["reasons"]) == 3


def test_gate_refuses_a_model_trained_on_shuffled_labels(shuffled_label_model_metrics: dict) -> None:
    decision = gate_decision(shuffled_label_model_metrics, None, THRESHOLDS)
    assert decision["blessed"] is False
    assert any(r.startswith("macro F1 ") and " < " in r for r in decision["reasons"])


def test_gate_blesses_a_model_that_learned_the_classes(separable_model_metrics: dict) -> None:
    decision = gate_decision(separable_model_metrics, None, THRESHOLDS)
    assert decision["blessed"] is True, decision["reasons"]
    assert "no champion yet (no blessed model exported): regression check skipped" in decision["reasons"]
    assert decision["champion"] is None
    assert decision["thresholds"]["min_accuracy"] == THRESHOLDS.min_accuracy


def test_gate_refuses_a_candidate_that_regresses_against_the_champion(separable_model_metrics: dict) -> None:
    champion = dict(separable_model_metrics)
    champion["accuracy"] = separable_model_metrics["accuracy"] + THRESHOLDS.max_regression + 0.05
    decision = gate_decision(separable_model_metrics, champion, THRESHOLDS)
    assert decision["blessed"] is False
    (reason,) = decision["reasons"]
    assert reason.startswith(f"accuracy {separable_model_metrics['accuracy']:.3f} vs champion ")
    assert f"more than the allowed regression of {THRESHOLDS.max_regression:.3f}" in reason


def test_gate_allows_a_small_change_within_the_allowed_regression() -> None:
    champion = dict(GOOD, accuracy=GOOD["accuracy"] + THRESHOLDS.max_regression / 2)
    assert gate_decision(GOOD, champion, THRESHOLDS)["blessed"] is True


def test_each_failed_class_recall_is_named() -> None:
    candidate = metrics(0.95, 0.95, {"gpu": 0.9, "webcam": 0.1, "mouse": 1.0})
    decision = gate_decision(candidate, None, THRESHOLDS)
    assert decision["reasons"] == [f"recall of class webcam 0.100 < {THRESHOLDS.min_class_recall:.3f}"]


def test_thresholds_outside_zero_one_are_rejected() -> None:
    with pytest.raises(ValueError, match="gate.min_accuracy"):
        GateParams(1.5, 0.5, 0.5, 0.3, 0.02)


def test_champion_is_the_newest_versions_model_card(tmp_path: Path) -> None:
    assert champion_file(tmp_path / "models" / "productlens") is None
    for version in (1, 2, 10):
        (tmp_path / str(version)).mkdir()
        (tmp_path / str(version) / MODEL_CARD_FILE).write_text("{}")
    (tmp_path / "11.tmp").mkdir()
    (tmp_path / ".12.abc.tmp").mkdir()  # a publish that did not finish
    (tmp_path / ".12.abc.tmp" / MODEL_CARD_FILE).write_text("{}")
    assert champion_file(tmp_path) == tmp_path / "10" / MODEL_CARD_FILE


def test_the_champions_metrics_are_its_model_cards_evaluation() -> None:
    assert champion_metrics_from(published_card(GOOD)) == GOOD
    assert champion_metrics_from({"metrics": GOOD, "gate": {"blessed": True}}) == GOOD  # cards before the contract
    with pytest.raises(ModelCardError, match="weights_sha256 is missing"):
        champion_metrics_from({k: v for k, v in published_card(GOOD).items() if k != "weights_sha256"})


def test_cli_writes_the_decision_and_exits_0_when_refusing(tmp_path: Path, capsys) -> None:
    bad = metrics(0.30, 0.20, {"gpu": 0.0, "mouse": 0.9})
    candidate = tmp_path / "evaluate.json"
    candidate.write_text(json.dumps(bad))
    card_dir = tmp_path / "models" / "productlens" / "3"
    card_dir.mkdir(parents=True)
    (card_dir / MODEL_CARD_FILE).write_text(json.dumps(published_card(GOOD)))
    output = tmp_path / "gate" / "gate.json"
    summary = tmp_path / "metrics" / "gate.json"
    argv = ["--candidate", str(candidate), "--champion", str(tmp_path / "models" / "productlens"),
            "--params", str(REPO_ROOT / "params.yaml"), "--output", str(output), "--metrics", str(summary)]  # fmt: skip
    assert gate.main(argv) == 0
    decision = json.loads(output.read_text())
    assert set(decision) >= {"blessed", "reasons", "candidate", "champion", "thresholds"}
    assert decision["blessed"] is False
    assert decision["champion"]["accuracy"] == GOOD["accuracy"]
    assert "recall of class gpu 0.000" in " ".join(decision["reasons"])
    assert "Gate: REFUSED" in capsys.readouterr().out
    failed = sum(1 for check in decision["checks"] if check["passed"] is False)
    assert json.loads(summary.read_text()) == {
        "blessed": False,
        "checks": len(decision["checks"]),
        "failed_checks": failed,
        "champion": True,
    }
    assert failed >= 2  # accuracy and gpu's recall at least


def test_majority_model_really_predicts_one_class(majority_model_probabilities: np.ndarray) -> None:
    assert len(set(majority_model_probabilities.argmax(axis=1))) == 1
