"""Prometheus metrics on the REST port at TF Serving's path, switched on as TF Serving does it
(--monitoring_config_file), read back the way Prometheus reads them (prometheus_client's text parser).

The servers run in this process (serving.server.ModelServer on free loopback ports): each keeps its own registry,
so two of them here count only their own requests.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.config import ConfigError, parse_monitoring_config
from serving.contract import IMAGE_BYTES, SERVING_DEFAULT
from serving.metrics import BATCH_SIZE, LATENCY_BUCKETS_US, REQUEST_COUNT, REQUEST_LATENCY
from serving.server import ModelServer, parse_args
from tests.fixtures.model_server import MODEL_NAME, REPO_ROOT, TinyModel, export_tiny

TIMEOUT = 30
DEFAULT_PATH = "/monitoring/prometheus/metrics"
ENABLED = "prometheus_config { enable: true }\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Path:
    root = tmp_path_factory.mktemp("metrics") / "models"
    export_tiny(tiny_model, root)  # with warmup records: the server replays them through its batch threads
    return root / MODEL_NAME


@contextlib.contextmanager
def serving(workdir: Path, models: Path, monitoring: str | None, *flags: str) -> Iterator[ModelServer]:
    """Our model server in this process on free 127.0.0.1 ports; `monitoring` is its monitoring config file's text."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["--port=0", "--rest_api_port=-1", f"--model_name={MODEL_NAME}", f"--model_base_path={models}", *flags]
    if monitoring is not None:
        (workdir / "monitoring.config").write_text(monitoring)
        args.append(f"--monitoring_config_file={workdir / 'monitoring.config'}")
    server = ModelServer(parse_args(args))
    server.start()
    try:
        yield server
    finally:
        server.stop(10)


def scrape(server: ModelServer, path: str = DEFAULT_PATH) -> dict[tuple[str, tuple], float]:
    """The page as Prometheus sees it: {(sample name, sorted labels): value}."""
    reply = requests.get(f"http://127.0.0.1:{server.rest_port}{path}", timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def requests_counted(page: dict, **labels: str) -> float:
    """request_count summed over the series that carry `labels` (as `sum(...{labels})` in PromQL)."""
    return sum(
        value
        for (name, series), value in page.items()
        if name == REQUEST_COUNT and labels.items() <= dict(series).items()
    )


def predict_request(
    image: bytes, signature: str = SERVING_DEFAULT, model: str = MODEL_NAME
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    request.inputs[IMAGE_BYTES].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string, shape=[1]))
    return request


def grpc_stub(server: ModelServer) -> prediction_service_pb2_grpc.PredictionServiceStub:
    return prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))


def rest(server: ModelServer, method: str, path: str, body: dict | None = None) -> requests.Response:
    return requests.request(method, f"http://127.0.0.1:{server.rest_port}{path}", json=body, timeout=TIMEOUT)


def b64(image: bytes) -> dict:
    return {"b64": base64.b64encode(image).decode("ascii")}


def test_without_a_monitoring_config_there_is_no_metrics_page(models: Path, tmp_path: Path) -> None:
    with serving(tmp_path, models, None) as server:
        reply = rest(server, "GET", DEFAULT_PATH)
    assert reply.status_code == 404
    assert "error" in reply.json()


