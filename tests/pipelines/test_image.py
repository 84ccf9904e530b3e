"""components/Dockerfile: pinned base, non-root, no data or weights, and entrypoints that exist."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex

import yaml

from tests.conftest import REPO_ROOT

DOCKERFILE = (REPO_ROOT / "components" / "Dockerfile").read_text(encoding="utf-8")
DOCKERIGNORE = (REPO_ROOT / "components" / "Dockerfile.dockerignore").read_text(encoding="utf-8")


def entrypoint_modules() -> list[str]:
    label = re.search(r'org\.productlens\.entrypoints="([^"]+)"', DOCKERFILE)
    assert label, "the Dockerfile must list its entrypoints in the org.productlens.entrypoints label"
    return label.group(1).split()


def test_every_entrypoint_of_the_image_is_a_module():
    missing = [module for module in entrypoint_modules() if importlib.util.find_spec(module) is None]
    assert not missing, f"the image lists entrypoints that are not modules: {missing}"


def test_default_command_is_a_listed_entrypoint():
    command = json.loads(re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.M).group(1))
    assert json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE, re.M).group(1)) == ["python", "-m"]
    assert command[0] in entrypoint_modules()


def test_every_dvc_stage_is_an_entrypoint_of_the_image():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    modules = {shlex.split(stage["cmd"])[2] for stage in stages.values()}  # cmd: python -m <module> ...
    assert modules <= set(entrypoint_modules())


def test_base_image_is_pinned_and_user_is_not_root():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    user = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert user and user[-1].split(":")[0] not in {"root", "0"}


def test_project_is_installed_from_the_lock_file_without_data_or_weights():
    assert "pip install -r requirements.lock" in DOCKERFILE
    copied = " ".join(re.findall(r"^COPY (.+)$", DOCKERFILE, re.M))
    for forbidden in ("data ", "data/", "models", "weights", "artifacts", ".venv"):
        assert forbidden not in copied.split() and f" {forbidden}" not in f" {copied}", forbidden
    assert DOCKERIGNORE.splitlines()[1] == "**", "the build context must start from nothing"
