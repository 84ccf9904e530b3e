"""Canary rollout benchmark: the recommender under load while a canary is published, promoted and rolled back.

Serves the exported model (the newest version under --model-base-path; without one, a stand-in with the production
architecture, as bench.recommender) as version 1 of a models.config labelled `stable`, on a model server that
re-reads its config, with server-side batching as `make serve` has it; starts the recommender with
PRODUCTLENS_CANARY_SHARE=--share; and keeps --clients clients posting held-out test photos. Then, each step
followed by --settle-s seconds of load: the canary goes out (the steps of `python -m components.publish --label
canary`, components/labels.py: pin stable, publish a copy of the model with another not-sure threshold as version 2,
load it, label it), `productlens promote`, `productlens rollback`. Reports the failed requests (the goal: none), and
per phase the answers by label and version with their p50/p99.

    python -m bench.canary [--model-base-path models/productlens] [--clients 8] [--share 0.2] [--settle-s 10]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import recommender  # noqa: F401  - SQLite before TensorFlow (see recommender/__init__.py)
from bench.models import model_base_or_stand_in
from bench.photos import Photo, benchmark_photos
from bench.recommender import MODEL_NAME, REPO_ROOT, percentile, start_app
from serving import contract
from serving.process import model_server_process

CONFIG = """model_config_list {{ config {{
  name: "{name}" base_path: "{base_path}" model_platform: "tensorflow"
  model_version_policy {{ latest {{ num_versions: 1 }} }}
  version_labels {{ key: "stable" value: 1 }}
}} }}
"""


@dataclass
class Answer:
    at: float  # time.monotonic() when it came back
    status: int  # 0: no HTTP answer (connection error, timeout)
    label: str
    version: str
    ms: float


@dataclass
class Load:
    url: str
    photos: list[Photo]
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[Answer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, offset: int) -> None:
        import requests as http

        with http.Session() as session:
            i = offset
            while not self.stop.is_set():
                photo = self.photos[i % len(self.photos)]
                i += 1
                start = time.perf_counter()
                try:
                    response = session.post(
                        f"{self.url}/v1/recommendations",
                        files={"image": (f"{photo.class_name}.jpg", photo.data, "image/jpeg")},
                        data={"budget_max": "300"},
                        timeout=60,
                    )
                    status = response.status_code
                    label, version = (
                        response.headers.get("X-Model-Label", ""),
                        response.headers.get("X-Model-Version", ""),
                    )
                except http.RequestException as error:
                    status, label, version = 0, type(error).__name__, ""
                answer = Answer(time.monotonic(), status, label, version, (time.perf_counter() - start) * 1000)
                with self.lock:
                    self.answers.append(answer)


def phase_figures(answers: list[Answer]) -> dict[str, Any]:
    ms = [a.ms for a in answers]
    by_label = Counter(
        f"{a.label} v{a.version}" if a.status == 200 else f"failed {a.status} {a.label}" for a in answers
    )
    return {
        "requests": len(answers),
        "failed": sum(a.status != 200 for a in answers),
        "answered_by": dict(sorted(by_label.items())),
        "p50_ms": statistics.median(ms) if ms else None,
        "p99_ms": percentile(ms, 99) if ms else None,
    }


def main(argv: list[str] | None = None) -> int:

    from components import labels
    from components.publish import publish_version

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-base-path", type=Path, default=REPO_ROOT / "models" / "productlens")
    parser.add_argument("--db-url", default=os.environ.get("PRODUCTLENS_DB_URL"))
    parser.add_argument("--clients", type=int, default=8, help="clients posting photos without pause (default 8)")
    parser.add_argument("--share", type=float, default=0.2, help="PRODUCTLENS_CANARY_SHARE (default 0.2)")
    parser.add_argument("--settle-s", type=float, default=10.0, help="load after each step (default 10 s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    photos = benchmark_photos(24, per_class=3)
    workdir = Path(tempfile.mkdtemp(prefix="bench-canary-"))
    source, model_kind = model_base_or_stand_in(args.model_base_path, workdir, [p.data for p in photos])
    newest = source / str(contract.versions(source)[-1])
    model_dir = workdir / "models" / MODEL_NAME
    model_dir.mkdir(parents=True)
    shutil.copytree(newest, model_dir / "1")
    card = json.loads((newest / contract.MODEL_CARD_FILE).read_text())
    config = workdir / "models.config"
    config.write_text(CONFIG.format(name=MODEL_NAME, base_path=model_dir))

    server_args = [
        f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=0.5",
        "--file_system_poll_wait_seconds=0.5", "--enable_batching",
        f"--batching_parameters_file={REPO_ROOT / 'serving' / 'batching.config'}", "--rest_api_port=0",
    ]  # fmt: skip
    steps: list[tuple[str, float]] = []
    with ExitStack() as stack:
        server = stack.enter_context(model_server_process(workdir / "model_server", server_args, timeout_s=180))
        watch = stack.enter_context(labels.ModelServerWatch(server.grpc_address, MODEL_NAME))
        watch.until(lambda: watch.label_version(labels.STABLE_LABEL) == 1, "serve version 1 as stable", 180)
        url, _ = start_app(
            stack, REPO_ROOT, workdir, server.grpc_address, args.db_url, {"PRODUCTLENS_CANARY_SHARE": str(args.share)}
        )

        load = Load(url, photos)
        clients = [threading.Thread(target=load.client, args=(i * 3,), daemon=True) for i in range(args.clients)]
        for client in clients:
            client.start()
        try:
            time.sleep(args.settle_s)
            steps.append(("canary publish", time.monotonic()))
            stable = labels.pin_stable_for_canary([config], MODEL_NAME, watch)
            canary_card = {**card, contract.NOT_SURE_THRESHOLD: card[contract.NOT_SURE_THRESHOLD] * 0.9}
            version = int(publish_version(newest, model_dir, canary_card).name)
            print(labels.label_canary([config], MODEL_NAME, stable, version, watch))
            steps.append(("canary out", time.monotonic()))
            time.sleep(args.settle_s)
            steps.append(("promote", time.monotonic()))
            print(labels.promote([config], MODEL_NAME, watch))
            steps.append(("promoted", time.monotonic()))
            time.sleep(args.settle_s)
            steps.append(("rollback", time.monotonic()))
            print(labels.rollback([config], MODEL_NAME, watch))
            steps.append(("rolled back", time.monotonic()))
            time.sleep(args.settle_s)
        finally:
            load.stop.set()
            for client in clients:
                client.join(timeout=60)
    ends = [*steps, ("end", time.monotonic())]
    phases = {"stable only": [a for a in load.answers if a.at < ends[0][1]]}
    for (name, start), (_, end) in zip(ends, ends[1:], strict=False):
        phases[name] = [a for a in load.answers if start <= a.at < end]
    figures: dict[str, Any] = {
        "model": model_kind, "clients": args.clients, "canary_share": args.share, "settle_s": args.settle_s,
        "requests": len(load.answers), "failed": sum(a.status != 200 for a in load.answers),
        "phases": {name: phase_figures(answers) for name, answers in phases.items()},
    }  # fmt: skip
    for name, phase in figures["phases"].items():
        print(
            f"{name:>15}: {phase['requests']:5d} requests, {phase['failed']} failed, "
            f"p50 {phase['p50_ms'] or 0:.0f} ms, p99 {phase['p99_ms'] or 0:.0f} ms; answered by {phase['answered_by']}"
        )
    print(
        f"{figures['requests']} requests from {args.clients} clients, {figures['failed']} failed (goal: 0); "
        f"canary share {args.share}; model: {model_kind}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
