"""Export: only blessed models, the TF Serving layout and signatures, a model card that names the weights."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from tensorflow_serving.apis import prediction_log_pb2

from common.images import decode_and_resize
from common.params import ParamsError
from components import export as export_step
from components.export import ExportParams, export_candidate, image_size_of, load_export_params
from components.model import weights_digest
from serving.contract import MODEL_CARD_FILE, WARMUP_FILE, ModelCard
from tests.fixtures.images import synthetic_image
from tests.fixtures.model_server import NOT_SURE_THRESHOLD, TinyModel, export_tiny

ROOT = Path(__file__).resolve().parents[2]
EVALUATION = {"accuracy": 0.95, "macro_f1": 0.94, "not_sure_threshold": 0.42}
BLESSED = {"blessed": True, "reasons": ["accuracy 0.95 >= 0.85"]}


@pytest.fixture(scope="module")
def exported(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tiny_model, tmp_path_factory.mktemp("exported"))


@pytest.fixture()
def step_inputs(tiny_model: TinyModel, tmp_path: Path) -> dict[str, Path]:
    """What dvc.yaml hands the export stage: model, class names, gate, evaluation, sample images, params."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for name in tiny_model.class_names[:4]:
        (samples / f"{name}.jpg").write_bytes(tiny_model.sample_images[name][0])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["export"].update(warmup_images=2)
    paths = {
        "model": tiny_model.keras_model,
        "class_names": tmp_path / "class_names.json",
        "gate": tmp_path / "gate.json",
        "evaluation": tmp_path / "evaluate.json",
        "samples": samples,
        "params": tmp_path / "params.yaml",
        "output": tmp_path / "export" / "candidate",
        "metrics": tmp_path / "metrics" / "export.json",
    }
    paths["class_names"].write_text(json.dumps(tiny_model.class_names))
    paths["gate"].write_text(json.dumps(BLESSED))
    paths["evaluation"].write_text(json.dumps(EVALUATION))
    paths["params"].write_text(yaml.safe_dump(params))
    return paths


def cli_args(paths: dict[str, Path]) -> list[str]:
    return [
        "--model", str(paths["model"]), "--class-names", str(paths["class_names"]), "--gate", str(paths["gate"]),
        "--evaluation", str(paths["evaluation"]), "--samples", str(paths["samples"]), "--params", str(paths["params"]),
        "--output", str(paths["output"]), "--metrics", str(paths["metrics"]),
    ]  # fmt: skip


def test_export_refuses_a_model_the_gate_did_not_bless(step_inputs, capsys) -> None:
    reasons = ["recall of class webcam 0.41 < 0.60", "accuracy 0.52 does not beat the majority baseline 0.10 by 0.20"]
    step_inputs["gate"].write_text(json.dumps({"blessed": False, "reasons": reasons}))
    assert export_step.main(cli_args(step_inputs)) == 1
    err = capsys.readouterr().err
    assert "Export refused" in err
    for reason in reasons:
        assert reason in err
    assert not step_inputs["output"].parent.exists()
    assert not step_inputs["metrics"].exists()


def test_export_cli_writes_a_candidate_with_a_card_naming_its_weights(step_inputs) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "components.export", *cli_args(step_inputs)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    candidate = step_inputs["output"]
    assert sorted(p.name for p in candidate.parent.iterdir()) == ["candidate"]  # nothing hidden left behind
    assert (candidate / "saved_model.pb").is_file() and (candidate / "variables").is_dir()
    assert "infra_validate is next" in completed.stdout

    card = json.loads((candidate / MODEL_CARD_FILE).read_text())
    assert card["weights_sha256"] == weights_digest(keras.saving.load_model(step_inputs["model"], compile=False))
    assert card["evaluation"] == EVALUATION  # what the gate judged; the gate reads a champion's from here
    assert card["not_sure_threshold"] == 0.42  # evaluate's, chosen on val
    assert card["max_pixels"] == yaml.safe_load((ROOT / "params.yaml").read_text())["validate"]["max_pixels"]
    assert card["gate"] == BLESSED
    assert card["params"]["export"]["warmup_images"] == 2
    assert card["class_names"] == json.loads(step_inputs["class_names"].read_text())
    assert card["image_size"] == 32
    # A candidate is not a version yet: publishing adds the version and where it came from.
    assert not {"version", "published_at", "provenance", "created_at"} & set(card)
    assert ModelCard.from_dict({**card, "version": 1}).top_k == 5
    photos = [path.read_bytes() for path in sorted(step_inputs["samples"].glob("*.jpg"))]
    served = tf.saved_model.load(str(candidate)).signatures["serving_default"](image_bytes=tf.constant(photos))
    np.testing.assert_array_equal(served["not_sure_threshold"].numpy(), np.full(len(photos), 0.42, np.float32))

    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(
        str(candidate / WARMUP_FILE))]  # fmt: skip
    assert [r.WhichOneof("log_type") for r in records] == ["predict_log", "predict_log", "classify_log"]
    metrics = json.loads(step_inputs["metrics"].read_text())
    assert metrics["export_seconds"] > 0 and metrics["candidate_mb"] > 0


