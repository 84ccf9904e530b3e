"""The recommender's /metrics and the answers' model headers: requests per endpoint, time per hop (the same numbers
as the Server-Timing header), the version label that answered (canary, with its fallback to stable), the ranking
cache and its invalidation when the knowledge base is rebuilt; and the Grafana dashboard and Prometheus scrape
config read metrics the recommender and the model server really expose."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from recommender.app import Settings, create_app
from tests.conftest import REPO_ROOT
from tests.fixtures.catalog import MOUSE_CSV, SMALL_CATALOG, write_catalog, write_params
from tests.fixtures.knowledge_base import serve_app
from tests.fixtures.model_server import MODEL_NAME, TinyModel, export_tiny, start_model_server, wait_for_versions

pytestmark = pytest.mark.e2e

MONITORING = REPO_ROOT / "serving" / "k8s" / "monitoring"
LABELLED_CONFIG = """model_config_list {{ config {{
  name: "{name}" base_path: "{base_path}" model_platform: "tensorflow"
  model_version_policy {{ specific {{ versions: 1 }} }}
  {labels}
}} }}
"""


@dataclass(frozen=True)
class LabelledServer:
    grpc_address: str
    rest_url: str
    config: Path
    base_path: Path

    def label(self, **labels: int) -> None:
        """Rewrite the server's models.config with these version labels (it re-reads the file every 0.2 s)."""
        text = " ".join(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in labels.items())
        self.config.write_text(LABELLED_CONFIG.format(name=MODEL_NAME, base_path=self.base_path, labels=text))


@pytest.fixture(scope="module")
def labelled_server(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelledServer]:
    """The tiny model as version 1, labelled stable, on a server that re-reads its config and exposes metrics."""
    root = tmp_path_factory.mktemp("labelled_server")
    export_tiny(tiny_model, root / "models")
    config = root / "models.config"
    with_config = LabelledServer("", "", config, root / "models" / MODEL_NAME)
    with_config.label(stable=1)
    with start_model_server(
        root / "server", f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=0.2",
        "--file_system_poll_wait_seconds=0.2", "--enable_batching",
        f"--monitoring_config_file={REPO_ROOT / 'serving' / 'monitoring.config'}",
    ) as server:  # fmt: skip
        wait_for_versions(server.grpc_address, MODEL_NAME, {1: "AVAILABLE"})
        yield LabelledServer(server.grpc_address, server.rest_url, config, with_config.base_path)


@dataclass(frozen=True)
class SmallKb:
    path: Path
    params: Path
    catalog: Path

    def build(self, files: dict[str, str] | None = None) -> None:
        """(Re)build the KB file from the small catalog (`files` replace some of its CSVs), as `make kb` does."""
        from recommender import build_kb

        write_catalog(self.catalog, {**SMALL_CATALOG, **(files or {})})
        code = build_kb.main(
            ["--catalog", str(self.catalog), "--params", str(self.params), "--output", str(self.path),
             "--metrics", str(self.path.with_suffix(".json"))]
        )  # fmt: skip
        assert code == 0


@pytest.fixture()
def small_kb(tmp_path: Path) -> SmallKb:
    kb = SmallKb(tmp_path / "kb" / "productlens.db", write_params(tmp_path / "params.yaml", REPO_ROOT / "params.yaml"),
                 tmp_path / "catalog")  # fmt: skip
    kb.build()
    return kb


def app_url(kb: SmallKb, server: LabelledServer, **overrides) -> AbstractContextManager[str]:
    settings = Settings(
        db_url=f"sqlite:///{kb.path}", model_grpc=server.grpc_address, model_timeout_s=10.0, params_path=kb.params,
        **overrides,
    )  # fmt: skip
    return serve_app(create_app(settings))


def post_photo(url: str, image: bytes, **fields: str) -> requests.Response:
    response = requests.post(
        f"{url}/v1/recommendations", files={"image": ("photo.jpg", image)}, data=fields, timeout=30
    )
    assert response.status_code == 200, response.text
    return response


def exposed_names(page: str) -> set[str]:
    """The names a query can use: every sample's, and every metric's (those with no samples yet as well)."""
    families = list(text_string_to_metric_families(page))
    names = {sample.name for family in families for sample in family.samples}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return names | {f"{f.name}{suffix}" for f in families for suffix in suffixes.get(f.type, ("",))}


