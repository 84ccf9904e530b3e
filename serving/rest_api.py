"""REST front end on TF Serving's paths and JSON formats.

    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict    row {"instances": [...]} or columnar {"inputs": ...}
    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:classify   {"examples": [...], "context": {...}}
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]            GetModelStatus as JSON
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata   GetModelMetadata as JSON
    GET  /monitoring/prometheus/metrics                          Prometheus metrics, when --monitoring_config_file
                                                                 enables them (at the path it gives)

Binary values travel as {"b64": "..."}; JSON numbers are converted to the signature's dtype (REST
is lenient where gRPC is strict, as in TF Serving). Errors are {"error": "..."} with TF Serving's
HTTP status for the gRPC code (INVALID_ARGUMENT 400, NOT_FOUND 404, UNAVAILABLE 503, ...). Each API call is
counted in the server's metrics like its gRPC twin (entrypoint REST); answered predict and classify calls go to the
prediction logger.

The transport is uvicorn (HTTP/1.1 keep-alive, by h11) running a Starlette app in a thread of the server
process; requests run on worker threads. It refuses what would hold a connection or memory, answering in the
same JSON error shape: a body without one non-negative integer Content-Length (400, 411; Transfer-Encoding 501),
over --max_request_bytes (413), a request line and headers over MAX_HEADER_BYTES (431), JSON nested deeper than
MAX_JSON_DEPTH (400). A connection is closed when its request line and headers take longer than the read
timeout, or its body stalls for that long; an idle keep-alive connection after the keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import re
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import grpc
import h11
import numpy as np
import uvicorn
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import classification_pb2, get_model_metadata_pb2, model_pb2
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from serving.contract import SERVING_DEFAULT
from serving.core import ServerCore
from serving.errors import ServingError, invalid_argument
from serving.grpc_api import SIGNATURE_DEF_FIELD, model_metadata, start_call, status_of
from serving.metrics import (
    CLASSIFY,
    GET_MODEL_METADATA,
    GET_MODEL_STATUS,
    PREDICT,
    REGRESS,
    REST,
    Call,
    ServerMetrics,
)
from serving.tensors import NUMPY_OF, dtype_name

log = logging.getLogger("serving.rest")

PREDICTION_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE
)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE
)
_DRAIN_LIMIT = 256 << 20  # an over-limit body is read (and dropped) up to this much before the 413
# Request line + headers: once this much has arrived without them complete, h11 refuses the request (431).
MAX_HEADER_BYTES = 64 << 10  # h11's default is 16 KiB; http.server took lines up to 64 KiB
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 30.0
DEFAULT_NUM_THREADS = 64  # as --grpc_max_threads: a batch (up to 32) can fill from REST requests alone
BACKLOG = 128  # connections the kernel queues before the event loop accepts them
SERVER_NAME = "ProductLensModelServer"
UVICORN_TICK_S = 0.1  # how often uvicorn's main loop looks at should_exit
TRANSFER_ENCODING_REFUSED = "Transfer-Encoding is not supported: send the body with a Content-Length"
# A predict body nests about 7 levels ({"inputs": {"pixels": [batch][h][w][3]}}); far deeper is an attack on the
# recursive parsing (Python's JSON decoder stops at ~1,000 levels with a RecursionError).
MAX_JSON_DEPTH = 64


def model_spec(name: str, version: str | None, label: str | None) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=unquote(name))
    if version:
        spec.version.value = int(version)
    if label:
        spec.version_label = unquote(label)
    return spec


# ----- JSON <-> arrays --------------------------------------------------------------------------------
def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _leaf(value, dtype: int, name: str):
    if dtype == types_pb2.DT_STRING:
        if _is_b64(value):
            if not isinstance(value["b64"], str):
                raise invalid_argument(f"JSON Value for {name}: 'b64' must be a string")
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError) as error:
                raise invalid_argument(f"Unable to base64 decode the value of {name}: {error}") from error
        if isinstance(value, str):
            return value.encode("utf-8")
        raise invalid_argument(f"JSON Value: {json.dumps(value)[:60]} is not of expected type: string (input {name})")
    if dtype == types_pb2.DT_BOOL:
        if isinstance(value, bool):
            return value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and np.dtype(NUMPY_OF[dtype]).kind in "iu":
            raise invalid_argument(f"JSON Value: {value} is not of expected type: {dtype_name(dtype)} (input {name})")
        return value
    raise invalid_argument(
        f"JSON Value: {json.dumps(value)[:60]} is not of expected type: {dtype_name(dtype)} (input {name})"
    )


def _flatten(value, dtype: int, name: str) -> tuple[list, tuple[int, ...]]:
    if isinstance(value, list):
        flat: list = []
        shape: tuple[int, ...] | None = None
        for item in value:
            child, child_shape = _flatten(item, dtype, name)
            if shape is not None and child_shape != shape:
                raise invalid_argument(
                    f"Input {name} is a ragged list: all elements of a dimension must have the same shape"
                )
            shape = child_shape
            flat.extend(child)
        return flat, (len(value),) + (shape or ())
    return [_leaf(value, dtype, name)], ()


def json_to_array(value, dtype: int, name: str) -> np.ndarray:
    """A JSON (nested list) value as a NumPy array of the signature's dtype; strings become bytes objects."""
    if dtype not in NUMPY_OF:
        raise invalid_argument(f"input {name} has dtype {dtype_name(dtype)}, which REST does not support")
    flat, shape = _flatten(value, dtype, name)
    if dtype == types_pb2.DT_STRING:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    try:
        return np.asarray(flat, dtype=NUMPY_OF[dtype]).reshape(shape)
    except OverflowError as error:
        raise invalid_argument(f"a value of {name} does not fit {dtype_name(dtype)}: {error}") from error


