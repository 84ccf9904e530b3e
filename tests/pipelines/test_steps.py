"""The plain-Python side of the KFP steps: params overrides, metrics flattening, data fetching, submit args."""

from __future__ import annotations

import pytest
import yaml

from pipelines import steps
from pipelines.submit import parse_run_arguments
from tests.fixtures.pipeline_data import write_tiny_data

PARAMS = {"train": {"epochs": 30, "learning_rate": 0.001, "augment": {"flip": True}}, "gate": {"min_accuracy": 0.8}}


def test_overrides_replace_dotted_keys_and_leave_the_rest():
    merged = steps.apply_overrides(PARAMS, {"train.epochs": 2, "train.augment.flip": False})
    assert merged["train"] == {"epochs": 2, "learning_rate": 0.001, "augment": {"flip": False}}
    assert PARAMS["train"]["epochs"] == 30, "the input params must not change"


def test_whole_number_floats_from_kfp_become_ints_where_params_hold_ints():
    merged = steps.apply_overrides(PARAMS, {"train.epochs": 2.0, "train.learning_rate": 1.0})
    assert merged["train"]["epochs"] == 2 and isinstance(merged["train"]["epochs"], int)
    assert isinstance(merged["train"]["learning_rate"], float)


@pytest.mark.parametrize("key", ["train.epoch", "trian.epochs", "train.augment.flip.x"])
def test_an_override_of_a_key_params_yaml_does_not_have_is_an_error(key):
    with pytest.raises(KeyError, match=key.split(".")[0]):
        steps.apply_overrides(PARAMS, {key: 1})


def test_numeric_items_flattens_nested_numbers_and_skips_text():
    metrics = {"accuracy": 0.9, "success": True, "worst_class": "mouse", "per_class": {"mouse": {"recall": 0.5}}}
    assert dict(steps.numeric_items(metrics)) == {"accuracy": 0.9, "success": 1.0, "per_class.mouse.recall": 0.5}


def test_fetch_data_copies_a_data_folder_and_writes_the_overridden_params(tmp_path):
    source = write_tiny_data(tmp_path / "source")
    steps.fetch_data(str(source), "", {"train.epochs": 3}, tmp_path / "data", tmp_path / "params.yaml")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["catalog", "images"]
    assert len(list((tmp_path / "data" / "images").rglob("*.jpg"))) == len(list(source.rglob("*.jpg")))
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["epochs"] == 3


def test_a_revision_for_a_plain_data_folder_is_refused(tmp_path):
    source = write_tiny_data(tmp_path / "source")
    with pytest.raises(ValueError, match="data_revision must be empty"):
        steps.fetch_data(str(source), "v1", {}, tmp_path / "data", tmp_path / "params.yaml")


def test_submit_arguments_parse_json_values_and_keep_plain_strings():
    arguments = parse_run_arguments(
        ['params_overrides={"train.epochs": 4}', "data_revision=v1", "component_image=registry.example/productlens:1"]
    )
    assert arguments == {
        "params_overrides": {"train.epochs": 4},
        "data_revision": "v1",
        "component_image": "registry.example/productlens:1",
    }
    with pytest.raises(ValueError, match="name=value"):
        parse_run_arguments(["no-equals-sign"])


def test_an_override_keeps_a_fraction_that_kfp_cannot_have_turned_from_an_int():
    assert steps.override_value(30, 2.5) == 2.5
