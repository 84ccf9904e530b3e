"""The ProductLens training pipeline as a KFP v2 pipeline: the same steps as `dvc.yaml`, on a cluster.

    python -m pipelines.training_pipeline                 # writes pipelines/training_pipeline.yaml (committed)
    python -m pipelines.training_pipeline --image-repository registry.example.com/team/productlens-components

Each step is a thin lightweight component that imports `pipelines.steps` inside its body and
runs the same `components.<step>` CLI as `dvc.yaml`; data moves between steps as KFP artefacts.
All steps run in the image built from `components/Dockerfile`. KFP fixes a component's
`base_image` at compile time: the compiled YAML names `<repository>:<version in pyproject.toml>`
(`--image-repository` / `PRODUCTLENS_IMAGE_REPOSITORY`, default DEFAULT_IMAGE_REPOSITORY, always
with its registry host so a cluster pulls it from there; `--image-tag`), and that reference is the
default of the `component_image` run parameter, which replaces the image of every step at run
time (`set_container_image`). It is the whole reference, `repository:tag`, not the tag alone:
the KFP driver resolves an image only when it is exactly one parameter, never a string built
around one.

The steps that read or write files outside their artefacts mount PersistentVolumeClaims
(kfp-kubernetes; VOLUMES says which step mounts which): train the ImageNet weights at /shared,
fetch-data the dataset folder at /data/productlens, gate (the champion) and publish (the new
version, and the `stable` label in the claim's models.config, which the model server reads) the model base at
/models, monitor the model server's prediction logs at /logs. The claim names are run parameters;
pipelines/k8s/pvcs.yaml creates claims with the default names.
"""

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from common.cli import run_main

PIPELINE_NAME = "productlens-training"
PIPELINE_YAML = Path(__file__).with_name("training_pipeline.yaml")
# Registry-qualified: an image name without a registry host is looked up on Docker Hub, where it is not.
DEFAULT_IMAGE_REPOSITORY = "ghcr.io/productlens/productlens-components"
DEFAULT_IMAGE_TAG = "0.1.0"  # == [project].version in pyproject.toml; tests/pipelines checks they agree
# Where a run reads dataset v1 when no data_location is given: a volume with images/ and catalog/.
DEFAULT_DATA_LOCATION = "/data/productlens"
DEFAULT_MODEL_BASE = "/models"  # TF Serving's model base path (a volume shared with the model server)


@dataclass(frozen=True)
class StepResources:
    """A step's Kubernetes CPU and memory requests and limits."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str


# Training is the only heavy step; it is sized for the 2-core budget the defaults were tuned on.
RESOURCES: dict[str, StepResources] = {
    "fetch-data": StepResources(cpu_request="500m", cpu_limit="1", memory_request="1Gi", memory_limit="2Gi"),
    "validate": StepResources(cpu_request="1", cpu_limit="2", memory_request="2Gi", memory_limit="4Gi"),
    "preprocess": StepResources(cpu_request="250m", cpu_limit="1", memory_request="512Mi", memory_limit="1Gi"),
    "train": StepResources(cpu_request="2", cpu_limit="4", memory_request="6Gi", memory_limit="12Gi"),
    "evaluate": StepResources(cpu_request="1", cpu_limit="2", memory_request="3Gi", memory_limit="6Gi"),
    "gate": StepResources(cpu_request="250m", cpu_limit="1", memory_request="512Mi", memory_limit="1Gi"),
    "export": StepResources(cpu_request="1", cpu_limit="2", memory_request="3Gi", memory_limit="6Gi"),
    # infra-validate holds the Keras model and a model-server process with the candidate.
    "infra-validate": StepResources(cpu_request="1", cpu_limit="2", memory_request="3Gi", memory_limit="6Gi"),
    "publish": StepResources(cpu_request="250m", cpu_limit="1", memory_request="512Mi", memory_limit="1Gi"),
    # monitor decodes every training photo (and every logged one) for its statistics; TensorFlow reads the answers.
    "monitor": StepResources(cpu_request="500m", cpu_limit="1", memory_request="1Gi", memory_limit="3Gi"),
}


@dataclass(frozen=True)
class Volume:
    """A PersistentVolumeClaim the steps in `steps` mount at `mount_path`; `parameter` is the run parameter
    naming the claim (default `default_claim`, as pipelines/k8s/pvcs.yaml creates it)."""

    parameter: str
    default_claim: str
    mount_path: str
    steps: tuple[str, ...]


# Only train reads the weights (params' `../shared/weights/...`, resolved from the image's /app); evaluate and
# export load the trained model.keras, which holds its own weights.
WEIGHTS_VOLUME = Volume("weights_pvc", "productlens-weights", "/shared", ("train",))
DATA_VOLUME = Volume("data_pvc", "productlens-data", DEFAULT_DATA_LOCATION, ("fetch-data",))
# The claim TF Serving reads (serving/k8s/pvc.yaml): gate reads the champion there, publish writes the new version.
MODELS_VOLUME = Volume("models_pvc", "productlens-models", DEFAULT_MODEL_BASE, ("gate", "publish"))
# The claim the model server writes its prediction logs to (serving/k8s/logs-pvc.yaml, deployment.yaml): monitor reads
# them there when a run's prediction_logs names a folder under it (CLUSTER_PREDICTION_LOGS). Mounted read-write: the
# PvcMount of kfp-kubernetes (2.17) has no read-only field; the step only reads.
LOGS_VOLUME = Volume("logs_pvc", "productlens-prediction-logs", "/logs", ("monitor",))
VOLUMES = (WEIGHTS_VOLUME, DATA_VOLUME, MODELS_VOLUME, LOGS_VOLUME)
# Where the model server's logs land on that claim (the logging_config in serving/k8s/models.config writes
# /logs/predictions/productlens-*.tfrecord): the prediction_logs of a cluster run that checks drift.
CLUSTER_PREDICTION_LOGS = LOGS_VOLUME.mount_path + "/predictions"

DATA_STEP_RETRIES = 3  # fetching data crosses the network (Git, DVC remote): retry with backoff


# --------------------------------------------------------------------------- components
# Lightweight components: their source is copied into the YAML and runs alone in the image, so
# every import of project code happens inside the body.


def fetch_data(
    data_location: str,
    data_revision: str,
    params_overrides: dict,
    data: Output[Dataset],
    params: Output[Artifact],
):
    """Materialise images/ + catalog/ and the run's params.yaml (committed params + overrides)."""
    from pipelines import steps

    steps.fetch_data(data_location, data_revision, params_overrides, data.path, params.path)


