"""Publish: only a candidate the gate and infra validation blessed, as the next version, once, never half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components import publish as step
from components.candidate import identity
from components.export import ExportParams, export_candidate
from components.publish import PublishRefused, publish
from serving.contract import MODEL_CARD_FILE, ModelCard
from tests.fixtures.model_server import TinyModel

ROOT = Path(__file__).resolve().parents[2]
EVALUATION = {"accuracy": 0.95, "macro_f1": 0.94, "not_sure_threshold": 0.42}
GATE = {"blessed": True, "reasons": ["accuracy 0.95 >= 0.85"]}
# SIGKILL at the first rename publish makes: after the version's files are copied, before anything is visible.
KILLED_AT_FIRST_RENAME = """
import os, signal, sys
os.replace = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
from components import publish
sys.exit(publish.main(sys.argv[1:]))
"""


def build_candidate(tiny_model: TinyModel, output: Path, not_sure_threshold: float) -> Path:
    evaluation = {**EVALUATION, "not_sure_threshold": not_sure_threshold}
    export_candidate(
        tiny_model.keras_model, tiny_model.class_names, GATE, evaluation, output, ExportParams(top_k=3),
        tiny_model.images(),
    )  # fmt: skip
    return output


@pytest.fixture(scope="module")
def candidates(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two candidates of the same weights: the second with another not-sure threshold (what clients get differs)."""
    root = tmp_path_factory.mktemp("candidates")
    return {"a": build_candidate(tiny_model, root / "a", 0.42), "b": build_candidate(tiny_model, root / "b", 0.9)}


def blessing_for(candidate: Path) -> dict:
    """What infra_validate writes for a candidate it blessed (its own tests run the real thing)."""
    return {"blessed": True, "reasons": ["every check passed"], "candidate": identity(candidate), "checks": []}


@pytest.fixture()
def step_inputs(candidates: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    paths = {
        "candidate": candidates["a"],
        "gate": tmp_path / "gate.json",
        "blessing": tmp_path / "blessing.json",
        "output": tmp_path / "models",
        "report": tmp_path / "publish.json",
    }
    paths["gate"].write_text(json.dumps(GATE))
    paths["blessing"].write_text(json.dumps(blessing_for(candidates["a"])))
    return paths


def cli_args(paths: dict[str, Path]) -> list[str]:
    return [
        "--candidate", str(paths["candidate"]), "--gate", str(paths["gate"]), "--blessing", str(paths["blessing"]),
        "--data-dvc", str(ROOT / "data.dvc"), "--output", str(paths["output"]), "--report", str(paths["report"]),
    ]  # fmt: skip


def visible_versions(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) if model_dir.exists() else []


def test_publish_copies_the_blessed_candidate_as_the_next_version_with_its_provenance(step_inputs, capsys) -> None:
    assert step.main(cli_args(step_inputs)) == 0
    version = step_inputs["output"] / "productlens" / "1"
    assert f"published {version}" in capsys.readouterr().out
    assert visible_versions(version.parent) == ["1"]
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()
    assert oct(version.stat().st_mode & 0o777) == "0o755"  # a model server running as another user can read it

    card = json.loads((version / MODEL_CARD_FILE).read_text())
    assert ModelCard.from_dict(card).version == 1
    candidate_card = json.loads((step_inputs["candidate"] / MODEL_CARD_FILE).read_text())
    assert {key: card[key] for key in candidate_card} == candidate_card  # the candidate's card, plus:
    assert card["published_at"].endswith("+00:00")
    provenance = card["provenance"]
    assert len(provenance["git"]["commit"]) == 40
    assert provenance["data"]["md5"] == yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    assert provenance["infra_validation"] == json.loads(step_inputs["blessing"].read_text())
    report = json.loads(step_inputs["report"].read_text())
    assert (report["published"], report["version"], report["path"]) == (True, 1, str(version))


def test_publishing_the_same_model_again_publishes_nothing_and_says_so(step_inputs, candidates, capsys) -> None:
    assert step.main(cli_args(step_inputs)) == 0
    capsys.readouterr()
    assert step.main(cli_args(step_inputs)) == 0
    sha = json.loads((step_inputs["candidate"] / MODEL_CARD_FILE).read_text())["weights_sha256"]
    assert f"version 1 already serves this model (sha256 {sha[:12]}); nothing published" in capsys.readouterr().out
    assert visible_versions(step_inputs["output"] / "productlens") == ["1"]
    assert json.loads(step_inputs["report"].read_text())["published"] is False

    # The same weights with another not-sure threshold answer clients differently: that is a new version.
    stricter = publish(candidates["b"], GATE, blessing_for(candidates["b"]), step_inputs["output"], {})
    assert (stricter.published, stricter.version) == (True, 2)


def test_publish_refuses_a_candidate_the_gate_did_not_bless(step_inputs, capsys) -> None:
    step_inputs["gate"].write_text(json.dumps({"blessed": False, "reasons": ["recall of class webcam 0.41 < 0.60"]}))
    assert step.main(cli_args(step_inputs)) == 1
    err = capsys.readouterr().err
    assert "Publish refused" in err and "the gate did not bless the model: recall of class webcam 0.41 < 0.60" in err
    assert not step_inputs["output"].exists() and not step_inputs["report"].exists()


def test_publish_refuses_a_blessing_for_other_weights_or_a_failed_one(step_inputs, candidates, capsys) -> None:
    other = {**blessing_for(candidates["a"]), "candidate": {"weights_sha256": "0" * 64, "digest": "0" * 64}}
    step_inputs["blessing"].write_text(json.dumps(other))
    assert step.main(cli_args(step_inputs)) == 1
    assert f"the blessing is for other weights (sha256 {'0' * 64}), not this candidate's" in capsys.readouterr().err
    failed = {**blessing_for(candidates["a"]), "blessed": False, "reasons": ["loads: the server could not load it"]}
    with pytest.raises(PublishRefused, match="infra validation did not bless the candidate: loads: the server"):
        publish(candidates["a"], GATE, failed, step_inputs["output"], {})
    assert visible_versions(step_inputs["output"] / "productlens") == []


def test_publish_refuses_a_candidate_changed_after_it_was_validated(step_inputs, tmp_path: Path) -> None:
    changed = tmp_path / "changed"
    shutil.copytree(step_inputs["candidate"], changed)
    blessing = blessing_for(changed)
    (changed / "assets.extra" / "notes.txt").write_text("added after infra validation")
    with pytest.raises(PublishRefused, match="the candidate changed after infra validation blessed it"):
        publish(changed, GATE, blessing, step_inputs["output"], {})


def test_a_killed_publish_leaves_no_visible_version(step_inputs, candidates) -> None:
    publish(candidates["a"], GATE, blessing_for(candidates["a"]), step_inputs["output"], {})  # version 1
    step_inputs["candidate"] = candidates["b"]
    step_inputs["blessing"].write_text(json.dumps(blessing_for(candidates["b"])))
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT_FIRST_RENAME, *cli_args(step_inputs)], cwd=ROOT, capture_output=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    model_dir = step_inputs["output"] / "productlens"
    assert visible_versions(model_dir) == ["1"]
    (staging,) = [p for p in model_dir.iterdir() if p.name.startswith(".2.")]  # the version's files, hidden
    assert (staging / "saved_model.pb").is_file()

    # The next publish takes version 2 and clears what the killed one left.
    assert step.main(cli_args(step_inputs)) == 0
    assert visible_versions(model_dir) == ["1", "2"]
    assert not staging.exists()
