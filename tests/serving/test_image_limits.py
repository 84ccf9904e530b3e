"""The model server refuses decompression bombs from the image header, before decoding a pixel.

A bomb is a small file whose header promises a huge image: 48 KB of PNG that decodes to 20000x20000
RGB (1.2 GB, plus 4.8 GB as float32 for the resize). The limit (validate.max_pixels) is built into the
exported model, so these tests hold for any TF Serving server; here the real `serving.server`
process serves a tiny exported model on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import requests
import yaml

from tests.conftest import REPO_ROOT
from tests.fixtures.images import jpeg_claiming_size, png_bomb
from tests.fixtures.model_server import (
    MODEL_NAME,
    TinyModel,
    export_tiny,
    start_model_server,
    wait_for_versions,
)

MAX_PIXELS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))["validate"]["max_pixels"]
LIMIT_TEXT = f"over the limit of {MAX_PIXELS}"
CONCURRENT_BOMBS = 6
MAX_RSS_GROWTH = 100 * 1024 * 1024
DEADLINE_S = 120  # generous: before the fix one bomb took 5 s and six took 22 s to decode


@dataclass(frozen=True)
class ServedModel:
    grpc_address: str
    rest_url: str
    pid: int
    tiny: TinyModel


@contextlib.contextmanager
def serve_tiny_model(tiny_model: TinyModel, root: Path) -> Iterator[ServedModel]:
    """Our server (batching on, as `make serve`) with the tiny model exported the way the pipeline exports."""
    version = export_tiny(tiny_model, root / "models")
    with start_model_server(
        root / "server",
        f"--model_name={MODEL_NAME}",
        f"--model_base_path={root / 'models' / MODEL_NAME}",
        "--enable_batching",
        f"--batching_parameters_file={REPO_ROOT / 'serving' / 'batching.config'}",
    ) as server:
        wait_for_versions(server.grpc_address, MODEL_NAME, {int(version.name): "AVAILABLE"})
        yield ServedModel(server.grpc_address, server.rest_url, server.pid, tiny_model)


@pytest.fixture(scope="module")
def served(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    with serve_tiny_model(tiny_model, tmp_path_factory.mktemp("image_limits")) as server:
        yield server


@pytest.fixture()
def fresh_server(tiny_model: TinyModel, tmp_path: Path) -> Iterator[ServedModel]:
    """A server no other test has sent bombs to: memory a decoded bomb left allocated would hide the next one."""
    with serve_tiny_model(tiny_model, tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return png_bomb(20_000, 20_000)


def grpc_predict(address: str, image: bytes, signature: str = "serving_default"):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = signature
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string, shape=[1]))
    with grpc.insecure_channel(address) as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=DEADLINE_S)


def rest_predict(rest_url: str, image: bytes) -> requests.Response:
    body = {"instances": [{"b64": base64.b64encode(image).decode("ascii")}]}
    return requests.post(f"{rest_url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=DEADLINE_S)


def grpc_refusal(address: str, image: bytes) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        grpc_predict(address, image)
    return raised.value


def test_png_bomb_is_refused_over_grpc_naming_the_limit(served: ServedModel, bomb: bytes) -> None:
    assert len(bomb) < 64_000  # a few KB on the wire
    error = grpc_refusal(served.grpc_address, bomb)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "20000x20000 = 400000000 pixels" in error.details() and LIMIT_TEXT in error.details()


def test_png_bomb_is_refused_over_rest_naming_the_limit(served: ServedModel, bomb: bytes) -> None:
    reply = rest_predict(served.rest_url, bomb)
    assert reply.status_code == 400, reply.text
    assert LIMIT_TEXT in reply.json()["error"]


def test_jpeg_whose_header_claims_a_huge_image_is_refused(served: ServedModel) -> None:
    # 12000x12000: under TensorFlow's own JPEG cap (~179 MP), so without the limit this 600-byte file was
    # decoded into 2 GB of grey and answered.
    error = grpc_refusal(served.grpc_address, jpeg_claiming_size(12_000, 12_000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "12000x12000" in error.details() and LIMIT_TEXT in error.details()


def test_bytes_of_an_unsupported_format_are_refused_as_such(served: ServedModel) -> None:
    error = grpc_refusal(served.grpc_address, b"II*\x00" + bytes(64))  # a TIFF header
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsupported image" in error.details()


def test_concurrent_bombs_leave_server_memory_flat_and_photos_answered(fresh_server: ServedModel, bomb: bytes) -> None:
    served = fresh_server
    photo = served.tiny.sample_images["keyboard"][0]
    grpc_predict(served.grpc_address, photo)  # everything a normal request allocates is allocated once
    server = psutil.Process(served.pid)
    before = server.memory_info().rss
    peak = before
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.is_set():
            peak = max(peak, server.memory_info().rss)
            time.sleep(0.005)

    outcomes: list[str] = []

    def send_bomb(index: int) -> None:
        # Half over gRPC, half over REST: both reach the same signature.
        if index % 2:
            try:
                grpc_predict(served.grpc_address, bomb)
                outcomes.append("gRPC answered")
            except grpc.RpcError as error:
                outcomes.append(f"gRPC {error.code().name} {LIMIT_TEXT in error.details()}")
        else:
            reply = rest_predict(served.rest_url, bomb)
            outcomes.append(f"REST {reply.status_code} {LIMIT_TEXT in reply.text}")

    sampler = threading.Thread(target=sample)
    senders = [threading.Thread(target=send_bomb, args=(i,)) for i in range(CONCURRENT_BOMBS)]
    sampler.start()
    try:
        for sender in senders:
            sender.start()
        answer = grpc_predict(served.grpc_address, photo)  # while the bombs are in flight
        for sender in senders:
            sender.join(timeout=DEADLINE_S + 10)
    finally:
        sampling.set()
        sampler.join()
    growth = peak - before
    print(f"server RSS before {before / 2**20:.0f} MiB, peak under {CONCURRENT_BOMBS} bombs {peak / 2**20:.0f} MiB")

    assert growth < MAX_RSS_GROWTH, f"server RSS grew {growth / 2**20:.0f} MiB under {CONCURRENT_BOMBS} bombs"
    assert sorted(outcomes) == sorted(
        ["gRPC INVALID_ARGUMENT True"] * (CONCURRENT_BOMBS // 2) + ["REST 400 True"] * (CONCURRENT_BOMBS // 2)
    )
    import tensorflow as tf

    names = tf.make_ndarray(answer.outputs["class_names"])[0]
    assert names[0].decode() == "keyboard"


def test_normal_photos_are_still_answered_over_grpc_and_rest(served: ServedModel) -> None:
    import tensorflow as tf

    for name in ("mouse", "monitor"):
        photo = served.tiny.sample_images[name][0]
        answer = grpc_predict(served.grpc_address, photo)
        assert tf.make_ndarray(answer.outputs["class_names"])[0][0].decode() == name
        reply = rest_predict(served.rest_url, photo)
        assert reply.status_code == 200, reply.text
        assert reply.json()["predictions"][0]["class_names"][0] == name
        probabilities = np.asarray(reply.json()["predictions"][0]["probabilities"])
        assert probabilities.shape == (len(served.tiny.class_names),)
