"""TF Serving PredictionService gRPC client: image bytes in, top-k classes with probabilities out.

Works against `python -m serving.server` and a real tensorflow_model_server alike: the request
names the model, the signature and (optionally) a version or a version label; every call has a
deadline; only UNAVAILABLE (server starting, restarting, unreachable) is retried, by gRPC itself
(the retry policy in the channel's service config), with backoff.

Each answer carries the served version's own "not sure" threshold (its `not_sure_threshold` output,
chosen by evaluate on val): a model without it is an error, never a silent default.

Importing this module loads TensorFlow: `tensorflow_serving.apis` is generated from protos that import
TensorFlow's (`tensorflow.core.framework`), and importing that package runs `tensorflow/__init__.py`. So the
client reads answers with TensorFlow's own TensorProto -> NumPy conversion (`make_ndarray`); the request's one
string tensor is written directly (`tf.make_tensor_proto` costs about 0.2 ms a call for it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

from serving.contract import (
    CLASS_NAMES,
    IMAGE_BYTES,
    NOT_SURE_THRESHOLD,
    PROBABILITIES,
    SCORES,
    SERVING_DEFAULT,
    ClassScore,
    readable_error,
)

T = TypeVar("T")

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
# Largest message we accept from the server: a batch of probabilities is tiny, but keep room.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# gRPC keeps a request for retrying only while it fits this buffer (default 256 KiB, less than a photo):
# room for the largest upload the app takes (10 MiB) and more.
RETRY_BUFFER_BYTES = 32 * 1024 * 1024
INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 1000


def retry_service_config(attempts: int, backoff_s: float, max_backoff_s: float) -> str:
    """The channel's service config: every PredictionService call is tried up to `attempts` times (gRPC caps
    it at 5) while the answer is UNAVAILABLE, waiting a random time up to `backoff_s`, doubling to
    `max_backoff_s`, between tries. Other codes, and DEADLINE_EXCEEDED, are final."""
    policy = {
        "maxAttempts": attempts,
        "initialBackoff": f"{backoff_s}s",
        "maxBackoff": f"{max_backoff_s}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": [grpc.StatusCode.UNAVAILABLE.name],
    }
    return json.dumps({"methodConfig": [{"name": [{"service": PREDICTION_SERVICE}], "retryPolicy": policy}]})


class ModelServerError(RuntimeError):
    """The model server answered with an error a caller should report (bad image, unknown model, ...).

    `details` is the server's message without TensorFlow internals (what a user may see); `server_details`
    is the message exactly as the server sent it (for logs).
    """

    def __init__(self, code: grpc.StatusCode, message: str, server_details: str | None = None):
        super().__init__(f"model server: {code.name}: {message}")
        self.code = code
        self.details = message
        self.server_details = message if server_details is None else server_details


class ModelUnavailableError(ModelServerError):
    """The model server cannot be reached or did not answer in time (after the retries)."""


class IncompatibleModelError(ModelServerError):
    """The served model answers, but not with the outputs this client needs (e.g. an export from before
    the model carried its not-sure threshold)."""

    def __init__(self, message: str):
        super().__init__(grpc.StatusCode.FAILED_PRECONDITION, message)


@dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image, most probable first, the model version that answered, and that
    version's not-sure threshold (a top-1 probability under it means "not sure")."""

    top_k: list[ClassScore]
    model_name: str
    model_version: int | None
    not_sure_threshold: float

    @property
    def top(self) -> ClassScore:
        return self.top_k[0]


