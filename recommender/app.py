"""HTTP API and upload page: photo in, detected product, its category facts and ranked recommendations out.

Run with `make app` (127.0.0.1:8080; `make app HOST=0.0.0.0` for every interface) or
`python -m recommender.app [--host 127.0.0.1] [--port 8080] [--timeout-graceful-shutdown 8]`. Deployment
settings come from the environment:

    PRODUCTLENS_DB_URL           knowledge base (default sqlite:///artifacts/kb/productlens.db)
    PRODUCTLENS_MODEL_GRPC       model server gRPC address (default localhost:8500)
    PRODUCTLENS_MODEL_NAME       served model name (default productlens)
    PRODUCTLENS_MODEL_SIGNATURE  signature (default serving_default)
    PRODUCTLENS_MODEL_VERSION    a model version number, or
    PRODUCTLENS_MODEL_LABEL      a version label (e.g. stable); neither = the latest version
    PRODUCTLENS_MODEL_TIMEOUT_S  deadline of each model call (default 5)
    PRODUCTLENS_MAX_UPLOAD_BYTES upload size cap (default 10 MiB)
    PRODUCTLENS_PARAMS           params.yaml holding the `recommender:` section (default params.yaml)
    PRODUCTLENS_GRACEFUL_SHUTDOWN_S  after SIGTERM, how long requests in flight may take (default 8)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recommender import kb
from recommender.client import IncompatibleModelError, ModelServerError, ModelUnavailableError, PredictionClient
from recommender.params import load_recommender_params
from recommender.ranking import SORTS, PreferenceError, Preferences, ProductRow
from recommender.service import ImageRejected, Recommender, Timings, check_image, facts_dict

log = logging.getLogger("recommender.app")

MULTIPART_SLACK = 64 * 1024  # form fields and multipart boundaries on top of the photo itself
# Under docker's 10 s stop timeout (compose) and Kubernetes' 30 s grace period, so a stalled upload is
# cancelled and the app exits on its own instead of being killed.
DEFAULT_GRACEFUL_SHUTDOWN_S = 8.0


@dataclass(frozen=True)
class Settings:
    db_url: str
    model_grpc: str = "localhost:8500"
    model_name: str = "productlens"
    model_signature: str = "serving_default"
    model_version: int | None = None
    model_label: str | None = None
    model_timeout_s: float = 5.0
    max_upload_bytes: int = 10 * 1024 * 1024
    params_path: Path = Path("params.yaml")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        version = env.get("PRODUCTLENS_MODEL_VERSION")
        return cls(
            db_url=env.get("PRODUCTLENS_DB_URL") or kb.default_db_url(),
            model_grpc=env.get("PRODUCTLENS_MODEL_GRPC", "localhost:8500"),
            model_name=env.get("PRODUCTLENS_MODEL_NAME", "productlens"),
            model_signature=env.get("PRODUCTLENS_MODEL_SIGNATURE", "serving_default"),
            model_version=int(version) if version else None,
            model_label=env.get("PRODUCTLENS_MODEL_LABEL") or None,
            model_timeout_s=float(env.get("PRODUCTLENS_MODEL_TIMEOUT_S", "5")),
            max_upload_bytes=int(env.get("PRODUCTLENS_MAX_UPLOAD_BYTES", str(10 * 1024 * 1024))),
            params_path=Path(env.get("PRODUCTLENS_PARAMS", "params.yaml")),
        )


def product_json(row: ProductRow) -> dict[str, Any]:
    return row.to_dict()


def problem(status: int, message: str) -> JSONResponse:
    """An error answer: a message a person can act on, never a stack trace."""
    return JSONResponse({"detail": message}, status_code=status)


class ServerTiming:
    """Time each request and its hops (`request.state.timings`) into a Server-Timing header.

    A plain ASGI middleware: the benchmark's per-hop shares should not pay for BaseHTTPMiddleware.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        timings = Timings()
        scope.setdefault("state", {})["timings"] = timings

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                total = (time.perf_counter() - start) * 1000
                hops = timings.header()
                value = f"{hops + ', ' if hops else ''}app;dur={total:.2f}"
                message = {**message, "headers": [*message.get("headers", []), (b"server-timing", value.encode())]}
            await send(message)

        await self.app(scope, receive, timed_send)