def validate(
    data: Input[Dataset],
    params: Input[Artifact],
    manifest: Output[Dataset],
    validate_metrics: Output[Metrics],
    data_docs: Output[HTML],
    validation_report: Output[Artifact],
):
    """Great Expectations gate on the images and catalog (python -m components.validate)."""
    from pipelines import steps

    steps.validate(data.path, params.path, manifest.path, validate_metrics, data_docs.path, validation_report.path)


def preprocess(
    data: Input[Dataset],
    manifest: Input[Dataset],
    params: Input[Artifact],
    splits: Output[Dataset],
    preprocess_metrics: Output[Metrics],
):
    """Content-hash train/val/test splits, reviewed labels applied (python -m components.preprocess)."""
    from pipelines import steps

    steps.preprocess(data.path, manifest.path, params.path, splits.path, preprocess_metrics)


def train(
    data: Input[Dataset],
    splits: Input[Dataset],
    params: Input[Artifact],
    model: Output[Model],
    train_metrics: Output[Metrics],
    training_history: Output[Artifact],
):
    """Fit the model train.architecture names (python -m components.train); per-epoch history via DVCLive."""
    from pipelines import steps

    steps.train(data.path, splits.path, params.path, model.path, train_metrics, training_history.path)
    model.metadata["framework"] = "keras"
    model.metadata["file"] = steps.MODEL_FILE


def evaluate(
    data: Input[Dataset],
    splits: Input[Dataset],
    model: Input[Model],
    params: Input[Artifact],
    evaluate_metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
    evaluation: Output[Artifact],
):
    """Score the model on the test split (python -m components.evaluate)."""
    from pipelines import steps

    steps.evaluate(data.path, splits.path, model.path, params.path, evaluate_metrics, confusion_matrix, evaluation.path)


def gate(
    evaluation: Input[Artifact],
    params: Input[Artifact],
    model_base: str,
    gate_decision: Output[Artifact],
    gate_metrics: Output[Metrics],
) -> bool:
    """Bless or refuse the candidate against the floors and the exported champion (python -m components.gate).
    Returns the decision (the task's `Output`), which the export step's dsl.If reads."""
    from pipelines import steps

    blessed = steps.gate(evaluation.path, params.path, model_base, gate_decision.path, gate_metrics)
    gate_decision.metadata["blessed"] = blessed
    return blessed


def export(
    model: Input[Model],
    splits: Input[Dataset],
    data: Input[Dataset],
    gate_decision: Input[Artifact],
    evaluation: Input[Artifact],
    params: Input[Artifact],
    candidate: Output[Model],
    export_metrics: Output[Metrics],
):
    """Build the serving candidate of the blessed model: SavedModel, warmup records, model card
    (python -m components.export). Nothing is published here."""
    from pipelines import steps

    steps.export(
        model.path, splits.path, data.path, gate_decision.path, evaluation.path, params.path, candidate.path,
        export_metrics,
    )  # fmt: skip
    candidate.metadata["format"] = "tf_saved_model"


