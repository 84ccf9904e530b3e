"""Recommender benchmark: HTTP -> gRPC -> database, end to end, at concurrency 1 and 8.

Starts the model server (`python -m serving.server`) and the recommender app (`python -m recommender.app`)
as separate processes on free loopback ports, then posts held-out test photos. Reported per concurrency:
requests/s, p50/p99 latency, each hop's share of the time (from the app's Server-Timing header: upload =
form + image checks, model = the gRPC call, db, rank, http = everything else: uvicorn, FastAPI, JSON,
the client), and the baseline measured in the same run: the same photos sent straight to the model
server with the gRPC client. The goal: the recommender adds <= 20% on top of the model call at p50.

The baseline and the app are measured in alternating rounds (`--rounds`, the order rotating), so a machine whose
load changes during the run (2 shared cores) moves both alike. `--compare-app DIR` adds the app of another
checkout (e.g. `git worktree add /tmp/before HEAD~3`) on the same model server and knowledge base, in the same
rounds: before and after a change, measured in one run. Every request asks for the same preferences
(budget_max=300) unless `--distinct-budgets N` cycles through N budgets (N >= the requests: no ranking-cache hit);
the app's /metrics gives the cache's hits and misses.

    python -m bench.recommender [--model-base-path models/productlens] [--requests 200] [--rounds 6]
        [--compare-app DIR] [--distinct-budgets 1] [--json out.json]

Without an exported model under --model-base-path, the benchmark exports a stand-in with the production
architecture (train.architecture, MobileNetV2 from the ImageNet weights, untrained head): its latency is
the real model's, its predictions are not.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import recommender  # noqa: F401  - SQLite before TensorFlow (see recommender/__init__.py)
from bench.models import model_base_or_stand_in
from bench.photos import Photo, benchmark_photos
from serving.process import model_server_process, stop

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "productlens"
HOPS = ("upload", "model", "db", "rank", "http")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def app_process(
    command: list[str],
    env: dict[str, str],
    log: Path,
    ready: Callable[[], bool],
    timeout_s: float = 180,
    cwd: Path = REPO_ROOT,
):
    """Run the recommender app until the block ends; yield once `ready()` (its health check) is true."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[2]} did not start (exit {proc.poll()}); log:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        stop(proc)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_samples(
    call: Callable[[int], dict[str, float]], requests: int, concurrency: int, first: int = 0
) -> tuple[list[dict[str, float]], float]:
    """`requests` calls (indices first, first + 1, ...) over `concurrency` threads; each returns {"total": ms, hop:
    ms, ...}. Returns the samples and the seconds they took."""
    results: list[dict[str, float]] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        sample = call(index)
        with lock:
            results.append(sample)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(first, first + requests)))
    return results, time.perf_counter() - start


def summarize(results: list[dict[str, float]], elapsed_s: float, concurrency: int) -> dict[str, Any]:
    totals = [r["total"] for r in results]
    summary: dict[str, Any] = {
        "requests": len(results),
        "concurrency": concurrency,
        "requests_per_s": len(results) / elapsed_s,
        "p50_ms": statistics.median(totals),
        "p99_ms": percentile(totals, 99),
    }
    hops = {hop: statistics.mean(r.get(hop, 0.0) for r in results) for hop in HOPS if hop in results[0]}
    if hops:
        mean_total = statistics.mean(totals)
        summary["share"] = {hop: value / mean_total for hop, value in hops.items()}
        summary["mean_ms"] = {hop: value for hop, value in hops.items()}
    return summary


def run_load(call: Callable[[int], dict[str, float]], requests: int, concurrency: int) -> dict[str, Any]:
    """`requests` calls over `concurrency` threads, summarized (requests/s, p50, p99, hop shares)."""
    results, elapsed = run_samples(call, requests, concurrency)
    return summarize(results, elapsed, concurrency)