class UploadLimit:
    """Refuse request bodies over `max_bytes` with a JSON 413: by Content-Length before reading anything,
    and while reading for bodies sent without one."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def message(self) -> str:
        return f"The upload is too large: the limit is {self.max_bytes - MULTIPART_SLACK:,} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await problem(413, self.message())(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise StarletteHTTPException(413, self.message())
            return message

        await self.app(scope, limited_receive, send)


class AnswerCancelledRequests:
    """A request still running when the graceful-shutdown timeout runs out is cancelled by uvicorn: answer it
    with a JSON 503 the client can act on (send it again) instead of uvicorn's plain-text 500."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            log.warning("%s %s cancelled: the graceful-shutdown timeout ran out", scope["method"], scope["path"])
            if not started:
                message = "The service is shutting down and cancelled this request: send it again."
                response = JSONResponse({"detail": message}, status_code=503, headers={"connection": "close"})
                await response(scope, receive, send)
            raise


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    params = load_recommender_params(settings.params_path)
    engine = kb.make_engine(settings.db_url)
    client = PredictionClient(
        settings.model_grpc,
        model_name=settings.model_name,
        signature_name=settings.model_signature,
        version=settings.model_version,
        version_label=settings.model_label,
        timeout_s=settings.model_timeout_s,
    )
    recommender = Recommender(engine, client, params)
    page = resources.files("recommender").joinpath("web/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        client.close()
        engine.dispose()

    # FastAPIOffline: /docs (Swagger UI) and /redoc from bundled assets; FastAPI's own load them from a CDN.
    app = FastAPIOffline(
        lifespan=lifespan,
        title="ProductLens recommender",
        version="1.0",
        description="Upload a photo of an electronic product: what it is, its knowledge-base facts, and "
        "products recommended for your preferences.",
    )
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes + MULTIPART_SLACK)
    app.add_middleware(ServerTiming)
    app.add_middleware(AnswerCancelledRequests)
    app.state.settings = settings
    app.state.recommender = recommender

    # ----------------------------------------------------------------- errors

    @app.exception_handler(ImageRejected)
    async def image_rejected(request: Request, error: ImageRejected) -> JSONResponse:
        return problem(error.status, error.message)

    @app.exception_handler(PreferenceError)
    async def bad_preference(request: Request, error: PreferenceError) -> JSONResponse:
        return problem(422, f"Cannot use these preferences: {error}")

    @app.exception_handler(ModelUnavailableError)
    async def model_down(request: Request, error: ModelUnavailableError) -> JSONResponse:
        log.warning("model server unavailable: %s", error)
        return problem(503, f"The product recognition service is unavailable, try again shortly ({error.details}).")

    @app.exception_handler(IncompatibleModelError)
    async def model_incompatible(request: Request, error: IncompatibleModelError) -> JSONResponse:
        log.error("the served model cannot be used: %s", error)
        return problem(503, f"The model server serves a model this service cannot use: {error.details}")

    @app.exception_handler(ModelServerError)
    async def model_error(request: Request, error: ModelServerError) -> JSONResponse:
        log.warning("model server error: %s: %s", error.code.name, error.server_details)
        if error.code.name == "INVALID_ARGUMENT":
            reason = error.details.rstrip(".")
            return problem(422, f"The image could not be decoded ({reason}): upload a complete, undamaged photo.")
        if error.code.name == "NOT_FOUND":
            return problem(503, f"The model server does not serve the configured model: {error.details}")
        return problem(502, f"The model server failed on this request ({error.code.name}): {error.details}")

    @app.exception_handler(SQLAlchemyError)
    async def database_error(request: Request, error: SQLAlchemyError) -> JSONResponse:
        log.exception("knowledge base error")
        return problem(503, "The product knowledge base is unavailable; try again shortly.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return problem(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
            for e in error.errors()
        )
        return problem(422, f"Invalid request: {fields}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "Something went wrong on our side; the error is logged. Please try again.")

    # ----------------------------------------------------------------- routes

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.post("/v1/recommendations", summary="Recognise a product photo and recommend products")
    async def recommendations(
        request: Request,
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

    @app.get("/v1/products/{product_id}", summary="One product of the knowledge base")
    def product(product_id: int) -> dict[str, Any]:
        with engine.connect() as conn:
            row = kb.get_product(conn, product_id)
            if row is None:
                raise StarletteHTTPException(404, f"No product with id {product_id}.")
            facts = kb.category_facts(conn, [row.category])
        return {**product_json(row), "category_facts": facts_dict(facts[row.category]) if facts else None}

    @app.get("/v1/products", summary="Search the knowledge base (full text on names, category, price ceiling)")
    def products(
        category: Annotated[str | None, Query(description="catalog category, e.g. mouse, video-card")] = None,
        q: Annotated[str | None, Query(description="words of the product name, e.g. rtx 4070")] = None,
        max_price: Annotated[float | None, Query(ge=0, description="highest price in USD")] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> dict[str, Any]:
        with engine.connect() as conn:
            if category is not None:
                known = kb.category_facts(conn)
                if category not in known:
                    raise StarletteHTTPException(
                        404, f"Unknown category '{category}'; the categories are: {', '.join(sorted(known))}."
                    )
            rows = (
                kb.search_products(conn, q, category, max_price, limit)
                if q
                else kb.list_products(conn, category, max_price, limit)
            )
        return {"count": len(rows), "products": [product_json(r) for r in rows]}

    @app.get("/healthz", summary="Whether the knowledge base and the model server answer")
    def healthz() -> JSONResponse:
        status: dict[str, Any] = {}
        try:
            with engine.connect() as conn:
                status["database"] = {"ok": True, "products": kb.count_products(conn)}
        except SQLAlchemyError as error:
            status["database"] = {"ok": False, "detail": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        try:
            status["model"] = {"ok": True, **client.model_metadata(timeout_s=min(2.0, settings.model_timeout_s))}
        except ModelServerError as error:
            status["model"] = {"ok": False, "target": settings.model_grpc, "detail": str(error)}
        healthy = status["database"]["ok"] and status["model"]["ok"]
        return JSONResponse(
            {"status": "ok" if healthy else "unavailable", **status}, status_code=200 if healthy else 503
        )

    return app


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


def parse_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> argparse.Namespace:
    env = dict(os.environ if env is None else env)
    parser = argparse.ArgumentParser(description="Serve the ProductLens recommender API and upload page.")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: this machine only; 0.0.0.0: every interface)",
    )
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--timeout-graceful-shutdown",
        type=float,
        default=float(env.get("PRODUCTLENS_GRACEFUL_SHUTDOWN_S", DEFAULT_GRACEFUL_SHUTDOWN_S)),
        metavar="SECONDS",
        help="after SIGTERM, how long requests in flight may take before they are cancelled "
        f"(env PRODUCTLENS_GRACEFUL_SHUTDOWN_S, default {DEFAULT_GRACEFUL_SHUTDOWN_S:g})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    server = dict(host=args.host, port=args.port, timeout_graceful_shutdown=args.timeout_graceful_shutdown)
    if args.workers > 1:
        uvicorn.run("recommender.app:create_app", factory=True, workers=args.workers, **server)
    else:
        uvicorn.run(create_app(), **server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
