"""Shutdown under load: SIGTERM, on whichever thread the kernel delivers it, stops the server within its grace
period, and every request the server had taken is answered.

Each run is a fresh server (forked from the `server_zygote`, which imported TensorFlow once) serving a model
whose every call takes SLOW_S, with three gRPC and two REST clients sending requests back to back; once a round
of requests has been answered and at least three more are in flight, the server gets SIGTERM. The signal goes
to the process (the kernel picks the thread) in even runs, and to one thread other than the main one in odd runs
(tgkill), as the kernel may do under load: a main thread that waits without a timeout never runs the Python
handler then. One more run, of `python -m serving.server` itself, gets SIGTERM twice, then SIGINT and SIGTERM
again while it drains.

A request counts as in flight at the signal when it was sent at least SETTLED_S before it (by then it has
surely reached the server) and not yet answered. Requests sent later may be refused (gRPC UNAVAILABLE, a
refused REST connection): the server has stopped taking new ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from common.io import read_json
from tests.fixtures.model_server import (
    DOUBLING_MODEL_NAME,
    ServerZygote,
    export_doubling_model,
    start_model_server_process,
)

RUNS = 20
GRACE_S = 5.0  # the server's --shutdown_grace_seconds here: short, but ten times what the drain needs
SLOW_S = 0.3  # every model call (a whole batch) takes this long
SETTLED_S = 0.15
GRPC_CLIENTS = 3
REST_CLIENTS = 2
CLIENTS = GRPC_CLIENTS + REST_CLIENTS
REQUESTS_PER_CLIENT = 100  # per run: the clients stop long before, at the first refusal
REQUEST_TIMEOUT_S = 10.0
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(platform.machine())


@dataclass
class Call:
    client: str
    sent: float
    done: float | None = None
    outcome: str = "pending"  # "ok", "refused", or what went wrong


class Traffic:
    """Client threads, each sending one request at a time (x -> the model's 2x) until stopped or refused."""

    def __init__(self, grpc_address: str, rest_url: str) -> None:
        self.grpc_address = grpc_address
        self.predict_url = f"{rest_url}/v1/models/{DOUBLING_MODEL_NAME}:predict"
        self.calls: list[Call] = []
        self.current: dict[str, Call] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(f"grpc-{i}", self._grpc_sender), daemon=True)
            for i in range(GRPC_CLIENTS)
        ] + [
            threading.Thread(target=self._client, args=(f"rest-{i}", self._rest_sender), daemon=True)
            for i in range(REST_CLIENTS)
        ]
        for thread in self._threads:
            thread.start()

    def _grpc_sender(self) -> tuple[Callable[[np.ndarray], str], Callable[[], None]]:
        channel = grpc.insecure_channel(self.grpc_address)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

        def send(x: np.ndarray) -> str:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = DOUBLING_MODEL_NAME
            request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
            try:
                response = stub.Predict(request, timeout=REQUEST_TIMEOUT_S)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    return "refused"
                return f"gRPC {error.code().name}: {error.details()}"
            return "ok" if np.array_equal(tf.make_ndarray(response.outputs["y"]), 2 * x) else "wrong answer"

        return send, channel.close

    def _rest_sender(self) -> tuple[Callable[[np.ndarray], str], Callable[[], None]]:
        session = requests.Session()  # keep-alive: the server must not cut a connection that has a request on it

        def send(x: np.ndarray) -> str:
            try:
                reply = session.post(self.predict_url, json={"instances": x.tolist()}, timeout=REQUEST_TIMEOUT_S)
            except requests.ConnectionError:
                return "refused"
            if reply.status_code != 200:
                return f"HTTP {reply.status_code}: {reply.text[:200]}"
            return "ok" if np.array_equal(np.array(reply.json()["predictions"]), 2 * x) else "wrong answer"

        return send, session.close

    def _client(self, name: str, make_sender) -> None:
        send, close = make_sender()
        rng = np.random.default_rng(sum(map(ord, name)))
        try:
            for _ in range(REQUESTS_PER_CLIENT):
                if self._stop.is_set():
                    return
                call = Call(name, time.monotonic())
                self.current[name] = call
                self.calls.append(call)
                try:
                    call.outcome = send(rng.integers(0, 100, size=(1, 2)).astype(np.float32))
                except Exception as error:  # noqa: BLE001 - any other failure is a finding, reported per call
                    call.outcome = f"{type(error).__name__}: {error}"
                call.done = time.monotonic()
                if call.outcome != "ok":
                    return
        finally:
            close()

    def wait_until_in_flight(self, count: int, answered_first: int = CLIENTS, timeout_s: float = 10.0) -> None:
        """Until `answered_first` requests have been answered and then `count` clients each have a request out for
        at least SETTLED_S."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            now = time.monotonic()
            settled = [c for c in list(self.current.values()) if c.done is None and now - c.sent >= SETTLED_S]
            if len(settled) >= count and sum(c.done is not None for c in list(self.calls)) >= answered_first:
                return
            time.sleep(0.005)
        raise TimeoutError(f"fewer than {count} requests were in flight within {timeout_s} s: {self.calls[-10:]}")

    def stop(self) -> list[Call]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT_S + 5)
        return list(self.calls)


@dataclass
class Run:
    target: str  # "process" or "thread <tid>"
    exit_code: int | None
    exit_s: float
    calls: list[Call]
    signalled: float
    log: str

    def in_flight(self) -> list[Call]:
        return [c for c in self.calls if c.sent <= self.signalled - SETTLED_S and (c.done or 0) > self.signalled]

    def check(self) -> list[str]:
        problems = []
        if self.exit_code is None:
            problems.append(f"still running {self.exit_s:.1f} s after the signal")
        elif self.exit_code != 0:
            problems.append(f"exit code {self.exit_code}")
        if self.exit_s > GRACE_S:
            problems.append(f"exited {self.exit_s:.2f} s after the signal; the grace period is {GRACE_S} s")
        if not self.in_flight():
            problems.append("no request was in flight at the signal (the run proves nothing)")
        for call in self.calls:
            settled = call.sent <= self.signalled - SETTLED_S
            if call.outcome != "ok" and (settled or call.outcome != "refused"):
                when = call.sent - self.signalled
                problems.append(f"{call.client} request sent {when:+.3f} s from the signal: {call.outcome}")
        if "Traceback" in self.log:
            problems.append("a traceback in the server log")
        return problems


def thread_ids_accepting(pid: int, signum: int) -> list[int]:
    """The server's threads other than the main one that do not block `signum` (a blocked one would keep it)."""
    tids = []
    for name in os.listdir(f"/proc/{pid}/task"):
        tid = int(name)
        with contextlib.suppress(FileNotFoundError):
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
            if tid != pid and not blocked & (1 << (signum - 1)):
                tids.append(tid)
    return sorted(tids)


