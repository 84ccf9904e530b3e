"""Users' corrections: answers to "Is this a <class>?", their photos, and their export for the next dataset version.

The upload page (and `POST /v1/feedback`) asks whether the predicted class is right; the user confirms it or
picks the right class. Each answer is a row of the `feedback` table (recommender/kb_schema.py; its database is
`Settings.feedback_database_url()`), keyed by the photo's sha256; the photo goes into a content-addressed store,
`<root>/<sha256[:2]>/<sha256>.<ext>` (PRODUCTLENS_FEEDBACK_DIR). Only photos the dataset can take are accepted
(validate's classes, formats and minimum size in params.yaml), so whatever the store holds can become data.

An answer is not a label decision: it nominates the photo for blind review (labels/GUIDELINES.md).
`productlens feedback export` copies the photos not yet in the dataset into `data/images/<class>/`, under the
class the users gave (their given label, as a folder is for every other image), and lists their sha256 as
review candidates; `productlens review sheets --candidates` shows them to a reviewer with neither the users'
answer nor the model's guess in view, and the reviewed decision in labels/reviews.csv is what training uses.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError
from sqlalchemy import Engine, insert, inspect, select

from common.io import atomic_write_bytes, atomic_write_text, sha256_of_file
from common.params import load_params, section
from recommender.kb_schema import Feedback, create_feedback_schema, make_engine
from recommender.ranking import is_plural, noun, with_article

log = logging.getLogger(__name__)

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp"}
CANDIDATE_COLUMNS = ["sha256"]  # all a reviewer's tool needs, and nothing that gives an answer away
FEEDBACK_FILE_PREFIX = "feedback-"


class FeedbackRefused(ValueError):
    """An answer that cannot be recorded; `status` is the HTTP status to answer with (404, 415 or 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class DatasetRules:
    """What the dataset takes (params.yaml `validate:`): a photo the store keeps must pass the validate step."""

    classes: tuple[str, ...]
    formats: tuple[str, ...]
    min_width: int
    min_height: int
    max_pixels: int

    @classmethod
    def from_params(cls, path: Path) -> DatasetRules:
        validate = section(load_params(path), "validate")
        return cls(
            classes=tuple(validate["expected_classes"]),
            formats=tuple(validate["image_formats"]),
            min_width=int(validate["min_width"]),
            min_height=int(validate["min_height"]),
            max_pixels=int(validate["max_pixels"]),
        )

    def check_class(self, field_name: str, value: str) -> str:
        if value not in self.classes:
            raise FeedbackRefused(422, f"{field_name} '{value}' is not a class: use one of {', '.join(self.classes)}.")
        return value

    def image_extension(self, image: bytes) -> str:
        """The file extension the photo is stored under; refuses what validate would fail (read from the header)."""
        try:
            with Image.open(io.BytesIO(image)) as opened:
                image_format, width, height = opened.format or "?", opened.width, opened.height
        except (UnidentifiedImageError, OSError) as error:
            raise FeedbackRefused(415, "This file is not an image: send the photo the answer is about.") from error
        if image_format not in self.formats or image_format not in EXTENSIONS:
            raise FeedbackRefused(
                415,
                f"{image_format} photos cannot become training data: answers are kept for "
                f"{' and '.join(self.formats)} photos.",
            )
        if width < self.min_width or height < self.min_height:
            raise FeedbackRefused(
                422,
                f"The photo is {width}x{height} pixels, under the {self.min_width}x{self.min_height} the training data "
                "needs: answers are kept for larger photos.",
            )
        if width * height > self.max_pixels:
            raise FeedbackRefused(
                422, f"The photo has more than the {self.max_pixels:,} pixels the training data takes."
            )
        return EXTENSIONS[image_format]


def question(class_name: str) -> str:
    """ "Is this a mouse?", "Is this an HDD?", "Are these speakers?" """
    return f"{'Are these' if is_plural(class_name) else 'Is this'} {with_article(class_name)}?"


class FeedbackStore:
    """Photos by content: `<root>/<sha256[:2]>/<sha256>.<ext>`. The same photo sent twice is stored once."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, sha256: str, extension: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.{extension}"

    def find(self, sha256: str) -> Path | None:
        """The stored photo with this sha256, or None."""
        if not SHA256_PATTERN.fullmatch(sha256):
            return None
        for extension in EXTENSIONS.values():
            path = self.path_for(sha256, extension)
            if path.is_file():
                return path
        return None

    def put(self, image: bytes, extension: str) -> tuple[str, Path, bool]:
        """Store `image`; returns its sha256, its path and whether it was new to the store."""
        sha256 = hashlib.sha256(image).hexdigest()
        existing = self.find(sha256)
        if existing is not None:
            return sha256, existing, False
        path = self.path_for(sha256, extension)
        atomic_write_bytes(path, image)
        path.chmod(0o644)  # the exporter may run as another user than the app
        return sha256, path, True

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class FeedbackRecord:
    id: int
    image_sha256: str
    image_file: str
    predicted_class: str
    user_class: str
    model_name: str | None
    model_version: int | None
    created_at: datetime

    @property
    def confirmed(self) -> bool:
        return self.user_class == self.predicted_class

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image_sha256": self.image_sha256,
            "predicted_class": self.predicted_class,
            "user_class": self.user_class,
            "confirmed": self.confirmed,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "created_at": self.created_at.isoformat(),
        }


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no time zone: every time written here is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class FeedbackBook:
    """Records answers (the table and the store) and reads them back. The table is created on first use."""

    def __init__(self, engine: Engine, store: FeedbackStore, rules: DatasetRules):
        self.engine = engine
        self.store = store
        self.rules = rules
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    @classmethod
    def open(cls, db_url: str, store_dir: Path, params_path: Path) -> FeedbackBook:
        """The book on `db_url` and the store at `store_dir` (the classes and photo rules from `params_path`'s
        `validate:` section); no file, folder or table is created before the first answer."""
        return cls(make_engine(db_url), FeedbackStore(store_dir), DatasetRules.from_params(params_path))

    def close(self) -> None:
        self.engine.dispose()

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            with self._schema_lock:
                if not self._schema_ready:
                    database = self.engine.url.database
                    if self.engine.dialect.name == "sqlite" and database and database != ":memory:":
                        Path(database).parent.mkdir(parents=True, exist_ok=True)
                    create_feedback_schema(self.engine)
                    self._schema_ready = True

    def ask(self, image_sha256: str, predicted_class: str) -> dict[str, Any]:
        """What a recommendation answer carries for the feedback call: the photo's sha256, the question, the
        classes the user may pick (the class and the model version are in the answer's prediction)."""
        return {
            "image_sha256": image_sha256,
            "question": question(predicted_class),
            "classes": [{"class": name, "label": noun(name)} for name in self.rules.classes],
        }

    def record(
        self,
        *,
        predicted_class: str,
        user_class: str,
        image: bytes | None = None,
        image_sha256: str | None = None,
        model_name: str | None = None,
        model_version: int | None = None,
    ) -> tuple[FeedbackRecord, bool]:
        """Store one answer; returns it and whether its photo was new to the store.

        With `image`, the photo is stored (and must hash to `image_sha256` when that is given too); without it,
        `image_sha256` must name a photo the store already holds (404 otherwise).
        """
        self.rules.check_class("predicted_class", predicted_class)
        self.rules.check_class("user_class", user_class)
        if image_sha256 is not None:
            image_sha256 = image_sha256.strip().lower()
            if not SHA256_PATTERN.fullmatch(image_sha256):
                raise FeedbackRefused(
                    422, "image_sha256 must be 64 hexadecimal digits (the recommendation's image_sha256)."
                )
        if image is None:
            if image_sha256 is None:
                raise FeedbackRefused(422, "Send the photo (field image), or the image_sha256 of a photo sent before.")
            path = self.store.find(image_sha256)
            if path is None:
                raise FeedbackRefused(
                    404,
                    f"No photo with sha256 {image_sha256} has been sent yet: send the photo with the answer "
                    "(field image).",
                )
            sha256, new = image_sha256, False
        else:
            extension = self.rules.image_extension(image)
            actual = hashlib.sha256(image).hexdigest()
            if image_sha256 is not None and image_sha256 != actual:
                raise FeedbackRefused(
                    422,
                    f"The photo's sha256 is {actual}, not the image_sha256 sent ({image_sha256}): send the photo the "
                    "recommendation answered.",
                )
            sha256, path, new = self.store.put(image, extension)
        self._ensure_schema()
        created_at = datetime.now(UTC).replace(microsecond=0)
        values = {
            "image_sha256": sha256,
            "image_file": self.store.relative(path),
            "predicted_class": predicted_class,
            "user_class": user_class,
            "model_name": model_name,
            "model_version": model_version,
            "created_at": created_at,
        }
        with self.engine.begin() as conn:
            row_id = conn.execute(insert(Feedback).values(**values)).inserted_primary_key[0]
        return FeedbackRecord(id=int(row_id), **values), new

    def where(self) -> str:
        """The database, for messages (no password)."""
        return self.engine.url.render_as_string(hide_password=True)

    def answers(self) -> list[FeedbackRecord]:
        """Every answer, oldest first; none where no answer was ever recorded (nothing is created to read them)."""
        database = self.engine.url.database
        if self.engine.dialect.name == "sqlite" and database and not Path(database).exists():
            return []
        if not inspect(self.engine).has_table(Feedback.__tablename__):
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(select(Feedback.__table__).order_by(Feedback.id)).mappings().all()
        return [FeedbackRecord(**{**row, "created_at": _utc(row["created_at"])}) for row in rows]


# --------------------------------------------------------------------------- export


def given_class(answers: Sequence[FeedbackRecord]) -> str:
    """The class the users gave a photo: the most frequent answer, the latest of those tied."""
    counts = Counter(a.user_class for a in answers)
    top = max(counts.values())
    return next(a.user_class for a in reversed(answers) if counts[a.user_class] == top)


def dataset_sha256(dataset_dir: Path) -> set[str]:
    """sha256 of every file in the dataset (hidden files aside), to leave out photos it already has."""
    if not dataset_dir.is_dir():
        return set()
    return {
        sha256_of_file(p)
        for p in dataset_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(dataset_dir).parts)
    }


@dataclass
class FeedbackExport:
    """What an export did (counts only: the report must not tell a reviewer any photo's answer)."""

    answers: int = 0
    confirmed: int = 0
    corrected: int = 0
    photos: int = 0
    added_per_class: dict[str, int] = field(default_factory=dict)
    already_in_dataset: int = 0  # not copied: the dataset has them (a dataset photo answered, or an earlier export)
    already_reviewed: int = 0  # not candidates: labels/reviews.csv has a decision
    only_confirmed: int = 0  # left out with corrected_only
    missing_from_store: list[str] = field(default_factory=list)
    candidates: list[str] = field(default_factory=list)

    @property
    def added(self) -> int:
        return sum(self.added_per_class.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "added": self.added}


def export_feedback(
    answers: Iterable[FeedbackRecord],
    store: FeedbackStore,
    dataset_dir: Path,
    classes: Sequence[str],
    reviewed: Iterable[str] = (),
    corrected_only: bool = False,
) -> FeedbackExport:
    """Copy each answered photo the dataset lacks to `<dataset_dir>/<given class>/feedback-<sha256[:16]>.<ext>`.

    The given class is the users' (`given_class`): a folder label like any other, which the blind review then
    confirms, corrects or excludes. The candidates are the answered photos in the dataset (just copied, copied by an
    earlier export, or there from the start) whose sha256 is not `reviewed` yet, so a second export lists the same
    ones until they are reviewed. Returns them with the counts.
    """
    reviewed = set(reviewed)
    by_photo: dict[str, list[FeedbackRecord]] = defaultdict(list)
    result = FeedbackExport()
    for answer in answers:
        by_photo[answer.image_sha256].append(answer)
        result.answers += 1
        result.confirmed += answer.confirmed
    result.corrected = result.answers - result.confirmed
    result.photos = len(by_photo)
    in_dataset = dataset_sha256(dataset_dir)
    added: Counter[str] = Counter()
    for sha256, photo_answers in by_photo.items():
        if corrected_only and all(a.confirmed for a in photo_answers):
            result.only_confirmed += 1
            continue
        if sha256 in in_dataset:
            result.already_in_dataset += 1
        else:
            source = store.find(sha256)
            if source is None:
                log.warning("the feedback store has no photo %s (answer %d): left out", sha256, photo_answers[0].id)
                result.missing_from_store.append(sha256)
                continue
            label = given_class(photo_answers)
            if label not in classes:
                raise ValueError(
                    f"photo {sha256} was answered '{label}', which is not one of the classes {list(classes)}"
                )
            target = dataset_dir / label / f"{FEEDBACK_FILE_PREFIX}{sha256[:16]}{source.suffix}"
            atomic_write_bytes(target, source.read_bytes())
            target.chmod(0o644)
            added[label] += 1
        if sha256 in reviewed:
            result.already_reviewed += 1
        else:
            result.candidates.append(sha256)
    result.added_per_class = dict(sorted(added.items()))
    return result


def write_candidates(path: Path, candidates: Sequence[str]) -> None:
    """The review candidates, one sha256 a row: what `productlens review sheets --candidates` reads."""
    atomic_write_text(path, pd.DataFrame({"sha256": list(candidates)}, columns=CANDIDATE_COLUMNS).to_csv(index=False))


def summary(result: FeedbackExport, source: str, dataset_dir: Path, candidates_path: Path) -> str:
    lines = [
        f"{result.answers} answers in {source} ({result.confirmed} confirmed, {result.corrected} corrected) "
        f"on {result.photos} photos",
        f"added {result.added} photos to {dataset_dir}"
        + (f" ({', '.join(f'{c} {n}' for c, n in result.added_per_class.items())})" if result.added else ""),
    ]
    if result.already_in_dataset:
        lines.append(f"{result.already_in_dataset} photos already in the dataset: not copied")
    if result.already_reviewed:
        lines.append(f"{result.already_reviewed} photos already reviewed: not candidates")
    if result.only_confirmed:
        lines.append(f"{result.only_confirmed} photos only confirmed: left out (--corrected-only)")
    if result.missing_from_store:
        lines.append(f"{len(result.missing_from_store)} photos missing from the feedback store: left out")
    lines.append(
        f"{len(result.candidates)} review candidates (not reviewed yet) -> {candidates_path}: the answers are not "
        f"labels; review them blind (productlens review sheets --candidates {candidates_path}) before `dvc add data`"
    )
    return "\n".join(lines)
