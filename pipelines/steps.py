"""What each KFP step does, in plain Python: run the step's CLI on KFP artefact paths.

Every step calls the same `components.<step>.main(argv)` that `dvc.yaml` runs as
`python -m components.<step>`, so there is one implementation; this module only maps KFP
artefacts to the CLI's explicit paths and copies the numbers the CLI wrote into the step's
KFP `Metrics` / `ClassificationMetrics` / `HTML` artefacts. The KFP components in
`pipelines/training_pipeline.py` are one-line wrappers around these functions (imported inside
the component body, because a lightweight component's source runs alone in its container).
"""

from __future__ import annotations

import contextlib
import copy
import html
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from common.io import atomic_write_text, read_json

log = logging.getLogger("pipelines.steps")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = PROJECT_ROOT / "params.yaml"
DATA_PARTS = ("images", "catalog")
MODEL_FILE = "model.keras"
EVALUATE_METRICS = "evaluate.json"
EVALUATE_REPORT = "report.json"  # the whole evaluation: what the gate judges and export puts in the card
DATA_DVC_FILE = "data.dvc"  # the dataset's .dvc file, kept beside images/ when fetched from a DVC repository
REVIEWS_FILE = "labels/reviews.csv"  # reviewed labels: versioned in git beside data.dvc, fetched with the data
# TF Serving's config on the models volume (serving/k8s/deployment.yaml: --model_config_file=/models/models.config),
# seeded from the repository's copy (in the image at /app/serving/k8s/models.config) when a volume has none.
MODELS_CONFIG_FILE = "models.config"
SEED_MODELS_CONFIG = PROJECT_ROOT / "serving" / "k8s" / "models.config"


class StepFailed(RuntimeError):
    """A component CLI exited non-zero; the KFP task fails with this message."""


# --------------------------------------------------------------------------- params