def test_the_same_model_and_inputs_give_the_same_model_card(tiny_model: TinyModel, tmp_path: Path) -> None:
    def card_bytes(output: Path) -> bytes:
        export_candidate(
            tiny_model.keras_model, tiny_model.class_names, BLESSED, EVALUATION, output, ExportParams(top_k=3),
            tiny_model.images(),
        )  # fmt: skip
        return (output / MODEL_CARD_FILE).read_bytes()

    first = card_bytes(tmp_path / "candidate")
    assert card_bytes(tmp_path / "candidate") == first  # rewritten in place: a DVC output that only its inputs change


def test_export_refuses_an_evaluation_without_a_not_sure_threshold(step_inputs, capsys) -> None:
    step_inputs["evaluation"].write_text(json.dumps({"accuracy": 0.95, "macro_f1": 0.94}))  # an older evaluate
    assert export_step.main(cli_args(step_inputs)) == 1
    assert "has no not_sure_threshold; rerun evaluate" in capsys.readouterr().err
    assert not step_inputs["output"].parent.exists() and not step_inputs["metrics"].exists()


def test_a_not_sure_threshold_that_is_not_a_probability_is_refused(tiny_model: TinyModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be a probability in \\[0, 1\\], got 1.5"):
        export_candidate(
            tiny_model.keras_model, tiny_model.class_names, BLESSED, {**EVALUATION, "not_sure_threshold": 1.5},
            tmp_path / "candidate", ExportParams(), tiny_model.images(),
        )  # fmt: skip
    assert not (tmp_path / "candidate").exists()


def test_serving_default_decodes_like_training_and_matches_keras(exported: Path, tiny_model: TinyModel) -> None:
    signatures = tf.saved_model.load(str(exported)).signatures
    assert {"serving_default", "classification", "predict_pixels", "predict_pixels_uint8"} <= set(signatures)
    images = tiny_model.images()
    served = signatures["serving_default"](image_bytes=tf.constant(images))
    model = keras.saving.load_model(tiny_model.keras_model)
    expected = model(tf.stack([decode_and_resize(tf.constant(b), 32) for b in images]), training=False).numpy()
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-6)
    top = [names[0].decode() for names in served["class_names"].numpy()]
    assert top == [name for name in tiny_model.class_names]  # one photo per class, each recognised
    assert served["class_ids"].dtype == tf.int64 and served["scores"].shape == (len(images), 3)


def test_every_predict_signature_carries_the_not_sure_threshold_in_every_row(
    exported: Path, tiny_model: TinyModel
) -> None:
    signatures = tf.saved_model.load(str(exported)).signatures
    images = tiny_model.images()
    pixels = tf.stack([decode_and_resize(tf.constant(b), 40) for b in images[:3]])
    answers = {
        "serving_default": signatures["serving_default"](image_bytes=tf.constant(images)),
        "predict_pixels": signatures["predict_pixels"](pixels=pixels),
        "predict_pixels_uint8": signatures["predict_pixels_uint8"](pixels=tf.cast(tf.round(pixels), tf.uint8)),
    }
    for name, answer in answers.items():
        rows = answer["probabilities"].shape[0]
        threshold = answer["not_sure_threshold"]
        assert threshold.dtype == tf.float32 and threshold.shape == (rows,), name
        np.testing.assert_array_equal(threshold.numpy(), np.full(rows, NOT_SURE_THRESHOLD, np.float32))
    # The Classify API's signature keeps TF Serving's classification outputs only.
    assert set(signatures["classification"].structured_outputs) == {"classes", "scores"}


