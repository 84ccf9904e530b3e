"""Export step: turn a blessed Keras model into an infra-validated TF Serving version.

Refuses a model the gate did not bless (non-zero exit, prints the reasons, writes nothing).
Otherwise writes `<output>/<model_name>/<N>/` (N = highest existing version + 1) with:

- `saved_model.pb` + `variables/`, signatures
  - `serving_default`: `image_bytes` (string [batch], encoded JPEG/PNG/GIF/BMP, decoded and resized
    in the graph with the training code's `decode_and_resize`) -> `probabilities` float32
    [batch, n_classes], top-k `class_ids` int64, `class_names` string, `scores` float32, and
    `not_sure_threshold` float32 [batch] (the same value in every row: the top-1 probability under
    which a client should say "not sure", chosen by evaluate on val, so each version brings its own);
  - `classification`: TF Serving's Classify API; input `inputs` (serialized tf.Example with an
    `image_bytes` bytes feature) -> top-k `classes` and `scores`;
  - `predict_pixels` (float32 0..255 [batch, h, w, 3]) and `predict_pixels_uint8` (uint8) for
    clients that decode themselves; resized in the graph like image bytes are; outputs as serving_default;
  - image bytes (serving_default, classification) are checked against `max_pixels` (validate.max_pixels
    in params.yaml) from their header before anything is decoded: a bigger image fails with INVALID_ARGUMENT
    naming the limit (in the real tensorflow/serving too), and bytes that are not a JPEG/PNG/GIF/BMP as unsupported;
- `assets.extra/tf_serving_warmup_requests`: PredictionLog records TF Serving replays on load;
- `model_card.json`: data md5, params, metrics (evaluate.json as is), `not_sure_threshold`, `max_pixels`,
  gate reasons, git commit, time.

Undecodable bytes fail the request (INVALID_ARGUMENT), never a confident answer. The version is
built in a hidden temporary directory and renamed into place only after infra validation: a
separate model-server process loads it, replays the warmup records and a few images over gRPC
and REST, and the answers must equal the Keras model's within `validation_atol` (and carry the
card's not-sure threshold), and it must refuse bytes that are not an image and an image over
`max_pixels`. A crash or kill at any point leaves no visible version.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime as dt
import json
import logging
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
import yaml

from common.images import DEFAULT_MAX_PIXELS, decode_and_resize, fit_to_square
from common.io import atomic_directory, atomic_write_json, read_json, sha256_of_file
from common.params import ParamsError, build, load_params, section

log = logging.getLogger("components.export")

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVING_DEFAULT = "serving_default"
CLASSIFICATION = "classification"
PREDICT_PIXELS = "predict_pixels"
PREDICT_PIXELS_UINT8 = "predict_pixels_uint8"
IMAGE_FEATURE = "image_bytes"
CLASSIFY_METHOD = "tensorflow/serving/classify"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MODEL_CARD = "model_card.json"
NOT_SURE_THRESHOLD = "not_sure_threshold"  # the output, the model card key and the evaluate.json key
RESIZE_LAYER = "resize"  # components.model.RESIZE_LAYER; read from the model when its input size is not fixed


@dataclass(frozen=True)
class ExportParams:
    model_name: str = "productlens"
    top_k: int = 5
    warmup_images: int = 3  # images in the warmup records
    validation_images: int = 8  # test images replayed through the server before publishing
    validation_atol: float = 1e-4  # max |served - Keras| probability difference
    validation_timeout_s: float = 180.0  # for the validation server to load the version
    # validate.max_pixels in params.yaml: one limit for the data and the served model (load_export_params)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not self.model_name or "/" in self.model_name:
            raise ValueError(f"export.model_name {self.model_name!r} must be a plain name")
        if self.top_k < 1 or self.warmup_images < 1 or self.validation_images < 1:
            raise ValueError("export: top_k, warmup_images and validation_images must be >= 1")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a whole number >= 1, got {self.max_pixels!r}")


class ExportRefused(RuntimeError):
    """The gate did not bless the model."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("the gate did not bless this model")
        self.reasons = reasons


