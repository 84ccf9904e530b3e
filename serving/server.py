"""ProductLens model server: TF Serving's gRPC and REST protocol, its flags and its config files, in Python.

    python -m serving.server --port=8500 --rest_api_port=8501 \
        --model_config_file=serving/models.config \
        --enable_batching --batching_parameters_file=serving/batching.config

The flags are tensorflow_model_server's (a subset), so the same command line, models.config and
batching file run the official tensorflow/serving image in production (serving/k8s/). Like TF
Serving, the ports open once the initially aspired versions have loaded (or failed to).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import tensorflow as tf

from components.common.io import atomic_write_json
from serving.config import (
    BatchingOptions,
    ConfigError,
    load_batching_parameters,
    load_model_server_config,
    single_model_config,
)
from serving.core import CoreOptions, ServerCore
from serving.grpc_api import add_services
from serving.rest_api import RestApi, RestServer

log = logging.getLogger("serving.server")

DEFAULT_MAX_REQUEST_BYTES = 16 << 20


def _flag_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--port", type=int, default=8500, help="gRPC port (0: pick a free one)")
    add("--rest_api_port", type=int, default=0, help="REST port (0: REST off, as in TF Serving; -1: pick a free one)")
    add("--host", default="0.0.0.0", help="address to bind both ports to")
    add("--model_config_file", type=Path, help="ModelServerConfig text proto (models.config)")
    add("--model_config_file_poll_wait_seconds", type=float, default=0, help="re-read the config file; 0 = read once")
    add("--model_name", default="default", help="with --model_base_path, when there is no --model_config_file")
    add("--model_base_path", help="directory holding <version>/ SavedModels")
    add("--file_system_poll_wait_seconds", type=float, default=1.0, help="how often to look for new versions")
    add("--enable_batching", type=_flag_bool, nargs="?", const=True, default=False)
    add("--batching_parameters_file", type=Path, help="BatchingParameters text proto")
    add("--enable_model_warmup", type=_flag_bool, nargs="?", const=True, default=True)
    add("--allow_version_labels_for_unavailable_models", type=_flag_bool, nargs="?", const=True, default=False)
    add("--max_num_load_retries", type=int, default=5)
    add("--load_retry_interval_micros", type=int, default=60_000_000)
    add("--rest_api_timeout_in_ms", type=int, default=30_000)
    add("--grpc_max_threads", type=int, default=64, help="gRPC handler threads (requests beyond them queue)")
    add("--grpc_channel_arguments", default="", help="comma-separated key=value gRPC server arguments")
    add("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="largest gRPC message / REST body")
    add("--tensorflow_intra_op_parallelism", type=int, default=0)
    add("--tensorflow_inter_op_parallelism", type=int, default=0)
    add("--ready_file", type=Path, help="write {grpc_port, rest_port, pid} here once the ports are open")
    add("--log_level", default="INFO")
    args = parser.parse_args(argv)
    if args.model_config_file is None and args.model_base_path is None:
        parser.error("give --model_config_file, or --model_name and --model_base_path")
    return args


def channel_arguments(text: str, max_request_bytes: int) -> list[tuple[str, object]]:
    options: dict[str, object] = {
        "grpc.max_receive_message_length": max_request_bytes,
        "grpc.max_send_message_length": -1,
        "grpc.so_reuseport": 0,  # two servers must not silently share a port
    }
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        options[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return list(options.items())


class ModelServer:
    """The core plus its gRPC and REST front ends; `start()` returns once the ports are open."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config_file = args.model_config_file
        if self.config_file is not None:
            config = load_model_server_config(self.config_file)
        else:
            config = single_model_config(args.model_name, args.model_base_path)
        batching = None
        if args.enable_batching:
            batching = (
                load_batching_parameters(args.batching_parameters_file)
                if args.batching_parameters_file
                else BatchingOptions()
            )
        self.core = ServerCore(
            config,
            CoreOptions(
                file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
                batching=batching,
                enable_model_warmup=args.enable_model_warmup,
                allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
                max_num_load_retries=args.max_num_load_retries,
                load_retry_interval_s=args.load_retry_interval_micros / 1e6,
            ),
        )
        if batching is not None:
            log.info("Batching: %s", batching)
        self.grpc_server: grpc.Server | None = None
        self.rest_server: RestServer | None = None
        self.grpc_port = 0
        self.rest_port = 0
        self._stop = threading.Event()
        self._config_poller: threading.Thread | None = None

    def start(self) -> None:
        self.core.start()
        options = channel_arguments(self.args.grpc_channel_arguments, self.args.max_request_bytes)
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.args.grpc_max_threads, thread_name_prefix="grpc"),
            options=options,
        )
        add_services(self.grpc_server, self.core)
        self.grpc_port = self.grpc_server.add_insecure_port(f"{self.args.host}:{self.args.port}")
        if self.grpc_port == 0:
            raise OSError(f"could not bind the gRPC port {self.args.host}:{self.args.port}")
        self.grpc_server.start()
        log.info("Running gRPC ModelServer at %s:%d ...", self.args.host, self.grpc_port)
        if self.args.rest_api_port:
            timeout = self.args.rest_api_timeout_in_ms / 1000 if self.args.rest_api_timeout_in_ms > 0 else None
            port = max(self.args.rest_api_port, 0)
            self.rest_server = RestServer(
                (self.args.host, port), RestApi(self.core, timeout), self.args.max_request_bytes
            )
            self.rest_server.start()
            self.rest_port = self.rest_server.port
            log.info("Exporting HTTP/REST API at:%s:%d ...", self.args.host, self.rest_port)
        if self.config_file is not None and self.args.model_config_file_poll_wait_seconds > 0:
            self._config_poller = threading.Thread(target=self._poll_config, name="config-poller", daemon=True)
            self._config_poller.start()
        for name, versions in self.core.snapshot().items():
            log.info("Model %s: %s", name, ", ".join(f"version {v} {s}" for v, s in versions) or "no versions yet")
        if self.args.ready_file:
            atomic_write_json(
                self.args.ready_file, {"grpc_port": self.grpc_port, "rest_port": self.rest_port, "pid": os.getpid()}
            )

    def _poll_config(self) -> None:
        assert self.config_file is not None
        last = self.config_file.read_text(encoding="utf-8")
        while not self._stop.wait(self.args.model_config_file_poll_wait_seconds):
            try:
                text = self.config_file.read_text(encoding="utf-8")
                if text == last:
                    continue
                self.core.reload_config(load_model_server_config(self.config_file))
                last = text
                log.info("Reloaded %s", self.config_file)
            except Exception as error:  # noqa: BLE001 - keep the old config, say why, retry next poll
                log.error("Not applying the changed %s (the old config stays in effect): %s", self.config_file, error)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop taking requests, let in-flight ones finish, unload every version."""
        self._stop.set()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace_s).wait()
        if self.rest_server is not None:
            self.rest_server.stop()
        self.core.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        server = ModelServer(args)
        server.start()
    except (ConfigError, OSError) as error:
        log.error("Failed to start server. Error: %s", error)
        return 1
    stop.wait()
    log.info("Shutting down: finishing in-flight requests")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
