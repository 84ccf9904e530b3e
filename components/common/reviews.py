"""Reviewed labels (`labels/reviews.csv`): the schema, its checks, and how a review changes a label.

A review row is a person's decision about one image, keyed by the image's content hash, made
while looking at the image alone (never its folder's class or a model's guess). The decision is
a class name (confirm or relabel) or an exclusion. The file is committed in git, so every label
change is versioned data with who, when and why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REVIEW_COLUMNS = ["sha256", "file", "given_label", "decision", "reviewer", "reviewed_at", "note"]
EXCLUDE_AMBIGUOUS = "exclude_ambiguous"  # no single product of one class is the subject
EXCLUDE_NOT_PRODUCT = "exclude_not_product"  # no product photo at all (an advert, an icon sheet, text)
EXCLUDE_DECISIONS = (EXCLUDE_AMBIGUOUS, EXCLUDE_NOT_PRODUCT)


class ReviewError(ValueError):
    """labels/reviews.csv has a row that cannot be applied."""


@dataclass(frozen=True)
class ReviewProblem:
    """One bad row: its line number in the CSV (header = line 1) and what is wrong with it."""

    line: int
    sha256: str
    reason: str

    def sentence(self) -> str:
        return f"labels/reviews.csv line {self.line} (sha256 {self.sha256[:12]}...): {self.reason}"


def empty_reviews() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype="string") for column in REVIEW_COLUMNS})


def read_reviews(path: Path) -> pd.DataFrame:
    """The review table; an absent file means no reviews yet. Columns are checked, values are strings."""
    path = Path(path)
    if not path.exists():
        return empty_reviews()
    frame = pd.read_csv(path, dtype="string", keep_default_na=False)
    missing = [column for column in REVIEW_COLUMNS if column not in frame.columns]
    if missing:
        raise ReviewError(f"{path}: missing column(s) {missing}; expected {REVIEW_COLUMNS}")
    return frame[REVIEW_COLUMNS]


def allowed_decisions(class_names: Iterable[str]) -> list[str]:
    return sorted(class_names) + list(EXCLUDE_DECISIONS)


def review_problems(
    reviews: pd.DataFrame, dataset_sha256: Iterable[str], class_names: Iterable[str]
) -> list[ReviewProblem]:
    """Every row that names an image not in the dataset, an unknown decision, no reviewer or a repeated image."""
    known_images = set(dataset_sha256)
    decisions = set(allowed_decisions(class_names))
    problems: list[ReviewProblem] = []
    seen: dict[str, int] = {}
    for offset, row in enumerate(reviews.itertuples(index=False)):
        line = offset + 2
        if row.sha256 not in known_images:
            problems.append(ReviewProblem(line, row.sha256, f"no image with this sha256 in the dataset ({row.file})"))
        if row.decision not in decisions:
            problems.append(
                ReviewProblem(line, row.sha256, f"decision {row.decision!r} is not one of {sorted(decisions)}")
            )
        if not str(row.reviewer).strip():
            problems.append(ReviewProblem(line, row.sha256, "no reviewer named"))
        if row.sha256 in seen:
            problems.append(ReviewProblem(line, row.sha256, f"image already reviewed on line {seen[row.sha256]}"))
        seen.setdefault(row.sha256, line)
    return problems


def apply_reviews(images: pd.DataFrame, reviews: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Relabel or drop the reviewed rows of `images` (columns include sha256, class_name).

    Returns (kept, excluded). `kept` gains `given_class_name` (the folder's class) and `review`
    (the decision, '' when not reviewed); `class_name` becomes the reviewed class.
    """
    decision_of = dict(zip(reviews["sha256"], reviews["decision"], strict=True))
    review = images["sha256"].map(decision_of).fillna("").astype(str)
    labelled = images.assign(given_class_name=images["class_name"], review=review)
    relabel = (review != "") & ~review.isin(EXCLUDE_DECISIONS)
    labelled.loc[relabel, "class_name"] = review[relabel]
    excluded = review.isin(EXCLUDE_DECISIONS)
    return labelled[~excluded].copy(), labelled[excluded].copy()


def review_counts(kept: pd.DataFrame, excluded: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Per given class: how many reviewed labels were confirmed, relabelled and excluded (by reason)."""
    counts: dict[str, dict[str, int]] = {}

    def bump(given: str, outcome: str) -> None:
        per_class = counts.setdefault(given, {"confirmed": 0, "relabelled": 0, **dict.fromkeys(EXCLUDE_DECISIONS, 0)})
        per_class[outcome] += 1

    for row in kept[kept["review"] != ""].itertuples(index=False):
        bump(row.given_class_name, "confirmed" if row.review == row.given_class_name else "relabelled")
    for row in excluded.itertuples(index=False):
        bump(row.given_class_name, row.review)
    return dict(sorted(counts.items()))
