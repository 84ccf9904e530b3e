"""TF Serving's configuration files: the model server config, the batching parameters and the monitoring config,
all text protos.

`models.config` is a `tensorflow.serving.ModelServerConfig` (the file `tensorflow_model_server
--model_config_file` reads); the batching file is a `tensorflow.serving.BatchingParameters`
(`--batching_parameters_file`); the monitoring file is a `tensorflow.serving.MonitoringConfig`
(`--monitoring_config_file`). The same files run the official image in production.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2
from tensorflow_serving.config import model_server_config_pb2


class ConfigError(ValueError):
    """A config file does not parse or asks for something the server cannot do."""


def _batching_parameters_class() -> type:
    """BatchingParameters from session_bundle_config.proto.

    The tensorflow-serving-api wheel ships only apis/ and config/ (and not all of config/: no monitoring_config),
    not servables/, so when the generated module is missing the message is declared here with TF Serving's field
    numbers, in a private descriptor pool (no clash if the real module is imported later).
    """
    try:
        from tensorflow_serving.servables.tensorflow.session_bundle_config_pb2 import (  # type: ignore[import-not-found]
            BatchingParameters,
        )

        return BatchingParameters
    except ImportError:
        pass
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb))
    proto = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    message = proto.message_type.add(name="BatchingParameters")
    F = descriptor_pb2.FieldDescriptorProto
    for number, name, type_name in [
        (1, "max_batch_size", ".google.protobuf.Int64Value"),
        (2, "batch_timeout_micros", ".google.protobuf.Int64Value"),
        (3, "max_enqueued_batches", ".google.protobuf.Int64Value"),
        (4, "num_batch_threads", ".google.protobuf.Int64Value"),
        (5, "thread_pool_name", ".google.protobuf.StringValue"),
    ]:
        message.field.add(name=name, number=number, type=F.TYPE_MESSAGE, type_name=type_name, label=F.LABEL_OPTIONAL)
    message.field.add(name="allowed_batch_sizes", number=6, type=F.TYPE_INT64, label=F.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


BatchingParameters = _batching_parameters_class()


def _monitoring_config_class() -> type:
    """MonitoringConfig from monitoring_config.proto, declared like BatchingParameters when the wheel lacks it."""
    try:
        from tensorflow_serving.config.monitoring_config_pb2 import MonitoringConfig  # type: ignore[import-not-found]

        return MonitoringConfig
    except ImportError:
        pass
    pool = descriptor_pool.DescriptorPool()
    proto = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/config/monitoring_config.proto", package="tensorflow.serving", syntax="proto3"
    )
    F = descriptor_pb2.FieldDescriptorProto
    prometheus = proto.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=F.TYPE_BOOL, label=F.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    monitoring = proto.message_type.add(name="MonitoringConfig")
    monitoring.field.add(
        name="prometheus_config",
        number=1,
        type=F.TYPE_MESSAGE,
        type_name=".tensorflow.serving.PrometheusConfig",
        label=F.LABEL_OPTIONAL,
    )
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


MonitoringConfig = _monitoring_config_class()
# TF Serving's PrometheusExporter::kPrometheusPath: where metrics are when the config enables them without a path.
DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"


@dataclass(frozen=True)
class MonitoringOptions:
    """--monitoring_config_file as TF Serving applies it: Prometheus metrics on the REST port at `prometheus_path`
    when `prometheus_enabled`; without the file, no metrics page."""

    prometheus_enabled: bool = False
    prometheus_path: str = DEFAULT_PROMETHEUS_PATH


def parse_monitoring_config(text: str, where: str = "monitoring config") -> MonitoringOptions:
    message = MonitoringConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise ConfigError(f"{where}: not a MonitoringConfig text proto: {error}") from error
    prometheus = message.prometheus_config
    path = prometheus.path or DEFAULT_PROMETHEUS_PATH
    if not path.startswith("/") or path.lower().startswith("/v1/") or path.lower() == "/v1":
        raise ConfigError(
            f"{where}: prometheus_config path {path!r} must start with '/' and lie outside the API's /v1/ paths"
        )
    return MonitoringOptions(prometheus_enabled=bool(prometheus.enable), prometheus_path=path)


def load_monitoring_config(path: Path) -> MonitoringOptions:
    return parse_monitoring_config(Path(path).read_text(encoding="utf-8"), str(path))


@dataclass(frozen=True)
class BatchingOptions:
    """Batching as TF Serving applies it; unset fields take BatchingSession's defaults."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.num_batch_threads < 1 or self.max_enqueued_batches < 1:
            raise ConfigError("batching: max_batch_size, num_batch_threads and max_enqueued_batches must be >= 1")
        if self.batch_timeout_micros < 0:
            raise ConfigError("batching: batch_timeout_micros must be >= 0")
        sizes = list(self.allowed_batch_sizes)
        if sizes:
            if sizes != sorted(set(sizes)) or sizes[0] < 1:
                raise ConfigError(f"batching: allowed_batch_sizes {sizes} must be positive and strictly increasing")
            if sizes[-1] != self.max_batch_size:
                raise ConfigError(
                    f"batching: the last allowed_batch_sizes entry ({sizes[-1]}) must equal max_batch_size "
                    f"({self.max_batch_size})"
                )
        if self.pad_variable_length_inputs:
            raise ConfigError("batching: pad_variable_length_inputs is not supported by this server")


