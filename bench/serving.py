"""Serving benchmark: the same photos, in the same run, in-process vs our model server over gRPC and REST.

    python -m bench.serving [--base-path models/productlens] [--json reports/bench/serving.json]

1. In process: the exported `serving_default` signature called directly, one image per call and in
   batches of `serving.bench_batch_size`: images/s, p50/p99 latency, peak RSS.
2. Our server (`python -m serving.server`, serving/batching.config) in a separate process, one image per
   request over gRPC (the stock stubs) and REST, at each `serving.bench_concurrency`: the same figures,
   the server's peak RSS, and the ratios to the in-process baseline.
   Every cell is measured `serving.bench_rounds` times, interleaved (in-process, then each server
   cell, then again), so load from other processes on the machine hits baseline and server alike;
   images/s is the median of the rounds, latency percentiles pool every request of every round.
3. A version swap under load: gRPC at the highest concurrency while a new version is published; every
   request must succeed.

Goals (params `serving:`): gRPC at the highest concurrency >= 0.8x in-process batched images/s; gRPC p99
at concurrency 1 <= 1.5x in-process single-image p99; no failed request during the swap.

The server serves a copy of the latest version under --base-path (models/ is never touched). Without an
export there, a stand-in with the production architecture is exported (train.architecture from params,
ImageNet MobileNetV2 weights, untrained head): the same compute as the real model, not its predictions.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.models import newest_version_or_stand_in
from bench.photos import benchmark_photos
from common.io import atomic_directory, atomic_write_json
from common.params import build, load_params, section
from serving import contract
from serving.contract import IMAGE_BYTES, PROBABILITIES, SERVING_DEFAULT

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "productlens"  # the name the benchmark's server serves its copy under
log = logging.getLogger("bench.serving")


@dataclass(frozen=True)
class BenchParams:
    bench_images: int = 64
    bench_requests: int = 160
    bench_rounds: int = 3
    bench_concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    bench_batch_size: int = 32
    bench_swap_seconds: float = 20.0
    goal_grpc_throughput_ratio: float = 0.8
    goal_p99_latency_ratio: float = 1.5


@dataclass
class Cell:
    """One measured configuration, over one or more rounds."""

    name: str
    concurrency: int
    images: int
    seconds: float
    latencies_ms: list[float]
    failures: int = 0
    rounds_images_per_s: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        if self.rounds_images_per_s:
            return float(np.median(self.rounds_images_per_s))
        return self.images / self.seconds

    def add_round(self, other: Cell) -> None:
        if not self.rounds_images_per_s:
            self.rounds_images_per_s.append(self.images / self.seconds)
        self.rounds_images_per_s.append(other.images / other.seconds)
        self.images += other.images
        self.seconds += other.seconds
        self.latencies_ms += other.latencies_ms
        self.failures += other.failures

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "concurrency": self.concurrency,
            "images_per_s": round(self.images_per_s, 1),
            "p50_ms": round(self.p(50), 2),
            "p99_ms": round(self.p(99), 2),
            "requests": len(self.latencies_ms),
            "failures": self.failures,
            "rounds_images_per_s": [round(v, 1) for v in self.rounds_images_per_s or [self.images_per_s]],
        }


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def predict_requests(photos: list[bytes], model_name: str = MODEL_NAME) -> list[Any]:
    """One gRPC PredictRequest (serving_default, one photo) per photo, built before the clock starts."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    requests = []
    for photo in photos:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = SERVING_DEFAULT
        request.inputs[IMAGE_BYTES].CopyFrom(tf.make_tensor_proto([photo], dtype=tf.string, shape=[1]))
        requests.append(request)
    return requests


def copy_version(source: Path, base: Path, version: int) -> Path:
    """Publish a copy as base/<version> the way export does: a hidden directory, then one rename."""
    final = base / str(version)
    with atomic_directory(final, replace=False) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True)
    return final


