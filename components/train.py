"""Train step: fit the model selected by `train.architecture` on the train split, early-stopped on val.

mobilenet_v2 trains in two phases: (1) the softmax head alone on MobileNetV2 features computed
once per image (feature caching: the frozen base would otherwise run forward every epoch for
identical output), then (2) the top of the base together with the head, end to end on
augmented images at a lower learning rate. paper_cnn trains end to end for `epochs`.
Same data + params + seed give the same weights and metrics on the same machine (seeded shuffles,
seeded augmentation, TensorFlow op determinism). Not across machines: another machine of the same kind
gave slightly different weights (2 of 388 test predictions differed), which is why `make retrain-check`
compares metrics within `retrain_check.tolerance` and not bytes.

Writes the model, the DVC metrics (`--metrics`: val accuracy and loss, epochs, time, memory) and the
report (`--report`: the same plus the architecture, each phase's epochs and seconds, temperatures).
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from keras.applications.mobilenet_v2 import preprocess_input

from common.cli import run_main
from common.data import Split, batches, image_dataset, read_split
from common.io import atomic_write_json
from common.params import build, load_params, section
from components.model import (
    ARCHITECTURES,
    AugmentParams,
    MobileNetParams,
    WeightsError,
    base_of,
    build_model,
    ensemble,
    inference_model,
    set_temperature,
    unfreeze_top,
)

log = logging.getLogger("components.train")

# DVCLive metric (plots/metrics/fine_tuning.tsv): 0 while the head trains, 1 while the base is fine-tuned.
FINE_TUNING_SERIES = "fine_tuning"


@dataclass(frozen=True)
class TrainParams:
    architecture: str
    image_size: int
    seed: int
    batch_size: int
    epochs: int  # paper_cnn: all epochs; mobilenet_v2: head epochs on cached features
    learning_rate: float
    fine_tune_epochs: int  # mobilenet_v2 only; 0 = head only
    fine_tune_layers: int  # top layers of the base unfrozen for fine-tuning; -1 = all
    fine_tune_learning_rate: float
    early_stopping_patience: int
    label_smoothing: float
    dropout: float
    class_weights: bool
    ensemble_members: int = 1  # mobilenet_v2: models trained with different seeds, probabilities averaged
    calibrate: bool = True  # fit a softmax temperature on val after training (temperature scaling)
    augment: AugmentParams = field(default_factory=AugmentParams)
    mobilenet_v2: MobileNetParams | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"train.architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        if self.architecture == "mobilenet_v2" and self.mobilenet_v2 is None:
            raise ValueError("train.architecture mobilenet_v2 needs a train.mobilenet_v2 section")
        if self.ensemble_members < 1:
            raise ValueError("train.ensemble_members must be >= 1")
        if self.image_size < 32 or self.batch_size < 1 or self.epochs < 0 or self.fine_tune_epochs < 0:
            raise ValueError("train: image_size >= 32, batch_size >= 1, epochs and fine_tune_epochs >= 0")


def train_params_from(values: dict[str, Any], where: str = "params.yaml:train") -> TrainParams:
    """Build TrainParams from the `train:` mapping, with its nested `augment:` and `mobilenet_v2:`."""
    values = dict(values)
    if "augment" in values:
        values["augment"] = build(AugmentParams, values["augment"] or {}, f"{where}.augment")
    if values.get("mobilenet_v2") is not None:
        values["mobilenet_v2"] = build(MobileNetParams, values["mobilenet_v2"], f"{where}.mobilenet_v2")
    return build(TrainParams, values, where)


def load_train_params(path: Path) -> TrainParams:
    return train_params_from(section(load_params(path), "train"), f"{path}:train")


def set_determinism(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras, and make TF ops deterministic.

    PYTHONHASHSEED is not set or needed (Python reads it only at start-up): nothing training does depends
    on str hash order, so `dvc repro` alone, make and KFP train the same weights whatever its value
    (tests/components/test_train.py trains through the CLI under another hash seed and compares).
    """
    import keras

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """n / (k * count_c): each class contributes equally to the loss (absent classes get weight 0)."""
    counts = np.bincount(labels, minlength=num_classes)
    return {c: (len(labels) / (num_classes * n) if n else 0.0) for c, n in enumerate(counts)}


