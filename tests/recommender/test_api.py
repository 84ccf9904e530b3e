"""The HTTP API against a real model server on 127.0.0.1 (tiny exported model) and the real catalog's KB."""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from recommender.app import Settings, create_app
from tests.conftest import REPO_ROOT
from tests.fixtures.knowledge_base import BuiltKb, free_port, serve_app
from tests.fixtures.model_server import LENIENT_THRESHOLD, STRICT_THRESHOLD, ModelServerHandle, ThresholdVersions

pytestmark = pytest.mark.e2e

MAX_UPLOAD = 200_000


def settings_for(kb: BuiltKb, grpc_address: str, params: Path | None = None, **overrides) -> Settings:
    values = dict(
        db_url=kb.url,
        model_grpc=grpc_address,
        model_name="productlens",
        model_timeout_s=10.0,
        max_upload_bytes=MAX_UPLOAD,
        params_path=params or REPO_ROOT / "params.yaml",
    )
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def api(real_kb: BuiltKb, model_server: ModelServerHandle) -> Iterator[str]:
    with serve_app(create_app(settings_for(real_kb, model_server.grpc_address))) as url:
        yield url


def photo(model_server: ModelServerHandle, class_name: str) -> bytes:
    return model_server.sample_images[class_name][0]


def post(url: str, image: bytes, filename: str = "photo.jpg", **fields) -> requests.Response:
    data = [(k, v) for k, values in fields.items() for v in (values if isinstance(values, list) else [values])]
    return requests.post(f"{url}/v1/recommendations", files={"image": (filename, image)}, data=data, timeout=30)


def assert_no_stack_trace(response: requests.Response) -> None:
    assert "Traceback" not in response.text and 'File "' not in response.text


def test_photo_gives_prediction_category_facts_and_explained_recommendations(
    api: str, model_server: ModelServerHandle
) -> None:
    response = post(api, photo(model_server, "mouse"), budget_max="100", brands="Logitech", require="wireless=true")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["prediction"]["class"] == "mouse"
    assert answer["prediction"]["confidence"] > 0.6
    assert answer["prediction"]["model"] == {"name": "productlens", "version": model_server.version}
    assert answer["prediction"]["not_sure_threshold"] == pytest.approx(model_server.not_sure_threshold)
    top_k = answer["prediction"]["top_k"]
    assert len(top_k) == 3 and top_k[0] == {
        "class": "mouse",
        "probability": answer["prediction"]["confidence"],
        "category": "mouse",
    }
    assert answer["category"] == "mouse" and answer["uncertain"] is False
    facts = answer["category_facts"][0]
    assert facts["category"] == "mouse" and facts["products"] > 2000 and 0 < facts["min_price"] < facts["max_price"]
    products = answer["products"]
    assert 1 <= len(products) <= 10
    assert all(p["category"] == "mouse" and p["specs"]["wireless"] is True for p in products)
    assert all(p["price"] is not None and p["price"] <= 100 for p in products)
    assert products[0]["brand"] == "Logitech"
    assert products[0]["explanation"].startswith(f"{products[0]['price']:.2f}".rstrip("0").rstrip("."))
    assert "within your 100 USD budget; Logitech, a brand you prefer; wireless" in products[0]["explanation"]
    timing = response.headers["Server-Timing"]
    assert all(f"{hop};dur=" in timing for hop in ("upload", "model", "db", "rank", "app"))


def test_class_without_catalog_answers_with_a_message(api: str, model_server: ModelServerHandle) -> None:
    response = post(api, photo(model_server, "microphone"))
    assert response.status_code == 200
    answer = response.json()
    assert answer["prediction"]["class"] == "microphone"
    assert answer["category"] is None and answer["products"] == [] and answer["category_facts"] == []
    assert "no microphone catalog" in answer["messages"][0]


def test_uncertain_comes_from_the_served_models_threshold_not_from_a_setting(
    real_kb: BuiltKb, threshold_versions: ThresholdVersions
) -> None:
    """Two exports of the same model with different thresholds, the same photo and the same params.yaml:
    the version with the higher threshold is not sure, the other is."""
    image = threshold_versions.sample_images["keyboard"][0]
    answers = {}
    for version in (threshold_versions.lenient, threshold_versions.strict):
        settings = settings_for(real_kb, threshold_versions.grpc_address, model_version=version)
        with serve_app(create_app(settings)) as url:
            response = post(url, image, sort="cheapest")
        assert response.status_code == 200, response.text
        answers[version] = response.json()
    lenient, strict = answers[threshold_versions.lenient], answers[threshold_versions.strict]
    confidence = lenient["prediction"]["confidence"]
    assert strict["prediction"]["confidence"] == confidence and lenient["prediction"]["class"] == "keyboard"
    assert LENIENT_THRESHOLD <= confidence < STRICT_THRESHOLD, "the photo must fall between the two thresholds"

    assert lenient["prediction"]["not_sure_threshold"] == pytest.approx(LENIENT_THRESHOLD)
    assert lenient["uncertain"] is False and lenient["category"] == "keyboard"
    assert strict["prediction"]["not_sure_threshold"] == pytest.approx(STRICT_THRESHOLD)
    assert strict["uncertain"] is True and strict["category"] is None
    assert len(strict["candidates"]) >= 2
    assert strict["candidates"][0]["label"].startswith("possibly a keyboard (")
    assert any(p["label"].startswith("possibly a keyboard") for p in strict["products"])
    assert strict["messages"][0].startswith("Not sure what this is")
    assert f"under this model's not-sure threshold of {STRICT_THRESHOLD:.0%}" in strict["messages"][0]


