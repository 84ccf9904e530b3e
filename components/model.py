"""Model architectures: the paper's CNN (the baseline) and transfer learning on ImageNet MobileNetV2.

Every model takes float32 RGB pixels in 0..255 of any height and width and returns class
probabilities: resizing and pixel scaling are layers of the model, so a client (and the
exported SavedModel) only decodes the image. Augmentation layers are part of the training
model only and are inactive at inference.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from common.io import sha256_of_file
from serving.contract import RESIZE_LAYER

log = logging.getLogger("components.model")

ARCHITECTURES = ("paper_cnn", "mobilenet_v2")
MOBILENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
# Names the tests look layers up by (RESIZE_LAYER, which export reads the input size from, is the contract's).
BASE_LAYER = "mobilenet_v2_base"
TEMPERATURE_LAYER = "temperature"


# Where the ImageNet weights live beside a clone (the KFP steps mount it at /shared); its README lists every file.
WEIGHTS_README = "../shared/weights/README.md"


class WeightsError(RuntimeError):
    """The pretrained weights file is missing or is not the file params.yaml pins."""


@dataclass(frozen=True)
class AugmentParams:
    """Random training-time augmentation; 0 (or false) turns a transform off."""

    flip: bool = True
    rotation: float = 0.0  # fraction of a full turn, e.g. 0.05 = +-18 degrees
    zoom: float = 0.0  # fraction of the side, e.g. 0.15
    contrast: float = 0.0  # e.g. 0.2
    translation: float = 0.0  # fraction of the side


@dataclass(frozen=True)
class MobileNetParams:
    """Which ImageNet weights file to start from, and the sha256 it must have."""

    alpha: float
    weights: str
    sha256: str


def weights_digest(model: keras.Model) -> str:
    """sha256 of the model's weight values in order (dtype, shape and bytes of each): equal weights give equal
    digests. The .keras file's own sha256 does not: its zip entries carry the time it was saved, so a retrain
    to the same weights would look like a new model (publish compares this digest with the served version's)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.dtype.str} {value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def verified_weights(path: Path | str, expected_sha256: str) -> Path:
    """Return `path` if it exists and its sha256 is `expected_sha256`; raise WeightsError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(missing_weights(path, expected_sha256))
    actual = sha256_of_file(path)
    if actual != expected_sha256.lower():
        raise WeightsError(
            f"pretrained weights {path} have sha256 {actual}, but params.yaml pins {expected_sha256}: "
            "the file is corrupt or not the one expected; restore it from ../shared/weights"
        )
    return path


def missing_weights(path: Path, expected_sha256: str) -> str:
    """One line for a weights file that is not there: where it was expected, what it is, what the folder holds."""
    folder = path.parent
    if folder.is_dir():
        present = sorted(p.name for p in folder.glob("*.h5"))
        there = f"{folder} holds {', '.join(present)}" if present else f"{folder} holds no .h5 file"
    else:
        there = f"{folder} does not exist (the shared folder belongs beside the clone)"
    return (
        f"pretrained weights not found at {path} (train.mobilenet_v2.weights in params.yaml); {there}. It is the "
        f"ImageNet MobileNetV2 file without the top that Keras Applications publishes under this name (sha256 "
        f"{expected_sha256[:12]}...): {WEIGHTS_README} lists each file with its alpha and sha256"
    )


def augmentation(params: AugmentParams, seed: int) -> keras.Sequential:
    """Random flip/rotation/zoom/translation/contrast; Keras runs them only when training=True."""
    layers: list[keras.layers.Layer] = []
    if params.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if params.rotation:
        layers.append(keras.layers.RandomRotation(params.rotation, fill_mode="reflect", seed=seed + 1))
    if params.zoom:
        layers.append(keras.layers.RandomZoom((-params.zoom, params.zoom), fill_mode="reflect", seed=seed + 2))
    if params.translation:
        layers.append(
            keras.layers.RandomTranslation(params.translation, params.translation, fill_mode="reflect", seed=seed + 3)
        )
    if params.contrast:
        layers.append(keras.layers.RandomContrast(params.contrast, seed=seed + 4))
    return keras.Sequential(layers, name="augmentation")


def _inputs_resized(image_size: int, augment: AugmentParams | None, seed: int) -> tuple[keras.KerasTensor, ...]:
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="pixels")
    x = keras.layers.Resizing(image_size, image_size, interpolation="bilinear", name=RESIZE_LAYER)(inputs)
    stage = augmentation(augment, seed) if augment is not None else None
    if stage is not None and stage.layers:  # every transform off (e.g. the paper's recipe): no stage at all
        x = stage(x)
    return inputs, x


def build_paper_cnn(
    num_classes: int, image_size: int = 224, augment: AugmentParams | None = None, seed: int = 0
) -> keras.Model:
    """The paper's network: 4 x (Conv 3x3 + max-pool) with 32/64/128/128 filters, Dense 512, softmax."""
    inputs, x = _inputs_resized(image_size, augment, seed)
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(x)
    for filters in (32, 64, 128, 128):
        x = keras.layers.Conv2D(filters, 3, activation="relu")(x)
        x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(512, activation="relu")(x)
    outputs = softmax_with_temperature(num_classes)(x)
    return keras.Model(inputs, outputs, name="paper_cnn")


def mobilenet_v2_base(image_size: int, weights: MobileNetParams) -> keras.Model:
    """ImageNet MobileNetV2 without its top, from the verified local weights file; global-average pooled."""
    path = verified_weights(weights.weights, weights.sha256)
    if weights.alpha not in MOBILENET_ALPHAS:
        raise ValueError(f"train.mobilenet_v2.alpha {weights.alpha} is not one of {MOBILENET_ALPHAS}")
    base = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3),
        alpha=weights.alpha,
        include_top=False,
        weights=str(path),
        pooling="avg",
    )
    base.name = BASE_LAYER
    return base