def test_requests_are_counted_per_model_version_signature_api_entrypoint_and_status(
    models: Path, tiny_model: TinyModel, tmp_path: Path
) -> None:
    image = tiny_model.images()[0]
    with serving(tmp_path, models, ENABLED) as server:
        stub = grpc_stub(server)
        for _ in range(3):
            stub.Predict(predict_request(image), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as bad_image:
            stub.Predict(predict_request(b"not an image"), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as unknown_signature:
            stub.Predict(predict_request(image, signature="no_such_signature"), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as unknown_model:
            stub.Predict(predict_request(image, model="no_such_model"), timeout=TIMEOUT)
        metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        metadata.model_spec.name = MODEL_NAME
        stub.GetModelMetadata(metadata, timeout=TIMEOUT)
        for _ in range(2):
            assert rest(server, "POST", f"/v1/models/{MODEL_NAME}:predict", {"instances": [b64(image)]}).ok
        classify = {"signature_name": "classification", "examples": [{IMAGE_BYTES: b64(image)}]}
        assert rest(server, "POST", f"/v1/models/{MODEL_NAME}/versions/1:classify", classify).ok
        assert rest(server, "GET", f"/v1/models/{MODEL_NAME}").ok
        assert rest(server, "GET", f"/v1/models/{MODEL_NAME}/versions/7").status_code == 404
        page = scrape(server)

    assert bad_image.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unknown_signature.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert unknown_model.value.code() == grpc.StatusCode.NOT_FOUND
    ok_predict = dict(model_name=MODEL_NAME, version="1", signature=SERVING_DEFAULT, API="Predict", status="OK")
    assert requests_counted(page, **ok_predict, entrypoint="GRPC") == 3
    assert requests_counted(page, **ok_predict, entrypoint="REST") == 2
    assert requests_counted(page, entrypoint="GRPC", status="INVALID_ARGUMENT", version="1") == 1
    # Names the server does not have are not labels (a client could otherwise add series without end).
    assert requests_counted(page, signature="(unknown)", status="FAILED_PRECONDITION") == 1
    assert requests_counted(page, model_name="(unknown)", status="NOT_FOUND") == 1
    assert not any("no_such" in value for _, series in page for _, value in series)
    assert requests_counted(page, API="GetModelMetadata", entrypoint="GRPC", version="1", status="OK") == 1
    classified = dict(API="Classify", entrypoint="REST", signature="classification", version="1", status="OK")
    assert requests_counted(page, **classified) == 1
    assert requests_counted(page, API="GetModelStatus", entrypoint="REST", model_name=MODEL_NAME, status="OK") == 1
    assert requests_counted(page, API="GetModelStatus", status="NOT_FOUND") == 1
    # Errors are the requests whose status is not OK.
    assert requests_counted(page) - requests_counted(page, status="OK") == 4


def test_latency_histogram_has_tf_servings_buckets_and_only_answered_requests(
    models: Path, tiny_model: TinyModel, tmp_path: Path
) -> None:
    image = tiny_model.images()[0]
    with serving(tmp_path, models, ENABLED) as server:
        stub = grpc_stub(server)
        for _ in range(4):
            stub.Predict(predict_request(image), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError):
            stub.Predict(predict_request(b"not an image"), timeout=TIMEOUT)
        page = scrape(server)

    labels = (
        ("API", "Predict"),
        ("entrypoint", "GRPC"),
        ("model_name", MODEL_NAME),
        ("signature", SERVING_DEFAULT),
        ("version", "1"),
    )
    assert page[(f"{REQUEST_LATENCY}_count", labels)] == 4  # the failed request is counted, not timed
    total_us = page[(f"{REQUEST_LATENCY}_sum", labels)]
    assert 4 * 10 < total_us < 4 * TIMEOUT * 1e6  # microseconds, as TF Serving reports them
    buckets = sorted(
        (float(dict(series)["le"]), value)
        for (name, series), value in page.items()
        if name == f"{REQUEST_LATENCY}_bucket" and tuple(kv for kv in series if kv[0] != "le") == labels
    )
    assert [bound for bound, _ in buckets[:-1]] == pytest.approx(list(LATENCY_BUCKETS_US))
    assert buckets[-1] == (float("inf"), 4)
    assert [count for _, count in buckets] == sorted(count for _, count in buckets)


def test_batch_sizes_count_the_rows_of_each_batch_but_not_the_warmup(
    models: Path, tiny_model: TinyModel, tmp_path: Path
) -> None:
    images = tiny_model.images()[:8]
    batching = ["--enable_batching", f"--batching_parameters_file={REPO_ROOT / 'serving' / 'batching.config'}"]
    with serving(tmp_path, models, ENABLED, *batching) as server:
        before = scrape(server)
        stub = grpc_stub(server)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda image: stub.Predict(predict_request(image), timeout=TIMEOUT), images))
        after = scrape(server)

    assert not any(name.startswith(BATCH_SIZE) for name, _ in before)  # the warmup's batches are not traffic
    labels = (("model_name", MODEL_NAME), ("signature", SERVING_DEFAULT), ("version", "1"))
    rows = after[(f"{BATCH_SIZE}_sum", labels)]
    batches = after[(f"{BATCH_SIZE}_count", labels)]
    assert rows == 8
    assert 1 <= batches <= 8
    assert after[(f"{BATCH_SIZE}_bucket", (("le", "32.0"), *labels))] == batches


def test_two_servers_in_one_process_count_only_their_own_requests(
    models: Path, tiny_model: TinyModel, tmp_path: Path
) -> None:
    image = tiny_model.images()[0]
    with serving(tmp_path / "a", models, ENABLED) as first, serving(tmp_path / "b", models, ENABLED) as second:
        for server, count in ((first, 2), (second, 1)):
            for _ in range(count):
                grpc_stub(server).Predict(predict_request(image), timeout=TIMEOUT)
        pages = scrape(first), scrape(second)
    assert [requests_counted(page, API="Predict", status="OK") for page in pages] == [2, 1]


def test_the_monitoring_config_sets_the_path(models: Path, tmp_path: Path) -> None:
    monitoring = 'prometheus_config { enable: true path: "/metrics" }\n'
    with serving(tmp_path, models, monitoring) as server:
        assert rest(server, "GET", f"/v1/models/{MODEL_NAME}").ok
        page = scrape(server, "/metrics")
        default_path = rest(server, "GET", DEFAULT_PATH)
        posted = rest(server, "POST", "/metrics", {})
    assert requests_counted(page, API="GetModelStatus") == 1
    assert default_path.status_code == 404
    assert posted.status_code == 501


@pytest.mark.parametrize(
    ("text", "enabled", "message"),
    [
        ("", False, None),  # an empty file: TF Serving's default, no metrics
        ("prometheus_config { enable: false }", False, None),
        ("prometheus_config { enable: true }", True, None),
        ('prometheus_config { enable: true path: "/v1/models/x" }', None, "outside the API's /v1/ paths"),
        ('prometheus_config { enable: true path: "metrics" }', None, "must start with '/'"),
        ("prometheus { enable: true }", None, "not a MonitoringConfig text proto"),
    ],
)
def test_monitoring_config_is_tf_servings_text_format(text: str, enabled: bool | None, message: str | None) -> None:
    if message is not None:
        with pytest.raises(ConfigError, match=message):
            parse_monitoring_config(text)
        return
    options = parse_monitoring_config(text)
    assert options.prometheus_enabled is enabled
    assert options.prometheus_path == DEFAULT_PATH


def test_the_shipped_monitoring_config_enables_tf_servings_path() -> None:
    options = parse_monitoring_config((REPO_ROOT / "serving" / "monitoring.config").read_text())
    assert options.prometheus_enabled and options.prometheus_path == DEFAULT_PATH
