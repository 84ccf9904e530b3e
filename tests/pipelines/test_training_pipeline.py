"""The compiled KFP pipeline is current and has the shape a cluster run relies on."""

from __future__ import annotations

import tomllib

import pytest
import yaml

from pipelines import training_pipeline
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> str:
    output = tmp_path_factory.mktemp("kfp") / "training_pipeline.yaml"
    training_pipeline.main(["--output", str(output)])
    return output.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def spec(compiled) -> dict:
    return yaml.safe_load(compiled)


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
    parameters = yaml.safe_load(output.read_text())["root"]["inputDefinitions"]["parameters"]
    assert (
        parameters["component_image"]["defaultValue"]
        == f"registry.example/productlens:{training_pipeline.DEFAULT_IMAGE_TAG}"
    )


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
