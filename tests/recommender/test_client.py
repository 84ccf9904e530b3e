"""The gRPC client against our model server on 127.0.0.1: top-k, the served version's not-sure threshold,
explicit model spec, deadlines, retries."""

from __future__ import annotations

import grpc
import pytest

from recommender.client import (
    IncompatibleModelError,
    ModelServerError,
    ModelUnavailableError,
    PredictionClient,
    without_tensorflow_internals,
)
from tests.fixtures.knowledge_base import free_port
from tests.fixtures.model_server import LENIENT_THRESHOLD, STRICT_THRESHOLD, ModelServerHandle, ThresholdVersions

pytestmark = pytest.mark.e2e


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
    sleeps: list[float] = []
    legacy = threshold_versions.legacy
    with PredictionClient(threshold_versions.grpc_address, version=legacy, sleep=sleeps.append) as client:
        with pytest.raises(IncompatibleModelError) as predicted:
            client.predict_one(threshold_versions.sample_images["keyboard"][0])
        with pytest.raises(IncompatibleModelError) as described:
            client.model_metadata()
    for error in (predicted.value, described.value):
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"model 'productlens' version {legacy} (signature 'serving_default') has no 'not_sure_threshold'" in str(
            error
        )
        assert "python -m components.export" in error.details
    assert sleeps == []


def test_unknown_model_or_version_is_not_found_without_retry(model_server: ModelServerHandle) -> None:
    sleeps: list[float] = []
    for client in (
        PredictionClient(model_server.grpc_address, model_name="no-such-model", sleep=sleeps.append),
        PredictionClient(model_server.grpc_address, version=999, sleep=sleeps.append),
    ):
        with client, pytest.raises(ModelServerError) as error:
            client.predict_one(model_server.sample_images["mouse"][0])
        assert error.value.code == grpc.StatusCode.NOT_FOUND
    assert sleeps == []


def test_bytes_that_are_not_an_image_are_invalid_argument_without_retry(model_server: ModelServerHandle) -> None:
    sleeps: list[float] = []
    with PredictionClient(model_server.grpc_address, sleep=sleeps.append) as client:
        with pytest.raises(ModelServerError) as error:
            client.predict_one(b"definitely not a jpeg")
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and sleeps == []
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
    ],
)
def test_model_server_errors_reach_users_without_tensorflow_internals(server_says: str, user_sees: str) -> None:
    assert without_tensorflow_internals(server_says) == user_sees


def test_unavailable_server_is_retried_with_backoff_then_reported() -> None:
    sleeps: list[float] = []
    target = f"127.0.0.1:{free_port()}"
    with PredictionClient(target, timeout_s=1.0, retries=3, backoff_s=0.1, sleep=sleeps.append) as client:
        with pytest.raises(ModelUnavailableError, match="cannot reach the model server") as error:
            client.predict_one(b"x")
    assert error.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(sleeps) == 3
    assert 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2 and 0.2 <= sleeps[2] <= 0.4  # doubling, jittered


def test_every_call_has_a_deadline(model_server: ModelServerHandle) -> None:
    with PredictionClient(model_server.grpc_address, timeout_s=0.000_001) as client:
        with pytest.raises(ModelUnavailableError, match="did not answer within") as error:
            client.predict_one(model_server.sample_images["mouse"][0])
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with PredictionClient(model_server.grpc_address) as client:
        assert client.model_metadata() == {"model": "productlens", "version": model_server.version}
