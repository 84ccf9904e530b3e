"""Production manifests and local serving agree: same configs, same flags, same image TensorFlow version."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serving.config import load_batching_parameters, load_model_server_config, model_configs
from serving.server import LOOPBACK, parse_args

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


def test_k8s_serves_metrics_with_the_local_monitoring_config() -> None:
    assert (K8S / "monitoring.config").read_text() == (ROOT / "serving" / "monitoring.config").read_text()
    deployment = (K8S / "deployment.yaml").read_text()
    assert "--monitoring_config_file=/config/monitoring.config" in deployment
    assert "monitoring.config" in (K8S / "kustomization.yaml").read_text()


def test_official_image_is_pinned_to_the_tensorflow_that_exports_the_model() -> None:
    image = f"tensorflow/serving:{pinned_tensorflow()}"
    assert deployment_container()["image"] == image
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["model-server"]["image"] == image
    kserve = yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())
    assert kserve["spec"]["predictor"]["model"]["runtimeVersion"] == pinned_tensorflow()


def test_our_server_accepts_the_production_command_line() -> None:
    """`make serve` and the official image take the same flags and files."""
    for args, config_file in (
        # On Kubernetes the config is on the models volume, where the KFP publish step moves its labels.
        (deployment_container()["args"], "/models/models.config"),
        (yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["model-server"]["command"], None),
    ):
        parsed = parse_args(args)
        assert parsed.enable_batching
        assert (parsed.port, parsed.rest_api_port) == (8500, 8501)
        assert parsed.model_config_file == Path(config_file or "/config/models.config")


# tensorflow_model_server's flags (model_servers/main.cc, 2.x) that these manifests may use. Its parser passes an
# unknown flag through with a usage dump and ignores it, so a flag of ours (--host, --reload_config_rpc) there
# would look like a setting while changing nothing.
TENSORFLOW_MODEL_SERVER_FLAGS = {
    "port", "grpc_socket_path", "rest_api_port", "rest_api_num_threads", "rest_api_timeout_in_ms", "enable_batching",
    "allow_version_labels_for_unavailable_models", "batching_parameters_file", "model_config_file",
    "model_config_file_poll_wait_seconds", "model_name", "model_base_path", "max_num_load_retries",
    "load_retry_interval_micros", "file_system_poll_wait_seconds", "flush_filesystem_caches",
    "tensorflow_session_parallelism", "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism",
    "ssl_config_file", "platform_config_file", "saved_model_tags", "grpc_channel_arguments", "grpc_max_threads",
    "enable_model_warmup", "monitoring_config_file",
}  # fmt: skip


def test_the_official_image_gets_only_its_own_flags() -> None:
    kserve = yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())
    for args in (
        deployment_container()["args"],
        yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["model-server"]["command"],
        kserve["spec"]["predictor"]["model"]["args"],
    ):
        assert {arg.removeprefix("--").split("=")[0] for arg in args} <= TENSORFLOW_MODEL_SERVER_FLAGS


def test_our_shutdown_grace_period_ends_before_kubernetes_kills_the_pod() -> None:
    pod = yaml.safe_load((K8S / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    grace_s = parse_args(["--model_base_path=/models/productlens"]).shutdown_grace_seconds
    assert grace_s + 5 <= pod["terminationGracePeriodSeconds"]  # 5 s for the process to exit after the drain


def test_only_labelled_clients_reach_the_model_server_in_kubernetes() -> None:
    """tensorflow_model_server serves HandleReloadConfigRequest to anyone who reaches it: the pod network decides."""
    policy = yaml.safe_load((K8S / "networkpolicy.yaml").read_text())
    assert "networkpolicy.yaml" in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    pods = yaml.safe_load((K8S / "deployment.yaml").read_text())["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pods.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"productlens.io/model-client": "true"}}}]
    assert sorted(port["port"] for port in rule["ports"]) == [8500, 8501]


def test_docker_compose_publishes_the_model_server_on_the_hosts_loopback_by_default() -> None:
    ports = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["model-server"]["ports"]
    defaulted = [re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", port) for port in ports]  # compose's ${VAR:-default}
    assert defaulted == [f"{LOOPBACK}:8500:8500", f"{LOOPBACK}:8501:8501"]


def test_deployment_mounts_the_models_volume_and_the_config() -> None:
    container = deployment_container()
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"models": "/models", "config": "/config", "prediction-logs": "/logs"}
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
    # models.config is read from the models volume (publish moves its labels there), not from the ConfigMap.
    assert "models.config" not in config_map["data"]
    assert config_map["data"]["batching.config"] == (K8S / "batching.config").read_text()
    assert {("Deployment", "productlens-model-server"), ("Service", "productlens-model-server")} <= set(documents)
    assert ("PersistentVolumeClaim", "productlens-models") in documents
    assert ("PersistentVolumeClaim", "productlens-prediction-logs") in documents
