"""Recommender benchmark: HTTP -> gRPC -> database, end to end, at concurrency 1 and 8.

Starts the model server (`python -m serving.server`) and the recommender app (`python -m recommender.app`)
as separate processes on free loopback ports, then posts held-out test photos. Reported per concurrency:
requests/s, p50/p99 latency, each hop's share of the time (from the app's Server-Timing header: upload =
form + image checks, model = the gRPC call, db, rank, http = everything else: uvicorn, FastAPI, JSON,
the client), and the baseline measured in the same run: the same photos sent straight to the model
server with the gRPC client. The goal: the recommender adds <= 20% on top of the model call at p50.

    python -m bench.recommender [--model-base-path models/productlens] [--requests 200] [--json out.json]

Without an exported model under --model-base-path, the benchmark exports a stand-in with the production
architecture (train.architecture, MobileNetV2 from the ImageNet weights, untrained head): its latency is
the real model's, its predictions are not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from pathlib import Path
from typing import Any

import recommender  # noqa: F401  - SQLite before TensorFlow (see recommender/__init__.py)

REPO_ROOT = Path(__file__).resolve().parents[1]
HOPS = ("upload", "model", "db", "rank", "http")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def process(command: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool], timeout_s: float = 180):
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[2]} did not start (exit {proc.poll()}); log:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_photos(limit: int) -> list[tuple[str, bytes]]:
    """Held-out test photos (artifacts/splits/test.csv), a few per class, in a fixed shuffled order."""
    import pandas as pd

    split = REPO_ROOT / "artifacts" / "splits" / "test.csv"
    images = REPO_ROOT / "data" / "images"
    if split.exists():
        frame = pd.read_csv(split)
        paths = [images / p for p in frame.groupby("class_name").head(3)["path"]]
    else:
        paths = sorted(images.glob("*/*.jpg"))[::50]
    random.Random(0).shuffle(paths)
    return [(p.parent.name, p.read_bytes()) for p in paths[:limit]]


def stand_in_model(workdir: Path, photos: list[bytes]) -> Path:
    """Export the production architecture with ImageNet weights and an untrained head (latency proxy)."""
    from common.params import load_params
    from components.export import ExportParams, export
    from components.model import MobileNetParams, build_model

    train = load_params(REPO_ROOT / "params.yaml")["train"]
    class_names = json.loads((REPO_ROOT / "artifacts" / "splits" / "class_names.json").read_text())
    weights = MobileNetParams(**train["mobilenet_v2"]) if train["architecture"] == "mobilenet_v2" else None
    if weights is not None:
        weights = MobileNetParams(weights.alpha, str((REPO_ROOT / weights.weights).resolve()), weights.sha256)
    model = build_model(train["architecture"], len(class_names), train["image_size"], weights=weights)
    path = workdir / "stand_in.keras"
    model.save(path)
    result = export(
        path,
        class_names,
        {"blessed": True, "reasons": ["benchmark stand-in: production architecture, untrained head"]},
        workdir / "models",
        ExportParams(),
        photos,
        not_sure_threshold=0.5,  # the stand-in's answers are timed, not judged
        validate=False,
    )
    return result.path.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_load(call: Callable[[int], dict[str, float]], requests: int, concurrency: int) -> dict[str, Any]:
    """`requests` calls over `concurrency` threads; each call returns {"total": ms, hop: ms, ...}."""
    results: list[dict[str, float]] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        sample = call(index)
        with lock:
            results.append(sample)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(requests)))
    elapsed = time.perf_counter() - start
    totals = [r["total"] for r in results]
    summary: dict[str, Any] = {
        "requests": requests,
        "concurrency": concurrency,
        "requests_per_s": requests / elapsed,
        "p50_ms": statistics.median(totals),
        "p99_ms": percentile(totals, 99),
    }
    hops = {hop: statistics.mean(r.get(hop, 0.0) for r in results) for hop in HOPS if hop in results[0]}
    if hops:
        mean_total = statistics.mean(totals)
        summary["share"] = {hop: value / mean_total for hop, value in hops.items()}
        summary["mean_ms"] = {hop: value for hop, value in hops.items()}
    return summary


def parse_server_timing(header: str) -> dict[str, float]:
    timings = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if duration:
            timings[name] = float(duration)
    return timings


def main(argv: list[str] | None = None) -> int:
    import requests as http

    from recommender.client import PredictionClient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-base-path", type=Path, default=REPO_ROOT / "models" / "productlens")
    parser.add_argument("--db-url", default=os.environ.get("PRODUCTLENS_DB_URL"))
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    photos = test_photos(24)
    workdir = Path(tempfile.mkdtemp(prefix="bench-recommender-"))
    base_path = args.model_base_path
    model_kind = "exported model"
    if not any(p.name.isdigit() for p in base_path.glob("*")):
        print(f"no exported model under {base_path}: exporting a stand-in with the production architecture")
        base_path = stand_in_model(workdir, [b for _, b in photos])
        model_kind = "stand-in (production architecture, untrained head)"
    grpc_port, app_port = free_port(), free_port()
    grpc_address, app_url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{app_port}"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO_ROOT))
    app_env = dict(env, PRODUCTLENS_MODEL_GRPC=grpc_address, PRODUCTLENS_MODEL_NAME="productlens")
    if args.db_url:
        app_env["PRODUCTLENS_DB_URL"] = args.db_url

    def healthy() -> bool:
        try:
            return http.get(f"{app_url}/healthz", timeout=2).status_code == 200
        except http.RequestException:
            return False

    ready_file = workdir / "ready.json"
    model_cmd = [
        sys.executable, "-m", "serving.server", "--host=127.0.0.1", f"--port={grpc_port}", "--model_name=productlens",
        f"--model_base_path={base_path}", f"--ready_file={ready_file}",
    ]  # fmt: skip
    app_cmd = [sys.executable, "-m", "recommender.app", "--host", "127.0.0.1", "--port", str(app_port)]
    figures: dict[str, Any] = {"model": model_kind, "photos": len(photos), "levels": []}
    with ExitStack() as stack:
        stack.enter_context(process(model_cmd, env, workdir / "model_server.log", ready_file.exists))
        stack.enter_context(process(app_cmd, app_env, workdir / "app.log", healthy))
        client = stack.enter_context(PredictionClient(grpc_address, timeout_s=30))
        local = threading.local()

        def session() -> http.Session:
            if not hasattr(local, "session"):
                local.session = http.Session()
            return local.session

        def model_call(i: int) -> dict[str, float]:
            start = time.perf_counter()
            client.predict_one(photos[i % len(photos)][1], top_k=3)
            return {"total": (time.perf_counter() - start) * 1000}

        def end_to_end(i: int) -> dict[str, float]:
            name, image = photos[i % len(photos)]
            start = time.perf_counter()
            response = session().post(
                f"{app_url}/v1/recommendations",
                files={"image": (f"{name}.jpg", image, "image/jpeg")},
                data={"budget_max": "300"},
                timeout=60,
            )
            total = (time.perf_counter() - start) * 1000
            response.raise_for_status()
            hops = parse_server_timing(response.headers["Server-Timing"])
            hops["http"] = total - sum(hops.get(h, 0.0) for h in ("upload", "model", "db", "rank"))
            return {"total": total, **{h: hops.get(h, 0.0) for h in HOPS}}

        run_load(model_call, 20, 1)  # warm up both paths (graph tracing, connections, SQLite pages)
        run_load(end_to_end, 20, 1)
        for concurrency in args.concurrency:
            model = run_load(model_call, args.requests, concurrency)
            e2e = run_load(end_to_end, args.requests, concurrency)
            overhead = e2e["p50_ms"] / model["p50_ms"] - 1
            figures["levels"].append({"concurrency": concurrency, "model_call": model, "end_to_end": e2e,
                                      "overhead_p50": overhead})  # fmt: skip
            shares = ", ".join(f"{hop} {share:.0%}" for hop, share in e2e["share"].items())
            print(
                f"concurrency {concurrency}: end to end {e2e['requests_per_s']:.1f} req/s, "
                f"p50 {e2e['p50_ms']:.1f} ms, p99 {e2e['p99_ms']:.1f} ms | model call alone "
                f"{model['requests_per_s']:.1f} req/s, p50 {model['p50_ms']:.1f} ms, p99 {model['p99_ms']:.1f} ms | "
                f"recommender adds {overhead:+.0%} at p50 (goal <= +20%) | time shares: {shares}"
            )
    print(f"model: {model_kind}; {len(photos)} held-out test photos; {args.requests} requests per level")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
