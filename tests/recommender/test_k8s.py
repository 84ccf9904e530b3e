"""recommender/k8s/: the manifests render, start the app with flags and settings it reads, reach the model server
the way serving/k8s/ exposes and admits it, keep the users' answers on shared storage, and probe paths the app
really answers."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from recommender import build_kb, kb
from recommender.app import create_app, parse_args
from recommender.routes import HEALTH_TIMEOUT_S
from recommender.service import STABLE_LABEL, ModelRouting
from recommender.settings import ENV_PREFIX, Settings, env_name
from serving.config import load_model_server_config, model_configs
from tests.conftest import REPO_ROOT
from tests.fixtures.catalog import write_catalog, write_params
from tests.fixtures.knowledge_base import free_port, serve_app
from tests.fixtures.model_server import MODEL_NAME, export_tiny, start_model_server, wait_for_versions

K8S = REPO_ROOT / "recommender" / "k8s"
SERVING_K8S = REPO_ROOT / "serving" / "k8s"
DB_SECRET = {"name": "productlens-db", "key": "url"}  # README: the Secret to create
# What the Secret's `url` holds on a cluster (a placeholder: no password is in the repository).
POSTGRES_URL = "postgresql+psycopg://productlens:placeholder@postgres:5432/productlens"
EXIT_SLACK_S = (
    4.0  # after the graceful-shutdown timeout the process exits within this (tests/recommender/test_app_process.py)
)
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text(encoding="utf-8")) if document]


def deployment() -> dict:
    (found,) = documents(K8S / "deployment.yaml")
    return found


def pod() -> dict:
    return deployment()["spec"]["template"]


def container() -> dict:
    (found,) = pod()["spec"]["containers"]
    return found


def env_values() -> dict[str, Any]:
    return {var["name"]: var.get("value", var.get("valueFrom")) for var in container()["env"]}


def container_port(name: str) -> int:
    return next(port["containerPort"] for port in container()["ports"] if port["name"] == name)


def app_args():
    command = [*container()["command"], *container()["args"]]
    assert command[:3] == ["python", "-m", "recommender.app"]
    return parse_args(command[3:])


def kustomize(folder: Path) -> dict[tuple[str, str], dict]:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered)}


def settings_from_manifest(monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Settings:
    """Settings as the pod's environment gives them (the Secret's URL: POSTGRES_URL), arguments over them."""
    for name in os.environ:
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for var in container()["env"]:
        if not var["name"].startswith(ENV_PREFIX):
            continue
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
        else:
            assert var["valueFrom"] == {"secretKeyRef": DB_SECRET}, var
            monkeypatch.setenv(var["name"], POSTGRES_URL)
    return Settings(**overrides)


def admitted(policy: dict, pod_labels: dict[str, str], port: int) -> bool:
    """Whether a NetworkPolicy's ingress rules let a pod of the same namespace with `pod_labels` reach `port`."""
    for rule in policy["spec"].get("ingress", []):
        ports = {entry["port"] for entry in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        for peer in rule.get("from", []):
            selector = peer.get("podSelector")
            if selector is None or "namespaceSelector" in peer or selector.get("matchExpressions"):
                continue
            if selector.get("matchLabels", {}).items() <= pod_labels.items():
                return True
    return False


# --------------------------------------------------------------------------- the manifests


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_the_manifests_render_a_deployment_its_service_and_the_feedback_claim_but_no_secret() -> None:
    rendered = kustomize(K8S)
    assert set(rendered) == {
        ("Deployment", "productlens-recommender"),
        ("Service", "productlens-recommender"),
        ("PersistentVolumeClaim", "productlens-feedback"),
    }
    template = rendered[("Deployment", "productlens-recommender")]["spec"]["template"]
    assert template["metadata"]["labels"]["productlens.io/model-client"] == "true"
    (rendered_container,) = template["spec"]["containers"]
    db_url = next(var for var in rendered_container["env"] if var["name"] == "PRODUCTLENS_DB_URL")
    assert db_url == {"name": "PRODUCTLENS_DB_URL", "valueFrom": {"secretKeyRef": DB_SECRET}}
    # The model server's NetworkPolicy admits pods of its own namespace: both go where `kubectl apply -k` puts them.
    served = kustomize(SERVING_K8S)
    assert {d["metadata"].get("namespace") for d in [*rendered.values(), *served.values()]} == {None}


def test_the_service_reaches_the_port_the_app_listens_on() -> None:
    (service,) = documents(K8S / "service.yaml")
    assert service["spec"]["selector"].items() <= pod()["metadata"]["labels"].items()
    assert deployment()["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8080 and container_port(port["targetPort"]) == 8080
    args = app_args()
    assert (args.host, args.port) == ("0.0.0.0", 8080)


def test_prometheus_scrapes_the_recommender_pods_metrics() -> None:
    """serving/k8s/monitoring/prometheus.yml keeps the pods by app.kubernetes.io/name and the port named http."""
    config = yaml.safe_load((SERVING_K8S / "monitoring" / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "productlens-recommender"]
    (keep,) = [rule for rule in job["relabel_configs"] if rule.get("action") == "keep"]
    assert keep["source_labels"] == [
        "__meta_kubernetes_pod_label_app_kubernetes_io_name",
        "__meta_kubernetes_pod_container_port_name",
    ]
    name = pod()["metadata"]["labels"]["app.kubernetes.io/name"]
    port_name = next(port["name"] for port in container()["ports"] if port["containerPort"] == app_args().port)
    assert f"{name};{port_name}" == keep["regex"]
    assert job["metrics_path"] == container()["livenessProbe"]["httpGet"]["path"] == "/metrics"


def test_the_app_runs_the_compose_command_and_shuts_down_before_kubernetes_kills_it() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["recommender"]
    assert container()["args"] == compose["command"][1:]
    grace_s = app_args().timeout_graceful_shutdown
    assert grace_s == 8
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert float(pre_stop[1]) + grace_s + EXIT_SLACK_S <= pod()["spec"]["terminationGracePeriodSeconds"]


def test_the_model_servers_network_policy_admits_the_recommender_and_only_for_its_label() -> None:
    (policy,) = documents(SERVING_K8S / "networkpolicy.yaml")
    labels = pod()["metadata"]["labels"]
    port = int(env_values()["PRODUCTLENS_MODEL_GRPC"].rsplit(":", 1)[1])
    assert admitted(policy, labels, port)
    unlabelled = {key: value for key, value in labels.items() if key != "productlens.io/model-client"}
    assert not admitted(policy, unlabelled, port)
    assert not admitted(policy, {**labels, "productlens.io/model-client": "false"}, port)
    for kustomization in (K8S / "kustomization.yaml", SERVING_K8S / "kustomization.yaml"):
        assert "namespace" not in yaml.safe_load(kustomization.read_text())


def test_the_model_server_address_is_its_service_name_and_grpc_port() -> None:
    host, port = env_values()["PRODUCTLENS_MODEL_GRPC"].rsplit(":", 1)
    services = {service["metadata"]["name"]: service for service in documents(SERVING_K8S / "service.yaml")}
    assert host == "productlens-model-server" and host in services
    grpc = next(p for p in services[host]["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["port"] == int(port) == 8500
    (served,) = model_configs(load_model_server_config(SERVING_K8S / "models.config"))
    assert env_values()["PRODUCTLENS_MODEL_NAME"] == served.name
    assert env_values()["PRODUCTLENS_MODEL_LABEL"] in served.labels


def test_the_environment_is_settings_the_app_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    known = {env_name(field) for field in Settings.model_fields}
    assert {name for name in env_values() if name.startswith(ENV_PREFIX)} <= known
    settings = settings_from_manifest(monkeypatch)
    assert settings.model_grpc == "productlens-model-server:8500"
    assert settings.db_url == POSTGRES_URL
    # The users' answers go to the knowledge base's PostgreSQL database, their photos to the mounted claim.
    assert settings.feedback_database_url() == POSTGRES_URL
    mounts = {mount["mountPath"]: mount["name"] for mount in container()["volumeMounts"]}
    assert mounts[str(settings.feedback_dir)] == "feedback"
    # No canary by default: every model call asks for `stable`, not for the newest version (which a canary is).
    assert settings.canary_share == 0
    routing = ModelRouting.from_settings(settings)
    assert {routing.choose() for _ in range(1000)} == {STABLE_LABEL}


def test_the_feedback_store_is_a_claim_every_replica_can_write() -> None:
    volumes = {volume["name"]: volume for volume in pod()["spec"]["volumes"]}
    claim = volumes["feedback"]["persistentVolumeClaim"]["claimName"]
    (pvc,) = documents(K8S / "feedback-pvc.yaml")
    assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "feedback-pvc.yaml" in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert deployment()["spec"]["replicas"] > 1
    # The same path as docker-compose's named volume, where the image creates the folder for its user (10001),
    # whom the claim is given to (fsGroup).
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["recommender"]
    assert env_values()["PRODUCTLENS_FEEDBACK_DIR"] == compose["environment"]["PRODUCTLENS_FEEDBACK_DIR"]
    assert "feedback:/app/feedback" in compose["volumes"]
    assert "USER 10001:10001" in (REPO_ROOT / "components" / "Dockerfile").read_text()
    assert pod()["spec"]["securityContext"]["fsGroup"] == 10001
    # The root filesystem is read-only; uploads spool to /tmp, which is a volume.
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    assert {mount["mountPath"]: mount["name"] for mount in container()["volumeMounts"]}["/tmp"] in volumes


# --------------------------------------------------------------------------- the probes on a real app


@pytest.fixture(scope="module")
def small_kb(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The small test catalog's knowledge base (the cluster's is PostgreSQL: the probes do not care)."""
    root = tmp_path_factory.mktemp("k8s_kb")
    params = write_params(root / "params.yaml", REPO_ROOT / "params.yaml")
    db = root / "productlens.db"
    args = ["--catalog", str(write_catalog(root / "catalog")), "--params", str(params), "--output", str(db)]
    assert build_kb.main([*args, "--metrics", str(root / "build_kb.json")]) == 0
    return kb.sqlite_url(db), params


@pytest.fixture(scope="module")
def production_model_server(tmp_path_factory: pytest.TempPathFactory, tiny_model) -> Iterator[str]:
    """Our model server on serving/k8s/models.config (version 1 labelled stable), the base path moved to a temp dir."""
    root = tmp_path_factory.mktemp("k8s_model_server")
    version = export_tiny(tiny_model, root / "models")
    assert version.name == "1"
    config = root / "models.config"
    text = (SERVING_K8S / "models.config").read_text()
    config.write_text(text.replace('"/models/productlens"', f'"{root / "models" / MODEL_NAME}"'))
    with start_model_server(root / "server", f"--model_config_file={config}") as server:
        wait_for_versions(server.grpc_address, MODEL_NAME, {1: "AVAILABLE"})
        yield server.grpc_address


def probe_statuses(url: str) -> dict[str, int]:
    statuses = {}
    for name in PROBES:
        probe = container()[name]["httpGet"]
        assert container_port(probe["port"]) == app_args().port and probe.get("scheme", "HTTP") == "HTTP"
        statuses[name] = requests.get(
            f"{url}{probe['path']}", timeout=container()[name].get("timeoutSeconds", 1)
        ).status_code
    return statuses


@pytest.mark.e2e
def test_without_a_model_server_replicas_stay_ready_and_alive_and_answer_its_outage_themselves(
    monkeypatch: pytest.MonkeyPatch, small_kb: tuple[str, Path], tmp_path: Path
) -> None:
    """A model-server outage is every replica's: readiness must not take them all out of the Service (users would
    get connection errors, not the app's 503 that names the outage, and product search would stop too)."""
    db_url, params = small_kb
    settings = settings_from_manifest(
        monkeypatch, db_url=db_url, params_path=params, feedback_dir=tmp_path, model_grpc=f"127.0.0.1:{free_port()}"
    )
    with serve_app(create_app(settings)) as url:
        assert probe_statuses(url) == {"startupProbe": 200, "readinessProbe": 200, "livenessProbe": 200}
        assert requests.get(f"{url}/healthz", timeout=HEALTH_TIMEOUT_S + 3).status_code == 503
        assert requests.get(f"{url}/v1/products", timeout=10).status_code == 200


@pytest.mark.e2e
def test_a_replica_whose_knowledge_base_does_not_answer_is_not_ready(
    monkeypatch: pytest.MonkeyPatch, small_kb: tuple[str, Path], tmp_path: Path
) -> None:
    _, params = small_kb
    missing = f"sqlite:///{tmp_path / 'no-such-folder' / 'productlens.db'}"
    settings = settings_from_manifest(
        monkeypatch, db_url=missing, params_path=params, feedback_dir=tmp_path, model_grpc=f"127.0.0.1:{free_port()}"
    )
    with serve_app(create_app(settings)) as url:
        statuses = probe_statuses(url)
    assert statuses == {"startupProbe": 200, "readinessProbe": 503, "livenessProbe": 200}


@pytest.mark.e2e
def test_every_probe_answers_200_once_the_stable_model_is_served(
    monkeypatch: pytest.MonkeyPatch, small_kb: tuple[str, Path], production_model_server: str, tmp_path: Path
) -> None:
    db_url, params = small_kb
    settings = settings_from_manifest(
        monkeypatch, db_url=db_url, params_path=params, feedback_dir=tmp_path, model_grpc=production_model_server
    )
    assert settings.model_label == STABLE_LABEL
    with serve_app(create_app(settings)) as url:
        assert probe_statuses(url) == {"startupProbe": 200, "readinessProbe": 200, "livenessProbe": 200}
