"""HTTP API and upload page: photo in, detected product, its category facts and ranked recommendations out.

Run with `make app` (127.0.0.1:8080; `make app HOST=0.0.0.0` for every interface) or
`python -m recommender.app [--host 127.0.0.1] [--port 8080] [--timeout-graceful-shutdown 8]`. Deployment
settings come from PRODUCTLENS_* environment variables (recommender/settings.py lists them); the routes are
in recommender/routes.py.
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recommender.client import IncompatibleModelError, ModelServerError, ModelUnavailableError
from recommender.metrics import UNMATCHED, RecommenderMetrics
from recommender.ranking import PreferenceError
from recommender.routes import health_routes, product_routes, recommendation_routes
from recommender.service import UNRECOGNIZED_LABEL, ImageRejected, ModelRouting, Recommender, Timings
from recommender.settings import Settings, settings_problems

log = logging.getLogger("recommender.app")

MULTIPART_SLACK = 64 * 1024  # form fields and multipart boundaries on top of the photo itself


def problem(status: int, message: str) -> JSONResponse:
    """An error answer: a message a person can act on, never a stack trace."""
    return JSONResponse({"detail": message}, status_code=status)


class ServerTiming:
    """Time each request and its hops (`request.state.timings`) into a Server-Timing header, name the model
    version label and version that answered (X-Model-Label, X-Model-Version), and put the same numbers into
    the app's metrics (request latency per endpoint and status, time per hop).

    A plain ASGI middleware: the benchmark's per-hop shares should not pay for BaseHTTPMiddleware.
    """

    def __init__(self, app: ASGIApp, metrics: RecommenderMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        timings = Timings()
        scope.setdefault("state", {})["timings"] = timings
        status = 500  # what a request that ends without an answer counts as

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                total = (time.perf_counter() - start) * 1000
                hops = timings.header()
                value = f"{hops + ', ' if hops else ''}app;dur={total:.2f}"
                headers = [*message.get("headers", []), (b"server-timing", value.encode())]
                if timings.model_label is not None:
                    headers.append((b"x-model-label", timings.model_label.encode()))
                    headers.append((b"x-model-version", str(timings.model_version or "").encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or UNMATCHED
            self.metrics.request(scope["method"], endpoint, status, time.perf_counter() - start, timings.hops)


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


# ----------------------------------------------------------------- errors


async def image_rejected(request: Request, error: ImageRejected) -> JSONResponse:
    return problem(error.status, error.message)


async def bad_preference(request: Request, error: PreferenceError) -> JSONResponse:
    return problem(422, f"Cannot use these preferences: {error}")


async def model_down(request: Request, error: ModelUnavailableError) -> JSONResponse:
    log.warning("model server unavailable: %s", error)
    return problem(503, f"The product recognition service is unavailable, try again shortly ({error.details}).")


async def model_incompatible(request: Request, error: IncompatibleModelError) -> JSONResponse:
    log.error("the served model cannot be used: %s", error)
    return problem(503, f"The model server serves a model this service cannot use: {error.details}")


async def model_error(request: Request, error: ModelServerError) -> JSONResponse:
    log.warning("model server error: %s: %s", error.code.name, error.server_details)
    if UNRECOGNIZED_LABEL in error.server_details:
        return problem(503, f"The model server has no such version label: {error.details}")
    if error.code.name == "INVALID_ARGUMENT":
        reason = error.details.rstrip(".")
        return problem(422, f"The image could not be decoded ({reason}): upload a complete, undamaged photo.")
    if error.code.name == "NOT_FOUND":
        return problem(503, f"The model server does not serve the configured model: {error.details}")
    return problem(502, f"The model server failed on this request ({error.code.name}): {error.details}")


async def database_error(request: Request, error: SQLAlchemyError) -> JSONResponse:
    log.exception("knowledge base error")
    return problem(503, "The product knowledge base is unavailable; try again shortly.")


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return problem(error.status_code, str(error.detail))


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    fields = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
        for e in error.errors()
    )
    return problem(422, f"Invalid request: {fields}")


async def unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "Something went wrong on our side; the error is logged. Please try again.")


# Starlette picks the handler of the closest class in the exception's MRO: the subclasses of
# ModelServerError get their own answers.
ERROR_HANDLERS = {
    ImageRejected: image_rejected,
    PreferenceError: bad_preference,
    ModelUnavailableError: model_down,
    IncompatibleModelError: model_incompatible,
    ModelServerError: model_error,
    SQLAlchemyError: database_error,
    StarletteHTTPException: http_error,
    RequestValidationError: invalid_request,
    Exception: unexpected,
}


# ----------------------------------------------------------------- the app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the knowledge base and the model server channel for the app's life (`app.state.recommender`)."""
    recommender = Recommender.from_settings(app.state.settings)
    recommender.route_models(ModelRouting.from_settings(app.state.settings), app.state.metrics)
    app.state.recommender = recommender
    try:
        yield
    finally:
        await recommender.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # FastAPIOffline: /docs (Swagger UI) and /redoc from bundled assets; FastAPI's own load them from a CDN.
    app = FastAPIOffline(
        lifespan=lifespan,
        exception_handlers=ERROR_HANDLERS,
        title="ProductLens recommender",
        version="1.0",
        description="Upload a photo of an electronic product: what it is, its knowledge-base facts, and "
        "products recommended for your preferences.",
    )
    app.state.settings = settings
    app.state.metrics = RecommenderMetrics(settings.canary_share)
    app.state.page = resources.files("recommender").joinpath("web/index.html").read_text(encoding="utf-8")
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes + MULTIPART_SLACK)
    app.add_middleware(ServerTiming, metrics=app.state.metrics)
    app.add_middleware(AnswerCancelledRequests)
    app.include_router(recommendation_routes)
    app.include_router(product_routes)
    app.include_router(health_routes)
    app.add_route("/metrics", metrics_page, include_in_schema=False)
    return app


async def metrics_page(request: Request) -> Response:
    """Prometheus scrapes this (recommender/metrics.py lists the metrics)."""
    page, content_type = request.app.state.metrics.page()
    return Response(page, media_type=content_type)


def parse_args(argv: list[str] | None = None, settings: Settings | None = None) -> argparse.Namespace:
    settings = settings or Settings()
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
        default=settings.graceful_shutdown_s,
        metavar="SECONDS",
        help="after SIGTERM, how long requests in flight may take before they are cancelled "
        "(env PRODUCTLENS_GRACEFUL_SHUTDOWN_S; now %(default)g)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    try:
        settings = Settings()
    except ValidationError as error:
        print(f"error: the settings cannot be used: {settings_problems(error)}", file=sys.stderr)
        return 2
    args = parse_args(argv, settings)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    server = dict(host=args.host, port=args.port, timeout_graceful_shutdown=args.timeout_graceful_shutdown)
    if args.workers > 1:
        uvicorn.run("recommender.app:create_app", factory=True, workers=args.workers, **server)
    else:
        uvicorn.run(create_app(settings), **server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
