"""models.config: TF Serving's ModelServerConfig text proto, version policies and labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.config import ConfigError, VersionPolicy, model_configs, parse_model_server_config

ON_DISK = {1, 2, 3, 7}


def config(body: str) -> str:
    return f'model_config_list {{ config {{ name: "productlens" base_path: "/models/productlens" {body} }} }}'


@pytest.mark.parametrize(
    ("policy", "aspired"),
    [
        ("", {7}),  # no policy: the latest version, as in TF Serving
        ("model_version_policy { latest { num_versions: 2 } }", {3, 7}),
        ("model_version_policy { all {} }", ON_DISK),
        ("model_version_policy { specific { versions: 2 versions: 9 } }", {2}),
    ],
)
def test_version_policy_picks_the_versions_to_serve(policy: str, aspired: set[int]) -> None:
    (model,) = model_configs(parse_model_server_config(config(policy)))
    assert model.policy.aspired(ON_DISK) == aspired


def test_labels_and_relative_base_paths() -> None:
    text = 'model_config_list { config { name: "m" base_path: "models/m" version_labels { key: "stable" value: 3 } } }'
    (model,) = model_configs(parse_model_server_config(text), root=Path("/repo"))
    assert model.base_path == Path("/repo/models/m")
    assert model.labels == {"stable": 3}
    assert model.policy == VersionPolicy("latest", 1)


@pytest.mark.parametrize(
    "text",
    [
        'model_config_list { config { name: "m" base_path: "/a" } config { name: "m" base_path: "/b" } }',
        'model_config_list { config { name: "m" } }',
        'model_config_list { config { name: "m" base_path: "/a" model_platform: "pytorch" } }',
        'model_config_list { config { name: "m" base_path: "/a" model_version_policy { specific {} } } }',
    ],
)
def test_a_config_the_server_cannot_honour_is_rejected(text: str) -> None:
    with pytest.raises(ConfigError):
        model_configs(parse_model_server_config(text))


def test_a_typo_in_the_text_proto_is_a_parse_error() -> None:
    with pytest.raises(ConfigError, match="ModelServerConfig"):
        parse_model_server_config('model_config_list { config { nme: "m" } }')
