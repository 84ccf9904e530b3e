"""The compiled KFP pipeline is current and has the shape a cluster run relies on."""

from __future__ import annotations

import posixpath
import re
import tomllib

import pytest
import yaml

from pipelines import steps, training_pipeline
from pipelines.training_pipeline import (
    CLUSTER_PREDICTION_LOGS,
    DATA_VOLUME,
    LOGS_VOLUME,
    MODELS_VOLUME,
    VOLUMES,
    WEIGHTS_VOLUME,
)
from serving.config import load_model_server_config, model_configs
from tests.conftest import REPO_ROOT

PVC_MANIFESTS = REPO_ROOT / "pipelines" / "k8s"
SERVING_K8S = REPO_ROOT / "serving" / "k8s"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> str:
    output = tmp_path_factory.mktemp("kfp") / "training_pipeline.yaml"
    training_pipeline.main(["--output", str(output)])
    return output.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def documents(compiled) -> list[dict]:
    return list(yaml.safe_load_all(compiled))


@pytest.fixture(scope="module")
def spec(documents) -> dict:
    """The pipeline spec: the first document (the second is the Kubernetes platform spec)."""
    return documents[0]


@pytest.fixture(scope="module")
def pvc_mounts(documents) -> dict[str, dict[str, str]]:
    """{executor: {mount path: the run parameter naming the claim}} from the compiled Kubernetes platform spec."""
    (platform,) = [document for document in documents[1:] if "platforms" in document]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {
        executor: {
            mount["mountPath"]: mount["pvcNameParameter"]["componentInputParameter"].removeprefix("pipelinechannel--")
            for mount in config.get("pvcMount", [])
        }
        for executor, config in executors.items()
    }


def test_committed_pipeline_yaml_is_current(compiled):
    committed = training_pipeline.PIPELINE_YAML.read_text(encoding="utf-8")
    assert committed == compiled, "pipelines/training_pipeline.yaml is stale: run `make compile` and commit it"


def test_default_image_tag_is_the_project_version():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert training_pipeline.DEFAULT_IMAGE_TAG == project["version"]


def test_pipeline_parameters_cover_data_params_and_image(spec):
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {"data_location", "data_revision", "params_overrides", "component_image"} <= set(parameters)


def test_every_step_runs_in_the_component_image_with_resources(spec):
    executors = spec["deploymentSpec"]["executors"]
    assert executors
    for name, executor in executors.items():
        container = executor["container"]
        # The whole image is the run parameter: the KFP driver resolves nothing else in an image.
        assert container["image"] == "{{$.inputs.parameters['pipelinechannel--component_image']}}", name
        resources = container["resources"]
        for key in ("cpuRequest", "cpuLimit", "memoryRequest", "memoryLimit"):
            assert key in resources, f"{name} has no {key}"
        assert "pip install" not in " ".join(container["command"]), f"{name} installs packages at run time"


def all_tasks(spec: dict) -> dict[str, dict]:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_data_step_retries(spec):
    assert all_tasks(spec)["fetch-data"]["retryPolicy"]["maxRetryCount"] == training_pipeline.DATA_STEP_RETRIES


def test_steps_pass_kfp_artefacts(compiled):
    for schema in ("system.Dataset", "system.Metrics", "system.HTML"):
        assert schema in compiled


def test_compile_writes_the_requested_image_repository(tmp_path):
    output = tmp_path / "pipeline.yaml"
    training_pipeline.main(["--output", str(output), "--image-repository", "registry.example/productlens"])
    parameters = next(yaml.safe_load_all(output.read_text()))["root"]["inputDefinitions"]["parameters"]
    assert (
        parameters["component_image"]["defaultValue"]
        == f"registry.example/productlens:{training_pipeline.DEFAULT_IMAGE_TAG}"
    )


def test_default_component_image_names_its_registry(spec):
    image = spec["root"]["inputDefinitions"]["parameters"]["component_image"]["defaultValue"]
    host = image.split("/")[0]
    assert "/" in image and "." in host, f"{image} names no registry: a cluster would look for it on Docker Hub"