class EpochLog:
    """Per-epoch history of every phase, numbered continuously, logged and written through DVCLive."""

    def __init__(self, live_dir: Path | None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.live = None
        if live_dir is not None:
            from dvclive import Live

            self.live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)

    def callback(self, phase: str, total_epochs: int) -> Any:
        import keras

        history = self

        class _Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
                self._started = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                history.add(phase, epoch + 1, total_epochs, logs or {}, time.perf_counter() - self._started)

        return _Callback()

    def add(self, phase: str, epoch: int, total: int, logs: dict[str, Any], seconds: float) -> None:
        row = {"step": len(self.rows), "phase": phase, "epoch": epoch}
        row.update({k: float(v) for k, v in sorted(logs.items()) if k != "learning_rate"})
        self.rows.append(row)
        log.info(
            "%s epoch %d/%d: loss %.4f acc %.4f | val_loss %.4f val_acc %.4f (%.0f s)",
            phase,
            epoch,
            total,
            row.get("loss", float("nan")),
            row.get("accuracy", float("nan")),
            row.get("val_loss", float("nan")),
            row.get("val_accuracy", float("nan")),
            seconds,
        )
        if self.live is not None:
            for name, value in row.items():
                if name in ("step", "phase", "epoch"):
                    continue
                split = "val" if name.startswith("val_") else "train"
                self.live.log_metric(f"{split}/{name.removeprefix('val_')}", value)
            # The learning curves step where fine-tuning starts; this 0/1 series marks that boundary on them.
            self.live.log_metric(FINE_TUNING_SERIES, float(phase.endswith("fine_tune")))
            self.live.next_step()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


@dataclass
class TrainResult:
    model: Any  # keras.Model
    history: list[dict[str, Any]]
    metrics: dict[str, Any]


def _compile(model: Any, learning_rate: float, label_smoothing: float) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
    )


def _fit(
    model: Any,
    train: tf.data.Dataset,
    val: tf.data.Dataset,
    epochs: int,
    params: TrainParams,
    class_weight: dict[int, float] | None,
    history: EpochLog,
    phase: str,
) -> int:
    """Fit with early stopping on val loss (best weights restored); returns the epochs run."""
    import keras

    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=params.early_stopping_patience, restore_best_weights=True
    )
    fitted = model.fit(
        train,
        validation_data=val,
        epochs=epochs,
        class_weight=class_weight,
        callbacks=[stop, history.callback(phase, epochs)],
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        verbose=0,
    )
    return len(fitted.history.get("loss", []))


