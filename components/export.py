"""Export step: turn a blessed Keras model into a serving candidate, a SavedModel in TF Serving layout.

Refuses a model the gate did not bless (non-zero exit, prints the reasons, writes nothing).
Otherwise writes the candidate folder (`artifacts/export/candidate/`, a DVC output) with:

- `saved_model.pb` + `variables/`, signatures (names from `serving.contract`)
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
- `model_card.json` (serving.contract.ModelCard less `version`): `weights_sha256` (a digest of the weight values),
  `evaluation` (evaluate.json as the gate judged it), `not_sure_threshold`, `max_pixels`, the gate's reasons, params.

Undecodable bytes fail the request (INVALID_ARGUMENT), never a confident answer. The card holds no
time or place, so the same inputs give the same card; run-time facts go to `--metrics`. The folder is
written beside its final name and renamed into place whole. Nothing here serves or publishes: the
`infra_validate` step serves the candidate in a real server process, and `python -m components.publish`
copies a blessed, validated candidate to `<models>/<model_name>/<N>/`.
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from common.cli import require_file, run_main
from common.images import decode_and_resize, fit_to_square
from common.io import atomic_directory, atomic_write_json, read_json
from common.params import ParamsError, build, load_params, section
from components.candidate import sample_images
from components.model import weights_digest
from serving.contract import (
    CLASS_IDS,
    CLASS_NAMES,
    CLASSIFICATION,
    CLASSIFY_CLASSES,
    CLASSIFY_INPUTS,
    CLASSIFY_METHOD,
    CLASSIFY_SCORES,
    DEFAULT_MAX_PIXELS,
    IMAGE_BYTES,
    MODEL_CARD_FILE,
    NOT_SURE_THRESHOLD,
    PIXELS,
    PREDICT_PIXELS,
    PREDICT_PIXELS_UINT8,
    PROBABILITIES,
    RESIZE_LAYER,
    SCORES,
    SERVING_DEFAULT,
    WARMUP_FILE,
)

log = logging.getLogger("components.export")


@dataclass(frozen=True)
class ExportParams:
    model_name: str = "productlens"
    top_k: int = 5
    warmup_images: int = 3  # images in the warmup records
    # validate.max_pixels in params.yaml: one limit for the data and the served model (load_export_params)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not self.model_name or "/" in self.model_name:
            raise ValueError(f"export.model_name {self.model_name!r} must be a plain name")
        if self.top_k < 1 or self.warmup_images < 1:
            raise ValueError("export: top_k and warmup_images must be >= 1")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a whole number >= 1, got {self.max_pixels!r}")


class ExportRefused(RuntimeError):
    """The gate did not bless the model."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("the gate did not bless this model")
        self.reasons = reasons


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
            PROBABILITIES: probabilities,
            CLASS_IDS: tf.cast(ids, tf.int64),
            CLASS_NAMES: tf.gather(names, ids),
            SCORES: scores,
            # One value per row, not a scalar: server-side batching splits every output along dimension 0.
            NOT_SURE_THRESHOLD: tf.fill(tf.shape(probabilities)[:1], threshold),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)])
    def serving_default(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        return answer(decode_batch(image_bytes))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUTS)])
    def classification(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        features = tf.io.parse_example(inputs, {IMAGE_BYTES: tf.io.FixedLenFeature([], tf.string)})
        result = answer(decode_batch(features[IMAGE_BYTES]))
        return {CLASSIFY_CLASSES: result[CLASS_NAMES], CLASSIFY_SCORES: result[SCORES]}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name=PIXELS)])
    def predict_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return answer(resize_pixels(pixels))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=PIXELS)])
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
        request.inputs[IMAGE_BYTES].CopyFrom(_tensor_proto(batch))
        records.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = model_name
    classify.model_spec.signature_name = CLASSIFICATION
    example = classify.input.example_list.examples.add()
    example.features.feature[IMAGE_BYTES].bytes_list.value.append(images[0])
    records.append(prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(request=classify)))
    return [record.SerializeToString() for record in records]


def write_warmup(directory: Path, records: list[bytes]) -> None:
    path = directory / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


# ----- the candidate ---------------------------------------------------------------------------------------
def signature_descriptions() -> dict[str, str]:
    """One line per signature for the model card: what goes in and what comes out."""
    outputs = f"{PROBABILITIES}, {CLASS_IDS}, {CLASS_NAMES}, {SCORES} (top-k), {NOT_SURE_THRESHOLD} float32[batch]"
    return {
        SERVING_DEFAULT: f"{IMAGE_BYTES} string[batch] -> {outputs}",
        CLASSIFICATION: f"{CLASSIFY_INPUTS}: serialized tf.Example, bytes feature {IMAGE_BYTES!r} -> "
        f"{CLASSIFY_CLASSES}, {CLASSIFY_SCORES}",
        PREDICT_PIXELS: f"{PIXELS} float32[batch, h, w, 3] in 0..255 -> as {SERVING_DEFAULT}",
        PREDICT_PIXELS_UINT8: f"{PIXELS} uint8[batch, h, w, 3] -> as {SERVING_DEFAULT}",
    }


