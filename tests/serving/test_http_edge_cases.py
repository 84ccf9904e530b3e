"""The REST port under requests a careless or hostile client sends: the answer is a 4xx that says what is wrong
(never a 200 that skipped a limit, never a 500), a stalled connection is closed after the read timeout, and
error messages carry no TensorFlow internals (node or function names, C++ call sites). Keep-alive: one
connection carries many requests, idle between them until the keep-alive timeout.

The requests go over raw sockets, so the tests hold whatever HTTP library serves the port.
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.fixtures.model_server import MODEL_NAME, ForkedServer, ServerZygote, TinyModel, export_tiny

READ_TIMEOUT_S = 1.0
KEEP_ALIVE_TIMEOUT_S = 3.0
PREDICT_PATH = f"/v1/models/{MODEL_NAME}:predict"
TENSORFLOW_INTERNALS = ("{{", "[[", "node ", "Decode", "::", "__inference")


@pytest.fixture(scope="module")
def server(server_zygote: ServerZygote, tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("http_edge_cases")
    export_tiny(tiny_model, root / "models")
    with server_zygote.serve(
        root / "server",
        f"--model_name={MODEL_NAME}",
        f"--model_base_path={root / 'models' / MODEL_NAME}",
        f"--rest_api_read_timeout_in_ms={int(READ_TIMEOUT_S * 1000)}",
        f"--rest_api_keep_alive_timeout_in_ms={int(KEEP_ALIVE_TIMEOUT_S * 1000)}",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def photo(tiny_model: TinyModel) -> bytes:
    return tiny_model.sample_images["keyboard"][0]


def predict_body(image: bytes) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(image).decode("ascii")}]}).encode()


def connect(server: ForkedServer, timeout_s: float = 10.0) -> socket.socket:
    address = urlsplit(server.rest_url)
    return socket.create_connection((address.hostname, address.port), timeout=timeout_s)


def exchange(server: ForkedServer, data: bytes, shut_write: bool = False) -> tuple[int, dict]:
    """Send raw bytes on a new connection; the response's status and JSON body."""
    with connect(server) as conn:
        conn.sendall(data)
        if shut_write:
            conn.shutdown(socket.SHUT_WR)
        status, _, body = read_response(conn)
    return status, body


