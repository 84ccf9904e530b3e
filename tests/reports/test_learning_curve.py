"""The learning curves mark where fine-tuning starts, so the step there reads as a phase change, not a glitch."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from components.train import FINE_TUNING_SERIES, EpochLog
from tests.conftest import REPO_ROOT

LIVE_METRICS = "dvclive/train/plots/metrics"


def epoch(loss: float, val_loss: float) -> dict[str, float]:
    return {"loss": loss, "accuracy": 1 - loss, "val_loss": val_loss, "val_accuracy": 1 - val_loss}


def test_history_marks_the_epochs_of_fine_tuning(tmp_path: Path) -> None:
    history = EpochLog(tmp_path / "live")
    for number, logs in enumerate([epoch(0.9, 0.8), epoch(0.5, 0.6), epoch(0.3, 0.5)], start=1):
        history.add("head", number, 3, logs, seconds=0.1)
    for number, logs in enumerate([epoch(0.6, 0.45), epoch(0.5, 0.4)], start=1):
        history.add("fine_tune", number, 2, logs, seconds=0.1)
    history.close()

    metrics = tmp_path / "live" / "plots" / "metrics"
    marker = pd.read_csv(metrics / f"{FINE_TUNING_SERIES}.tsv", sep="\t")
    loss = pd.read_csv(metrics / "train" / "loss.tsv", sep="\t")
    assert list(marker["step"]) == list(loss["step"]) == [0, 1, 2, 3, 4]
    assert list(marker[FINE_TUNING_SERIES]) == [0, 0, 0, 1, 1]
    assert loss["loss"].iloc[3] > loss["loss"].iloc[2]  # the step the marker explains


def test_each_member_of_an_ensemble_has_its_own_boundary(tmp_path: Path) -> None:
    history = EpochLog(tmp_path / "live")
    for phase in ("member0_head", "member0_fine_tune", "member1_head", "member1_fine_tune"):
        history.add(phase, 1, 1, epoch(0.5, 0.5), seconds=0.1)
    history.close()
    marker = pd.read_csv(tmp_path / "live" / "plots" / "metrics" / f"{FINE_TUNING_SERIES}.tsv", sep="\t")
    assert list(marker[FINE_TUNING_SERIES]) == [0, 1, 0, 1]


def test_both_learning_curves_draw_the_marker_and_say_so_in_their_title() -> None:
    plots = {name: spec for entry in yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["plots"]
             for name, spec in entry.items()}  # fmt: skip
    for name in ("learning_curve_loss", "learning_curve_accuracy"):
        assert plots[name]["y"][f"{LIVE_METRICS}/{FINE_TUNING_SERIES}.tsv"] == FINE_TUNING_SERIES, name
        assert "fine-tuning starts" in plots[name]["title"], name
