"""Production manifests and local serving agree: same configs, same flags, same image TensorFlow version."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.config import load_batching_parameters, load_model_server_config, model_configs
from serving.server import parse_args

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "serving" / "k8s"


def pinned_tensorflow() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return text.split('"tensorflow==', 1)[1].split('"', 1)[0]


def deployment_container() -> dict:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_k8s_models_config_is_the_local_one_with_the_container_path() -> None:
    local = model_configs(load_model_server_config(ROOT / "serving" / "models.config"), ROOT)
    production = model_configs(load_model_server_config(K8S / "models.config"))
    assert [(m.name, m.policy, m.labels) for m in local] == [(m.name, m.policy, m.labels) for m in production]
    assert [str(m.base_path) for m in production] == ["/models/productlens"]
    assert [m.base_path for m in local] == [ROOT / "models" / "productlens"]


def test_k8s_batching_file_is_the_local_one() -> None:
    assert (K8S / "batching.config").read_text() == (ROOT / "serving" / "batching.config").read_text()
    options = load_batching_parameters(ROOT / "serving" / "batching.config")
    assert options.max_batch_size == 32


def test_official_image_is_pinned_to_the_tensorflow_that_exports_the_model() -> None:
    image = f"tensorflow/serving:{pinned_tensorflow()}"
    assert deployment_container()["image"] == image
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["model-server"]["image"] == image
    kserve = yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())
    assert kserve["spec"]["predictor"]["model"]["runtimeVersion"] == pinned_tensorflow()


def test_our_server_accepts_the_production_command_line() -> None:
    """`make serve` and the official image take the same flags and files."""
    for args in (
        deployment_container()["args"],
        yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["model-server"]["command"],
    ):
        parsed = parse_args(args)
        assert parsed.enable_batching
        assert (parsed.port, parsed.rest_api_port) == (8500, 8501)
        assert parsed.model_config_file == Path("/config/models.config")


def test_deployment_mounts_the_models_volume_and_the_config() -> None:
    container = deployment_container()
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"models": "/models", "config": "/config"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/models/productlens"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "./models:/models:ro" in compose["services"]["model-server"]["volumes"]
    assert compose["services"]["recommender"]["environment"]["PRODUCTLENS_MODEL_GRPC"] == "model-server:8500"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomization_renders_the_config_map_from_the_same_files() -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    documents = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered)}
    config_map = documents[("ConfigMap", "productlens-serving-config")]
    assert config_map["data"]["models.config"] == (K8S / "models.config").read_text()
    assert config_map["data"]["batching.config"] == (K8S / "batching.config").read_text()
    assert {("Deployment", "productlens-model-server"), ("Service", "productlens-model-server")} <= set(documents)
    assert ("PersistentVolumeClaim", "productlens-models") in documents