def tgkill(pid: int, tid: int, signum: int) -> None:
    assert SYS_TGKILL is not None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {signum}) failed")


def server_flags(base_path: Path, ready: Path) -> list[str]:
    return [
        "--host=127.0.0.1", "--port=0", "--rest_api_port=-1", f"--ready_file={ready}",
        f"--model_name={DOUBLING_MODEL_NAME}", f"--model_base_path={base_path}", "--enable_batching",
        f"--shutdown_grace_seconds={GRACE_S}",
    ]  # fmt: skip


def wait_for_ready(ready: Path, alive: Callable[[], bool], timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError("the model server did not start")
        time.sleep(0.02)
    return read_json(ready)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slow_model")
    export_doubling_model(root, seconds=SLOW_S)
    return root / DOUBLING_MODEL_NAME


def run_once(zygote: ServerZygote, slow_model: Path, workdir: Path, run: int, rng: random.Random) -> Run:
    workdir.mkdir(parents=True)
    ready, log_path = workdir / "ready.json", workdir / "server.log"
    pid = zygote.start(server_flags(slow_model, ready), log_path)
    exit_code = None
    try:
        ports = wait_for_ready(ready, alive=lambda: zygote.wait(pid, 0)[0] is None)
        traffic = Traffic(f"127.0.0.1:{ports['grpc_port']}", f"http://127.0.0.1:{ports['rest_port']}")
        try:
            traffic.wait_until_in_flight(count=3)
            tids = thread_ids_accepting(pid, signal.SIGTERM)
            if run % 2 and SYS_TGKILL is not None and tids:
                tid = rng.choice(tids)
                target = f"thread {tid} of {len(tids)}"
                signalled = time.monotonic()
                tgkill(pid, tid, signal.SIGTERM)
            else:
                target = "process"
                signalled = time.monotonic()
                os.kill(pid, signal.SIGTERM)
            exit_code, reaped_at = zygote.wait(pid, GRACE_S + 10)
            exit_s = (reaped_at if exit_code is not None else time.monotonic()) - signalled
        finally:
            calls = traffic.stop()
    finally:
        if exit_code is None:
            zygote.kill(pid)
    return Run(target, exit_code, exit_s, calls, signalled, log_path.read_text(errors="replace"))


def test_sigterm_under_load_answers_every_in_flight_request_and_exits_within_the_grace_period(
    server_zygote: ServerZygote, slow_model: Path, tmp_path: Path
) -> None:
    rng = random.Random(12)
    failures = []
    for run in range(RUNS):
        result = run_once(server_zygote, slow_model, tmp_path / f"run{run}", run, rng)
        problems = result.check()
        if problems:
            failures.append(f"run {run} (SIGTERM to the {result.target}): " + "; ".join(problems))
    assert not failures, "\n".join(failures)


def test_repeated_signals_while_draining_are_harmless(slow_model: Path, tmp_path: Path) -> None:
    """`python -m serving.server` itself: SIGTERM twice at once, then SIGINT and SIGTERM while it drains."""
    args = [
        f"--model_name={DOUBLING_MODEL_NAME}", f"--model_base_path={slow_model}", "--enable_batching",
        f"--shutdown_grace_seconds={GRACE_S}",
    ]  # fmt: skip
    with start_model_server_process(tmp_path / "server", *args) as server:
        traffic = Traffic(server.grpc_address, server.rest_url)
        try:
            traffic.wait_until_in_flight(count=3)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
            while "Shutting down:" not in server.log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.005)
            server.process.send_signal(signal.SIGINT)  # while it drains: its requests take SLOW_S
            server.process.send_signal(signal.SIGTERM)
            try:
                exit_code: int | None = server.process.wait(timeout=GRACE_S + 10)
            except subprocess.TimeoutExpired:
                exit_code = None
            exit_s = time.monotonic() - signalled
        finally:
            calls = traffic.stop()
        log = server.log_path.read_text(errors="replace")
    result = Run("process", exit_code, exit_s, calls, signalled, log)
    assert result.check() == []
    assert "Ignored" in log and "further signal(s) while shutting down" in log
