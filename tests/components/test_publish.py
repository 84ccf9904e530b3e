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


def shipped_config(tmp_path: Path) -> Path:
    """serving/models.config as the repo ships it (labelled stable -> 1), copied where a test may rewrite it."""
    config = tmp_path / "models.config"
    shutil.copy(ROOT / "serving" / "models.config", config)
    return config


def test_publish_points_the_stable_label_at_the_serving_version(step_inputs, candidates, tmp_path, capsys) -> None:
    config = shipped_config(tmp_path)
    shipped = config.read_text()
    args = [*cli_args(step_inputs), "--models-config", str(config)]
    assert step.main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{config}: stable -> version 1"
    assert config.read_text() == shipped  # what the repo ships is what the first publish writes: no diff
    assert step.main(args) == 0  # nothing published: the label still names the version serving the model
    assert capsys.readouterr().out.splitlines()[-1] == f"{config}: stable -> version 1"

    step_inputs["candidate"] = candidates["b"]
    step_inputs["blessing"].write_text(json.dumps(blessing_for(candidates["b"])))
    assert step.main([*cli_args(step_inputs), "--models-config", str(config)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{config}: stable -> version 2"
    assert config.read_text() == shipped.replace('key: "stable"\n      value: 1', 'key: "stable"\n      value: 2')
    assert config.read_text().startswith("# TF Serving ModelServerConfig")  # the comments at the top stay


def test_publish_never_labels_a_version_the_policy_does_not_load(step_inputs, candidates, tmp_path, capsys) -> None:
    """TF Serving refuses a whole config whose label names a version it has not loaded."""
    config = shipped_config(tmp_path)
    config.write_text(config.read_text().replace("  }\n}\n", '    version_labels { key: "canary" value: 1 }\n  }\n}\n'))
    publish(candidates["a"], GATE, blessing_for(candidates["a"]), step_inputs["output"], {})  # version 1
    step_inputs["candidate"] = candidates["b"]
    step_inputs["blessing"].write_text(json.dumps(blessing_for(candidates["b"])))
    assert step.main([*cli_args(step_inputs), "--models-config", str(config)]) == 0
    said = capsys.readouterr().out.splitlines()[-1]
    assert said == f"{config}: stable -> version 2; dropped canary (version 1 is no longer loaded)"
    assert load_labels(config) == {"stable": 2}  # latest { num_versions: 1 } unloads version 1

    # A pinned policy serves version 2 only: a version 3 on disk is not labelled until the policy names it.
    config.write_text(
        config.read_text().replace("latest {\n        num_versions: 1", "specific {\n        versions: 2")
    )
    model_dir = step_inputs["output"] / "productlens"
    (model_dir / "3").mkdir()
    said = step.label_stable(config, "productlens", 3, model_dir)
    assert said == (
        f"{config}: labels unchanged: its model_version_policy loads versions [2], not 3; add 3 to the policy to "
        "serve it"
    )
    assert load_labels(config) == {"stable": 2}


def test_a_models_config_without_the_model_is_one_line_and_exit_1(step_inputs, tmp_path, capsys) -> None:
    config = tmp_path / "models.config"
    config.write_text('model_config_list { config { name: "other" base_path: "/models/other" } }\n')
    assert step.main([*cli_args(step_inputs), "--models-config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: the stable label was not written: {config} configures no model 'productlens', so it cannot label "
        "its versions\n"
    )


def load_labels(config: Path) -> dict[str, int]:
    from google.protobuf import text_format
    from tensorflow_serving.config.model_server_config_pb2 import ModelServerConfig

    parsed = text_format.Parse(config.read_text(), ModelServerConfig())
    return dict(parsed.model_config_list.config[0].version_labels)


# ----- the canary rollout: publish --label canary, productlens promote / rollback ----------------------------------
def served_config(tmp_path: Path, model_dir: Path) -> Path:
    """serving/models.config with its base path pointed at `model_dir` (a server in a test reads it)."""
    config = shipped_config(tmp_path)
    config.write_text(config.read_text().replace('"models/productlens"', f'"{model_dir}"'))
    return config


def policy_of(config: Path) -> str:
    from google.protobuf import text_format
    from tensorflow_serving.config.model_server_config_pb2 import ModelServerConfig

    parsed = text_format.Parse(config.read_text(), ModelServerConfig())
    return text_format.MessageToString(parsed.model_config_list.config[0].model_version_policy, as_one_line=True)


def productlens(*args: str) -> int:
    from productlens.cli import main

    return main(list(args))


def test_a_canary_is_served_beside_stable_then_promoted_and_rolled_back(step_inputs, candidates, tmp_path, capsys):
    from components.labels import ModelServerWatch
    from tests.fixtures.model_server import start_model_server, wait_for_versions

    model_dir = step_inputs["output"] / "productlens"
    config = served_config(tmp_path, model_dir)
    assert step.main([*cli_args(step_inputs), "--models-config", str(config)]) == 0  # version 1, stable -> 1
    with start_model_server(
        tmp_path / "server", f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=0.2",
        "--file_system_poll_wait_seconds=0.2",
    ) as server, ModelServerWatch(server.grpc_address, "productlens") as watch:  # fmt: skip
        wait_for_versions(server.grpc_address, "productlens", {1: "AVAILABLE"})
        step_inputs["candidate"] = candidates["b"]
        step_inputs["blessing"].write_text(json.dumps(blessing_for(candidates["b"])))
        capsys.readouterr()
        canary = ["--models-config", str(config), "--label", "canary", "--server", server.grpc_address]
        assert step.main([*cli_args(step_inputs), *canary]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"stable version 1 pinned in {config}"
        assert out[1].startswith(f"published {model_dir / '2'} ")
        assert out[2] == f"{config}: canary -> 2, stable -> 1 (both loaded)"
        assert load_labels(config) == {"stable": 1, "canary": 2}
        assert policy_of(config) == "specific { versions: 1 versions: 2 }"  # a version 3 on disk would not replace 1
        assert (watch.label_version("stable"), watch.label_version("canary"), watch.available()) == (1, 2, {1, 2})
        assert json.loads(step_inputs["report"].read_text())["label"] == "canary"

        assert productlens("promote", "--models-config", str(config), "--server", server.grpc_address) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "promoted version 2: previous -> 1, stable -> 2"
        assert load_labels(config) == {"stable": 2, "previous": 1}
        assert (watch.label_version("stable"), watch.label_version("canary"), watch.available()) == (2, None, {1, 2})

        assert productlens("rollback", "--models-config", str(config), "--server", server.grpc_address) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "rolled back: stable -> 1 (version 2 unloaded)"
        assert load_labels(config) == {"stable": 1} and policy_of(config) == "specific { versions: 1 }"
        assert watch.label_version("stable") == 1
        wait_for_versions(server.grpc_address, "productlens", {1: "AVAILABLE", 2: "END"})

        assert productlens("rollback", "--models-config", str(config)) == 1
        assert capsys.readouterr().err == (
            f"error: {config} has nothing to roll back: no 'previous' label (no promote since the last rollout) and "
            "no canary (labels: stable -> 1)\n"
        )


def test_rollback_during_a_canary_drops_it_and_promote_needs_one(step_inputs, tmp_path, capsys) -> None:
    publish(step_inputs["candidate"], GATE, blessing_for(step_inputs["candidate"]), step_inputs["output"], {})
    config = served_config(tmp_path, step_inputs["output"] / "productlens")
    config.write_text(
        config.read_text()
        .replace("latest {\n        num_versions: 1", "specific {\n        versions: 1\n        versions: 2")
        .replace("  }\n}\n", '    version_labels { key: "canary" value: 2 }\n  }\n}\n')
    )
    assert productlens("rollback", "--models-config", str(config)) == 0
    assert capsys.readouterr().out == "canary version 2 dropped; stable stays at 1\n"
    assert load_labels(config) == {"stable": 1} and policy_of(config) == "specific { versions: 1 }"
    assert config.read_text().startswith("# TF Serving ModelServerConfig")  # the comments at the top stay

    assert productlens("promote", "--models-config", str(config)) == 1
    assert capsys.readouterr().err == f"error: {config} has no canary to promote (labels: stable -> 1)\n"


def test_promote_refuses_on_a_drift_check_that_found_drift(tmp_path, capsys) -> None:
    config = shipped_config(tmp_path)
    report = tmp_path / "monitor.json"
    report.write_text(json.dumps({"drift": True, "drifted_checks": 2, "judged": True, "n_images": 500}))
    assert productlens("promote", "--models-config", str(config), "--check", str(report)) == 1
    assert capsys.readouterr().err == (
        f"error: not promoting: {report} says the traffic drifted (2 check(s); its report names them)\n"
    )
    assert load_labels(config) == {"stable": 1}


def test_rollout_steps_refuse_configs_that_disagree_and_a_canary_without_a_server(step_inputs, tmp_path) -> None:
    one, other = shipped_config(tmp_path), tmp_path / "k8s.config"
    other.write_text(one.read_text().replace("value: 1", "value: 2"))
    with pytest.raises(ValueError, match="label different versions"):
        from components.labels import promote as promote_labels

        promote_labels([one, other], "productlens")
    with pytest.raises(SystemExit) as usage:
        step.main([*cli_args(step_inputs), "--models-config", str(one), "--label", "canary"])
    assert usage.value.code == 2
