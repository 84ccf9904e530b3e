"""components.monitor: logged traffic against a baseline of real training photos and an evaluation's predictions.

Most tests write the prediction logs themselves, as the model server writes them (`PredictionLog` records of a
Predict request of image bytes and its answer, in TFRecord files named by serving.prediction_log_format), from
dataset v1's photos (data/images) and answers made up per photo by one recipe (`classifier_answer`: right 80% of
the time with a spread of confidences, or a low-margin guess on an input it does not know) that the evaluation and
the traffic share, so only what a test changes differs. The last test serves the tiny model with a
`logging_config` and checks the files the server wrote, through the CLI.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.evaluate import confusion_rows, risk_coverage
from components.monitor import DRIFT_EXIT_CODE, main
from serving.contract import (
    CLASS_IDS,
    CLASS_NAMES,
    IMAGE_BYTES,
    NOT_SURE_THRESHOLD,
    PROBABILITIES,
    SCORES,
    SERVING_DEFAULT,
)
from serving.prediction_log_format import log_file_path, read_prediction_logs
from tests.conftest import REPO_ROOT
from tests.fixtures.images import jpeg_bytes, synthetic_image, write_dataset
from tests.fixtures.model_server import PHOTO_SIZE, TinyModel, export_tiny, start_model_server, wait_for_versions

IMAGES = REPO_ROOT / "data" / "images"
PARAMS = REPO_ROOT / "params.yaml"
MODEL_NAME = "productlens"
THRESHOLD = 0.5  # the made-up model's not-sure threshold (evaluate's choice, and what its answers carry)
TOP_K = 3
# Disjoint samples of dataset v1 per class: training photos, evaluated photos, photos of the traffic.
TRAINING, EVALUATED, TRAFFIC = 12, 10, 8


# ----- the made-up classifier and the logs ------------------------------------------------------------------------
def classifier_answer(label: int | None, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Probabilities from a classifier's logits: noise, plus a margin for the class it picks. For a photo of class
    `label` it picks that class 80% of the time, by a wide margin; for an input it does not know (None) it picks
    any class by a small one, so it is seldom sure."""
    logits = rng.normal(0.0, 1.0, classes)
    if label is None:
        chosen, margin = int(rng.integers(classes)), rng.exponential(0.3)
    else:
        others = [c for c in range(classes) if c != label]
        chosen, margin = (label if rng.random() < 0.8 else int(rng.choice(others))), rng.gamma(3.0, 1.2)
    logits[chosen] = logits.max() + margin
    exp = np.exp(logits - logits.max())
    return (exp / exp.sum()).astype(np.float32)


