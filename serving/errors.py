"""Errors as TF Serving reports them: a gRPC status code, a message, and the HTTP status REST maps it to."""

from __future__ import annotations

import re

import grpc

# TF Serving's ToHTTPStatusCode (model_servers/http_server.cc).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class ServingError(Exception):
    """A request failed with `code`; `message` is what the client sees."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


def invalid_argument(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNAVAILABLE, message)


def failed_precondition(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.FAILED_PRECONDITION, message)


def internal(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INTERNAL, message)


# TensorFlow's decorations of an op error say where in the graph it happened, not what went wrong; a client
# gets the op's own words without them (node and function names, C++ call sites, the Python trace of the export).
_TF_ANNOTATION = re.compile(r"\s*\[\[.*?\]\]|\{\{(?:function_)?node [^}]*\}\}\s*|\s*\[Op:[^\]]*\]")
_TF_NOISE_LINE = re.compile(
    r"^(Graph execution error:|Detected at node\b.*|<stack traces unavailable>|File \".*\", line \d+, in .*)$"
)
_TF_CPP_CALL = re.compile(r"\b\w+::\w+ failed\.\s*")  # jpeg::Uncompress failed.
_ASSERTION = "assertion failed: "
_ASSERTION_PART = re.compile(r"\[([^\[\]]*)\]")


def _assertion_message(text: str) -> str:
    """tf.debugging.assert_*'s "[message] [Condition x <= y ...] [x (node:0) = ] [4]" as just the message parts."""
    parts = _ASSERTION_PART.findall(text)
    kept = []
    for part in parts:
        if part.startswith("Condition "):
            break  # the comparison and its operands, by tensor name: the message already says it
        kept.append(part.strip())
    return " ".join(p for p in kept if p) or text


def tensorflow_message(raw: str) -> str:
    """The line of a TensorFlow error that says what went wrong, without TensorFlow's internals."""
    text = _TF_ANNOTATION.sub("", raw)
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and not _TF_NOISE_LINE.match(line)]
    message = _TF_CPP_CALL.sub("", kept[0]).strip() if kept else "the model failed on this input"
    if message.startswith(_ASSERTION):
        message = _assertion_message(message[len(_ASSERTION) :])
    return message


def from_tf_error(error: Exception) -> ServingError:
    """Map a TensorFlow OpError to its status code, with the op's own message (no node names, no Python trace)."""
    number = getattr(error, "error_code", None)
    code = CODE_BY_NUMBER.get(number, grpc.StatusCode.INTERNAL) if number is not None else grpc.StatusCode.INTERNAL
    raw = getattr(error, "message", None) or str(error)
    return ServingError(code, tensorflow_message(raw))
