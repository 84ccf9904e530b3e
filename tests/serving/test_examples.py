"""The examples in serving/examples/ classify a photo against a running server, as the README shows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.model_server import (
    ModelServerHandle,
    TinyModel,
    start_model_server,
    tiny_candidate,
    wait_for_versions,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "serving" / "examples"


def grpc_client(server: str, *args: str) -> list[str]:
    """Run serving/examples/grpc_client.py as the README shows; its stdout lines."""
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "grpc_client.py"), *args, "--server", server],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.splitlines()


@pytest.fixture(scope="module")
def photo(model_server: ModelServerHandle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "keyboard.jpg"
    path.write_bytes(model_server.sample_images["keyboard"][0])
    return path


def test_grpc_client_script_prints_the_top_classes(model_server: ModelServerHandle, photo: Path) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "grpc_client.py"), str(photo), "--server", model_server.grpc_address],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0] == f"model productlens version {model_server.version}"
    assert lines[1].split()[0] == "keyboard"
    top = float(lines[1].split()[1])
    verdict = "sure" if top >= model_server.not_sure_threshold else "not sure"
    assert (
        lines[-1]
        == f"{verdict}: top-1 {top:.3f}, this version's not-sure threshold {model_server.not_sure_threshold:.3f}"
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example_classifies_over_rest(model_server: ModelServerHandle, photo: Path) -> None:
    env = dict(os.environ, HOST=model_server.rest_url.removeprefix("http://"))
    predict = subprocess.run(
        [str(EXAMPLES / "curl.sh"), str(photo)], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    assert json.loads(predict.stdout)["predictions"][0]["class_names"][0] == "keyboard"
    classify = subprocess.run(
        [str(EXAMPLES / "curl.sh"), str(photo), "classify"], capture_output=True, text=True, env=env, timeout=60,
        check=True,
    )  # fmt: skip
    assert json.loads(classify.stdout)["result"][0][0][0] == "keyboard"


def test_reload_config_script_applies_a_models_config(model_server: ModelServerHandle, tmp_path: Path) -> None:
    config = tmp_path / "models.config"
    config.write_text(
        f'model_config_list {{ config {{ name: "productlens" base_path: "{model_server.base_path}" '
        'model_platform: "tensorflow" model_version_policy { latest { num_versions: 1 } } } }\n'
    )
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "reload_config.py"), str(config), "--server", model_server.grpc_address],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == ["sending config for 1 model(s): productlens", "reloaded"]


def publish_blessed(tiny_model: TinyModel, workdir: Path, not_sure_threshold: float, config: Path) -> None:
    """Export the tiny model as a candidate (the session's export of it with this threshold), bless it, and
    publish it with `--models-config` (what make publish runs after dvc repro)."""
    from components import publish
    from components.candidate import identity

    workdir.mkdir(parents=True, exist_ok=True)
    gate = {"blessed": True, "reasons": ["test fixture"]}
    candidate, _ = tiny_candidate(tiny_model, "productlens", not_sure_threshold)
    (workdir / "gate.json").write_text(json.dumps(gate))
    blessing = {"blessed": True, "reasons": ["test fixture"], "candidate": identity(candidate), "checks": []}
    (workdir / "blessing.json").write_text(json.dumps(blessing))
    code = publish.main(
        ["--candidate", str(candidate), "--gate", str(workdir / "gate.json"),
         "--blessing", str(workdir / "blessing.json"), "--data-dvc", str(ROOT / "data.dvc"),
         "--output", str(config.parent / "models"), "--models-config", str(config)]
    )  # fmt: skip
    assert code == 0


def served_for_label(server: str, label: str) -> int | None:
    """The version `label` resolves to on the server (GetModelMetadata), None while it resolves to none."""
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name, request.model_spec.version_label = "productlens", label
    with grpc.insecure_channel(server) as channel:
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=5)
        except grpc.RpcError:
            return None
    return response.model_spec.version.value


def test_grpc_client_label_stable_answers_after_publish(tiny_model: TinyModel, photo: Path, tmp_path: Path) -> None:
    """The README's `grpc_client.py photo.jpg --label stable` against a server on serving/models.config, after
    `make publish`, and again after the next publish moved the label (the server re-reads its config)."""
    config = tmp_path / "models.config"
    shipped = (ROOT / "serving" / "models.config").read_text()
    config.write_text(shipped.replace('"models/productlens"', f'"{tmp_path / "models" / "productlens"}"'))
    publish_blessed(tiny_model, tmp_path / "first", 0.5, config)  # version 1; stable -> 1, as shipped
    with start_model_server(
        tmp_path / "server", f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=0.2",
        "--file_system_poll_wait_seconds=0.2",
    ) as server:  # fmt: skip
        wait_for_versions(server.grpc_address, "productlens", {1: "AVAILABLE"})
        assert grpc_client(server.grpc_address, str(photo), "--label", "stable")[0] == "model productlens version 1"

        publish_blessed(tiny_model, tmp_path / "second", 0.9, config)  # another threshold: version 2, stable -> 2
        wait_for_versions(server.grpc_address, "productlens", {2: "AVAILABLE"})
        deadline = time.monotonic() + 30
        while served_for_label(server.grpc_address, "stable") != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        answer = grpc_client(server.grpc_address, str(photo), "--label", "stable", "--classify")
    assert answer[0] == "model productlens version 2" and answer[1].split()[0] == "keyboard"