def predict_log(images: list[bytes], probabilities: np.ndarray, class_names: list[str], version: int = 1):
    """A PredictionLog of one Predict request of `images` and the answer serving_default gives with `probabilities`."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = SERVING_DEFAULT
    request.inputs[IMAGE_BYTES].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    response = predict_pb2.PredictResponse()
    response.model_spec.name = MODEL_NAME
    response.model_spec.version.value = version
    response.model_spec.signature_name = SERVING_DEFAULT
    top = np.argsort(-probabilities, axis=1)[:, :TOP_K]
    outputs = {
        PROBABILITIES: tf.make_tensor_proto(probabilities, dtype=tf.float32),
        CLASS_IDS: tf.make_tensor_proto(top.astype(np.int32)),
        CLASS_NAMES: tf.make_tensor_proto(np.asarray(class_names, dtype=object)[top].astype(bytes), dtype=tf.string),
        SCORES: tf.make_tensor_proto(np.take_along_axis(probabilities, top, axis=1), dtype=tf.float32),
        NOT_SURE_THRESHOLD: tf.make_tensor_proto(np.full(len(images), THRESHOLD, np.float32)),
    }
    for name, tensor in outputs.items():
        response.outputs[name].CopyFrom(tensor)
    entry = prediction_log_pb2.PredictionLog()
    entry.predict_log.request.CopyFrom(request)
    entry.predict_log.response.CopyFrom(response)
    return entry


def write_logs(folder: Path, entries: list, per_file: int = 40) -> Path:
    """`entries` in TFRecord files under `folder`, named as the server names them, `per_file` to a file."""
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    opened = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    for sequence, start in enumerate(range(0, len(entries), per_file), start=1):
        path = log_file_path(folder / MODEL_NAME, opened + timedelta(minutes=sequence), 4242, sequence)
        with tf.io.TFRecordWriter(str(path)) as writer:
            for entry in entries[start : start + per_file]:
                writer.write(entry.SerializeToString())
    return folder


def answered_traffic(photos: list[tuple[bytes, int | None]], class_names: list[str], seed: int) -> list:
    """Predict requests of 1 to 3 photos each, answered by the made-up classifier."""
    rng = np.random.default_rng(seed)
    entries, start = [], 0
    while start < len(photos):
        batch = photos[start : start + int(rng.integers(1, 4))]
        probabilities = np.stack([classifier_answer(label, len(class_names), rng) for _, label in batch])
        entries.append(predict_log([data for data, _ in batch], probabilities, class_names))
        start += len(batch)
    return entries


# ----- dataset v1 photos and the baseline's inputs ----------------------------------------------------------------
@pytest.fixture(scope="module")
def class_names() -> list[str]:
    if not IMAGES.is_dir():
        pytest.fail("dataset v1 is not pulled: run `make pull` (make test does)")
    return sorted(entry.name for entry in IMAGES.iterdir() if entry.is_dir())


@pytest.fixture(scope="module")
def samples(class_names: list[str]) -> dict[str, list[list[Path]]]:
    """{split: [[photos of class 0], ...]}: disjoint random samples of each class folder."""
    rng = random.Random(15)
    drawn: dict[str, list[list[Path]]] = {"training": [], "evaluated": [], "traffic": [], "rest": []}
    for name in class_names:
        photos = rng.sample(sorted((IMAGES / name).iterdir()), TRAINING + EVALUATED + TRAFFIC)
        drawn["training"].append(photos[:TRAINING])
        drawn["evaluated"].append(photos[TRAINING : TRAINING + EVALUATED])
        drawn["traffic"].append(photos[TRAINING + EVALUATED :])
        drawn["rest"].append(sorted(set((IMAGES / name).iterdir()) - set(photos)))
    return drawn


def write_evaluation(folder: Path, labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> Path:
    """What evaluate writes for the monitor: the metrics' not-sure threshold, actual,predicted rows and the curve."""
    folder.mkdir(parents=True, exist_ok=True)
    predictions = probabilities.argmax(axis=1)
    confusion_rows(labels, predictions, class_names).to_csv(folder / "confusion.csv", index=False)
    curve = risk_coverage(probabilities.max(axis=1), predictions == labels)
    curve.round(6).to_csv(folder / "risk_coverage.csv", index=False)
    (folder / "evaluate.json").write_text(json.dumps({NOT_SURE_THRESHOLD: THRESHOLD}))
    return folder


def write_splits(folder: Path, rows: list[tuple[str, str]], class_names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["path", "class_name"]).to_csv(folder / "train.csv", index=False)
    (folder / "class_names.json").write_text(json.dumps(class_names))
    return folder


@pytest.fixture(scope="module")
def baseline_inputs(tmp_path_factory, samples, class_names) -> list[str]:
    """The monitor's --baseline-out arguments: training photos of dataset v1, and an evaluation of other photos by
    the made-up classifier."""
    root = tmp_path_factory.mktemp("monitor_baseline")
    training = [(str(p.relative_to(IMAGES)), class_names[c]) for c, ps in enumerate(samples["training"]) for p in ps]
    splits = write_splits(root / "splits", training, class_names)
    labels = np.asarray([c for c, photos in enumerate(samples["evaluated"]) for _ in photos])
    rng = np.random.default_rng(1)
    probabilities = np.stack([classifier_answer(int(label), len(class_names), rng) for label in labels])
    evaluation = write_evaluation(root / "evaluation", labels, probabilities, class_names)
    return [
        "--splits", str(splits), "--images", str(IMAGES), "--evaluation", str(evaluation / "evaluate.json"),
        "--confusion-csv", str(evaluation / "confusion.csv"),
        "--risk-coverage-csv", str(evaluation / "risk_coverage.csv"),
    ]  # fmt: skip