@pytest.mark.parametrize("repository", ["productlens-components", "team/productlens-components"])
def test_compile_refuses_an_image_repository_without_a_registry(tmp_path, capsys, repository):
    with pytest.raises(SystemExit) as exit_info:
        training_pipeline.main(["--output", str(tmp_path / "pipeline.yaml"), "--image-repository", repository])
    assert exit_info.value.code == 2
    assert "names no registry" in capsys.readouterr().err
    assert not (tmp_path / "pipeline.yaml").exists()


def pipeline_claims() -> dict[str, dict]:
    return {claim["metadata"]["name"]: claim for claim in yaml.safe_load_all((PVC_MANIFESTS / "pvcs.yaml").read_text())}


def step_executors(spec: dict) -> dict[str, str]:
    """{step: its executor} for every task that runs a container (not the dsl.If branch, a DAG)."""
    components = spec["components"]
    return {
        name: components[task["componentRef"]["name"]]["executorLabel"]
        for name, task in all_tasks(spec).items()
        if "executorLabel" in components[task["componentRef"]["name"]]
    }


def run_parameters_fed_to(task: dict) -> set[str]:
    parameters = task.get("inputs", {}).get("parameters", {}).values()
    return {value.get("componentInputParameter", "").removeprefix("pipelinechannel--") for value in parameters}


def steps_reading_the_weights() -> set[str]:
    """The KFP steps whose dvc.yaml stage lists train.mobilenet_v2 (the weights file and its sha256) as a param."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name.replace("_", "-") for name, stage in stages.items() if "train.mobilenet_v2" in stage.get("params", [])}


def test_every_step_that_reads_or_writes_files_mounts_their_claim_and_no_other(spec, pvc_mounts):
    tasks = all_tasks(spec)
    expected: dict[str, dict[str, str]] = {}
    for name, executor in step_executors(spec).items():
        fed = run_parameters_fed_to(tasks[name])
        mounts = {}
        if name in steps_reading_the_weights():
            mounts[WEIGHTS_VOLUME.mount_path] = WEIGHTS_VOLUME.parameter
        if "data_location" in fed:  # fetch-data copies the dataset folder there
            mounts[DATA_VOLUME.mount_path] = DATA_VOLUME.parameter
        if "model_base" in fed:  # gate reads the champion, publish writes the new version
            mounts[MODELS_VOLUME.mount_path] = MODELS_VOLUME.parameter
        if "prediction_logs" in fed:  # monitor reads the model server's prediction logs
            mounts[LOGS_VOLUME.mount_path] = LOGS_VOLUME.parameter
        if mounts:
            expected[executor] = mounts
    assert {"exec-train", "exec-fetch-data", "exec-gate", "exec-publish", "exec-monitor"} <= set(expected)
    assert pvc_mounts == expected


def test_claim_names_are_run_parameters_defaulting_to_the_manifest_claims(spec):
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    defaults = [parameters[volume.parameter]["defaultValue"] for volume in VOLUMES]
    assert sorted(defaults) == sorted(pipeline_claims())


def test_mounts_are_where_the_steps_look(spec):
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["data_location"]["defaultValue"] == DATA_VOLUME.mount_path
    assert parameters["model_base"]["defaultValue"] == MODELS_VOLUME.mount_path
    # params' weights path is relative: the image's working directory decides where it lands.
    dockerfile = (REPO_ROOT / "components" / "Dockerfile").read_text(encoding="utf-8")
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", dockerfile, re.M)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    weights = posixpath.normpath(posixpath.join(workdir, params["train"]["mobilenet_v2"]["weights"]))
    assert weights.startswith(WEIGHTS_VOLUME.mount_path + "/"), weights


def model_server_pod() -> dict:
    return yaml.safe_load((SERVING_K8S / "deployment.yaml").read_text())["spec"]["template"]["spec"]


def model_server_mounts() -> dict[str, str]:
    """{mount path: claim} of the model server's container (serving/k8s/deployment.yaml)."""
    pod = model_server_pod()
    volumes = [volume for volume in pod["volumes"] if "persistentVolumeClaim" in volume]
    claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in volumes}
    (container,) = pod["containers"]
    return {m["mountPath"]: claims[m["name"]] for m in container["volumeMounts"] if m["name"] in claims}