def parse_batching_parameters(text: str, where: str = "batching parameters") -> BatchingOptions:
    message = BatchingParameters()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise ConfigError(f"{where}: not a BatchingParameters text proto: {error}") from error
    values: dict = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        if message.HasField(name):
            values[name] = int(getattr(message, name).value)
    values["allowed_batch_sizes"] = tuple(int(size) for size in message.allowed_batch_sizes)
    values["pad_variable_length_inputs"] = bool(message.pad_variable_length_inputs)
    try:
        return BatchingOptions(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from error


def load_batching_parameters(path: Path) -> BatchingOptions:
    return parse_batching_parameters(Path(path).read_text(encoding="utf-8"), str(path))


@dataclass(frozen=True)
class VersionPolicy:
    """Which version directories under base_path to serve: the `num_versions` highest, all, or exactly `versions`."""

    kind: str  # "latest" | "all" | "specific"
    num_versions: int = 1
    versions: frozenset[int] = frozenset()

    def aspired(self, on_disk: set[int]) -> set[int]:
        if self.kind == "all":
            return set(on_disk)
        if self.kind == "specific":
            return set(on_disk) & set(self.versions)
        return set(sorted(on_disk, reverse=True)[: self.num_versions])

    def describe(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return f"specific {sorted(self.versions)}"
        return "all"


# LogCollectorConfig.type values this server writes: TF Serving leaves the collector to a registered plugin; here
# the one collector writes TFRecord files of PredictionLog records (serving/prediction_log.py).
LOG_COLLECTOR_TYPES = ("",)


@dataclass(frozen=True)
class PredictionLogging:
    """A model's `logging_config`: the share of its answered Predict and Classify requests (with their responses)
    written as PredictionLog records to TFRecord files whose names start with `filename_prefix`."""

    filename_prefix: str  # absolute; relative prefixes resolve like base_path
    sampling_rate: float


@dataclass(frozen=True)
class ModelConfig:
    name: str
    base_path: Path
    policy: VersionPolicy
    labels: dict[str, int]
    logging: PredictionLogging | None = None


def _policy_of(config: model_server_config_pb2.ModelConfig) -> VersionPolicy:
    policy = config.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy("all")
    if choice == "specific":
        if not policy.specific.versions:
            raise ConfigError(f"model {config.name!r}: model_version_policy specific {{}} lists no versions")
        return VersionPolicy("specific", versions=frozenset(int(v) for v in policy.specific.versions))
    # Unset policy and `latest {}` both mean the single highest version, as in TF Serving.
    num = int(policy.latest.num_versions) if choice == "latest" else 1
    return VersionPolicy("latest", num_versions=max(num, 1))


def _logging_of(config: model_server_config_pb2.ModelConfig, root: Path | None) -> PredictionLogging | None:
    """The model's logging_config, checked; None when it has none (nothing is logged)."""
    if not config.HasField("logging_config"):
        return None
    logging = config.logging_config
    where = f"model {config.name!r}: logging_config"
    if logging.HasField("custom_logging_config"):
        raise ConfigError(f"{where}: custom_logging_config is not supported; use log_collector_config")
    collector = logging.log_collector_config
    if collector.type not in LOG_COLLECTOR_TYPES:
        raise ConfigError(
            f"{where}: log_collector_config type {collector.type!r} is not supported; "
            f'use type: "" (TFRecord files of PredictionLog records)'
        )
    if not collector.filename_prefix:
        example = f"logs/predictions/{config.name}"
        raise ConfigError(f'{where}: log_collector_config needs a filename_prefix (e.g. "{example}")')
    sampling = logging.sampling_config
    if sampling.per_task_sampling_configs:
        raise ConfigError(f"{where}: per_task_sampling_configs is not supported; set sampling_rate")
    rate = float(sampling.sampling_rate)
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"{where}: sampling_rate {rate} must lie between 0 and 1")
    # A string, not a Path: a trailing '/' (files named by time alone, inside that folder) must survive.
    prefix = os.path.join(root or Path.cwd(), collector.filename_prefix)
    return PredictionLogging(filename_prefix=prefix, sampling_rate=rate)


def model_configs(config: model_server_config_pb2.ModelServerConfig, root: Path | None = None) -> list[ModelConfig]:
    """Validate a ModelServerConfig and return one ModelConfig per model; relative base paths resolve against root."""
    if config.WhichOneof("config") == "custom_model_config":
        raise ConfigError("custom_model_config is not supported; use model_config_list")
    seen: set[str] = set()
    models: list[ModelConfig] = []
    for entry in config.model_config_list.config:
        if not entry.name:
            raise ConfigError("a model config has no name")
        if entry.name in seen:
            raise ConfigError(f"model {entry.name!r} is configured twice")
        seen.add(entry.name)
        if not entry.base_path:
            raise ConfigError(f"model {entry.name!r} has no base_path")
        if entry.model_platform not in ("", "tensorflow"):
            raise ConfigError(f"model {entry.name!r}: model_platform {entry.model_platform!r} is not 'tensorflow'")
        base = Path(entry.base_path)
        if not base.is_absolute():
            base = (root or Path.cwd()) / base
        models.append(
            ModelConfig(
                name=entry.name,
                base_path=base,
                policy=_policy_of(entry),
                labels={str(k): int(v) for k, v in entry.version_labels.items()},
                logging=_logging_of(entry, root),
            )
        )
    return models


def default_model_roots(models: list[ModelConfig]) -> tuple[Path, ...]:
    """The folders a config may name when no --allowed_model_root is given: each base path's parent (the models
    folder beside it), or the base path itself when its parent is the filesystem root."""
    roots: list[Path] = []
    for model in models:
        base = Path(os.path.realpath(model.base_path))
        root = base if base.parent == Path(base.anchor) else base.parent
        if root not in roots:
            roots.append(root)
    return tuple(roots)


def check_model_roots(models: list[ModelConfig], roots: tuple[Path, ...]) -> None:
    """Refuse a config whose base paths leave the allowed model roots (symlinks and '..' resolved first)."""
    resolved = [Path(os.path.realpath(root)) for root in roots]
    for model in models:
        base = Path(os.path.realpath(model.base_path))
        if not any(base.is_relative_to(root) for root in resolved):
            allowed = ", ".join(str(root) for root in resolved) or "none"
            raise ConfigError(
                f"model {model.name!r}: base_path {model.base_path} is outside the allowed model roots ({allowed}); "
                "the server's --allowed_model_root flag decides which folders a config may name"
            )


def parse_model_server_config(text: str, where: str = "model config") -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ConfigError(f"{where}: not a ModelServerConfig text proto: {error}") from error
    return config


def load_model_server_config(path: Path) -> model_server_config_pb2.ModelServerConfig:
    return parse_model_server_config(Path(path).read_text(encoding="utf-8"), str(path))


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """The config `--model_name/--model_base_path` stand for: one model, latest version."""
    config = model_server_config_pb2.ModelServerConfig()
    entry = config.model_config_list.config.add()
    entry.name = name
    entry.base_path = base_path
    entry.model_platform = "tensorflow"
    return config