class InfraValidationError(RuntimeError):
    """The exported SavedModel does not serve the Keras model's answers."""


@dataclass(frozen=True)
class ExportResult:
    version: int
    path: Path
    card: dict[str, Any]


# ----- the servable --------------------------------------------------------------------------------------
def image_size_of(model: keras.Model) -> int:
    """S, the side the model sees: a fixed input shape [None, S, S, 3], else the size of its `resize` layer."""
    shape = tuple(model.inputs[0].shape)
    if len(shape) == 4 and shape[1] and shape[2]:
        if shape[1] != shape[2]:
            raise ValueError(f"model input {shape} is not square")
        return int(shape[1])
    with contextlib.suppress(ValueError):
        layer = model.get_layer(RESIZE_LAYER)
        return int(layer.get_config()["height"])
    raise ValueError(f"cannot tell the model's image size: input {shape} and no {RESIZE_LAYER!r} layer")


def check_not_sure_threshold(value: Any, where: str) -> float:
    """The threshold as a float in [0, 1]; anything else is an error naming where it came from."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where}: not_sure_threshold must be a probability in [0, 1], got {value!r}")
    return float(value)


def build_archive(
    model: keras.Model,
    class_names: list[str],
    image_size: int,
    top_k: int,
    not_sure_threshold: float,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> keras.export.ExportArchive:
    """The four serving signatures over `model`, preprocessing included; image bytes over `max_pixels` are refused."""
    k = min(top_k, len(class_names))
    names = tf.constant(class_names)
    threshold = tf.constant(not_sure_threshold, tf.float32)

    def decode_batch(image_bytes: tf.Tensor) -> tf.Tensor:
        return tf.map_fn(
            lambda one: decode_and_resize(one, image_size, max_pixels),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )

    def resize_pixels(pixels: tf.Tensor) -> tf.Tensor:
        # The same resize as decode_and_resize, so decoded pixels and image bytes give equal answers. No pixel
        # limit: these arrive decoded, already as big as the request (whose size the server caps).
        return fit_to_square(pixels, image_size)

    def answer(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.cast(model(pixels, training=False), tf.float32)
        scores, ids = tf.math.top_k(probabilities, k=k)
        return {
            "probabilities": probabilities,
            "class_ids": tf.cast(ids, tf.int64),
            "class_names": tf.gather(names, ids),
            "scores": scores,
            # One value per row, not a scalar: server-side batching splits every output along dimension 0.
            NOT_SURE_THRESHOLD: tf.fill(tf.shape(probabilities)[:1], threshold),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serving_default(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        return answer(decode_batch(image_bytes))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classification(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        features = tf.io.parse_example(inputs, {IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)})
        result = answer(decode_batch(features[IMAGE_FEATURE]))
        return {"classes": result["class_names"], "scores": result["scores"]}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels")])
    def predict_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return answer(resize_pixels(pixels))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="pixels")])
    def predict_pixels_uint8(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return answer(resize_pixels(pixels))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SERVING_DEFAULT, serving_default)
    archive.add_endpoint(CLASSIFICATION, classification)
    archive.add_endpoint(PREDICT_PIXELS, predict_pixels)
    archive.add_endpoint(PREDICT_PIXELS_UINT8, predict_pixels_uint8)
    return archive


def _mark_classification_signature(directory: Path) -> None:
    """Give `classification` the classify method name, so TF Serving accepts it even with the method-name check on."""
    from tensorflow.core.protobuf import saved_model_pb2

    path = directory / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel.FromString(path.read_bytes())
    for meta_graph in saved_model.meta_graphs:
        if CLASSIFICATION in meta_graph.signature_def:
            meta_graph.signature_def[CLASSIFICATION].method_name = CLASSIFY_METHOD
    path.write_bytes(saved_model.SerializeToString())


def write_saved_model(
    model: keras.Model,
    class_names: list[str],
    image_size: int,
    top_k: int,
    not_sure_threshold: float,
    directory: Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    archive = build_archive(model, class_names, image_size, top_k, not_sure_threshold, max_pixels)
    with contextlib.redirect_stdout(sys.stderr):  # ExportArchive prints its endpoint list
        archive.write_out(str(directory), verbose=False)
    _mark_classification_signature(directory)


def oversized_png_header(max_pixels: int) -> bytes:
    """The signature and IHDR of a PNG one pixel per side over `max_pixels` (no pixel data: it must not be needed)."""
    side = math.isqrt(max_pixels) + 1
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    chunk = b"IHDR" + header
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _tensor_proto(values: list[bytes]):
    return tf.make_tensor_proto(values, dtype=tf.string, shape=[len(values)])


def warmup_records(model_name: str, images: list[bytes]) -> list[bytes]:
    """Serialized PredictionLogs: Predict on one image and on a batch, and Classify on one image."""
    from tensorflow_serving.apis import classification_pb2, predict_pb2, prediction_log_pb2

    records = []
    for batch in ([images[0]], images):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = SERVING_DEFAULT
        request.inputs["image_bytes"].CopyFrom(_tensor_proto(batch))
        records.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = model_name
    classify.model_spec.signature_name = CLASSIFICATION
    example = classify.input.example_list.examples.add()
    example.features.feature[IMAGE_FEATURE].bytes_list.value.append(images[0])
    records.append(prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(request=classify)))
    return [record.SerializeToString() for record in records]


def write_warmup(directory: Path, records: list[bytes]) -> None:
    path = directory / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


# ----- versions on disk ------------------------------------------------------------------------------------
def next_version(model_dir: Path) -> int:
    existing = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    return max(existing, default=0) + 1


def remove_stale_staging(model_dir: Path) -> None:
    """Hidden `.N.*.tmp` directories are what a killed export left; they were never visible versions."""
    if not model_dir.is_dir():
        return
    for path in model_dir.iterdir():
        if path.name.startswith(".") and path.name.endswith((".tmp", ".old")) and path.is_dir():
            log.warning("removing %s, left by an export that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)


def _make_world_readable(directory: Path) -> None:
    """Temp files and dirs are created private (0600/0700); a model server in a container may run as another user."""
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


# ----- model card -----------------------------------------------------------------------------------------
def data_md5(dvc_file: Path) -> str | None:
    outs = (yaml.safe_load(Path(dvc_file).read_text(encoding="utf-8")) or {}).get("outs", [])
    return outs[0].get("md5") if outs else None


def git_commit(cwd: Path = REPO_ROOT) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


# ----- infra validation -------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child before exec: the validation server gets SIGTERM when the export dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def model_server_process(
    base_path: Path, model_name: str, workdir: Path, timeout_s: float, extra_args: tuple[str, ...] = ()
) -> Iterator[dict[str, Any]]:
    """Start `python -m serving.server` on free loopback ports; yield {grpc_port, rest_port, pid, process}."""
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)  # a stale one would point at a dead server's ports
    log_path = workdir / "server.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [
        sys.executable, "-m", "serving.server",
        "--host=127.0.0.1", "--port=0", "--rest_api_port=-1",
        f"--model_name={model_name}", f"--model_base_path={base_path}",
        "--enable_batching", "--file_system_poll_wait_seconds=0.5",
        f"--ready_file={ready}", *extra_args,
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if process.poll() is not None:
                raise InfraValidationError(
                    f"the validation server exited with {process.returncode}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise InfraValidationError(
                    f"the validation server did not start in {timeout_s:.0f}s:\n{_tail(log_path)}"
                )
            time.sleep(0.1)
        info = read_json(ready)
        info["process"] = process
        info["log"] = log_path
        yield info
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def _keras_probabilities(model: keras.Model, images: list[bytes], image_size: int) -> np.ndarray:
    pixels = tf.stack([decode_and_resize(tf.constant(b), image_size) for b in images])
    return np.asarray(model(pixels, training=False), dtype=np.float32)


def infra_validate(
    staging: Path,
    version: int,
    model: keras.Model,
    class_names: list[str],
    image_size: int,
    images: list[bytes],
    params: ExportParams,
    not_sure_threshold: float,
) -> dict[str, Any]:
    """Serve `staging` from a separate server process and check it answers like `model`, with the model
    card's not-sure threshold in every row; raise if not."""
    import grpc
    import requests
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_log_pb2,
        prediction_service_pb2_grpc,
    )

    started = time.monotonic()
    expected = _keras_probabilities(model, images, image_size)
    name = params.model_name
    with tempfile.TemporaryDirectory(prefix="infra-validation-") as tmp:
        base = Path(tmp) / "models" / name
        base.mkdir(parents=True)
        (base / str(version)).symlink_to(staging.resolve(), target_is_directory=True)
        with model_server_process(base, name, Path(tmp), params.validation_timeout_s) as server:
            channel = grpc.insecure_channel(f"127.0.0.1:{server['grpc_port']}")
            predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            models = model_service_pb2_grpc.ModelServiceStub(channel)
            status_request = get_model_status_pb2.GetModelStatusRequest()
            status_request.model_spec.name = name
            deadline = time.monotonic() + params.validation_timeout_s
            while True:
                status = models.GetModelStatus(status_request, timeout=10)
                states = {s.version: s for s in status.model_version_status}
                entry = states.get(version)
                if entry is not None and entry.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE:
                    break
                if entry is not None and entry.state == get_model_status_pb2.ModelVersionStatus.END:
                    raise InfraValidationError(
                        f"the server could not load version {version}: {entry.status.error_message}"
                    )
                if time.monotonic() > deadline:
                    raise InfraValidationError(f"version {version} not AVAILABLE after {params.validation_timeout_s}s")
                time.sleep(0.2)

            # 1. The warmup records, replayed through the protocol.
            for record in tf.data.TFRecordDataset(str(staging / WARMUP_FILE)):
                entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
                if entry.HasField("predict_log"):
                    predictions.Predict(entry.predict_log.request, timeout=60)
                elif entry.HasField("classify_log"):
                    predictions.Classify(entry.classify_log.request, timeout=60)

            # 2. The signatures are all there.
            metadata_request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            metadata_request.model_spec.name = name
            metadata = predictions.GetModelMetadata(metadata_request, timeout=30)
            signatures = get_model_metadata_pb2.SignatureDefMap()
            metadata.metadata["signature_def"].Unpack(signatures)
            missing = {SERVING_DEFAULT, CLASSIFICATION, PREDICT_PIXELS, PREDICT_PIXELS_UINT8} - set(
                signatures.signature_def
            )
            if missing:
                raise InfraValidationError(f"signatures missing from the served model: {sorted(missing)}")

            # 3. gRPC Predict, one image per request (what clients send) and all in one batch.
            request = predict_pb2.PredictRequest()
            request.model_spec.name = name
            request.model_spec.signature_name = SERVING_DEFAULT
            single, thresholds = [], {}
            for image in images:
                request.inputs["image_bytes"].CopyFrom(_tensor_proto([image]))
                outputs = predictions.Predict(request, timeout=60).outputs
                single.append(tf.make_ndarray(outputs["probabilities"])[0])
                thresholds.setdefault("grpc_single", []).extend(_served_thresholds(outputs, 1))
            request.inputs["image_bytes"].CopyFrom(_tensor_proto(images))
            outputs = predictions.Predict(request, timeout=60).outputs
            batched = tf.make_ndarray(outputs["probabilities"])
            thresholds["grpc_batch"] = _served_thresholds(outputs, len(images))

            # 4. REST predict and classify.
            rest = f"http://127.0.0.1:{server['rest_port']}/v1/models/{name}"
            instances = [{"b64": base64.b64encode(image).decode("ascii")} for image in images]
            reply = requests.post(f"{rest}:predict", json={"instances": instances}, timeout=60)
            if reply.status_code != 200:
                raise InfraValidationError(f"REST predict answered {reply.status_code}: {reply.text[:300]}")
            rows = reply.json()["predictions"]
            rest_probabilities = np.asarray([row["probabilities"] for row in rows], np.float32)
            thresholds["rest"] = [row.get(NOT_SURE_THRESHOLD) for row in rows]
            classify = classification_pb2.ClassificationRequest()
            classify.model_spec.name = name
            classify.model_spec.signature_name = CLASSIFICATION
            for image in images:
                example = classify.input.example_list.examples.add()
                example.features.feature[IMAGE_FEATURE].bytes_list.value.append(image)
            classified = predictions.Classify(classify, timeout=60)
            top_labels = [c.classes[0].label for c in classified.result.classifications]

            # 5. Bytes that are not an image are refused, not answered.
            request.inputs["image_bytes"].CopyFrom(_tensor_proto([b"this is not an image"]))
            try:
                predictions.Predict(request, timeout=60)
                raise InfraValidationError("undecodable image bytes were answered instead of refused")
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise InfraValidationError(
                        f"undecodable bytes gave {error.code().name}, not INVALID_ARGUMENT"
                    ) from error

            # 6. An image whose header is over the pixel limit is refused, naming the limit, before decoding.
            request.inputs["image_bytes"].CopyFrom(_tensor_proto([oversized_png_header(params.max_pixels)]))
            try:
                predictions.Predict(request, timeout=60)
                raise InfraValidationError(f"an image over max_pixels {params.max_pixels} was answered")
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT or str(params.max_pixels) not in error.details():
                    raise InfraValidationError(
                        f"an image over max_pixels gave {error.code().name}: {error.details()}"
                    ) from error
            channel.close()

    differences = {
        "grpc_single": float(np.max(np.abs(np.stack(single) - expected))),
        "grpc_batch": float(np.max(np.abs(batched - expected))),
        "rest": float(np.max(np.abs(rest_probabilities - expected))),
    }
    expected_labels = [class_names[i] for i in expected.argmax(axis=1)]
    label_mismatches = sum(a != b for a, b in zip(top_labels, expected_labels, strict=True))
    want = float(np.float32(not_sure_threshold))  # what a float32 output can hold
    wrong_thresholds = {
        path: values for path, values in thresholds.items() if any(v is None or float(v) != want for v in values)
    }
    if wrong_thresholds:
        raise InfraValidationError(
            f"the served {NOT_SURE_THRESHOLD} is not the model card's {want} in every row: {wrong_thresholds}"
        )
    report = {
        "images": len(images),
        "max_abs_difference": differences,
        "tolerance": params.validation_atol,
        "classify_top1_mismatches": label_mismatches,
        NOT_SURE_THRESHOLD: want,
        "seconds": round(time.monotonic() - started, 1),
    }
    worst = max(differences.values())
    if worst > params.validation_atol or label_mismatches:
        raise InfraValidationError(
            f"served answers differ from the Keras model's: {json.dumps(report)} (tolerance {params.validation_atol})"
        )
    return report


