"""The HTTP API's routes, one router per concern: recommendations (and the upload page), products, health.

What a route needs (settings, the knowledge base engine, the model client, the recommender) comes in through
FastAPI dependencies, read from `app.state`, where the app's lifespan puts them (recommender/app.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from recommender import kb
from recommender.client import ModelServerError, PredictionClient
from recommender.ranking import SORTS, PreferenceError, Preferences
from recommender.service import Recommender, Timings, check_image, facts_dict
from recommender.settings import Settings

HEALTH_TIMEOUT_S = 2.0  # /healthz asks the model server with at most this deadline: a probe must answer fast


# ----------------------------------------------------------------- dependencies
# async: they only read app.state, so they run on the event loop instead of taking a thread-pool hop each.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


async def get_engine(request: Request) -> Engine:
    return request.app.state.recommender.engine


async def get_client(request: Request) -> PredictionClient:
    return request.app.state.recommender.client


SettingsDep = Annotated[Settings, Depends(get_settings)]
RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
EngineDep = Annotated[Engine, Depends(get_engine)]
ClientDep = Annotated[PredictionClient, Depends(get_client)]


# ----------------------------------------------------------------- recommendations and the upload page

recommendation_routes = APIRouter(tags=["recommendations"])


@recommendation_routes.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page)


@recommendation_routes.post("/v1/recommendations", summary="Recognise a product photo and recommend products")
async def recommendations(
    request: Request,
    settings: SettingsDep,
    recommender: RecommenderDep,
    image: Annotated[UploadFile, File(description="photo of the product (JPEG, PNG, GIF or BMP)")],
    budget_min: Annotated[str | None, Form(description="lowest price in USD")] = None,
    budget_max: Annotated[str | None, Form(description="highest price in USD")] = None,
    brands: Annotated[str, Form(description="preferred brands, comma-separated")] = "",
    exclude_brands: Annotated[str, Form(description="brands to leave out, comma-separated")] = "",
    require: Annotated[
        list[str] | None, Form(description="required specs: key=value, key=min..max, key>=x (repeatable)")
    ] = None,
    sort: Annotated[str, Form(description=f"one of {', '.join(SORTS)}")] = "best_value",
) -> JSONResponse:
    timings: Timings = request.state.timings
    with timings.hop("upload"):
        data = await image.read(settings.max_upload_bytes + 1)
        check_image(data, settings.max_upload_bytes)
        preferences = Preferences.from_inputs(
            budget_min=_money_field("budget_min", budget_min),
            budget_max=_money_field("budget_max", budget_max),
            brands=brands,
            exclude_brands=exclude_brands,
            require=require or [],
            sort=sort,
        )
    # The gRPC call and the database are blocking: run them off the event loop.
    answer = await run_in_threadpool(recommender.recommend_image, data, preferences, timings)
    answer["preferences"] = _preferences_json(preferences)
    return JSONResponse(answer)


def _money_field(name: str, value: str | None) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        return float(value)
    except ValueError as error:
        raise PreferenceError(f"{name} must be a number of USD, got '{value}'") from error


def _preferences_json(preferences: Preferences) -> dict[str, Any]:
    return {
        "budget_min": preferences.budget_min,
        "budget_max": preferences.budget_max,
        "brands": list(preferences.preferred_brands),
        "exclude_brands": list(preferences.excluded_brands),
        "require": [r.key for r in preferences.requirements],
        "sort": preferences.sort,
    }


# ----------------------------------------------------------------- products

product_routes = APIRouter(prefix="/v1/products", tags=["products"])


@product_routes.get("/{product_id}", summary="One product of the knowledge base")
def product(product_id: int, engine: EngineDep) -> dict[str, Any]:
    with engine.connect() as conn:
        row = kb.get_product(conn, product_id)
        if row is None:
            raise HTTPException(404, f"No product with id {product_id}.")
        facts = kb.category_facts(conn, [row.category])
    return {**row.to_dict(), "category_facts": facts_dict(facts[row.category]) if facts else None}


@product_routes.get("", summary="Search the knowledge base (full text on names, category, price ceiling)")
def products(
    engine: EngineDep,
    category: Annotated[str | None, Query(description="catalog category, e.g. mouse, video-card")] = None,
    q: Annotated[str | None, Query(description="words of the product name, e.g. rtx 4070")] = None,
    max_price: Annotated[float | None, Query(ge=0, description="highest price in USD")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    with engine.connect() as conn:
        if category is not None:
            known = kb.category_facts(conn)
            if category not in known:
                raise HTTPException(
                    404, f"Unknown category '{category}'; the categories are: {', '.join(sorted(known))}."
                )
        rows = (
            kb.search_products(conn, q, category, max_price, limit)
            if q
            else kb.list_products(conn, category, max_price, limit)
        )
    return {"count": len(rows), "products": [r.to_dict() for r in rows]}


# ----------------------------------------------------------------- health

health_routes = APIRouter(tags=["health"])


@health_routes.get("/healthz", summary="Whether the knowledge base and the model server answer")
def healthz(settings: SettingsDep, engine: EngineDep, client: ClientDep) -> JSONResponse:
    status: dict[str, Any] = {}
    try:
        with engine.connect() as conn:
            status["database"] = {"ok": True, "products": kb.count_products(conn)}
    except SQLAlchemyError as error:
        status["database"] = {"ok": False, "detail": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
    try:
        status["model"] = {
            "ok": True,
            **client.model_metadata(timeout_s=min(HEALTH_TIMEOUT_S, settings.model_timeout_s)),
        }
    except ModelServerError as error:
        status["model"] = {"ok": False, "target": settings.model_grpc, "detail": str(error)}
    healthy = status["database"]["ok"] and status["model"]["ok"]
    return JSONResponse({"status": "ok" if healthy else "unavailable", **status}, status_code=200 if healthy else 503)