def _json_value(array: np.ndarray, name: str):
    if array.dtype == np.object_:
        as_b64 = name.endswith("_bytes")

        def text(value: bytes):
            if not as_b64:
                try:
                    return value.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(value).decode("ascii")}

        return np.vectorize(text, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def parse_predict_body(body: dict, inputs_info) -> tuple[dict[str, np.ndarray], str]:
    """The request's inputs as arrays, and 'row' or 'columnar' (the response uses the same format)."""
    if "instances" in body and "inputs" in body:
        raise invalid_argument("Not formatted correctly expecting only one of 'inputs' or 'instances' keys exists")
    names = sorted(inputs_info)
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise invalid_argument("Expecting 'instances' to be an list/array")
        named = bool(instances) and all(isinstance(i, dict) and not _is_b64(i) for i in instances)
        if named:
            for index, instance in enumerate(instances):
                if set(instance) != set(names):
                    raise invalid_argument(
                        f"Failed to process element: {index} of 'instances' list. JSON object: has keys "
                        f"{sorted(instance)} but the signature's inputs are {names}"
                    )
            columns = {name: [instance[name] for instance in instances] for name in names}
        else:
            if len(names) != 1:
                raise invalid_argument(
                    "instances is a plain list, but expecting list of objects as multiple input tensors required "
                    f"as per tensorinfo_map (inputs: {names})"
                )
            columns = {names[0]: instances}
        arrays = {name: json_to_array(value, inputs_info[name].dtype, name) for name, value in columns.items()}
        return arrays, "row"
    if "inputs" in body:
        value = body["inputs"]
        if isinstance(value, dict) and not _is_b64(value):
            columns = value
        elif len(names) == 1:
            columns = {names[0]: value}
        else:
            raise invalid_argument(f"'inputs' must name each of the signature's inputs {names}")
        arrays = {}
        for name, column in columns.items():
            if name not in inputs_info:
                raise invalid_argument(
                    f"input tensor alias not found in signature: {name}. Inputs expected to be in the set "
                    f"{{{', '.join(names)}}}."
                )
            arrays[name] = json_to_array(column, inputs_info[name].dtype, name)
        return arrays, "columnar"
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def predict_response_json(outputs: dict[str, np.ndarray], layout: str) -> dict:
    if layout == "columnar":
        if len(outputs) == 1:
            ((name, value),) = outputs.items()
            return {"outputs": _json_value(value, name)}
        return {"outputs": {name: _json_value(value, name) for name, value in outputs.items()}}
    rows = {value.shape[0] if value.ndim else -1 for value in outputs.values()}
    if len(rows) != 1 or -1 in rows:
        raise invalid_argument("Output tensors have inconsistent batch sizes; ask for the columnar ('inputs') format")
    columns = {name: _json_value(value, name) for name, value in outputs.items()}
    if len(columns) == 1:
        return {"predictions": next(iter(columns.values()))}
    count = rows.pop()
    return {"predictions": [{name: column[i] for name, column in columns.items()} for i in range(count)]}


def _feature(value, name: str) -> feature_pb2.Feature:
    values = value if isinstance(value, list) else [value]
    feature = feature_pb2.Feature()
    if all(isinstance(v, str) or _is_b64(v) for v in values):
        feature.bytes_list.value.extend(_leaf(v, types_pb2.DT_STRING, name) for v in values)
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        feature.int64_list.value.extend(values)
    elif all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        feature.float_list.value.extend(float(v) for v in values)
    else:
        raise invalid_argument(f"feature {name}: values must be all strings ({{'b64': ...}} for bytes) or all numbers")
    return feature


def json_to_example(obj, where: str) -> example_pb2.Example:
    if not isinstance(obj, dict):
        raise invalid_argument(f"{where} must be a JSON object of feature name -> value")
    example = example_pb2.Example()
    for name, value in obj.items():
        example.features.feature[name].CopyFrom(_feature(value, name))
    return example


def classification_request(body: dict, spec: model_pb2.ModelSpec) -> classification_pb2.ClassificationRequest:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.CopyFrom(spec)
    request.model_spec.signature_name = _signature_name(body)
    examples = body.get("examples")
    if not isinstance(examples, list):
        raise invalid_argument("Expecting 'examples' to be a list of objects (feature name -> value)")
    if "context" in body:
        target = request.input.example_list_with_context
        target.context.CopyFrom(json_to_example(body["context"], "'context'"))
    else:
        target = request.input.example_list
    for index, example in enumerate(examples):
        target.examples.add().CopyFrom(json_to_example(example, f"examples[{index}]"))
    return request


def _signature_name(body: dict) -> str:
    name = body.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid_argument("'signature_name' key must be a string value.")
    return name


_VERB_APIS = {"predict": PREDICT, "classify": CLASSIFY, "regress": REGRESS}


class RestApi:
    """Maps (method, path, body) to (HTTP status, JSON body) on top of a ServerCore."""

    def __init__(self, core: ServerCore, timeout_s: float | None, metrics: ServerMetrics | None = None) -> None:
        self.core = core
        self.timeout_s = timeout_s
        self.metrics = metrics if metrics is not None else ServerMetrics()

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict | str]:
        call: Call | None = None
        try:
            api, spec = _route(method, path.split("?", 1)[0])
            call = start_call(self.core, api, REST, spec.name)
            result = self._run(api, spec, body, call)
        except Exception as error:  # noqa: BLE001 - a bug answers 500, never a dead server
            if call is not None:
                self.metrics.record(call, status_of(error))
            if isinstance(error, ServingError):
                return error.http_status, {"error": error.message}
            log.exception("REST %s %s failed unexpectedly", method, path)
            return 500, {"error": f"{type(error).__name__}: {error}"}
        self.metrics.record(call, grpc.StatusCode.OK)
        return 200, result

    def _run(self, api: str, spec: model_pb2.ModelSpec, body: bytes, call: Call) -> dict | str:
        if api == GET_MODEL_STATUS:
            return json.loads(
                json_format.MessageToJson(
                    self.core.model_status(spec),
                    preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True,
                )
            )
        if api == GET_MODEL_METADATA:
            return self._metadata(spec, call)
        payload = _json_body(body)
        if api == PREDICT:
            return self._predict(spec, payload, call)
        if api == CLASSIFY:
            return self._classify(spec, payload, call)
        raise ServingError(
            grpc.StatusCode.UNIMPLEMENTED, "regress is not implemented: ProductLens exports no regression"
        )

    def _predict(self, spec: model_pb2.ModelSpec, payload: dict, call: Call) -> dict:
        signature = _signature_name(payload) or SERVING_DEFAULT
        with self.core.servable(spec) as version:
            assert version.model is not None
            call.routed(version.name, version.version, version.model.signature_defs, signature)
            sig = version.model.signature(signature, rest=True)
            inputs, layout = parse_predict_body(payload, sig.inputs)
            _, outputs = version.predict_arrays(signature, inputs, timeout_s=self.timeout_s, rest=True)
        answer = predict_response_json(outputs, layout)
        self.core.prediction_logs.log_predict_arrays(version.name, version.version, signature, spec, inputs, outputs)
        return answer

    def _classify(self, spec: model_pb2.ModelSpec, payload: dict, call: Call) -> dict:
        request = classification_request(payload, spec)
        with self.core.servable(spec) as version:
            assert version.model is not None
            signature = request.model_spec.signature_name or SERVING_DEFAULT
            call.routed(version.name, version.version, version.model.signature_defs, signature)
            response = version.classify(request, self.timeout_s)
        self.core.prediction_logs.log_classify(version.version, request, response)
        return {
            "result": [
                [[entry.label, entry.score] for entry in classifications.classes]
                for classifications in response.result.classifications
            ]
        }

    def _metadata(self, spec: model_pb2.ModelSpec, call: Call) -> dict:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[SIGNATURE_DEF_FIELD])
        request.model_spec.CopyFrom(spec)
        response = model_metadata(self.core, request, call)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata[SIGNATURE_DEF_FIELD].Unpack(signatures)

        def as_dict(message) -> dict:
            return json_format.MessageToDict(
                message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )

        return {"model_spec": as_dict(response.model_spec), "metadata": {SIGNATURE_DEF_FIELD: as_dict(signatures)}}


