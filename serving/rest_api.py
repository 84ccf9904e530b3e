"""REST front end on TF Serving's paths and JSON formats.

    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:predict    row {"instances": [...]} or columnar {"inputs": ...}
    POST /v1/models/{name}[/versions/{v}|/labels/{l}]:classify   {"examples": [...], "context": {...}}
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]            GetModelStatus as JSON
    GET  /v1/models/{name}[/versions/{v}|/labels/{l}]/metadata   GetModelMetadata as JSON

Binary values travel as {"b64": "..."}; JSON numbers are converted to the signature's dtype (REST
is lenient where gRPC is strict, as in TF Serving). Errors are {"error": "..."} with TF Serving's
HTTP status for the gRPC code (INVALID_ARGUMENT 400, NOT_FOUND 404, UNAVAILABLE 503, ...).

The transport refuses what would hold a thread or memory: a body without one non-negative integer
Content-Length (400, 411; Transfer-Encoding 501), over --max_request_bytes (413), JSON nested deeper than
MAX_JSON_DEPTH (400); a connection whose next read does not arrive within the read timeout is closed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import classification_pb2, get_model_metadata_pb2, model_pb2

from serving.core import ServerCore
from serving.errors import ServingError, invalid_argument
from serving.grpc_api import SIGNATURE_DEF_FIELD, model_metadata
from serving.servable import DEFAULT_SIGNATURE
from serving.tensors import NUMPY_OF, dtype_name

log = logging.getLogger("serving.rest")

PREDICTION_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE
)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE
)
_DRAIN_LIMIT = 256 << 20
_CONTENT_LENGTH = re.compile(r"[0-9]+")
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


class RestApi:
    """Maps (method, path, body) to (HTTP status, JSON body) on top of a ServerCore."""

    def __init__(self, core: ServerCore, timeout_s: float | None) -> None:
        self.core = core
        self.timeout_s = timeout_s

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict | str]:
        try:
            return 200, self._dispatch(method, path.split("?", 1)[0], body)
        except ServingError as error:
            return error.http_status, {"error": error.message}
        except Exception as error:  # noqa: BLE001 - a bug answers 500, never a dead server
            log.exception("REST %s %s failed unexpectedly", method, path)
            return 500, {"error": f"{type(error).__name__}: {error}"}

    def _dispatch(self, method: str, path: str, body: bytes) -> dict | str:
        if method == "POST" and (match := PREDICTION_PATH.fullmatch(path)):
            name, version, label, verb = match.groups()
            spec = model_spec(name, version, label)
            payload = _json_body(body)
            if verb.lower() == "predict":
                return self._predict(spec, payload)
            if verb.lower() == "classify":
                return self._classify(spec, payload)
            raise ServingError(
                grpc.StatusCode.UNIMPLEMENTED, "regress is not implemented: ProductLens exports no regression"
            )
        if method == "GET" and (match := STATUS_PATH.fullmatch(path)):
            name, version, label, metadata = match.groups()
            if not name:
                raise invalid_argument("Missing model name in request.")
            spec = model_spec(name, version, label)
            if metadata:
                return self._metadata(spec)
            return json.loads(
                json_format.MessageToJson(
                    self.core.model_status(spec),
                    preserving_proto_field_name=True,
                    always_print_fields_with_no_presence=True,
                )
            )
        raise invalid_argument(f"Malformed request: {method} {path}")

    def _predict(self, spec: model_pb2.ModelSpec, payload: dict) -> dict:
        signature = _signature_name(payload) or DEFAULT_SIGNATURE
        with self.core.servable(spec) as version:
            assert version.model is not None
            sig = version.model.signature(signature, rest=True)
            inputs, layout = parse_predict_body(payload, sig.inputs)
            _, outputs = version.predict_arrays(signature, inputs, timeout_s=self.timeout_s, rest=True)
        return predict_response_json(outputs, layout)

    def _classify(self, spec: model_pb2.ModelSpec, payload: dict) -> dict:
        request = classification_request(payload, spec)
        with self.core.servable(spec) as version:
            response = version.classify(request, self.timeout_s)
        return {
            "result": [
                [[entry.label, entry.score] for entry in classifications.classes]
                for classifications in response.result.classifications
            ]
        }

    def _metadata(self, spec: model_pb2.ModelSpec) -> dict:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=[SIGNATURE_DEF_FIELD])
        request.model_spec.CopyFrom(spec)
        response = model_metadata(self.core, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata[SIGNATURE_DEF_FIELD].Unpack(signatures)

        def as_dict(message) -> dict:
            return json_format.MessageToDict(
                message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )

        return {"model_spec": as_dict(response.model_spec), "metadata": {SIGNATURE_DEF_FIELD: as_dict(signatures)}}


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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ProductLensModelServer"
    server: RestServer

    def setup(self) -> None:
        self.timeout = self.server.read_timeout_s  # StreamRequestHandler.setup() puts it on the socket: every read
        super().setup()
        # Headers and body go out in separate writes: without NODELAY, Nagle + the client's delayed ACK add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def parse_request(self) -> bool:
        # The request line has arrived: from here until the response is written, shutdown waits for this request.
        self.server.mark_busy(self.connection)
        return super().parse_request()

    def handle_one_request(self) -> None:
        """BaseHTTPRequestHandler's (a read that times out closes the connection), then back to idle."""
        try:
            super().handle_one_request()
        finally:
            self.server.mark_idle(self.connection)
            if self.server.draining:
                self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802
        self._serve("GET", b"")

    def do_POST(self) -> None:  # noqa: N802
        if self.headers.get("Transfer-Encoding") is not None:
            self._reply(501, {"error": "Transfer-Encoding is not supported: send the body with a Content-Length"}, True)
            return
        lengths = [value.strip() for value in self.headers.get_all("Content-Length") or []]
        if not lengths:
            self._reply(411, {"error": "Content-Length is required"}, close=True)
            return
        if len(set(lengths)) != 1 or not _CONTENT_LENGTH.fullmatch(lengths[0]):
            shown = ", ".join(lengths)[:60]
            self._reply(400, {"error": f"bad Content-Length: {shown!r} (expected one non-negative integer)"}, True)
            return
        length = int(lengths[0])
        limit = self.server.max_request_bytes
        if length > limit:
            self._drain(length)
            self._reply(
                413,
                {"error": f"Request body of {length} bytes is larger than the server's limit of {limit} bytes"},
                close=True,
            )
            return
        body = self.rfile.read(length)
        if len(body) < length:  # the client closed its side before sending the whole body: nobody to answer
            self.close_connection = True
            return
        self._serve("POST", body)

    def _drain(self, length: int) -> None:
        remaining = min(length, _DRAIN_LIMIT)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)

    def _serve(self, method: str, body: bytes) -> None:
        path = self.path
        if not path.lower().startswith("/v1/"):
            self._reply(404, {"error": f"Not found: {method} {path} (the API lives under /v1/models)"})
            return
        status, payload = self.server.api.handle(method, path, body)
        self._reply(status, payload)

    def _reply(self, status: int, payload, close: bool = False) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close or self.server.draining:  # a shutting-down server takes no further request on this connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)


