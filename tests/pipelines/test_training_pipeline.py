"""The compiled KFP pipeline is current and has the shape a cluster run relies on."""

from __future__ import annotations

import posixpath
import re
import tomllib

import pytest
import yaml

from pipelines import training_pipeline
from pipelines.training_pipeline import DATA_VOLUME, MODELS_VOLUME, VOLUMES, WEIGHTS_VOLUME
from tests.conftest import REPO_ROOT

PVC_MANIFESTS = REPO_ROOT / "pipelines" / "k8s"


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
        if mounts:
            expected[executor] = mounts
    assert {"exec-train", "exec-fetch-data", "exec-gate", "exec-publish"} <= set(expected)
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


def test_the_models_claim_is_the_one_the_model_server_reads():
    serving_claim = yaml.safe_load((REPO_ROOT / "serving" / "k8s" / "pvc.yaml").read_text())
    assert serving_claim["metadata"]["name"] == MODELS_VOLUME.default_claim
    assert pipeline_claims()[MODELS_VOLUME.default_claim]["spec"] == serving_claim["spec"]


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
