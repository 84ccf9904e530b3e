"""The whole KFP pipeline under kfp.local (SubprocessRunner, this venv) on a tiny dataset: once the gate
blesses the model, export builds the candidate, infra validation blesses it and publish makes it version 1;
once the gate refuses an untrained model and none of those three runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipelines.training_pipeline import create_pipeline
from serving.contract import MODEL_CARD_FILE
from tests.conftest import REPO_ROOT
from tests.fixtures.pipeline_data import TINY_OVERRIDES, write_tiny_data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,
    # kfp.local ignores resources and images (the steps run in this venv): expected, not worth a warning each.
    pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning"),
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom:RuntimeWarning"),
]

GATE = {
    "gate.min_accuracy": 0.9,
    "gate.min_macro_f1": 0.9,
    "gate.min_class_recall": 0.5,
    "gate.min_margin_over_majority": 0.3,
}
# A learning rate of 0 leaves the network at its random initialisation: a model that has learnt nothing.
UNTRAINED = {"train.learning_rate": 0.0}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("data"))


def run_pipeline(root: Path, data: Path, overrides: dict[str, Any]) -> tuple[Path, Path]:
    """Run the pipeline under kfp.local; returns (the run's output folder, the model base it exports to)."""
    from kfp import local

    model_base = root / "models"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(REPO_ROOT))  # the steps import the project, installed or not
        create_pipeline()(data_location=str(data), params_overrides=overrides, model_base=str(model_base))
    (run_dir,) = (root / "kfp").iterdir()
    return run_dir, model_base


def executor_output(run_dir: Path, task: str) -> dict[str, Any]:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def artifact(run_dir: Path, task: str, name: str) -> dict[str, Any]:
    return executor_output(run_dir, task)["artifacts"][name]["artifacts"][0]


@pytest.fixture(scope="module")
def blessed_run(tmp_path_factory, tiny_data) -> tuple[Path, Path]:
    return run_pipeline(tmp_path_factory.mktemp("blessed"), tiny_data, {**TINY_OVERRIDES, **GATE})


@pytest.fixture(scope="module")
def refused_run(tmp_path_factory, tiny_data) -> tuple[Path, Path]:
    return run_pipeline(tmp_path_factory.mktemp("refused"), tiny_data, {**TINY_OVERRIDES, **GATE, **UNTRAINED})


def test_blessed_model_is_validated_and_published_as_version_1_of_the_model_base(blessed_run):
    run_dir, model_base = blessed_run
    assert executor_output(run_dir, "gate")["parameterValues"]["Output"] is True
    candidate = Path(artifact(run_dir, "export", "candidate")["uri"])
    assert (candidate / "saved_model.pb").is_file()
    blessing = json.loads(Path(artifact(run_dir, "infra-validate", "blessing")["uri"]).read_text())
    assert blessing["blessed"] is True, blessing["reasons"]
    version = model_base / "productlens" / "1"
    assert (version / "saved_model.pb").is_file()
    card = json.loads((version / MODEL_CARD_FILE).read_text())
    assert card["version"] == 1 and card["provenance"]["infra_validation"] == blessing
    publication = artifact(run_dir, "publish", "publication")["metadata"]
    assert (publication["published"], publication["version"], publication["path"]) == (True, 1, str(version))


def test_blessed_run_logs_metrics_confusion_matrix_and_data_docs(blessed_run):
    run_dir, _ = blessed_run
    evaluation = artifact(run_dir, "evaluate", "evaluate_metrics")["metadata"]
    assert evaluation["accuracy"] >= GATE["gate.min_accuracy"]
    matrix = artifact(run_dir, "evaluate", "confusion_matrix")["metadata"]["confusionMatrix"]
    assert [spec["displayName"] for spec in matrix["annotationSpecs"]] == ["gpu", "monitor", "mouse"]
    assert sum(sum(row["row"]) for row in matrix["rows"]) == evaluation["images"]
    page = Path(artifact(run_dir, "validate", "data_docs")["uri"]).read_text(encoding="utf-8")
    assert "Data validation passed" in page and "srcdoc=" in page
    assert artifact(run_dir, "train", "train_metrics")["metadata"]


def test_gate_refuses_an_untrained_model_and_nothing_is_exported(refused_run):
    run_dir, model_base = refused_run
    assert executor_output(run_dir, "gate")["parameterValues"]["Output"] is False
    decision = json.loads(Path(artifact(run_dir, "gate", "gate_decision")["uri"]).read_text())
    assert decision["blessed"] is False
    assert any("accuracy" in reason and "<" in reason for reason in decision["reasons"]), decision["reasons"]
    for task in ("export", "infra-validate", "publish"):
        assert not (run_dir / task).exists(), f"{task} ran although the gate refused"
    assert not model_base.exists() or not any(model_base.rglob("saved_model.pb"))