def _one_hot(num_classes: int):
    def encode(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return x, tf.one_hot(y, num_classes)

    return encode


def train(
    train_split: Split,
    val_split: Split,
    class_names: list[str],
    params: TrainParams,
    live_dir: Path | None = None,
) -> TrainResult:
    """Train the model `params` describes; returns it (best val-loss weights) with its history and metrics."""
    set_determinism(params.seed)
    started = time.perf_counter()
    history = EpochLog(live_dir)
    # Decoded once, cached in memory, shared by every phase and ensemble member.
    data = _Data(
        train_images=image_dataset(train_split, params.image_size),
        val_images=image_dataset(val_split, params.image_size),
        train_labels=train_split.labels,
        val_labels=val_split.labels,
        num_classes=len(class_names),
        class_weight=balanced_class_weights(train_split.labels, len(class_names)) if params.class_weights else None,
    )
    phases: dict[str, dict[str, Any]] = {}
    temperatures: list[float] = []
    try:
        if params.architecture == "paper_cnn":
            trained = [_train_paper_cnn(data, params, history, phases)]
        else:
            features: dict[str, np.ndarray] = {}
            trained = [
                _train_mobilenet_member(data, params, history, phases, member, features)
                for member in range(params.ensemble_members)
            ]
        members = [_calibrated(model, data, params, temperatures) for model in trained]
        model = members[0] if len(members) == 1 else ensemble(members, params.image_size)
    finally:
        history.close()
    wall = time.perf_counter() - started
    val_loss, val_accuracy = _evaluate(model, data.val_images, data.val_labels, params.batch_size)
    metrics = {
        "architecture": params.architecture,
        "ensemble_members": params.ensemble_members if params.architecture == "mobilenet_v2" else 1,
        "image_size": params.image_size,
        "train_images": len(train_split),
        "val_images": len(val_split),
        "val_loss": round(val_loss, 6),
        "val_accuracy": round(val_accuracy, 6),
        "epochs_run": sum(p["epochs"] for p in phases.values()),
        "phases": phases,
        "temperatures": temperatures,
        "train_seconds": round(wall, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "parameters": int(model.count_params()),
    }
    log.info("trained %s in %.0f s: val_accuracy %.4f", params.architecture, wall, val_accuracy)
    return TrainResult(model, history.rows, metrics)


def headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics of a training run: a few scalars (val figures, epochs, time, memory)."""
    return {key: metrics[key] for key in ("val_accuracy", "val_loss", "epochs_run", "train_seconds", "peak_rss_mb")}


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The softmax temperature T minimising the negative log-likelihood of `labels` (temperature scaling).

    softmax(log p / T) == softmax(logits / T) for the model's T=1 probabilities p, so p is all it needs.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    log_p = np.log(np.clip(probabilities.astype(np.float64), 1e-12, 1.0))
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(log_p / np.exp(log_t), axis=1)[rows, labels].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def _calibrated(trained: Any, data: _Data, params: TrainParams, temperatures: list[float]) -> Any:
    """The inference model of `trained`, its softmax temperature fitted on the val split if params say so."""
    model = inference_model(trained)
    if not params.calibrate:
        return model
    probabilities = model.predict(batches(data.val_images, params.batch_size).map(lambda x, y: x), verbose=0)
    temperature = fit_temperature(probabilities, data.val_labels)
    set_temperature(trained, temperature)
    temperatures.append(round(temperature, 4))
    log.info("calibrated: softmax temperature %.3f (fitted on val)", temperature)
    return inference_model(trained)  # a new model object: the old one traced T = 1 into its functions


@dataclass
class _Data:
    train_images: tf.data.Dataset
    val_images: tf.data.Dataset
    train_labels: np.ndarray
    val_labels: np.ndarray
    num_classes: int
    class_weight: dict[int, float] | None


def _train_paper_cnn(data: _Data, params: TrainParams, history: EpochLog, phases: dict[str, Any]) -> Any:
    model = build_model("paper_cnn", data.num_classes, params.image_size, augment=params.augment, seed=params.seed)
    encode = _one_hot(data.num_classes)
    _compile(model, params.learning_rate, params.label_smoothing)
    t0 = time.perf_counter()
    epochs = _fit(
        model,
        batches(data.train_images.map(encode), params.batch_size, params.seed),
        batches(data.val_images.map(encode), params.batch_size),
        params.epochs,
        params,
        data.class_weight,
        history,
        "train",
    )
    phases["train"] = {"epochs": epochs, "seconds": round(time.perf_counter() - t0, 1)}
    return model


def _train_mobilenet_member(
    data: _Data,
    params: TrainParams,
    history: EpochLog,
    phases: dict[str, Any],
    member: int,
    features: dict[str, np.ndarray],
) -> Any:
    """One MobileNetV2 transfer-learning model: head on cached features, then fine-tuning of the top."""
    import keras

    seed = params.seed + 1000 * member  # members differ in head init, dropout, shuffles and augmentation
    keras.utils.set_random_seed(seed)
    prefix = f"member{member}_" if params.ensemble_members > 1 else ""
    encode = _one_hot(data.num_classes)
    model = build_model(
        "mobilenet_v2",
        data.num_classes,
        params.image_size,
        weights=params.mobilenet_v2,
        dropout=params.dropout,
        augment=params.augment,
        seed=seed,
    )
    t0 = time.perf_counter()
    if not features:
        # The base is frozen and its BN in inference mode, so its output for an image never changes:
        # compute it once (for every member: they share the backbone) and train heads on the cache.
        base = base_of(model)
        # MobileNetV2's preprocess_input is what the model's `rescale` layer does (x / 127.5 - 1) before the base.
        for name, images in (("train", data.train_images), ("val", data.val_images)):
            features[name] = base.predict(batches(images, 64).map(lambda x, _: preprocess_input(x)), verbose=0)
    features_seconds = time.perf_counter() - t0
    head_model = keras.Sequential([keras.Input(shape=features["train"].shape[1:]), model.get_layer("head")])
    _compile(head_model, params.learning_rate, params.label_smoothing)
    epochs = _fit(
        head_model,
        batches(
            tf.data.Dataset.from_tensor_slices((features["train"], data.train_labels)).map(encode),
            params.batch_size,
            seed,
        ),  # fmt: skip
        batches(tf.data.Dataset.from_tensor_slices((features["val"], data.val_labels)).map(encode), params.batch_size),
        params.epochs,
        params,
        data.class_weight,
        history,
        f"{prefix}head",
    )
    phases[f"{prefix}head"] = {
        "epochs": epochs,
        "feature_seconds": round(features_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if params.fine_tune_epochs > 0:
        t0 = time.perf_counter()
        unfrozen = unfreeze_top(model, params.fine_tune_layers)
        _compile(model, params.fine_tune_learning_rate, params.label_smoothing)
        epochs = _fit(
            model,
            batches(data.train_images.map(encode), params.batch_size, seed + 1),
            batches(data.val_images.map(encode), params.batch_size),
            params.fine_tune_epochs,
            params,
            data.class_weight,
            history,
            f"{prefix}fine_tune",
        )
        phases[f"{prefix}fine_tune"] = {
            "epochs": epochs,
            "unfrozen_layers_with_weights": unfrozen,
            "seconds": round(time.perf_counter() - t0, 1),
        }
    return model


def _evaluate(model: Any, images: tf.data.Dataset, labels: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Cross-entropy (without label smoothing) and accuracy of the final model on `images`."""
    probabilities = model.predict(batches(images, batch_size).map(lambda x, y: x), verbose=0).astype(np.float64)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0)
    return float(-np.log(picked).mean()), float((probabilities.argmax(axis=1) == labels).mean())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.train", description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=Path, required=True, help="folder with train.csv, val.csv, class_names.json")
    parser.add_argument("--images", type=Path, required=True, help="root the split paths are relative to")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, required=True, help="output .keras file")
    parser.add_argument("--metrics", type=Path, required=True, help="output: the headline figures (DVC metrics)")
    parser.add_argument("--report", type=Path, default=None, help="output: everything measured (phases, ...)")
    parser.add_argument("--live-dir", type=Path, default=None, help="DVCLive folder for per-epoch history")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    params = load_train_params(args.params)
    class_names = json.loads((args.splits / "class_names.json").read_text(encoding="utf-8"))
    train_split = read_split(args.splits / "train.csv", args.images, class_names)
    val_split = read_split(args.splits / "val.csv", args.images, class_names)
    log.info("training %s on %d images, validating on %d", params.architecture, len(train_split), len(val_split))
    result = train(train_split, val_split, class_names, params, args.live_dir)
    args.model.parent.mkdir(parents=True, exist_ok=True)
    staging = args.model.with_name(f".{args.model.stem}.tmp.keras")
    result.model.save(staging)
    os.replace(staging, args.model)
    if args.report is not None:
        atomic_write_json(args.report, result.metrics)
    atomic_write_json(args.metrics, headline_metrics(result.metrics))
    log.info("model -> %s, metrics -> %s", args.model, args.metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, expected=(WeightsError,)))