def infra_validate(
    candidate: Input[Model],
    model: Input[Model],
    splits: Input[Dataset],
    data: Input[Dataset],
    params: Input[Artifact],
    blessing: Output[Artifact],
    infra_validate_metrics: Output[Metrics],
):
    """Serve the candidate in a real model-server process and compare it with the Keras model; fails unless
    it blesses the candidate (python -m components.infra_validate)."""
    from pipelines import steps

    steps.infra_validate(
        candidate.path, model.path, splits.path, data.path, params.path, blessing.path, infra_validate_metrics
    )
    blessing.metadata["blessed"] = True


def publish(
    candidate: Input[Model],
    gate_decision: Input[Artifact],
    blessing: Input[Artifact],
    data: Input[Dataset],
    model_base: str,
    publication: Output[Artifact],
):
    """Publish the blessed candidate as the next TF Serving version under model_base, unless the newest version
    already serves it (python -m components.publish)."""
    from pipelines import steps

    report = steps.publish(candidate.path, gate_decision.path, blessing.path, data.path, model_base, publication.path)
    publication.metadata.update({key: report[key] for key in ("published", "model_name", "version", "path")})


def monitor(
    data: Input[Dataset],
    splits: Input[Dataset],
    evaluation: Input[Artifact],
    params: Input[Artifact],
    prediction_logs: str,
    monitor_baseline: Output[Artifact],
    monitor_metrics: Output[Metrics],
    drift_report: Output[Markdown],
) -> bool:
    """Drift check of the prediction logs in the folder `prediction_logs` ("" = none yet) against this run's training
    data and evaluation (python -m components.monitor). Returns whether they drifted: drift is reported (metrics,
    report, Output), never a failed task, so it cannot stop the gate's branch."""
    from pipelines import steps

    drifted = steps.monitor(
        prediction_logs, splits.path, data.path, evaluation.path, params.path, monitor_baseline.path,
        monitor_metrics, drift_report.path,
    )  # fmt: skip
    drift_report.metadata["drift"] = drifted
    return drifted


COMPONENT_FUNCTIONS = (
    fetch_data, validate, preprocess, train, evaluate, gate, export, infra_validate, publish, monitor
)  # fmt: skip


# --------------------------------------------------------------------------- pipeline


def image_reference(repository: str, tag: str) -> str:
    return f"{repository}:{tag}"


def names_a_registry(repository: str) -> bool:
    """Whether an image repository starts with a registry host (`ghcr.io/...`, `localhost:5000/...`), the way
    Docker tells a host from a Docker Hub namespace: a first component with a dot or a port, or `localhost`."""
    host, slash, _ = repository.partition("/")
    return bool(slash) and ("." in host or ":" in host or host == "localhost")


def with_resources(task: dsl.PipelineTask, step: str) -> dsl.PipelineTask:
    resources = RESOURCES[step]
    return (
        task.set_cpu_request(resources.cpu_request)
        .set_cpu_limit(resources.cpu_limit)
        .set_memory_request(resources.memory_request)
        .set_memory_limit(resources.memory_limit)
    )


