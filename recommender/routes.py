"""The HTTP API's routes, one router per concern: recommendations (and the upload page, and the answer to its
question "Is this a <class>?"), products, health.

What a route needs (settings, the knowledge base engine, the model client, the recommender) comes in through
FastAPI dependencies, read from `app.state`, where the app's lifespan puts them (recommender/app.py).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from recommender import kb
from recommender.client import ModelServerError, PredictionClient
from recommender.feedback import FeedbackBook, FeedbackRefused
from recommender.ranking import SORTS, PreferenceError, Preferences, Sort
from recommender.service import Recommender, Timings, check_image, facts_dict
from recommender.settings import Settings

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0  # /healthz asks the model server with at most this deadline: a probe must answer fast


class OrjsonResponse(JSONResponse):
    """A JSON answer rendered by orjson: a recommendations answer in about 15 µs instead of json.dumps's 250 µs."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


# ----------------------------------------------------------------- what the API answers (its OpenAPI schemas)
# The routes build their answers as plain JSON (recommender/service.py, ranking.py) and these models document
# them; extra="forbid" makes the spec say exactly which fields come back, and tests/recommender/test_openapi.py
# checks real answers against the spec.


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Problem(Answer):
    """Every error answer: one message a person can act on (no stack trace, no list of validation errors)."""

    detail: str = Field(examples=["This file is not an image: upload a JPEG or PNG photo."])


class ClassProbability(Answer):
    class_name: str = Field(alias="class", description="a class of the served model, e.g. mouse")
    probability: float
    category: str | None = Field(description="its catalog category; null: no catalog for this class")


class ServedModel(Answer):
    name: str
    version: int


class Prediction(Answer):
    class_name: str = Field(alias="class", description="the most probable class")
    confidence: float
    top_k: list[ClassProbability]
    model: ServedModel
    not_sure_threshold: float = Field(description="the served version's threshold: under it, the answer is unsure")


class Candidate(Answer):
    class_name: str = Field(alias="class")
    probability: float
    category: str | None
    label: str = Field(description='in words, e.g. "a keyboard (85%)", "possibly speakers (30%)"')


class CategoryFacts(Answer):
    category: str
    products: int
    priced: int = Field(description="products with a current price")
    min_price: float | None
    median_price: float | None
    max_price: float | None
    top_brands: list[str]
    specs: list[str] = Field(description="the spec names products of this category have")


class Product(Answer):
    id: int
    category: str
    name: str
    brand: str
    price: float | None = Field(description="USD; null: no current offer")
    specs: dict[str, Any] = Field(description="as the catalog has them (numbers, booleans, text)")
    readable_specs: dict[str, str] = Field(description='label -> text, e.g. "frequency response": "20–20,000 Hz"')
    quality: float = Field(description="value specs against the category's median (1 = typical)")
    value_score: float | None = Field(description="quality per dollar against the median; null without a price")


class RecommendedProduct(Product):
    explanation: str = Field(description="why it is recommended, in one line")
    label: str | None = Field(description="the candidate category it comes from, when the prediction is unsure")


class AppliedPreferences(Answer):
    budget_min: float | None
    budget_max: float | None
    brands: list[str]
    exclude_brands: list[str]
    require: list[str] = Field(description="the spec names required")
    sort: Sort


class ClassChoice(Answer):
    class_name: str = Field(alias="class", description="a class the user may answer, e.g. hdd")
    label: str = Field(description='in words, e.g. "HDD", "RAM module"')


class FeedbackQuestion(Answer):
    """What the page needs to ask "Is this a <class>?" and send the answer to POST /v1/feedback."""

    image_sha256: str = Field(description="sha256 of the uploaded photo (send it with the answer)")
    question: str = Field(description='e.g. "Is this a mouse?", "Are these speakers?" (about prediction.class)')
    classes: list[ClassChoice] = Field(description="the classes a user may pick when the prediction is wrong")


class Recommendations(Answer):
    prediction: Prediction
    category: str | None = Field(description="the category recommended from; null when unsure or without a catalog")
    uncertain: bool
    candidates: list[Candidate]
    messages: list[str]
    category_facts: list[CategoryFacts]
    products: list[RecommendedProduct]
    preferences: AppliedPreferences
    feedback: FeedbackQuestion | None = Field(description="the question to ask; null: this service collects no answers")


class FeedbackRecorded(Answer):
    id: int
    image_sha256: str
    predicted_class: str
    user_class: str = Field(description="the class the user says the photo shows")
    confirmed: bool = Field(description="user_class is predicted_class")
    model_name: str | None
    model_version: int | None
    created_at: str = Field(description="ISO 8601, UTC")
    image_stored: bool = Field(description="true: this answer brought the photo; false: an earlier one had")