def test_a_model_without_a_not_sure_threshold_is_a_clear_503(
    real_kb: BuiltKb, threshold_versions: ThresholdVersions
) -> None:
    settings = settings_for(real_kb, threshold_versions.grpc_address, model_version=threshold_versions.legacy)
    with serve_app(create_app(settings)) as url:
        response = post(url, threshold_versions.sample_images["keyboard"][0])
        health = requests.get(f"{url}/healthz", timeout=10)
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert detail.startswith("The model server serves a model this service cannot use: model 'productlens' version")
    assert "has no 'not_sure_threshold' output" in detail and "make publish" in detail
    assert_no_stack_trace(response)
    assert health.status_code == 503
    assert health.json()["model"]["ok"] is False and "not_sure_threshold" in health.json()["model"]["detail"]


def test_non_image_upload_is_refused_with_415(api: str) -> None:
    response = post(api, b"%PDF-1.4 not a photo at all", filename="invoice.pdf")
    assert response.status_code == 415
    assert response.json() == {"detail": "This file is not an image: upload a JPEG or PNG photo."}


def test_empty_upload_and_unreadable_preferences_are_422(api: str, model_server: ModelServerHandle) -> None:
    empty = post(api, b"")
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]
    bad_budget = post(api, photo(model_server, "mouse"), budget_max="cheap")
    assert bad_budget.status_code == 422
    assert (
        bad_budget.json()["detail"] == "Cannot use these preferences: budget_max must be a number of USD, got 'cheap'"
    )
    bad_requirement = post(api, photo(model_server, "mouse"), require="wireless")
    assert bad_requirement.status_code == 422 and "write key=value" in bad_requirement.json()["detail"]
    missing_image = requests.post(f"{api}/v1/recommendations", data={"budget_max": "5"}, timeout=10)
    assert missing_image.status_code == 422 and "image" in missing_image.json()["detail"]


def test_too_large_upload_is_413_with_the_limit(api: str) -> None:
    big = Image.effect_noise((400, 400), 100).convert("RGB")
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    assert buffer.tell() > MAX_UPLOAD
    response = post(api, buffer.getvalue(), filename="big.png")
    assert response.status_code == 413
    assert response.json()["detail"] == f"The upload is too large: the limit is {MAX_UPLOAD:,} bytes."


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG file claiming width x height pixels: a decompression bomb if anything decoded it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(api: str) -> None:
    response = post(api, png_header_only(60_000, 60_000), filename="bomb.png")
    assert response.status_code == 413
    assert "decompression-bomb protection" in response.json()["detail"]
    assert_no_stack_trace(response)


def test_unsupported_image_format_is_415(api: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="TIFF")
    response = post(api, buffer.getvalue(), filename="photo.tiff")
    assert response.status_code == 415 and "TIFF images are not supported" in response.json()["detail"]


def test_model_server_down_is_503_with_a_message(real_kb: BuiltKb, model_server: ModelServerHandle) -> None:
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    with serve_app(create_app(settings_for(real_kb, down, model_timeout_s=1.0))) as url:
        response = post(url, photo(model_server, "mouse"))
        health = requests.get(f"{url}/healthz", timeout=10)
    assert response.status_code == 503
    assert response.json()["detail"].startswith("The product recognition service is unavailable, try again shortly")
    assert down in response.json()["detail"]
    assert_no_stack_trace(response)
    assert health.status_code == 503
    assert health.json()["database"]["ok"] is True and health.json()["model"]["ok"] is False


def test_healthz_checks_database_and_model_server(api: str, model_server: ModelServerHandle) -> None:
    response = requests.get(f"{api}/healthz", timeout=10)
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "database": {"ok": True, "products": 52560},
        "model": {"ok": True, "model": "productlens", "version": model_server.version},
    }


def test_products_search_filters_and_lookup(api: str) -> None:
    found = requests.get(f"{api}/v1/products", params={"q": "rtx 4070", "max_price": 700}, timeout=10).json()
    assert found["count"] > 0
    assert all(p["category"] == "video-card" and p["price"] <= 700 for p in found["products"])
    mice = requests.get(f"{api}/v1/products", params={"category": "mouse", "limit": 5}, timeout=10).json()
    assert [p["category"] for p in mice["products"]] == ["mouse"] * 5
    prices = [p["price"] for p in mice["products"]]
    assert prices == sorted(prices)
    one = requests.get(f"{api}/v1/products/{mice['products'][0]['id']}", timeout=10).json()
    assert one["name"] == mice["products"][0]["name"] and one["category_facts"]["category"] == "mouse"
    missing = requests.get(f"{api}/v1/products/99999999", timeout=10)
    assert missing.status_code == 404 and missing.json() == {"detail": "No product with id 99999999."}
    unknown = requests.get(f"{api}/v1/products", params={"category": "toasters"}, timeout=10)
    assert unknown.status_code == 404 and "the categories are: case, cpu" in unknown.json()["detail"]