class RestServer(ThreadingHTTPServer):
    """The REST port: a thread per connection, every read bounded by `read_timeout_s`, and a `stop()` that lets
    requests being handled finish while refusing new ones."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], api: RestApi, max_request_bytes: int, read_timeout_s: float | None = 30.0
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.api = api
        self.max_request_bytes = max_request_bytes
        self.read_timeout_s = read_timeout_s
        self.draining = False
        self._connections: dict[socket.socket, bool] = {}  # open connection -> busy (a request is being handled)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def process_request(self, request, client_address) -> None:
        # Tracked from the accept loop, before the handler thread starts: a stop() right after sees it.
        with self._lock:
            self._connections[request] = False
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def mark_busy(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections[connection] = True

    def mark_idle(self, connection: socket.socket) -> None:
        with self._lock:
            if connection in self._connections:
                self._connections[connection] = False

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(self._connections.values())

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("REST connection from %s ended: %s", client_address, error)
            return
        log.exception("REST connection from %s failed", client_address)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.1,), name="rest", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> int:
        """Refuse new connections and close idle ones; give requests being handled up to timeout_s to finish.

        Returns how many requests were still being handled at the deadline (their connections are closed)."""
        deadline = time.monotonic() + timeout_s
        self.draining = True
        if self._thread is not None:
            self.shutdown()  # the accept loop ends within its 0.1 s poll
        self.server_close()  # the listening socket: connecting is refused from here on
        while True:
            self._close_connections(idle_only=True)
            with self._lock:
                if not self._connections:
                    return 0
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        cut_off = self.in_flight
        self._close_connections(idle_only=False)
        return cut_off

    def _close_connections(self, idle_only: bool) -> None:
        with self._lock:
            chosen = [conn for conn, busy in self._connections.items() if not (idle_only and busy)]
        for connection in chosen:
            with contextlib.suppress(OSError):  # already closed by its own thread
                connection.shutdown(socket.SHUT_RDWR)
