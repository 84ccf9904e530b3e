"""Photo -> recommendations: checks the upload, asks the model server, reads the knowledge base and
ranks. Shared by the HTTP API and the CLI; timings of each hop come back with the answer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from PIL import Image, UnidentifiedImageError
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from recommender import kb
from recommender.client import ModelServerError, Prediction, PredictionClient
from recommender.feedback import FeedbackBook
from recommender.metrics import OK, RecommenderMetrics
from recommender.params import RecommenderParams, load_recommender_params
from recommender.ranking import (
    Preferences,
    ProductRow,
    Recommendation,
    RecommendationResult,
    choose_categories,
    rank_products,
    recommend,
)
from recommender.settings import Settings
from serving.contract import DEFAULT_MAX_PIXELS

# What the exported model decodes (tf.io.decode_image); anything else is refused before the model call.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP")


class ImageRejected(ValueError):
    """An upload that is not a usable photo; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    bytes: int


def check_image(data: bytes, max_bytes: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Refuse empty, oversized, non-image, unsupported, damaged and decompression-bomb uploads.

    Reads only the header and verifies the stream, never decoding the pixels here.
    """
    if not data:
        raise ImageRejected(422, "The upload is empty: choose a photo (JPEG or PNG).")
    if len(data) > max_bytes:
        raise ImageRejected(413, f"The photo is {len(data):,} bytes; the limit is {max_bytes:,} bytes.")
    with warnings.catch_warnings():
        # Pillow warns past MAX_IMAGE_PIXELS and raises past twice that; both are refusals here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                info = ImageInfo(image.format or "?", image.width, image.height, len(data))
                if info.format not in ALLOWED_FORMATS:
                    raise ImageRejected(
                        415, f"{info.format} images are not supported: upload one of {', '.join(ALLOWED_FORMATS)}."
                    )
                if info.width * info.height > max_pixels:
                    raise ImageRejected(
                        413,
                        f"The image is {info.width}x{info.height} pixels, more than the {max_pixels:,} allowed "
                        "(decompression-bomb protection): upload a smaller photo.",
                    )
                image.verify()
        except ImageRejected:
            raise
        except UnidentifiedImageError as error:
            raise ImageRejected(415, "This file is not an image: upload a JPEG or PNG photo.") from error
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageRejected(
                413, f"The image has too many pixels (decompression-bomb protection): {error}"
            ) from error
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageRejected(422, f"The image is damaged and cannot be read: {error}") from error
    return info


@dataclass
class Timings:
    """Milliseconds per hop of one request (shown as a Server-Timing header), and the model version label and
    version that answered it (the X-Model-Label and X-Model-Version headers)."""

    hops: dict[str, float] = field(default_factory=dict)
    model_label: str | None = None
    model_version: int | None = None

    @contextmanager
    def hop(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.hops[name] = self.hops.get(name, 0.0) + (time.perf_counter() - start) * 1000

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.hops.items())


# ----------------------------------------------------------------- which model version answers

STABLE_LABEL = "stable"
CANARY_LABEL = "canary"
LATEST = "latest"  # what metrics and headers call a call that named no version: the server's latest answers it
PINNED = "pinned"  # ... one that named a version number (PRODUCTLENS_MODEL_VERSION)
UNRECOGNIZED_LABEL = "Unrecognized servable version label"  # TF Serving's words, which serving.server repeats


@dataclass(frozen=True)
class ModelRouting:
    """Which version label each model call asks for: a share `canary_share` of them `canary`, the rest `primary`
    (None: the client's own selector, PRODUCTLENS_MODEL_VERSION or none). A canary call the server cannot answer
    because it has no canary (the label is unknown, or its version is not loaded: before a canary is published,
    after promote or rollback) is sent again to `primary`, so a rollout never fails a request."""

    primary: str | None = None
    canary_share: float = 0.0
    pinned: bool = False  # the client names a version number

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRouting:
        # With a canary out, the highest version is the canary: the rest of the traffic must ask for stable.
        primary = settings.model_label or (STABLE_LABEL if settings.canary_share > 0 else None)
        return cls(primary, settings.canary_share, settings.model_version is not None)

    def choose(self) -> str | None:
        if self.canary_share > 0 and random.random() < self.canary_share:
            return CANARY_LABEL
        return self.primary

    def name(self, label: str | None) -> str:
        """`label` as metrics and headers show it."""
        return label or (PINNED if self.pinned else LATEST)


def canary_missing(error: ModelServerError) -> str | None:
    """Why the server could not answer for the canary label, when it is that: label_unknown or not_loaded."""
    if error.code == grpc.StatusCode.INVALID_ARGUMENT and UNRECOGNIZED_LABEL in error.server_details:
        return "label_unknown"
    if error.code == grpc.StatusCode.NOT_FOUND:
        return "not_loaded"
    return None


# ----------------------------------------------------------------- what the app keeps of the knowledge base


class KbBuild:
    """Notices when the knowledge base was rebuilt, looking at most every `check_every_s`: its `kb_info` rows
    changed (a digest of them), or, for a SQLite file, the file was replaced (build_kb renames a new file into
    place; the engine's pooled connections are then dropped, since they still read the old file)."""

    def __init__(self, engine: Engine, check_every_s: float = 2.0):
        self.engine = engine
        self.check_every_s = check_every_s
        url = make_url(str(engine.url))
        database = url.database if url.get_backend_name() == "sqlite" else None
        self._sqlite_file = database if database and database != ":memory:" else None
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._file: tuple[int, int] | None = None
        self.identity: str | None = None

    def _file_state(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self._sqlite_file) if self._sqlite_file else None
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns) if stat else None

    def _read_identity(self) -> str:
        with self.engine.connect() as conn:
            info = kb.kb_info(conn)
        return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()

    def due(self) -> bool:
        """Whether the next `changed()` looks at the knowledge base (it returns False at once until then)."""
        return time.monotonic() - self._checked_at >= self.check_every_s

    def changed(self) -> bool:
        """Whether the knowledge base is another build than at the last call (True at the first call)."""
        now = time.monotonic()
        if now - self._checked_at < self.check_every_s:
            return False
        with self._lock:
            if now - self._checked_at < self.check_every_s:
                return False
            file = self._file_state()
            if self.identity is not None and self._sqlite_file and file == self._file:
                self._checked_at = now
                return False
            if self.identity is not None and file != self._file:
                self.engine.dispose()  # connections checked out now are discarded when they come back
            identity = self._read_identity()
            changed = identity != self.identity
            self.identity, self._file, self._checked_at = identity, file, now
            return changed


class RankingCache:
    """Each category's ranked rows per preferences (least recently used dropped past `max_entries`), and each
    product read (one row object per product, with its JSON): one knowledge-base build's worth (cleared when the
    KB is rebuilt). A ranking the cache lacks then costs one id query; only products never read before are
    fetched and decoded."""

    def __init__(self, max_entries: int = 2048):
        self.max_entries = max_entries
        self.generation = 0  # +1 at each clear: rows read before a rebuild are not put back after it
        self._rows: OrderedDict[tuple[str, Preferences], list[ProductRow]] = OrderedDict()
        # product id -> (the row, its to_dict() once an answer asked for it: asdict and readable specs)
        self._json: dict[int, tuple[ProductRow, dict[str, Any] | None]] = {}
        self._lock = threading.Lock()

    def contains(self, category: str, preferences: Preferences) -> bool:
        return (category, preferences) in self._rows

    def get(self, category: str, preferences: Preferences) -> list[ProductRow] | None:
        with self._lock:
            rows = self._rows.get((category, preferences))
            if rows is not None:
                self._rows.move_to_end((category, preferences))
            return rows

    def put(self, category: str, preferences: Preferences, rows: list[ProductRow], generation: int) -> None:
        with self._lock:
            if generation != self.generation:
                return
            self._rows[(category, preferences)] = rows
            if len(self._rows) > self.max_entries:
                self._rows.popitem(last=False)

    def products(self, ids: list[int], fetch: Callable[[list[int]], dict[int, ProductRow]]) -> list[ProductRow]:
        """The rows of `ids` in order: those read before from memory, the others by `fetch` (kept for next time;
        ids `fetch` does not return are left out)."""
        with self._lock:
            generation = self.generation
            held = {i: entry[0] for i in ids if (entry := self._json.get(i)) is not None}
        missing = [i for i in ids if i not in held]
        if missing:
            fetched = fetch(missing)
            self._keep({i: (row, None) for i, row in fetched.items()}, generation)
            held.update(fetched)
        return [held[i] for i in ids if i in held]

    def row_json(self, row: ProductRow) -> dict[str, Any]:
        """`row.to_dict()`, made once per row (the cached rankings hand out the same row objects; answers only read
        it). Checked by identity, so a row of another build with the same id never gets this one's JSON."""
        entry = self._json.get(row.id)
        if entry is not None and entry[0] is row and entry[1] is not None:
            return entry[1]
        made = row.to_dict()
        self._keep({row.id: (row, made)}, self.generation)
        return made

    def _keep(self, entries: dict[int, tuple[ProductRow, dict[str, Any] | None]], generation: int) -> None:
        """Remember products (dropping them all past 10 x `max_entries`), unless the KB was rebuilt since
        `generation` (they would be rows of the replaced build)."""
        with self._lock:
            if generation != self.generation:
                return
            if len(self._json) + len(entries) > self.max_entries * 10:
                self._json.clear()
            self._json.update(entries)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()
            self._json.clear()
            self.generation += 1


def facts_dict(facts: kb.CategoryFacts) -> dict[str, Any]:
    return {
        "category": facts.name,
        "products": facts.products,
        "priced": facts.priced,
        "min_price": facts.min_price,
        "median_price": facts.median_price,
        "max_price": facts.max_price,
        "top_brands": facts.top_brands,
        "specs": facts.spec_names,
    }


class Recommender:
    """The recommendation use case over one knowledge base and one model server."""

    # Set by `route_models` (the app); the CLI keeps these: the client's own version selector, no metrics.
    routing: ModelRouting = ModelRouting()
    metrics: RecommenderMetrics | None = None
    _kb_state: tuple[KbBuild, RankingCache] | None = None
    _kb_state_lock = threading.Lock()

    def __init__(
        self, engine: Engine, client: PredictionClient, params: RecommenderParams, feedback: FeedbackBook | None = None
    ):
        self.engine = engine
        self.client = client
        self.params = params
        self.feedback = feedback  # users' answers to "Is this a <class>?" (None: not collected)
        self._class_to_category: dict[str, str | None] | None = None
        self._facts: dict[str, kb.CategoryFacts] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Recommender:
        """The knowledge base, model server and params `settings` name; `close()` when done."""
        params = load_recommender_params(settings.params_path)
        client = PredictionClient(
            settings.model_grpc,
            model_name=settings.model_name,
            signature_name=settings.model_signature,
            version=settings.model_version,
            version_label=settings.model_label,
            timeout_s=settings.model_timeout_s,
        )
        feedback = FeedbackBook.open(settings.feedback_database_url(), settings.feedback_dir, settings.params_path)
        return cls(kb.make_engine(settings.db_url), client, params, feedback)

    def close(self) -> None:
        self.client.close()
        self.engine.dispose()
        if self.feedback is not None:
            self.feedback.close()

    async def aclose(self) -> None:
        """`close` on the event loop that made async model calls (their channel closes there)."""
        await self.client.aclose()
        self.close()

    def class_to_category(self) -> dict[str, str | None]:
        """The KB's class -> category table (built from params), falling back to params for unknown classes."""
        if self._class_to_category is None:
            with self.engine.connect() as conn:
                self._class_to_category = {**self.params.class_to_category, **kb.class_categories(conn)}
        return self._class_to_category

    def route_models(self, routing: ModelRouting, metrics: RecommenderMetrics | None = None) -> None:
        """Ask for the version labels `routing` says, and count model calls and ranking-cache reads in `metrics`."""
        self.routing, self.metrics = routing, metrics

    def predict(self, image: bytes, timings: Timings) -> Prediction:
        """The model's answer for one photo, from the label `routing` picks (a canary the server does not have:
        the primary label's); the label and version that answered go into `timings`."""
        label = self.routing.choose()
        with timings.hop("model"):
            try:
                prediction = self._counted(label, self.client.predict_one, image)
            except ModelServerError as error:
                label = self._fallback(label, error)
                prediction = self._counted(label, self.client.predict_one, image)
        return self._answered(label, prediction, timings)

    async def predict_async(self, image: bytes, timings: Timings) -> Prediction:
        """`predict` on the event loop, holding no thread while the model server works."""
        label = self.routing.choose()
        with timings.hop("model"):
            try:
                prediction = await self._counted_async(label, image)
            except ModelServerError as error:
                label = self._fallback(label, error)
                prediction = await self._counted_async(label, image)
        return self._answered(label, prediction, timings)

    @property
    def _top_k(self) -> int:
        return max(self.params.top_k_classes, self.params.uncertain_max_categories)

    def _counted(self, label: str | None, predict_one: Callable[..., Prediction], image: bytes) -> Prediction:
        try:
            return self._count(label, predict_one(image, top_k=self._top_k, version_label=label))
        except ModelServerError as error:
            self._count_error(label, error)
            raise

    async def _counted_async(self, label: str | None, image: bytes) -> Prediction:
        try:
            prediction = await self.client.predict_one_async(image, top_k=self._top_k, version_label=label)
        except ModelServerError as error:
            self._count_error(label, error)
            raise
        return self._count(label, prediction)

    def _count(self, label: str | None, prediction: Prediction) -> Prediction:
        if self.metrics is not None:
            self.metrics.model_call(self.routing.name(label), prediction.model_version, OK)
        return prediction

    def _count_error(self, label: str | None, error: ModelServerError) -> None:
        if self.metrics is not None:
            self.metrics.model_call(self.routing.name(label), None, error.code.name)

    def _fallback(self, label: str | None, error: ModelServerError) -> str | None:
        """The label to ask after `error`: the primary one when `label` is a canary the server lacks; else raises."""
        reason = canary_missing(error) if label == CANARY_LABEL else None
        if reason is None:
            raise error
        if self.metrics is not None:
            self.metrics.canary_fallback(reason)
        return self.routing.primary

    def _answered(self, label: str | None, prediction: Prediction, timings: Timings) -> Prediction:
        timings.model_label, timings.model_version = self.routing.name(label), prediction.model_version
        return prediction

    def _kb(self) -> tuple[KbBuild, RankingCache]:
        if self._kb_state is None:
            with self._kb_state_lock:
                if self._kb_state is None:
                    self._kb_state = (KbBuild(self.engine), RankingCache())
        return self._kb_state

    def refresh_kb(self) -> None:
        """Forget what was read of the knowledge base once it was rebuilt (noticed within seconds: KbBuild)."""
        build, cache = self._kb()
        if build.changed():
            cache.clear()
            self._class_to_category = None
            self._facts = None
            if self.metrics is not None:
                self.metrics.kb_build()

    def ranked_rows(
        self, categories: list[str], preferences: Preferences, timings: Timings
    ) -> dict[str, list[ProductRow]]:
        """Each category's best `max_products` rows for `preferences`, ranked and one per name: from the ranking
        cache, else read from the knowledge base (the db hop) and ranked (the rank hop).

        `recommend` ranks them again (and explains them) after taking the first few of each category: ranking a
        ranked prefix of the candidates gives the same products as ranking all of them, so nothing but the
        position-independent work is saved."""
        _, cache = self._kb()
        generation = cache.generation
        ranked = {c: cache.get(c, preferences) for c in categories}
        missing = [c for c, found in ranked.items() if found is None]
        if self.metrics is not None:
            self.metrics.kb_cache(hits=len(categories) - len(missing), misses=len(missing))
        if not missing:
            return ranked
        with timings.hop("db"), self.engine.connect() as conn:
            ids = {c: kb.candidate_ids(conn, c, preferences, self.params.candidate_pool) for c in missing}
            read = {c: cache.products(ids[c], lambda wanted: kb.products_by_id(conn, wanted)) for c in missing}
        with timings.hop("rank"):
            for category, rows in read.items():
                ranked[category] = [r.product for r in rank_products(rows, preferences, self.params.max_products)]
                cache.put(category, preferences, ranked[category], generation)
        return ranked

    def product_json(self, recommendation: Recommendation) -> dict[str, Any]:
        """A recommended product as the API answers it; the product's own part is built once per KB build."""
        _, cache = self._kb()
        row = recommendation.product
        return {**cache.row_json(row), "explanation": recommendation.explanation, "label": recommendation.label}

    def category_facts(self) -> dict[str, kb.CategoryFacts]:
        """Facts of every category, read once per knowledge-base build."""
        if self._facts is None:
            with self.engine.connect() as conn:
                self._facts = kb.category_facts(conn)
        return self._facts

    def recommend_prediction(
        self, prediction: Prediction, preferences: Preferences, timings: Timings
    ) -> tuple[RecommendationResult, dict[str, kb.CategoryFacts]]:
        with timings.hop("db"):
            self.refresh_kb()
        mapping = self.class_to_category()
        params = self.params
        # The served version's own threshold, so a new model version brings its own notion of "not sure".
        threshold = prediction.not_sure_threshold
        categories = self._categories(prediction, mapping)
        with timings.hop("db"):
            facts = self.category_facts()
        rows = self.ranked_rows(categories, preferences, timings)
        with timings.hop("rank"):
            result = recommend(
                prediction.top_k,
                rows,
                preferences,
                mapping,
                threshold,
                params.max_products,
                params.uncertain_max_categories,
                params.uncertain_min_probability,
            )
        return result, {c: facts[c] for c in categories if c in facts}

    def _categories(self, prediction: Prediction, mapping: dict[str, str | None]) -> list[str]:
        """The categories to recommend from: the top class's, or the candidates' when the answer is unsure."""
        params = self.params
        _, choices = choose_categories(
            prediction.top_k,
            mapping,
            prediction.not_sure_threshold,
            params.uncertain_max_categories,
            params.uncertain_min_probability,
        )
        return list(dict.fromkeys(c.category for c in choices if c.category))

    def answers_from_cache(self, prediction: Prediction, preferences: Preferences) -> bool:
        """Whether `answer` needs no database: the knowledge base is not due for its rebuild check and its facts,
        class mapping and each category's ranking for `preferences` are cached (the answer then takes well under
        a millisecond, so the app computes it on its event loop instead of handing it to a thread)."""
        build, cache = self._kb()
        mapping, facts = self._class_to_category, self._facts
        if build.due() or mapping is None or facts is None:
            return False
        return all(cache.contains(c, preferences) for c in self._categories(prediction, mapping))

    def answer(self, prediction: Prediction, preferences: Preferences, timings: Timings) -> dict[str, Any]:
        """The API's answer for a prediction: ranked, explained products and the category facts."""
        result, facts = self.recommend_prediction(prediction, preferences, timings)
        mapping = self.class_to_category()
        return response_dict(prediction, result, facts, mapping, self.params.top_k_classes, self.product_json)

    def recommend_image(self, image: bytes, preferences: Preferences, timings: Timings) -> dict[str, Any]:
        return self.answer(self.predict(image, timings), preferences, timings)


def response_dict(
    prediction: Prediction,
    result: RecommendationResult,
    facts: dict[str, kb.CategoryFacts],
    mapping: dict[str, str | None],
    top_k_classes: int,
    product_json: Callable[[Recommendation], dict[str, Any]] = Recommendation.to_dict,
) -> dict[str, Any]:
    return {
        "prediction": {
            "class": prediction.top.class_name,
            "confidence": prediction.top.probability,
            "top_k": [
                {"class": c.class_name, "probability": c.probability, "category": mapping.get(c.class_name)}
                for c in prediction.top_k[:top_k_classes]
            ],
            "model": {"name": prediction.model_name, "version": prediction.model_version},
            "not_sure_threshold": prediction.not_sure_threshold,
        },
        "category": result.category,
        "uncertain": result.uncertain,
        "candidates": [
            {"class": c.class_name, "probability": c.probability, "category": c.category, "label": c.label}
            for c in result.choices
        ],
        "messages": result.messages,
        "category_facts": [facts_dict(facts[c.category]) for c in result.choices if c.category in facts],
        "products": [product_json(r) for r in result.products],
    }
