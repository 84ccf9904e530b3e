"""Safe defaults: the server listens on loopback unless told otherwise, a model config may only name folders
under the allowed models root, and HandleReloadConfigRequest can be switched off or needs a shared token.

Before, anyone who reached :8500 (on every interface) could unload the served model with an empty config or
load any folder on the server as a model.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from serving.grpc_api import RELOAD_TOKEN_ENV
from serving.server import reload_access
from tests.fixtures.model_server import DOUBLING_MODEL_NAME, ForkedServer, ServerZygote, export_doubling_model

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "a-shared-reload-token"
INTRUDER = "intruder"
TIMEOUT = 30


@dataclass(frozen=True)
class Folders:
    root: Path
    models: Path  # models/doubler/1: what the servers serve
    elsewhere: Path  # elsewhere/intruder/1: a SavedModel outside the models folder
    config: Path  # models.config naming models/doubler


def config_text(*models: tuple[str, Path]) -> str:
    entries = "".join(
        f'  config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" }}\n' for name, base in models
    )
    return f"model_config_list {{\n{entries}}}\n"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Folders:
    root = tmp_path_factory.mktemp("safe_defaults")
    export_doubling_model(root / "models")
    export_doubling_model(root / "elsewhere", model_name=INTRUDER)
    (root / "models" / "link").symlink_to(root / "elsewhere", target_is_directory=True)
    config = root / "models.config"
    config.write_text(config_text((DOUBLING_MODEL_NAME, root / "models" / DOUBLING_MODEL_NAME)))
    return Folders(root, root / "models", root / "elsewhere", config)


def serving_flags(folders: Folders) -> list[str]:
    return [f"--model_config_file={folders.config}", "--model_config_file_poll_wait_seconds=0.2"]


@pytest.fixture(scope="module")
def default_server(server_zygote: ServerZygote, folders: Folders):
    """No --host, no --allowed_model_root, no --reload_config_rpc, no token: the defaults."""
    with server_zygote.serve(folders.root / "default", *serving_flags(folders)) as server:
        yield server


@pytest.fixture(scope="module")
def token_server(server_zygote: ServerZygote, folders: Folders):
    with server_zygote.serve(folders.root / "token", *serving_flags(folders), env={RELOAD_TOKEN_ENV: TOKEN}) as server:
        yield server


@pytest.fixture(scope="module")
def reload_off_server(server_zygote: ServerZygote, folders: Folders):
    with server_zygote.serve(folders.root / "off", *serving_flags(folders), "--reload_config_rpc=off") as server:
        yield server


def reload(server: ForkedServer, text: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    with grpc.insecure_channel(server.grpc_address) as channel:
        model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=config), timeout=TIMEOUT, metadata=metadata
        )


def served_states(server: ForkedServer, name: str) -> list[str]:
    """The model's version states, or [] when the server does not know the model."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    with grpc.insecure_channel(server.grpc_address) as channel:
        try:
            response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=TIMEOUT)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
            return []
    return [get_model_status_pb2.ModelVersionStatus.State.Name(s.state) for s in response.model_version_status]


def assert_serves_only_the_doubler(server: ForkedServer) -> None:
    assert served_states(server, DOUBLING_MODEL_NAME) == ["AVAILABLE"]
    assert served_states(server, INTRUDER) == []
    request = predict_pb2.PredictRequest()
    request.model_spec.name = DOUBLING_MODEL_NAME
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([[1.0, 2.5]], np.float32)))
    with grpc.insecure_channel(server.grpc_address) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=TIMEOUT)
    assert tf.make_ndarray(response.outputs["y"]).tolist() == [[2.0, 5.0]]