def _served_thresholds(outputs: Any, rows: int) -> list[float | None]:
    """The not-sure threshold of each row of a Predict response ([None] * rows when the output is missing)."""
    if NOT_SURE_THRESHOLD not in outputs:
        return [None] * rows
    values = tf.make_ndarray(outputs[NOT_SURE_THRESHOLD])
    if values.shape != (rows,):
        raise InfraValidationError(f"{NOT_SURE_THRESHOLD} has shape {list(values.shape)}, expected [{rows}]")
    return [float(v) for v in values]


# ----- the step ---------------------------------------------------------------------------------------------
def read_gate(gate_path: Path) -> dict[str, Any]:
    gate = read_json(gate_path)
    if not isinstance(gate, dict) or "blessed" not in gate:
        raise ValueError(f"{gate_path}: expected a JSON object with 'blessed' and 'reasons'")
    return gate


def export(
    model_path: Path,
    class_names: list[str],
    gate: dict[str, Any],
    output: Path,
    params: ExportParams,
    images: list[bytes],
    *,
    not_sure_threshold: float,
    card: dict[str, Any] | None = None,
    validate: bool = True,
) -> ExportResult:
    """Export a blessed model as the next version under output/<model_name>/; nothing is visible unless it all works.

    `images` are encoded sample photos: the first `warmup_images` go into the warmup records and
    the first `validation_images` are replayed through a real server before publishing.
    `not_sure_threshold` (evaluate's, chosen on val) goes into the model card and into every row of
    the `not_sure_threshold` output, where a client reads it.
    """
    if gate.get("blessed") is not True:
        raise ExportRefused([str(r) for r in gate.get("reasons", [])] or ["gate.json does not say blessed: true"])
    not_sure_threshold = check_not_sure_threshold(not_sure_threshold, "export")
    if not images:
        raise ValueError("export needs at least one sample image for warmup and infra validation")
    started = time.monotonic()
    model = keras.saving.load_model(model_path, compile=False)
    image_size = image_size_of(model)
    n_outputs = int(model.outputs[0].shape[-1])
    if n_outputs != len(class_names):
        raise ValueError(f"the model has {n_outputs} outputs but there are {len(class_names)} class names")
    model_dir = Path(output) / params.model_name
    remove_stale_staging(model_dir)
    version = next_version(model_dir)
    final = model_dir / str(version)
    log.info("exporting %s (image size %d, %d classes) as %s", model_path, image_size, len(class_names), final)
    with atomic_directory(final, replace=False) as staging:
        write_saved_model(model, class_names, image_size, params.top_k, not_sure_threshold, staging, params.max_pixels)
        write_warmup(staging, warmup_records(params.model_name, images[: params.warmup_images]))
        model_card = {
            "model_name": params.model_name,
            "version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "image_size": image_size,
            "class_names": class_names,
            NOT_SURE_THRESHOLD: not_sure_threshold,
            "max_pixels": params.max_pixels,  # image bytes with more pixels are refused from their header
            "signatures": {
                SERVING_DEFAULT: "image_bytes string[batch] -> probabilities, class_ids, class_names, scores (top-k), "
                f"{NOT_SURE_THRESHOLD} float32[batch]",
                CLASSIFICATION: f"inputs: serialized tf.Example, bytes feature {IMAGE_FEATURE!r} -> classes, scores",
                PREDICT_PIXELS: "pixels float32[batch, h, w, 3] in 0..255 -> as serving_default",
                PREDICT_PIXELS_UINT8: "pixels uint8[batch, h, w, 3] -> as serving_default",
            },
            "top_k": min(params.top_k, len(class_names)),
            "source_model": {"path": str(model_path), "sha256": sha256_of_file(model_path)},
            "gate": {"blessed": True, "reasons": list(gate.get("reasons", []))},
            **(card or {}),
        }
        if validate:
            model_card["infra_validation"] = infra_validate(
                staging,
                version,
                model,
                class_names,
                image_size,
                images[: params.validation_images],
                params,
                not_sure_threshold,
            )
            log.info("infra validation passed: %s", model_card["infra_validation"])
        else:
            model_card["infra_validation"] = None
        model_card["export_seconds"] = round(time.monotonic() - started, 1)
        atomic_write_json(staging / MODEL_CARD, model_card)
        _make_world_readable(staging)
    log.info("published %s", final)
    return ExportResult(version, final, model_card)


