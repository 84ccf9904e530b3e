"""The `recommender:` section of params.yaml, typed.

params.yaml is the one place these numbers are written: the ranking limits have no defaults here, so a
params file without them fails to load instead of silently using other values.

The "not sure" threshold is not here: each served model version carries its own (evaluate chooses it
on val), and the client reads it from every answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from common.params import DEFAULT_PARAMS_PATH, load_section


@dataclass(frozen=True)
class RecommenderParams:
    class_to_category: dict[str, str | None]
    uncertain_max_categories: int
    uncertain_min_probability: float
    top_k_classes: int
    max_products: int
    candidate_pool: int  # rows per category the database hands the ranking
    multi_word_brands: list[str] = field(default_factory=list)
    value_specs: dict[str, list[str]] = field(default_factory=dict)

    def category_for(self, class_name: str) -> str | None:
        """The catalog category of an image class, None when the class has no catalog."""
        return self.class_to_category.get(class_name)


def load_recommender_params(path: Path = DEFAULT_PARAMS_PATH) -> RecommenderParams:
    return load_section(RecommenderParams, "recommender", path)
