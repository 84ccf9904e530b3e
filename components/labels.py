"""Version labels in models.config, in one place: `stable` after a publish, and the canary rollout.

TF Serving (and serving.server) route a request that names a version label to the version the label points at;
the recommender sends its traffic to `stable` and a configured share to `canary`. This module is the only code
that edits those labels (publish, promote and rollback call it):

    publish                     stable -> the version publish wrote or found serving (`label_stable`)
    publish --label canary      stable stays; canary -> the new version, both loaded   (`roll_out_canary`)
    productlens promote         stable -> the canary's version, previous -> the old stable (`promote`)
    productlens rollback        stable -> previous (after a promote), or the canary dropped (during one) (`rollback`)

TF Serving refuses a whole config whose label names a version it has not loaded, and a `latest` policy unloads the
stable version as soon as a newer folder appears. So the canary goes out in steps, each applied by the server before
the next is written: pin the policy to the stable version (`specific`), publish the new version and add it to the
policy, wait until it is AVAILABLE, then point `canary` at it. Each step is observable through the read-only
PredictionService/ModelService calls (the pin step points `canary` at the stable version for a moment, which the
server then answers for), so the commands work with any server that re-reads its config
(`--model_config_file_poll_wait_seconds`; TF Serving's official image too). Promote and rollback are one write each
that only moves labels between versions already loaded, so no request finds its label's version gone. After a
rollout the policy stays `specific`: the next model goes out as a canary again.

Every file is replaced atomically and keeps the comments at its top; the rest is written as text_format writes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from common.io import atomic_write_text
from serving.contract import versions

STABLE_LABEL = "stable"
CANARY_LABEL = "canary"
PREVIOUS_LABEL = "previous"  # the stable version before the last promote: what rollback returns to
SHIPPED_CONFIGS = (Path("serving/models.config"), Path("serving/k8s/models.config"))
DEFAULT_WAIT_S = 120.0  # a version loads and warms up in seconds; TF Serving re-reads its ConfigMap every minute


class LabelError(ValueError):
    """A models.config that cannot be labelled: unreadable, without the model, or not in a state for the step."""


def policy_versions(policy: model_server_config_pb2.ModelVersionPolicy, on_disk: list[int]) -> list[int]:
    """The versions of `on_disk` that a model_version_policy loads (unset: the latest one, as TF Serving)."""
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return on_disk
    if which == "specific":
        return [v for v in on_disk if v in set(policy.specific.versions)]
    latest = max(int(policy.latest.num_versions), 1) if which == "latest" else 1
    return on_disk[-latest:]


@dataclass
class ModelsConfig:
    """One models.config file, parsed; `write()` puts it back atomically with the comments at its top."""

    path: Path
    header: str
    text: str
    config: model_server_config_pb2.ModelServerConfig

    @classmethod
    def read(cls, path: Path) -> ModelsConfig:
        text = Path(path).read_text(encoding="utf-8")
        config = model_server_config_pb2.ModelServerConfig()
        try:
            text_format.Parse(text, config)
        except text_format.ParseError as error:
            raise LabelError(f"{path} is not a models.config (ModelServerConfig text proto): {error}") from error
        return cls(Path(path), "".join(_leading_comments(text)), text, config)

    def entry(self, model_name: str) -> model_server_config_pb2.ModelConfig:
        found = next((c for c in self.config.model_config_list.config if c.name == model_name), None)
        if found is None:
            raise LabelError(f"{self.path} configures no model '{model_name}', so it cannot label its versions")
        return found

    def labels(self, model_name: str) -> dict[str, int]:
        return dict(self.entry(model_name).version_labels)

    def pin(self, model_name: str, pinned: Iterable[int], labels: dict[str, int]) -> None:
        """Serve exactly the versions `pinned` (a `specific` policy) under `labels`."""
        entry = self.entry(model_name)
        entry.model_version_policy.Clear()
        entry.model_version_policy.specific.versions.extend(sorted(set(pinned)))
        entry.version_labels.clear()
        entry.version_labels.update(labels)

    def write(self) -> bool:
        """Replace the file when its content changed; returns whether it did."""
        updated = self.header + text_format.MessageToString(self.config)
        if updated == self.text:
            return False
        atomic_write_text(self.path, updated)
        self.text = updated
        return True


def _leading_comments(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    end = next((i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")), len(lines))
    return lines[:end]


# ----- stable, after a publish ---------------------------------------------------------------------------------
def label_stable(config_path: Path, model_name: str, version: int, model_dir: Path) -> str:
    """Point the `stable` label of `model_name` in the models.config at `config_path` at `version`, atomically;
    returns what it did, in one line.

    TF Serving refuses a whole config whose label names a version it has not loaded, so a label never names a
    version outside what the policy loads from `model_dir`: `stable` stays as it is when the policy would not
    load `version` (a `specific` policy), and other labels (`canary`) are kept only while their version is
    loaded. Comments at the top of the file are kept; the rest is written as text_format writes it.
    """
    models = ModelsConfig.read(config_path)
    entry = models.entry(model_name)
    loaded = policy_versions(entry.model_version_policy, versions(model_dir))
    if version not in loaded:
        return (
            f"{config_path}: labels unchanged: its model_version_policy loads versions {loaded}, not {version}; "
            f"add {version} to the policy to serve it"
        )
    labels = {label: v for label, v in entry.version_labels.items() if label == STABLE_LABEL or v in loaded}
    dropped = [
        f"{label} (version {number} is no longer loaded)"
        for label, number in sorted(entry.version_labels.items())
        if label not in labels
    ]
    labels[STABLE_LABEL] = version
    entry.version_labels.clear()
    entry.version_labels.update(labels)
    models.write()
    said = f"{config_path}: {STABLE_LABEL} -> version {version}"
    if dropped:
        said += f"; dropped {', '.join(dropped)}"
    return said


# ----- the model server, watched -------------------------------------------------------------------------------
class ModelServerWatch:
    """Read-only calls to a model server's gRPC API: which version a label resolves to, which versions are loaded.

    The rollout steps wait on these until the server has applied what was written (`until`)."""

    def __init__(self, address: str, model_name: str, timeout_s: float = 5.0) -> None:
        import grpc
        from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self.address = address
        self.model_name = model_name
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._predictions = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ModelServerWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def label_version(self, label: str) -> int | None:
        """The version `label` routes to now; None when the server does not know the label (or is unreachable)."""
        import grpc
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name, request.model_spec.version_label = self.model_name, label
        try:
            response = self._predictions.GetModelMetadata(request, timeout=self.timeout_s)
        except grpc.RpcError:
            return None
        return response.model_spec.version.value

    def available(self) -> set[int]:
        """The versions the server has AVAILABLE (none when it is unreachable)."""
        import grpc
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        try:
            response = self._models.GetModelStatus(request, timeout=self.timeout_s)
        except grpc.RpcError:
            return set()
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return {s.version for s in response.model_version_status if s.state == available}

    def until(self, done: Callable[[], bool], what: str, wait_s: float, poll_s: float = 0.1) -> None:
        """Return once `done()`; LabelError naming `what` after `wait_s`."""
        deadline = time.monotonic() + wait_s
        while not done():
            if time.monotonic() > deadline:
                raise LabelError(
                    f"the model server at {self.address} did not {what} within {wait_s:g} s: does it re-read its "
                    "config (--model_config_file_poll_wait_seconds)? The files say where the rollout stopped"
                )
            time.sleep(poll_s)


# ----- the canary rollout --------------------------------------------------------------------------------------
def _current(configs: list[ModelsConfig], model_name: str) -> tuple[int, dict[str, int]]:
    """The stable version and the labels, the same in every file (the first file's, checked against the rest)."""
    labels = configs[0].labels(model_name)
    for other in configs[1:]:
        if other.labels(model_name) != labels:
            raise LabelError(
                f"{configs[0].path} and {other.path} label different versions ({labels} vs "
                f"{other.labels(model_name)}): make them agree before a rollout step"
            )
    if STABLE_LABEL not in labels:
        raise LabelError(f"{configs[0].path} has no '{STABLE_LABEL}' label for '{model_name}' (run `make publish`)")
    return labels[STABLE_LABEL], labels


def _write_all(configs: list[ModelsConfig], model_name: str, pinned: Iterable[int], labels: dict[str, int]) -> None:
    for models in configs:
        models.pin(model_name, pinned, labels)
        models.write()


def _describe(labels: dict[str, int]) -> str:
    return ", ".join(f"{label} -> {version}" for label, version in sorted(labels.items()))


def pin_stable_for_canary(
    config_paths: list[Path], model_name: str, watch: ModelServerWatch, wait_s: float = DEFAULT_WAIT_S
) -> int:
    """Step 1 of a canary: serve only the stable version (a `specific` policy), so a new version folder cannot
    replace it; `canary` points at stable meanwhile (that is how the server shows it applied the step). Returns
    the stable version."""
    configs = [ModelsConfig.read(path) for path in config_paths]
    stable, _ = _current(configs, model_name)
    if stable not in watch.available():
        raise LabelError(f"the model server at {watch.address} does not serve the stable version {stable}")
    _write_all(configs, model_name, [stable], {STABLE_LABEL: stable, CANARY_LABEL: stable})
    watch.until(lambda: watch.label_version(CANARY_LABEL) == stable, f"pin version {stable}", wait_s)
    return stable


def label_canary(
    config_paths: list[Path],
    model_name: str,
    stable: int,
    canary: int,
    watch: ModelServerWatch,
    wait_s: float = DEFAULT_WAIT_S,
) -> str:
    """Steps 2 and 3 of a canary, once `canary` is on disk: load it beside stable, then point `canary` at it."""
    configs = [ModelsConfig.read(path) for path in config_paths]
    if canary == stable:
        _write_all(configs, model_name, [stable], {STABLE_LABEL: stable})
        return f"version {stable} is the stable version already: no canary"
    _write_all(configs, model_name, [stable, canary], {STABLE_LABEL: stable, CANARY_LABEL: stable})
    watch.until(lambda: canary in watch.available(), f"load version {canary}", wait_s)
    labels = {STABLE_LABEL: stable, CANARY_LABEL: canary}
    _write_all(configs, model_name, [stable, canary], labels)
    watch.until(lambda: watch.label_version(CANARY_LABEL) == canary, f"point {CANARY_LABEL} at {canary}", wait_s)
    return f"{', '.join(str(c.path) for c in configs)}: {_describe(labels)} (both loaded)"


def promote(
    config_paths: list[Path], model_name: str, watch: ModelServerWatch | None = None, wait_s: float = DEFAULT_WAIT_S
) -> str:
    """`stable` -> the canary's version; the old stable stays loaded as `previous` for a rollback."""
    configs = [ModelsConfig.read(path) for path in config_paths]
    stable, labels = _current(configs, model_name)
    canary = labels.get(CANARY_LABEL)
    if canary is None or canary == stable:
        raise LabelError(f"{configs[0].path} has no canary to promote (labels: {_describe(labels)})")
    new = {STABLE_LABEL: canary, PREVIOUS_LABEL: stable}
    _write_all(configs, model_name, [stable, canary], new)
    if watch is not None:
        watch.until(lambda: watch.label_version(STABLE_LABEL) == canary, f"point {STABLE_LABEL} at {canary}", wait_s)
    return f"promoted version {canary}: {_describe(new)}"


def rollback(
    config_paths: list[Path], model_name: str, watch: ModelServerWatch | None = None, wait_s: float = DEFAULT_WAIT_S
) -> str:
    """After a promote: `stable` -> `previous` and the promoted version unloaded. During a canary: the canary
    dropped, stable unchanged."""
    configs = [ModelsConfig.read(path) for path in config_paths]
    stable, labels = _current(configs, model_name)
    previous, canary = labels.get(PREVIOUS_LABEL), labels.get(CANARY_LABEL)
    if previous is not None:
        _write_all(configs, model_name, [previous], {STABLE_LABEL: previous})
        if watch is not None:
            watch.until(
                lambda: watch.label_version(STABLE_LABEL) == previous, f"point {STABLE_LABEL} at {previous}", wait_s
            )
        return f"rolled back: {STABLE_LABEL} -> {previous} (version {stable} unloaded)"
    if canary is not None and canary != stable:
        _write_all(configs, model_name, [stable], {STABLE_LABEL: stable})
        if watch is not None:
            watch.until(lambda: watch.label_version(CANARY_LABEL) is None, f"drop {CANARY_LABEL}", wait_s)
        return f"canary version {canary} dropped; {STABLE_LABEL} stays at {stable}"
    raise LabelError(
        f"{configs[0].path} has nothing to roll back: no '{PREVIOUS_LABEL}' label (no promote since the last "
        f"rollout) and no canary (labels: {_describe(labels)})"
    )
