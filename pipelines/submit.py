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

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import json
import logging
import warnings
from pathlib import Path
from typing import Any

from common.cli import run_main
from pipelines.training_pipeline import PIPELINE_NAME, PIPELINE_YAML

log = logging.getLogger("pipelines.submit")


class SubmitError(RuntimeError):
    """The KFP API cannot be reached, or refused the run; the message names the host and the reason."""


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


def connection_reason(error: BaseException) -> str:
    """Why a connection failed, in the words of its root cause ("connection refused", "name or service not known")."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        reason = getattr(current, "reason", None)  # urllib3's MaxRetryError keeps its cause here
        current = reason if isinstance(reason, BaseException) else current.__cause__ or current.__context__
    for cause in reversed(chain):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[:1].lower() + cause.strerror[1:]
    return " ".join(str(chain[-1]).split()) or type(chain[-1]).__name__


def health_check_failure_in_one_line(record: logging.LogRecord) -> bool:
    """Logging filter: kfp.Client logs each failed health check with logging.exception, a 30-line traceback per try;
    keep its message and the HTTP status it got."""
    if record.exc_info and str(record.msg).startswith("Failed to get healthz info"):
        status, reason = (getattr(record.exc_info[1], name, "?") for name in ("status", "reason"))
        record.msg = f"{str(record.msg).rstrip('.')}: HTTP {status} {reason}"
        record.exc_info = record.exc_text = None
    return True


def without_retry_warnings(record: logging.LogRecord) -> bool:
    """Logging filter for urllib3: its retries of a refused connection are warnings; SubmitError says it once."""
    return record.levelno >= logging.ERROR


def submit(host: str, package: Path, arguments: dict[str, Any], experiment: str, run_name: str | None) -> str:
    """Create a run of `package` on the KFP API at `host`; returns its run id. Raises SubmitError with one line."""
    import kfp
    import kfp_server_api
    import urllib3

    # kfp.Client warns on every construction that it needs KFP >= 2.0.0-beta.2: this pipeline is KFP v2 anyway.
    warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline", category=FutureWarning)
    try:
        client = kfp.Client(host=host)
        run = client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=run_name, experiment_name=experiment
        )
    except urllib3.exceptions.HTTPError as error:  # nothing answered: refused, unknown name, timeout, TLS
        raise SubmitError(f"cannot reach the KFP API at {host}: {connection_reason(error)}") from error
    except kfp_server_api.ApiException as error:  # something answered, with an HTTP error
        raise SubmitError(f"the KFP API at {host} answered HTTP {error.status} {error.reason}") from error
    except TimeoutError as error:  # kfp.Client's health check gave up after its retries
        raise SubmitError(f"the KFP API at {host} did not pass its health check ({error})") from error
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
    try:
        arguments = parse_run_arguments(args.arguments)
    except ValueError as error:
        parser.error(str(error))
    # Filters, not levels: kfp's API client sets the urllib3 loggers' levels itself.
    logging.getLogger("urllib3.connectionpool").addFilter(without_retry_warnings)
    logging.getLogger().addFilter(health_check_failure_in_one_line)
    run_id = submit(args.host, args.package, arguments, args.experiment, args.run_name)
    log.info("submitted run %s to %s", run_id, args.host)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, expected=(SubmitError,)))
