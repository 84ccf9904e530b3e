"""Users' answers to "Is this a <class>?": the API and the page record them with their photo (content-addressed
store + feedback table), refuse what cannot become data, keep them across knowledge-base rebuilds, and export them
as new dataset images and blind-review candidates. Real model server (tiny model), real KB (small catalog)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests
from PIL import Image

from recommender import build_kb, kb
from recommender.app import create_app
from recommender.feedback import FeedbackBook, FeedbackStore, export_feedback, write_candidates
from recommender.settings import Settings
from tests.conftest import REPO_ROOT
from tests.fixtures.catalog import write_catalog, write_params
from tests.fixtures.images import jpeg_bytes, synthetic_image, write_dataset
from tests.fixtures.knowledge_base import free_port, serve_app
from tests.fixtures.model_server import CLASS_NAMES, ModelServerHandle
from tests.recommender.test_kb_postgres import PG_BIN, _as_postgres_user
from tests.recommender.test_openapi import assert_matches_spec
from tests.recommender.test_upload_page import CHROMIUM_ARGS, chromium_or_skip

pytestmark = pytest.mark.e2e

MAX_UPLOAD = 200_000


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def photo_bytes(image_format: str = "JPEG", size: tuple[int, int] = (96, 96), colour: str = "teal") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=image_format)
    return buffer.getvalue()


def build_small_kb(folder: Path, url: str | None = None) -> tuple[str, Path]:
    """The small test catalog built with the real CLI (into `url`, else a SQLite file); returns the URL and params."""
    catalog = write_catalog(folder / "catalog")
    params = write_params(folder / "params.yaml", REPO_ROOT / "params.yaml")
    target = ["--db-url", url] if url else ["--output", str(folder / "kb.db")]
    args = ["--catalog", str(catalog), "--params", str(params), *target, "--metrics", str(folder / "m.json")]
    assert build_kb.main(args) == 0
    return url or kb.sqlite_url(folder / "kb.db"), params


@pytest.fixture(scope="module")
def small_kb(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return build_small_kb(tmp_path_factory.mktemp("small_kb"))


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("app") / "feedback"


@pytest.fixture(scope="module")
def settings(small_kb: tuple[str, Path], model_server: ModelServerHandle, feedback_dir: Path) -> Settings:
    url, params = small_kb
    return Settings(
        db_url=url,
        model_grpc=model_server.grpc_address,
        model_timeout_s=10.0,
        max_upload_bytes=MAX_UPLOAD,
        params_path=params,
        feedback_dir=feedback_dir,
    )


@pytest.fixture(scope="module")
def api(settings: Settings) -> Iterator[str]:
    with serve_app(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def spec(api: str) -> dict[str, Any]:
    return requests.get(f"{api}/openapi.json", timeout=10).json()


def recommend(url: str, image: bytes) -> requests.Response:
    return requests.post(f"{url}/v1/recommendations", files={"image": ("photo.jpg", image)}, timeout=30)


def answer(url: str, image: bytes | None = None, filename: str = "photo.jpg", **fields: Any) -> requests.Response:
    files = {"image": (filename, image)} if image is not None else None
    data = {k: str(v) for k, v in fields.items()}
    return requests.post(f"{url}/v1/feedback", files=files, data=data, timeout=30)


def recorded(settings: Settings) -> list[dict[str, Any]]:
    """The answers as the export reads them back from the feedback table."""
    book = FeedbackBook.open(settings.feedback_database_url(), settings.feedback_dir, settings.params_path)
    try:
        return [a.to_dict() for a in book.answers()]
    finally:
        book.close()


def test_a_recommendation_asks_about_its_class_and_names_the_photo_by_sha256(
    api: str, spec: dict[str, Any], model_server: ModelServerHandle
) -> None:
    mouse = model_server.sample_images["mouse"][0]
    response = recommend(api, mouse)
    assert_matches_spec(spec, response, "/v1/recommendations", 200)
    body = response.json()
    assert body["prediction"]["class"] == "mouse"
    assert body["feedback"]["image_sha256"] == sha256(mouse)
    assert body["feedback"]["question"] == "Is this a mouse?"
    assert [c["class"] for c in body["feedback"]["classes"]] == CLASS_NAMES
    assert {"class": "hdd", "label": "HDD"} in body["feedback"]["classes"]
    speakers = recommend(api, model_server.sample_images["speakers"][0]).json()
    assert speakers["feedback"]["question"] == "Are these speakers?"


def test_a_correction_is_stored_with_its_photo_under_its_sha256(
    api: str, spec: dict[str, Any], settings: Settings, model_server: ModelServerHandle
) -> None:
    photo = model_server.sample_images["mouse"][1]
    prediction = recommend(api, photo).json()
    before = len(recorded(settings))
    response = answer(
        api,
        photo,
        image_sha256=prediction["feedback"]["image_sha256"],
        predicted_class=prediction["prediction"]["class"],
        user_class="keyboard",
        model_name=prediction["prediction"]["model"]["name"],
        model_version=prediction["prediction"]["model"]["version"],
    )
    assert_matches_spec(spec, response, "/v1/feedback", 201)
    saved = response.json()
    assert saved["image_sha256"] == sha256(photo) and saved["image_stored"] is True
    assert (saved["predicted_class"], saved["user_class"], saved["confirmed"]) == ("mouse", "keyboard", False)
    assert (saved["model_name"], saved["model_version"]) == ("productlens", model_server.version)
    stored = settings.feedback_dir / sha256(photo)[:2] / f"{sha256(photo)}.jpg"
    assert stored.read_bytes() == photo

    # A second answer about the same photo needs only its sha256; the store keeps one copy.
    again = answer(api, image_sha256=sha256(photo).upper(), predicted_class="mouse", user_class="mouse")
    assert_matches_spec(spec, again, "/v1/feedback", 201)
    assert again.json()["image_stored"] is False and again.json()["confirmed"] is True
    assert [p.name for p in settings.feedback_dir.rglob("*.jpg")].count(stored.name) == 1
    rows = recorded(settings)[before:]
    assert [(r["image_sha256"], r["user_class"], r["model_version"]) for r in rows] == [
        (sha256(photo), "keyboard", model_server.version),
        (sha256(photo), "mouse", None),
    ]


def test_answers_that_cannot_become_data_are_refused_in_the_apps_error_shape(
    api: str, spec: dict[str, Any], settings: Settings, model_server: ModelServerHandle
) -> None:
    photo = model_server.sample_images["keyboard"][2]
    before = recorded(settings)
    refusals = {
        422: [
            (
                answer(api, photo, predicted_class="keyboard", user_class="toaster"),
                "user_class 'toaster' is not a class",
            ),
            (answer(api, photo, predicted_class="Keyboard", user_class="mouse"), "predicted_class 'Keyboard' is not"),
            (
                answer(
                    api, photo, image_sha256=sha256(b"another photo"), predicted_class="keyboard", user_class="mouse"
                ),
                f"The photo's sha256 is {sha256(photo)}",
            ),
            (answer(api, predicted_class="keyboard", user_class="mouse"), "Send the photo (field image)"),
            (answer(api, image_sha256="abc", predicted_class="keyboard", user_class="mouse"), "64 hexadecimal digits"),
            (
                answer(api, photo_bytes(size=(40, 40)), predicted_class="keyboard", user_class="mouse"),
                "The photo is 40x40 pixels, under the 64x64",
            ),
            (answer(api, photo, predicted_class="keyboard", user_class="mouse", model_version="v3"), "model_version"),
            (answer(api, photo, user_class="mouse"), "predicted_class"),
        ],
        404: [
            (
                answer(api, image_sha256=sha256(b"never sent"), predicted_class="keyboard", user_class="mouse"),
                f"No photo with sha256 {sha256(b'never sent')} has been sent yet",
            )
        ],
        415: [
            (answer(api, b"%PDF-1.4", "invoice.pdf", predicted_class="keyboard", user_class="mouse"), "not an image"),
            (
                answer(api, photo_bytes("GIF"), "anim.gif", predicted_class="keyboard", user_class="mouse"),
                "GIF photos cannot become training data: answers are kept for JPEG and PNG photos.",
            ),
        ],
    }
    for status, cases in refusals.items():
        for response, words in cases:
            assert_matches_spec(spec, response, "/v1/feedback", status)
            assert words in response.json()["detail"]
    unknown = refusals[422][0][0].json()["detail"]
    assert unknown.endswith(f"use one of {', '.join(CLASS_NAMES)}.")
    assert recorded(settings) == before
    assert not list(settings.feedback_dir.rglob(f"{sha256(photo)}.*"))


def test_the_spec_declares_the_feedback_answers(spec: dict[str, Any]) -> None:
    operation = spec["paths"]["/v1/feedback"]["post"]
    assert set(operation["responses"]) == {"201", "404", "413", "415", "422", "503"}
    assert operation["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/FeedbackRecorded"
    }
    form = spec["components"]["schemas"][operation["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
                                          .rsplit("/", 1)[1]]  # fmt: skip
    assert set(form["required"]) == {"predicted_class", "user_class"}


def test_the_page_asks_and_records_the_users_correction(
    api: str, settings: Settings, model_server: ModelServerHandle, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    photo = tmp_path / "my-monitor.jpg"
    photo.write_bytes(model_server.sample_images["monitor"][2])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(api)
            page.set_input_files("#file", str(photo))
            page.click("#submit")
            page.wait_for_selector("#feedback:not([hidden])", timeout=20_000)
            assert page.inner_text("#question") == "Is this a monitor?"
            options = page.locator("#right-class option").all_inner_texts()
            assert options[0] == "choose the right class" and "HDD" in options and "monitor" not in options
            page.select_option("#right-class", "webcam")
            page.click("#correct")
            page.wait_for_selector("#thanks:not([hidden])", timeout=10_000)
            assert page.inner_text("#thanks") == "Thanks: noted as webcam."
            assert page.locator("#yes").is_disabled()
            page.screenshot(path=str(tmp_path / "feedback.png"), full_page=True)
        finally:
            browser.close()
    last = recorded(settings)[-1]
    assert (last["image_sha256"], last["predicted_class"], last["user_class"]) == (
        sha256(photo.read_bytes()),
        "monitor",
        "webcam",
    )


# ----------------------------------------------------------------- the feedback table across KB rebuilds


def record_two_answers(settings: Settings) -> list[dict[str, Any]]:
    book = FeedbackBook.open(settings.feedback_database_url(), settings.feedback_dir, settings.params_path)
    try:
        book.record(predicted_class="mouse", user_class="keyboard", image=photo_bytes(colour="red"), model_version=1)
        book.record(predicted_class="hdd", user_class="hdd", image=photo_bytes("PNG", colour="blue"), model_version=1)
    finally:
        book.close()
    return recorded(settings)


def test_answers_survive_a_knowledge_base_rebuild_in_the_same_database(tmp_path: Path) -> None:
    url, params = build_small_kb(tmp_path)
    settings = Settings(db_url=url, params_path=params, feedback_dir=tmp_path / "fb", feedback_db_url=url)
    answers = record_two_answers(settings)
    assert build_small_kb(tmp_path, url=url)[0] == url  # build_kb --db-url: drops and recreates the KB's tables
    assert recorded(settings) == answers
    engine = kb.make_engine(url)
    with engine.connect() as conn:
        assert kb.count_products(conn) > 0
    engine.dispose()


def test_answers_survive_make_kb_which_replaces_the_sqlite_kb_file(tmp_path: Path) -> None:
    url, params = build_small_kb(tmp_path)
    settings = Settings(db_url=url, params_path=params, feedback_dir=tmp_path / "fb")
    # The SQLite KB is a build output that every rebuild renames a new file over: answers go beside the photos.
    assert settings.feedback_database_url() == kb.sqlite_url(tmp_path / "fb" / "feedback.db")
    answers = record_two_answers(settings)
    before = (tmp_path / "kb.db").stat().st_ino
    build_small_kb(tmp_path)  # build_kb --output kb.db, as `make kb` runs it
    assert (tmp_path / "kb.db").stat().st_ino != before
    assert recorded(settings) == answers


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on a free port (as tests/recommender/test_kb_postgres.py starts one)."""
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install psycopg)")
    initdb = shutil.which("initdb") or str(PG_BIN / "initdb")
    pg_ctl = shutil.which("pg_ctl") or str(PG_BIN / "pg_ctl")
    if not (Path(initdb).exists() and Path(pg_ctl).exists()):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="productlens-pg-"))
    root.chmod(0o777)
    run = _as_postgres_user()
    port = free_port()
    subprocess.run([*run, initdb, "-D", str(root / "data"), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)  # fmt: skip
    options = f"-p {port} -k {root} -c listen_addresses='' -c fsync=off"
    subprocess.run([*run, pg_ctl, "-D", str(root / "data"), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={root}&port={port}"
    finally:
        subprocess.run([*run, pg_ctl, "-D", str(root / "data"), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_on_postgresql_answers_live_in_the_kb_database_and_survive_its_rebuild(
    postgres_url: str, tmp_path: Path
) -> None:
    url, params = build_small_kb(tmp_path, url=postgres_url)
    settings = Settings(db_url=url, params_path=params, feedback_dir=tmp_path / "fb")
    assert settings.feedback_database_url() == postgres_url
    answers = record_two_answers(settings)
    build_small_kb(tmp_path, url=postgres_url)
    assert recorded(settings) == answers
    assert not (tmp_path / "fb" / "feedback.db").exists()


# ----------------------------------------------------------------- export


def test_export_adds_the_photos_the_dataset_lacks_under_the_users_class_and_lists_them_until_reviewed(
    tmp_path: Path,
) -> None:
    dataset = write_dataset(tmp_path / "images", ["keyboard", "monitor", "mouse"], per_class=2)
    in_dataset = (dataset / "mouse" / "mouse_0000.jpg").read_bytes()
    corrected, confirmed, disputed = (jpeg_bytes(synthetic_image(i, 50, 96)) for i in range(3))
    settings = Settings(params_path=REPO_ROOT / "params.yaml", feedback_dir=tmp_path / "fb")
    book = FeedbackBook.open(settings.feedback_database_url(), settings.feedback_dir, settings.params_path)
    try:
        book.record(predicted_class="mouse", user_class="keyboard", image=corrected)
        book.record(predicted_class="monitor", user_class="monitor", image=confirmed)
        book.record(predicted_class="monitor", user_class="monitor", image_sha256=sha256(confirmed))
        book.record(predicted_class="mouse", user_class="keyboard", image=disputed)
        book.record(predicted_class="mouse", user_class="mouse", image_sha256=sha256(disputed))
        book.record(predicted_class="mouse", user_class="mouse", image_sha256=sha256(disputed))
        book.record(predicted_class="mouse", user_class="mouse", image=in_dataset)
        answers = book.answers()
    finally:
        book.close()
    store = FeedbackStore(settings.feedback_dir)

    only_corrected = export_feedback(answers, store, tmp_path / "dry", CLASS_NAMES, corrected_only=True)
    assert only_corrected.candidates == [sha256(corrected), sha256(disputed)] and only_corrected.only_confirmed == 2

    result = export_feedback(answers, store, dataset, CLASS_NAMES, reviewed=[sha256(in_dataset)])
    assert (result.answers, result.confirmed, result.corrected, result.photos) == (7, 5, 2, 4)
    assert result.candidates == [sha256(corrected), sha256(confirmed), sha256(disputed)]
    assert (result.already_in_dataset, result.already_reviewed) == (1, 1)
    assert result.added_per_class == {"keyboard": 1, "monitor": 1, "mouse": 1}  # disputed: 2 users said mouse, 1 not
    assert (dataset / "keyboard" / f"feedback-{sha256(corrected)[:16]}.jpg").read_bytes() == corrected
    assert (dataset / "mouse" / f"feedback-{sha256(disputed)[:16]}.jpg").read_bytes() == disputed
    assert oct(os.stat(dataset / "monitor" / f"feedback-{sha256(confirmed)[:16]}.jpg").st_mode)[-3:] == "644"

    write_candidates(tmp_path / "candidates.csv", result.candidates)
    listed = pd.read_csv(tmp_path / "candidates.csv")
    assert list(listed.columns) == ["sha256"] and list(listed["sha256"]) == result.candidates  # no answer in view

    # Another export copies nothing and lists every answered photo of the dataset that has no decision yet.
    again = export_feedback(answers, store, dataset, CLASS_NAMES)
    assert (again.added, again.already_in_dataset) == (0, 4)
    assert again.candidates == [*result.candidates, sha256(in_dataset)]
    done = export_feedback(answers, store, dataset, CLASS_NAMES, reviewed=again.candidates)
    assert done.candidates == [] and done.already_reviewed == 4


def test_docker_compose_keeps_answers_on_a_volume_the_app_can_write() -> None:
    """`docker compose down && up` must not lose users' answers: the feedback store (photos and, beside the SQLite
    KB, feedback.db) is a named volume, and the image creates the folder for the user it runs as (a named volume
    starts as a copy of that folder, owner included)."""
    import yaml

    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    app = compose["services"]["recommender"]
    store = app["environment"]["PRODUCTLENS_FEEDBACK_DIR"]
    settings = Settings(db_url=app["environment"]["PRODUCTLENS_DB_URL"], feedback_dir=Path(store))
    assert settings.feedback_database_url() == f"sqlite:///{store}/feedback.db"
    named = {v.split(":")[0]: v.split(":")[1] for v in app["volumes"] if not v.startswith((".", "/"))}
    assert named.get("feedback") == store and "feedback" in compose["volumes"]
    dockerfile = (REPO_ROOT / "components" / "Dockerfile").read_text()
    assert f"mkdir -p /shared /models {store}" in dockerfile and "chown -R productlens:productlens /app" in dockerfile
