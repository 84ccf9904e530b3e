"""gRPC front end: tensorflow.serving.PredictionService and ModelService, with the stubs' own servicer bases.

HandleReloadConfigRequest replaces the whole model config, so unlike TF Serving (where anyone who reaches the
port may call it) it can be switched off, or require a shared token: `ReloadAccess`.

Every Predict, Classify, GetModelMetadata and GetModelStatus call is counted in the server's metrics (with its
status, and its latency when answered OK); answered Predict and Classify calls go to the core's prediction logger.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.contract import SERVING_DEFAULT
from serving.core import ServerCore
from serving.errors import ServingError, invalid_argument
from serving.metrics import (
    CLASSIFY,
    GET_MODEL_METADATA,
    GET_MODEL_STATUS,
    GRPC,
    PREDICT,
    REGRESS,
    Call,
    ServerMetrics,
)

log = logging.getLogger("serving.grpc")

SIGNATURE_DEF_FIELD = "signature_def"
RELOAD_TOKEN_ENV = "PRODUCTLENS_RELOAD_CONFIG_TOKEN"
RELOAD_TOKEN_METADATA = "authorization"  # value: "Bearer <token>"


@dataclass(frozen=True)
class ReloadAccess:
    """Who may call HandleReloadConfigRequest: nobody (`enabled` False), or any caller that sends `token` (when
    one is set) as `authorization: Bearer <token>` metadata."""

    enabled: bool = True
    token: str | None = None
    why_off: str = "--reload_config_rpc=off"

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        if not self.enabled:
            raise ServingError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"HandleReloadConfigRequest is switched off on this server ({self.why_off}); "
                "change the --model_config_file it polls instead",
            )
        if self.token is None:
            return
        sent = next((value for key, value in metadata or () if key == RELOAD_TOKEN_METADATA), "")
        sent_bytes = sent if isinstance(sent, bytes) else sent.encode("utf-8")
        if not hmac.compare_digest(sent_bytes, f"Bearer {self.token}".encode()):
            raise ServingError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"HandleReloadConfigRequest needs the server's reload token: send the metadata "
                f"'{RELOAD_TOKEN_METADATA}: Bearer <token>' with the value of ${RELOAD_TOKEN_ENV} on the server",
            )


class InFlight:
    """How many gRPC calls are being handled; shutdown waits for none."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def __enter__(self) -> None:
        with self._idle:
            self._count += 1

    def __exit__(self, *exc) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    @property
    def count(self) -> int:
        return self._count

    def wait_idle(self, timeout_s: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout=max(timeout_s, 0.0))


class InFlightInterceptor(grpc.ServerInterceptor):
    """Counts every unary call (all of PredictionService and ModelService are unary) in an `InFlight`."""

    def __init__(self, in_flight: InFlight) -> None:
        self.in_flight = in_flight

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        def counted(request, context):
            with self.in_flight:
                return behaviour(request, context)

        return handler._replace(unary_unary=counted)


def model_metadata(
    core: ServerCore, request: get_model_metadata_pb2.GetModelMetadataRequest, call: Call | None = None
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """GetModelMetadata: the served version's SignatureDefs (the only metadata field TF Serving has)."""
    if not request.metadata_field:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for name in request.metadata_field:
        if name != SIGNATURE_DEF_FIELD:
            raise invalid_argument(f"Metadata field {name} is not supported")
    with core.servable(request.model_spec) as version:
        assert version.model is not None
        if call is not None:
            call.routed(version.name, version.version)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = version.name
        response.model_spec.version.value = version.version
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, value in version.model.signature_defs.items():
            signatures.signature_def[key].CopyFrom(value)
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signatures)
        return response