@pytest.mark.parametrize("payload", [b"", b"definitely not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 64])
def test_undecodable_bytes_fail_instead_of_returning_an_answer(exported: Path, payload: bytes) -> None:
    serving_default = tf.saved_model.load(str(exported)).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError):
        serving_default(image_bytes=tf.constant([payload]))


def test_truncated_jpeg_fails_instead_of_returning_an_answer(exported: Path, tiny_model: TinyModel) -> None:
    serving_default = tf.saved_model.load(str(exported)).signatures["serving_default"]
    image = tiny_model.sample_images["gpu"][0]
    with pytest.raises(tf.errors.InvalidArgumentError):
        serving_default(image_bytes=tf.constant([image[: len(image) // 2]]))


def test_image_size_comes_from_a_fixed_input_or_the_resize_layer() -> None:
    fixed = keras.Sequential([keras.Input((48, 48, 3)), keras.layers.GlobalAveragePooling2D()])
    assert image_size_of(fixed) == 48
    inputs = keras.Input((None, None, 3))
    resized = keras.Model(inputs, keras.layers.Resizing(40, 40, name="resize")(inputs))
    assert image_size_of(resized) == 40


# ----- the pixel limit (validate.max_pixels), checked from the header before decoding -----------------------
SMALL_LIMIT = 64 * 64


@pytest.fixture(scope="module")
def limited(
    tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tf.types.experimental.ConcreteFunction]:
    """The tiny model exported with max_pixels = 64 * 64: its signatures, loaded."""
    candidate = tmp_path_factory.mktemp("limited") / "candidate"
    card = export_candidate(
        tiny_model.keras_model, tiny_model.class_names, BLESSED, EVALUATION, candidate,
        ExportParams(top_k=3, max_pixels=SMALL_LIMIT), tiny_model.images(),
    )  # fmt: skip
    assert card["max_pixels"] == SMALL_LIMIT
    return tf.saved_model.load(str(candidate)).signatures


def encoded(size: tuple[int, int], image_format: str, frames: int = 1) -> bytes:
    images = [synthetic_image(3, variant, 64).resize(size) for variant in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format=image_format, save_all=frames > 1, append_images=images[1:])
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "GIF", "BMP"])
def test_image_bytes_over_max_pixels_are_refused_naming_the_limit(limited, image_format: str) -> None:
    serving_default = limited["serving_default"]
    at_limit = serving_default(image_bytes=tf.constant([encoded((64, 64), image_format)]))
    assert at_limit["probabilities"].shape == (1, 14)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=f"image is 65x64 = 4160 pixels, over the limit of {SMALL_LIMIT}"
    ):
        serving_default(image_bytes=tf.constant([encoded((65, 64), image_format)]))


def test_a_bottom_up_and_a_top_down_bmp_both_count_their_rows(limited) -> None:
    bottom_up = encoded((40, 120), "BMP")  # Pillow writes rows bottom-up: a positive height
    top_down = bottom_up[:22] + (-120).to_bytes(4, "little", signed=True) + bottom_up[26:]
    for data in (bottom_up, top_down):
        with pytest.raises(tf.errors.InvalidArgumentError, match="image is 40x120 = 4800 pixels"):
            limited["serving_default"](image_bytes=tf.constant([data]))


def test_an_animated_gif_counts_every_frame(limited) -> None:
    # Each 32x32 frame is well under the limit, the logical screen too; giflib still holds all five.
    with pytest.raises(tf.errors.InvalidArgumentError, match="32x32 with GIF frames of 5120 pixels in all"):
        limited["serving_default"](image_bytes=tf.constant([encoded((32, 32), "GIF", frames=5)]))
    two_frames = limited["serving_default"](image_bytes=tf.constant([encoded((32, 32), "GIF", frames=2)]))
    assert two_frames["probabilities"].shape == (1, 14)


def test_a_gif_too_fragmented_to_walk_is_refused(limited) -> None:
    screen = b"GIF89a" + (1).to_bytes(2, "little") * 2 + b"\x00\x00\x00"
    image = b"\x2c" + bytes(4) + (1).to_bytes(2, "little") * 2 + b"\x00" + b"\x02"
    crafted = screen + image + b"\x01\x00" * 5_000 + b"\x00\x3b"  # 5,000 one-byte sub-blocks
    with pytest.raises(tf.errors.InvalidArgumentError, match="GIF has more than 1074 blocks to check"):
        limited["serving_default"](image_bytes=tf.constant([crafted]))


@pytest.mark.parametrize("image_format", ["WEBP", "TIFF"])
def test_formats_other_than_jpeg_png_gif_bmp_are_refused_as_unsupported(limited, image_format: str) -> None:
    with pytest.raises(tf.errors.InvalidArgumentError, match="unsupported image"):
        limited["serving_default"](image_bytes=tf.constant([encoded((8, 8), image_format)]))


def test_classify_refuses_an_image_over_the_limit_too(limited) -> None:
    example = tf.train.Example(features=tf.train.Features(feature={
        "image_bytes": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded((80, 80), "PNG")]))
    }))  # fmt: skip
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"over the limit of {SMALL_LIMIT}"):
        limited["classification"](inputs=tf.constant([example.SerializeToString()]))


def test_pixel_signatures_take_arrays_of_any_size(limited) -> None:
    # Already decoded: the request's own size is the cost, and the server caps that.
    pixels = tf.fill([2, 120, 90, 3], 128.0)
    answer = limited["predict_pixels"](pixels=pixels)
    assert answer["probabilities"].shape == (2, 14)
    answer = limited["predict_pixels_uint8"](pixels=tf.cast(pixels, tf.uint8))
    assert answer["probabilities"].shape == (2, 14)


def test_export_reads_its_pixel_limit_from_the_validate_section(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["validate"]["max_pixels"] = 1_000_000
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert load_export_params(path).max_pixels == 1_000_000
    params["export"]["max_pixels"] = 5  # a second, diverging limit
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="max_pixels belongs under validate"):
        load_export_params(path)
    del params["export"]["max_pixels"], params["validate"]["max_pixels"]
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="missing key 'max_pixels'"):
        load_export_params(path)