def _route(method: str, path: str) -> tuple[str, model_pb2.ModelSpec]:
    """The API (metrics' name for it) and the ModelSpec a request path names."""
    if method == "POST" and (match := PREDICTION_PATH.fullmatch(path)):
        name, version, label, verb = match.groups()
        return _VERB_APIS[verb.lower()], model_spec(name, version, label)
    if method == "GET" and (match := STATUS_PATH.fullmatch(path)):
        name, version, label, metadata = match.groups()
        if not name:
            raise invalid_argument("Missing model name in request.")
        return (GET_MODEL_METADATA if metadata else GET_MODEL_STATUS), model_spec(name, version, label)
    raise invalid_argument(f"Malformed request: {method} {path}")


def _json_body(body: bytes) -> dict:
    try:
        payload = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid_argument(f"JSON Parse error: {error}") from error
    except RecursionError as error:
        raise invalid_argument(f"JSON Parse error: nested more than {MAX_JSON_DEPTH} levels deep") from error
    if not isinstance(payload, dict):
        raise invalid_argument("JSON Parse error: the request body must be a JSON object")
    _check_depth(payload)
    return payload


def _check_depth(payload: dict) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH (the conversion to arrays recurses once per level)."""
    stack: list[tuple[dict | list, int]] = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise invalid_argument(f"JSON Parse error: nested more than {MAX_JSON_DEPTH} levels deep")
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


# ----- the transport: uvicorn (HTTP/1.1 by h11) running a Starlette app ---------------------------------------
def _json_response(status: int, payload: dict | str, close: bool = False) -> Response:
    return _encoded_response(status, json.dumps(payload).encode("utf-8"), close)


def _encoded_response(status: int, body: bytes, close: bool) -> Response:
    # "Connection: close" makes uvicorn close the connection once the response is written.
    return Response(body, status, headers={"connection": "close"} if close else None, media_type="application/json")


def protocol_error_message(error: BaseException | None) -> str:
    """What a request that h11 refused before it reached the app did wrong (its own words, stated as a fix)."""
    text = str(error) if error is not None else "malformed request"
    if "Content-Length" in text:
        return f"{text}: expected one non-negative integer"
    if "Transfer-Encoding" in text:
        return TRANSFER_ENCODING_REFUSED
    if getattr(error, "error_status_hint", None) == 431:
        return f"The request line and headers are larger than the server's limit of {MAX_HEADER_BYTES} bytes"
    return f"Malformed HTTP request: {text}"


class ReadTimeoutH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection, plus what it lacks against slow or careless clients:

    - a read timeout: while the server waits for a request's body, a connection that sends nothing for
      `read_timeout_s` is closed; a request line and headers (a new connection's, or the next request's once it
      has begun) must arrive within `read_timeout_s` in all, however slowly they trickle in. Between requests,
      uvicorn's keep-alive timeout applies instead; while a request runs, neither.
    - requests h11 refuses (bad Content-Length, headers over the limit, ...) are answered in the API's JSON error
      shape with h11's status (400, 431, 501), not uvicorn's plain-text 400.
    - a client that half-closes after sending its request still gets the answer.
    """

    def __init__(self, *args, read_timeout_s: float | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s
        self._last_read = 0.0
        self._head_started: float | None = None  # when the request line and headers being read began to arrive
        self._read_timer: asyncio.TimerHandle | None = None
        self._eof = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        # uvicorn writes headers and body separately: with Nagle on, the client's delayed ACK adds ~40 ms. asyncio
        # turns it off only for sockets made with proto IPPROTO_TCP, which the pre-bound listening socket is not.
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._last_read = self._head_started = self.loop.time()
        self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        if self._head_started is None and self.conn.their_state is h11.IDLE:
            self._head_started = self._last_read
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete (or refused)
            self._head_started = None
        self._arm_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().connection_lost(exc)

    def eof_received(self) -> bool:
        self._eof = True
        # True keeps the transport open to write the answer to a request that has fully arrived.
        return self.conn.their_state is h11.DONE and self.cycle is not None and not self.cycle.response_complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._eof and not self.transport.is_closing():
            self.transport.close()  # the client said it sends nothing more: no keep-alive

    def _waiting_for_client(self) -> bool:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return True
        # Idle: a new connection, or part of the next request has arrived (with nothing buffered, keep-alive rules).
        return state is h11.IDLE and (self.cycle is None or bool(self.conn.trailing_data[0]))

    def _arm_read_timer(self) -> None:
        if self.read_timeout_s is not None and self._read_timer is None and self._waiting_for_client():
            self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing() or not self._waiting_for_client():
            return
        assert self.read_timeout_s is not None
        reading_head = self.conn.their_state is h11.IDLE and self._head_started is not None
        since = self._head_started if reading_head else self._last_read
        assert since is not None
        waited_s = self.loop.time() - since
        if waited_s < self.read_timeout_s:  # data came in meanwhile: wait out the rest
            self._read_timer = self.loop.call_later(self.read_timeout_s - waited_s, self._read_timed_out)
            return
        what = "its request line and headers took" if reading_head else "it sent nothing for"
        log.debug("REST connection from %s closed: %s %.1f s", self.client, what, waited_s)
        self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this inside its `except h11.RemoteProtocolError`: that error says what was wrong.
        error = sys.exc_info()[1]
        status = getattr(error, "error_status_hint", 400)
        log.debug("REST request from %s refused (%d): %s", self.client, status, error)
        body = json.dumps({"error": protocol_error_message(error)}).encode("utf-8")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class RestServer:
    """The REST port: uvicorn serving a Starlette app from its own thread, requests run on `num_threads` worker
    threads (more wait for one), every read bounded by `read_timeout_s`, idle keep-alive connections closed after
    `keep_alive_timeout_s`, and a `stop()` that lets requests being handled finish while refusing new ones."""

    def __init__(
        self,
        address: tuple[str, int],
        api: RestApi,
        max_request_bytes: int,
        read_timeout_s: float | None = 30.0,
        keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S,
        num_threads: int = DEFAULT_NUM_THREADS,
        metrics_path: str | None = None,
    ) -> None:
        # Bound here, in the caller's thread: a port in use fails start-up, and port 0's pick is known at once.
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._socket = socket.create_server(address, family=family, backlog=BACKLOG)
        self.api = api
        self.max_request_bytes = max_request_bytes
        self.metrics_path = metrics_path  # None: no metrics page (no --monitoring_config_file enabling it)
        self.keep_alive_timeout_s = keep_alive_timeout_s
        self.draining = False
        self._in_flight = 0  # requests between their headers and their answer (changed on the event loop only)
        self._cut_off = 0
        self._executor = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="rest")
        app = Starlette(
            routes=[Route("/{path:path}", self._endpoint, methods=["GET", "POST"])],
            exception_handlers={HTTPException: self._http_exception},
        )
        config = uvicorn.Config(
            app,
            http=functools.partial(ReadTimeoutH11Protocol, read_timeout_s=read_timeout_s),
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,  # the process's logging stays as main() set it up
            access_log=False,
            proxy_headers=False,
            server_header=False,
            headers=[("server", SERVER_NAME)],
            backlog=BACKLOG,
            timeout_keep_alive=keep_alive_timeout_s,  # a float works: it goes to loop.call_later
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )
        # uvicorn's INFO and WARNING lines are per connection or per bad request; its errors still show.
        logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def closes_connections(self) -> bool:
        """Whether responses end their connection: while draining, or with keep-alive off (a 0 s timeout)."""
        return self.draining or self.keep_alive_timeout_s <= 0

    def start(self) -> None:
        """Serve from a thread of this process (signals stay with the main thread); returns once uvicorn serves."""
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="rest", daemon=True
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise OSError(f"the REST server on port {self.port} failed to start (see the log above)")
            time.sleep(0.005)

    def stop(self, timeout_s: float = 5.0) -> int:
        """Refuse new connections and close idle ones; give requests being handled up to timeout_s to finish.

        Returns how many requests were still being handled at the deadline (they are answered 503)."""
        self.draining = True
        if self._thread is None:
            self._socket.close()
            return 0
        # uvicorn notices should_exit within its 0.1 s tick and sleeps 0.1 s before it starts waiting.
        self._server.config.timeout_graceful_shutdown = max(timeout_s - 2 * UVICORN_TICK_S, 0.0)
        self._server.should_exit = True
        self._thread.join(timeout_s + 1.0)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._thread.is_alive():
            log.error("The REST server did not stop within %.1f s", timeout_s + 1.0)
            return max(self._in_flight, 1)
        return self._cut_off

    # ----- the app -----------------------------------------------------------------------------------------
    async def _endpoint(self, request: Request) -> Response:
        self._in_flight += 1
        try:
            return await self._serve(request)
        except asyncio.CancelledError:  # uvicorn's graceful-shutdown timeout ran out while this request ran
            self._cut_off += 1
            return _json_response(503, {"error": "The server shut down before this request finished"}, close=True)
        except ClientDisconnect:  # the client closed the connection before sending the whole body
            return Response(status_code=400)  # nobody reads it: uvicorn drops what it sends to a closed connection
        finally:
            self._in_flight -= 1

    async def _serve(self, request: Request) -> Response:
        method = request.method
        if method not in ("GET", "POST"):  # HEAD (Starlette adds it to GET routes)
            return self._unsupported_method(method)
        query = request.scope["query_string"].decode("latin-1")
        target = request.scope["raw_path"].decode("latin-1") + (f"?{query}" if query else "")
        if self.metrics_path is not None and request.scope["raw_path"].decode("latin-1") == self.metrics_path:
            if method != "GET":
                return self._unsupported_method(method)
            page, content_type = await asyncio.wrap_future(self._executor.submit(self.api.metrics.page))
            headers = {"content-type": content_type} | ({"connection": "close"} if self.closes_connections else {})
            return Response(page, 200, headers=headers)
        body = b""
        if method == "POST":
            refusal = await self._refuse_body(request)
            if refusal is not None:
                return refusal
            body = await request.body()
        if not target.lower().startswith("/v1/"):
            return self._not_found(method, target)
        future = self._executor.submit(self._handle, method, target, body)
        status, data = await asyncio.wrap_future(future)
        return _encoded_response(status, data, close=self.closes_connections)

    def _handle(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        """On a worker thread: the API call and its JSON encoding (both can take a while)."""
        status, payload = self.api.handle(method, target, body)
        return status, json.dumps(payload).encode("utf-8")

    async def _refuse_body(self, request: Request) -> Response | None:
        """A POST whose body the server will not read: its answer (the connection closes after it)."""
        headers = request.headers
        if "transfer-encoding" in headers:  # h11 reads chunked bodies; TF Serving's REST API takes Content-Length
            return _json_response(501, {"error": TRANSFER_ENCODING_REFUSED}, close=True)
        if "content-length" not in headers:  # h11 has checked it is one non-negative integer
            return _json_response(411, {"error": "Content-Length is required"}, close=True)
        length = int(headers["content-length"])
        limit = self.max_request_bytes
        if length <= limit:
            return None
        if headers.get("expect", "").lower() != "100-continue":  # else the client waits: nothing to drain
            await self._drain(request, length)
        message = f"Request body of {length} bytes is larger than the server's limit of {limit} bytes"
        return _json_response(413, {"error": message}, close=True)

    @staticmethod
    async def _drain(request: Request, length: int) -> None:
        """Read (and drop) the body up to _DRAIN_LIMIT: closing on unread bytes would reset the connection before
        the client reads the answer."""
        remaining = min(length, _DRAIN_LIMIT)
        async with contextlib.aclosing(request.stream()) as chunks:
            async for chunk in chunks:
                remaining -= len(chunk)
                if remaining <= 0:
                    break

    def _not_found(self, method: str, target: str) -> Response:
        message = f"Not found: {method} {target} (the API lives under /v1/models)"
        return _json_response(404, {"error": message}, close=self.closes_connections)

    def _unsupported_method(self, method: str) -> Response:
        return _json_response(501, {"error": f"Unsupported method ({method!r})"}, close=self.closes_connections)

    async def _http_exception(self, request: Request, error: Exception) -> Response:
        """Starlette's own refusals (a method the route does not take, a path that is not one) in the API's shape."""
        assert isinstance(error, HTTPException)
        if error.status_code == 405:
            return self._unsupported_method(request.method)
        if error.status_code == 404:
            return self._not_found(request.method, request.url.path)
        return _json_response(error.status_code, {"error": error.detail}, close=self.closes_connections)