@pytest.mark.parametrize("product_id", ["99999999999999999999", str(2**63), str(2**31), "-1", "-99999999999999999999"])
def test_a_product_id_no_product_can_have_is_404_not_500(api: str, product_id: str) -> None:
    response = requests.get(f"{api}/v1/products/{product_id}", timeout=10)
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": f"No product with id {product_id}."}


def test_a_truncated_jpeg_is_refused_without_tensorflow_internals(api: str, model_server: ModelServerHandle) -> None:
    whole = photo(model_server, "mouse")
    truncated = whole[: len(whole) // 2]
    assert truncated.startswith(b"\xff\xd8") and not truncated.endswith(b"\xff\xd9")
    response = post(api, truncated, filename="cut.jpg")
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("The image could not be decoded")
    for internal in ("DecodeJpeg", "{{", "node", "function_node", "Graph execution", "[["):
        assert internal not in detail, detail
    assert_no_stack_trace(response)


def test_openapi_docs_describe_the_endpoints(api: str) -> None:
    spec = requests.get(f"{api}/openapi.json", timeout=10).json()
    assert {"/v1/recommendations", "/v1/products", "/v1/products/{product_id}", "/healthz"} <= set(spec["paths"])
    docs = requests.get(f"{api}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    # Swagger UI is served by the app itself: the docs page works without internet.
    assert "https://" not in docs.text
    for asset in ("/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/swagger-ui.css"):
        assert asset in docs.text and requests.get(f"{api}{asset}", timeout=10).status_code == 200
    page = requests.get(api, timeout=10)
    assert page.status_code == 200 and "Drop a photo here" in page.text


def test_cli_recommend_and_kb_search_print_tables(
    real_kb: BuiltKb, model_server: ModelServerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from recommender.cli import main

    image = tmp_path / "mouse.jpg"
    image.write_bytes(photo(model_server, "mouse"))
    args = ["--db-url", real_kb.url, "recommend", str(image), "--model-grpc", model_server.grpc_address]
    assert main([*args, "--budget-max", "100", "--brand", "Logitech", "--require", "wireless=true"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mouse.jpg: mouse (")
    assert "name" in out and "price USD" in out and "Logitech, a brand you prefer; wireless" in out
    assert main(["--db-url", real_kb.url, "kb", "search", "rtx 4070", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["id", "category", "name", "brand", "price", "USD", "matched"]
    assert len(out.splitlines()) == 5 and out.count("video-card") == 3
    assert main(["--db-url", real_kb.url, "recommend", str(tmp_path / "missing.jpg")]) == 2
    assert main(["--db-url", real_kb.url, "kb", "search", "rtx 4070", "--json", "--limit", "1"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["category"] == "video-card"


def test_cli_refuses_a_model_without_a_not_sure_threshold(
    real_kb: BuiltKb, threshold_versions: ThresholdVersions, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from recommender.cli import main

    image = tmp_path / "keyboard.jpg"
    image.write_bytes(threshold_versions.sample_images["keyboard"][0])
    assert threshold_versions.legacy > threshold_versions.strict  # the latest version, which the CLI asks for
    args = ["--db-url", real_kb.url, "recommend", str(image), "--model-grpc", threshold_versions.grpc_address]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: model server: FAILED_PRECONDITION: model 'productlens' version {threshold_versions.legacy} "
        "(signature 'serving_default')"
    )
    assert "has no 'not_sure_threshold' output" in err


def test_cli_kb_search_says_which_field_matched_and_lists_the_categories_for_an_unknown_one(
    real_kb: BuiltKb, capsys: pytest.CaptureFixture[str]
) -> None:
    from recommender.cli import main

    assert main(["--db-url", real_kb.url, "kb", "search", "--category", "gpu", "rtx"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith(
        "error: Unknown category 'gpu' (the model's class gpu is the category video-card); the categories are: "
        "case, cpu, headphones, internal-hard-drive, keyboard, memory, monitor, motherboard, mouse, speakers, "
        "video-card, webcam."
    )

    search = ["--db-url", real_kb.url, "kb", "search"]
    assert main([*search, "--category", "video-card", "rx 9060 xt", "--limit", "2"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 2 and all(row.endswith("chipset Radeon RX 9060 XT") for row in rows)
    assert main([*search, "asus am5", "--json", "--limit", "1"]) == 0
    (found,) = json.loads(capsys.readouterr().out)
    assert found["matched"] == ["name", "socket"] and found["specs"]["socket"] == "AM5"
    assert main([*search, "--category", "mouse", "zzzz"]) == 0
    assert capsys.readouterr().out == "no product in mouse matches 'zzzz'\n"