def read_response(conn: socket.socket) -> tuple[int, bytes, dict]:
    """One response from `conn`: its status, head (lowercase) and JSON body."""
    received = b""
    while True:
        head, blank_line, body = received.partition(b"\r\n\r\n")
        if blank_line and len(body) >= _content_length(head):
            break
        chunk = conn.recv(65536)
        if not chunk:
            break
        received += chunk
    status = int(head.split(b" ", 2)[1])
    return status, head.lower(), json.loads(body[: _content_length(head)])


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def post(headers: list[str], body: bytes) -> bytes:
    lines = [f"POST {PREDICT_PATH} HTTP/1.1", "Host: test", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def assert_still_serves(server: ForkedServer, photo: bytes) -> None:
    reply = requests.post(server.rest_url + PREDICT_PATH, data=predict_body(photo), timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"][0]["class_names"][0] == "keyboard"


@pytest.mark.parametrize("value", ["-1", "abc", "1_0", "+7", "7, 8"])
def test_a_content_length_other_than_one_non_negative_integer_is_a_bad_request(
    value: str, server: ForkedServer, photo: bytes
) -> None:
    """-1 used to make the server read to the end of the stream, past --max_request_bytes (a 300 MiB body got 200)."""
    status, reply = exchange(server, post([f"Content-Length: {value}"], predict_body(photo)), shut_write=True)
    assert (status, "Content-Length" in reply.get("error", "")) == (400, True), reply
    assert_still_serves(server, photo)


def test_two_different_content_lengths_are_a_bad_request(server: ForkedServer, photo: bytes) -> None:
    body = predict_body(photo)
    status, reply = exchange(server, post([f"Content-Length: {len(body)}", "Content-Length: 5"], body), True)
    assert (status, "Content-Length" in reply.get("error", "")) == (400, True), reply


def test_a_chunked_body_is_refused_not_read_by_its_content_length(server: ForkedServer, photo: bytes) -> None:
    body = predict_body(photo)
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    headers = ["Transfer-Encoding: chunked", f"Content-Length: {len(body)}"]
    status, reply = exchange(server, post(headers, chunked), shut_write=True)
    assert (status, "Transfer-Encoding" in reply.get("error", "")) == (501, True), reply
    assert_still_serves(server, photo)


@pytest.mark.parametrize("opening", [b"[", b'{"a":'], ids=["lists", "objects"])
def test_json_nested_100000_levels_deep_is_a_bad_request(opening: bytes, server: ForkedServer, photo: bytes) -> None:
    closing = b"]" if opening == b"[" else b"}"
    body = b'{"instances": ' + opening * 100_000 + b"1" + closing * 100_000 + b"}"
    status, reply = exchange(server, post([f"Content-Length: {len(body)}"], body))
    assert (status, "nested" in reply.get("error", "")) == (400, True), reply
    assert_still_serves(server, photo)


def test_json_nested_deeper_than_any_input_needs_is_a_bad_request(server: ForkedServer, photo: bytes) -> None:
    body = b'{"instances": ' + b"[" * 100 + b"1.0" + b"]" * 100 + b"}"
    status, reply = exchange(server, post([f"Content-Length: {len(body)}"], body))
    assert (status, "nested" in reply.get("error", "")) == (400, True), reply


@pytest.fixture
def stalled_connections(server: ForkedServer) -> Iterator[list[socket.socket]]:
    """Twenty connections that stop sending: half a body, half the headers, or nothing at all."""
    halves = [
        post(["Content-Length: 100"], b'{"instan'),
        f"POST {PREDICT_PATH} HTTP/1.1\r\nHost: test\r\nContent-Le".encode(),
        b"",
    ]
    connections = []
    try:
        for index in range(20):
            conn = connect(server, timeout_s=READ_TIMEOUT_S + 15)
            connections.append(conn)
            if halves[index % 3]:
                conn.sendall(halves[index % 3])
        yield connections
    finally:
        for conn in connections:
            conn.close()


def test_a_stalled_connection_is_closed_after_the_read_timeout_while_others_are_answered(
    server: ForkedServer, photo: bytes, stalled_connections: list[socket.socket]
) -> None:
    assert_still_serves(server, photo)
    for conn in stalled_connections:
        try:
            leftover = conn.recv(1024)  # b"": the server closed it (the client-side timeout is 15 s longer)
        except ConnectionResetError:
            leftover = b""
        assert leftover == b""
    assert_still_serves(server, photo)


def test_a_client_that_trickles_its_headers_is_cut_off_after_the_read_timeout(server: ForkedServer) -> None:
    """Every byte comes well within the read timeout, but the request line and headers may take only that long."""
    head = f"GET /v1/models/{MODEL_NAME} HTTP/1.1\r\nHost: test\r\nX-Slow: {'a' * 100}\r\n\r\n".encode()
    with connect(server) as conn:
        with pytest.raises(OSError):  # BrokenPipeError or ConnectionResetError once the server has closed it
            for byte in head:  # ~35 s if the server waited for all of it
                conn.sendall(bytes([byte]))
                time.sleep(READ_TIMEOUT_S / 4)


def test_a_request_head_that_never_ends_is_refused_once_over_the_header_limit(
    server: ForkedServer, photo: bytes
) -> None:
    endless = f"GET /v1/models/{MODEL_NAME} HTTP/1.1\r\nHost: test\r\n".encode() + b"X-Padding: " + b"a" * (80 << 10)
    status, reply = exchange(server, endless)
    assert (status, "headers" in reply.get("error", "")) == (431, True), reply
    assert_still_serves(server, photo)


def test_an_oversized_body_announced_with_expect_100_continue_is_refused_before_it_is_sent(
    server: ForkedServer,
) -> None:
    status, reply = exchange(server, post(["Expect: 100-continue", f"Content-Length: {1 << 30}"], b""))
    assert (status, "limit" in reply.get("error", "")) == (413, True), reply


@pytest.mark.parametrize(
    ("request_line", "status"),
    [(f"PUT /v1/models/{MODEL_NAME} HTTP/1.1", 501), ("GET /favicon.ico HTTP/1.1", 404)],
    ids=["method", "path"],
)
def test_what_the_api_does_not_have_is_answered_in_its_json_error_shape(
    request_line: str, status: int, server: ForkedServer
) -> None:
    answered, reply = exchange(server, f"{request_line}\r\nHost: test\r\nContent-Length: 0\r\n\r\n".encode())
    assert (answered, bool(reply.get("error"))) == (status, True), reply


def test_requests_on_one_keep_alive_connection_are_answered_on_it_and_it_idles_past_the_read_timeout(
    server: ForkedServer, photo: bytes
) -> None:
    body = predict_body(photo)
    with connect(server) as conn:
        for index in range(3):
            if index == 2:
                time.sleep(READ_TIMEOUT_S * 1.5)  # idle between requests: the keep-alive timeout applies, not this
            conn.sendall(post([f"Content-Length: {len(body)}"], body))
            status, head, reply = read_response(conn)
            assert status == 200, reply
            assert reply["predictions"][0]["class_names"][0] == "keyboard"
            assert b"connection: close" not in head


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
    server: ForkedServer, photo: bytes
) -> None:
    body = predict_body(photo)
    with connect(server, timeout_s=KEEP_ALIVE_TIMEOUT_S + 15) as conn:
        conn.sendall(post([f"Content-Length: {len(body)}"], body))
        assert read_response(conn)[0] == 200
        try:
            leftover = conn.recv(1024)  # b"": the server closed it (the client-side timeout is 15 s longer)
        except ConnectionResetError:
            leftover = b""
        assert leftover == b""


def truncated(image: bytes) -> bytes:
    return image[: len(image) // 2]


@pytest.mark.parametrize("make_bytes", [truncated, lambda image: b"not an image at all"], ids=["truncated", "text"])
def test_a_bad_image_is_reported_without_tensorflow_internals(make_bytes, server: ForkedServer, photo: bytes) -> None:
    bad = make_bytes(photo)
    reply = requests.post(server.rest_url + PREDICT_PATH, data=predict_body(bad), timeout=30)
    assert reply.status_code == 400
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([bad], dtype=tf.string, shape=[1]))
    with grpc.insecure_channel(server.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for message in (reply.json()["error"], raised.value.details()):
        assert message and not [internal for internal in TENSORFLOW_INTERNALS if internal in message], message


def test_the_server_log_has_no_traceback_from_these_requests(server: ForkedServer) -> None:
    assert "Traceback" not in Path(server.log_path).read_text(errors="replace")