def read_gate(gate_path: Path) -> dict[str, Any]:
    gate = read_json(gate_path)
    if not isinstance(gate, dict) or "blessed" not in gate:
        raise ValueError(f"{gate_path}: expected a JSON object with 'blessed' and 'reasons'")
    return gate


def export_candidate(
    model_path: Path,
    class_names: list[str],
    gate: dict[str, Any],
    evaluation: dict[str, Any],
    output: Path,
    params: ExportParams,
    images: list[bytes],
    all_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the serving candidate of a blessed model to `output` (replacing it whole); returns its model card.

    `evaluation` is evaluate's metrics: its `not_sure_threshold` (chosen on val) goes into every row of
    the `not_sure_threshold` output, and all of it into the card, where the gate reads a champion's.
    The first `warmup_images` of `images` (encoded sample photos) become the warmup records.
    `all_params` (params.yaml as the run used it) is recorded in the card.
    """
    if gate.get("blessed") is not True:
        raise ExportRefused([str(r) for r in gate.get("reasons", [])] or ["gate.json does not say blessed: true"])
    if NOT_SURE_THRESHOLD not in evaluation:
        raise ValueError(f"the evaluation has no {NOT_SURE_THRESHOLD}")
    not_sure_threshold = check_not_sure_threshold(evaluation[NOT_SURE_THRESHOLD], "evaluation")
    if not images:
        raise ValueError("export needs at least one sample image for the warmup records")
    model = keras.saving.load_model(model_path, compile=False)
    image_size = image_size_of(model)
    n_outputs = int(model.outputs[0].shape[-1])
    if n_outputs != len(class_names):
        raise ValueError(f"the model has {n_outputs} outputs but there are {len(class_names)} class names")
    log.info("exporting %s (image size %d, %d classes) to %s", model_path, image_size, len(class_names), output)
    card = {
        "model_name": params.model_name,
        "image_size": image_size,
        "class_names": class_names,
        NOT_SURE_THRESHOLD: not_sure_threshold,
        "max_pixels": params.max_pixels,  # image bytes with more pixels are refused from their header
        "top_k": min(params.top_k, len(class_names)),
        "weights_sha256": weights_digest(model),
        "evaluation": evaluation,
        "gate": {"blessed": True, "reasons": [str(r) for r in gate.get("reasons", [])]},
        "signatures": signature_descriptions(),
        **({"params": all_params} if all_params is not None else {}),
    }
    with atomic_directory(Path(output)) as staging:
        write_saved_model(model, class_names, image_size, params.top_k, not_sure_threshold, staging, params.max_pixels)
        write_warmup(staging, warmup_records(params.model_name, images[: params.warmup_images]))
        atomic_write_json(staging / MODEL_CARD_FILE, card)
    return card


def folder_megabytes(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6, 1)


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
    parser.add_argument("--samples", type=Path, required=True, help="a split CSV (e.g. test.csv) or an image folder")
    parser.add_argument("--images", type=Path, default=None, help="root the CSV's paths are relative to")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--output", type=Path, required=True, help="the candidate folder (replaced whole)")
    parser.add_argument("--metrics", type=Path, default=None, help="write {export_seconds, candidate_mb} here")
    return parser.parse_args(argv)


def refuse(message: str, reasons: list[str] = ()) -> int:
    print(f"Export refused: {message}", file=sys.stderr)
    for reason in reasons:
        print(f"  - {reason}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    require_file(args.model, "model", "run the train stage first")
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so the half-written candidate beside the output is removed.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    gate = read_gate(args.gate)
    if gate.get("blessed") is not True:
        reasons = [str(r) for r in gate.get("reasons", [])] or ["gate.json does not say blessed: true"]
        return refuse(f"the gate did not bless {args.model} ({args.gate}):", reasons)
    evaluation = read_json(args.evaluation)
    if NOT_SURE_THRESHOLD not in evaluation:
        return refuse(
            f"{args.evaluation} has no {NOT_SURE_THRESHOLD}; rerun evaluate (python -m components.evaluate "
            "chooses it on val for evaluate.target_precision)"
        )
    params = load_export_params(args.params)
    started = time.monotonic()
    card = export_candidate(
        args.model,
        [str(c) for c in read_json(args.class_names)],
        gate,
        evaluation,
        args.output,
        params,
        sample_images(args.samples, args.images, params.warmup_images),
        all_params=load_params(args.params),
    )
    if args.metrics is not None:
        seconds = round(time.monotonic() - started, 1)
        atomic_write_json(args.metrics, {"export_seconds": seconds, "candidate_mb": folder_megabytes(args.output)})
    print(f"exported candidate {args.output} (weights sha256 {card['weights_sha256'][:12]}); infra_validate is next")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, expected=(ExportRefused,)))
