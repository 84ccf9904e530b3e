"""The reports a user opens from disk render with the network off, in headless Chromium (Debian's package, driven
by Playwright) with every request that is not a local file refused: DVC's plots page as `make plots` builds it,
and the Great Expectations Data Docs of a small validation run, as a site and as the one page KFP shows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix

from components import evaluate
from components.train import EpochLog
from components.validate import validate_dataset
from pipelines.steps import data_docs_page
from tests.components.test_validate import CLASSES, small_params
from tests.conftest import REPO_ROOT
from tests.fixtures.images import write_dataset

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
# As root, with no network but loopback: no sandbox, no GPU, and none of Chromium's background connections.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")
PLOTS_TEMPLATE = REPO_ROOT / "common" / "report_assets" / "dvc_plots.html"  # the Makefile's PLOTS_TEMPLATE


def chromium_or_skip() -> Path:
    """Debian's chromium; installs it (make browser) when missing, skips only if that is impossible."""
    if not CHROMIUM.exists() and shutil.which("make"):
        subprocess.run(["make", "-C", str(REPO_ROOT), "browser"], capture_output=True, timeout=600, check=False)
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed and `make browser` (apt-get install chromium) failed")
    return CHROMIUM


@dataclass
class OfflineBrowser:
    page: Any  # playwright Page
    web_requests: list[str] = field(default_factory=list)  # every request that would have left the machine
    errors: list[str] = field(default_factory=list)  # uncaught JavaScript errors
    missing: list[str] = field(default_factory=list)  # local files a page names but cannot load

    def loaded_everything_locally(self) -> bool:
        return self.web_requests == [] and self.missing == []


@pytest.fixture
def offline() -> Iterator[OfflineBrowser]:
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            session = OfflineBrowser(context.new_page())

            def local_only(route: Any) -> None:
                if route.request.url.startswith(LOCAL_SCHEMES):
                    route.continue_()
                else:
                    route.abort("internetdisconnected")

            context.route("**/*", local_only)
            context.on(
                "request",
                lambda request: (
                    None if request.url.startswith(LOCAL_SCHEMES) else session.web_requests.append(request.url)
                ),
            )
            context.on(
                "requestfailed",
                lambda request: session.missing.append(request.url) if request.url.startswith(LOCAL_SCHEMES) else None,
            )
            session.page.on("pageerror", lambda error: session.errors.append(str(error)))
            yield session
        finally:
            browser.close()


# ----- DVC plots ----------------------------------------------------------------------------------------------------


def plots_project(root: Path) -> Path:
    """A DVC project with the repo's dvc.yaml and small plot files, written by the pipeline's own writers."""
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=dvc_env())
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    names = ["keyboard", "monitor", "mouse"]
    labels, predictions = np.array([0, 0, 0, 1, 1, 2, 2, 2]), np.array([0, 0, 2, 1, 1, 2, 2, 0])
    confidence = np.array([0.9, 0.8, 0.55, 0.95, 0.7, 0.85, 0.6, 0.5])
    plots = root / "plots" / "evaluate"
    plots.mkdir(parents=True)
    evaluate.confusion_rows(labels, predictions, names).to_csv(plots / "confusion.csv", index=False)
    matrix = confusion_matrix(labels, predictions, labels=range(len(names)))
    (plots / "confusion.png").write_bytes(evaluate.confusion_png(matrix, names, "test"))
    curve = evaluate.risk_coverage(confidence, labels == predictions)
    curve.to_csv(plots / "risk_coverage.csv", index=False)
    (plots / "risk_coverage.png").write_bytes(evaluate.risk_coverage_png(curve, 0.7, 0.95, "test"))
    history = EpochLog(root / "dvclive" / "train")
    for phase, losses in (("head", [1.2, 0.8, 0.6]), ("fine_tune", [0.9, 0.7])):
        for number, loss in enumerate(losses, start=1):
            logs = {"loss": loss, "accuracy": 1 - loss / 2, "val_loss": loss - 0.1, "val_accuracy": 1.1 - loss / 2}
            history.add(phase, number, len(losses), logs, seconds=0.0)
    history.close()
    return root


def dvc_env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1"}


def make_plots(project: Path) -> Path:
    """What `make plots` runs, in `project`: DVC's page from the vendored template, Vega copied beside it."""
    out = project / "dvc_plots"
    subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(PLOTS_TEMPLATE), "--out", str(out)],
        cwd=project, check=True, capture_output=True, env=dvc_env(),
    )  # fmt: skip
    for package in sorted(PLOTS_TEMPLATE.parent.glob("vega*")):
        shutil.copytree(package, out / "vendor" / package.name)
    return out / "index.html"


