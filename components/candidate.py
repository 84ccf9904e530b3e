"""The export candidate as export, infra_validate and publish hand it on (stdlib only: publish loads no TensorFlow).

- export writes `artifacts/export/candidate/`: a SavedModel in TF Serving layout with its `model_card.json`.
- infra_validate serves it and writes a blessing that names it by `identity` (the weights it was exported from and
  a digest of every file), so a candidate rebuilt after validation is never published on an old blessing.
- publish copies it to `<models>/<model_name>/<N>/` once the gate and the blessing both say yes.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

from common.io import read_json, sha256_of_file
from serving.contract import MODEL_CARD_FILE

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp"}


class CandidateError(RuntimeError):
    """The candidate folder, its card or its blessing is missing or does not fit; the message says which."""


def read_card(candidate: Path) -> dict[str, Any]:
    """The candidate's model card (export's, without the version and provenance publishing adds)."""
    path = Path(candidate) / MODEL_CARD_FILE
    if not path.is_file():
        raise CandidateError(f"{candidate} is not an export candidate: it has no {MODEL_CARD_FILE} (run the export)")
    card = read_json(path)
    if not isinstance(card, dict) or not isinstance(card.get("weights_sha256"), str):
        raise CandidateError(f"{path}: expected a JSON object with weights_sha256")
    return card


def candidate_digest(candidate: Path) -> str:
    """sha256 over every file's relative path and sha256: equal digests mean byte-identical candidates."""
    root = Path(candidate)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_of_file(path)}\n".encode())
    return digest.hexdigest()


def identity(candidate: Path) -> dict[str, str]:
    """What a blessing names: the Keras weights the candidate was exported from, and the candidate's own bytes."""
    return {"weights_sha256": read_card(candidate)["weights_sha256"], "digest": candidate_digest(candidate)}


def blessing_refusal(blessing: dict[str, Any], candidate: Path) -> str | None:
    """Why `blessing` does not bless `candidate` (None when it does)."""
    if blessing.get("blessed") is not True:
        reasons = "; ".join(str(r) for r in blessing.get("reasons", [])) or "no reason given"
        return f"infra validation did not bless the candidate: {reasons}"
    named = blessing.get("candidate") or {}
    mine = identity(candidate)
    if named.get("weights_sha256") != mine["weights_sha256"]:
        return (
            f"the blessing is for other weights (sha256 {named.get('weights_sha256')}), not this candidate's "
            f"({mine['weights_sha256']}): run infra_validate on this candidate"
        )
    if named.get("digest") != mine["digest"]:
        return "the candidate changed after infra validation blessed it: run infra_validate again"
    return None


def sample_images(samples: Path, images_root: Path | None, count: int) -> list[bytes]:
    """The first `count` images of a split CSV (its `path` column, relative to images_root), or of a folder, sorted."""
    samples = Path(samples)
    if samples.is_dir():
        paths = sorted(p for p in samples.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        with open(samples, newline="", encoding="utf-8") as handle:
            root = Path(images_root) if images_root is not None else samples.parent
            paths = [root / row["path"] for row in csv.DictReader(handle)]
    if not paths:
        raise ValueError(f"{samples}: no sample images")
    return [path.read_bytes() for path in paths[:count]]