def softmax_with_temperature(num_classes: int) -> keras.Sequential:
    """Dense logits -> divided by a temperature (1 until calibrated) -> softmax.

    The temperature is a `Rescaling` layer (scale = 1 / T) so the saved model needs no custom code.
    """
    return keras.Sequential(
        [
            keras.layers.Dense(num_classes, name="logits"),
            keras.layers.Rescaling(1.0, name=TEMPERATURE_LAYER),
            keras.layers.Softmax(name="softmax"),
        ],
        name="probabilities",
    )


def set_temperature(model: keras.Model, temperature: float) -> int:
    """Divide the logits of every softmax in `model` (nested ones too) by `temperature`; returns how many.

    Build a new model object (e.g. inference_model) afterwards: Keras bakes the value into traced functions.
    """
    found = 0
    for layer in _all_layers(model):
        if layer.name == TEMPERATURE_LAYER and isinstance(layer, keras.layers.Rescaling):
            layer.scale = 1.0 / temperature
            found += 1
    return found


def _all_layers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    layers = []
    for layer in getattr(model, "layers", []):
        layers.append(layer)
        layers.extend(_all_layers(layer))
    return layers


def classifier_head(num_classes: int, dropout: float, name: str = "head") -> keras.Sequential:
    """Dropout + softmax on top of pooled features (trained alone on cached features first)."""
    return keras.Sequential([keras.layers.Dropout(dropout), softmax_with_temperature(num_classes)], name=name)


def build_mobilenet_v2(
    num_classes: int,
    image_size: int,
    weights: MobileNetParams,
    dropout: float = 0.2,
    augment: AugmentParams | None = None,
    seed: int = 0,
    head: keras.Sequential | None = None,
) -> keras.Model:
    """Resize -> [augment] -> scale to [-1, 1] -> MobileNetV2 (frozen, BN in inference mode) -> head.

    Pass `head` to reuse a head already trained on cached features.
    """
    base = mobilenet_v2_base(image_size, weights)
    base.trainable = False
    inputs, x = _inputs_resized(image_size, augment, seed)
    # preprocess_input for MobileNetV2: x / 127.5 - 1.
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(x)
    # training=False keeps BatchNormalization statistics frozen, also while fine-tuning.
    features = base(x, training=False)
    head = head if head is not None else classifier_head(num_classes, dropout)
    outputs = head(features)
    return keras.Model(inputs, outputs, name=f"mobilenet_v2_{weights.alpha}_{image_size}")


def base_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BASE_LAYER)


def unfreeze_top(model: keras.Model, layers: int) -> int:
    """Make the top `layers` layers of the MobileNetV2 base trainable (all if layers < 0); BN stays frozen.

    Returns the number of layers with weights that became trainable.
    """
    base = base_of(model)
    base.trainable = True
    cut = 0 if layers < 0 else max(0, len(base.layers) - layers)
    unfrozen = 0
    for index, layer in enumerate(base.layers):
        trainable = index >= cut and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable
        unfrozen += int(trainable and bool(layer.weights))
    return unfrozen


def inference_model(model: keras.Model) -> keras.Model:
    """The trained model without its augmentation stage, sharing its layers and weights: what train saves.

    Keras random layers augment whenever they are called without training=False, so the saved model has
    none: every caller (export, serving, notebooks) gets the same answer for the same pixels.
    """
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="pixels")
    x = inputs
    for layer in model.layers[1:]:  # both architectures are a chain of layers after the input
        if layer.name != "augmentation":
            x = layer(x, training=False)
    return keras.Model(inputs, x, name=model.name)


def ensemble(members: list[keras.Model], image_size: int) -> keras.Model:
    """One model averaging the members' probabilities (inference models; each keeps its own scaling)."""
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="pixels")
    # Resize once at the top so every member sees the same pixels, and the export step finds the size here.
    x = keras.layers.Resizing(image_size, image_size, interpolation="bilinear", name=RESIZE_LAYER)(inputs)
    for index, member in enumerate(members):
        member.name = f"member_{index}"  # layer names must be unique within the ensemble
    outputs = [member(x, training=False) for member in members]
    averaged = keras.layers.Average(name="probabilities")(outputs)
    return keras.Model(inputs, averaged, name=f"ensemble_of_{len(members)}")


def build_model(
    architecture: str,
    num_classes: int,
    image_size: int,
    *,
    weights: MobileNetParams | None = None,
    dropout: float = 0.2,
    augment: AugmentParams | None = None,
    seed: int = 0,
) -> keras.Model:
    """Build one of ARCHITECTURES (uncompiled)."""
    if architecture == "paper_cnn":
        return build_paper_cnn(num_classes, image_size, augment, seed)
    if architecture == "mobilenet_v2":
        if weights is None:
            raise ValueError("mobilenet_v2 needs train.mobilenet_v2 (alpha, weights, sha256) in params.yaml")
        return build_mobilenet_v2(num_classes, image_size, weights, dropout, augment, seed)
    raise ValueError(f"unknown train.architecture {architecture!r}; expected one of {ARCHITECTURES}")
