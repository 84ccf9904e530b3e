"""One loaded model version: the SavedModel, its SignatureDefs, request checks and execution.

The checks and their messages follow TF Serving's predict_util / classifier, so a client sees
the same status code (and nearly the same words) from this server and from the official one.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import classification_pb2, input_pb2, predict_pb2, prediction_log_pb2

from serving.batching import BatchScheduler
from serving.config import BatchingOptions
from serving.contract import (
    CLASSIFY_CLASSES,
    CLASSIFY_INPUTS,
    CLASSIFY_SCORES,
    INIT_OP_SIGNATURE,
    SERVING_DEFAULT,
    WARMUP_FILE,
)
from serving.errors import ServingError, failed_precondition, from_tf_error, internal, invalid_argument
from serving.tensors import dtype_name, to_ndarray, to_tensor_proto

log = logging.getLogger("serving.servable")


class State(enum.Enum):
    """ModelVersionStatus.State names, in lifecycle order."""

    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"


def _keys(mapping) -> str:
    return ", ".join(sorted(mapping))


class LoadedModel:
    """A SavedModel loaded with TensorFlow, with its MetaGraphDef's signatures."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        saved_model = saved_model_pb2.SavedModel()
        saved_model.ParseFromString((self.path / "saved_model.pb").read_bytes())
        serve = [mg for mg in saved_model.meta_graphs if "serve" in mg.meta_info_def.tags]
        if not serve:
            raise RuntimeError(f"{self.path}: no MetaGraphDef tagged 'serve'")
        self.meta_graph: meta_graph_pb2.MetaGraphDef = serve[0]
        self._loaded = tf.saved_model.load(str(self.path), tags=["serve"])
        self._functions = {name: self._loaded.signatures[name] for name in self._loaded.signatures}

    @property
    def signature_defs(self):
        return self.meta_graph.signature_def

    def signature(self, name: str, *, rest: bool = False):
        name = name or SERVING_DEFAULT
        sig = self.signature_defs.get(name) if name != INIT_OP_SIGNATURE else None
        if sig is None or name not in self._functions:
            if rest:
                raise invalid_argument(f'Serving signature name: "{name}" not found in signature def')
            raise failed_precondition(f'Serving signature key "{name}" not found.')
        return sig

    def run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a signature on already-checked inputs; TensorFlow errors become their status codes."""
        sig = self.signature_defs[signature]
        tensors = {
            name: tf.convert_to_tensor(value, dtype=tf.as_dtype(sig.inputs[name].dtype))
            for name, value in inputs.items()
        }
        try:
            outputs = self._functions[signature](**tensors)
        except tf.errors.OpError as error:
            raise from_tf_error(error) from error
        return {name: value.numpy() for name, value in outputs.items()}


def check_inputs(sig, signature: str, inputs: dict[str, np.ndarray], dtypes: dict[str, int] | None) -> None:
    """Reject inputs that do not match the signature: names, dtypes (gRPC sends them), ranks and fixed dims."""
    expected = set(sig.inputs)
    sent = set(inputs)
    for alias in sorted(sent - expected):
        raise invalid_argument(
            f"input tensor alias not found in signature: {alias}. "
            f"Inputs expected to be in the set {{{_keys(expected)}}}."
        )
    if sent != expected:
        raise invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(expected)} len({{{_keys(sent)}}}) != "
            f"len({{{_keys(expected)}}}). Sent extra: {{{_keys(sent - expected)}}}. "
            f"Missing but required: {{{_keys(expected - sent)}}}."
        )
    for index, name in enumerate(sorted(expected)):
        info = sig.inputs[name]
        if dtypes is not None and dtypes[name] != info.dtype:
            raise invalid_argument(
                f"Expects arg[{index}] to be {dtype_name(info.dtype)} but {dtype_name(dtypes[name])} is provided"
            )
        if info.tensor_shape.unknown_rank:
            continue
        want = [int(d.size) for d in info.tensor_shape.dim]
        got = list(inputs[name].shape)
        if len(got) != len(want) or any(w >= 0 and w != g for w, g in zip(want, got, strict=False)):
            raise invalid_argument(
                f"input {name} of signature {signature} has shape {got} but the signature expects {want} (-1: any size)"
            )


def check_output_filter(sig, output_filter) -> list[str]:
    names: list[str] = []
    for alias in output_filter:
        if alias not in sig.outputs:
            raise invalid_argument(
                f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                f"{{{_keys(sig.outputs)}}}."
            )
        if alias in names:
            raise invalid_argument(f"duplicate output tensor alias: {alias}")
        names.append(alias)
    return names or sorted(sig.outputs)


def check_classification_signature(sig) -> None:
    """TF Serving's PreProcessClassification (with the method-name check off, its default)."""
    if len(sig.inputs) != 1:
        raise invalid_argument("Expected one input Tensor.")
    if len(sig.outputs) not in (1, 2):
        raise invalid_argument(f"Expected one or two output Tensors, found {len(sig.outputs)}")
    if CLASSIFY_INPUTS not in sig.inputs:
        raise invalid_argument("No classification inputs found in SignatureDef: " + str(sig).replace("\n", " "))
    if CLASSIFY_CLASSES not in sig.outputs and CLASSIFY_SCORES not in sig.outputs:
        raise invalid_argument(
            f'Expected classification signature outputs to contain at least one of "{CLASSIFY_CLASSES}" or '
            f'"{CLASSIFY_SCORES}".'
        )