@pytest.mark.parametrize(
    ("manifest", "volume"), [("pvc.yaml", MODELS_VOLUME), ("logs-pvc.yaml", LOGS_VOLUME)], ids=["models", "logs"]
)
def test_the_models_and_logs_claims_are_the_ones_the_model_server_mounts(manifest, volume):
    serving_claim = yaml.safe_load((SERVING_K8S / manifest).read_text())
    assert serving_claim["metadata"]["name"] == volume.default_claim
    assert pipeline_claims()[volume.default_claim]["spec"] == serving_claim["spec"]
    assert manifest in yaml.safe_load((SERVING_K8S / "kustomization.yaml").read_text())["resources"]
    assert model_server_mounts()[volume.mount_path] == volume.default_claim


def test_the_model_server_reads_the_models_config_publish_labels_on_the_models_claim():
    (container,) = model_server_pod()["containers"]
    config_file = posixpath.join(MODELS_VOLUME.mount_path, steps.MODELS_CONFIG_FILE)
    assert f"--model_config_file={config_file}" in container["args"]
    # The seed the volume loader copies and the first publish writes is the repository's copy, with the server's path.
    assert steps.SEED_MODELS_CONFIG == SERVING_K8S / "models.config"
    (model,) = model_configs(load_model_server_config(steps.SEED_MODELS_CONFIG))
    assert str(model.base_path).startswith(MODELS_VOLUME.mount_path + "/")


def documented_logging_config(text: str) -> str:
    """serving/k8s/models.config with its commented-out logging_config block switched on."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   logging_config {"))
    end = next(i for i in range(start, len(lines)) if lines[i] == "#   }")
    block = "\n".join(line.removeprefix("#") for line in lines[start : end + 1])
    return text.replace('    model_platform: "tensorflow"\n', f'    model_platform: "tensorflow"\n{block}\n', 1)


def test_the_documented_prediction_logging_writes_where_a_cluster_run_reads(tmp_path):
    config = tmp_path / "models.config"
    config.write_text(documented_logging_config((SERVING_K8S / "models.config").read_text()))
    (model,) = model_configs(load_model_server_config(config))
    assert model.logging is not None
    assert posixpath.dirname(model.logging.filename_prefix) == CLUSTER_PREDICTION_LOGS
    # The server writes under its logs mount; the monitor step mounts the same claim at the same path.
    assert CLUSTER_PREDICTION_LOGS.startswith(LOGS_VOLUME.mount_path + "/")
    assert model_server_mounts()[LOGS_VOLUME.mount_path] == LOGS_VOLUME.default_claim
    assert LOGS_VOLUME.steps == ("monitor",)


def test_volume_loader_mounts_each_claim_where_the_steps_do():
    pod = yaml.safe_load((PVC_MANIFESTS / "volume-loader.yaml").read_text())
    claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in pod["spec"]["volumes"]}
    (container,) = pod["spec"]["containers"]
    mounted = {mount["mountPath"]: claims[mount["name"]] for mount in container["volumeMounts"]}
    assert mounted == {volume.mount_path: volume.default_claim for volume in VOLUMES}


def test_export_infra_validate_and_publish_run_only_when_the_gate_blesses(spec):
    root_tasks = spec["root"]["dag"]["tasks"]
    assert not {"export", "infra-validate", "publish"} & set(root_tasks)
    (branch,) = [task for task in root_tasks.values() if "triggerPolicy" in task]
    assert branch["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    tasks = spec["components"][branch["componentRef"]["name"]]["dag"]["tasks"]
    assert set(tasks) == {"export", "infra-validate", "publish"}
    # publish takes the candidate only through infra validation's blessing, so it runs after it.
    assert "infra-validate" in tasks["publish"]["dependentTasks"]
    assert tasks["publish"]["inputs"]["artifacts"]["blessing"]["taskOutputArtifact"]["producerTask"] == "infra-validate"
    assert tasks["infra-validate"]["inputs"]["artifacts"]["candidate"]["taskOutputArtifact"]["producerTask"] == "export"


def test_only_publish_gets_the_model_base_to_write(spec):
    tasks = all_tasks(spec)
    readers = {name for name, task in tasks.items() if "model_base" in task.get("inputs", {}).get("parameters", {})}
    assert readers == {"gate", "publish"}  # the gate reads the champion there; publish writes the new version


def test_steps_that_read_or_write_the_model_base_are_never_cached(spec):
    tasks = all_tasks(spec)
    for name in ("gate", "publish"):
        assert tasks[name]["cachingOptions"].get("enableCache", False) is False, name
