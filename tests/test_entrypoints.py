"""Every command the deployment files start resolves to something that exists.

The commands come from docker-compose*.yml (entrypoint, command, healthcheck), every Dockerfile (ENTRYPOINT, CMD
and the modules its org.productlens.entrypoints label lists) and every Kubernetes/KServe manifest under
serving/k8s/, pipelines/k8s/ and recommender/k8s/ (containers and their exec probes; a KServe TensorFlow predictor
runs tensorflow_model_server). On the project's image a command is `python -m <module>` or `uvicorn <module>:<attr>`:
the module must be this project's and runnable with `python -m`, its flags must parse where it has `parse_args`,
and uvicorn's attribute must be an ASGI app (with --factory: a callable that builds one). On a third-party image
the command must be one of that image's own programs (THIRD_PARTY_PROGRAMS); tensorflow_model_server's flags are
checked in tests/serving/test_deployment.py. `docker compose config` needs Docker; this runs anywhere.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.training_pipeline import DEFAULT_IMAGE_REPOSITORY
from tests.conftest import REPO_ROOT

PROJECT_IMAGE = "the project image"
MANIFEST_FOLDERS = (REPO_ROOT / "serving" / "k8s", REPO_ROOT / "pipelines" / "k8s", REPO_ROOT / "recommender" / "k8s")
# Programs a third-party image ships, by image repository: a command on such an image must be one of them.
THIRD_PARTY_PROGRAMS = {
    "tensorflow/serving": {"tensorflow_model_server", "bash"},  # bash: compose's port healthcheck
    "busybox": {"sleep"},  # pipelines/k8s/volume-loader.yaml
}


@dataclass(frozen=True)
class Command:
    where: str
    image: str  # PROJECT_IMAGE, or a third-party image reference
    argv: tuple[str, ...]


# --------------------------------------------------------------------------- where the commands are


def as_argv(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


@dataclass(frozen=True)
class Dockerfile:
    path: Path
    entrypoint: list[str]
    cmd: list[str]
    listed_entrypoints: list[str]

    @classmethod
    def read(cls, path: Path) -> Dockerfile:
        text = path.read_text(encoding="utf-8")

        def instruction(name: str) -> list[str]:
            found = re.findall(rf"^{name}\s+(.+)$", text, re.M)
            if not found:
                return []
            last = found[-1].strip()  # the last one wins, as in Docker
            return json.loads(last) if last.startswith("[") else ["/bin/sh", "-c", last]

        label = re.search(r'org\.productlens\.entrypoints="([^"]+)"', text)
        return cls(path, instruction("ENTRYPOINT"), instruction("CMD"), label.group(1).split() if label else [])


def dockerfiles() -> list[Path]:
    return sorted(
        path
        for path in REPO_ROOT.rglob("Dockerfile*")
        if path.is_file() and not path.name.endswith(".dockerignore")
        and not {".venv", ".git", "node_modules"} & set(path.relative_to(REPO_ROOT).parts)
    )  # fmt: skip


def dockerfile_commands() -> Iterator[Command]:
    for path in dockerfiles():
        dockerfile = Dockerfile.read(path)
        where = str(path.relative_to(REPO_ROOT))
        yield Command(f"{where}: ENTRYPOINT + CMD", PROJECT_IMAGE, (*dockerfile.entrypoint, *dockerfile.cmd))
        # The label lists modules whose flags the caller (dvc.yaml, KFP) gives: each must answer --help.
        for module in dockerfile.listed_entrypoints:
            argv = (*dockerfile.entrypoint, module, "--help")
            yield Command(f"{where}: entrypoints label {module}", PROJECT_IMAGE, argv)


def healthcheck_argv(test: str | list[str]) -> list[str]:
    argv = as_argv(test)
    if argv[:1] == ["CMD-SHELL"]:
        return ["/bin/sh", "-c", *argv[1:]]
    return argv[1:] if argv[:1] == ["CMD"] else argv


def compose_commands() -> Iterator[Command]:
    for path in sorted(REPO_ROOT.glob("docker-compose*.y*ml")):
        for name, service in yaml.safe_load(path.read_text(encoding="utf-8"))["services"].items():
            where = f"{path.name}: services.{name}"
            if "build" in service:
                build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
                context = REPO_ROOT / build.get("context", ".")
                dockerfile = Dockerfile.read(context / build.get("dockerfile", "Dockerfile"))
                image = PROJECT_IMAGE
                entrypoint = as_argv(service["entrypoint"]) if "entrypoint" in service else dockerfile.entrypoint
                # Docker drops the image's CMD when the entrypoint is overridden.
                default_cmd = [] if "entrypoint" in service else dockerfile.cmd
                argv = [*entrypoint, *(as_argv(service["command"]) if "command" in service else default_cmd)]
            else:
                image = service["image"]
                argv = [*as_argv(service.get("entrypoint")), *as_argv(service.get("command"))]
            if argv:  # none: the image's own default command
                yield Command(where, image, tuple(argv))
            if "test" in service.get("healthcheck", {}):
                yield Command(f"{where}.healthcheck", image, tuple(healthcheck_argv(service["healthcheck"]["test"])))


def image_repository(reference: str) -> str:
    """`ghcr.io/org/name:tag@sha256:...` -> `ghcr.io/org/name` (a registry port is not a tag)."""
    head, _, last = reference.split("@")[0].rpartition("/")
    name = last.split(":")[0]
    return f"{head}/{name}" if head else name


def manifest_image(reference: str) -> str:
    """PROJECT_IMAGE for the component image (components/Dockerfile, whatever registry), else the reference."""
    return PROJECT_IMAGE if image_repository(reference).split("/")[-1] == "productlens-components" else reference


def containers(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)


def manifest_commands() -> Iterator[Command]:
    for folder in MANIFEST_FOLDERS:
        for path in sorted(folder.rglob("*.yaml")):
            for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                if not document:
                    continue
                name = document.get("metadata", {}).get("name", "")
                where = f"{path.relative_to(REPO_ROOT)}: {document.get('kind')} {name}"
                for container in containers(document):
                    image = manifest_image(container["image"])
                    argv = [*as_argv(container.get("command")), *as_argv(container.get("args"))]
                    if argv:
                        yield Command(f"{where} container {container['name']}", image, tuple(argv))
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        if "exec" in container.get(probe, {}):
                            argv = as_argv(container[probe]["exec"]["command"])
                            yield Command(f"{where} {container['name']}.{probe}", image, tuple(argv))
                model = document.get("spec", {}).get("predictor", {}).get("model")
                if model and model["modelFormat"]["name"] == "tensorflow":  # KServe's TF Serving runtime
                    runtime = f"tensorflow/serving:{model.get('runtimeVersion', 'latest')}"
                    argv = ("tensorflow_model_server", *as_argv(model.get("args")))
                    yield Command(f"{where} predictor", runtime, argv)


def all_commands() -> list[Command]:
    return [*compose_commands(), *dockerfile_commands(), *manifest_commands()]


# --------------------------------------------------------------------------- what makes a command resolve


def runs_as_main(module: str) -> str | None:
    """Why `python -m module` would not run it, or None when it would."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return f"no module {module}"
    if spec.submodule_search_locations is not None:
        return None if importlib.util.find_spec(f"{module}.__main__") else f"package {module} has no __main__"
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    guarded = any(
        isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)
        for node in tree.body
    )
    return None if guarded else f'{module} has no `if __name__ == "__main__":`: python -m runs nothing'


