"""Photo -> recommendations: checks the upload, asks the model server, reads the knowledge base and
ranks. Shared by the HTTP API and the CLI; timings of each hop come back with the answer.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError
from sqlalchemy import Engine

from recommender import kb
from recommender.client import Prediction, PredictionClient
from recommender.feedback import FeedbackBook
from recommender.params import RecommenderParams, load_recommender_params
from recommender.ranking import Preferences, RecommendationResult, choose_categories, recommend
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
    """Milliseconds per hop of one request (shown as a Server-Timing header)."""

    hops: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def hop(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.hops[name] = self.hops.get(name, 0.0) + (time.perf_counter() - start) * 1000

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.hops.items())


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

    def class_to_category(self) -> dict[str, str | None]:
        """The KB's class -> category table (built from params), falling back to params for unknown classes."""
        if self._class_to_category is None:
            with self.engine.connect() as conn:
                self._class_to_category = {**self.params.class_to_category, **kb.class_categories(conn)}
        return self._class_to_category

    def predict(self, image: bytes, timings: Timings) -> Prediction:
        top_k = max(self.params.top_k_classes, self.params.uncertain_max_categories)
        with timings.hop("model"):
            return self.client.predict_one(image, top_k=top_k)

    def category_facts(self) -> dict[str, kb.CategoryFacts]:
        """Facts of every category, read once: the knowledge base is read-only while the app runs."""
        if self._facts is None:
            with self.engine.connect() as conn:
                self._facts = kb.category_facts(conn)
        return self._facts

    def recommend_prediction(
        self, prediction: Prediction, preferences: Preferences, timings: Timings
    ) -> tuple[RecommendationResult, dict[str, kb.CategoryFacts]]:
        mapping = self.class_to_category()
        params = self.params
        # The served version's own threshold, so a new model version brings its own notion of "not sure".
        threshold = prediction.not_sure_threshold
        _, choices = choose_categories(
            prediction.top_k, mapping, threshold, params.uncertain_max_categories, params.uncertain_min_probability
        )
        categories = list(dict.fromkeys(c.category for c in choices if c.category))
        with timings.hop("db"):
            facts = self.category_facts()
            rows = {}
            if categories:
                with self.engine.connect() as conn:
                    rows = {c: kb.candidate_rows(conn, c, preferences, params.candidate_pool) for c in categories}
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

    def recommend_image(self, image: bytes, preferences: Preferences, timings: Timings) -> dict[str, Any]:
        prediction = self.predict(image, timings)
        result, facts = self.recommend_prediction(prediction, preferences, timings)
        return response_dict(prediction, result, facts, self.class_to_category(), self.params.top_k_classes)


def response_dict(
    prediction: Prediction,
    result: RecommendationResult,
    facts: dict[str, kb.CategoryFacts],
    mapping: dict[str, str | None],
    top_k_classes: int,
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
        "products": [r.to_dict() for r in result.products],
    }
