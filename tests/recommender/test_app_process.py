"""The app as it is run and deployed: `python -m recommender.app` in its own process (where it listens, how
it shuts down under a stalled upload), `make app` and docker-compose's command line, and how fast it answers
again after the model server restarts."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from recommender import app as app_module
from recommender import build_kb, kb
from recommender.app import Settings, create_app
from tests.conftest import REPO_ROOT
from tests.fixtures.catalog import write_catalog, write_params
from tests.fixtures.knowledge_base import free_port, serve_app
from tests.fixtures.model_server import (
    MODEL_NAME,
    ModelServerHandle,
    publish_copy,
    start_model_server,
    wait_for_versions,
)

pytestmark = pytest.mark.e2e

GRACE_S = 2.0  # the graceful-shutdown timeout the app runs with in these tests
EXIT_SLACK_S = 4.0  # after the grace period: cancel the stalled request, lifespan shutdown, interpreter exit


@dataclass(frozen=True)
class SmallKb:
    url: str
    params: Path


@dataclass(frozen=True)
class AppProcess:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path


@pytest.fixture(scope="module")
def small_kb(tmp_path_factory: pytest.TempPathFactory) -> SmallKb:
    """A knowledge base of the small test catalog (a second to build, unlike the real one)."""
    root = tmp_path_factory.mktemp("app_process_kb")
    params = write_params(root / "params.yaml", REPO_ROOT / "params.yaml")
    db = root / "productlens.db"
    args = ["--catalog", str(write_catalog(root / "catalog")), "--params", str(params), "--output", str(db)]
    assert build_kb.main([*args, "--metrics", str(root / "build_kb.json")]) == 0
    return SmallKb(kb.sqlite_url(db), params)


@contextlib.contextmanager
def app_process(workdir: Path, small_kb: SmallKb, *args: str, **env: str) -> Iterator[AppProcess]:
    """`python -m recommender.app --port <free> <args>`; yield once it answers (the model server is not needed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "app.log"
    environment = dict(
        os.environ,
        PYTHONPATH=str(REPO_ROOT),
        PRODUCTLENS_DB_URL=small_kb.url,
        PRODUCTLENS_PARAMS=str(small_kb.params),
        PRODUCTLENS_MODEL_GRPC=f"127.0.0.1:{free_port()}",  # nothing listens: these tests do not predict
        **env,
    )
    command = [sys.executable, "-m", "recommender.app", "--port", str(port), *args]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the app did not start (exit {process.poll()}):\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/v1/products", params={"limit": 1}, timeout=5).status_code == 200:
                    break
            time.sleep(0.1)
        yield AppProcess(url, port, process, log_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def listening_addresses(pid: int, port: int) -> set[str]:
    connections = psutil.Process(pid).net_connections(kind="tcp")
    return {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_the_app_listens_on_loopback_only_unless_given_a_host(small_kb: SmallKb, tmp_path: Path) -> None:
    with app_process(tmp_path, small_kb) as app:
        assert listening_addresses(app.process.pid, app.port) == {"127.0.0.1"}
    assert app_module.parse_args([]).host == "127.0.0.1"


def test_make_app_binds_loopback_unless_host_is_given() -> None:
    env = dict(os.environ, PRODUCTLENS_DB_URL="sqlite:///unused.db")  # so `make app` does not build the KB first

    def app_command(*make_args: str) -> str:
        dry_run = subprocess.run(
            ["make", "-n", "app", *make_args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
        ).stdout
        return next(line for line in dry_run.splitlines() if "-m recommender.app" in line)

    assert "--host 127.0.0.1 " in app_command()
    assert "--host 0.0.0.0 " in app_command("HOST=0.0.0.0")


def test_docker_compose_runs_the_app_module_on_all_interfaces() -> None:
    """The project image's entrypoint is `python -m`: compose's command is the module and its flags."""
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["recommender"]
    module, *flags = compose["command"]
    assert module == "recommender.app"
    args = app_module.parse_args(flags)
    assert (args.host, args.port) == ("0.0.0.0", 8080)
    assert args.timeout_graceful_shutdown < int(compose.get("stop_grace_period", "10s").rstrip("s"))


def test_sigterm_ends_the_app_within_its_grace_period_despite_a_stalled_upload(
    small_kb: SmallKb, tmp_path: Path
) -> None:
    with app_process(tmp_path, small_kb, PRODUCTLENS_GRACEFUL_SHUTDOWN_S=str(GRACE_S)) as app:
        stalled = socket.create_connection(("127.0.0.1", app.port), timeout=10)
        head = (
            "POST /v1/recommendations HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Type: multipart/form-data; boundary=cut\r\nContent-Length: 100000\r\n"
            "Expect: 100-continue\r\n\r\n"
        )
        stalled.sendall(head.encode())
        # The server says "100 Continue" only once the app reads the body: the upload is in flight.
        assert stalled.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        part = b'--cut\r\nContent-Disposition: form-data; name="image"; filename="cut.jpg"\r\n\r\n'
        stalled.sendall(part + b"\xff\xd8" + b"\0" * 20_000)  # a fifth of the announced body, then nothing

        start = time.monotonic()
        app.process.send_signal(signal.SIGTERM)
        try:
            code = app.process.wait(timeout=GRACE_S + EXIT_SLACK_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the app still runs {GRACE_S + EXIT_SLACK_S:.0f} s after SIGTERM (grace {GRACE_S} s), held by a "
                f"stalled upload:\n{app.log_path.read_text()[-2000:]}"
            )
        took = time.monotonic() - start
        stalled.settimeout(5)
        answer = b""
        while chunk := stalled.recv(4096):  # until the app closes the connection
            answer += chunk
        stalled.close()
    print(f"the app exited {took:.1f} s after SIGTERM (graceful-shutdown timeout {GRACE_S} s)")
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled once it has shut down
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b'{"detail":"The service is shutting down and cancelled this request: send it again."}' in answer
    assert GRACE_S - 0.5 <= took <= GRACE_S + EXIT_SLACK_S
    assert "timeout graceful shutdown exceeded" in app.log_path.read_text()


def test_while_the_model_server_is_down_the_app_tries_to_reconnect_every_second(
    small_kb: SmallKb, tmp_path: Path
) -> None:
    """Its port accepts and drops every connection (the model server is not up yet) while /healthz is polled
    like traffic would: the app's connection attempts are never more than about a second apart, so it is
    back at most ~1 s after the model server is (gRPC's default waits 1, 1.6, 2.6, 4.1 ... up to 120 s)."""
    attempts: list[float] = []
    stop_polling = threading.Event()

    def poll(url: str) -> None:
        while not stop_polling.is_set():
            assert requests.get(f"{url}/healthz", timeout=10).status_code == 503
            stop_polling.wait(0.05)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.05)
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        settings = Settings(db_url=small_kb.url, model_grpc=target, model_timeout_s=1.0, params_path=small_kb.params)
        with serve_app(create_app(settings)) as url:
            poller = threading.Thread(target=poll, args=(url,), daemon=True)
            poller.start()
            end = time.monotonic() + 6.0
            while time.monotonic() < end:
                with contextlib.suppress(TimeoutError):
                    connection, _ = listener.accept()
                    attempts.append(time.monotonic())
                    connection.close()
            stop_polling.set()
            poller.join(timeout=15)
    gaps = [round(later - earlier, 2) for earlier, later in zip(attempts, attempts[1:], strict=False)]
    print(f"{len(attempts)} connection attempts in 6 s, gaps {gaps}")
    assert len(attempts) >= 6, gaps
    assert max(gaps) <= 1.5, gaps


def test_the_app_answers_again_soon_after_the_model_server_restarts(
    model_server: ModelServerHandle, small_kb: SmallKb, tmp_path: Path
) -> None:
    """The model server stops and comes back on the same port: within ~2 s of it serving again, the app's
    /healthz is 200 again (gRPC's default reconnect backoff grows to minutes; the app caps it at 1 s)."""
    base = tmp_path / "models" / MODEL_NAME
    base.mkdir(parents=True)
    publish_copy(model_server.base_path / str(model_server.version), base, model_server.version)
    port = free_port()
    server_args = (f"--port={port}", f"--model_name={MODEL_NAME}", f"--model_base_path={base}")
    settings = Settings(
        db_url=small_kb.url, model_grpc=f"127.0.0.1:{port}", model_timeout_s=5.0, params_path=small_kb.params
    )
    statuses: list[tuple[float, int]] = []
    stop_polling = threading.Event()

    def poll(url: str) -> None:
        while not stop_polling.is_set():
            statuses.append((time.monotonic(), requests.get(f"{url}/healthz", timeout=10).status_code))
            stop_polling.wait(0.05)

    with serve_app(create_app(settings)) as url:
        with start_model_server(tmp_path / "first", *server_args):
            wait_for_versions(f"127.0.0.1:{port}", MODEL_NAME, {model_server.version: "AVAILABLE"})
            assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        poller = threading.Thread(target=poll, args=(url,), daemon=True)
        poller.start()
        try:
            with start_model_server(tmp_path / "second", *server_args):
                wait_for_versions(f"127.0.0.1:{port}", MODEL_NAME, {model_server.version: "AVAILABLE"})
                back = time.monotonic()  # a fresh channel gets answers from here on
                deadline = back + 15
                while time.monotonic() < deadline and not any(s == 200 and t > back for t, s in statuses):
                    time.sleep(0.05)
        finally:
            stop_polling.set()
            poller.join(timeout=15)
    down = [t for t, s in statuses if s == 503]
    answered = [t for t, s in statuses if s == 200]
    assert down, "the app never saw the model server down: the test did not restart it"
    assert answered, f"the app did not answer within 15 s of the model server coming back: {statuses[-5:]}"
    recovery = answered[0] - back
    print(f"model server down {back - down[0]:.1f} s; the app answered again {recovery:+.2f} s after it was back")
    assert recovery < 2.0
