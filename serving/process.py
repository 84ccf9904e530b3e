"""Start and stop a model-server process (`python -m serving.server`) on free loopback ports.

One helper for infra validation, the tests and the benchmarks: they all need a real server in its own
process, ready when its ports are open, and gone (even if the caller is killed) when they are done.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STOP_TIMEOUT_S = 20.0  # after SIGTERM: the server drains in-flight requests within its shutdown grace


class ModelServerStartError(RuntimeError):
    """The server process exited or did not open its ports in time; the message ends with its log."""


@dataclass(frozen=True)
class RunningModelServer:
    grpc_port: int
    rest_port: int | None  # None when REST is off (--rest_api_port=0)
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        if self.rest_port is None:
            raise ValueError("this server was started without a REST port")
        return f"http://127.0.0.1:{self.rest_port}"

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def _die_with_parent() -> None:
    """In the child before exec: the server gets SIGTERM when its parent dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def server_command(ready_file: Path, args: Sequence[str], python: str = sys.executable) -> list[str]:
    """The command line: loopback only, OS-chosen ports (gRPC, and REST unless `args` turn it off)."""
    return [
        python, "-m", "serving.server", "--host=127.0.0.1", "--port=0", "--rest_api_port=-1",
        f"--ready_file={ready_file}", *args,
    ]  # fmt: skip


@contextlib.contextmanager
def model_server_process(
    workdir: Path,
    args: Sequence[str],
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> Iterator[RunningModelServer]:
    """Run `python -m serving.server <args>` with its log in `workdir`; yield once its ports are open.

    `args` are the server's own flags (`--model_name=...`, `--model_base_path=...` or `--model_config_file=...`).
    On exit the server gets SIGTERM, then SIGKILL after STOP_TIMEOUT_S.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)  # a stale one would point at a dead server's ports
    log_path = workdir / "server.log"
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    process_env = {**os.environ, "PYTHONPATH": python_path, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            server_command(ready, args),
            cwd=REPO_ROOT,
            env=process_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if process.poll() is not None:
                raise ModelServerStartError(f"the model server exited with {process.returncode}:\n{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise ModelServerStartError(
                    f"the model server did not start in {timeout_s:.0f}s:\n{log_tail(log_path)}"
                )
            time.sleep(0.05)
        ports = json.loads(ready.read_text(encoding="utf-8"))
        rest_port = ports.get("rest_port") or None
        yield RunningModelServer(int(ports["grpc_port"]), rest_port, process, log_path)
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, wait, then SIGKILL; returns the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
