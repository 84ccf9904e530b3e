"""Submit the compiled training pipeline to a Kubeflow Pipelines endpoint.

    make submit KFP_HOST=https://kfp.example.com/pipeline \\
        RUN_ARGS='params_overrides={"train.epochs":4} component_image=ghcr.io/productlens/productlens-components:0.1.1'

Run parameters: data_location, data_revision, params_overrides, component_image (registry/repository:tag; default
the image the YAML was compiled with), model_base, and the claims mounted in the steps, weights_pvc, data_pvc and
models_pvc (default: the names pipelines/k8s/pvcs.yaml creates).

Uses `kfp.Client().create_run_from_pipeline_package` on pipelines/training_pipeline.yaml (the
committed, compiled pipeline: `make compile` first if you changed the pipeline).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pipelines.training_pipeline import PIPELINE_NAME, PIPELINE_YAML

log = logging.getLogger("pipelines.submit")


def parse_run_arguments(pairs: list[str]) -> dict[str, Any]:
    """`name=value` pairs -> run arguments; a value that parses as JSON is used as JSON (dicts, numbers)."""
    arguments: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"run argument {pair!r} is not name=value")
        try:
            arguments[name] = json.loads(raw)
        except json.JSONDecodeError:
            arguments[name] = raw
    return arguments


def submit(host: str, package: Path, arguments: dict[str, Any], experiment: str, run_name: str | None) -> str:
    import kfp

    client = kfp.Client(host=host)
    run = client.create_run_from_pipeline_package(
        str(package), arguments=arguments, run_name=run_name, experiment_name=experiment
    )
    return run.run_id


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kfp.example.com/pipeline")
    parser.add_argument("--package", type=Path, default=PIPELINE_YAML)
    parser.add_argument("--experiment", default=PIPELINE_NAME)
    parser.add_argument("--run-name", default=None)
    parser.add_argument("arguments", nargs="*", metavar="NAME=VALUE", help="pipeline parameters of the run")
    args = parser.parse_args(argv)
    if not args.package.exists():
        parser.error(f"{args.package} does not exist: run `make compile`")
    run_id = submit(args.host, args.package, parse_run_arguments(args.arguments), args.experiment, args.run_name)
    log.info("submitted run %s to %s", run_id, args.host)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