def sample_images(samples: Path, images_root: Path | None, count: int) -> list[bytes]:
    """The first `count` images of a split CSV (paths relative to images_root), or of a directory, sorted."""
    samples = Path(samples)
    if samples.is_dir():
        paths = sorted(p for p in samples.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".gif", ".bmp"})
    else:
        frame = pd.read_csv(samples, dtype={"path": "string"})
        root = Path(images_root) if images_root is not None else samples.parent
        paths = [root / p for p in frame["path"]]
    if not paths:
        raise ValueError(f"{samples}: no sample images")
    return [Path(p).read_bytes() for p in paths[:count]]


def load_export_params(path: Path) -> ExportParams:
    """The `export:` section, plus `max_pixels` from `validate:`: the data and the served model share one limit."""
    params = load_params(path)
    values = dict(section(params, "export"))
    if "max_pixels" in values:
        raise ParamsError(f"{path}:export: max_pixels belongs under validate: (one limit for data and serving)")
    validate = section(params, "validate")
    if "max_pixels" not in validate:
        raise ParamsError(f"{path}:validate: missing key 'max_pixels' (the served model's pixel limit)")
    return build(ExportParams, {**values, "max_pixels": validate["max_pixels"]}, f"{path}:export")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the trained .keras model")
    parser.add_argument("--class-names", type=Path, required=True, help="class_names.json, in output order")
    parser.add_argument("--gate", type=Path, required=True, help="gate.json: {blessed, reasons, ...}")
    parser.add_argument("--evaluation", type=Path, required=True, help="evaluate.json, copied into the model card")
    parser.add_argument("--data-dvc", type=Path, default=Path("data.dvc"), help="the dataset's .dvc file (md5)")
    parser.add_argument("--samples", type=Path, required=True, help="a split CSV (e.g. test.csv) or an image folder")
    parser.add_argument("--images", type=Path, default=None, help="root the CSV's paths are relative to")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--output", type=Path, default=Path("models"), help="export base: <output>/<model_name>/<N>/")
    parser.add_argument("--report", type=Path, default=None, help="write {version, path, infra_validation} here")
    parser.add_argument("--skip-infra-validation", action="store_true", help="development only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so the staging directory and the validation server are cleaned up.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    gate = read_gate(args.gate)
    if gate.get("blessed") is not True:
        reasons = [str(r) for r in gate.get("reasons", [])] or ["gate.json does not say blessed: true"]
        print(f"Export refused: the gate did not bless {args.model} ({args.gate}):", file=sys.stderr)
        for reason in reasons:
            print(f"  - {reason}", file=sys.stderr)
        return 1
    params = load_export_params(args.params)
    all_params = load_params(args.params)
    class_names = [str(c) for c in read_json(args.class_names)]
    count = max(params.warmup_images, params.validation_images)
    evaluation = read_json(args.evaluation)
    if NOT_SURE_THRESHOLD not in evaluation:
        print(
            f"Export refused: {args.evaluation} has no {NOT_SURE_THRESHOLD}; rerun evaluate (python -m "
            "components.evaluate chooses it on val for evaluate.target_precision)",
            file=sys.stderr,
        )
        return 1
    not_sure_threshold = check_not_sure_threshold(evaluation[NOT_SURE_THRESHOLD], str(args.evaluation))
    card = {
        "data": {"dvc_file": str(args.data_dvc), "md5": data_md5(args.data_dvc) if args.data_dvc.exists() else None},
        "params": all_params,
        "metrics": evaluation,
        "git": git_commit(),
    }
    try:
        result = export(
            args.model,
            class_names,
            gate,
            args.output,
            params,
            sample_images(args.samples, args.images, count),
            not_sure_threshold=not_sure_threshold,
            card=card,
            validate=not args.skip_infra_validation,
        )
    except InfraValidationError as error:
        print(f"Export failed infra validation; nothing was published: {error}", file=sys.stderr)
        return 1
    if args.report is not None:
        atomic_write_json(
            args.report,
            {
                "model_name": params.model_name,
                "version": result.version,
                "path": str(result.path),
                NOT_SURE_THRESHOLD: result.card[NOT_SURE_THRESHOLD],
                "infra_validation": result.card["infra_validation"],
                "export_seconds": result.card["export_seconds"],
            },
        )
    print(f"exported {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
