"""The TF Serving contract, checked with the stock tensorflow_serving.apis stubs and plain HTTP.

Runs against our server (the `model_server` fixture) by default. To run the same tests against a
real TensorFlow Serving serving a ProductLens export, point them at it:

    TFSERVING_GRPC=localhost:8500 TFSERVING_REST=http://localhost:8501 \
    TFSERVING_BASE_PATH=models/productlens pytest tests/serving/test_contract.py

TFSERVING_BASE_PATH is the versions directory that server serves, read here to compute the in-process
answers (without it, the tests that compare with them are skipped); TFSERVING_MODEL names the model
(default productlens). Tests of our own limits (message size, batch isolation) are skipped there.
"""

from __future__ import annotations

import base64
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.fixtures.model_server import sample_images

SIGNATURES = {"serving_default", "classification", "predict_pixels", "predict_pixels_uint8"}
PREDICT_OUTPUTS = {"probabilities", "class_ids", "class_names", "scores", "not_sure_threshold"}
TIMEOUT = 30


@dataclass(frozen=True)
class Target:
    grpc_address: str
    rest_url: str
    model_name: str
    saved_model: Path | None  # the served version's directory, for in-process answers
    images: list[bytes]
    ours: bool

    def url(self, suffix: str = "") -> str:
        return f"{self.rest_url}/v1/models/{self.model_name}{suffix}"


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest) -> Target:
    grpc_address = os.environ.get("TFSERVING_GRPC")
    rest_url = os.environ.get("TFSERVING_REST")
    if grpc_address or rest_url:
        if not (grpc_address and rest_url):
            pytest.fail(
                "set TFSERVING_GRPC and TFSERVING_REST together (and TFSERVING_BASE_PATH for in-process answers)"
            )
        base = os.environ.get("TFSERVING_BASE_PATH")
        latest = max((p for p in Path(base).iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) if base else None
        images = [img for imgs in sample_images(per_class=1).values() for img in imgs][:6]
        return Target(grpc_address, rest_url, os.environ.get("TFSERVING_MODEL", "productlens"), latest, images, False)
    server = request.getfixturevalue("model_server")
    images = [server.sample_images[name][0] for name in server.class_names[:6]]
    return Target(
        server.grpc_address, server.rest_url, server.model_name, server.base_path / str(server.version), images, True
    )


@pytest.fixture(scope="module")
def ours(target: Target) -> Target:
    if not target.ours:
        pytest.skip("checks a limit of our server, not part of TF Serving's contract")
    return target


@pytest.fixture(scope="module")
def in_process(target: Target):
    if target.saved_model is None:
        pytest.skip("TFSERVING_BASE_PATH is not set: no SavedModel to compute in-process answers")
    return tf.saved_model.load(str(target.saved_model)).signatures


@pytest.fixture(scope="module")
def served_version(target: Target, channel) -> int:
    """The version answering latest-version requests: the highest AVAILABLE one."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = target.model_name
    response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=TIMEOUT)
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    return max(s.version for s in response.model_version_status if s.state == available)


@pytest.fixture(scope="module")
def channel(target: Target):
    with grpc.insecure_channel(target.grpc_address) as channel:
        yield channel


@pytest.fixture(scope="module")
def predictions(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def predict_request(target: Target, images: list[bytes], **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = spec.pop("name", target.model_name)
    request.model_spec.signature_name = spec.pop("signature_name", "serving_default")
    if "version" in spec:
        request.model_spec.version.value = spec.pop("version")
    if "label" in spec:
        request.model_spec.version_label = spec.pop("label")
    request.inputs[spec.pop("input_name", "image_bytes")].CopyFrom(
        tf.make_tensor_proto(images, dtype=tf.string, shape=[len(images)])
    )
    return request


def b64(image: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(image).decode("ascii")}


def assert_server_still_serves(target: Target, predictions) -> None:
    response = predictions.Predict(predict_request(target, target.images[:1]), timeout=TIMEOUT)
    assert tf.make_ndarray(response.outputs["probabilities"]).shape[0] == 1


# ----- answers equal the SavedModel's, in process ----------------------------------------------------
def test_grpc_predict_equals_in_process(target: Target, predictions, in_process, served_version: int) -> None:
    expected = in_process["serving_default"](image_bytes=tf.constant(target.images))
    single = [predictions.Predict(predict_request(target, [image]), timeout=TIMEOUT) for image in target.images]
    batch = predictions.Predict(predict_request(target, target.images), timeout=TIMEOUT)
    for name in ("probabilities", "scores", "not_sure_threshold"):
        want = expected[name].numpy()
        np.testing.assert_allclose(np.concatenate([tf.make_ndarray(r.outputs[name]) for r in single]), want, atol=1e-5)
        np.testing.assert_allclose(tf.make_ndarray(batch.outputs[name]), want, atol=1e-5)
    for name in ("class_ids", "class_names"):
        np.testing.assert_array_equal(tf.make_ndarray(batch.outputs[name]), expected[name].numpy())
    assert batch.model_spec.name == target.model_name
    assert batch.model_spec.version.value == served_version
    assert batch.model_spec.signature_name == "serving_default"


def test_grpc_response_uses_typed_fields_like_tf_serving(target: Target, predictions) -> None:
    response = predictions.Predict(predict_request(target, target.images[:2]), timeout=TIMEOUT)
    probabilities = response.outputs["probabilities"]
    assert len(probabilities.float_val) == 2 * probabilities.tensor_shape.dim[1].size
    assert (
        len(response.outputs["class_names"].string_val) == 2 * response.outputs["class_names"].tensor_shape.dim[1].size
    )


def test_rest_row_and_columnar_predict_equal_in_process(target: Target, in_process) -> None:
    expected = in_process["serving_default"](image_bytes=tf.constant(target.images))
    rows = requests.post(target.url(":predict"), json={"instances": [b64(i) for i in target.images]}, timeout=TIMEOUT)
    assert rows.status_code == 200, rows.text
    predictions = rows.json()["predictions"]
    np.testing.assert_allclose(
        np.asarray([p["probabilities"] for p in predictions], np.float32), expected["probabilities"].numpy(), atol=1e-5
    )
    assert [p["class_names"] for p in predictions] == [
        [c.decode() for c in row] for row in expected["class_names"].numpy()
    ]
    np.testing.assert_allclose(
        [p["not_sure_threshold"] for p in predictions], expected["not_sure_threshold"].numpy(), atol=1e-7
    )
    columns = requests.post(
        target.url(":predict"),
        json={"signature_name": "serving_default", "inputs": {"image_bytes": [b64(i) for i in target.images]}},
        timeout=TIMEOUT,
    )
    assert columns.status_code == 200, columns.text
    np.testing.assert_allclose(
        np.asarray(columns.json()["outputs"]["probabilities"], np.float32), expected["probabilities"].numpy(), atol=1e-5
    )
    np.testing.assert_allclose(
        columns.json()["outputs"]["not_sure_threshold"], expected["not_sure_threshold"].numpy(), atol=1e-7
    )


def test_every_predict_answer_carries_the_models_not_sure_threshold(target: Target, predictions, in_process) -> None:
    """One value per image, the same in every row, also when the server batches concurrent requests together."""
    one = in_process["serving_default"](image_bytes=tf.constant(target.images[:1]))
    threshold = float(one["not_sure_threshold"][0])
    assert 0.0 <= threshold <= 1.0

    def call(size: int) -> np.ndarray:
        images = [target.images[i % len(target.images)] for i in range(size)]
        return tf.make_ndarray(predictions.Predict(predict_request(target, images), timeout=TIMEOUT).outputs[
            "not_sure_threshold"])  # fmt: skip

    sizes = [1, 2, 3] * 8
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, sizes))
    for size, answer in zip(sizes, answers, strict=True):
        assert answer.dtype == np.float32 and answer.shape == (size,)
        np.testing.assert_array_equal(answer, np.full(size, threshold, np.float32))


def test_classify_returns_the_top_k_labels_over_grpc_and_rest(target: Target, predictions, in_process) -> None:
    expected = in_process["serving_default"](image_bytes=tf.constant(target.images))
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = target.model_name
    request.model_spec.signature_name = "classification"
    for image in target.images:
        request.input.example_list.examples.add().features.feature["image_bytes"].bytes_list.value.append(image)
    response = predictions.Classify(request, timeout=TIMEOUT)
    labels = [[c.label for c in result.classes] for result in response.result.classifications]
    assert labels == [[c.decode() for c in row] for row in expected["class_names"].numpy()]
    scores = np.asarray([[c.score for c in result.classes] for result in response.result.classifications])
    np.testing.assert_allclose(scores, expected["scores"].numpy(), atol=1e-5)

    rest = requests.post(
        target.url(":classify"),
        json={"signature_name": "classification", "examples": [{"image_bytes": b64(i)} for i in target.images]},
        timeout=TIMEOUT,
    )
    assert rest.status_code == 200, rest.text
    assert [[label for label, _ in result] for result in rest.json()["result"]] == labels


def test_predict_pixels_gives_the_same_answer_as_image_bytes(target: Target, predictions, in_process) -> None:
    from common.images import decode_and_resize

    image = target.images[0]
    pixels = decode_and_resize(tf.constant(image), 48).numpy()[None]  # any size: the signature resizes
    request = predict_pb2.PredictRequest()
    request.model_spec.name = target.model_name
    request.model_spec.signature_name = "predict_pixels"
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    outputs = predictions.Predict(request, timeout=TIMEOUT).outputs
    served = tf.make_ndarray(outputs["probabilities"])
    in_process_answer = in_process["predict_pixels"](pixels=tf.constant(pixels))
    np.testing.assert_allclose(served, in_process_answer["probabilities"], atol=1e-5)
    np.testing.assert_array_equal(
        tf.make_ndarray(outputs["not_sure_threshold"]), in_process_answer["not_sure_threshold"].numpy()
    )
    request.model_spec.signature_name = "predict_pixels_uint8"
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels.round().astype(np.uint8)))
    served_uint8 = tf.make_ndarray(predictions.Predict(request, timeout=TIMEOUT).outputs["probabilities"])
    assert served_uint8.argmax() == served.argmax()


# ----- metadata and status -----------------------------------------------------------------------------------
def test_metadata_shows_the_signatures(target: Target, predictions) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = target.model_name
    response = predictions.GetModelMetadata(request, timeout=TIMEOUT)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert SIGNATURES <= set(signatures.signature_def)
    default = signatures.signature_def["serving_default"]
    assert set(default.inputs) == {"image_bytes"}
    assert set(default.outputs) == PREDICT_OUTPUTS
    threshold = default.outputs["not_sure_threshold"]
    assert threshold.dtype == tf.float32.as_datatype_enum
    assert [d.size for d in threshold.tensor_shape.dim] == [-1]  # [batch]: batchable like every other output
    for name in ("predict_pixels", "predict_pixels_uint8"):
        assert set(signatures.signature_def[name].outputs) == PREDICT_OUTPUTS
    assert set(signatures.signature_def["classification"].outputs) == {"classes", "scores"}
    assert signatures.signature_def["classification"].method_name == "tensorflow/serving/classify"

    rest = requests.get(target.url("/metadata"), timeout=TIMEOUT)
    assert rest.status_code == 200, rest.text
    body = rest.json()
    assert body["model_spec"]["name"] == target.model_name
    assert SIGNATURES <= set(body["metadata"]["signature_def"]["signature_def"])


def test_status_reports_the_version_available_over_grpc_and_rest(target: Target, channel, served_version: int) -> None:
    if target.saved_model is not None:
        assert served_version == int(target.saved_model.name)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = target.model_name
    response = stub.GetModelStatus(request, timeout=TIMEOUT)
    by_grpc = {
        str(s.version): get_model_status_pb2.ModelVersionStatus.State.Name(s.state)
        for s in response.model_version_status
    }
    rest = requests.get(target.url(), timeout=TIMEOUT).json()["model_version_status"]
    assert {s["version"]: s["state"] for s in rest} == by_grpc
    entry = next(s for s in rest if s["version"] == str(served_version))
    assert (entry["state"], entry["status"]["error_code"]) == ("AVAILABLE", "OK")


# ----- bad requests: the right status code, and the server keeps serving -------------------------------------
def _truncated_jpeg(image: bytes) -> bytes:
    return image[: len(image) // 2]


BAD_GRPC_REQUESTS = {
    "random bytes": (
        lambda t: predict_request(t, [random.Random(0).randbytes(2000)]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "truncated jpeg": (lambda t: predict_request(t, [_truncated_jpeg(t.images[0])]), grpc.StatusCode.INVALID_ARGUMENT),
    "empty string": (lambda t: predict_request(t, [b""]), grpc.StatusCode.INVALID_ARGUMENT),
    "one bad image in a batch": (
        lambda t: predict_request(t, [t.images[0], b"not an image"]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown model": (lambda t: predict_request(t, t.images[:1], name="no_such_model"), grpc.StatusCode.NOT_FOUND),
    "unknown version": (lambda t: predict_request(t, t.images[:1], version=987654), grpc.StatusCode.NOT_FOUND),
    # TF Serving answers an unknown label with INVALID_ARGUMENT ("Unrecognized servable version label").
    "unknown label": (
        lambda t: predict_request(t, t.images[:1], label="no_such_label"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "wrong input name": (
        lambda t: predict_request(t, t.images[:1], input_name="image"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown signature": (
        lambda t: predict_request(t, t.images[:1], signature_name="no_such_signature"),
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
}


def _wrong_dtype(target: Target) -> predict_pb2.PredictRequest:
    request = predict_request(target, target.images[:1])
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(np.zeros([1], np.float32)))
    return request


BAD_GRPC_REQUESTS["wrong dtype"] = (_wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT)


@pytest.mark.parametrize("case", sorted(BAD_GRPC_REQUESTS))
def test_bad_grpc_request_gets_its_status_code_and_the_server_stays_up(case: str, target: Target, predictions) -> None:
    make, code = BAD_GRPC_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as raised:
        predictions.Predict(make(target), timeout=TIMEOUT)
    assert raised.value.code() == code, raised.value.details()
    assert raised.value.details()
    assert_server_still_serves(target, predictions)


BAD_REST_REQUESTS = {
    "random bytes": (":predict", lambda t: {"instances": [b64(random.Random(1).randbytes(2000))]}, 400),
    "truncated jpeg": (":predict", lambda t: {"instances": [b64(_truncated_jpeg(t.images[0]))]}, 400),
    "empty string": (":predict", lambda t: {"instances": [b64(b"")]}, 400),
    "unknown model": ("@no_such_model:predict", lambda t: {"instances": [b64(t.images[0])]}, 404),
    "unknown version": ("/versions/987654:predict", lambda t: {"instances": [b64(t.images[0])]}, 404),
    "unknown label": ("/labels/no_such_label:predict", lambda t: {"instances": [b64(t.images[0])]}, 400),
    "wrong input name": (":predict", lambda t: {"inputs": {"image": [b64(t.images[0])]}}, 400),
    "wrong dtype": (":predict", lambda t: {"instances": [[1.0, 2.0]]}, 400),
    "neither instances nor inputs": (":predict", lambda t: {"signature_name": "serving_default"}, 400),
    "unknown status model": ("@no_such_model", None, 404),
}


@pytest.mark.parametrize("case", sorted(BAD_REST_REQUESTS))
def test_bad_rest_request_gets_its_http_status_and_the_server_stays_up(case: str, target: Target, predictions) -> None:
    suffix, make_body, status = BAD_REST_REQUESTS[case]
    if suffix.startswith("@"):
        name, _, verb = suffix[1:].partition(":")
        url = f"{target.rest_url}/v1/models/{name}" + (f":{verb}" if verb else "")
    else:
        url = target.url(suffix)
    reply = requests.post(url, json=make_body(target), timeout=TIMEOUT) if make_body else requests.get(url, timeout=30)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]
    assert_server_still_serves(target, predictions)


def test_malformed_json_is_a_bad_request(target: Target, predictions) -> None:
    reply = requests.post(target.url(":predict"), data=b"{not json", timeout=TIMEOUT)
    assert reply.status_code == 400
    assert_server_still_serves(target, predictions)


# ----- our server's own limits ---------------------------------------------------------------------------------
def test_oversized_payload_is_refused_over_grpc_and_rest(ours: Target, predictions) -> None:
    huge = b"\xff" * (17 << 20)  # over the 16 MiB default --max_request_bytes
    with pytest.raises(grpc.RpcError) as raised:
        predictions.Predict(predict_request(ours, [huge]), timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reply = requests.post(ours.url(":predict"), data=huge, timeout=TIMEOUT)
    assert reply.status_code == 413
    assert "limit" in reply.json()["error"]
    assert_server_still_serves(ours, predictions)


def test_a_bad_image_fails_only_its_own_request_when_batched_with_good_ones(ours: Target, predictions) -> None:
    """Server-side batching runs concurrent requests together; one bad image must not fail its neighbours."""

    def call(image: bytes):
        try:
            predictions.Predict(predict_request(ours, [image]), timeout=TIMEOUT)
            return "ok"
        except grpc.RpcError as error:
            return error.code()

    images = [b"garbage" if i % 8 == 0 else ours.images[i % len(ours.images)] for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, images))
    assert results == ["ok" if i % 8 else grpc.StatusCode.INVALID_ARGUMENT for i in range(64)]