def test_dvc_plots_draw_every_chart_with_the_network_off(offline: OfflineBrowser, tmp_path: Path) -> None:
    index = make_plots(plots_project(tmp_path))
    charts = index.read_text(encoding="utf-8").count("vegaEmbed(")
    assert charts >= 4  # confusion, risk-coverage and the two learning curves at least
    page = offline.page
    page.goto(index.as_uri())
    page.wait_for_function(
        "n => document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks').length === n", arg=charts
    )
    sizes = page.eval_on_selector_all(".vega-embed canvas", "els => els.map(c => [c.width, c.height])")
    drawn = [(width, height) for width, height in sizes if width > 100 and height > 100]
    # The fixture's files: confusion, risk-coverage, 2 learning curves, DVCLive's 5 per-file curves (a plot of
    # dvc.yaml whose file the fixture does not write is an empty chart).
    assert len(drawn) >= 9, sizes
    images = page.eval_on_selector_all("img", "els => els.map(i => i.naturalWidth)")
    assert len(images) == 2 and all(width > 0 for width in images)  # confusion.png, risk_coverage.png
    assert offline.loaded_everything_locally(), offline
    assert offline.errors == []
    page.screenshot(path=str(tmp_path / "dvc_plots.png"), full_page=True)


# ----- Great Expectations Data Docs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataDocs:
    site: Path
    metrics: dict[str, Any]


@pytest.fixture(scope="module")
def data_docs(tmp_path_factory: pytest.TempPathFactory) -> DataDocs:
    """Data Docs of a small validation run with one failure: an image too small for the model."""
    root = tmp_path_factory.mktemp("validation")
    images = write_dataset(root / "images", CLASSES, per_class=4, size=64)
    Image.new("RGB", (8, 8), "white").save(images / "mouse" / "thumbnail.jpg")
    (root / "catalog").mkdir()
    (root / "catalog" / "mouse.csv").write_text("name,price\nLogitech G305,29.99\n")
    _, report, metrics = validate_dataset(images, root / "catalog", small_params(), root / "data_docs")
    assert not report.success
    return DataDocs(root / "data_docs", metrics)


def test_data_docs_index_lists_every_validation_with_the_network_off(
    offline: OfflineBrowser, data_docs: DataDocs, tmp_path: Path
) -> None:
    page = offline.page
    page.goto((data_docs.site / "index.html").as_uri())
    rows = page.locator(".ge-index-page-validation-results-table tbody tr")
    rows.first.wait_for(timeout=20_000)
    listed = " ".join(rows.all_inner_texts())
    assert rows.count() == 3 and all(suite in listed for suite in ("files", "folders", "catalog_mouse_csv")), listed
    assert icon_font_loaded(page)
    assert offline.loaded_everything_locally(), offline
    assert offline.errors == []
    page.screenshot(path=str(tmp_path / "data_docs_index.png"), full_page=True)


def test_data_docs_validation_page_shows_the_failure_with_the_network_off(
    offline: OfflineBrowser, data_docs: DataDocs
) -> None:
    files_page = next((data_docs.site / "validations" / "files").rglob("*.html"))
    page = offline.page
    page.goto(files_page.as_uri())
    page.wait_for_selector(".bootstrap-table", timeout=20_000)  # bootstrap-table ran on the page's tables
    text = page.inner_text("body")
    assert "values must be greater than or equal to 32" in text and "1 unexpected values found" in text
    assert page.locator("table").count() > 5
    assert icon_font_loaded(page)
    assert offline.loaded_everything_locally(), offline
    assert offline.errors == []


def test_kfp_data_docs_page_renders_each_validation_with_the_network_off(
    offline: OfflineBrowser, data_docs: DataDocs, tmp_path: Path
) -> None:
    kfp_page = tmp_path / "data_docs.html"
    kfp_page.write_text(data_docs_page(data_docs.site, data_docs.metrics), encoding="utf-8")
    page = offline.page
    page.goto(kfp_page.as_uri())
    assert page.inner_text("h1") == "Data validation FAILED"
    page.eval_on_selector_all("details", "els => els.forEach(e => { e.open = true; })")
    frames = [frame for frame in page.frames if frame != page.main_frame]
    assert len(frames) == 3
    for frame in frames:
        frame.wait_for_selector(".bootstrap-table", timeout=20_000)
        assert frame.locator("table").count() > 1
        assert icon_font_loaded(frame)  # the stylesheet came in, with its fonts
        assert frame.evaluate("document.querySelector('.navbar-brand img').naturalWidth") > 0  # GX's logo
    assert offline.loaded_everything_locally(), offline
    page.screenshot(path=str(tmp_path / "kfp_data_docs.png"), full_page=True)


def icon_font_loaded(page: Any) -> bool:
    """Font Awesome (GX's pass/fail icons) was loaded in `page` (a Page or a Frame), from the vendored woff2."""
    return page.evaluate(
        """async () => {
            await document.fonts.ready;
            return [...document.fonts].some(f => f.family.includes("Font Awesome") && f.status === "loaded");
        }"""
    )