class PredictionClient:
    """A PredictionService client bound to one model, signature and (optional) version or label."""

    def __init__(
        self,
        target: str,
        model_name: str = "productlens",
        signature_name: str = SERVING_DEFAULT,
        version: int | None = None,
        version_label: str | None = None,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
    ):
        if version is not None and version_label:
            raise ValueError("give a model version or a version label, not both")
        if not 0 <= retries <= 4:
            raise ValueError(f"retries must be 0 to 4 (gRPC makes at most 5 attempts), got {retries}")
        self.target = target
        self.model_name = model_name
        self.signature_name = signature_name
        self.version = version
        self.version_label = version_label
        self.timeout_s = timeout_s
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # gRPC's default reconnect backoff grows 1.6x up to 120 s, so after a model server restart the
            # app would fail fast for seconds to minutes more; retry connecting at least once a second.
            ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ]
        if retries:
            options += [
                ("grpc.enable_retries", 1),
                ("grpc.service_config", retry_service_config(retries + 1, backoff_s, max_backoff_s)),
                ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
            ]
        self._options = options
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._aio_channel: grpc.aio.Channel | None = None
        self._aio_stub: prediction_service_pb2_grpc.PredictionServiceStub | None = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _model_spec(self, spec: Any, signature: bool = True, version_label: str | None = None) -> None:
        """Name the model, signature and version; `version_label` (one call's) wins over the client's selector."""
        spec.name = self.model_name
        if signature:
            spec.signature_name = self.signature_name
        if version_label:
            spec.version_label = version_label
        elif self.version is not None:
            spec.version.value = self.version
        elif self.version_label:
            spec.version_label = self.version_label

    def _call(self, method: Callable[..., T], request: Any, timeout_s: float | None = None) -> T:
        """Call with a deadline (covering gRPC's retries of UNAVAILABLE); errors as ModelServerError."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise self._error(error, timeout) from error

    def _error(self, error: grpc.RpcError, timeout: float) -> ModelServerError:
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            return ModelUnavailableError(
                code, f"cannot reach the model server at {self.target} ({details}); is it running?"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ModelUnavailableError(
                code, f"the model server at {self.target} did not answer within {timeout:.1f}s"
            )
        return ModelServerError(code, readable_error(details, "no reason given"), details)

    def _predict_request(self, images: Sequence[bytes], version_label: str | None) -> predict_pb2.PredictRequest:
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, version_label=version_label)
        tensor = request.inputs[IMAGE_BYTES]
        tensor.dtype = types_pb2.DT_STRING
        tensor.tensor_shape.dim.add(size=len(images))
        tensor.string_val.extend(images)
        return request

    def predict(self, images: Sequence[bytes], top_k: int = 3, version_label: str | None = None) -> list[Prediction]:
        """Top-k classes for each encoded image (JPEG/PNG bytes), in the order given; `version_label` asks this
        call's version by label instead of the client's own selector."""
        response = self._call(self._stub.Predict, self._predict_request(images, version_label))
        return self._predictions(response, len(images), top_k)

    def predict_one(self, image: bytes, top_k: int = 3, version_label: str | None = None) -> Prediction:
        return self.predict([image], top_k, version_label)[0]

    async def predict_one_async(self, image: bytes, top_k: int = 3, version_label: str | None = None) -> Prediction:
        """`predict_one` on an asyncio event loop, over a grpc.aio channel to the same target with the same options
        (opened on the loop at the first call; `aclose()` it there): no thread waits for the answer, so a request
        costs the app no thread hand-offs. (The blocking stub's `.future()` would start a thread per call.)"""
        if self._aio_stub is None:
            self._aio_channel = grpc.aio.insecure_channel(self.target, options=self._options)
            self._aio_stub = prediction_service_pb2_grpc.PredictionServiceStub(self._aio_channel)
        request = self._predict_request([image], version_label)
        try:
            response = await self._aio_stub.Predict(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise self._error(error, self.timeout_s) from error
        return self._predictions(response, 1, top_k)[0]

    async def aclose(self) -> None:
        """Close the asyncio channel (on the loop that opened it), then the blocking one."""
        if self._aio_channel is not None:
            await self._aio_channel.close()
            self._aio_channel = self._aio_stub = None
        self.close()

    def _missing_threshold(self, version: int | None) -> IncompatibleModelError:
        served = f"model '{self.model_name}'" + (f" version {version}" if version is not None else "")
        return IncompatibleModelError(
            f"{served} (signature '{self.signature_name}') has no '{NOT_SURE_THRESHOLD}' output: it was exported "
            "before each model carried its own not-sure threshold. Export and publish it again (`make repro`: "
            "evaluate writes the threshold, export builds it into the model, `make publish` serves it) or serve a "
            "newer version."
        )

    def _not_sure_thresholds(self, outputs: Any, count: int, version: int | None) -> np.ndarray:
        """The served not-sure threshold of each image: one value per row, each a probability."""
        if NOT_SURE_THRESHOLD not in outputs:
            raise self._missing_threshold(version)
        values = tf.make_ndarray(outputs[NOT_SURE_THRESHOLD]).astype(np.float64).reshape(-1)
        if values.size != count or not np.all((values >= 0.0) & (values <= 1.0)):
            raise IncompatibleModelError(
                f"model '{self.model_name}' answered {values.size} '{NOT_SURE_THRESHOLD}' values for {count} "
                f"image(s), expected one probability per image: {values.tolist()[:8]}"
            )
        return values

    def _predictions(self, response: Any, count: int, top_k: int) -> list[Prediction]:
        """Pair class names with their scores: `scores` when it has the names' shape (top-k order, as
        TF Serving's classify convention), else `probabilities` (class-index order), then sort."""
        outputs = response.outputs
        if CLASS_NAMES not in outputs or not ({SCORES, PROBABILITIES} & set(outputs)):
            raise ModelServerError(
                grpc.StatusCode.INTERNAL,
                f"signature '{self.signature_name}' of model '{self.model_name}' must output '{CLASS_NAMES}' and "
                f"'{SCORES}' or '{PROBABILITIES}'; it outputs {sorted(outputs)}",
            )
        names = tf.make_ndarray(outputs[CLASS_NAMES])
        values = None
        for key in (SCORES, PROBABILITIES):
            if key in outputs:
                candidate = tf.make_ndarray(outputs[key]).astype(np.float64)
                if candidate.size == names.size or (names.ndim == 1 and candidate.size == names.size * count):
                    values = candidate.reshape(count, -1)
                    break
        if values is None:
            raise ModelServerError(grpc.StatusCode.INTERNAL, "class names and scores of the model do not line up")
        if names.size != values.size:  # one list of class names for the whole batch
            names = np.tile(names.reshape(1, -1), (count, 1))
        names = names.reshape(count, -1)
        version = response.model_spec.version.value if response.model_spec.HasField("version") else None
        thresholds = self._not_sure_thresholds(outputs, count, version)
        predictions = []
        for row_values, row_names, threshold in zip(values, names, thresholds, strict=True):
            order = np.argsort(-row_values, kind="stable")[:top_k]
            predictions.append(
                Prediction(
                    [ClassScore(_text(row_names[i]), float(row_values[i])) for i in order],
                    response.model_spec.name or self.model_name,
                    version,
                    float(threshold),
                )
            )
        return predictions

    def model_metadata(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The model's served version (a cheap liveness check of model + server); raises IncompatibleModelError
        when the signature this client calls is missing or has no not-sure threshold output."""
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._model_spec(request.model_spec, signature=False)
        request.metadata_field.append("signature_def")
        response = self._call(self._stub.GetModelMetadata, request, timeout_s)
        version = response.model_spec.version.value if response.model_spec.HasField("version") else None
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        signature = signatures.signature_def.get(self.signature_name)
        if signature is None:
            raise IncompatibleModelError(
                f"model '{self.model_name}' has no signature '{self.signature_name}'; it has "
                f"{sorted(signatures.signature_def)}"
            )
        if NOT_SURE_THRESHOLD not in signature.outputs:
            raise self._missing_threshold(version)
        return {"model": response.model_spec.name or self.model_name, "version": version}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