class ProductDetail(Product):
    category_facts: CategoryFacts | None


class FoundProduct(Product):
    matched: list[str] | None = Field(
        default=None, description='with q: the fields the words matched, "name", "category" or a spec name'
    )


class ProductList(Answer):
    count: int
    products: list[FoundProduct]


class DatabaseHealth(Answer):
    ok: bool
    products: int | None = None
    detail: str | None = None


class ModelHealth(Answer):
    ok: bool
    model: str | None = None
    version: int | None = None
    target: str | None = None
    detail: str | None = None


class Health(Answer):
    status: Literal["ok", "unavailable"]
    database: DatabaseHealth
    model: ModelHealth


class Readiness(Answer):
    status: Literal["ok", "unavailable"]
    database: DatabaseHealth


def problems(statuses: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """`responses=` for error statuses answered as a Problem, each with when it happens."""
    return {status: {"model": Problem, "description": when} for status, when in statuses.items()}


INVALID_REQUEST = "a parameter is missing or has the wrong type (the message names it)"
DATABASE_DOWN = "the knowledge base is unavailable"


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


async def get_feedback(request: Request) -> FeedbackBook | None:
    return request.app.state.recommender.feedback


SettingsDep = Annotated[Settings, Depends(get_settings)]
RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
EngineDep = Annotated[Engine, Depends(get_engine)]
ClientDep = Annotated[PredictionClient, Depends(get_client)]
FeedbackDep = Annotated[FeedbackBook | None, Depends(get_feedback)]


# ----------------------------------------------------------------- recommendations and the upload page

recommendation_routes = APIRouter(tags=["recommendations"])


@recommendation_routes.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page)