def interleaved(
    calls: dict[str, Callable[[int], dict[str, float]]], requests: int, concurrency: int, rounds: int, start: int = 0
) -> dict[str, dict[str, Any]]:
    """Each call `requests` times (indices from `start`), in `rounds` alternating rounds (the order rotating each
    round), summarized."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in calls}
    elapsed = dict.fromkeys(calls, 0.0)
    names = list(calls)
    per_round = max(1, requests // rounds)
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            results, seconds = run_samples(calls[name], per_round, concurrency, first=start + round_ * per_round)
            samples[name] += results
            elapsed[name] += seconds
    return {name: summarize(samples[name], elapsed[name], concurrency) for name in calls}


def cache_counts(app_url: str) -> dict[str, float] | None:
    """The app's ranking-cache hits and misses from its /metrics (None: an app without them)."""
    import requests as http
    from prometheus_client.parser import text_string_to_metric_families

    response = http.get(f"{app_url}/metrics", timeout=10)
    if response.status_code != 200:
        return None
    counts = {"hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "productlens_recommender_kb_cache_total":
                counts[sample.labels["result"]] = sample.value
    return counts


BOUNDARY = "productlens-bench-7d1c4a"
MULTIPART_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart_body(photo: Photo, fields: dict[str, str]) -> bytes:
    """The form a browser sends: the photo as `image`, then the text fields."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{photo.class_name}.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + photo.data
        + b"\r\n"
    ]
    parts += [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def parse_server_timing(header: str) -> dict[str, float]:
    timings = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if duration:
            timings[name] = float(duration)
    return timings


def start_app(
    stack: ExitStack,
    root: Path,
    workdir: Path,
    grpc_address: str,
    db_url: str | None,
    settings: dict[str, str] | None = None,
) -> tuple[str, subprocess.Popen]:
    """The recommender app of the checkout at `root` as a process on a free port, with `settings` (PRODUCTLENS_*
    variables) on top of the model server's address; returns its URL and process."""
    import requests as http

    url = f"http://127.0.0.1:{free_port()}"

    def healthy() -> bool:
        try:
            return http.get(f"{url}/healthz", timeout=2).status_code == 200
        except http.RequestException:
            return False

    command = [sys.executable, "-m", "recommender.app", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(root), PRODUCTLENS_MODEL_GRPC=grpc_address,
               PRODUCTLENS_MODEL_NAME=MODEL_NAME)  # fmt: skip
    if db_url:
        env["PRODUCTLENS_DB_URL"] = db_url
    env.update(settings or {})
    process = stack.enter_context(app_process(command, env, workdir / f"app-{root.name}.log", healthy, cwd=root))
    return url, process


def cpu_seconds(process: subprocess.Popen) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    import psutil

    times = psutil.Process(process.pid).cpu_times()
    return times.user + times.system


def main(argv: list[str] | None = None) -> int:
    from recommender.client import PredictionClient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-base-path", type=Path, default=REPO_ROOT / "models" / "productlens")
    parser.add_argument("--db-url", default=os.environ.get("PRODUCTLENS_DB_URL"))
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level and kind")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per level (default %(default)s)")
    parser.add_argument("--compare-app", type=Path, help="also measure the app of this checkout (before a change)")
    parser.add_argument(
        "--distinct-budgets", type=int, default=1, help="cycle budget_max through this many values (default 1)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    photos: list[Photo] = benchmark_photos(24, per_class=3)
    workdir = Path(tempfile.mkdtemp(prefix="bench-recommender-"))
    base_path, model_kind = model_base_or_stand_in(args.model_base_path, workdir, [p.data for p in photos])

    model_args = [f"--model_name={MODEL_NAME}", f"--model_base_path={base_path}", "--rest_api_port=0"]
    figures: dict[str, Any] = {
        "model": model_kind, "photos": len(photos), "rounds": args.rounds, "distinct_budgets": args.distinct_budgets,
        "compare_app": str(args.compare_app) if args.compare_app else None, "levels": [],
    }  # fmt: skip
    with ExitStack() as stack:
        model_server = stack.enter_context(model_server_process(workdir / "model_server", model_args, timeout_s=180))
        apps = {"app": start_app(stack, REPO_ROOT, workdir, model_server.grpc_address, args.db_url)}
        if args.compare_app:
            root = args.compare_app.resolve()
            apps["compare"] = start_app(stack, root, workdir, model_server.grpc_address, args.db_url)
        client = stack.enter_context(PredictionClient(model_server.grpc_address, timeout_s=30))
        local = threading.local()

        def connection(app_url: str) -> HTTPConnection:
            """This thread's keep-alive connection to the app (http.client: the load generator shares the 2 cores
            with the servers, and `requests` costs about 1 ms more CPU a request than the gRPC client)."""
            connections = local.__dict__.setdefault("connections", {})
            if app_url not in connections:
                host, port = app_url.removeprefix("http://").split(":")
                connections[app_url] = HTTPConnection(host, int(port), timeout=60)
            return connections[app_url]

        def model_call(i: int) -> dict[str, float]:
            start = time.perf_counter()
            client.predict_one(photos[i % len(photos)].data, top_k=3)
            return {"total": (time.perf_counter() - start) * 1000}

        def end_to_end(app_url: str) -> Callable[[int], dict[str, float]]:
            def call(i: int) -> dict[str, float]:
                photo = photos[i % len(photos)]
                body = multipart_body(photo, {"budget_max": str(300 + i % args.distinct_budgets)})
                start = time.perf_counter()
                conn = connection(app_url)
                conn.request("POST", "/v1/recommendations", body, {"Content-Type": MULTIPART_TYPE})
                response = conn.getresponse()
                response.read()
                total = (time.perf_counter() - start) * 1000
                if response.status != 200:
                    raise RuntimeError(f"{app_url} answered {response.status}")
                hops = parse_server_timing(response.headers["Server-Timing"])
                hops["http"] = total - sum(hops.get(h, 0.0) for h in ("upload", "model", "db", "rank"))
                return {"total": total, **{h: hops.get(h, 0.0) for h in HOPS}}

            return call

        calls = {"model_call": model_call, **{name: end_to_end(url) for name, (url, _) in apps.items()}}
        for call in calls.values():  # warm up every path (graph tracing, connections, SQLite pages)
            run_load(call, 20, 1)
        for index, concurrency in enumerate(args.concurrency):
            # An app works only in its own rounds: its CPU time over the level is its CPU per request.
            cpu_before = {name: cpu_seconds(process) for name, (_, process) in apps.items()}
            # Each level's own request indices: with --distinct-budgets, no level repeats another's preferences.
            measured = interleaved(calls, args.requests, concurrency, args.rounds, start=index * args.requests)
            model = measured["model_call"]
            level: dict[str, Any] = {"concurrency": concurrency, "model_call": model}
            for name, (_, process) in apps.items():
                e2e = measured[name]
                overhead = e2e["p50_ms"] / model["p50_ms"] - 1
                cpu_ms = (cpu_seconds(process) - cpu_before[name]) * 1000 / e2e["requests"]
                level[name] = {**e2e, "overhead_p50": overhead, "app_cpu_ms_per_request": cpu_ms}
                shares = ", ".join(f"{hop} {share:.0%}" for hop, share in e2e["share"].items())
                print(
                    f"concurrency {concurrency}: {name}: end to end {e2e['requests_per_s']:.1f} req/s, "
                    f"p50 {e2e['p50_ms']:.1f} ms, p99 {e2e['p99_ms']:.1f} ms | model call alone "
                    f"{model['requests_per_s']:.1f} req/s, p50 {model['p50_ms']:.1f} ms, p99 {model['p99_ms']:.1f} ms"
                    f" | recommender adds {overhead:+.0%} at p50 (goal <= +20%) | app CPU {cpu_ms:.1f} ms a request"
                    f" | time shares: {shares}"
                )
            figures["levels"].append(level)
        for name, (url, _) in apps.items():
            counts = cache_counts(url)
            figures[f"{name}_cache"] = counts
            if counts is not None:
                print(f"{name}: ranking cache {counts['hit']:.0f} hits, {counts['miss']:.0f} misses (warm-up included)")
    print(
        f"model: {model_kind}; {len(photos)} held-out test photos; {args.requests} requests per level and kind in "
        f"{args.rounds} alternating rounds; {args.distinct_budgets} distinct budget(s)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