def _timeout(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e6 else None


def _fail(context: grpc.ServicerContext, error: Exception, method: str):
    if isinstance(error, ServingError):
        log.debug("%s failed: %s", method, error)
        context.abort(error.code, error.message)
    log.exception("%s failed unexpectedly", method)
    context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


def status_of(error: Exception) -> grpc.StatusCode:
    """The status code a failed request is answered with (anything but a ServingError is INTERNAL)."""
    return error.code if isinstance(error, ServingError) else grpc.StatusCode.INTERNAL


def start_call(core: ServerCore, api: str, entrypoint: str, model_name: str) -> Call:
    """A request's metrics record: its model name as a label only if the config has that model."""
    return Call(api, entrypoint, model_name=model_name) if core.has_model(model_name) else Call(api, entrypoint)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: ServerCore, metrics: ServerMetrics) -> None:
        self.core = core
        self.metrics = metrics

    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext):  # noqa: N802
        call = start_call(self.core, PREDICT, GRPC, request.model_spec.name)
        try:
            with self.core.servable(request.model_spec) as version:
                assert version.model is not None
                signature = request.model_spec.signature_name or SERVING_DEFAULT
                call.routed(version.name, version.version, version.model.signature_defs, signature)
                response = version.predict(request, _timeout(context))
        except Exception as error:  # noqa: BLE001 - every failure becomes a status; the server stays up
            self.metrics.record(call, status_of(error))
            _fail(context, error, "Predict")
        self.metrics.record(call, grpc.StatusCode.OK)
        self.core.prediction_logs.log_predict(version.version, request, response)
        return response

    def Classify(self, request: classification_pb2.ClassificationRequest, context: grpc.ServicerContext):  # noqa: N802
        call = start_call(self.core, CLASSIFY, GRPC, request.model_spec.name)
        try:
            with self.core.servable(request.model_spec) as version:
                assert version.model is not None
                signature = request.model_spec.signature_name or SERVING_DEFAULT
                call.routed(version.name, version.version, version.model.signature_defs, signature)
                response = version.classify(request, _timeout(context))
        except Exception as error:  # noqa: BLE001
            self.metrics.record(call, status_of(error))
            _fail(context, error, "Classify")
        self.metrics.record(call, grpc.StatusCode.OK)
        self.core.prediction_logs.log_classify(version.version, request, response)
        return response

    def Regress(self, request, context: grpc.ServicerContext):  # noqa: N802
        call = start_call(self.core, REGRESS, GRPC, request.model_spec.name)
        self.metrics.record(call, grpc.StatusCode.UNIMPLEMENTED)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Regress is not implemented: ProductLens exports no regression")

    def MultiInference(self, request, context: grpc.ServicerContext):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not implemented by this server")

    def GetModelMetadata(self, request, context: grpc.ServicerContext):  # noqa: N802
        call = start_call(self.core, GET_MODEL_METADATA, GRPC, request.model_spec.name)
        try:
            response = model_metadata(self.core, request, call)
        except Exception as error:  # noqa: BLE001
            self.metrics.record(call, status_of(error))
            _fail(context, error, "GetModelMetadata")
        self.metrics.record(call, grpc.StatusCode.OK)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: ServerCore, reload_access: ReloadAccess, metrics: ServerMetrics) -> None:
        self.core = core
        self.reload_access = reload_access
        self.metrics = metrics

    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context):  # noqa: N802
        call = start_call(self.core, GET_MODEL_STATUS, GRPC, request.model_spec.name)
        try:
            if not request.HasField("model_spec"):
                raise invalid_argument("Missing ModelSpec")
            response = self.core.model_status(request.model_spec)
        except Exception as error:  # noqa: BLE001
            self.metrics.record(call, status_of(error))
            _fail(context, error, "GetModelStatus")
        self.metrics.record(call, grpc.StatusCode.OK)
        return response

    def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest, context):  # noqa: N802
        try:
            self.reload_access.check(context.invocation_metadata())
            self.core.reload_config(request.config)
            log.info("Reloaded the model config (%d model(s))", len(request.config.model_config_list.config))
            return model_management_pb2.ReloadConfigResponse()
        except ServingError as error:
            # Someone tried to change what this server serves and was refused: worth a line at the default level.
            log.warning("Refused HandleReloadConfigRequest from %s: %s", context.peer(), error)
            _fail(context, error, "HandleReloadConfigRequest")
        except Exception as error:  # noqa: BLE001
            _fail(context, error, "HandleReloadConfigRequest")


def add_services(server: grpc.Server, core: ServerCore, reload_access: ReloadAccess, metrics: ServerMetrics) -> None:
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(core, metrics), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core, reload_access, metrics), server)