def run_load(call: Callable[[int], None], requests: int, concurrency: int, name: str) -> Cell:
    """`requests` calls spread over `concurrency` threads; each call sends one image."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        nonlocal failures
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            started = time.perf_counter()
            try:
                call(index)
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    latencies.append(elapsed)
            except Exception:  # noqa: BLE001 - a benchmark counts failures rather than stopping at the first
                with lock:
                    failures += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return Cell(name, concurrency, len(latencies), time.perf_counter() - started, latencies, failures)


class InProcess:
    """The exported serving_default signature, called directly in this process."""

    def __init__(self, version_dir: Path, photos: list[bytes], batch: int) -> None:
        import tensorflow as tf

        self.tf = tf
        self.signature = tf.saved_model.load(str(version_dir)).signatures[SERVING_DEFAULT]
        self.photos = photos
        self.batch = batch
        for i in range(8):
            self.single(i)
        self.signature(**{IMAGE_BYTES: tf.constant(photos[:batch])})

    def single(self, i: int) -> None:
        self.signature(**{IMAGE_BYTES: self.tf.constant([self.photos[i % len(self.photos)]])})[PROBABILITIES].numpy()

    def batched(self, images: int) -> Cell:
        batches = max(1, images // self.batch)
        latencies = []
        started = time.perf_counter()
        for b in range(batches):
            chunk = [self.photos[(b * self.batch + j) % len(self.photos)] for j in range(self.batch)]
            t0 = time.perf_counter()
            self.signature(**{IMAGE_BYTES: self.tf.constant(chunk)})[PROBABILITIES].numpy()
            latencies.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - started
        return Cell(f"in-process, batches of {self.batch}", 1, batches * self.batch, elapsed, latencies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--base-path", type=Path, default=REPO_ROOT / "models" / "productlens")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--batching", type=Path, default=REPO_ROOT / "serving" / "batching.config")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "reports" / "bench" / "serving.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = build(BenchParams, section(load_params(args.params), "serving"), f"{args.params}:serving")

    import grpc
    import requests
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from serving.process import model_server_process

    photos = [photo.data for photo in benchmark_photos(params.bench_images)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        workdir = Path(tmp)
        source, model_kind = newest_version_or_stand_in(args.base_path, workdir, photos)
        card_path = contract.model_card_path(source)
        card = json.loads(card_path.read_text()) if card_path.exists() else {}
        log.info("benchmarking %s", model_kind)
        baseline = InProcess(source, photos, params.bench_batch_size)
        baseline.batched(params.bench_batch_size * 2)
        in_process_rss = peak_rss_mb()

        served_base = workdir / "served" / MODEL_NAME
        served_base.mkdir(parents=True)
        copy_version(source, served_base, 1)
        server_args = [
            f"--model_name={MODEL_NAME}", f"--model_base_path={served_base}", "--file_system_poll_wait_seconds=0.5",
            "--enable_batching", f"--batching_parameters_file={args.batching}",
        ]  # fmt: skip
        with model_server_process(workdir / "server", server_args, timeout_s=300) as server:
            pid = server.process.pid
            channel = grpc.insecure_channel(server.grpc_address)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            requests_grpc = predict_requests(photos)
            bodies = [
                json.dumps({"instances": [{"b64": base64.b64encode(photo).decode("ascii")}]}).encode()
                for photo in photos
            ]
            rest_url = f"{server.rest_url}/v1/models/{MODEL_NAME}:predict"
            sessions = threading.local()

            def grpc_call(i: int) -> None:
                stub.Predict(requests_grpc[i % len(photos)], timeout=60)

            def rest_call(i: int) -> None:
                if not hasattr(sessions, "session"):
                    sessions.session = requests.Session()
                reply = sessions.session.post(rest_url, data=bodies[i % len(photos)], timeout=60)
                reply.raise_for_status()

            for _ in range(2):  # warm both paths (threads, connections) outside the measurement
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(grpc_call, range(32)))
                    list(pool.map(rest_call, range(32)))
            cells: dict[tuple[str, int], Cell] = {}

            def measure(cell: Cell) -> None:
                log.info("%s", cell.row())
                key = (cell.name, cell.concurrency)
                if key in cells:
                    cells[key].add_round(cell)
                else:
                    cells[key] = cell

            for round_number in range(params.bench_rounds):
                log.info("round %d of %d", round_number + 1, params.bench_rounds)
                measure(run_load(baseline.single, params.bench_requests, 1, "in-process, 1 image per call"))
                measure(baseline.batched(params.bench_requests))
                for protocol, call in (("gRPC", grpc_call), ("REST", rest_call)):
                    for concurrency in params.bench_concurrency:
                        measure(run_load(call, params.bench_requests, concurrency, f"server {protocol}"))
            server_rss = peak_rss_mb(pid)

            swap = swap_under_load(stub, requests_grpc, source, served_base, params, grpc_call)
            server_rss_swap = peak_rss_mb(pid)
            channel.close()

    report = summarize(
        list(cells.values()), params, model_kind, card, in_process_rss, server_rss, server_rss_swap, swap
    )
    # Other work on the machine skews every figure: record it next to them.
    report["machine"]["load_average_1min"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.json, report)
    print_report(report)
    return 0


def swap_under_load(stub, requests_grpc, source: Path, served_base: Path, params: BenchParams, call) -> dict:
    """gRPC load at the highest concurrency while version 2 is published; count failures and versions seen."""
    import grpc

    concurrency = max(params.bench_concurrency)
    stop = threading.Event()
    seen: dict[int, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    count = 0

    def worker(offset: int) -> None:
        nonlocal count
        i = offset
        while not stop.is_set():
            try:
                version = stub.Predict(requests_grpc[i % len(requests_grpc)], timeout=60).model_spec.version.value
                with lock:
                    seen[version] = seen.get(version, 0) + 1
                    count += 1
            except grpc.RpcError as error:
                with lock:
                    failures.append(f"{error.code().name}: {error.details()}")
            i += concurrency

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(params.bench_swap_seconds / 3)
    published = time.monotonic()
    copy_version(source, served_base, 2)
    switched = None
    while time.monotonic() - started < params.bench_swap_seconds or switched is None:
        with lock:
            if switched is None and seen.get(2):
                switched = time.monotonic() - published
        if time.monotonic() - started > params.bench_swap_seconds * 3:
            break
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    return {
        "concurrency": concurrency,
        "seconds": round(time.monotonic() - started, 1),
        "requests": count,
        "failures": len(failures),
        "failure_examples": failures[:5],
        "responses_by_version": {str(k): v for k, v in sorted(seen.items())},
        "seconds_until_new_version_served": round(switched, 2) if switched is not None else None,
    }


def summarize(cells, params, model_kind, card, in_process_rss, server_rss, server_rss_swap, swap) -> dict:
    single, batched = cells[0], cells[1]
    top = max(params.bench_concurrency)
    grpc_top = next(c for c in cells if c.name == "server gRPC" and c.concurrency == top)
    grpc_one = next(c for c in cells if c.name == "server gRPC" and c.concurrency == 1)
    rows = []
    for cell in cells:
        row = cell.row()
        row["throughput_vs_in_process_batched"] = round(cell.images_per_s / batched.images_per_s, 2)
        row["p50_vs_in_process_single"] = round(cell.p(50) / single.p(50), 2)
        row["p99_vs_in_process_single"] = round(cell.p(99) / single.p(99), 2)
        rows.append(row)
    throughput_ratio = grpc_top.images_per_s / batched.images_per_s
    latency_ratio = grpc_one.p(99) / single.p(99)
    return {
        "model": model_kind,
        "image_size": card.get("image_size"),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "params": asdict(params),
        "cells": rows,
        "peak_rss_mb": {
            "in_process": round(in_process_rss),
            "server": round(server_rss),
            "server_after_swap": round(server_rss_swap),
        },
        "swap": swap,
        "goals": {
            f"grpc_c{top}_throughput_vs_in_process_batched": {
                "value": round(throughput_ratio, 2),
                "goal": f">= {params.goal_grpc_throughput_ratio}",
                "met": throughput_ratio >= params.goal_grpc_throughput_ratio,
            },
            "grpc_c1_p99_vs_in_process_single_p99": {
                "value": round(latency_ratio, 2),
                "goal": f"<= {params.goal_p99_latency_ratio}",
                "met": latency_ratio <= params.goal_p99_latency_ratio,
            },
            "failed_requests_during_swap": {"value": swap["failures"], "goal": "0", "met": swap["failures"] == 0},
        },
    }


def print_report(report: dict) -> None:
    machine = report["machine"]
    print(
        f"\nmodel: {report['model']} (image size {report['image_size']}), {machine['cpus']} CPUs, "
        f"1-min load average {machine['load_average_1min']['before']} before, "
        f"{machine['load_average_1min']['after']} after"
    )
    print(
        "| path | concurrency | images/s | p50 ms | p99 ms | images/s vs in-process batched "
        "| p50 vs in-process single | p99 vs in-process single |"
    )
    print("|" + "---|" * 8)
    for row in report["cells"]:
        print(
            f"| {row['name']} | {row['concurrency']} | {row['images_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
            f"{row['throughput_vs_in_process_batched']}x | {row['p50_vs_in_process_single']}x | "
            f"{row['p99_vs_in_process_single']}x |"
        )
    rss = report["peak_rss_mb"]
    print(
        f"\npeak RSS: in-process {rss['in_process']} MB; server {rss['server']} MB "
        f"({rss['server_after_swap']} MB after the swap, two versions briefly loaded)"
    )
    swap = report["swap"]
    print(
        f"version swap under gRPC load (concurrency {swap['concurrency']}, {swap['seconds']} s): "
        f"{swap['requests']} requests, {swap['failures']} failed, by version {swap['responses_by_version']}, "
        f"new version served {swap['seconds_until_new_version_served']} s after it was published"
    )
    for name, goal in report["goals"].items():
        print(f"goal {name}: {goal['value']} (goal {goal['goal']}): {'met' if goal['met'] else 'NOT MET'}")


if __name__ == "__main__":
    sys.exit(main())
