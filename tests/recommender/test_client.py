"""The gRPC client against our model server on 127.0.0.1: top-k, the served version's not-sure threshold,
explicit model spec, deadlines, retries (gRPC's retry policy: counted by a PredictionService in front of the
model server that answers the first calls with scripted errors, then passes the rest on)."""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from tensorflow_serving.apis import prediction_service_pb2_grpc

from recommender.client import IncompatibleModelError, ModelServerError, ModelUnavailableError, PredictionClient
from tests.fixtures.knowledge_base import free_port
from tests.fixtures.model_server import LENIENT_THRESHOLD, STRICT_THRESHOLD, ModelServerHandle, ThresholdVersions

pytestmark = pytest.mark.e2e

UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, "the model is loading")


class ScriptedFront(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Answers its first calls with `errors` (status code, message), then passes calls on to `upstream`."""

    def __init__(self, upstream: str | None, errors: list[tuple[grpc.StatusCode, str]]):
        self.errors = list(errors)
        self.calls = 0
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(upstream) if upstream else None
        self._upstream = prediction_service_pb2_grpc.PredictionServiceStub(self._channel) if self._channel else None

    def _answer(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            self.calls += 1
            scripted = self.errors.pop(0) if self.errors else None
        if scripted:
            context.abort(*scripted)
        if self._upstream is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no model server behind this front")
        try:
            return getattr(self._upstream, method)(request, timeout=context.time_remaining())
        except grpc.RpcError as error:
            context.abort(error.code(), error.details() or "")

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - the gRPC method name
        return self._answer("Predict", request, context)

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer("GetModelMetadata", request, context)


@contextlib.contextmanager
def scripted_front(
    upstream: str | None, errors: Sequence[tuple[grpc.StatusCode, str]] = ()
) -> Iterator[tuple[str, ScriptedFront]]:
    """A ScriptedFront on a free loopback port: yields its address and itself (to count the calls)."""
    front = ScriptedFront(upstream, list(errors))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(front, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", front
    finally:
        server.stop(grace=None)
        if front._channel is not None:
            front._channel.close()


def large_photo(side: int = 600) -> bytes:
    """A noisy JPEG of several hundred KB: over gRPC's default retry buffer (256 KiB)."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_top_k_classes_with_probabilities_for_a_batch(model_server: ModelServerHandle) -> None:
    images = [model_server.sample_images[name][0] for name in ("gpu", "webcam")]
    with PredictionClient(model_server.grpc_address, version=model_server.version) as client:
        gpu, webcam = client.predict(images, top_k=3)
    assert [gpu.top.class_name, webcam.top.class_name] == ["gpu", "webcam"]
    assert len(gpu.top_k) == 3 and gpu.model_version == model_server.version
    probabilities = [c.probability for c in gpu.top_k]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0 + 1e-6
    assert gpu.not_sure_threshold == webcam.not_sure_threshold == pytest.approx(model_server.not_sure_threshold)


def test_each_model_version_answers_with_its_own_not_sure_threshold(threshold_versions: ThresholdVersions) -> None:
    image = threshold_versions.sample_images["keyboard"][0]
    served = {}
    for version in (threshold_versions.lenient, threshold_versions.strict):
        with PredictionClient(threshold_versions.grpc_address, version=version) as client:
            served[version] = client.predict_one(image)
    lenient, strict = served[threshold_versions.lenient], served[threshold_versions.strict]
    assert lenient.not_sure_threshold == pytest.approx(LENIENT_THRESHOLD)
    assert strict.not_sure_threshold == pytest.approx(STRICT_THRESHOLD)
    assert lenient.top_k == strict.top_k  # the same model: only the threshold differs


def test_a_model_without_a_not_sure_threshold_is_an_error_not_a_default(threshold_versions: ThresholdVersions) -> None:
    legacy = threshold_versions.legacy
    with PredictionClient(threshold_versions.grpc_address, version=legacy) as client:
        with pytest.raises(IncompatibleModelError) as predicted:
            client.predict_one(threshold_versions.sample_images["keyboard"][0])
        with pytest.raises(IncompatibleModelError) as described:
            client.model_metadata()
    for error in (predicted.value, described.value):
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"model 'productlens' version {legacy} (signature 'serving_default') has no 'not_sure_threshold'" in str(
            error
        )
        assert "make publish" in error.details  # says how to serve a model that carries the threshold


def test_unknown_model_or_version_is_not_found_without_retry(model_server: ModelServerHandle) -> None:
    with scripted_front(model_server.grpc_address) as (address, front):
        for client in (
            PredictionClient(address, model_name="no-such-model"),
            PredictionClient(address, version=999),
        ):
            with client, pytest.raises(ModelServerError) as error:
                client.predict_one(model_server.sample_images["mouse"][0])
            assert error.value.code == grpc.StatusCode.NOT_FOUND
        assert front.calls == 2


def test_bytes_that_are_not_an_image_are_invalid_argument_without_retry(model_server: ModelServerHandle) -> None:
    with scripted_front(model_server.grpc_address) as (address, front), PredictionClient(address) as client:
        with pytest.raises(ModelServerError) as error:
            client.predict_one(b"definitely not a jpeg")
        assert front.calls == 1
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "{{" not in error.value.details and "node" not in error.value.details
    assert error.value.server_details  # the server's own words stay available for the logs


@pytest.mark.parametrize(
    ("server_says", "user_sees"),
    [
        (  # serving.server
            "jpeg::Uncompress failed. Invalid JPEG data or crop window. [[{{node map/while/decode_image/DecodeJpeg}}]]",
            "Invalid JPEG data or crop window.",
        ),
        (  # tensorflow_model_server: function frames first, node and call lines after
            "{{function_node __inference_serving_default_3412}} {{function_node __inference_decode_77}} "
            "jpeg::Uncompress failed. Invalid JPEG data or crop window.\n\t [[{{node map/while/body/_1/DecodeJpeg}}]]"
            "\n\t [[StatefulPartitionedCall/StatefulPartitionedCall]]",
            "Invalid JPEG data or crop window.",
        ),
        (
            "Graph execution error:\n\nDetected at node decode_image/DecodeImage defined at (most recent call last):\n"
            "<stack traces unavailable>\nUnknown image file format. One of JPEG, PNG, GIF, BMP required.\n"
            "\t [[{{node decode_image/DecodeImage}}]]",
            "Unknown image file format. One of JPEG, PNG, GIF, BMP required.",
        ),
        ("expected 1-D image_bytes, got shape [2, 2]", "expected 1-D image_bytes, got shape [2, 2]"),
        ("", "no reason given"),
    ],
)
def test_model_server_errors_reach_users_without_tensorflow_internals(server_says: str, user_sees: str) -> None:
    with scripted_front(None, [(grpc.StatusCode.INVALID_ARGUMENT, server_says)]) as (address, _):
        with PredictionClient(address) as client, pytest.raises(ModelServerError) as error:
            client.predict_one(b"photo")
    assert error.value.details == user_sees
    assert error.value.server_details == server_says


def test_a_model_server_unavailable_at_first_is_retried_until_it_answers(model_server: ModelServerHandle) -> None:
    """Two UNAVAILABLE answers (starting, restarting), then the model: the call succeeds, photo bytes and all."""
    photo = large_photo()
    assert len(photo) > 256 * 1024
    with scripted_front(model_server.grpc_address, [UNAVAILABLE, UNAVAILABLE]) as (address, front):
        with PredictionClient(address, retries=3) as client:
            prediction = client.predict_one(photo)
            assert client.model_metadata() == {"model": "productlens", "version": model_server.version}
        assert front.calls == 4  # Predict: 2 refused + 1 answered; GetModelMetadata: 1
    assert prediction.model_version == model_server.version and len(prediction.top_k) == 3


def test_a_model_server_that_stays_unavailable_is_reported_after_the_retries() -> None:
    with scripted_front(None, [UNAVAILABLE] * 10) as (address, front):
        with PredictionClient(address, timeout_s=5.0, retries=3, backoff_s=0.05) as client:
            with pytest.raises(ModelUnavailableError, match="cannot reach the model server") as error:
                client.predict_one(b"x")
        assert front.calls == 4  # the call and 3 retries
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert "the model is loading" in error.value.details and "is it running?" in error.value.details


def test_nothing_listening_is_reported_as_unavailable() -> None:
    target = f"127.0.0.1:{free_port()}"
    with PredictionClient(target, timeout_s=5.0) as client:
        with pytest.raises(ModelUnavailableError, match=f"cannot reach the model server at {target}") as error:
            client.predict_one(b"x")
    assert error.value.code == grpc.StatusCode.UNAVAILABLE


def test_every_call_has_a_deadline(model_server: ModelServerHandle) -> None:
    with PredictionClient(model_server.grpc_address, timeout_s=0.000_001) as client:
        with pytest.raises(ModelUnavailableError, match="did not answer within") as error:
            client.predict_one(model_server.sample_images["mouse"][0])
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with PredictionClient(model_server.grpc_address) as client:
        assert client.model_metadata() == {"model": "productlens", "version": model_server.version}
