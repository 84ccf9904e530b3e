"""The API's OpenAPI spec says what the app answers: real answers, for every status a client can get, validate
against the schema /openapi.json declares for that status (the real model server and the real catalog's KB)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import requests
from PIL import Image

from recommender.app import create_app
from recommender.settings import Settings
from tests.conftest import REPO_ROOT
from tests.fixtures.knowledge_base import BuiltKb, free_port, serve_app
from tests.fixtures.model_server import ModelServerHandle

pytestmark = pytest.mark.e2e

MAX_UPLOAD = 200_000
PROBLEM = {"$ref": "#/components/schemas/Problem"}


def settings_for(kb: BuiltKb, grpc_address: str, model_timeout_s: float = 10.0) -> Settings:
    return Settings(
        db_url=kb.url,
        model_grpc=grpc_address,
        model_name="productlens",
        model_timeout_s=model_timeout_s,
        max_upload_bytes=MAX_UPLOAD,
        params_path=REPO_ROOT / "params.yaml",
    )


@pytest.fixture(scope="module")
def api(real_kb: BuiltKb, model_server: ModelServerHandle) -> Iterator[str]:
    with serve_app(create_app(settings_for(real_kb, model_server.grpc_address))) as url:
        yield url


@pytest.fixture(scope="module")
def spec(api: str) -> dict[str, Any]:
    return requests.get(f"{api}/openapi.json", timeout=10).json()


def declared_schema(spec: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    responses = spec["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, which the spec does not declare"
    return responses[str(status)]["content"]["application/json"]["schema"]


def assert_matches_spec(spec: dict[str, Any], response: requests.Response, path: str, status: int) -> None:
    """The response has `status` and its JSON body validates against the schema the spec declares for it."""
    assert response.status_code == status, response.text
    method = response.request.method.lower()
    schema = declared_schema(spec, path, method, status)
    # The spec's schemas are JSON Schema 2020-12 (OpenAPI 3.1); $refs resolve against the spec's components.
    jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(response.json())


def upload(url: str, image: bytes, filename: str = "photo.jpg", **fields: str) -> requests.Response:
    return requests.post(f"{url}/v1/recommendations", files={"image": (filename, image)}, data=fields, timeout=30)


def test_the_spec_declares_the_error_shape_the_app_returns_not_fastapis_default(spec: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert spec["components"]["schemas"]["Problem"]["required"] == ["detail"]
    declared = {
        (path, method): {int(status) for status in operation["responses"]}
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    }
    assert declared == {
        ("/v1/recommendations", "post"): {200, 413, 415, 422, 502, 503},
        ("/v1/feedback", "post"): {201, 404, 413, 415, 422, 503},
        ("/v1/products/{product_id}", "get"): {200, 404, 422, 503},
        ("/v1/products", "get"): {200, 404, 422, 503},
        ("/healthz", "get"): {200, 503},
        ("/readyz", "get"): {200, 503},
    }
    for (path, method), statuses in declared.items():
        success = min(statuses)  # 200, or 201 where the route records something
        assert declared_schema(spec, path, method, success) != {}, f"{path}: no schema for its {success} answer"
        for status in statuses - {success}:
            own = {"/healthz": "Health", "/readyz": "Readiness"}  # a probe's answer has the same shape either way
            expected = {"$ref": f"#/components/schemas/{own[path]}"} if path in own else PROBLEM
            assert declared_schema(spec, path, method, status) == expected


def test_recommendation_answers_match_the_spec(api: str, spec: dict[str, Any], model_server: ModelServerHandle) -> None:
    path = "/v1/recommendations"
    mouse = model_server.sample_images["mouse"][0]
    assert_matches_spec(spec, upload(api, mouse, budget_max="100", require="wireless=true"), path, 200)
    no_catalog = upload(api, model_server.sample_images["microphone"][0])
    assert_matches_spec(spec, no_catalog, path, 200)
    assert no_catalog.json()["category"] is None

    noise = Image.effect_noise((400, 400), 100).convert("RGB")
    big = io.BytesIO()
    noise.save(big, format="PNG")
    assert big.tell() > MAX_UPLOAD
    assert_matches_spec(spec, upload(api, big.getvalue(), "big.png"), path, 413)
    assert_matches_spec(spec, upload(api, b"%PDF-1.4 not a photo", "invoice.pdf"), path, 415)
    assert_matches_spec(spec, upload(api, b""), path, 422)
    assert_matches_spec(spec, upload(api, mouse, budget_max="cheap"), path, 422)
    missing_image = requests.post(f"{api}{path}", data={"budget_max": "5"}, timeout=10)
    assert_matches_spec(spec, missing_image, path, 422)  # FastAPI's own validation, answered as a Problem
    assert "image" in missing_image.json()["detail"]


def test_product_and_health_answers_match_the_spec(api: str, spec: dict[str, Any]) -> None:
    listed = requests.get(f"{api}/v1/products", params={"category": "headphones", "limit": 3}, timeout=10)
    assert_matches_spec(spec, listed, "/v1/products", 200)
    found = requests.get(f"{api}/v1/products", params={"q": "rx 9060 xt", "limit": 3}, timeout=10)
    assert_matches_spec(spec, found, "/v1/products", 200)
    assert found.json()["products"][0]["matched"] == ["chipset"]
    unknown = requests.get(f"{api}/v1/products", params={"category": "gpu"}, timeout=10)
    assert_matches_spec(spec, unknown, "/v1/products", 404)
    assert "the model's class gpu is the category video-card" in unknown.json()["detail"]
    negative = requests.get(f"{api}/v1/products", params={"max_price": -1}, timeout=10)
    assert_matches_spec(spec, negative, "/v1/products", 422)

    one = requests.get(f"{api}/v1/products/{listed.json()['products'][0]['id']}", timeout=10)
    assert_matches_spec(spec, one, "/v1/products/{product_id}", 200)
    assert_matches_spec(spec, requests.get(f"{api}/v1/products/99999999", timeout=10), "/v1/products/{product_id}", 404)
    assert_matches_spec(spec, requests.get(f"{api}/v1/products/mouse", timeout=10), "/v1/products/{product_id}", 422)
    assert_matches_spec(spec, requests.get(f"{api}/healthz", timeout=10), "/healthz", 200)
    assert_matches_spec(spec, requests.get(f"{api}/readyz", timeout=10), "/readyz", 200)


def test_answers_with_the_model_server_down_match_the_spec(
    real_kb: BuiltKb, model_server: ModelServerHandle, spec: dict[str, Any]
) -> None:
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    with serve_app(create_app(settings_for(real_kb, down, model_timeout_s=1.0))) as url:
        recommendation = upload(url, model_server.sample_images["mouse"][0])
        health = requests.get(f"{url}/healthz", timeout=10)
        ready = requests.get(f"{url}/readyz", timeout=10)
    assert_matches_spec(spec, recommendation, "/v1/recommendations", 503)
    assert_matches_spec(spec, ready, "/readyz", 200)  # the outage is answered by each replica, not a reason to leave
    assert down in recommendation.json()["detail"]
    assert_matches_spec(spec, health, "/healthz", 503)
    assert health.json()["model"]["ok"] is False
