"""Infra validation: the candidate in a real model-server process, blessed only when it answers like its Keras model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from components import infra_validate as step
from components.candidate import identity
from components.export import ExportParams, export_candidate
from components.infra_validate import InfraValidateParams, infra_validate
from tests.fixtures.model_server import TinyModel, train_tiny_model

ROOT = Path(__file__).resolve().parents[2]
EVALUATION = {"accuracy": 0.95, "macro_f1": 0.94, "not_sure_threshold": 0.42}
SERVED_CHECKS = [
    "weights", "loads", "warmup", "signatures", "grpc_predict", "rest_predict", "classify", "not_sure_threshold",
    "refuses_non_image", "refuses_oversized", "matches_keras",
]  # fmt: skip


@pytest.fixture(scope="module")
def candidate(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("export") / "candidate"
    export_candidate(
        tiny_model.keras_model, tiny_model.class_names, {"blessed": True, "reasons": []}, EVALUATION, output,
        ExportParams(top_k=3), tiny_model.images(),
    )  # fmt: skip
    return output


@pytest.fixture()
def step_inputs(tiny_model: TinyModel, candidate: Path, tmp_path: Path) -> dict[str, Path]:
    samples = tmp_path / "samples"
    samples.mkdir()
    for name in tiny_model.class_names[:4]:
        (samples / f"{name}.jpg").write_bytes(tiny_model.sample_images[name][0])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["infra_validate"]["images"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return {
        "candidate": candidate,
        "model": tiny_model.keras_model,
        "samples": samples,
        "params": tmp_path / "params.yaml",
        "blessing": tmp_path / "infra_validate" / "blessing.json",
        "metrics": tmp_path / "metrics" / "infra_validate.json",
    }


def cli_args(paths: dict[str, Path]) -> list[str]:
    return [
        "--candidate", str(paths["candidate"]), "--model", str(paths["model"]), "--samples", str(paths["samples"]),
        "--params", str(paths["params"]), "--blessing", str(paths["blessing"]), "--metrics", str(paths["metrics"]),
    ]  # fmt: skip


def test_a_candidate_that_serves_like_its_keras_model_is_blessed(step_inputs, capsys) -> None:
    assert step.main(cli_args(step_inputs)) == 0
    assert "Infra validation passed" in capsys.readouterr().out
    blessing = json.loads(step_inputs["blessing"].read_text())
    assert blessing["blessed"] is True
    assert blessing["candidate"] == identity(step_inputs["candidate"])  # what publish checks it against
    assert [check["name"] for check in blessing["checks"]] == SERVED_CHECKS
    assert all(check["passed"] for check in blessing["checks"])
    assert blessing["images"] == 4
    assert set(blessing["max_abs_difference"]) == {"grpc_single", "grpc_batch", "rest"}
    assert max(blessing["max_abs_difference"].values()) <= blessing["tolerance"]
    metrics = json.loads(step_inputs["metrics"].read_text())
    assert metrics["blessed"] is True and metrics["max_abs_difference"] <= 1e-4


def test_a_candidate_the_server_cannot_load_is_not_blessed(step_inputs, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(step_inputs["candidate"], broken)
    shutil.rmtree(broken / "variables")  # the weights are gone: the SavedModel cannot be restored
    assert step.main(cli_args({**step_inputs, "candidate": broken})) == 1
    err = capsys.readouterr().err
    assert "Infra validation failed" in err and "loads: " in err and "could not load the candidate" in err
    blessing = json.loads(step_inputs["blessing"].read_text())
    assert blessing["blessed"] is False
    assert blessing["checks"][-1]["name"] == "loads" and blessing["checks"][-1]["passed"] is False
    assert json.loads(step_inputs["metrics"].read_text())["blessed"] is False


def test_served_answers_further_from_keras_than_the_tolerance_are_not_blessed(tiny_model, candidate) -> None:
    impossible = InfraValidateParams(images=2, atol=-1.0)  # no answer can be that close
    blessing = infra_validate(candidate, tiny_model.keras_model, tiny_model.images(), impossible)
    assert blessing["blessed"] is False
    (reason,) = blessing["reasons"]
    assert reason.startswith("matches_keras: served probabilities differ from the Keras model's by up to ")
    assert [c["name"] for c in blessing["checks"] if c["passed"]] == SERVED_CHECKS[:-1]  # everything else passed


def test_a_candidate_exported_from_other_weights_is_not_blessed(candidate, tmp_path: Path) -> None:
    other = train_tiny_model(tmp_path, seed=1, epochs=1)
    blessing = infra_validate(candidate, other.keras_model, other.images(), InfraValidateParams(images=2))
    assert blessing["blessed"] is False
    (reason,) = blessing["reasons"]
    assert reason.startswith("weights: the candidate was exported from other weights")
    assert [c["name"] for c in blessing["checks"]] == ["weights"]  # refused before any server was started