def run_monitor(logs: Path, out: Path, baseline_args: list[str]) -> tuple[int, dict, str]:
    """python -m components.monitor in this process: (exit code, metrics, report)."""
    code = main(
        ["--logs", str(logs), "--params", str(PARAMS), *baseline_args,
         "--metrics", str(out / "monitor.json"), "--report", str(out / "monitor.md")]
    )  # fmt: skip
    return code, json.loads((out / "monitor.json").read_text()), (out / "monitor.md").read_text()


def building(baseline_inputs: list[str], out: Path) -> list[str]:
    return ["--baseline-out", str(out / "baseline.json"), *baseline_inputs]


def photo_traffic(photos_per_class: list[list[Path]]) -> list[tuple[bytes, int | None]]:
    return [(path.read_bytes(), label) for label, photos in enumerate(photos_per_class) for path in photos]


# ----- the verdicts -----------------------------------------------------------------------------------------------
def test_in_distribution_traffic_passes(tmp_path, samples, class_names, baseline_inputs, capsys):
    from tensorflow_serving.apis import prediction_log_pb2

    entries = answered_traffic(photo_traffic(samples["traffic"]), class_names, seed=2)
    classify = prediction_log_pb2.PredictionLog()
    classify.classify_log.request.model_spec.name = MODEL_NAME  # other APIs' records are counted, not checked
    logs = write_logs(tmp_path / "logs", [*entries, classify])

    code, metrics, report = run_monitor(logs, tmp_path, building(baseline_inputs, tmp_path))

    assert code == 0, capsys.readouterr().err
    images = TRAFFIC * len(class_names)
    assert metrics["drift"] is False and metrics["judged"] is True
    assert (metrics["n_images"], metrics["n_requests"]) == (images, len(entries))
    assert report.startswith("# Drift check: no drift")
    assert f"{images} images in {len(entries)} Predict requests" in report and "productlens v1" in report
    assert "1 classify_log records (only Predict requests are checked)" in report
    assert "drift:" not in capsys.readouterr().err


def test_single_class_traffic_fails_naming_the_class_distribution(tmp_path, samples, class_names, baseline_inputs,
                                                                  capsys):  # fmt: skip
    keyboard = class_names.index("keyboard")
    photos = [[] for _ in class_names]
    photos[keyboard] = samples["rest"][keyboard][:60]
    logs = write_logs(tmp_path / "logs", answered_traffic(photo_traffic(photos), class_names, seed=3))

    code, metrics, report = run_monitor(logs, tmp_path, building(baseline_inputs, tmp_path))

    assert code == DRIFT_EXIT_CODE
    reasons = capsys.readouterr().err.splitlines()
    (class_reason,) = [line for line in reasons if line.startswith("drift: class distribution drifted")]
    assert "keyboard is " in class_reason and "of the traffic's predictions" in class_reason, class_reason
    assert metrics["drift"] is True and metrics["class_psi"] > 0.25
    assert not any("not-sure share" in line or "confidence" in line for line in reasons), reasons
    assert report.startswith("# Drift check: DRIFT") and class_reason.removeprefix("drift: ") in report


