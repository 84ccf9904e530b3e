"""The model a benchmark serves: the newest published version, or a stand-in with the production architecture.

A stand-in is the architecture `params.yaml` trains (ImageNet weights, untrained head), exported the way export
does: its latency is the real model's, its answers are not (they are timed, never judged).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from serving import contract

log = logging.getLogger("bench.models")

REPO_ROOT = Path(__file__).resolve().parents[1]
STAND_IN = "stand-in: production architecture (params train:), ImageNet weights, untrained head"


def stand_in_candidate(workdir: Path, photos: list[bytes]) -> Path:
    """Export the production architecture as a serving candidate under `workdir` (warmup from `photos`)."""
    from common.params import load_params
    from components.export import ExportParams, export_candidate
    from components.model import MobileNetParams, build_model

    train = load_params(REPO_ROOT / "params.yaml")["train"]
    names_file = REPO_ROOT / "artifacts" / "splits" / "class_names.json"
    class_names = json.loads(names_file.read_text()) if names_file.exists() else [f"class_{i}" for i in range(14)]
    weights = None
    if train["architecture"] == "mobilenet_v2":
        spec = train["mobilenet_v2"]
        weights = MobileNetParams(spec["alpha"], str((REPO_ROOT / spec["weights"]).resolve()), spec["sha256"])
    model = build_model(train["architecture"], len(class_names), train["image_size"], weights=weights)
    path = workdir / "stand_in.keras"
    model.save(path)
    candidate = workdir / "stand_in"
    gate = {"blessed": True, "reasons": ["benchmark stand-in: production architecture, untrained head"]}
    evaluation = {contract.NOT_SURE_THRESHOLD: 0.5}  # the stand-in's answers are timed, not judged
    export_candidate(path, class_names, gate, evaluation, candidate, ExportParams(), photos)
    return candidate


def newest_version_or_stand_in(base_path: Path, workdir: Path, photos: list[bytes]) -> tuple[Path, str]:
    """(a version folder to serve, what it is): the newest version under `base_path`, else a stand-in candidate."""
    latest = contract.latest_version(base_path)
    if latest is not None:
        source = Path(base_path) / str(latest)
        return source, f"exported version {source}"
    log.info("no export under %s: exporting a stand-in with the production architecture", base_path)
    return stand_in_candidate(workdir, photos), STAND_IN


def model_base_or_stand_in(base_path: Path, workdir: Path, photos: list[bytes]) -> tuple[Path, str]:
    """(a model base path holding versions, what it is): `base_path` when it has one, else a published stand-in."""
    if contract.versions(base_path):
        return Path(base_path), "exported model"
    from components.publish import publish_version

    print(f"no exported model under {base_path}: exporting a stand-in with the production architecture")
    candidate = stand_in_candidate(workdir, photos)
    card = json.loads(contract.model_card_path(candidate).read_text())
    return publish_version(candidate, workdir / "models" / card["model_name"], card).parent, STAND_IN
