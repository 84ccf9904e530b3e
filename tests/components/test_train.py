"""Training learns separable classes, is reproducible, and its CLI writes model, metrics and history."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from common.data import read_split
from common.params import ParamsError
from components import train as train_step
from components.train import balanced_class_weights, train_params_from
from tests.conftest import REPO_ROOT
from tests.fixtures.training import SyntheticData, tiny_train_values, write_params


def logged_losses(live: Path) -> list[float]:
    """The per-epoch training loss the CLI logged through DVCLive (written with repr: exact floats)."""
    with (live / "plots" / "metrics" / "train" / "loss.tsv").open(newline="") as rows:
        return [float(row["loss"]) for row in csv.DictReader(rows, delimiter="\t")]


def test_same_data_params_and_seed_train_identical_weights_whatever_the_python_hash_seed(
    separable_training, synthetic_data: SyntheticData, tmp_path: Path
) -> None:
    """Run A is the session's in-process training; run B the CLI on the same data and params in a fresh interpreter
    under another PYTHONHASHSEED (`dvc repro` outside make sets none). Every random source is seeded (head on cached
    features, one fine-tuning epoch on augmented images): same metrics, per-epoch losses and weights."""
    params = write_params(tmp_path / "params.yaml")
    model, metrics, report = tmp_path / "model.keras", tmp_path / "train.json", tmp_path / "report" / "train.json"
    live = tmp_path / "live"
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") == "2" else "2"
    subprocess.run(
        [sys.executable, "-m", "components.train", "--splits", str(synthetic_data.splits),
         "--images", str(synthetic_data.images), "--params", str(params), "--model", str(model),
         "--metrics", str(metrics), "--report", str(report), "--live-dir", str(live)],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONHASHSEED": hash_seed}, check=True, capture_output=True,
    )  # fmt: skip
    import keras

    written = json.loads(metrics.read_text())
    assert written["val_loss"] == separable_training.metrics["val_loss"]
    assert written["val_accuracy"] == separable_training.metrics["val_accuracy"]
    assert logged_losses(live) == [row["loss"] for row in separable_training.history]  # every epoch of both phases
    # DVC metrics: the headline scalars; the phases and temperatures are in the report.
    assert list(written) == ["val_accuracy", "val_loss", "epochs_run", "train_seconds", "peak_rss_mb"]
    compared = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["retrain_check"]["metrics"]
    assert {n.partition(":")[2] for n in compared if n.startswith("metrics/train.json:")} <= set(written)
    assert set(json.loads(report.read_text())) >= {"architecture", "phases", "temperatures", *written}
    trained = keras.models.load_model(model, compile=False).get_weights()
    for a, b in zip(separable_training.model.get_weights(), trained, strict=True):
        np.testing.assert_array_equal(a, b)


def test_mobilenet_trains_the_head_on_cached_features_then_fine_tunes(
    separable_training, separable_model_metrics
) -> None:
    phases = [row["phase"] for row in separable_training.history]
    assert phases[0] == "head" and phases[-1] == "fine_tune"
    assert separable_training.metrics["phases"]["fine_tune"]["unfrozen_layers_with_weights"] > 0
    assert separable_model_metrics["accuracy"] >= 0.9


def test_cli_writes_model_metrics_and_per_epoch_history(synthetic_data: SyntheticData, tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", architecture="paper_cnn", image_size=64, epochs=2)
    model, metrics, live = tmp_path / "out" / "model.keras", tmp_path / "metrics" / "train.json", tmp_path / "live"
    report = tmp_path / "reports" / "train.json"
    argv = ["--splits", str(synthetic_data.splits), "--images", str(synthetic_data.images), "--params", str(params),
            "--model", str(model), "--metrics", str(metrics), "--report", str(report),
            "--live-dir", str(live)]  # fmt: skip
    assert train_step.main(argv) == 0
    assert model.is_file()
    written = json.loads(metrics.read_text())
    assert written["epochs_run"] == 2
    assert {"val_accuracy", "val_loss", "train_seconds", "peak_rss_mb"} <= set(written)
    assert json.loads(report.read_text())["architecture"] == "paper_cnn"  # the details are in the report
    history = (live / "plots" / "metrics" / "val" / "loss.tsv").read_text().splitlines()
    assert len(history) == 1 + 2  # header + one row per epoch


def test_class_weights_balance_the_classes() -> None:
    weights = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights[0] * 3 == pytest.approx(weights[1] * 1)
    assert weights[2] == 0.0


def test_params_typos_fail_loudly() -> None:
    with pytest.raises(ParamsError, match="unknown key"):
        train_params_from({**tiny_train_values(), "epoch": 3})
    with pytest.raises(ValueError, match="architecture"):
        train_params_from(tiny_train_values(architecture="vgg"))


def test_split_with_an_unknown_class_is_rejected(synthetic_data: SyntheticData) -> None:
    with pytest.raises(ValueError, match="not in class_names.json"):
        read_split(synthetic_data.splits / "train.csv", synthetic_data.images, ["gpu"])


def test_temperature_scaling_softens_overconfident_probabilities() -> None:
    from components.train import fit_temperature

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    # 70% right, always 99% sure: the fitted temperature must soften (T > 1)
    predicted = np.where(rng.random(300) < 0.7, labels, (labels + 1) % 3)
    probabilities = np.full((300, 3), 0.005)
    probabilities[np.arange(300), predicted] = 0.99
    assert fit_temperature(probabilities, labels) > 2.0


def test_training_records_the_fitted_temperature(separable_training) -> None:
    (temperature,) = separable_training.metrics["temperatures"]
    assert 0.05 < temperature < 20
