"""The gRPC client against our model server on 127.0.0.1: top-k, explicit model spec, deadlines, retries."""

from __future__ import annotations

import grpc
import pytest

from recommender.client import ModelServerError, ModelUnavailableError, PredictionClient
from tests.fixtures.knowledge_base import free_port
from tests.fixtures.model_server import ModelServerHandle

pytestmark = pytest.mark.e2e


def test_top_k_classes_with_probabilities_for_a_batch(model_server: ModelServerHandle) -> None:
    images = [model_server.sample_images[name][0] for name in ("gpu", "webcam")]
    with PredictionClient(model_server.grpc_address, version=model_server.version) as client:
        gpu, webcam = client.predict(images, top_k=3)
    assert [gpu.top.class_name, webcam.top.class_name] == ["gpu", "webcam"]
    assert len(gpu.top_k) == 3 and gpu.model_version == model_server.version
    probabilities = [c.probability for c in gpu.top_k]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0 + 1e-6


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
