"""A canary rollout under load: while two clients post photos to the recommender without pause, a new model version is
published as the canary (half the traffic), promoted, and rolled back. Every request is answered, and the answers'
X-Model-Label / X-Model-Version headers follow the rollout."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from components import publish as publish_step
from components.candidate import identity
from components.export import ExportParams, export_candidate
from productlens.cli import main as productlens
from recommender import build_kb
from recommender.app import Settings, create_app
from tests.conftest import REPO_ROOT
from tests.fixtures.catalog import write_catalog, write_params
from tests.fixtures.knowledge_base import serve_app
from tests.fixtures.model_server import TinyModel, start_model_server_process, wait_for_versions

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GATE = {"blessed": True, "reasons": ["test"]}
CLIENTS = 2
SETTLE_S = 1.5  # load after each step, once its answers show


@dataclass
class Load:
    """Clients posting photos until `stop`; every answer's status, label and version, in order."""

    url: str
    photo: bytes
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[tuple[int, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                try:
                    response = session.post(
                        f"{self.url}/v1/recommendations", files={"image": ("a.jpg", self.photo)}, timeout=30
                    )
                    answer = (response.status_code, response.headers.get("X-Model-Label", ""),
                              response.headers.get("X-Model-Version", ""))  # fmt: skip
                except requests.RequestException as error:
                    answer = (0, type(error).__name__, "")
                with self.lock:
                    self.answers.append(answer)

    def since(self, start: int) -> Counter:
        with self.lock:
            return Counter(self.answers[start:])

    def until(self, seen: Callable[[Counter], bool], what: str, timeout_s: float = 60) -> int:
        """Wait until the answers after now show `seen`, then SETTLE_S more; returns where they start."""
        start = len(self.answers)
        deadline = time.monotonic() + timeout_s
        while not seen(self.since(start)):
            assert time.monotonic() < deadline, f"{what} never showed; answers: {self.since(start)}"
            time.sleep(0.1)
        time.sleep(SETTLE_S)
        return start


def candidate(tiny_model: TinyModel, output: Path, not_sure_threshold: float) -> Path:
    evaluation = {"accuracy": 0.95, "macro_f1": 0.94, "not_sure_threshold": not_sure_threshold}
    export_candidate(
        tiny_model.keras_model, tiny_model.class_names, GATE, evaluation, output, ExportParams(top_k=3),
        tiny_model.images(),
    )  # fmt: skip
    return output


def publish_args(candidate_dir: Path, workdir: Path, models: Path, config: Path) -> list[str]:
    blessing = workdir / f"{candidate_dir.name}.blessing.json"
    blessing.write_text(json.dumps({"blessed": True, "reasons": [], "candidate": identity(candidate_dir)}))
    gate = workdir / "gate.json"
    gate.write_text(json.dumps(GATE))
    return [
        "--candidate", str(candidate_dir), "--gate", str(gate), "--blessing", str(blessing),
        "--data-dvc", str(REPO_ROOT / "data.dvc"), "--output", str(models), "--models-config", str(config),
    ]  # fmt: skip


def test_no_request_fails_across_a_canary_publish_promote_and_rollback(tiny_model: TinyModel, tmp_path: Path) -> None:
    models = tmp_path / "models"
    config = tmp_path / "models.config"
    shipped = (REPO_ROOT / "serving" / "models.config").read_text()
    config.write_text(shipped.replace('"models/productlens"', f'"{models / "productlens"}"'))
    first, second = candidate(tiny_model, tmp_path / "v1", 0.5), candidate(tiny_model, tmp_path / "v2", 0.4)
    assert publish_step.main(publish_args(first, tmp_path, models, config)) == 0  # version 1, stable -> 1

    catalog, params, db = tmp_path / "catalog", tmp_path / "params.yaml", tmp_path / "kb.db"
    write_catalog(catalog)
    write_params(params, REPO_ROOT / "params.yaml")
    kb_args = [
        "--catalog", str(catalog), "--params", str(params), "--output", str(db), "--metrics", str(tmp_path / "kb.json"),
    ]  # fmt: skip
    assert build_kb.main(kb_args) == 0

    # `python -m serving.server` itself, as `make serve` runs it: the rollout's timing is the real process's.
    with start_model_server_process(
        tmp_path / "server", f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=0.2",
        "--file_system_poll_wait_seconds=0.2", "--enable_batching",
        f"--batching_parameters_file={REPO_ROOT / 'serving' / 'batching.config'}",
    ) as server:  # fmt: skip
        wait_for_versions(server.grpc_address, "productlens", {1: "AVAILABLE"})
        settings = Settings(
            db_url=f"sqlite:///{db}", model_grpc=server.grpc_address, params_path=params, canary_share=0.5,
            model_timeout_s=10.0,
        )  # fmt: skip
        with serve_app(create_app(settings)) as url:
            load = Load(url, tiny_model.sample_images["mouse"][0])
            clients = [threading.Thread(target=load.client, daemon=True) for _ in range(CLIENTS)]
            for client in clients:
                client.start()
            try:
                load.until(lambda seen: seen[(200, "stable", "1")] >= 20, "stable answering")
                rollout = ["--label", "canary", "--server", server.grpc_address]
                assert publish_step.main([*publish_args(second, tmp_path, models, config), *rollout]) == 0
                canary = load.until(lambda seen: seen[(200, "canary", "2")] >= 10, "the canary answering")
                server_flag = ["--models-config", str(config), "--server", server.grpc_address]
                promoting = len(load.answers)
                assert productlens(["promote", *server_flag]) == 0
                promoted = load.until(lambda seen: seen[(200, "stable", "2")] >= 10, "stable -> 2 answering")
                rolling_back = len(load.answers)
                assert productlens(["rollback", *server_flag]) == 0
                rolled_back = load.until(lambda seen: seen[(200, "stable", "1")] >= 10, "stable -> 1 answering")
            finally:
                load.stop.set()
                for client in clients:
                    client.join(timeout=30)
            metrics = requests.get(f"{url}/metrics", timeout=10).text

    everything = Counter(load.answers)
    failed = {answer: n for answer, n in everything.items() if answer[0] != 200}
    assert failed == {}, f"failed requests: {failed}"
    assert sum(everything.values()) >= 100
    # From the first answers of each step to the next step, every answer came from what that step serves.
    assert set(load.answers[canary:promoting]) == {(200, "stable", "1"), (200, "canary", "2")}
    assert set(load.answers[promoted:rolling_back]) == {(200, "stable", "2")}
    assert set(load.answers[rolled_back:]) == {(200, "stable", "1")}
    # After promote and rollback the canary label is gone: its share of the requests was answered by stable.
    assert 'productlens_recommender_canary_fallbacks_total{reason="label_unknown"}' in metrics