def create_pipeline(image_repository: str = DEFAULT_IMAGE_REPOSITORY, image_tag: str = DEFAULT_IMAGE_TAG):
    """Build the pipeline whose components default to `<image_repository>:<image_tag>`."""
    image = image_reference(image_repository, image_tag)
    ops = {f.__name__: dsl.component(f, base_image=image, install_kfp_package=False) for f in COMPONENT_FUNCTIONS}

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="validate -> preprocess -> train -> evaluate -> gate -> export -> infra_validate -> publish "
        "(the last three only when the gate blesses); monitor (the drift check of prediction_logs) beside the gate",
    )
    def training_pipeline(
        data_location: str = DEFAULT_DATA_LOCATION,
        data_revision: str = "",
        params_overrides: dict = {},  # noqa: B006 (a KFP parameter default, never mutated)
        component_image: str = image,
        model_base: str = DEFAULT_MODEL_BASE,
        weights_pvc: str = WEIGHTS_VOLUME.default_claim,
        data_pvc: str = DATA_VOLUME.default_claim,
        models_pvc: str = MODELS_VOLUME.default_claim,
        logs_pvc: str = LOGS_VOLUME.default_claim,
        prediction_logs: str = "",
    ):
        """data_location: folder with images/ + catalog/ (the data claim is mounted at the default), or a DVC
        repository (Git URL/path) read at data_revision. params_overrides: dotted params.yaml keys, e.g.
        {"train.epochs": 4}. component_image: the component image (registry/repository:tag) every step runs in.
        model_base: the serving base path gate reads the champion from and publish writes versions to (the
        models claim is mounted at the default). weights_pvc, data_pvc, models_pvc, logs_pvc: the claims mounted at
        /shared (train), /data/productlens (fetch-data), /models (gate, publish) and /logs (monitor).
        prediction_logs: a folder of the model server's prediction logs that the monitor step checks against this
        run's data ("" = none yet; on a cluster /logs/predictions, the logs claim's)."""
        claims = {"weights_pvc": weights_pvc, "data_pvc": data_pvc, "models_pvc": models_pvc, "logs_pvc": logs_pvc}

        def step(name: str, **inputs) -> dsl.PipelineTask:
            task = ops[name.replace("-", "_")](**inputs).set_display_name(name)
            task.set_container_image(component_image)
            for volume in VOLUMES:
                if name in volume.steps:
                    kubernetes.mount_pvc(task, pvc_name=claims[volume.parameter], mount_path=volume.mount_path)
            return with_resources(task, name)

        fetched = step(
            "fetch-data",
            data_location=data_location,
            data_revision=data_revision,
            params_overrides=params_overrides,
        ).set_retry(num_retries=DATA_STEP_RETRIES, backoff_duration="30s", backoff_factor=2.0)
        params = fetched.outputs["params"]
        validated = step("validate", data=fetched.outputs["data"], params=params)
        data = fetched.outputs["data"]
        splits = step("preprocess", data=data, manifest=validated.outputs["manifest"], params=params).outputs["splits"]
        trained = step("train", data=data, splits=splits, params=params)
        evaluated = step("evaluate", data=data, splits=splits, model=trained.outputs["model"], params=params)
        # The gate reads the champion exported under model_base: never reuse a cached decision.
        decided = step("gate", evaluation=evaluated.outputs["evaluation"], params=params, model_base=model_base)
        decided.set_caching_options(enable_caching=False)
        # Beside the gate: drift is the step's result, not a failure, and never holds up the gate's branch.
        monitored = step(
            "monitor",
            data=data,
            splits=splits,
            evaluation=evaluated.outputs["evaluation"],
            params=params,
            prediction_logs=prediction_logs,
        )
        monitored.set_caching_options(enable_caching=False)  # the logs change under the same folder name
        # The single return value (`Output`, not a named output): kfp.local resolves only that form in conditions.
        with dsl.If(decided.outputs["Output"] == True, name="gate-blessed"):  # noqa: E712 (a KFP condition, not Python)
            exported = step(
                "export",
                model=trained.outputs["model"],
                splits=splits,
                data=data,
                gate_decision=decided.outputs["gate_decision"],
                evaluation=evaluated.outputs["evaluation"],
                params=params,
            )
            validated_candidate = step(
                "infra-validate",
                candidate=exported.outputs["candidate"],
                model=trained.outputs["model"],
                splits=splits,
                data=data,
                params=params,
            )
            published = step(
                "publish",
                candidate=exported.outputs["candidate"],
                gate_decision=decided.outputs["gate_decision"],
                blessing=validated_candidate.outputs["blessing"],
                data=data,
                model_base=model_base,
            )
            published.set_caching_options(enable_caching=False)  # writes a new version under model_base

    return training_pipeline


def compile_pipeline(output: Path, image_repository: str, image_tag: str) -> Path:
    compiler.Compiler().compile(create_pipeline(image_repository, image_tag), str(output))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.training_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=PIPELINE_YAML)
    parser.add_argument(
        "--image-repository",
        default=os.environ.get("PRODUCTLENS_IMAGE_REPOSITORY", DEFAULT_IMAGE_REPOSITORY),
        help=f"registry and repository of the component image (components/Dockerfile); default "
        f"{DEFAULT_IMAGE_REPOSITORY}",
    )
    parser.add_argument("--image-tag", default=DEFAULT_IMAGE_TAG, help="tag of the default component_image")
    args = parser.parse_args(argv)
    if not names_a_registry(args.image_repository):
        parser.error(
            f"--image-repository {args.image_repository!r} names no registry: a cluster would look for it on "
            "Docker Hub; give the registry host, e.g. ghcr.io/<org>/productlens-components "
            "(docker.io/<org>/... for Docker Hub)"
        )
    path = compile_pipeline(args.output, args.image_repository, args.image_tag)
    print(f"compiled {PIPELINE_NAME} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