def generated_images(count: int, seed: int) -> list[bytes]:
    """Out-of-distribution inputs at the dataset's size: flat images of one grey, and uniform noise."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        if index % 2:
            pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        else:
            pixels = np.full((256, 256, 3), rng.integers(0, 256), dtype=np.uint8)
        images.append(jpeg_bytes(Image.fromarray(pixels)))
    return images


def test_out_of_distribution_images_fail_naming_confidence_not_sure_and_image_statistics(
    tmp_path, class_names, baseline_inputs, capsys
):
    inputs = [(data, None) for data in generated_images(60, seed=4)]
    logs = write_logs(tmp_path / "logs", answered_traffic(inputs, class_names, seed=4))

    code, metrics, report = run_monitor(logs, tmp_path, building(baseline_inputs, tmp_path))

    assert code == DRIFT_EXIT_CODE
    reasons = capsys.readouterr().err.splitlines()
    drifted = {line.removeprefix("drift: ").split(" drifted:")[0] for line in reasons}
    assert {"confidence", "not-sure share", "image contrast"} <= drifted, reasons
    assert not {"image width", "image height"} & drifted, reasons  # the same size as the photos
    (not_sure,) = [line for line in reasons if line.startswith("drift: not-sure share")]
    assert "of the traffic's answers are not sure" in not_sure
    assert metrics["not_sure_share"] > 0.9 and metrics["contrast_psi"] > 0.25
    assert all(line.removeprefix("drift: ") in report for line in reasons)


def test_no_logs_yet_passes_with_zero_requests(tmp_path, baseline_inputs):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / ".gitignore").write_text("*\n")  # the committed folder the dvc stage reads holds only this

    code, metrics, report = run_monitor(logs, tmp_path, building(baseline_inputs, tmp_path))

    assert code == 0
    assert metrics["n_requests"] == 0 and metrics["drift"] is False and metrics["class_psi"] is None
    assert "# Drift check: no traffic logged" in report and "Nothing to compare" in report


def test_too_little_traffic_is_shown_but_not_judged(tmp_path, samples, class_names, baseline_inputs):
    keyboard = class_names.index("keyboard")
    photos = [[] for _ in class_names]
    photos[keyboard] = samples["rest"][keyboard][:12]  # one class only, but far under monitor.min_images
    logs = write_logs(tmp_path / "logs", answered_traffic(photo_traffic(photos), class_names, seed=5))

    code, metrics, report = run_monitor(logs, tmp_path, building(baseline_inputs, tmp_path))

    assert code == 0
    assert metrics["judged"] is False and metrics["drift"] is False and metrics["class_psi"] > 0.25
    assert "nothing is judged" in report and "| class distribution | PSI |" in report


def test_a_saved_baseline_gives_the_same_verdict(tmp_path, samples, class_names, baseline_inputs):
    """`make monitor LOGS=...` reads the baseline the dvc stage built instead of building it again."""
    keyboard = class_names.index("keyboard")
    photos = [[] for _ in class_names]
    photos[keyboard] = samples["rest"][keyboard][:60]
    logs = write_logs(tmp_path / "logs", answered_traffic(photo_traffic(photos), class_names, seed=3))
    built = run_monitor(logs, tmp_path / "built", building(baseline_inputs, tmp_path / "built"))

    saved = ["--baseline", str(tmp_path / "built" / "baseline.json")]
    assert run_monitor(logs, tmp_path / "read", saved) == built


def test_baseline_inputs_belong_to_baseline_out(tmp_path, baseline_inputs, capsys):
    with pytest.raises(SystemExit) as usage:
        main(["--logs", str(tmp_path), "--baseline", str(tmp_path / "b.json"), *baseline_inputs[:2],
              "--metrics", str(tmp_path / "m.json"), "--report", str(tmp_path / "r.md")])  # fmt: skip
    assert usage.value.code == 2 and "use them with --baseline-out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["--logs", str(tmp_path), "--baseline-out", str(tmp_path / "b.json"),
              "--metrics", str(tmp_path / "m.json"), "--report", str(tmp_path / "r.md")])  # fmt: skip
    assert usage.value.code == 2 and "--splits" in capsys.readouterr().err


# ----- end to end: what the model server logged, through the CLI -------------------------------------------------
def keras_probabilities(model: TinyModel, images: list[bytes]) -> np.ndarray:
    """The tiny Keras model's probabilities, as evaluate computes them (decoded and resized as in training)."""
    import keras
    import tensorflow as tf

    from common.images import decode_and_resize

    classifier = keras.saving.load_model(model.keras_model, compile=False)
    pixels = np.stack([decode_and_resize(tf.constant(data), model.image_size).numpy() for data in images])
    return classifier.predict(pixels, verbose=0)