def flag_problem(module: str, args: list[str]) -> str | None:
    """Why the module's own parser refuses `args`, for modules with a top-level parse_args(argv)."""
    if "--help" in args:
        return None
    loaded = importlib.import_module(module)
    parse_args = getattr(loaded, "parse_args", None)
    if parse_args is None:
        return None
    try:
        parse_args(args)
    except SystemExit as exit_:
        return f"{module} refuses {shlex.join(args)} (exit {exit_.code})"
    return None


def uvicorn_problem(args: list[str]) -> str | None:
    targets = [arg for arg in args if re.fullmatch(r"[\w.]+:[\w.]+", arg)]
    if len(targets) != 1:
        return f"uvicorn {shlex.join(args)}: no single module:attribute"
    module_name, attribute = targets[0].split(":")
    if importlib.util.find_spec(module_name) is None:
        return f"no module {module_name}"
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        if not hasattr(target, part):
            return f"{module_name} has no attribute {attribute}" + (
                "" if "--factory" in args else " (an app factory needs --factory)"
            )
        target = getattr(target, part)
    if "--factory" in args:
        if not callable(target):
            return f"{targets[0]} is not callable, so --factory cannot build an app from it"
        return None if callable(target()) else f"{targets[0]}() does not return an ASGI app"
    if inspect.isfunction(target) and not inspect.iscoroutinefunction(target):
        return f"{targets[0]} is a plain function, not an ASGI app: an app factory needs --factory"
    return None if callable(target) else f"{targets[0]} is not an ASGI app"


