"""Prediction logging as TF Serving configures it: `logging_config` in a model's models.config entry.

    config {
      name: "productlens"  base_path: "models/productlens"  model_platform: "tensorflow"
      logging_config {
        log_collector_config { type: "" filename_prefix: "logs/predictions/productlens" }
        sampling_config { sampling_rate: 0.1 }
      }
    }

Each answered Predict or Classify request of that model (gRPC or REST) is sampled at `sampling_rate`; a sampled
one is written with its response, the images included, as a `tensorflow.serving.PredictionLog` record to TFRecord
files named from the prefix (serving/prediction_log_format.py: names, reader), rotated once a file would pass
`max_file_bytes`. Failed requests are not logged, as in TF Serving.

The request thread only samples and puts the request and response (no copy, no serialization) on a bounded queue;
one writer thread builds, serializes and writes the records and flushes whenever the queue runs empty. When the
queue is full the entry is dropped, never the request slowed: `productlens_serving_prediction_logs_total
{outcome="dropped"}` counts those, `written` and `failed` (a write error, logged) the rest.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO

import numpy as np
from tensorflow_serving.apis import (
    classification_pb2,
    model_pb2,
    predict_pb2,
    prediction_log_pb2,
)

from serving.config import ModelConfig, PredictionLogging
from serving.metrics import DROPPED, FAILED, WRITTEN, ServerMetrics
from serving.prediction_log_format import log_file_path, tfrecord
from serving.tensors import to_tensor_proto

log = logging.getLogger("serving.prediction_log")

DEFAULT_MAX_FILE_BYTES = 64 << 20
# Entries waiting for the writer; each holds a request (its images) and a response, ~100 KB for one photo.
DEFAULT_QUEUE_SIZE = 256
_FILE_BUFFER_BYTES = 1 << 20
_ERROR_LOG_INTERVAL_S = 60.0  # a failing disk would otherwise log once per sampled request
SAVED_MODEL_TAGS = ("serve",)


@dataclass(frozen=True)
class PredictionLogOptions:
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # a file is rotated before it would pass this
    queue_size: int = DEFAULT_QUEUE_SIZE  # entries waiting for the writer thread; more are dropped

    def __post_init__(self) -> None:
        if self.max_file_bytes < 1 or self.queue_size < 1:
            raise ValueError("prediction logs: max_file_bytes and queue_size must be >= 1")


class LogFiles:
    """The files of one filename prefix: one open at a time, a new one once the next record would pass max_bytes
    (a record larger than that gets a file of its own)."""

    def __init__(self, filename_prefix: str, max_bytes: int) -> None:
        self.filename_prefix = filename_prefix
        self.max_bytes = max_bytes
        self._file: BinaryIO | None = None
        self._size = 0
        self._sequence = 0

    def write(self, record: bytes) -> None:
        if self._file is None or (self._size and self._size + len(record) > self.max_bytes):
            self._open_next()
        assert self._file is not None
        self._file.write(record)
        self._size += len(record)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_next(self) -> None:
        self.close()
        while True:  # never append to another writer's file (two servers of one process, same prefix, same instant)
            self._sequence += 1
            path = log_file_path(self.filename_prefix, datetime.now(UTC), os.getpid(), self._sequence)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._file = open(path, "xb", buffering=_FILE_BUFFER_BYTES)  # noqa: SIM115 - kept open across writes
                break
            except FileExistsError:
                continue
        self._size = 0
        log.info("Writing prediction logs to %s", path)


@dataclass
class _Entry:
    """A sampled request and its answer, as the front end had them; the writer thread turns it into a record."""

    model_name: str
    version: int
    signature: str
    logging: PredictionLogging
    request: predict_pb2.PredictRequest | classification_pb2.ClassificationRequest | None = None
    response: predict_pb2.PredictResponse | classification_pb2.ClassificationResponse | None = None
    # A REST predict: the client's ModelSpec and the arrays it sent and got (protos are built off the request path).
    request_spec: model_pb2.ModelSpec | None = None
    inputs: dict[str, np.ndarray] | None = None
    outputs: dict[str, np.ndarray] | None = None
    timestamp_s: int = field(default_factory=lambda: int(time.time()))

    def prediction_log(self) -> prediction_log_pb2.PredictionLog:
        entry = prediction_log_pb2.PredictionLog()
        metadata = entry.log_metadata
        metadata.model_spec.name = self.model_name
        metadata.model_spec.version.value = self.version
        metadata.model_spec.signature_name = self.signature
        metadata.sampling_config.sampling_rate = self.logging.sampling_rate
        metadata.saved_model_tags.extend(SAVED_MODEL_TAGS)
        metadata.timestamp_secs = self.timestamp_s
        if isinstance(self.request, classification_pb2.ClassificationRequest):
            entry.classify_log.request.CopyFrom(self.request)
            entry.classify_log.response.CopyFrom(self.response)
        elif self.request is not None:
            entry.predict_log.request.CopyFrom(self.request)
            entry.predict_log.response.CopyFrom(self.response)
        else:
            assert self.request_spec is not None and self.inputs is not None and self.outputs is not None
            request = entry.predict_log.request
            request.model_spec.CopyFrom(self.request_spec)
            request.model_spec.signature_name = self.signature
            for name, value in self.inputs.items():
                request.inputs[name].CopyFrom(to_tensor_proto(value))
            response = entry.predict_log.response
            response.model_spec.CopyFrom(metadata.model_spec)
            for name, value in self.outputs.items():
                response.outputs[name].CopyFrom(to_tensor_proto(value))
        return entry


_STOP = object()


class PredictionLogger:
    """Samples answered requests of the models whose config has a logging_config and writes them off the request
    path. `configure()` takes each new model config; `stop()` writes out what is queued and closes the files."""

    def __init__(self, options: PredictionLogOptions | None = None, metrics: ServerMetrics | None = None) -> None:
        self.options = options or PredictionLogOptions()
        self.metrics = metrics
        self._models: dict[str, PredictionLogging] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=self.options.queue_size)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._files: dict[str, LogFiles] = {}  # the writer thread's own
        self._last_error_log = -_ERROR_LOG_INTERVAL_S
        self._errors_not_logged = 0

    def configure(self, models: Iterable[ModelConfig]) -> None:
        """Log the models whose config has a logging_config (with a rate above 0) from now on, and no others."""
        logged = {m.name: m.logging for m in models if m.logging is not None and m.logging.sampling_rate > 0}
        for name, config in logged.items():
            if self._models.get(name) != config:
                log.info(
                    "Logging %s of model %s's requests to %s*",
                    f"{config.sampling_rate:.0%}" if config.sampling_rate >= 0.01 else config.sampling_rate,
                    name,
                    config.filename_prefix,
                )
        self._models = logged  # one assignment: request threads see the old or the new dict, never half of one
        if logged:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._write_loop, name="prediction-log", daemon=True)
                    self._thread.start()

    def _sampled(self, model_name: str) -> PredictionLogging | None:
        config = self._models.get(model_name)
        if config is None or random.random() >= config.sampling_rate:
            return None
        return config

    def log_predict(
        self, version: int, request: predict_pb2.PredictRequest, response: predict_pb2.PredictResponse
    ) -> None:
        """A gRPC Predict answered by `version` (the objects are only read from now on)."""
        name = response.model_spec.name
        config = self._sampled(name)
        if config is not None:
            self._put(_Entry(name, version, response.model_spec.signature_name, config, request, response))

    def log_classify(
        self,
        version: int,
        request: classification_pb2.ClassificationRequest,
        response: classification_pb2.ClassificationResponse,
    ) -> None:
        name = response.model_spec.name
        config = self._sampled(name)
        if config is not None:
            self._put(_Entry(name, version, response.model_spec.signature_name, config, request, response))

    def log_predict_arrays(
        self,
        model_name: str,
        version: int,
        signature: str,
        request_spec: model_pb2.ModelSpec,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> None:
        """A REST predict: logged as the PredictRequest/PredictResponse a gRPC client would have exchanged."""
        config = self._sampled(model_name)
        if config is not None:
            entry = _Entry(model_name, version, signature, config, request_spec=request_spec)
            entry.inputs, entry.outputs = inputs, outputs
            self._put(entry)

    def _put(self, entry: _Entry) -> None:
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._count(entry.model_name, DROPPED)

    def _count(self, model_name: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.prediction_log(model_name, outcome)

    # ----- the writer thread ---------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is _STOP:
                break
            self._write(entry)
            if self._queue.empty():
                self._flush()
        self._flush()
        for files in self._files.values():
            files.close()
        self._files.clear()

    def _write(self, entry: _Entry) -> None:
        prefix = entry.logging.filename_prefix
        try:
            record = tfrecord(entry.prediction_log().SerializeToString())
            files = self._files.get(prefix)
            if files is None:
                files = self._files[prefix] = LogFiles(prefix, self.options.max_file_bytes)
            files.write(record)
        except Exception as error:  # noqa: BLE001 - the writer thread must survive a full disk or a bad entry
            self._count(entry.model_name, FAILED)
            self._log_error(f"Could not write a prediction log of model {entry.model_name} to {prefix}*: {error}")
            return
        self._count(entry.model_name, WRITTEN)

    def _flush(self) -> None:
        """Flush every open file; close those of prefixes no model logs to any more."""
        active = {config.filename_prefix for config in self._models.values()}
        for prefix, files in list(self._files.items()):
            try:
                files.flush()
                if prefix not in active:
                    files.close()
                    del self._files[prefix]
            except OSError as error:
                self._log_error(f"Could not flush the prediction logs {prefix}*: {error}")

    def _log_error(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log < _ERROR_LOG_INTERVAL_S:
            self._errors_not_logged += 1
            return
        more = f" ({self._errors_not_logged} more since the last such message)" if self._errors_not_logged else ""
        log.error("%s%s", message, more)
        self._last_error_log = now
        self._errors_not_logged = 0

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Write out every queued entry and close the files; False if the writer was still busy at timeout_s."""
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(_STOP, timeout=max(timeout_s, 0.0))
        except queue.Full:
            log.error("The prediction log writer did not take the queued entries within %.1f s", timeout_s)
            return False
        self._thread.join(max(deadline - time.monotonic(), 0.0))
        if self._thread.is_alive():
            log.error("The prediction log writer did not finish within %.1f s", timeout_s)
            return False
        return True
