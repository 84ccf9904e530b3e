"""gRPC front end: tensorflow.serving.PredictionService and ModelService, with the stubs' own servicer bases."""

from __future__ import annotations

import logging

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

from serving.core import ServerCore
from serving.errors import ServingError, invalid_argument

log = logging.getLogger("serving.grpc")

SIGNATURE_DEF_FIELD = "signature_def"


def model_metadata(
    core: ServerCore, request: get_model_metadata_pb2.GetModelMetadataRequest
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """GetModelMetadata: the served version's SignatureDefs (the only metadata field TF Serving has)."""
    if not request.metadata_field:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for name in request.metadata_field:
        if name != SIGNATURE_DEF_FIELD:
            raise invalid_argument(f"Metadata field {name} is not supported")
    with core.servable(request.model_spec) as version:
        assert version.model is not None
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


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: ServerCore) -> None:
        self.core = core

    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext):  # noqa: N802
        try:
            with self.core.servable(request.model_spec) as version:
                return version.predict(request, _timeout(context))
        except Exception as error:  # noqa: BLE001 - every failure becomes a status; the server stays up
            _fail(context, error, "Predict")

    def Classify(self, request: classification_pb2.ClassificationRequest, context: grpc.ServicerContext):  # noqa: N802
        try:
            with self.core.servable(request.model_spec) as version:
                return version.classify(request, _timeout(context))
        except Exception as error:  # noqa: BLE001
            _fail(context, error, "Classify")

    def Regress(self, request, context: grpc.ServicerContext):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Regress is not implemented: ProductLens exports no regression")

    def MultiInference(self, request, context: grpc.ServicerContext):  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "MultiInference is not implemented by this server")

    def GetModelMetadata(self, request, context: grpc.ServicerContext):  # noqa: N802
        try:
            return model_metadata(self.core, request)
        except Exception as error:  # noqa: BLE001
            _fail(context, error, "GetModelMetadata")


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: ServerCore) -> None:
        self.core = core

    def GetModelStatus(self, request: get_model_status_pb2.GetModelStatusRequest, context):  # noqa: N802
        try:
            if not request.HasField("model_spec"):
                raise invalid_argument("Missing ModelSpec")
            return self.core.model_status(request.model_spec)
        except Exception as error:  # noqa: BLE001
            _fail(context, error, "GetModelStatus")

    def HandleReloadConfigRequest(self, request: model_management_pb2.ReloadConfigRequest, context):  # noqa: N802
        try:
            self.core.reload_config(request.config)
            log.info("Reloaded the model config (%d model(s))", len(request.config.model_config_list.config))
            return model_management_pb2.ReloadConfigResponse()
        except Exception as error:  # noqa: BLE001
            _fail(context, error, "HandleReloadConfigRequest")


def add_services(server: grpc.Server, core: ServerCore) -> None:
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(core), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core), server)
