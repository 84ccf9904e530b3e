"""Typed loading of `params.yaml`: each step declares a dataclass for its own section.

Unknown or missing keys are errors, so a typo in params.yaml fails loudly instead of
silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_PARAMS_PATH = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml does not match what a step expects."""


def load_params(path: Path = DEFAULT_PARAMS_PATH) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        params = yaml.safe_load(handle) or {}
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in params or not isinstance(params[name], dict):
        raise ParamsError(f"params has no '{name}:' section")
    return params[name]


def build(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build dataclass `cls` from `values`, rejecting unknown and missing keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; expected {sorted(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ParamsError(f"{where}: missing key(s) {missing}")
    return cls(**values)


def load_section(cls: type[T], name: str, path: Path = DEFAULT_PARAMS_PATH) -> T:
    """Load the `name:` section of the params file at `path` as dataclass `cls`."""
    return build(cls, section(load_params(path), name), f"{path}:{name}")
