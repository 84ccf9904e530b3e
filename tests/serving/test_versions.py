"""Version lifecycle on our server: polling, policies, labels, swaps under load, broken versions.

One server for the module, on its own base path, driven through the story in file order:
nothing loaded -> v1 -> v2 replaces it -> v3 swapped in under load -> labels -> policies -> a broken v4.
"""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from tests.fixtures.model_server import (
    MODEL_NAME,
    TinyModel,
    export_tiny,
    publish_copy,
    start_model_server,
    train_tiny_model,
    wait_for_versions,
)

TIMEOUT = 30


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> dict[str, Path]:
    """Two different exported models to publish as versions: 'a' (the session's tiny model) and 'b' (another seed)."""
    root = tmp_path_factory.mktemp("version_exports")
    other = train_tiny_model(root / "b", seed=1, epochs=5)
    return {"a": export_tiny(tiny_model, root / "a"), "b": export_tiny(other, root / "b")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, exports):
    root = tmp_path_factory.mktemp("versions_server")
    base = root / "models" / MODEL_NAME
    base.mkdir(parents=True)
    config = root / "models.config"
    config.write_text(config_text(base, "latest { num_versions: 1 }"))
    with start_model_server(
        root / "server",
        f"--model_config_file={config}",
        "--file_system_poll_wait_seconds=0.2",
        "--model_config_file_poll_wait_seconds=0.2",
        "--enable_batching",
        "--max_num_load_retries=0",
    ) as running:
        with grpc.insecure_channel(running.grpc_address) as channel:
            yield {
                "base": base,
                "config": config,
                "grpc": running.grpc_address,
                "rest": running.rest_url,
                "predict": prediction_service_pb2_grpc.PredictionServiceStub(channel),
                "models": model_service_pb2_grpc.ModelServiceStub(channel),
                "log": running.log_path,
            }


def config_text(base: Path, policy: str, labels: dict[str, int] | None = None) -> str:
    label_lines = "".join(f'    version_labels {{ key: "{k}" value: {v} }}\n' for k, v in (labels or {}).items())
    return (
        "model_config_list {\n  config {\n"
        f'    name: "{MODEL_NAME}"\n    base_path: "{base}"\n    model_platform: "tensorflow"\n'
        f"    model_version_policy {{ {policy} }}\n{label_lines}  }}\n}}\n"
    )


def reload(server, policy: str, labels: dict[str, int] | None = None) -> None:
    config = text_format.Parse(config_text(server["base"], policy, labels), model_server_config_pb2.ModelServerConfig())
    server["models"].HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=config), timeout=60)


def image(tiny_model: TinyModel) -> bytes:
    return tiny_model.sample_images["gpu"][0]


def predict(server, tiny_model: TinyModel, **spec) -> predict_pb2.PredictResponse:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    if "label" in spec:
        request.model_spec.version_label = spec["label"]
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([image(tiny_model)], dtype=tf.string, shape=[1]))
    return server["predict"].Predict(request, timeout=TIMEOUT)


def in_process(export_dir: Path, tiny_model: TinyModel) -> np.ndarray:
    signature = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    return signature(image_bytes=tf.constant([image(tiny_model)]))["probabilities"].numpy()


def served(response: predict_pb2.PredictResponse) -> np.ndarray:
    return tf.make_ndarray(response.outputs["probabilities"])


def status(server) -> dict[int, str]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL_NAME
    response = server["models"].GetModelStatus(request, timeout=TIMEOUT)
    return {
        s.version: get_model_status_pb2.ModelVersionStatus.State.Name(s.state) for s in response.model_version_status
    }


def test_with_nothing_loaded_requests_are_unavailable_and_status_not_found(server, tiny_model) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        predict(server, tiny_model)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no version is AVAILABLE" in raised.value.details()
    reply = requests.post(f"{server['rest']}/v1/models/{MODEL_NAME}:predict", json={"instances": ["x"]}, timeout=30)
    assert reply.status_code == 503
    with pytest.raises(grpc.RpcError) as raised:
        status(server)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_new_version_is_picked_up_and_the_old_one_unloaded(server, exports, tiny_model) -> None:
    publish_copy(exports["a"], server["base"], 1)
    wait_for_versions(server["grpc"], MODEL_NAME, {1: "AVAILABLE"})
    np.testing.assert_allclose(served(predict(server, tiny_model)), in_process(exports["a"], tiny_model), atol=1e-5)

    publish_copy(exports["b"], server["base"], 2)
    assert wait_for_versions(server["grpc"], MODEL_NAME, {2: "AVAILABLE", 1: "END"}) == {2: "AVAILABLE", 1: "END"}
    response = predict(server, tiny_model)
    assert response.model_spec.version.value == 2
    np.testing.assert_allclose(served(response), in_process(exports["b"], tiny_model), atol=1e-5)
    with pytest.raises(grpc.RpcError) as raised:
        predict(server, tiny_model, version=1)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    log = server["log"].read_text()
    assert log.index("Successfully loaded servable version {name: productlens version: 2}") < log.index(
        "Done unloading servable version {name: productlens version: 1}"
    )