def command_problem(command: Command) -> str | None:
    """Why `command` would not start, or None."""
    argv = list(command.argv)
    if command.image != PROJECT_IMAGE:
        programs = THIRD_PARTY_PROGRAMS.get(image_repository(command.image))
        if programs is None:
            return f"{command.image}: no known programs; add the image to THIRD_PARTY_PROGRAMS"
        return None if argv[0] in programs else f"{command.image} has no program {argv[0]} we know of"
    if len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m":
        module, args = argv[2], argv[3:]
        if module == "uvicorn":
            return uvicorn_problem(args)
        return runs_as_main(module) or flag_problem(module, args)
    if argv[0] == "uvicorn":
        return uvicorn_problem(argv[1:])
    return f"{shlex.join(argv)}: neither python -m <module> nor uvicorn <module>:<attribute>"


# --------------------------------------------------------------------------- tests

COMMANDS = all_commands()


def test_the_commands_of_compose_the_dockerfile_and_the_manifests_are_all_found():
    places = {command.where.split(":")[0] for command in COMMANDS}
    assert {
        "docker-compose.yml",
        "components/Dockerfile",
        "serving/k8s/deployment.yaml",
        "recommender/k8s/deployment.yaml",
    } <= places
    assert any("kserve" in place for place in places)
    recommender = [command for command in COMMANDS if command.where == "docker-compose.yml: services.recommender"]
    assert recommender and recommender[0].image == PROJECT_IMAGE


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: command.where)
def test_every_command_resolves(command):
    assert command_problem(command) is None, f"{command.where}: {shlex.join(command.argv)}"


def test_the_compose_recommender_runs_the_app_module_with_flags_it_accepts():
    (recommender,) = [command for command in COMMANDS if command.where == "docker-compose.yml: services.recommender"]
    assert recommender.argv[:3] == ("python", "-m", "recommender.app")
    assert command_problem(recommender) is None


def test_the_check_refuses_the_uvicorn_command_issue_14_reported():
    reported = Command("issue 14", PROJECT_IMAGE, ("uvicorn", "recommender.app:app", "--host", "0.0.0.0"))
    assert command_problem(reported) == "recommender.app has no attribute app (an app factory needs --factory)"
    plain_function = Command("issue 14", PROJECT_IMAGE, ("uvicorn", "recommender.app:create_app"))
    assert "needs --factory" in command_problem(plain_function)


def test_the_check_accepts_the_factory_form_and_refuses_unknown_modules_and_flags():
    factory = ("uvicorn", "--factory", "recommender.app:create_app", "--port", "8080")
    assert command_problem(Command("factory", PROJECT_IMAGE, factory)) is None
    typo = Command("typo", PROJECT_IMAGE, ("python", "-m", "recommender.ap"))
    assert command_problem(typo) == "no module recommender.ap"
    bad_flag = Command("flag", PROJECT_IMAGE, ("python", "-m", "recommender.app", "--bind", "0.0.0.0"))
    assert "refuses --bind 0.0.0.0" in command_problem(bad_flag)


def test_manifests_naming_the_component_image_are_checked_as_the_project_image():
    assert manifest_image(f"{DEFAULT_IMAGE_REPOSITORY}:0.1.0") == PROJECT_IMAGE
    assert manifest_image("localhost:5000/productlens-components@sha256:" + "0" * 64) == PROJECT_IMAGE
    assert manifest_image("tensorflow/serving:2.21.0") == "tensorflow/serving:2.21.0"
