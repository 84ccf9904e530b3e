"""The model server's Prometheus metrics, in one CollectorRegistry per server (several servers share a test process).

The REST port serves them at TF Serving's path, `/monitoring/prometheus/metrics`, when --monitoring_config_file
enables them, as `tensorflow_model_server` does:

    prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }

What TF Serving also measures keeps TF Serving's names, units and buckets, so one dashboard reads this server and
the official image alike; both carry more labels here (a superset: TF Serving's queries work unchanged):

    :tensorflow:serving:request_count     {model_name, version, signature, API, entrypoint, status}  every request
    :tensorflow:serving:request_latency   {model_name, version, signature, API, entrypoint}  histogram, microseconds,
                                          of the requests answered OK (TF Serving records no failed ones either)

API is Predict, Classify, Regress, GetModelMetadata or GetModelStatus; entrypoint GRPC or REST; status the gRPC code's
name (OK, INVALID_ARGUMENT, NOT_FOUND, ...): errors are `status!="OK"`. A model or signature the server does not
have is labelled "(unknown)", so a client cannot grow the page without bound. prometheus-client names every
counter `..._total`, so request_count is exposed untyped, under TF Serving's exact name.

What only this server has:

    productlens_serving_batch_size          {model_name, version, signature}  histogram: rows per batch run
    productlens_serving_prediction_logs_total  {model_name, outcome}  written / dropped (the writer's queue was
                                          full: the request was answered, its log entry lost) / failed (a write error)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# API label values: TF Serving's method names.
PREDICT = "Predict"
CLASSIFY = "Classify"
REGRESS = "Regress"  # answered UNIMPLEMENTED: the model has no regression signature
GET_MODEL_METADATA = "GetModelMetadata"
GET_MODEL_STATUS = "GetModelStatus"
GRPC = "GRPC"
REST = "REST"
UNKNOWN = "(unknown)"

REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"
BATCH_SIZE = "productlens_serving_batch_size"
PREDICTION_LOGS = "productlens_serving_prediction_logs"
# TF Serving's request_latency buckets (Buckets::Exponential(10, 1.8, 33)): 10 us up to ~20 minutes.
LATENCY_BUCKETS_US = tuple(10 * 1.8**i for i in range(33))
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
WRITTEN, DROPPED, FAILED = "written", "dropped", "failed"

_REQUEST_LABELS = ("model_name", "version", "signature", "API", "entrypoint")


@dataclass
class Call:
    """One API request as the metrics see it; the front end fills in what routing resolved."""

    api: str
    entrypoint: str
    model_name: str = UNKNOWN
    version: str = ""
    signature: str = ""
    started: float = field(default_factory=time.perf_counter)

    def routed(self, model_name: str, version: int, signatures=(), requested_signature: str | None = None) -> None:
        """The request reached version `version` of `model_name`; `requested_signature` counts if the version has it."""
        self.model_name = model_name
        self.version = str(version)
        if requested_signature is not None:
            self.signature = requested_signature if requested_signature in signatures else UNKNOWN


class _RequestCounts(Collector):
    """request_count under TF Serving's name: a counter that prometheus-client would otherwise call `..._total`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, ...], int] = {}

    def increment(self, labels: tuple[str, ...]) -> None:
        with self._lock:
            self._counts[labels] = self._counts.get(labels, 0) + 1

    def collect(self):
        metric = Metric(REQUEST_COUNT, "The total number of requests.", "unknown")
        with self._lock:
            counts = list(self._counts.items())
        for labels, count in counts:
            metric.add_sample(REQUEST_COUNT, dict(zip((*_REQUEST_LABELS, "status"), labels, strict=True)), count)
        yield metric


class ServerMetrics:
    """Every metric of one model server; thread-safe. `page()` is what the metrics path answers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = _RequestCounts()
        self.registry.register(self._requests)
        self._latency = Histogram(
            REQUEST_LATENCY,
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            _REQUEST_LABELS,
            buckets=LATENCY_BUCKETS_US,
            registry=self.registry,
        )
        self._batch_size = Histogram(
            BATCH_SIZE,
            "Rows in each batch the batch threads ran (requests of one model version and signature, concatenated).",
            ("model_name", "version", "signature"),
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self._prediction_logs = Counter(
            PREDICTION_LOGS,
            "Sampled requests by what became of their PredictionLog record: written, dropped (queue full), failed.",
            ("model_name", "outcome"),
            registry=self.registry,
        )

    def record(self, call: Call, code: grpc.StatusCode) -> None:
        """Count a finished request; an OK one's latency goes into the histogram too."""
        labels = (call.model_name, call.version, call.signature, call.api, call.entrypoint)
        self._requests.increment((*labels, code.name))
        if code == grpc.StatusCode.OK:
            self._latency.labels(*labels).observe((time.perf_counter() - call.started) * 1e6)

    def batch_observer(self, model_name: str, version: int) -> Callable[[str, int], None]:
        """What a version's batch scheduler calls with (signature, rows) after each batch it runs."""

        def observe(signature: str, rows: int) -> None:
            self._batch_size.labels(model_name, str(version), signature).observe(rows)

        return observe

    def prediction_log(self, model_name: str, outcome: str) -> None:
        self._prediction_logs.labels(model_name, outcome).inc()

    def page(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