def test_200_concurrent_requests_across_a_version_swap_all_succeed(server, exports, tiny_model) -> None:
    versions_seen: list[int] = []
    failures: list[str] = []
    stop = threading.Event()
    rest_url = f"{server['rest']}/v1/models/{MODEL_NAME}:predict"
    body = {"instances": [{"b64": base64.b64encode(image(tiny_model)).decode()}]}

    def grpc_client() -> None:
        while not stop.is_set():
            try:
                versions_seen.append(predict(server, tiny_model).model_spec.version.value)
            except grpc.RpcError as error:
                failures.append(f"gRPC {error.code().name}: {error.details()}")

    def rest_client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                reply = session.post(rest_url, json=body, timeout=TIMEOUT)
                if reply.status_code != 200:
                    failures.append(f"REST {reply.status_code}: {reply.text}")

    clients = [threading.Thread(target=grpc_client) for _ in range(180)]
    clients += [threading.Thread(target=rest_client) for _ in range(20)]
    for client in clients:
        client.start()
    try:
        while len(versions_seen) < 100 and not failures:
            time.sleep(0.01)
        publish_copy(exports["a"], server["base"], 3)
        wait_for_versions(server["grpc"], MODEL_NAME, {3: "AVAILABLE", 2: "END"})
        swapped_at = len(versions_seen)
        while len(versions_seen) < swapped_at + 100 and not failures:
            time.sleep(0.01)
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert failures == []
    assert len(versions_seen) >= 200
    assert {2, 3} <= set(versions_seen)
    assert versions_seen[-1] == 3


def test_labels_route_to_their_versions(server, exports, tiny_model) -> None:
    reload(server, "specific { versions: 2 versions: 3 }")
    wait_for_versions(server["grpc"], MODEL_NAME, {2: "AVAILABLE", 3: "AVAILABLE"})
    reload(server, "specific { versions: 2 versions: 3 }", {"stable": 2, "canary": 3})

    stable = predict(server, tiny_model, label="stable")
    canary = predict(server, tiny_model, label="canary")
    assert (stable.model_spec.version.value, canary.model_spec.version.value) == (2, 3)
    np.testing.assert_allclose(served(stable), in_process(exports["b"], tiny_model), atol=1e-5)
    np.testing.assert_allclose(served(canary), in_process(exports["a"], tiny_model), atol=1e-5)
    rest = requests.post(
        f"{server['rest']}/v1/models/{MODEL_NAME}/labels/stable:predict",
        json={"instances": [{"b64": base64.b64encode(image(tiny_model)).decode()}]},
        timeout=TIMEOUT,
    )
    np.testing.assert_allclose(rest.json()["predictions"][0]["probabilities"], served(stable)[0], atol=1e-6)

    with pytest.raises(grpc.RpcError) as raised:
        predict(server, tiny_model, label="beta")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # As in TF Serving, a label may only point at a version that is already AVAILABLE; the old config stays.
    with pytest.raises(grpc.RpcError) as raised:
        reload(server, "specific { versions: 1 versions: 2 versions: 3 }", {"stable": 1})
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert predict(server, tiny_model, label="stable").model_spec.version.value == 2


def test_version_policies_choose_what_is_loaded(server) -> None:
    reload(server, "all {}")
    assert wait_for_versions(server["grpc"], MODEL_NAME, {1: "AVAILABLE", 2: "AVAILABLE", 3: "AVAILABLE"})
    reload(server, "specific { versions: 1 }")
    assert wait_for_versions(server["grpc"], MODEL_NAME, {1: "AVAILABLE", 2: "END", 3: "END"})
    reload(server, "latest { num_versions: 2 }")
    assert wait_for_versions(server["grpc"], MODEL_NAME, {1: "END", 2: "AVAILABLE", 3: "AVAILABLE"})


def test_a_broken_version_fails_to_load_and_the_server_keeps_serving(server, tiny_model) -> None:
    reload(server, "latest { num_versions: 1 }")
    wait_for_versions(server["grpc"], MODEL_NAME, {3: "AVAILABLE", 2: "END"})
    broken = server["base"] / ".4.tmp"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    broken.rename(server["base"] / "4")
    wait_for_versions(server["grpc"], MODEL_NAME, {4: "END", 3: "AVAILABLE"})
    assert predict(server, tiny_model).model_spec.version.value == 3
    rest = requests.get(f"{server['rest']}/v1/models/{MODEL_NAME}/versions/4", timeout=TIMEOUT).json()
    assert rest["model_version_status"][0]["status"]["error_code"] != "OK"
    assert rest["model_version_status"][0]["status"]["error_message"]


def test_an_edited_config_file_is_applied_by_polling(server, tiny_model) -> None:
    server["config"].write_text(config_text(server["base"], "latest { num_versions: 1 }", {"stable": 3}))
    deadline = time.monotonic() + 30
    while True:
        try:
            assert predict(server, tiny_model, label="stable").model_spec.version.value == 3
            break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and time.monotonic() < deadline
            time.sleep(0.1)
    # A config file that does not parse is refused; the server keeps the last good one.
    server["config"].write_text("model_config_list { this is not a config }")
    time.sleep(1.0)
    assert predict(server, tiny_model, label="stable").model_spec.version.value == 3
    assert "Not applying the changed" in server["log"].read_text()
