"""The serving contract: what export writes, what the model server loads and what clients send and read.

Export, infra validation, the gate, the model server, the recommender's client and the benchmarks import
these names; nothing else spells them. Stdlib only, so a client can import it without TensorFlow or gRPC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ----- layout: <base_path>/<model_name>/<version>/ ----------------------------------------------------------
# Versions are integer folder names; anything else (hidden staging folders `.N.*.tmp`, files) is not a version.
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"  # TF Serving's warmup location, in a version
MODEL_CARD_FILE = "model_card.json"  # in a version: what the model is, where it came from, how it was checked

# ----- signatures ------------------------------------------------------------------------------------------
SERVING_DEFAULT = "serving_default"  # image bytes in, probabilities + top-k + not-sure threshold out
CLASSIFICATION = "classification"  # the Classify API: serialized tf.Example in, classes + scores out
PREDICT_PIXELS = "predict_pixels"  # float32 pixels 0..255 in, as serving_default out
PREDICT_PIXELS_UINT8 = "predict_pixels_uint8"  # uint8 pixels in, as serving_default out
CLASSIFY_METHOD = "tensorflow/serving/classify"  # method_name that marks a SignatureDef for the Classify API
INIT_OP_SIGNATURE = "__saved_model_init_op"  # TF's own entry in signature_def: not a signature a client calls

# ----- tensors ---------------------------------------------------------------------------------------------
IMAGE_BYTES = "image_bytes"  # serving_default input (string[batch]); the tf.Example bytes feature of Classify
PIXELS = "pixels"  # predict_pixels* input
CLASSIFY_INPUTS = "inputs"  # Classify signature input: serialized tf.Example
CLASSIFY_CLASSES = "classes"  # Classify signature outputs
CLASSIFY_SCORES = "scores"
PROBABILITIES = "probabilities"  # float32[batch, classes], in class_names order
CLASS_IDS = "class_ids"  # int32[batch, top_k], most probable first
CLASS_NAMES = "class_names"  # string[batch, top_k], same order
SCORES = "scores"  # float32[batch, top_k], same order
NOT_SURE_THRESHOLD = "not_sure_threshold"  # float32[batch]: a top-1 probability under it means "not sure"
SERVING_DEFAULT_OUTPUTS = (PROBABILITIES, CLASS_IDS, CLASS_NAMES, SCORES, NOT_SURE_THRESHOLD)

RESIZE_LAYER = "resize"  # the Keras model's resize layer: its target size is the model's input size

# Image bytes whose header declares more pixels than this are refused before decoding (params: validate.max_pixels).
DEFAULT_MAX_PIXELS = 40_000_000


def versions(model_dir: Path) -> list[int]:
    """The integer version folders under `model_dir` (`models/productlens`), oldest first; none when it is absent."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(entry.name) for entry in model_dir.iterdir() if entry.name.isdigit() and entry.is_dir())


def latest_version(model_dir: Path) -> int | None:
    found = versions(model_dir)
    return found[-1] if found else None


def next_version(model_dir: Path) -> int:
    """The version number an export publishes next: one above every version folder there is."""
    return (latest_version(model_dir) or 0) + 1


# ----- the model card --------------------------------------------------------------------------------------
class ModelCardError(ValueError):
    """A model card is missing a field the contract requires, or has one of the wrong type."""


@dataclass(frozen=True)
class ModelCard:
    """The fields of `model_card.json` that the gate, publishing and clients rely on; export writes more."""

    model_name: str
    version: int
    image_size: int
    class_names: list[str]
    not_sure_threshold: float
    max_pixels: int
    top_k: int
    weights_sha256: str  # digest of the weight values exported (components.model.weights_digest): equal = same model
    evaluation: dict[str, Any]  # the evaluate metrics (accuracy, macro_f1, ...) the gate judged

    @classmethod
    def from_dict(cls, document: dict[str, Any], where: str = MODEL_CARD_FILE) -> ModelCard:
        expected: dict[str, type | tuple[type, ...]] = {
            "model_name": str,
            "version": int,
            "image_size": int,
            "class_names": list,
            NOT_SURE_THRESHOLD: (int, float),
            "max_pixels": int,
            "top_k": int,
            "weights_sha256": str,
            "evaluation": dict,
        }
        problems = [
            f"{key} is missing" if key not in document else f"{key} is not a {_type_name(kind)}"
            for key, kind in expected.items()
            if key not in document or not isinstance(document[key], kind) or isinstance(document[key], bool)
        ]
        if problems:
            raise ModelCardError(f"{where}: {'; '.join(problems)}")
        return cls(**{key: document[key] for key in expected})


def _type_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def model_card_path(version_dir: Path) -> Path:
    return Path(version_dir) / MODEL_CARD_FILE


# ----- what a client reads ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassScore:
    """One class of a prediction and its probability."""

    class_name: str
    probability: float


# TensorFlow's decorations of an op error say where in the graph it happened, not what went wrong; a client
# gets the op's own words without them (node and function names, C++ call sites, the Python trace of the export).
# The project's server strips them before answering; the real tensorflow_model_server does not, so clients do too.
_TF_ANNOTATION = re.compile(r"\s*\[\[.*?\]\]|\{\{(?:function_)?node [^}]*\}\}\s*|\s*\[Op:[^\]]*\]")
_TF_NOISE_LINE = re.compile(
    r"^(Graph execution error:|Detected at node\b.*|<stack traces unavailable>|File \".*\", line \d+, in .*)$"
)
_TF_CPP_CALL = re.compile(r"\b\w+::\w+ failed\.\s*")  # jpeg::Uncompress failed.
_ASSERTION = "assertion failed: "
_ASSERTION_PART = re.compile(r"\[([^\[\]]*)\]")


def _assertion_message(text: str) -> str:
    """tf.debugging.assert_*'s "[message] [Condition x <= y ...] [x (node:0) = ] [4]" as just the message parts."""
    kept = []
    for part in _ASSERTION_PART.findall(text):
        if part.startswith("Condition "):
            break  # the comparison and its operands, by tensor name: the message already says it
        kept.append(part.strip())
    return " ".join(p for p in kept if p) or text


def readable_error(raw: str, default: str = "the model failed on this input") -> str:
    """The line of a model server's (TensorFlow's) error that says what went wrong, without TF's internals."""
    text = _TF_ANNOTATION.sub("", raw)
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and not _TF_NOISE_LINE.match(line)]
    message = _TF_CPP_CALL.sub("", kept[0]).strip() if kept else default
    if message.startswith(_ASSERTION):
        message = _assertion_message(message[len(_ASSERTION) :])
    return message