def samples(page: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus page: (sample name, its labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


def metric(page: dict, name: str, **labels: str) -> float:
    return page.get((name, frozenset(labels.items())), 0.0)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def server_timing(response: requests.Response) -> dict[str, float]:
    return {
        name: float(duration)
        for name, _, duration in (
            part.strip().partition(";dur=") for part in response.headers["Server-Timing"].split(",")
        )
    }


def test_metrics_count_requests_per_endpoint_and_the_hops_the_header_shows(
    small_kb: SmallKb, labelled_server: LabelledServer, tiny_model: TinyModel
) -> None:
    mouse = tiny_model.sample_images["mouse"][0]
    with app_url(small_kb, labelled_server, model_label="stable") as url:
        answers = [post_photo(url, mouse, budget_max="100") for _ in range(3)]
        assert requests.get(f"{url}/v1/products/1", timeout=10).status_code == 200
        assert requests.get(f"{url}/v1/products/99999", timeout=10).status_code == 404
        assert requests.get(f"{url}/no/such/page", timeout=10).status_code == 404
        page = scrape(url)

    name = "productlens_recommender_request_duration_seconds_count"
    assert metric(page, name, method="POST", endpoint="/v1/recommendations", status="200") == 3
    assert metric(page, name, method="GET", endpoint="/v1/products/{product_id}", status="200") == 1
    assert metric(page, name, method="GET", endpoint="/v1/products/{product_id}", status="404") == 1
    assert metric(page, name, method="GET", endpoint="(unmatched)", status="404") == 1
    # Each hop's time is the Server-Timing header's (which shows it rounded to 0.01 ms).
    for hop in ("upload", "model", "db", "rank"):
        header_s = sum(server_timing(answer)[hop] for answer in answers) / 1000
        counted = metric(
            page, "productlens_recommender_hop_duration_seconds_count", endpoint="/v1/recommendations", hop=hop
        )
        summed = metric(
            page, "productlens_recommender_hop_duration_seconds_sum", endpoint="/v1/recommendations", hop=hop
        )
        assert counted == 3 and summed == pytest.approx(header_s, abs=3 * 0.005e-3), hop
    assert metric(page, "productlens_recommender_model_calls_total", label="stable", version="1", outcome="ok") == 3
    assert [(a.headers["X-Model-Label"], a.headers["X-Model-Version"]) for a in answers] == [("stable", "1")] * 3


def test_repeated_preferences_are_ranked_from_the_cache_until_the_kb_is_rebuilt(
    small_kb: SmallKb, labelled_server: LabelledServer, tiny_model: TinyModel
) -> None:
    mouse = tiny_model.sample_images["mouse"][0]
    with app_url(small_kb, labelled_server) as url:
        first = post_photo(url, mouse, budget_max="100").json()
        assert post_photo(url, mouse, budget_max="100").json()["products"] == first["products"]
        page = scrape(url)
        assert metric(page, "productlens_recommender_kb_cache_total", result="miss") == 1
        assert metric(page, "productlens_recommender_kb_cache_total", result="hit") == 1
        assert metric(page, "productlens_recommender_kb_builds_total") == 1

        small_kb.build({"mouse.csv": MOUSE_CSV + "Rebuilt Test Mouse,5.00,Optical,Wired,8000,Right,Black\n"})
        deadline = time.monotonic() + 15
        names: list[str] = []
        while "Rebuilt Test Mouse" not in names and time.monotonic() < deadline:
            time.sleep(0.2)
            names = [p["name"] for p in post_photo(url, mouse, budget_max="100", sort="cheapest").json()["products"]]
        assert names[0] == "Rebuilt Test Mouse"  # the cheapest mouse of the new build, without restarting the app
        assert metric(scrape(url), "productlens_recommender_kb_builds_total") == 2


def test_canary_share_asks_for_canary_and_stable_answers_while_there_is_none(
    small_kb: SmallKb, labelled_server: LabelledServer, tiny_model: TinyModel
) -> None:
    mouse = tiny_model.sample_images["mouse"][0]
    with app_url(small_kb, labelled_server, canary_share=1.0) as url:
        answers = [post_photo(url, mouse) for _ in range(2)]
        assert [a.headers["X-Model-Label"] for a in answers] == ["stable", "stable"]
        page = scrape(url)
        assert metric(page, "productlens_recommender_canary_fallbacks_total", reason="label_unknown") == 2
        calls = "productlens_recommender_model_calls_total"
        assert metric(page, calls, label="canary", version="", outcome="INVALID_ARGUMENT") == 2
        assert metric(page, calls, label="stable", version="1", outcome="ok") == 2
        assert metric(page, "productlens_recommender_canary_share") == 1.0

        labelled_server.label(stable=1, canary=1)
        try:
            deadline = time.monotonic() + 15
            while post_photo(url, mouse).headers["X-Model-Label"] != "canary":
                assert time.monotonic() < deadline, "the canary label never answered"
                time.sleep(0.1)
        finally:
            labelled_server.label(stable=1)


def test_a_version_label_the_server_lacks_is_a_503_that_names_it(
    small_kb: SmallKb, labelled_server: LabelledServer, tiny_model: TinyModel
) -> None:
    with app_url(small_kb, labelled_server, model_label="nosuch") as url:
        response = requests.post(
            f"{url}/v1/recommendations", files={"image": ("a.jpg", tiny_model.sample_images["mouse"][0])}, timeout=30
        )
    assert response.status_code == 503
    assert response.json()["detail"] == (
        "The model server has no such version label: Unrecognized servable version label: nosuch"
    )


def test_a_canary_share_needs_version_labels() -> None:
    with pytest.raises(ValidationError, match="CANARY_SHARE needs version labels"):
        Settings(model_version=3, canary_share=0.1)
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        Settings(canary_share=1.5)


METRIC_NAME = re.compile(r"(:tensorflow:serving:[a-z_]+|productlens_[a-z_]+)")


def test_the_dashboard_and_scrape_config_read_what_the_app_and_model_server_expose(
    small_kb: SmallKb, labelled_server: LabelledServer, tiny_model: TinyModel
) -> None:
    with app_url(small_kb, labelled_server, canary_share=0.5) as url:
        for _ in range(4):
            post_photo(url, tiny_model.sample_images["mouse"][0])
        app_page = requests.get(f"{url}/metrics", timeout=10).text
    server_page = requests.get(f"{labelled_server.rest_url}/monitoring/prometheus/metrics", timeout=10).text
    exposed = exposed_names(app_page) | exposed_names(server_page)

    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(queries) >= 8
    used = {name for query in queries for name in METRIC_NAME.findall(query)}
    assert used - exposed == set(), "the dashboard queries metrics nothing exposes"
    assert any(n.startswith(":tensorflow:serving:") for n in used) and any(n.startswith("productlens_") for n in used)

    scrape_config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    paths = {job["job_name"]: job.get("metrics_path", "/metrics") for job in scrape_config["scrape_configs"]}
    assert paths == {
        "productlens-model-server": "/monitoring/prometheus/metrics",
        "productlens-recommender": "/metrics",
    }