def predict_over_grpc(grpc_address: str, images: list[bytes]) -> None:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    with grpc.insecure_channel(grpc_address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for data in images:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = MODEL_NAME
            request.model_spec.signature_name = SERVING_DEFAULT
            request.inputs[IMAGE_BYTES].CopyFrom(tf.make_tensor_proto([data], dtype=tf.string))
            stub.Predict(request, timeout=30)


def logged_records(logs: Path, want: int, timeout_s: float = 30) -> int:
    """How many records the server has written under `logs`, once `want` are there (the writer is a thread)."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = sum(1 for _ in read_prediction_logs(logs))
        if count >= want or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


@pytest.mark.slow
def test_cli_names_the_drift_in_what_the_model_server_logged(tmp_path, tiny_model: TinyModel):
    """The tiny model served with a logging_config (rate 1.0) logs single-class traffic itself; the baseline is its
    training-like photos and the Keras model's predictions on others, as evaluate makes them. `python -m
    components.monitor` reads the server's files and names the class-distribution drift."""
    names = tiny_model.class_names
    images = write_dataset(tmp_path / "images", names, per_class=6, size=PHOTO_SIZE, start=100)
    rows = [(str(path.relative_to(images)), path.parent.name) for path in sorted(images.rglob("*.jpg"))]
    splits = write_splits(tmp_path / "splits", rows, names)
    evaluated = [(jpeg_bytes(synthetic_image(c, v, PHOTO_SIZE)), c) for c in range(len(names)) for v in range(4)]
    labels = np.asarray([label for _, label in evaluated])
    probabilities = keras_probabilities(tiny_model, [data for data, _ in evaluated])
    evaluation = write_evaluation(tmp_path / "evaluation", labels, probabilities, names)

    export_tiny(tiny_model, tmp_path / "models")
    logs = tmp_path / "logs"
    config = tmp_path / "models.config"
    config.write_text(
        f'model_config_list {{ config {{ name: "{MODEL_NAME}" base_path: "{tmp_path / "models" / MODEL_NAME}" '
        f'model_platform: "tensorflow" logging_config {{ log_collector_config {{ type: "" filename_prefix: '
        f'"{logs}/" }} sampling_config {{ sampling_rate: 1.0 }} }} }} }}\n'
    )
    keyboard = names.index("keyboard")
    traffic = [jpeg_bytes(synthetic_image(keyboard, variant, PHOTO_SIZE)) for variant in range(200, 260)]
    with start_model_server(tmp_path / "server", f"--model_config_file={config}") as server:
        wait_for_versions(server.grpc_address, MODEL_NAME, {1: "AVAILABLE"})
        predict_over_grpc(server.grpc_address, traffic)
        assert logged_records(logs, len(traffic)) == len(traffic)

    completed = subprocess.run(
        [sys.executable, "-m", "components.monitor", "--logs", str(logs), "--splits", str(splits),
         "--images", str(images), "--evaluation", str(evaluation / "evaluate.json"),
         "--confusion-csv", str(evaluation / "confusion.csv"),
         "--risk-coverage-csv", str(evaluation / "risk_coverage.csv"), "--params", str(PARAMS),
         "--baseline-out", str(tmp_path / "baseline.json"), "--metrics", str(tmp_path / "monitor.json"),
         "--report", str(tmp_path / "monitor.md")],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip

    assert completed.returncode == DRIFT_EXIT_CODE, completed.stderr
    # The tiny model calls (nearly) all of them keyboards; 4 of the 56 evaluated photos are keyboards.
    assert re.search(r"drift: class distribution drifted: .*; keyboard is 9\d% of the traffic's predictions, "
                     r"7% of the evaluation's", completed.stderr), completed.stderr  # fmt: skip
    assert "Monitor: DRIFT (60 images in 60 requests)" in completed.stdout
    assert "answered by productlens v1 (60)" in (tmp_path / "monitor.md").read_text()
    assert json.loads((tmp_path / "monitor.json").read_text())["n_requests"] == len(traffic)
