"""ProductLens model server: TF Serving's gRPC and REST protocol, its flags and its config files, in Python.

    python -m serving.server --port=8500 --rest_api_port=8501 \
        --model_config_file=serving/models.config \
        --enable_batching --batching_parameters_file=serving/batching.config

The flags are tensorflow_model_server's (a subset), so the same command line, models.config and
batching file run the official tensorflow/serving image in production (serving/k8s/). Like TF
Serving, the ports open once the initially aspired versions have loaded (or failed to).

Safer than tensorflow_model_server, with flags it does not have: both ports bind 127.0.0.1 unless
--host/--rest_api_host say otherwise; a config may only name base paths under --allowed_model_root
(default: the folders of the startup config's base paths); HandleReloadConfigRequest is off on a
non-loopback address unless $PRODUCTLENS_RELOAD_CONFIG_TOKEN is set, and then needs that token
(--reload_config_rpc); on SIGTERM or SIGINT the server refuses new requests and gives in-flight ones
--shutdown_grace_seconds to finish; a REST connection is closed when its request line and headers take
longer than --rest_api_read_timeout_in_ms or its body stalls that long, and when it has been idle for
--rest_api_keep_alive_timeout_in_ms after a response.

Monitoring and prediction logs as TF Serving configures them: --monitoring_config_file (a MonitoringConfig with
`prometheus_config { enable: true }`) serves Prometheus metrics on the REST port at /monitoring/prometheus/metrics
(serving/metrics.py); a model's `logging_config` in models.config writes a sample of its requests as PredictionLog
TFRecord files (serving/prediction_log.py), rotated at --prediction_log_max_file_bytes, through a queue of
--prediction_log_queue_size entries (more are dropped, not waited for).
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import NoReturn

import grpc
import tensorflow as tf

from common.io import atomic_write_json
from serving.config import (
    BatchingOptions,
    ConfigError,
    MonitoringOptions,
    default_model_roots,
    load_batching_parameters,
    load_model_server_config,
    load_monitoring_config,
    model_configs,
    single_model_config,
)
from serving.core import CoreOptions, ServerCore
from serving.grpc_api import RELOAD_TOKEN_ENV, InFlight, InFlightInterceptor, ReloadAccess, add_services
from serving.metrics import ServerMetrics
from serving.prediction_log import DEFAULT_MAX_FILE_BYTES, DEFAULT_QUEUE_SIZE, PredictionLogOptions
from serving.rest_api import DEFAULT_KEEP_ALIVE_TIMEOUT_S, DEFAULT_NUM_THREADS, RestApi, RestServer

log = logging.getLogger("serving.server")

DEFAULT_MAX_REQUEST_BYTES = 16 << 20
LOOPBACK = "127.0.0.1"
# Under serving/k8s's terminationGracePeriodSeconds (30), with room for the process to exit after the drain.
DEFAULT_SHUTDOWN_GRACE_S = 20.0
# How often the main thread looks for a shutdown signal. The kernel may deliver SIGTERM to any thread; its
# Python handler then runs only when the main thread next executes bytecode, so the main thread must wake up.
SIGNAL_POLL_S = 0.1


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
    add("--host", default=LOOPBACK, help="address the gRPC port (and REST, unless --rest_api_host) binds; 0.0.0.0: all")
    add("--rest_api_host", help="address the REST port binds (default: --host)")
    add(
        "--allowed_model_root",
        type=Path,
        action="append",
        help="a folder model base paths may lie under (repeat for more); a config naming another folder is refused. "
        "Default: the folder holding each base path of the startup config",
    )
    add(
        "--reload_config_rpc",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"HandleReloadConfigRequest: on (with ${RELOAD_TOKEN_ENV} set, callers must send it as "
        "'authorization: Bearer <token>'), off, or auto: on when --host is a loopback address or the token is set",
    )
    add(
        "--shutdown_grace_seconds",
        type=float,
        default=DEFAULT_SHUTDOWN_GRACE_S,
        help="on SIGTERM/SIGINT, how long in-flight requests get to finish before the server exits",
    )
    add(
        "--rest_api_read_timeout_in_ms",
        type=int,
        default=30_000,
        help="close a REST connection whose request line and headers take longer, or whose body stalls this long; "
        "0: never",
    )
    add(
        "--rest_api_keep_alive_timeout_in_ms",
        type=int,
        default=int(DEFAULT_KEEP_ALIVE_TIMEOUT_S * 1000),
        help="close a REST connection idle this long after a response (behind a load balancer: longer than its "
        "idle timeout); 0: close after every response",
    )
    add("--rest_api_num_threads", type=int, default=DEFAULT_NUM_THREADS, help="threads that run REST requests")
    add("--model_config_file", type=Path, help="ModelServerConfig text proto (models.config)")
    add("--model_config_file_poll_wait_seconds", type=float, default=0, help="re-read the config file; 0 = read once")
    add("--model_name", default="default", help="with --model_base_path, when there is no --model_config_file")
    add("--model_base_path", help="directory holding <version>/ SavedModels")
    add("--file_system_poll_wait_seconds", type=float, default=1.0, help="how often to look for new versions")
    add("--enable_batching", type=_flag_bool, nargs="?", const=True, default=False)
    add("--batching_parameters_file", type=Path, help="BatchingParameters text proto")
    add("--enable_model_warmup", type=_flag_bool, nargs="?", const=True, default=True)
    add(
        "--monitoring_config_file",
        type=Path,
        help="MonitoringConfig text proto; prometheus_config { enable: true } serves Prometheus metrics on the REST "
        "port (at its path, default /monitoring/prometheus/metrics)",
    )
    add(
        "--prediction_log_max_file_bytes",
        type=int,
        default=DEFAULT_MAX_FILE_BYTES,
        help="a logging_config's TFRecord file is closed and the next one opened before it would pass this size",
    )
    add(
        "--prediction_log_queue_size",
        type=int,
        default=DEFAULT_QUEUE_SIZE,
        help="sampled requests waiting to be written; when it is full, further ones are dropped (and counted)",
    )
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def reload_access(mode: str, host: str, token: str | None) -> ReloadAccess:
    """--reload_config_rpc resolved: who may replace the model config over gRPC."""
    if mode == "off":
        return ReloadAccess(enabled=False, why_off="--reload_config_rpc=off")
    if mode == "on" or token or is_loopback(host):
        return ReloadAccess(enabled=True, token=token)
    return ReloadAccess(enabled=False, why_off=f"it listens on {host} and ${RELOAD_TOKEN_ENV} is not set")


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ModelServer:
    """The core plus its gRPC and REST front ends; `start()` returns once the ports are open."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config_file = args.model_config_file
        if self.config_file is not None:
            config = load_model_server_config(self.config_file)
        else:
            config = single_model_config(args.model_name, args.model_base_path)
        self.allowed_model_roots = tuple(args.allowed_model_root or default_model_roots(model_configs(config)))
        self.monitoring = (
            load_monitoring_config(args.monitoring_config_file) if args.monitoring_config_file else MonitoringOptions()
        )
        self.metrics = ServerMetrics()
        try:
            prediction_log = PredictionLogOptions(args.prediction_log_max_file_bytes, args.prediction_log_queue_size)
        except ValueError as error:
            raise ConfigError(str(error)) from error
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
                allowed_model_roots=self.allowed_model_roots,
                prediction_log=prediction_log,
            ),
            self.metrics,
        )
        if batching is not None:
            log.info("Batching: %s", batching)
        self.reload_access = reload_access(args.reload_config_rpc, args.host, os.environ.get(RELOAD_TOKEN_ENV) or None)
        self.in_flight = InFlight()
        self.grpc_server: grpc.Server | None = None
        self.rest_server: RestServer | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self.grpc_port = 0
        self.rest_port = 0
        self._stop = threading.Event()
        self._config_poller: threading.Thread | None = None

    def start(self) -> None:
        args = self.args
        self.core.start()
        options = channel_arguments(args.grpc_channel_arguments, args.max_request_bytes)
        self._executor = futures.ThreadPoolExecutor(max_workers=args.grpc_max_threads, thread_name_prefix="grpc")
        self.grpc_server = grpc.server(
            self._executor, interceptors=[InFlightInterceptor(self.in_flight)], options=options
        )
        add_services(self.grpc_server, self.core, self.reload_access, self.metrics)
        self.grpc_port = self.grpc_server.add_insecure_port(_grpc_address(args.host, args.port))
        if self.grpc_port == 0:
            raise OSError(f"could not bind the gRPC port {args.host}:{args.port}")
        self.grpc_server.start()
        log.info("Running gRPC ModelServer at %s ...", _grpc_address(args.host, self.grpc_port))
        if args.rest_api_port:
            rest_host = args.rest_api_host or args.host
            timeout = args.rest_api_timeout_in_ms / 1000 if args.rest_api_timeout_in_ms > 0 else None
            read_timeout = args.rest_api_read_timeout_in_ms / 1000 if args.rest_api_read_timeout_in_ms > 0 else None
            monitoring = self.monitoring
            self.rest_server = RestServer(
                (rest_host, max(args.rest_api_port, 0)),
                RestApi(self.core, timeout, self.metrics),
                args.max_request_bytes,
                read_timeout_s=read_timeout,
                keep_alive_timeout_s=max(args.rest_api_keep_alive_timeout_in_ms, 0) / 1000,
                num_threads=args.rest_api_num_threads,
                metrics_path=monitoring.prometheus_path if monitoring.prometheus_enabled else None,
            )
            self.rest_server.start()
            self.rest_port = self.rest_server.port
            log.info("Exporting HTTP/REST API at:%s ...", _grpc_address(rest_host, self.rest_port))
            if monitoring.prometheus_enabled:
                log.info("Prometheus metrics at %s on the REST port", monitoring.prometheus_path)
        elif self.monitoring.prometheus_enabled:
            log.warning(
                "%s enables Prometheus metrics, but REST is off (--rest_api_port=0): no metrics page",
                args.monitoring_config_file,
            )
        log.info("Model base paths must lie under: %s", ", ".join(str(root) for root in self.allowed_model_roots))
        if not self.reload_access.enabled:
            log.info("HandleReloadConfigRequest is off: %s", self.reload_access.why_off)
        elif self.reload_access.token:
            log.info("HandleReloadConfigRequest needs the token in $%s", RELOAD_TOKEN_ENV)
        else:
            log.info("HandleReloadConfigRequest is on for anyone who reaches %s", args.host)
        if self.config_file is not None and args.model_config_file_poll_wait_seconds > 0:
            self._config_poller = threading.Thread(target=self._poll_config, name="config-poller", daemon=True)
            self._config_poller.start()
        for name, versions in self.core.snapshot().items():
            log.info("Model %s: %s", name, ", ".join(f"version {v} {s}" for v, s in versions) or "no versions yet")
        if args.ready_file:
            atomic_write_json(
                args.ready_file, {"grpc_port": self.grpc_port, "rest_port": self.rest_port, "pid": os.getpid()}
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

    def stop(self, grace_s: float = DEFAULT_SHUTDOWN_GRACE_S) -> bool:
        """Refuse new requests, give in-flight ones up to grace_s to finish, unload every version.

        Returns True when every request that had arrived was answered within the grace period."""
        deadline = time.monotonic() + grace_s

        def remaining() -> float:
            return max(deadline - time.monotonic(), 0.0)

        rest_busy = self.rest_server.in_flight if self.rest_server is not None else 0
        log.info(
            "Shutting down: %d gRPC and %d REST request(s) in flight get up to %.0f s to finish",
            self.in_flight.count,
            rest_busy,
            grace_s,
        )
        self._stop.set()
        # gRPC refuses new calls at once and drains in the background while REST drains here.
        grpc_stopped = self.grpc_server.stop(grace_s) if self.grpc_server is not None else None
        rest_cut_off = self.rest_server.stop(remaining()) if self.rest_server is not None else 0
        if grpc_stopped is not None:
            grpc_stopped.wait(remaining())
        self.in_flight.wait_idle(remaining())
        grpc_cut_off = self.in_flight.count
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        unloaded = self.core.stop(remaining())
        if grpc_cut_off or rest_cut_off or not unloaded:
            log.error(
                "Grace period of %.0f s over: cut off %d gRPC and %d REST request(s)%s",
                grace_s,
                grpc_cut_off,
                rest_cut_off,
                "" if unloaded else "; some versions were still busy and are not unloaded",
            )
            return False
        log.info("Stopped after %.1f s: every in-flight request was answered", grace_s - remaining())
        return True


class ShutdownSignals:
    """A signal handler that only records the signal. Python runs it in the main thread between any two
    bytecodes, also inside a lock the main thread holds (Event.set() takes one), so it must not lock anything."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, frame) -> None:
        self.received.append(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if args.tensorflow_intra_op_parallelism:
        tf.config.threading.set_intra_op_parallelism_threads(args.tensorflow_intra_op_parallelism)
    if args.tensorflow_inter_op_parallelism:
        tf.config.threading.set_inter_op_parallelism_threads(args.tensorflow_inter_op_parallelism)
    signals = ShutdownSignals()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signals)
    try:
        server = ModelServer(args)
        server.start()
    except (ConfigError, OSError) as error:
        log.error("Failed to start server. Error: %s", error)
        return 1
    while not signals.received:
        time.sleep(SIGNAL_POLL_S)
    log.info("Received %s", signal.Signals(signals.received[0]).name)
    answered_all = server.stop(args.shutdown_grace_seconds)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)  # what is left of the exit must not be cut short either
    if len(signals.received) > 1:
        log.info("Ignored %d further signal(s) while shutting down", len(signals.received) - 1)
    return 0 if answered_all else 1


def exit_process(code: int) -> NoReturn:
    """Flush the logs and leave without the interpreter's teardown: with TensorFlow loaded it takes ~2 s and runs
    none of our code, and after a grace period that ran out, a gRPC worker thread still inside a request would
    block it for as long as that request takes (the interpreter joins those threads)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
