"""Both architectures build, take raw pixels of any size, augment only in training; weights are checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from components.model import (
    AugmentParams,
    MobileNetParams,
    WeightsError,
    build_model,
    unfreeze_top,
    verified_weights,
)
from tests.fixtures.training import MOBILENET_035

WEIGHTS = MobileNetParams(**MOBILENET_035)
AUGMENT = AugmentParams(flip=True, rotation=0.1, zoom=0.2, translation=0.1, contrast=0.3)


def pixels(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (batch, height, width, 3)).astype("float32")


def test_paper_cnn_builds_with_the_papers_layers() -> None:
    model = build_model("paper_cnn", num_classes=5, image_size=64)
    convolutions = [layer.filters for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert convolutions == [32, 64, 128, 128]
    assert [layer.units for layer in model.layers if layer.__class__.__name__ == "Dense"] == [512]
    assert model.get_layer("probabilities").get_layer("logits").units == 5
    probabilities = np.asarray(model(pixels(2, 80, 50)))
    assert probabilities.shape == (2, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_mobilenet_v2_builds_from_the_verified_imagenet_weights() -> None:
    model = build_model("mobilenet_v2", num_classes=4, image_size=96, weights=WEIGHTS)
    # resize and [-1, 1] scaling are inside the model: raw 0..255 pixels of any size go in
    probabilities = np.asarray(model(pixels(3, 120, 70)))
    assert probabilities.shape == (3, 4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert model.get_layer("resize").height == 96
    assert not model.get_layer("mobilenet_v2_base").trainable  # frozen until fine-tuning


def test_fine_tuning_unfreezes_only_the_top_of_the_base_and_never_batch_norm() -> None:
    model = build_model("mobilenet_v2", num_classes=4, image_size=96, weights=WEIGHTS)
    unfrozen = unfreeze_top(model, 20)
    base = model.get_layer("mobilenet_v2_base")
    trainable = [layer for layer in base.layers if layer.trainable and layer.weights]
    assert 0 < unfrozen == len(trainable) < 20
    assert all(layer.__class__.__name__ != "BatchNormalization" for layer in trainable)
    assert not base.layers[1].trainable


@pytest.mark.parametrize("architecture", ["paper_cnn", "mobilenet_v2"])
def test_augmentation_is_active_only_in_training(architecture: str) -> None:
    model = build_model(architecture, num_classes=3, image_size=96, weights=WEIGHTS, augment=AUGMENT, seed=1)
    batch = pixels(4, 96, 96)
    inference = [np.asarray(model(batch, training=False)) for _ in range(2)]
    np.testing.assert_array_equal(inference[0], inference[1])
    assert "augmentation" in [layer.name for layer in model.layers]
    augmented = np.asarray(model.get_layer("augmentation")(batch, training=True))
    assert not np.allclose(augmented, batch)


def test_paper_recipe_with_every_augmentation_off_builds_without_an_augmentation_stage() -> None:
    off = AugmentParams(flip=False, rotation=0.0, zoom=0.0, translation=0.0, contrast=0.0)
    model = build_model("paper_cnn", num_classes=3, image_size=64, augment=off, seed=1)
    assert "augmentation" not in [layer.name for layer in model.layers]
    assert model(pixels(2, 80, 64), training=True).shape == (2, 3)


def test_weights_loader_rejects_a_wrong_sha256() -> None:
    with pytest.raises(WeightsError, match="sha256 .* but params.yaml pins 0000"):
        verified_weights(MOBILENET_035["weights"], "0" * 64)


def test_weights_loader_rejects_an_altered_file(tmp_path: Path) -> None:
    altered = tmp_path / "weights.h5"
    shutil.copy(MOBILENET_035["weights"], altered)
    with open(altered, "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 0xFF]))
    altered_params = MobileNetParams(0.35, str(altered), MOBILENET_035["sha256"])
    with pytest.raises(WeightsError, match="corrupt or not the one expected"):
        build_model("mobilenet_v2", num_classes=3, image_size=96, weights=altered_params)


def test_weights_loader_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found .*shared/weights"):
        verified_weights(tmp_path / "nope.h5", MOBILENET_035["sha256"])


def test_unknown_architecture_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown train.architecture 'resnet'"):
        build_model("resnet", num_classes=3, image_size=64)


def test_saved_model_has_no_augmentation_and_answers_the_same_every_call(tmp_path: Path) -> None:
    import keras

    from components.model import inference_model

    trained = build_model("mobilenet_v2", num_classes=3, image_size=96, weights=WEIGHTS, augment=AUGMENT)
    model = inference_model(trained)
    assert "augmentation" not in [layer.name for layer in model.layers]
    batch = pixels(2, 96, 96)
    # Keras random layers augment when called without training=False: the saved model must not care
    np.testing.assert_array_equal(np.asarray(model(batch)), np.asarray(trained(batch, training=False)))
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(np.asarray(loaded(batch)), np.asarray(model(batch)), atol=1e-6)


def test_ensemble_averages_its_members_and_survives_save_and_load(tmp_path: Path) -> None:
    import keras

    from components.model import ensemble, inference_model

    members = [
        inference_model(build_model("mobilenet_v2", 3, 96, weights=WEIGHTS, augment=AUGMENT, seed=seed))
        for seed in (1, 2)
    ]
    model = ensemble(members, 96)
    assert model.get_layer("resize").height == 96
    batch = pixels(2, 100, 80)
    expected = (np.asarray(members[0](batch)) + np.asarray(members[1](batch))) / 2
    np.testing.assert_allclose(np.asarray(model(batch)), expected, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(model(batch)), np.asarray(model(batch)))
    model.save(tmp_path / "ensemble.keras")
    loaded = keras.models.load_model(tmp_path / "ensemble.keras")
    np.testing.assert_allclose(np.asarray(loaded(batch)), expected, atol=1e-6)


def test_temperature_divides_the_logits_and_is_saved_with_the_model(tmp_path: Path) -> None:
    import keras

    from components.model import inference_model, set_temperature

    trained = build_model("paper_cnn", num_classes=4, image_size=64)
    batch = pixels(3, 64, 64)
    before = np.asarray(inference_model(trained)(batch), dtype=np.float64)
    assert set_temperature(trained, 2.0) == 1
    after = np.asarray(inference_model(trained)(batch), dtype=np.float64)
    expected = np.exp(np.log(before) / 2.0)
    np.testing.assert_allclose(after, expected / expected.sum(axis=1, keepdims=True), atol=1e-5)
    inference_model(trained).save(tmp_path / "model.keras")
    np.testing.assert_allclose(np.asarray(keras.models.load_model(tmp_path / "model.keras")(batch)), after, atol=1e-6)


def test_weights_digest_is_the_same_for_the_same_weights_saved_twice_and_changes_with_any_weight(
    tmp_path: Path,
) -> None:
    """Publish compares this digest with the served version's: a retrain to the same weights is the same model,
    although each .keras file differs in its bytes (its zip entries carry the save time)."""
    import time

    import keras

    from common.io import sha256_of_file
    from components.model import weights_digest

    model = build_model("paper_cnn", num_classes=3, image_size=64)
    first, second = tmp_path / "first.keras", tmp_path / "second.keras"
    model.save(first)
    time.sleep(2.1)  # zip times have a 2-second resolution
    model.save(second)
    assert sha256_of_file(first) != sha256_of_file(second)
    loaded = [keras.saving.load_model(path, compile=False) for path in (first, second)]
    assert weights_digest(loaded[0]) == weights_digest(loaded[1]) == weights_digest(model)

    changed = loaded[1].get_layer("probabilities").get_layer("logits")
    kernel, bias = changed.get_weights()
    changed.set_weights([kernel, bias + np.float32(1e-6)])
    assert weights_digest(loaded[1]) != weights_digest(model)
