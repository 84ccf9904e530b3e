"""The upload page in headless Chromium (Debian's package, driven by Playwright): a shopper's round trip."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from recommender.app import Settings, create_app
from tests.conftest import REPO_ROOT
from tests.fixtures.knowledge_base import BuiltKb, serve_app
from tests.fixtures.model_server import ModelServerHandle

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
# As root, with no network but loopback: no sandbox, no GPU, and none of Chromium's background connections.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium_or_skip() -> Path:
    """Debian's chromium; installs it (make browser) when missing, skips only if that is impossible."""
    if not CHROMIUM.exists() and shutil.which("make"):
        subprocess.run(["make", "-C", str(REPO_ROOT), "browser"], capture_output=True, timeout=600, check=False)
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed and `make browser` (apt-get install chromium) failed")
    return CHROMIUM


@pytest.fixture(scope="module")
def page_url(real_kb: BuiltKb, model_server: ModelServerHandle) -> Iterator[str]:
    settings = Settings(db_url=real_kb.url, model_grpc=model_server.grpc_address, params_path=REPO_ROOT / "params.yaml")
    with serve_app(create_app(settings)) as url:
        yield url


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator:
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            yield page
        finally:
            browser.close()


def test_upload_a_photo_and_see_the_prediction_and_recommendations(
    page_url: str, browser_page, model_server: ModelServerHandle, tmp_path: Path
) -> None:
    photo = tmp_path / "my-keyboard.jpg"
    photo.write_bytes(model_server.sample_images["keyboard"][1])
    page = browser_page
    page.goto(page_url)
    assert page.title() == "ProductLens: what is this product?"
    page.set_input_files("#file", str(photo))
    page.fill("#budget_max", "150")
    page.fill("#brands", "Logitech")
    page.click("#submit")
    page.wait_for_selector("#products li", timeout=20_000)

    assert page.inner_text("#detected").startswith("This is a keyboard")
    bars = page.locator("#bars .bar")
    assert bars.count() == 3 and bars.first.inner_text().startswith("keyboard")
    assert "products" in page.inner_text("#facts") and "keyboard" in page.inner_text("#facts")
    first = page.locator("#products li").first.inner_text()
    assert "within your 150 USD budget" in first and "Logitech, a brand you prefer" in first
    screenshot = tmp_path / "upload_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_the_page_shows_the_reason_when_the_upload_is_not_a_photo(page_url: str, browser_page, tmp_path: Path) -> None:
    not_a_photo = tmp_path / "notes.txt"
    not_a_photo.write_text("shopping list: a keyboard")
    page = browser_page
    page.goto(page_url)
    page.set_input_files("#file", str(not_a_photo))
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert page.inner_text("#error") == "This file is not an image: upload a JPEG or PNG photo."


def test_api_docs_render_every_endpoint_in_the_browser_without_internet(page_url: str, browser_page) -> None:
    page = browser_page
    page.goto(f"{page_url}/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)
    paths = {page.locator(".opblock-summary-path").nth(i).inner_text() for i in range(page.locator(".opblock").count())}
    assert {"/v1/recommendations", "/v1/products", "/v1/products/{product_id}", "/healthz"} <= paths
