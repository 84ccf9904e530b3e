"""Prediction logs as TF Serving configures them (`logging_config` in models.config): sampled requests and their
answers come back from the log files through serving.prediction_log_format, images and all.

The servers run in this process (serving.server.ModelServer on free loopback ports) on the tiny exported model.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)

from serving.config import ConfigError, model_configs, parse_model_server_config
from serving.contract import IMAGE_BYTES, PROBABILITIES, SERVING_DEFAULT
from serving.metrics import DROPPED, WRITTEN, ServerMetrics
from serving.prediction_log import LogFiles, PredictionLogger, PredictionLogOptions
from serving.prediction_log_format import (
    PredictionLogError,
    log_files,
    read_prediction_logs,
    read_records,
    tfrecord,
)
from serving.server import ModelServer, parse_args
from tests.fixtures.model_server import MODEL_NAME, TinyModel, export_tiny

TIMEOUT = 30


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Path:
    """<tmp>/models/productlens/1: the tiny model, shared read-only by every server here."""
    root = tmp_path_factory.mktemp("prediction_logs") / "models"
    export_tiny(tiny_model, root)
    return root / MODEL_NAME


def models_config(base_path: Path, logging: str = "") -> str:
    return (
        f'model_config_list {{ config {{ name: "{MODEL_NAME}" base_path: "{base_path}" model_platform: "tensorflow" '
        f"{logging} }} }}\n"
    )


def logging_config(prefix: Path | str, rate: float) -> str:
    return (
        f'logging_config {{ log_collector_config {{ type: "" filename_prefix: "{prefix}" }} '
        f"sampling_config {{ sampling_rate: {rate} }} }}"
    )


@contextlib.contextmanager
def serving(workdir: Path, config_text: str, *flags: str) -> Iterator[ModelServer]:
    """Our model server in this process, on free 127.0.0.1 ports, with `config_text` as its models.config."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "models.config"
    config.write_text(config_text)
    server = ModelServer(parse_args(["--port=0", "--rest_api_port=-1", f"--model_config_file={config}", *flags]))
    server.start()
    try:
        yield server
    finally:
        server.stop(10)


def images(tiny_model: TinyModel, count: int) -> list[bytes]:
    photos = tiny_model.images(per_class=3)
    return [photos[i % len(photos)] for i in range(count)]


def grpc_predict(server: ModelServer, image: bytes) -> predict_pb2.PredictResponse:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.inputs[IMAGE_BYTES].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string, shape=[1]))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=TIMEOUT)


def rest_predict(server: ModelServer, image: bytes) -> dict:
    body = {"instances": [{"b64": base64.b64encode(image).decode("ascii")}]}
    reply = requests.post(
        f"http://127.0.0.1:{server.rest_port}/v1/models/{MODEL_NAME}:predict", json=body, timeout=TIMEOUT
    )
    reply.raise_for_status()
    return reply.json()


def logged_images(entries: list[prediction_log_pb2.PredictionLog]) -> list[bytes]:
    return [bytes(entry.predict_log.request.inputs[IMAGE_BYTES].string_val[0]) for entry in entries]


