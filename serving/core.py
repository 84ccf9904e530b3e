"""The model manager: which versions are loaded, routing a ModelSpec to one, and keeping that in step with disk.

Like TF Serving's ServerCore with the file-system source and the availability-preserving
policy: every `file_system_poll_wait_seconds` each model's base_path is listed; versions the
version policy aspires to are loaded, warmed up, then marked AVAILABLE; versions no longer
aspired are unloaded only once an aspired version is AVAILABLE (so there is never a gap), and
only after their in-flight requests finish.

The core also owns the prediction logger (TF Serving's ServerCore owns its request logger): each config it applies
says which models log which share of their requests, and where.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from tensorflow_serving.apis import get_model_status_pb2, model_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import contract
from serving.config import BatchingOptions, ConfigError, ModelConfig, check_model_roots, model_configs
from serving.errors import ServingError, failed_precondition, invalid_argument, not_found, unavailable
from serving.metrics import ServerMetrics
from serving.prediction_log import PredictionLogger, PredictionLogOptions
from serving.servable import ServableVersion, State

log = logging.getLogger("serving.core")


@dataclass(frozen=True)
class CoreOptions:
    file_system_poll_wait_seconds: float = 1.0
    batching: BatchingOptions | None = None
    enable_model_warmup: bool = True
    allow_version_labels_for_unavailable_models: bool = False
    max_num_load_retries: int = 5
    load_retry_interval_s: float = 60.0
    config_root: Path | None = None  # relative base_paths resolve against this (default: the working directory)
    # Every base_path (startup config, config file polls, HandleReloadConfigRequest) must lie under one of these;
    # None: no restriction (the server always passes its --allowed_model_root folders).
    allowed_model_roots: tuple[Path, ...] | None = None
    prediction_log: PredictionLogOptions = PredictionLogOptions()  # file rotation and queue of the logging_configs


class _Model:
    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.versions: dict[int, ServableVersion] = {}  # history: END versions stay listed, as in TF Serving
        self.labels: dict[str, int] = {}
        self.warned_empty = False

    def available(self) -> list[ServableVersion]:
        return sorted((v for v in self.versions.values() if v.state == State.AVAILABLE), key=lambda v: v.version)


class ServerCore:
    """Owns every servable version; thread-safe; the gRPC and REST front ends call `servable()`, and hand what
    they answered to `prediction_logs`. With `metrics`, each batch scheduler reports its batch sizes there."""

    def __init__(
        self,
        config: model_server_config_pb2.ModelServerConfig,
        options: CoreOptions,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.options = options
        self.metrics = metrics
        self.prediction_logs = PredictionLogger(options.prediction_log, metrics)
        self._lock = threading.RLock()
        self._reconcile_lock = threading.Lock()
        self._models: dict[str, _Model] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._unloaders: list[threading.Thread] = []
        self._apply_config(self._checked_models(config), check_labels=False)

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Load what the config aspires to (blocking), apply its labels, then poll in the background."""
        self.reconcile()
        with self._lock:
            for model in self._models.values():
                self._set_labels(model, model.config.labels)
        self._poller = threading.Thread(target=self._poll, name="fs-poller", daemon=True)
        self._poller.start()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop polling, unload every version and write out the queued prediction logs, waiting up to timeout_s in all
        for requests still using a version.

        Returns False when something was still running at the deadline (its threads are daemons and are left
        behind)."""
        deadline = time.monotonic() + timeout_s

        def remaining() -> float:
            return max(deadline - time.monotonic(), 0.0)

        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=remaining())
        with self._lock:
            versions = [v for m in self._models.values() for v in m.versions.values() if v.state == State.AVAILABLE]
        finished = True
        for version in versions:
            finished = self._unload(version, timeout_s=remaining()) and finished
        for thread in list(self._unloaders):
            thread.join(timeout=remaining())
            finished = finished and not thread.is_alive()
        finished = self.prediction_logs.stop(remaining()) and finished
        return finished and (self._poller is None or not self._poller.is_alive())

    def _poll(self) -> None:
        while not self._stop.wait(self.options.file_system_poll_wait_seconds):
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - the poller must survive a bad pass and try again
                log.exception("file system poll failed")

    # ----- config ------------------------------------------------------------------------------
    def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """HandleReloadConfigRequest: replace the whole config (models missing from it are unloaded)."""
        try:
            models = self._checked_models(config)
        except ConfigError as error:
            raise invalid_argument(str(error)) from error
        self._apply_config(models, check_labels=True)
        self.reconcile()

    def _checked_models(self, config: model_server_config_pb2.ModelServerConfig) -> list[ModelConfig]:
        models = model_configs(config, self.options.config_root)
        if self.options.allowed_model_roots is not None:
            check_model_roots(models, self.options.allowed_model_roots)
        return models

    def _apply_config(self, models: list[ModelConfig], check_labels: bool) -> None:
        with self._lock:
            if check_labels and not self.options.allow_version_labels_for_unavailable_models:
                for config in models:
                    current = self._models.get(config.name)
                    for version in sorted(config.labels.values()):
                        loaded = current.versions.get(version) if current else None
                        if loaded is None or loaded.state != State.AVAILABLE:
                            raise failed_precondition(
                                f"Request to assign label to version {version} of model {config.name}, which is "
                                "not currently available for inference"
                            )
            wanted = {config.name: config for config in models}
            for name in list(self._models):
                if name not in wanted:
                    log.info("Model %s is no longer in the config; unloading its versions", name)
                    self._retire(self._models.pop(name))
            for name, config in wanted.items():
                model = self._models.get(name)
                if model is None:
                    self._models[name] = model = _Model(config)
                    log.info(
                        "Adding/updating models. model name: %s, base path: %s, version policy: %s",
                        name,
                        config.base_path,
                        config.policy.describe(),
                    )
                model.config = config
                if check_labels:
                    self._set_labels(model, config.labels)
            self.prediction_logs.configure(models)

    def _set_labels(self, model: _Model, labels: dict[str, int]) -> None:
        model.labels = dict(labels)
        for label, version in sorted(labels.items()):
            log.info("Label %s -> version %d of model %s", label, version, model.config.name)

    def _retire(self, model: _Model) -> None:
        for version in list(model.versions.values()):
            if version.state == State.AVAILABLE:
                self._unload_async(version)

    # ----- reconcile with disk -------------------------------------------------------------------
    def reconcile(self) -> None:
        """One pass of the file-system source: load aspired versions, then unload the rest (availability first)."""
        with self._reconcile_lock:
            with self._lock:
                models = list(self._models.values())
            for model in models:
                self._reconcile_model(model)

    def _reconcile_model(self, model: _Model) -> None:
        config = model.config
        on_disk = set(contract.versions(config.base_path))
        if not on_disk and not model.warned_empty:
            log.warning("No versions of servable %s found under base path %s", config.name, config.base_path)
        model.warned_empty = not on_disk
        aspired = config.policy.aspired(on_disk)
        for number in sorted(aspired, reverse=True):  # newest first: it is the one latest-routing serves
            with self._lock:
                current = model.versions.get(number)
                if current is not None and current.state in (State.LOADING, State.AVAILABLE, State.UNLOADING):
                    continue
                if current is not None and current.state == State.END and current.error is not None:
                    retry_due = time.monotonic() - current.last_attempt >= self.options.load_retry_interval_s
                    if current.load_attempts > self.options.max_num_load_retries or not retry_due:
                        continue
                    attempts = current.load_attempts
                else:
                    attempts = 0
                version = ServableVersion(config.name, number, config.base_path / str(number))
                version.load_attempts = attempts
                version.state = State.LOADING
                model.versions[number] = version
            self._load(version)
        with self._lock:
            aspired_available = any(model.versions[n].state == State.AVAILABLE for n in aspired if n in model.versions)
            for version in list(model.versions.values()):
                if version.version in aspired or version.state != State.AVAILABLE:
                    continue
                if aspired and not aspired_available:
                    continue  # keep serving the old version until a new one is AVAILABLE
                self._unload_async(version)

    def _load(self, version: ServableVersion) -> None:
        log.info("Approving load for servable version %s", version)
        version.load_attempts += 1
        version.last_attempt = time.monotonic()
        started = time.monotonic()
        try:
            version.load(self.options.batching, self.options.enable_model_warmup)
        except Exception as error:  # noqa: BLE001 - a broken version must not take the server down
            version.unload()
            message = error.message if isinstance(error, ServingError) else f"{type(error).__name__}: {error}"
            code = error.code if isinstance(error, ServingError) else grpc.StatusCode.UNKNOWN
            log.error("Loading servable: %s failed: %s", version, message)
            with self._lock:
                version.error = ServingError(code, message)
                version.state = State.END
            return
        if self.metrics is not None and version.scheduler is not None:
            # After the warmup: its batches are not traffic.
            version.scheduler.observe_batches(self.metrics.batch_observer(version.name, version.version))
        with self._lock:
            version.state = State.AVAILABLE
        log.info("Successfully loaded servable version %s in %.1fs", version, time.monotonic() - started)

    def _unload_async(self, version: ServableVersion) -> None:
        with self._lock:
            if version.state != State.AVAILABLE:
                return
            version.state = State.UNLOADING  # no longer routable: new requests go elsewhere from now on
        thread = threading.Thread(target=self._unload, args=(version,), name=f"unload-{version.version}", daemon=True)
        self._unloaders = [t for t in self._unloaders if t.is_alive()] + [thread]
        thread.start()

    def _unload(self, version: ServableVersion, timeout_s: float | None = None) -> bool:
        """Quiesce then unload; with a timeout, give up (False) if requests still hold the version by then."""
        with self._lock:
            version.state = State.UNLOADING
        log.info("Quiescing servable version %s (%d request(s) in flight)", version, version.inflight)
        if not version.wait_idle(timeout_s):
            log.error(
                "Servable version %s still has %d request(s) in flight; not unloading it", version, version.inflight
            )
            return False
        version.unload()
        with self._lock:
            version.state = State.END
        log.info("Done unloading servable version %s", version)
        return True

    # ----- routing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def servable(self, spec: model_pb2.ModelSpec) -> Iterator[ServableVersion]:
        """The version a ModelSpec names (version, label, or latest), held in flight for the block."""
        with self._lock:
            version = self._route(spec)
            version.acquire()
        try:
            yield version
        finally:
            version.release()

    def _route(self, spec: model_pb2.ModelSpec) -> ServableVersion:
        name = spec.name
        which = spec.WhichOneof("version_choice")
        model = self._models.get(name)
        if which == "version":
            number = int(spec.version.value)
            version = model.versions.get(number) if model else None
            if version is None or version.state != State.AVAILABLE:
                raise not_found(f"Servable not found for request: Specific({name}, {number})")
            return version
        if which == "version_label":
            label = spec.version_label
            if model is None or label not in model.labels:
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            number = model.labels[label]
            version = model.versions.get(number)
            if version is None or version.state != State.AVAILABLE:
                raise not_found(f"Servable not found for request: Specific({name}, {number})")
            return version
        if model is None:
            raise not_found(f"Servable not found for request: Latest({name})")
        available = model.available()
        if not available:
            states = ", ".join(
                f"{v.version}: {v.state.value}" for v in sorted(model.versions.values(), key=lambda v: -v.version)
            )
            raise unavailable(
                f"Servable not found for request: Latest({name}): no version is AVAILABLE yet"
                + (f" ({states})" if states else f"; no versions under {model.config.base_path}")
            )
        return available[-1]

    # ----- status ----------------------------------------------------------------------------------
    def model_status(self, spec: model_pb2.ModelSpec) -> get_model_status_pb2.GetModelStatusResponse:
        name = spec.name
        with self._lock:
            model = self._models.get(name)
            versions = sorted(model.versions.values(), key=lambda v: -v.version) if model else []
            which = spec.WhichOneof("version_choice")
            if which == "version_label" and model is not None and spec.version_label in model.labels:
                wanted = model.labels[spec.version_label]
                versions = [v for v in versions if v.version == wanted]
            elif which == "version_label":
                raise invalid_argument(f"Unrecognized servable version label: {spec.version_label}")
            elif which == "version":
                wanted = int(spec.version.value)
                versions = [v for v in versions if v.version == wanted]
                if not versions:
                    raise not_found(f"Could not find version {wanted} of model {name}")
            if not versions:
                raise not_found(f"Could not find any versions of model {name}")
            response = get_model_status_pb2.GetModelStatusResponse()
            for version in versions:
                entry = response.model_version_status.add()
                entry.version = version.version
                entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(version.state.value)
                entry.status.SetInParent()  # TF Serving always reports a status, OK included
                if version.error is not None:
                    entry.status.error_code = version.error.code.value[0]
                    entry.status.error_message = version.error.message
            return response

    def snapshot(self) -> dict[str, list[tuple[int, str]]]:
        """{model: [(version, state), ...]} newest first, for logs and tests."""
        with self._lock:
            return {
                name: [(v.version, v.state.value) for v in sorted(m.versions.values(), key=lambda v: -v.version)]
                for name, m in self._models.items()
            }

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def has_model(self, name: str) -> bool:
        """Whether the config names this model (cheap: for labelling a request's metrics)."""
        return name in self._models


__all__ = ["CoreOptions", "ServerCore", "ServingError"]