@recommendation_routes.post(
    "/v1/recommendations",
    summary="Recognise a product photo and recommend products",
    response_model=Recommendations,
    responses=problems(
        {
            413: "the upload is over the size limit, or the image has too many pixels (decompression-bomb protection)",
            415: "the file is not an image, or not a JPEG, PNG, GIF or BMP",
            422: "the upload is empty or damaged, a preference cannot be read, or a field is missing",
            502: "the model server failed on this request",
            503: "the model server or the knowledge base is unavailable, or serves a model this service cannot use",
        }
    ),
)
async def recommendations(
    request: Request,
    settings: SettingsDep,
    recommender: RecommenderDep,
    feedback: FeedbackDep,
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
        image_sha256 = hashlib.sha256(data).hexdigest()  # ~50 µs for a 100 KB photo
        preferences = Preferences.from_inputs(
            budget_min=_money_field("budget_min", budget_min),
            budget_max=_money_field("budget_max", budget_max),
            brands=brands,
            exclude_brands=exclude_brands,
            require=require or [],
            sort=sort,
        )
    # The model call is awaited without a thread; a ranking the cache has is answered on the event loop, and one
    # that reads the database (blocking) in a worker thread.
    prediction = await recommender.predict_async(data, timings)
    if recommender.answers_from_cache(prediction, preferences):
        answer = recommender.answer(prediction, preferences, timings)
    else:
        answer = await run_in_threadpool(recommender.answer, prediction, preferences, timings)
    answer["preferences"] = _preferences_json(preferences)
    answer["feedback"] = feedback.ask(image_sha256, answer["prediction"]["class"]) if feedback is not None else None
    return OrjsonResponse(answer)


# The page sends the photo again with the answer rather than the app keeping every upload in case an answer comes:
# only photos a user chose to answer about are kept, recommendations stay stateless (any worker or replica takes the
# answer), and the page still holds the file. A photo already in the store can be answered by its sha256 alone.
@recommendation_routes.post(
    "/v1/feedback",
    summary='Answer "Is this a <class>?" about a recommendation: confirm its class, or give the right one',
    status_code=201,
    response_model=FeedbackRecorded,
    responses=problems(
        {
            404: "no image and no photo with this image_sha256 has been sent before",
            413: "the upload is over the size limit, or the image has too many pixels (decompression-bomb protection)",
            415: "the file is not an image, or not a format the training data takes (JPEG, PNG)",
            422: "a class that is not one of the classes, an image_sha256 that is not the photo's, a photo too small "
            "for the training data, or a field missing or of the wrong type",
            503: "the feedback database or store is unavailable, or this service collects no answers",
        }
    ),
)
async def give_feedback(
    settings: SettingsDep,
    feedback: FeedbackDep,
    predicted_class: Annotated[str, Form(description="the class the recommendation answered (prediction.class)")],
    user_class: Annotated[
        str, Form(description="the class the photo shows: predicted_class to confirm it, another class to correct it")
    ],
    image: Annotated[UploadFile | None, File(description="the photo the recommendation answered")] = None,
    image_sha256: Annotated[
        str | None,
        Form(description="the recommendation's feedback.image_sha256 (enough alone for a photo sent before)"),
    ] = None,
    model_name: Annotated[str | None, Form(description="the model that answered (prediction.model.name)")] = None,
    model_version: Annotated[int | None, Form(description="its version (prediction.model.version)")] = None,
) -> JSONResponse:
    if feedback is None:
        raise HTTPException(503, "This service does not collect answers.")
    data = None
    if image is not None:
        data = await image.read(settings.max_upload_bytes + 1)
        check_image(data, settings.max_upload_bytes)
    try:
        record, stored = await run_in_threadpool(
            feedback.record,
            predicted_class=predicted_class.strip(),
            user_class=user_class.strip(),
            image=data,
            image_sha256=image_sha256,
            model_name=model_name,
            model_version=model_version,
        )
    except FeedbackRefused as error:
        raise HTTPException(error.status, error.message) from error
    except (SQLAlchemyError, OSError) as error:
        log.exception("feedback not recorded")
        raise HTTPException(
            503, "Your answer could not be saved (the feedback store is unavailable): try again shortly."
        ) from error
    return JSONResponse({**record.to_dict(), "image_stored": stored}, status_code=201)


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


@product_routes.get(
    "/{product_id}",
    summary="One product of the knowledge base",
    response_model=ProductDetail,
    responses=problems({404: "no product has this id", 422: INVALID_REQUEST, 503: DATABASE_DOWN}),
)
def product(product_id: int, engine: EngineDep) -> dict[str, Any]:
    with engine.connect() as conn:
        row = kb.get_product(conn, product_id)
        if row is None:
            raise HTTPException(404, f"No product with id {product_id}.")
        facts = kb.category_facts(conn, [row.category])
    return {**row.to_dict(), "category_facts": facts_dict(facts[row.category]) if facts else None}


@product_routes.get(
    "",
    summary="Search the knowledge base (full text on names and key specs, category, price ceiling)",
    response_model=ProductList,
    responses=problems(
        {404: "the category is unknown (the message lists the categories)", 422: INVALID_REQUEST, 503: DATABASE_DOWN}
    ),
)
def products(
    engine: EngineDep,
    category: Annotated[str | None, Query(description="catalog category, e.g. mouse, video-card")] = None,
    q: Annotated[str | None, Query(description="words of the name or key specs, e.g. rtx 4070, am5")] = None,
    max_price: Annotated[float | None, Query(ge=0, description="highest price in USD")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    with engine.connect() as conn:
        if category is not None:
            try:
                kb.check_category(conn, category)
            except kb.UnknownCategory as error:
                raise HTTPException(404, str(error)) from error
        if q:
            rows = kb.search_products(conn, q, category, max_price, limit)
            found = [{**r.to_dict(), "matched": kb.matched_fields(r, q)} for r in rows]
        else:
            found = [r.to_dict() for r in kb.list_products(conn, category, max_price, limit)]
    return {"count": len(found), "products": found}


# ----------------------------------------------------------------- health

health_routes = APIRouter(tags=["health"])


@health_routes.get(
    "/healthz",
    summary="Whether the knowledge base and the model server answer",
    response_model=Health,
    responses={503: {"model": Health, "description": "the knowledge base or the model server does not answer"}},
)
def healthz(settings: SettingsDep, engine: EngineDep, client: ClientDep) -> JSONResponse:
    status: dict[str, Any] = {"database": database_health(engine)}
    try:
        status["model"] = {
            "ok": True,
            **client.model_metadata(timeout_s=min(HEALTH_TIMEOUT_S, settings.model_timeout_s)),
        }
    except ModelServerError as error:
        status["model"] = {"ok": False, "target": settings.model_grpc, "detail": str(error)}
    healthy = status["database"]["ok"] and status["model"]["ok"]
    return JSONResponse({"status": "ok" if healthy else "unavailable", **status}, status_code=200 if healthy else 503)


@health_routes.get(
    "/readyz",
    summary="Whether this replica can answer: its knowledge base answers (the model server is not asked)",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "the knowledge base does not answer"}},
)
def readyz(engine: EngineDep) -> JSONResponse:
    """A readiness probe: a model-server outage is every replica's, and each answers it with its own 503 naming
    it (and still serves product search), so it must not take them all out of the Service as /healthz would."""
    database = database_health(engine)
    return JSONResponse(
        {"status": "ok" if database["ok"] else "unavailable", "database": database},
        status_code=200 if database["ok"] else 503,
    )


def database_health(engine: Any) -> dict[str, Any]:
    try:
        with engine.connect() as conn:
            return {"ok": True, "products": kb.count_products(conn)}
    except SQLAlchemyError as error:
        return {"ok": False, "detail": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