def wait_for_logs(prefix: Path, count: int) -> list[prediction_log_pb2.PredictionLog]:
    """Read the logs until `count` records are there (the writer thread flushes when its queue runs empty)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        entries = list(read_prediction_logs(prefix))
        if len(entries) >= count or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def test_at_rate_1_every_request_comes_back_with_its_image_and_answer(
    models: Path, tiny_model: TinyModel, tmp_path: Path
) -> None:
    prefix = tmp_path / "logs" / MODEL_NAME
    sent = images(tiny_model, 8)
    with serving(tmp_path / "server", models_config(models, logging_config(prefix, 1.0))) as server:
        grpc_answers = [grpc_predict(server, image) for image in sent[:5]]
        rest_answers = [rest_predict(server, image) for image in sent[5:]]
        # While the server runs: what is queued reaches the files as soon as the writer has nothing else to do.
        entries = wait_for_logs(prefix, len(sent))

    assert len(entries) == len(sent)
    assert logged_images(entries) == sent  # the images as the clients sent them, in order
    for entry, answer in zip(entries[:5], grpc_answers, strict=True):
        assert entry.predict_log.response == answer
    for entry, answer in zip(entries[5:], rest_answers, strict=True):
        logged = tf.make_ndarray(entry.predict_log.response.outputs[PROBABILITIES])
        assert logged.tolist() == [answer["predictions"][0][PROBABILITIES]]
    for entry in entries:
        metadata = entry.log_metadata
        assert (metadata.model_spec.name, metadata.model_spec.version.value) == (MODEL_NAME, 1)
        assert metadata.model_spec.signature_name == SERVING_DEFAULT
        assert metadata.sampling_config.sampling_rate == 1.0
        assert list(metadata.saved_model_tags) == ["serve"]
        assert abs(metadata.timestamp_secs - time.time()) < 300
    assert list(read_prediction_logs(prefix)) == entries  # after the stop: the same records, nothing more
    # The files are TFRecords TensorFlow reads (as TFX's tools would).
    [path] = log_files(prefix)
    assert path.name.startswith(f"{MODEL_NAME}-") and path.suffix == ".tfrecord"
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    assert records == entries


def test_classify_requests_are_logged_as_classify_logs(models: Path, tiny_model: TinyModel, tmp_path: Path) -> None:
    prefix = tmp_path / "logs" / MODEL_NAME
    image = images(tiny_model, 1)[0]
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = MODEL_NAME
    request.model_spec.signature_name = "classification"
    request.input.example_list.examples.add().features.feature[IMAGE_BYTES].bytes_list.value.append(image)
    with serving(tmp_path / "server", models_config(models, logging_config(prefix, 1.0))) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Classify(request, timeout=TIMEOUT)
    [entry] = read_prediction_logs(prefix)
    assert entry.WhichOneof("log_type") == "classify_log"
    assert entry.classify_log.request == request and entry.classify_log.response == answer
    assert entry.log_metadata.model_spec.signature_name == "classification"


def test_at_rate_0_or_without_logging_config_nothing_is_written(
    models: Path, tiny_model: TinyModel, tmp_path: Path
) -> None:
    prefix = tmp_path / "logs" / MODEL_NAME
    for name, logging in (("rate0", logging_config(prefix, 0.0)), ("none", "")):
        with serving(tmp_path / name, models_config(models, logging)) as server:
            for image in images(tiny_model, 3):
                grpc_predict(server, image)
                rest_predict(server, image)
    assert not prefix.parent.exists()
    assert list(read_prediction_logs(prefix)) == []


def test_rotation_spreads_the_log_over_files_and_loses_no_request(
    models: Path, tiny_model: TinyModel, tmp_path: Path
) -> None:
    prefix = tmp_path / "logs" / MODEL_NAME
    sent = images(tiny_model, 10)
    # Each record holds one ~1.5 KB photo and the answer: about three records a file.
    flags = ["--prediction_log_max_file_bytes=6000"]
    with serving(tmp_path / "server", models_config(models, logging_config(prefix, 1.0)), *flags) as server:
        for image in sent:
            grpc_predict(server, image)
    files = log_files(prefix)
    assert len(files) >= 3
    assert all(path.stat().st_size <= 6000 for path in files)
    assert logged_images(list(read_prediction_logs(prefix))) == sent
    # A folder of logs reads the same.
    assert logged_images(list(read_prediction_logs(prefix.parent))) == sent


def test_logging_switched_on_by_a_config_reload_applies_to_the_next_requests(
    models: Path, tiny_model: TinyModel, tmp_path: Path
) -> None:
    prefix = tmp_path / "logs" / MODEL_NAME
    before, after = images(tiny_model, 4)[:2], images(tiny_model, 4)[2:]
    with serving(tmp_path / "server", models_config(models)) as server:
        for image in before:
            grpc_predict(server, image)
        request = model_management_pb2.ReloadConfigRequest()
        request.config.CopyFrom(parse_model_server_config(models_config(models, logging_config(prefix, 1.0))))
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=TIMEOUT)
        for image in after:
            grpc_predict(server, image)
    assert logged_images(list(read_prediction_logs(prefix))) == after


def test_a_full_queue_drops_entries_and_counts_them_without_waiting(tiny_model: TinyModel, tmp_path: Path) -> None:
    prefix = tmp_path / "logs" / MODEL_NAME
    metrics = ServerMetrics()
    logger = PredictionLogger(PredictionLogOptions(queue_size=1), metrics)
    config = f'model_config_list {{ config {{ name: "{MODEL_NAME}" base_path: "/m" {logging_config(prefix, 1.0)} }} }}'
    logger.configure(model_configs(parse_model_server_config(config)))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.inputs[IMAGE_BYTES].CopyFrom(tf.make_tensor_proto(images(tiny_model, 1), dtype=tf.string, shape=[1]))
    response = predict_pb2.PredictResponse()
    response.model_spec.name = MODEL_NAME
    response.model_spec.signature_name = SERVING_DEFAULT
    sent = 500
    started = time.perf_counter()
    for _ in range(sent):  # far faster than one writer thread can serialize and write them
        logger.log_predict(1, request, response)
    elapsed = time.perf_counter() - started
    assert logger.stop(TIMEOUT)

    written = len(list(read_prediction_logs(prefix)))
    page = metrics.page()[0].decode()
    counted = {outcome: _sample(page, outcome) for outcome in (WRITTEN, DROPPED)}
    assert counted[WRITTEN] == written
    assert counted[DROPPED] > 0
    assert written + counted[DROPPED] == sent
    assert elapsed < 2.0  # the callers never waited for the disk (a write each would take far longer)


def _sample(page: str, outcome: str) -> int:
    line = next(
        line
        for line in page.splitlines()
        if line.startswith("productlens_serving_prediction_logs_total{") and f'outcome="{outcome}"' in line
    )
    return int(float(line.rsplit(" ", 1)[1]))


def test_a_torn_last_record_ends_the_file_quietly_but_corruption_is_an_error(tmp_path: Path) -> None:
    files = LogFiles(str(tmp_path / "logs" / MODEL_NAME), max_bytes=1 << 20)
    records = [f"record {i}".encode() * 50 for i in range(3)]
    for record in records:
        files.write(tfrecord(record))
    files.close()
    [path] = log_files(tmp_path / "logs" / MODEL_NAME)
    assert list(read_records(path)) == records
    data = path.read_bytes()

    path.write_bytes(data[:-10])  # a server killed while writing the last record
    assert list(read_records(path)) == records[:2]
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(PredictionLogError, match="CRC mismatch"):
        list(read_records(path))


def test_file_names_sort_in_writing_order_and_other_prefixes_are_not_read(tmp_path: Path) -> None:
    first, second = LogFiles(str(tmp_path / "a"), 1), LogFiles(str(tmp_path / "a-b"), 1)
    for index in range(3):
        first.write(tfrecord(b"a%d" % index))  # max_bytes 1: one record a file
        second.write(tfrecord(b"ab%d" % index))
    first.close()
    second.close()
    assert [list(read_records(p)) for p in log_files(tmp_path / "a")] == [[b"a0"], [b"a1"], [b"a2"]]
    assert [list(read_records(p)) for p in log_files(tmp_path / "a-b")] == [[b"ab0"], [b"ab1"], [b"ab2"]]
    assert len(log_files(tmp_path)) == 6
    (tmp_path / "notes.txt").write_text("not a log")
    assert len(log_files(tmp_path)) == 6


@pytest.mark.parametrize(
    ("logging", "message"),
    [
        (
            'log_collector_config { filename_prefix: "/tmp/x" } sampling_config { sampling_rate: 1.5 }',
            "between 0 and 1",
        ),
        ('log_collector_config { type: "kafka" filename_prefix: "/x" }', "type 'kafka' is not supported"),
        ("sampling_config { sampling_rate: 0.1 }", "needs a filename_prefix"),
    ],
)
def test_a_bad_logging_config_is_refused_with_the_reason(logging: str, message: str) -> None:
    config = f'model_config_list {{ config {{ name: "{MODEL_NAME}" base_path: "/m" logging_config {{ {logging} }} }} }}'
    with pytest.raises(ConfigError, match=message):
        model_configs(parse_model_server_config(config))


def test_a_relative_prefix_resolves_like_base_path_and_a_trailing_slash_names_a_folder(tmp_path: Path) -> None:
    config = f'model_config_list {{ config {{ name: "{MODEL_NAME}" base_path: "m" {logging_config("logs/", 0.5)} }} }}'
    [model] = model_configs(parse_model_server_config(config), root=tmp_path)
    assert model.logging is not None and model.logging.sampling_rate == 0.5
    files = LogFiles(model.logging.filename_prefix, 1 << 20)
    files.write(tfrecord(b"x"))
    files.close()
    [path] = log_files(tmp_path / "logs")
    assert path.parent == tmp_path / "logs" and path.name[0].isdigit()
