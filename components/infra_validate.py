"""Infra validation step (TFX's InfraValidator): serve the export candidate in a real model-server process and
check that it answers like the Keras model it was exported from.

The candidate is copied as version 1 of a temporary model base and served by `python -m serving.server`
(started and stopped by `serving.process.model_server_process`). In order, each a named check:

- `weights`: the candidate's card names the sha256 of `--model` (it was exported from this model);
- `loads`: version 1 becomes AVAILABLE within `infra_validate.timeout_s`;
- `warmup`: the candidate's warmup records replay through the protocol;
- `signatures`: serving_default, classification, predict_pixels and predict_pixels_uint8 are served;
- `grpc_predict`, `rest_predict`, `classify`: `infra_validate.images` sample photos, over gRPC one per request
  and as one batch, over REST, and through the Classify API (top-1 as Keras's);
- `not_sure_threshold`: every row of every Predict answer carries the card's threshold;
- `refuses_non_image`, `refuses_oversized`: bytes that are not an image, and a PNG header over the card's
  `max_pixels`, come back INVALID_ARGUMENT (the latter naming the limit) instead of an answer;
- `matches_keras`: served probabilities equal the Keras model's within `infra_validate.atol`.

Writes the blessing (`blessed`, `reasons`, the candidate's identity: weights sha256 and digest, every check,
the differences) and metrics; exits 1 with the reasons when the candidate is not blessed. Publishing reads
the blessing and publishes only the candidate it names.
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import base64
import contextlib
import logging
import math
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import require_file, run_main
from common.io import atomic_write_json
from common.params import load_section
from components.candidate import CandidateError, identity, read_card, sample_images
from serving.contract import (
    CLASSIFICATION,
    IMAGE_BYTES,
    NOT_SURE_THRESHOLD,
    PREDICT_PIXELS,
    PREDICT_PIXELS_UINT8,
    PROBABILITIES,
    SERVING_DEFAULT,
    WARMUP_FILE,
)
from serving.process import model_server_process

log = logging.getLogger("components.infra_validate")

VERSION = 1  # the candidate's version in the temporary model base


@dataclass(frozen=True)
class InfraValidateParams:
    images: int = 8  # sample photos sent through every path
    atol: float = 1e-4  # max |served - Keras| probability difference
    timeout_s: float = 180.0  # for the server to start and load the candidate

    def __post_init__(self) -> None:
        if self.images < 1 or self.timeout_s <= 0:
            raise ValueError("infra_validate: images must be >= 1 and timeout_s > 0")


class InfraValidationError(RuntimeError):
    """The candidate failed a check; the message says which and why."""


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class Checks:
    """The checks run so far: `record` runs one, and turns any failure inside it into InfraValidationError."""

    done: list[Check] = field(default_factory=list)

    @contextlib.contextmanager
    def record(self, name: str, detail: str = "ok") -> Iterator[dict[str, str]]:
        outcome = {"detail": detail}  # the block may replace the detail with what it measured
        try:
            yield outcome
        except Exception as error:
            reason = f"{name}: {describe(error)}"
            self.done.append(Check(name, False, reason))
            raise InfraValidationError(reason) from error
        self.done.append(Check(name, True, outcome["detail"]))


def require(condition: bool, message: str) -> None:
    if not condition:
        raise InfraValidationError(message)


def describe(error: Exception) -> str:
    """An error as one line: gRPC's status code and details, or the exception's own message."""
    code = getattr(error, "code", None)
    if callable(code) and hasattr(error, "details"):
        return f"{code().name}: {error.details()}"
    return str(error) if isinstance(error, InfraValidationError) else f"{type(error).__name__}: {error}"


def oversized_png_header(max_pixels: int) -> bytes:
    """The signature and IHDR of a PNG one pixel per side over `max_pixels` (no pixel data: it must not be needed)."""
    side = math.isqrt(max_pixels) + 1
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    chunk = b"IHDR" + header
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def keras_probabilities(model: Any, images: list[bytes], image_size: int) -> np.ndarray:
    """What the Keras model says about `images`, decoded and resized as the served graph does."""
    import tensorflow as tf

    from common.images import decode_and_resize

    pixels = tf.stack([decode_and_resize(tf.constant(b), image_size) for b in images])
    return np.asarray(model(pixels, training=False), dtype=np.float32)


def served_thresholds(outputs: Any, rows: int) -> list[float | None]:
    """The not-sure threshold of each row of a Predict response ([None] * rows when the output is missing)."""
    import tensorflow as tf

    if NOT_SURE_THRESHOLD not in outputs:
        return [None] * rows
    values = tf.make_ndarray(outputs[NOT_SURE_THRESHOLD])
    if values.shape != (rows,):
        raise InfraValidationError(f"{NOT_SURE_THRESHOLD} has shape {list(values.shape)}, expected [{rows}]")
    return [float(v) for v in values]


def serve_and_check(
    candidate: Path, card: dict[str, Any], images: list[bytes], expected: np.ndarray, params: InfraValidateParams,
    checks: Checks, workdir: Path,
) -> dict[str, float]:  # fmt: skip
    """Serve `candidate` as version 1 and run the served checks; returns the max abs difference per path."""
    import grpc
    import requests
    import tensorflow as tf
    from tensorflow_serving.apis import (
        classification_pb2,
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_log_pb2,
        prediction_service_pb2_grpc,
    )

    def strings(values: list[bytes]) -> Any:
        return tf.make_tensor_proto(values, dtype=tf.string, shape=[len(values)])

    name = card["model_name"]
    base = workdir / "models" / name
    shutil.copytree(candidate, base / str(VERSION))
    server_args = [
        f"--model_name={name}", f"--model_base_path={base}", "--enable_batching", "--file_system_poll_wait_seconds=0.5",
    ]  # fmt: skip
    with contextlib.ExitStack() as stack:
        with checks.record("loads") as loads:
            server = stack.enter_context(model_server_process(workdir / "server", server_args, params.timeout_s))
            channel = stack.enter_context(grpc.insecure_channel(server.grpc_address))
            status_request = get_model_status_pb2.GetModelStatusRequest()
            status_request.model_spec.name = name
            models = model_service_pb2_grpc.ModelServiceStub(channel)
            deadline = time.monotonic() + params.timeout_s
            while True:
                status = models.GetModelStatus(status_request, timeout=10)
                entry = {s.version: s for s in status.model_version_status}.get(VERSION)
                if entry is not None and entry.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE:
                    break
                if entry is not None and entry.state == get_model_status_pb2.ModelVersionStatus.END:
                    raise InfraValidationError(f"the server could not load the candidate: {entry.status.error_message}")
                if time.monotonic() > deadline:
                    raise InfraValidationError(f"the candidate was not AVAILABLE after {params.timeout_s:g}s")
                time.sleep(0.2)
            loads["detail"] = f"AVAILABLE as version {VERSION} of {name}"
        predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        with checks.record("warmup") as warmup:
            replayed = 0
            for record in tf.data.TFRecordDataset(str(candidate / WARMUP_FILE)):
                entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
                if entry.HasField("predict_log"):
                    predictions.Predict(entry.predict_log.request, timeout=60)
                elif entry.HasField("classify_log"):
                    predictions.Classify(entry.classify_log.request, timeout=60)
                replayed += 1
            require(replayed > 0, f"no records in {WARMUP_FILE}")
            warmup["detail"] = f"{replayed} records replayed"

        with checks.record("signatures") as listed:
            metadata_request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            metadata_request.model_spec.name = name
            metadata = predictions.GetModelMetadata(metadata_request, timeout=30)
            signatures = get_model_metadata_pb2.SignatureDefMap()
            metadata.metadata["signature_def"].Unpack(signatures)
            wanted = {SERVING_DEFAULT, CLASSIFICATION, PREDICT_PIXELS, PREDICT_PIXELS_UINT8}
            missing = sorted(wanted - set(signatures.signature_def))
            require(not missing, f"signatures missing from the served model: {missing}")
            listed["detail"] = ", ".join(sorted(wanted))

        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.model_spec.signature_name = SERVING_DEFAULT
        thresholds: dict[str, list[float | None]] = {}
        with checks.record("grpc_predict", f"{len(images)} images one per request, then as one batch"):
            single = []
            for image in images:
                request.inputs[IMAGE_BYTES].CopyFrom(strings([image]))
                outputs = predictions.Predict(request, timeout=60).outputs
                single.append(tf.make_ndarray(outputs[PROBABILITIES])[0])
                thresholds.setdefault("grpc_single", []).extend(served_thresholds(outputs, 1))
            request.inputs[IMAGE_BYTES].CopyFrom(strings(images))
            outputs = predictions.Predict(request, timeout=60).outputs
            batched = tf.make_ndarray(outputs[PROBABILITIES])
            thresholds["grpc_batch"] = served_thresholds(outputs, len(images))

        with checks.record("rest_predict", f"{len(images)} images in one request"):
            instances = [{"b64": base64.b64encode(image).decode("ascii")} for image in images]
            reply = requests.post(
                f"{server.rest_url}/v1/models/{name}:predict", json={"instances": instances}, timeout=60
            )
            require(reply.status_code == 200, f"REST predict answered {reply.status_code}: {reply.text[:300]}")
            rows = reply.json()["predictions"]
            rest = np.asarray([row[PROBABILITIES] for row in rows], np.float32)
            thresholds["rest"] = [row.get(NOT_SURE_THRESHOLD) for row in rows]

        with checks.record("classify") as classified_check:
            classify = classification_pb2.ClassificationRequest()
            classify.model_spec.name = name
            classify.model_spec.signature_name = CLASSIFICATION
            for image in images:
                example = classify.input.example_list.examples.add()
                example.features.feature[IMAGE_BYTES].bytes_list.value.append(image)
            classified = predictions.Classify(classify, timeout=60)
            top_labels = [c.classes[0].label for c in classified.result.classifications]
            class_names = card["class_names"]
            expected_labels = [class_names[i] for i in expected.argmax(axis=1)]
            mismatches = sum(a != b for a, b in zip(top_labels, expected_labels, strict=True))
            require(not mismatches, f"top-1 class differs from the Keras model's on {mismatches} images")
            classified_check["detail"] = f"top-1 as the Keras model's on all {len(images)} images"

        with checks.record(NOT_SURE_THRESHOLD) as threshold_check:
            want = float(np.float32(card[NOT_SURE_THRESHOLD]))  # what a float32 output can hold
            wrong = {
                path: values
                for path, values in thresholds.items()
                if any(v is None or float(v) != want for v in values)
            }
            require(not wrong, f"the served {NOT_SURE_THRESHOLD} is not the model card's {want} in every row: {wrong}")
            threshold_check["detail"] = f"{want} in every row over gRPC and REST"

        refusals = (
            ("refuses_non_image", b"this is not an image", "bytes that are not an image", ""),
            (
                "refuses_oversized",
                oversized_png_header(card["max_pixels"]),
                f"an image over max_pixels {card['max_pixels']}",
                str(card["max_pixels"]),
            ),
        )
        for check_name, payload, what, must_name in refusals:
            with checks.record(check_name, f"{what}: INVALID_ARGUMENT"):
                request.inputs[IMAGE_BYTES].CopyFrom(strings([payload]))
                try:
                    predictions.Predict(request, timeout=60)
                except grpc.RpcError as error:
                    refused = error.code() == grpc.StatusCode.INVALID_ARGUMENT and must_name in (error.details() or "")
                    require(refused, f"{what} gave {error.code().name}: {error.details()}")
                else:
                    raise InfraValidationError(f"{what} was answered instead of refused")

    return {
        "grpc_single": float(np.max(np.abs(np.stack(single) - expected))),
        "grpc_batch": float(np.max(np.abs(batched - expected))),
        "rest": float(np.max(np.abs(rest - expected))),
    }


def infra_validate(
    candidate: Path, model_path: Path, images: list[bytes], params: InfraValidateParams
) -> dict[str, Any]:
    """Serve `candidate` and check it against the Keras model at `model_path`; returns the blessing.

    Never raises for a candidate that fails: the blessing says `blessed: false` with the reasons.
    """
    started = time.monotonic()
    checks = Checks()
    images = images[: params.images]
    differences: dict[str, float] = {}
    named: dict[str, Any] = {}
    try:
        with checks.record("weights") as weights:
            import keras

            from components.model import weights_digest

            card = read_card(candidate)
            named = identity(candidate)
            model = keras.saving.load_model(model_path, compile=False)
            require(
                weights_digest(model) == card["weights_sha256"],
                f"the candidate was exported from other weights (sha256 {card['weights_sha256']}) than {model_path}",
            )
            weights["detail"] = f"exported from {Path(model_path).name} (sha256 {card['weights_sha256'][:12]})"
        expected = keras_probabilities(model, images, int(card["image_size"]))
        with tempfile.TemporaryDirectory(prefix="infra-validation-") as workdir:
            differences = serve_and_check(Path(candidate), card, images, expected, params, checks, Path(workdir))
        with checks.record("matches_keras") as matches:
            worst = max(differences.values())
            require(
                worst <= params.atol,
                f"served probabilities differ from the Keras model's by up to {worst:.3g} (tolerance {params.atol:g})",
            )
            matches["detail"] = f"max |served - Keras| {worst:.3g} <= {params.atol:g} on {len(images)} images"
    except InfraValidationError as error:
        blessed, reasons = False, [str(error)]
    else:
        blessed, reasons = True, [check.detail for check in checks.done]
    return {
        "blessed": blessed,
        "reasons": reasons,
        "candidate": named,
        "checks": [asdict(check) for check in checks.done],
        "max_abs_difference": differences,
        "tolerance": params.atol,
        "images": len(images),
        "seconds": round(time.monotonic() - started, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.infra_validate", description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", type=Path, required=True, help="the export candidate folder")
    parser.add_argument("--model", type=Path, required=True, help="the .keras model the candidate was exported from")
    parser.add_argument("--samples", type=Path, required=True, help="a split CSV (e.g. test.csv) or an image folder")
    parser.add_argument("--images", type=Path, default=None, help="root the CSV's paths are relative to")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--blessing", type=Path, required=True, help="write the blessing JSON here")
    parser.add_argument("--metrics", type=Path, default=None, help="write {blessed, max_abs_difference, seconds} here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    require_file(args.model, "model", "run the train stage first")
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so the validation server is stopped and the temporary model base removed.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    params = load_section(InfraValidateParams, "infra_validate", args.params)
    blessing = infra_validate(
        args.candidate, args.model, sample_images(args.samples, args.images, params.images), params
    )
    atomic_write_json(args.blessing, blessing)
    if args.metrics is not None:
        worst = max(blessing["max_abs_difference"].values(), default=None)
        atomic_write_json(
            args.metrics,
            {"blessed": blessing["blessed"], "max_abs_difference": worst, "seconds": blessing["seconds"]},
        )
    if not blessing["blessed"]:
        print(f"Infra validation failed: {args.candidate} is not blessed:", file=sys.stderr)
        for reason in blessing["reasons"]:
            print(f"  - {reason}", file=sys.stderr)
        return 1
    print(f"Infra validation passed: {args.candidate} is blessed ({len(blessing['checks'])} checks)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, expected=(CandidateError,)))
