"""Publish step (TFX's Pusher): copy the blessed, infra-validated export candidate to the serving base path.

    python -m components.publish --candidate artifacts/export/candidate --gate artifacts/gate/gate.json \\
        --blessing artifacts/infra_validate/blessing.json --data-dvc data.dvc --output models

Not a DVC stage: `dvc repro` and `dvc exp run` build and validate candidates and never change what is
served. Publishing is the deliberate step (`make publish`; `make repro` ends with it; in KFP the step after
infra_validate). It publishes `<output>/<model_name>/<N+1>/` only when the gate blessed the model and the
infra-validation blessing names this very candidate (its weights' sha256 and its digest), with the
provenance in the version's model card: version, published_at, git commit, the dataset's md5 from
`data.dvc`, and the blessing. The version is written under a hidden `.N.*.tmp` name and renamed into place,
so a crash or `kill -9` never leaves a visible half-written version (the next publish removes the leftover).

Idempotent: when the newest published version already serves this model (same weights, same threshold, top-k,
pixel limit and classes), it publishes nothing, says so and exits 0.

With `--models-config FILE` (repeatable; `make publish` names serving/models.config and serving/k8s/models.config),
it then points the `stable` version label of the model in FILE at the version that serves the model, so clients
can ask for `--label stable`; see `components.labels.label_stable`.

With `--label canary --server HOST:PORT` (`make canary`) the new version goes out beside the stable one instead:
`stable` keeps serving, `canary` names the new version once the server at HOST:PORT has loaded it, and
`productlens promote` / `productlens rollback` finish the rollout (components/labels.py has the steps).
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import contextlib
import datetime as dt
import fcntl
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.cli import run_main
from common.io import atomic_directory, atomic_write_json, read_json
from components.candidate import CandidateError, blessing_refusal, read_card
from components.labels import (
    CANARY_LABEL,
    DEFAULT_WAIT_S,
    STABLE_LABEL,
    LabelError,
    ModelServerWatch,
    label_canary,
    label_stable,
    pin_stable_for_canary,
)
from serving.contract import (
    MODEL_CARD_FILE,
    NOT_SURE_THRESHOLD,
    ModelCard,
    ModelCardError,
    latest_version,
    next_version,
)

log = logging.getLogger("components.publish")

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = ".publish.lock"  # hidden, so no model server takes it for a version
# Card fields that change what a client gets from the same weights: a change in any of them is a new version.
SERVED_AS = ("weights_sha256", NOT_SURE_THRESHOLD, "top_k", "max_pixels", "class_names", "image_size")


class PublishRefused(RuntimeError):
    """The candidate is not blessed by the gate, or the blessing is not for this candidate."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


@dataclass(frozen=True)
class Publication:
    published: bool  # False: the newest version already serves this model
    version: int
    path: Path
    message: str


# ----- provenance ------------------------------------------------------------------------------------------
def data_md5(dvc_file: Path) -> str | None:
    """The dataset's md5 as its .dvc file pins it (None without one)."""
    if not Path(dvc_file).is_file():
        return None
    outs = (yaml.safe_load(Path(dvc_file).read_text(encoding="utf-8")) or {}).get("outs", [])
    return outs[0].get("md5") if outs else None