def apply_overrides(params: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `params` with dotted keys replaced (`{"train.epochs": 1}`, like `dvc exp run -S`).

    A key that does not exist in `params` is an error, so a typo fails the run instead of being ignored.
    """
    merged = copy.deepcopy(params)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node: Any = merged
        for depth, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"params override {dotted!r}: no section {'.'.join(parents[: depth + 1])!r}")
            node = node[part]
        if not isinstance(node, dict) or leaf not in node:
            raise KeyError(f"params override {dotted!r}: no such key in params.yaml")
        node[leaf] = override_value(node[leaf], value)
    return merged


def override_value(current: Any, value: Any) -> Any:
    """`value` in the type of the value it replaces where that is lossless: KFP passes every number of a
    dict parameter as a float (protobuf Struct), so `{"train.epochs": 2}` arrives as 2.0."""
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def write_params(base: Path, overrides: Mapping[str, Any], output: Path) -> dict[str, Any]:
    """Write `base` params with `overrides` applied to `output`; returns the merged params."""
    params = apply_overrides(yaml.safe_load(base.read_text(encoding="utf-8")) or {}, overrides)
    atomic_write_text(output, yaml.safe_dump(params, sort_keys=False))
    return params


# --------------------------------------------------------------------------- data


def is_data_folder(location: str) -> bool:
    return all((Path(location) / part).is_dir() for part in DATA_PARTS)


def fetch_data(data_location: str, data_revision: str, params_overrides: Mapping[str, Any], data_dir: Path,
               params_path: Path) -> None:  # fmt: skip
    """Materialise the dataset (images/ + catalog/) in `data_dir` and the run's params.yaml in `params_path`.

    `data_location` is either a folder holding images/ and catalog/ (a mounted volume; the params
    are the image's committed params.yaml), or a DVC repository (Git URL or path) read at
    `data_revision` with `dvc get`: that revision's `data/` and its `params.yaml`, so data and
    params come from the same commit. `params_overrides` are applied on top in both cases.
    """
    data_dir = Path(data_dir)
    if is_data_folder(data_location):
        if data_revision:
            raise ValueError(f"{data_location} is a data folder, not a DVC repository: data_revision must be empty")
        for part in DATA_PARTS:
            shutil.copytree(Path(data_location) / part, data_dir / part)
        reviews = Path(data_location) / REVIEWS_FILE  # a data folder carries the reviews of its own images
        if reviews.exists():
            (data_dir / REVIEWS_FILE).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(reviews, data_dir / REVIEWS_FILE)
        write_params(DEFAULT_PARAMS, params_overrides, params_path)
        log.info("data: folder %s", data_location)
        return
    revision = ["--rev", data_revision] if data_revision else []
    run_cli([sys.executable, "-m", "dvc", "get", data_location, "data", "-o", str(data_dir), *revision])
    with tempfile.TemporaryDirectory(prefix="fetch-") as scratch:
        base_params = Path(scratch) / "params.yaml"
        run_cli([sys.executable, "-m", "dvc", "get", data_location, "params.yaml", "-o", str(base_params), *revision])
        write_params(base_params, params_overrides, params_path)
    # Revisions from before the label review have no reviews file: their folder labels are used as they are.
    listing = subprocess.run(
        [sys.executable, "-m", "dvc", "ls", data_location, str(Path(REVIEWS_FILE).parent), *revision],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if listing.returncode == 0 and Path(REVIEWS_FILE).name in listing.stdout.split():
        run_cli([sys.executable, "-m", "dvc", "get", data_location, REVIEWS_FILE, "-o", str(data_dir / REVIEWS_FILE),
                 *revision])  # fmt: skip
    else:
        log.info("no %s at %s: the folder labels are used as they are", REVIEWS_FILE, data_revision or "HEAD")
    # data.dvc pins the dataset's md5: publish records it in the published model card.
    run_cli([sys.executable, "-m", "dvc", "get", data_location, DATA_DVC_FILE, "-o", str(data_dir / DATA_DVC_FILE),
             *revision])  # fmt: skip
    log.info("data: DVC repository %s at %s", data_location, data_revision or "its default branch")


def run_cli(command: list[str]) -> None:
    """Run an external command (dvc), failing the step with its output when it fails."""
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise StepFailed(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")


# --------------------------------------------------------------------------- KFP artefacts


def run_step(main: Callable[[list[str]], int], argv: list[str]) -> None:
    """Run a component CLI in-process; a non-zero exit fails the KFP task."""
    log.info("running %s %s", main.__module__, " ".join(argv))
    code = main(argv)
    if code:
        raise StepFailed(f"python -m {main.__module__} exited with {code}")


def numeric_items(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Flatten nested metrics to (dotted name, number) pairs; KFP `Metrics` holds scalars only."""
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            yield name, float(value)
        elif isinstance(value, int | float):
            yield name, float(value)
        elif isinstance(value, Mapping):
            yield from numeric_items(value, f"{name}.")


def log_metrics_file(artifact: Any, metrics_path: Path) -> dict[str, Any]:
    """Copy every number of a step's metrics JSON into its KFP `Metrics` artefact; returns the JSON."""
    metrics = read_json(metrics_path)
    for name, value in numeric_items(metrics):
        artifact.log_metric(name, value)
    return metrics


# Fills each Data Docs frame's slots (components.validate.asset_slots) with blob: URLs of the site's static files,
# which the page carries once, in JSON: no network, and one copy of each script and stylesheet, not one per frame.
FILL_ASSET_SLOTS = """
const assets = JSON.parse(document.getElementById("data-docs-assets").textContent);
const urls = {};
for (const [name, asset] of Object.entries(assets)) {
  const body = "base64" in asset ? Uint8Array.from(atob(asset.base64), c => c.charCodeAt(0)) : asset.text;
  urls[name] = URL.createObjectURL(new Blob([body], {type: asset.type}));
}
for (const frame of document.querySelectorAll("iframe[data-docs-page]")) {
  frame.srcdoc = frame.srcdoc.replace(/data-asset-(src|href)="([^"]+)"/g, (_, attribute, name) =>
    `${attribute}="${urls[name]}"`);
}
"""


def data_docs_page(data_docs: Path, metrics: Mapping[str, Any]) -> str:
    """One self-contained HTML page for KFP's `HTML` artefact: the outcome of each expectation, then
    every Great Expectations validation page of the Data Docs site inlined (KFP shows one file, not a site).

    The pages' scripts, stylesheets and images (the site's static files, vendored) are carried once and filled
    in by a script, so the page needs no network; without scripts the tables still show, unstyled."""
    from components.validate import asset_slots, site_asset

    rows = "\n".join(
        f"<tr><td>{html.escape(e['table'])}</td><td>{html.escape(e['fails_when'])}</td>"
        f"<td>{'passed' if e['success'] else 'FAILED'}</td><td>{e['unexpected_count']}</td></tr>"
        for e in metrics.get("expectations", [])
    )
    pages, names = [], set()
    for page in sorted((data_docs / "validations").rglob("*.html")):
        suite = page.relative_to(data_docs / "validations").parts[0]
        page_html, page_names = asset_slots(page, data_docs)
        names |= page_names
        pages.append(
            f"<details><summary>{html.escape(suite)}</summary><iframe data-docs-page "
            f'style="width:100%;height:600px;border:0" srcdoc="{html.escape(page_html)}"></iframe></details>'
        )
    assets = {name: site_asset(data_docs, name) for name in sorted(names)}
    # "<" escaped: no "</script>" or "<!--" inside the JSON can end its script element early.
    assets_json = json.dumps(assets).replace("<", "\\u003c")
    status = "passed" if metrics.get("success") else "FAILED"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ProductLens data validation</title></head><body>"
        f"<h1>Data validation {status}</h1>"
        f"<p>{metrics.get('n_images', 0)} images in {metrics.get('n_classes', 0)} classes.</p>"
        "<table border='1' cellpadding='4'><tr><th>table</th><th>fails when</th><th>result</th><th>offending</th></tr>"
        f"{rows}</table><h2>Great Expectations Data Docs</h2>{''.join(pages)}"
        f'<script type="application/json" id="data-docs-assets">{assets_json}</script>'
        f"<script>{FILL_ASSET_SLOTS}</script></body></html>"
    )


# --------------------------------------------------------------------------- steps


def validate(data_dir: Path, params_path: Path, manifest_path: Path, metrics_artifact: Any, data_docs_path: Path,
             report_dir: Path) -> None:  # fmt: skip
    """components.validate on the fetched data; the GX Data Docs go to `report_dir` and, as one page, to HTML."""
    from components import validate as step

    metrics_path = Path(report_dir) / "metrics" / "validate.json"
    argv = [
        "--images", str(Path(data_dir) / "images"), "--catalog", str(Path(data_dir) / "catalog"),
        "--reviews", str(Path(data_dir) / REVIEWS_FILE),
        "--params", str(params_path), "--manifest", str(manifest_path), "--metrics", str(metrics_path),
        "--report-dir", str(Path(report_dir) / "validate"),
    ]  # fmt: skip
    try:
        run_step(step.main, argv)
    finally:  # the Data Docs explain a failed validation: publish them either way
        if metrics_path.exists():
            log_metrics_file(metrics_artifact, metrics_path)
            summary = read_json(Path(report_dir) / "validate" / step.SUMMARY_FILE)  # every expectation's outcome
            page = data_docs_page(Path(report_dir) / "validate" / "data_docs", summary)
            atomic_write_text(Path(data_docs_path), page)


def preprocess(data_dir: Path, manifest_path: Path, params_path: Path, splits_dir: Path, metrics_artifact: Any) -> None:
    """components.preprocess with the reviewed labels fetched beside the data."""
    from components import preprocess as step

    with tempfile.TemporaryDirectory(prefix="preprocess-") as scratch:
        metrics_path = Path(scratch) / "preprocess.json"
        argv = ["--manifest", str(manifest_path), "--reviews", str(Path(data_dir) / REVIEWS_FILE),
                "--params", str(params_path), "--output", str(splits_dir), "--metrics", str(metrics_path),
                "--report", str(Path(scratch) / "report.json")]  # fmt: skip
        run_step(step.main, argv)
        log_metrics_file(metrics_artifact, metrics_path)


def train(data_dir: Path, splits_dir: Path, params_path: Path, model_dir: Path, metrics_artifact: Any,
          history_dir: Path) -> None:  # fmt: skip
    """components.train; the KFP `Model` is a folder holding model.keras (Keras needs the suffix)."""
    from components import train as step

    metrics_path = Path(history_dir) / "train.json"
    argv = [
        "--splits", str(splits_dir), "--images", str(Path(data_dir) / "images"), "--params", str(params_path),
        "--model", str(Path(model_dir) / MODEL_FILE), "--metrics", str(metrics_path),
        "--report", str(Path(history_dir) / "report.json"), "--live-dir", str(Path(history_dir) / "dvclive"),
    ]  # fmt: skip
    run_step(step.main, argv)
    log_metrics_file(metrics_artifact, metrics_path)


def evaluate(data_dir: Path, splits_dir: Path, model_dir: Path, params_path: Path, metrics_artifact: Any,
             confusion_artifact: Any, evaluation_dir: Path) -> None:  # fmt: skip
    """components.evaluate on the test split (not-sure threshold chosen on val, risk-coverage curve beside the
    metrics); the confusion matrix also goes to KFP's ClassificationMetrics."""
    import pandas as pd

    from components import evaluate as step

    evaluation_dir = Path(evaluation_dir)
    argv = [
        "--model", str(Path(model_dir) / MODEL_FILE), "--splits", str(splits_dir),
        "--images", str(Path(data_dir) / "images"), "--params", str(params_path),
        "--metrics", str(evaluation_dir / EVALUATE_METRICS), "--report", str(evaluation_dir / EVALUATE_REPORT),
        "--per-class-csv", str(evaluation_dir / "per_class.csv"),
        "--confusion-csv", str(evaluation_dir / "confusion.csv"),
        "--confusion-png", str(evaluation_dir / "confusion.png"),
        "--risk-coverage-csv", str(evaluation_dir / "risk_coverage.csv"),
        "--risk-coverage-png", str(evaluation_dir / "risk_coverage.png"),
    ]  # fmt: skip
    run_step(step.main, argv)
    log_metrics_file(metrics_artifact, evaluation_dir / EVALUATE_METRICS)
    class_names = read_json(Path(splits_dir) / "class_names.json")
    rows = pd.read_csv(evaluation_dir / "confusion.csv", dtype="string")
    counts = rows.groupby(["actual", "predicted"]).size()
    matrix = [[int(counts.get((actual, predicted), 0)) for predicted in class_names] for actual in class_names]
    confusion_artifact.log_confusion_matrix(class_names, matrix)


def gate(evaluation_dir: Path, params_path: Path, model_base: str, decision_path: Path, metrics_artifact: Any) -> bool:
    """components.gate against the champion: the newest version exported under `model_base` (as in dvc.yaml,
    the model folder is passed and the gate finds its newest model card); returns the decision, whose summary
    (blessed, checks, failed checks) also goes to the step's KFP Metrics."""
    from components import gate as step

    model_name = yaml.safe_load(Path(params_path).read_text(encoding="utf-8"))["export"]["model_name"]
    with tempfile.TemporaryDirectory(prefix="gate-") as scratch:
        metrics_path = Path(scratch) / "gate.json"
        argv = [
            "--candidate", str(Path(evaluation_dir) / EVALUATE_REPORT),
            "--champion", str(Path(model_base) / model_name), "--params", str(params_path),
            "--output", str(decision_path), "--metrics", str(metrics_path),
        ]  # fmt: skip
        run_step(step.main, argv)
        log_metrics_file(metrics_artifact, metrics_path)
    return bool(read_json(decision_path)["blessed"])


def export(model_dir: Path, splits_dir: Path, data_dir: Path, decision_path: Path, evaluation_dir: Path,
           params_path: Path, candidate_dir: Path, metrics_artifact: Any) -> None:  # fmt: skip
    """components.export: the serving candidate (SavedModel, warmup records, model card) as the KFP `Model`
    artefact `candidate_dir`; nothing is published."""
    from components import export as step

    with tempfile.TemporaryDirectory(prefix="export-") as scratch:
        metrics_path = Path(scratch) / "export.json"
        argv = [
            "--model", str(Path(model_dir) / MODEL_FILE), "--class-names", str(Path(splits_dir) / "class_names.json"),
            "--gate", str(decision_path), "--evaluation", str(Path(evaluation_dir) / EVALUATE_REPORT),
            "--samples", str(Path(splits_dir) / "test.csv"), "--images", str(Path(data_dir) / "images"),
            "--params", str(params_path), "--output", str(candidate_dir), "--metrics", str(metrics_path),
        ]  # fmt: skip
        run_step(step.main, argv)
        log_metrics_file(metrics_artifact, metrics_path)


def infra_validate(candidate_dir: Path, model_dir: Path, splits_dir: Path, data_dir: Path, params_path: Path,
                   blessing_path: Path, metrics_artifact: Any) -> None:  # fmt: skip
    """components.infra_validate: the candidate in a real model-server process; a candidate it does not bless
    fails the task (its blessing, with the reasons, is still written)."""
    from components import infra_validate as step

    with tempfile.TemporaryDirectory(prefix="infra-validate-") as scratch:
        metrics_path = Path(scratch) / "infra_validate.json"
        argv = [
            "--candidate", str(candidate_dir), "--model", str(Path(model_dir) / MODEL_FILE),
            "--samples", str(Path(splits_dir) / "test.csv"), "--images", str(Path(data_dir) / "images"),
            "--params", str(params_path), "--blessing", str(blessing_path), "--metrics", str(metrics_path),
        ]  # fmt: skip
        try:
            run_step(step.main, argv)
        finally:
            if metrics_path.exists():
                log_metrics_file(metrics_artifact, metrics_path)


def seed_models_config(config_path: Path, seed: Path = SEED_MODELS_CONFIG) -> bool:
    """Create `config_path` as a copy of `seed` unless it exists; returns whether it did.

    Created whole or not at all, and never over a file another publish wrote meanwhile: the copy is written beside it
    and hard-linked into place (link fails when the name exists), so the labels a running server reads are never
    reset to the seed's."""
    config_path = Path(config_path)
    if config_path.exists():
        return False
    config_path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{config_path.name}.", suffix=".tmp", dir=config_path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(Path(seed).read_bytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(staging, 0o644)  # the model server may run as another user
        try:
            os.link(staging, config_path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links (some SMB and object-store drivers): rename instead
            if config_path.exists():
                return False
            os.replace(staging, config_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
    log.info("seeded %s from %s", config_path, seed)
    return True


def publish(candidate_dir: Path, decision_path: Path, blessing_path: Path, data_dir: Path, model_base: str,
            report_path: Path) -> dict[str, Any]:  # fmt: skip
    """components.publish into `model_base` (the volume TF Serving reads); returns its report
    {published, model_name, version, path, weights_sha256, message}, also written to `report_path`.

    The model server reads its models.config from the same volume (`<model_base>/models.config`, serving/k8s), so the
    step keeps its `stable` label on the version that serves the model, as `make publish` does for the repository's
    files (components.labels.label_stable: atomically, never a version the policy does not load). A volume without
    the file gets serving/k8s/models.config first."""
    from components import publish as step

    models_config = Path(model_base) / MODELS_CONFIG_FILE
    seed_models_config(models_config)
    argv = [
        "--candidate", str(candidate_dir), "--gate", str(decision_path), "--blessing", str(blessing_path),
        "--data-dvc", str(Path(data_dir) / DATA_DVC_FILE), "--output", str(model_base), "--report", str(report_path),
        "--models-config", str(models_config),
    ]  # fmt: skip
    run_step(step.main, argv)
    return read_json(report_path)


def monitor(prediction_logs: str, splits_dir: Path, data_dir: Path, evaluation_dir: Path, params_path: Path,
            baseline_path: Path, metrics_artifact: Any, report_path: Path) -> bool:  # fmt: skip
    """components.monitor: the prediction logs in the folder `prediction_logs` (empty: none logged yet) against this
    run's training split and evaluation, the baseline written to `baseline_path`; returns whether they drifted.

    Drift is the step's result, as the gate's decision is, not a failed task: a failed task stops the run's other
    branches (Argo fails a DAG fast), and a training run must not stop because the traffic moved."""
    from components import monitor as step

    with tempfile.TemporaryDirectory(prefix="monitor-") as scratch:
        logs = Path(prediction_logs) if prediction_logs else Path(scratch) / "no-logs"
        if not prediction_logs:
            logs.mkdir()  # nothing logged yet: the check reports no traffic and passes
        metrics_path = Path(scratch) / "monitor.json"
        evaluation_dir = Path(evaluation_dir)
        argv = [
            "--logs", str(logs), "--splits", str(splits_dir), "--images", str(Path(data_dir) / "images"),
            "--evaluation", str(evaluation_dir / EVALUATE_METRICS),
            "--confusion-csv", str(evaluation_dir / "confusion.csv"),
            "--risk-coverage-csv", str(evaluation_dir / "risk_coverage.csv"), "--params", str(params_path),
            "--baseline-out", str(baseline_path), "--metrics", str(metrics_path), "--report", str(report_path),
        ]  # fmt: skip
        log.info("running %s %s", step.main.__module__, " ".join(argv))
        code = step.main(argv)
        if code not in (0, step.DRIFT_EXIT_CODE):
            raise StepFailed(f"python -m {step.main.__module__} exited with {code}")
        metrics = log_metrics_file(metrics_artifact, metrics_path)
    return bool(metrics["drift"])
