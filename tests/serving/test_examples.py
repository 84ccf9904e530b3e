"""The examples in serving/examples/ classify a photo against a running server, as the README shows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.model_server import ModelServerHandle

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "serving" / "examples"


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