def serialized_examples(request_input: input_pb2.Input) -> list[bytes]:
    """The tf.Examples of a Classify request, each merged over the context when there is one."""
    kind = request_input.WhichOneof("kind")
    if kind == "example_list":
        examples = list(request_input.example_list.examples)
        serialized = [e.SerializeToString() for e in examples]
    elif kind == "example_list_with_context":
        context = request_input.example_list_with_context.context
        serialized = []
        for example in request_input.example_list_with_context.examples:
            merged = type(context)()
            merged.CopyFrom(context)
            merged.MergeFrom(example)
            serialized.append(merged.SerializeToString())
    else:
        raise invalid_argument("Input is empty.")
    if not serialized:
        raise invalid_argument("Input is empty.")
    return serialized


@dataclass
class ServableVersion:
    """A version's lifecycle (START -> LOADING -> AVAILABLE -> UNLOADING -> END) and its in-flight requests."""

    name: str
    version: int
    path: Path
    state: State = State.START
    error: ServingError | None = None
    model: LoadedModel | None = None
    scheduler: BatchScheduler | None = None
    load_attempts: int = 0
    last_attempt: float = 0.0
    _inflight: int = 0
    _idle: threading.Condition = field(default_factory=threading.Condition)

    def __str__(self) -> str:
        return f"{{name: {self.name} version: {self.version}}}"

    def load(self, batching: BatchingOptions | None, warmup: bool) -> None:
        """Load the SavedModel, start its batch threads, replay its warmup records; raises on failure."""
        self.model = LoadedModel(self.path)
        if batching is not None:
            self.scheduler = BatchScheduler(self.model.run, batching, f"{self.name}-{self.version}")
        if warmup:
            replayed = self.warm_up()
            if replayed:
                log.info(
                    "Finished reading warmup data for model at %s. Number of warmup records read: %d.",
                    self.path / WARMUP_FILE,
                    replayed,
                )

    def warm_up(self) -> int:
        path = self.path / WARMUP_FILE
        if not path.is_file():
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(str(path)):
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            kind = entry.WhichOneof("log_type")
            if kind == "predict_log":
                self.predict(entry.predict_log.request)
            elif kind == "classify_log":
                self.classify(entry.classify_log.request)
            else:
                raise invalid_argument(f"Unsupported log_type for warmup: {kind}")
            count += 1
        return count

    def unload(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        self.scheduler = None
        self.model = None

    # In-flight accounting: the core acquires under its lock, so an UNLOADING version gets no new requests.
    def acquire(self) -> None:
        with self._idle:
            self._inflight += 1

    def release(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until no request holds this version (True), or until timeout_s passes (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout=timeout_s)

    @property
    def inflight(self) -> int:
        return self._inflight

    def execute(self, signature: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None) -> dict:
        if self.model is None:
            raise internal(f"servable {self} is not loaded")
        if self.scheduler is not None:
            return self.scheduler.run(signature, inputs, timeout_s)
        return self.model.run(signature, inputs)

    def predict_arrays(
        self,
        signature: str,
        inputs: dict[str, np.ndarray],
        dtypes: dict[str, int] | None = None,
        output_filter=(),
        timeout_s: float | None = None,
        rest: bool = False,
    ) -> tuple[str, dict[str, np.ndarray]]:
        assert self.model is not None
        signature = signature or SERVING_DEFAULT
        sig = self.model.signature(signature, rest=rest)
        check_inputs(sig, signature, inputs, dtypes)
        wanted = check_output_filter(sig, output_filter)
        outputs = self.execute(signature, inputs, timeout_s)
        return signature, {name: outputs[name] for name in wanted}

    def predict(
        self, request: predict_pb2.PredictRequest, timeout_s: float | None = None
    ) -> predict_pb2.PredictResponse:
        inputs = {alias: to_ndarray(proto, alias) for alias, proto in request.inputs.items()}
        dtypes = {alias: proto.dtype for alias, proto in request.inputs.items()}
        signature, outputs = self.predict_arrays(
            request.model_spec.signature_name, inputs, dtypes, request.output_filter, timeout_s
        )
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = signature
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(to_tensor_proto(value))
        return response

    def classify(
        self, request: classification_pb2.ClassificationRequest, timeout_s: float | None = None
    ) -> classification_pb2.ClassificationResponse:
        assert self.model is not None
        signature = request.model_spec.signature_name or SERVING_DEFAULT
        sig = self.model.signature(signature)
        check_classification_signature(sig)
        examples = serialized_examples(request.input)
        batch = np.empty(len(examples), dtype=object)
        batch[:] = examples
        outputs = self.execute(signature, {CLASSIFY_INPUTS: batch}, timeout_s)
        classes = outputs.get(CLASSIFY_CLASSES)
        scores = outputs.get(CLASSIFY_SCORES)
        for label, value in ((CLASSIFY_CLASSES, classes), (CLASSIFY_SCORES, scores)):
            if value is not None and (value.ndim != 2 or value.shape[0] != len(examples)):
                raise invalid_argument(
                    f"Expected Tensor shape: [batch_size num_classes] but got {list(value.shape)} for {label}"
                )
        response = classification_pb2.ClassificationResponse()
        response.model_spec.name = self.name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = signature
        width = (classes if classes is not None else scores).shape[1]
        for row in range(len(examples)):
            classifications = response.result.classifications.add()
            for column in range(width):
                entry = classifications.classes.add()
                if classes is not None:
                    entry.label = _text(classes[row, column])
                if scores is not None:
                    entry.score = float(scores[row, column])
        return response


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
