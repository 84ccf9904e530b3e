"""The KFP publish step keeps the `stable` label of the models.config on the models claim, which the model server of
serving/k8s reads (--model_config_file=/models/models.config), so a published version needs no edit by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.labels import ModelsConfig
from pipelines import steps
from serving.config import load_model_server_config, model_configs
from tests.components.test_publish import GATE, blessing_for, build_candidate
from tests.fixtures.model_server import TinyModel


@pytest.fixture(scope="module")
def candidates(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("candidates")
    return {"a": build_candidate(tiny_model, root / "a", 0.42), "b": build_candidate(tiny_model, root / "b", 0.9)}


def publish(candidate: Path, model_base: Path, scratch: Path) -> dict:
    """What the KFP publish component runs, on the artefacts the gate and infra-validate wrote."""
    (scratch / "gate.json").write_text(json.dumps(GATE))
    (scratch / "blessing.json").write_text(json.dumps(blessing_for(candidate)))
    (scratch / "data").mkdir(exist_ok=True)
    return steps.publish(
        candidate, scratch / "gate.json", scratch / "blessing.json", scratch / "data", str(model_base),
        scratch / "publication.json",
    )  # fmt: skip


def labels(config: Path) -> dict[str, int]:
    return ModelsConfig.read(config).labels("productlens")


def test_first_publish_seeds_the_servers_config_and_each_publish_moves_stable(candidates, tmp_path) -> None:
    model_base = tmp_path / "models"
    config = model_base / steps.MODELS_CONFIG_FILE
    assert publish(candidates["a"], model_base, tmp_path)["version"] == 1
    # The seed is serving/k8s/models.config: its comments, its container base path; readable by another user.
    seed = steps.SEED_MODELS_CONFIG.read_text()
    assert config.read_text().startswith(seed[: seed.index("model_config_list")])
    assert [str(m.base_path) for m in model_configs(load_model_server_config(config))] == ["/models/productlens"]
    assert config.stat().st_mode & 0o044 == 0o044
    assert labels(config) == {"stable": 1}
    assert publish(candidates["b"], model_base, tmp_path)["version"] == 2
    assert labels(config) == {"stable": 2}
    assert sorted(p.name for p in model_base.iterdir()) == ["models.config", "productlens"]  # no staging file left


def test_publish_keeps_the_claims_own_config_and_its_pinned_policy(candidates, tmp_path) -> None:
    """After a canary rollout the policy is pinned (specific): a new version is not served, so stable stays; the
    operator's edits (here a logging_config) are never replaced by the seed."""
    model_base = tmp_path / "models"
    publish(candidates["a"], model_base, tmp_path)
    config = model_base / steps.MODELS_CONFIG_FILE
    pinned = (
        'model_config_list { config { name: "productlens" base_path: "/models/productlens" model_platform: '
        '"tensorflow" model_version_policy { specific { versions: 1 } } version_labels { key: "stable" value: 1 } '
        'logging_config { log_collector_config { type: "" filename_prefix: "/logs/predictions/productlens" } '
        "sampling_config { sampling_rate: 0.1 } } } }\n"
    )
    config.write_text(pinned)
    assert steps.seed_models_config(config) is False
    assert publish(candidates["b"], model_base, tmp_path)["version"] == 2
    assert config.read_text() == pinned
    (model,) = model_configs(load_model_server_config(config))
    assert model.logging is not None and model.labels == {"stable": 1}