def refusal(server: ForkedServer, text: str, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        reload(server, text, metadata)
    return raised.value


def listening_addresses(pid: int) -> set[str]:
    """The addresses the process listens on; gRPC's IPv4-mapped IPv6 sockets (::ffff:127.0.0.1) as IPv4."""
    addresses = set()
    for connection in psutil.Process(pid).net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN:
            address = ipaddress.ip_address(connection.laddr.ip)
            addresses.add(str(getattr(address, "ipv4_mapped", None) or address))
    return addresses


# ----- where it listens -------------------------------------------------------------------------------------------
def test_the_server_listens_on_loopback_only_by_default(default_server: ForkedServer) -> None:
    assert listening_addresses(default_server.pid) == {"127.0.0.1"}  # gRPC and REST (was 0.0.0.0 for both)


def test_make_serve_binds_loopback_unless_host_is_given() -> None:
    def serve_command(*make_args: str) -> str:
        dry_run = subprocess.run(
            ["make", "-n", "serve", *make_args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
        ).stdout
        return next(line for line in dry_run.splitlines() if "-m serving.server" in line)

    assert " --host=127.0.0.1 " in serve_command()
    assert " --host=0.0.0.0 " in serve_command("HOST=0.0.0.0")


# ----- which folders a config may name ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["elsewhere", "dot-dot", "symlink"])
def test_a_reload_naming_a_folder_outside_the_models_root_is_refused_and_the_last_good_config_stays(
    where: str, default_server: ForkedServer, folders: Folders
) -> None:
    intruder = {
        "elsewhere": folders.elsewhere / INTRUDER,
        "dot-dot": folders.models / ".." / "elsewhere" / INTRUDER,
        "symlink": folders.models / "link" / INTRUDER,  # under models/ by name, elsewhere/ in fact
    }[where]
    text = config_text((DOUBLING_MODEL_NAME, folders.models / DOUBLING_MODEL_NAME), (INTRUDER, intruder))
    error = refusal(default_server, text)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside the allowed model roots" in error.details() and str(folders.models) in error.details()
    assert_serves_only_the_doubler(default_server)


def test_a_reload_inside_the_models_root_is_applied(default_server: ForkedServer, folders: Folders) -> None:
    doubler = (DOUBLING_MODEL_NAME, folders.models / DOUBLING_MODEL_NAME)
    reload(default_server, config_text(doubler, ("second", folders.models / DOUBLING_MODEL_NAME)))
    assert served_states(default_server, "second") == ["AVAILABLE"]
    reload(default_server, config_text(doubler))
    assert_serves_only_the_doubler(default_server)


def test_an_edited_config_file_naming_an_outside_folder_is_not_applied(
    default_server: ForkedServer, folders: Folders
) -> None:
    original = folders.config.read_text()
    refused_before = default_server.log_path.read_text().count("Not applying the changed")
    try:
        folders.config.write_text(
            config_text(
                (DOUBLING_MODEL_NAME, folders.models / DOUBLING_MODEL_NAME), (INTRUDER, folders.elsewhere / INTRUDER)
            )
        )
        deadline = time.monotonic() + 20
        while default_server.log_path.read_text().count("Not applying the changed") == refused_before:
            assert time.monotonic() < deadline, "the server did not poll the changed config file"
            time.sleep(0.05)
        assert_serves_only_the_doubler(default_server)
    finally:
        folders.config.write_text(original)


def test_a_startup_config_outside_the_given_allowed_root_is_refused(
    server_zygote: ServerZygote, folders: Folders
) -> None:
    workdir = folders.root / "narrow"
    workdir.mkdir()
    pid = server_zygote.start(
        [f"--model_config_file={folders.config}", f"--allowed_model_root={folders.root / 'other'}", "--port=0"],
        workdir / "server.log",
    )
    exit_code, _ = server_zygote.wait(pid, TIMEOUT)
    if exit_code is None:
        server_zygote.kill(pid)
    assert exit_code == 1
    assert "outside the allowed model roots" in (workdir / "server.log").read_text()


# ----- who may reload -----------------------------------------------------------------------------------------------
EMPTY_CONFIG = "model_config_list {}\n"  # what unloaded productlens: a config with no models


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)], ids=["none", "wrong", "bare"]
)
def test_a_reload_without_the_token_is_unauthenticated_and_changes_nothing(
    metadata: tuple[tuple[str, str], ...], token_server: ForkedServer
) -> None:
    error = refusal(token_server, EMPTY_CONFIG, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert RELOAD_TOKEN_ENV in error.details()
    assert_serves_only_the_doubler(token_server)


def test_a_reload_with_the_token_is_applied(token_server: ForkedServer, folders: Folders) -> None:
    doubler = (DOUBLING_MODEL_NAME, folders.models / DOUBLING_MODEL_NAME)
    authorization = (("authorization", f"Bearer {TOKEN}"),)
    reload(token_server, config_text(doubler, ("second", folders.models / DOUBLING_MODEL_NAME)), authorization)
    assert served_states(token_server, "second") == ["AVAILABLE"]
    reload(token_server, folders.config.read_text(), authorization)
    assert_serves_only_the_doubler(token_server)


def test_the_reload_example_sends_the_token_from_the_environment(token_server: ForkedServer, folders: Folders) -> None:
    script = REPO_ROOT / "serving" / "examples" / "reload_config.py"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **{RELOAD_TOKEN_ENV: TOKEN})
    completed = subprocess.run(
        [sys.executable, str(script), str(folders.config), "--server", token_server.grpc_address],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[-1] == "reloaded"


def test_a_switched_off_reload_is_permission_denied_and_changes_nothing(reload_off_server: ForkedServer) -> None:
    error = refusal(reload_off_server, EMPTY_CONFIG)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "switched off" in error.details()
    assert_serves_only_the_doubler(reload_off_server)


@pytest.mark.parametrize(
    ("mode", "host", "token", "enabled", "needs_token"),
    [
        ("auto", "127.0.0.1", None, True, False),  # a workstation: like TF Serving, for local callers only
        ("auto", "::1", None, True, False),
        ("auto", "0.0.0.0", None, False, False),  # reachable from the network without a token: off
        ("auto", "0.0.0.0", TOKEN, True, True),
        ("on", "0.0.0.0", None, True, False),  # asked for explicitly
        ("off", "127.0.0.1", TOKEN, False, False),
    ],
)
def test_auto_turns_the_reload_rpc_off_where_the_network_reaches_it_without_a_token(
    mode: str, host: str, token: str | None, enabled: bool, needs_token: bool
) -> None:
    access = reload_access(mode, host, token)
    assert (access.enabled, access.enabled and access.token is not None) == (enabled, needs_token)