def git_commit(cwd: Path = REPO_ROOT) -> dict[str, Any]:
    """HEAD and whether the work tree has changes ({None, None} outside a git checkout, e.g. in the image)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


# ----- versions on disk ------------------------------------------------------------------------------------
@contextlib.contextmanager
def publishing_lock(model_dir: Path) -> Iterator[None]:
    """One publisher at a time per model folder: the version number and the stale-staging cleanup rely on it."""
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_stale_staging(model_dir: Path) -> None:
    """Hidden `.N.*.tmp` directories are what a killed publish left; they were never visible versions."""
    for path in model_dir.iterdir():
        if path.name.startswith(".") and path.name.endswith((".tmp", ".old")) and path.is_dir():
            log.warning("removing %s, left by a publish that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)


def make_world_readable(directory: Path) -> None:
    """Temp files and dirs are created private (0600/0700); a model server in a container may run as another user."""
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def newest_card(model_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """The newest published version and its model card (None when there is no version, or it has no card)."""
    version = latest_version(model_dir)
    if version is None or not (model_dir / str(version) / MODEL_CARD_FILE).is_file():
        return None
    return version, read_json(model_dir / str(version) / MODEL_CARD_FILE)


def publish_version(candidate: Path, model_dir: Path, card: dict[str, Any]) -> Path:
    """Copy `candidate` as the next version under `model_dir` with `card` (plus its version) as its model card.

    No checks: `publish` decides whether to; benchmarks and tests publish stand-ins with it.
    """
    with publishing_lock(model_dir):
        remove_stale_staging(model_dir)
        return _write_version(candidate, model_dir, next_version(model_dir), card)


def _write_version(candidate: Path, model_dir: Path, version: int, card: dict[str, Any]) -> Path:
    final = model_dir / str(version)
    published = {**card, "version": version}
    ModelCard.from_dict(published, str(final / MODEL_CARD_FILE))
    with atomic_directory(final, replace=False) as staging:
        shutil.copytree(candidate, staging, dirs_exist_ok=True)
        atomic_write_json(staging / MODEL_CARD_FILE, published)
        make_world_readable(staging)
    return final


# ----- the step --------------------------------------------------------------------------------------------
def check_publishable(candidate: Path, gate: dict[str, Any], blessing: dict[str, Any]) -> dict[str, Any]:
    """The candidate's model card when the gate blessed the model and the blessing names this candidate; else
    PublishRefused with every reason."""
    card = read_card(candidate)
    refusals = []
    if gate.get("blessed") is not True:
        refusals.append("the gate did not bless the model: " + "; ".join(str(r) for r in gate.get("reasons", [])))
    refusal = blessing_refusal(blessing, candidate)
    if refusal is not None:
        refusals.append(refusal)
    if refusals:
        raise PublishRefused(refusals)
    return card


def publish(
    candidate: Path, gate: dict[str, Any], blessing: dict[str, Any], output: Path, provenance: dict[str, Any]
) -> Publication:
    """Publish `candidate` under `output/<model_name>/` if the gate and the blessing allow it and the newest
    version does not already serve it; `provenance` (git, data) goes into the published card."""
    card = check_publishable(candidate, gate, blessing)
    model_dir = Path(output) / card["model_name"]
    with publishing_lock(model_dir):
        remove_stale_staging(model_dir)
        newest = newest_card(model_dir)
        if newest is not None and all(newest[1].get(key) == card[key] for key in SERVED_AS):
            version = newest[0]
            message = (
                f"version {version} already serves this model (sha256 {card['weights_sha256'][:12]}); nothing published"
            )
            return Publication(False, version, model_dir / str(version), message)
        version = next_version(model_dir)
        published_card = {
            **card,
            "published_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "provenance": {**provenance, "infra_validation": blessing},
        }
        path = _write_version(candidate, model_dir, version, published_card)
    message = (
        f"published {path} (sha256 {card['weights_sha256'][:12]}, {NOT_SURE_THRESHOLD} {card[NOT_SURE_THRESHOLD]})"
    )
    return Publication(True, version, path, message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.publish", description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", type=Path, required=True, help="the export candidate folder")
    parser.add_argument("--gate", type=Path, required=True, help="gate.json: {blessed, reasons, ...}")
    parser.add_argument("--blessing", type=Path, required=True, help="infra_validate's blessing.json")
    parser.add_argument("--data-dvc", type=Path, default=Path("data.dvc"), help="the dataset's .dvc file (md5)")
    parser.add_argument("--output", type=Path, default=Path("models"), help="serving base: <output>/<model_name>/<N>/")
    parser.add_argument("--report", type=Path, default=None, help="write {published, version, path, message} here")
    parser.add_argument(
        "--models-config",
        type=Path,
        action="append",
        default=[],
        help="a models.config whose labels then name the published version (repeatable)",
    )
    parser.add_argument(
        "--label",
        choices=(STABLE_LABEL, CANARY_LABEL),
        default=STABLE_LABEL,
        help=f"{STABLE_LABEL}: the published version serves everyone (default); {CANARY_LABEL}: it is loaded beside "
        f"{STABLE_LABEL}, which keeps serving, and gets the label {CANARY_LABEL} (needs --models-config and --server)",
    )
    parser.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="with --label canary: the gRPC address of the model server that reads the first --models-config; each "
        "step waits until that server has applied it",
    )
    parser.add_argument(
        "--wait-s", type=float, default=DEFAULT_WAIT_S, help="how long each canary step may wait (default %(default)g)"
    )
    args = parser.parse_args(argv)
    if args.label == CANARY_LABEL and not (args.models_config and args.server):
        parser.error(
            "--label canary needs --models-config (the server's config first) and --server HOST:PORT: the canary is "
            "labelled only once that server has loaded it beside the stable version"
        )
    return args


def publish_canary(
    args: argparse.Namespace, gate: dict[str, Any], blessing: dict[str, Any], provenance: dict[str, Any]
) -> Publication:
    """Publish under the `canary` label while `stable` keeps serving, each step applied by the server (see
    components/labels.py); prints what each step did."""
    model_name = check_publishable(args.candidate, gate, blessing)["model_name"]
    with ModelServerWatch(args.server, model_name) as watch:
        stable = pin_stable_for_canary(args.models_config, model_name, watch, args.wait_s)
        print(f"{STABLE_LABEL} version {stable} pinned in {', '.join(map(str, args.models_config))}")
        result = publish(args.candidate, gate, blessing, args.output, provenance)
        print(result.message)
        print(label_canary(args.models_config, model_name, stable, result.version, watch, args.wait_s))
    return result


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    for path in (args.gate, args.blessing):
        if not path.is_file():
            print(f"Publish refused: {path} not found (run `dvc repro` first)", file=sys.stderr)
            return 1
    provenance = {"git": git_commit(), "data": {"dvc_file": str(args.data_dvc), "md5": data_md5(args.data_dvc)}}
    gate, blessing = read_json(args.gate), read_json(args.blessing)
    try:
        if args.label == CANARY_LABEL:
            result = publish_canary(args, gate, blessing, provenance)
        else:
            result = publish(args.candidate, gate, blessing, args.output, provenance)
            print(result.message)
    except PublishRefused as refused:
        print(f"Publish refused: {args.candidate} is not published:", file=sys.stderr)
        for reason in refused.reasons:
            print(f"  - {reason}", file=sys.stderr)
        return 1
    except (CandidateError, ModelCardError) as error:
        print(f"Publish refused: {error}", file=sys.stderr)
        return 1
    except LabelError as error:
        print(f"error: the {CANARY_LABEL} label was not written: {error}", file=sys.stderr)
        return 1
    if args.report is not None:
        card = read_json(result.path / MODEL_CARD_FILE)
        atomic_write_json(
            args.report,
            {
                "published": result.published,
                "model_name": card["model_name"],
                "version": result.version,
                "path": str(result.path),
                "weights_sha256": card["weights_sha256"],
                "message": result.message,
                "label": args.label,
            },
        )
    if args.label == STABLE_LABEL:
        for config_path in args.models_config:
            try:
                print(label_stable(config_path, result.path.parent.name, result.version, result.path.parent))
            except (OSError, LabelError) as error:
                print(f"error: the {STABLE_LABEL} label was not written: {error}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
