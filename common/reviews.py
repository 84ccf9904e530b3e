"""Reviewed labels (`labels/reviews.csv`): the schema, its checks, and how a review changes a label.

A review row is a person's decision about one image, keyed by the image's content hash, made
while looking at the image alone (never its folder's class or a model's guess). The decision is
a class name (confirm or relabel) or an exclusion. The file is committed in git, so every label
change is versioned data with who, when and why.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

REVIEW_COLUMNS = ["sha256", "file", "given_label", "decision", "reviewer", "reviewed_at", "note"]
EXCLUDE_AMBIGUOUS = "exclude_ambiguous"  # no single product of one class is the subject
EXCLUDE_NOT_PRODUCT = "exclude_not_product"  # no product photo at all (an advert, an icon sheet, text)
EXCLUDE_DECISIONS = (EXCLUDE_AMBIGUOUS, EXCLUDE_NOT_PRODUCT)


class ReviewError(ValueError):
    """labels/reviews.csv has a row that cannot be applied."""


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
