"""Personalised ranking: pure functions from a class distribution, catalog rows and preferences
to labelled, explained recommendations. No database, no network, no clock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from serving.contract import ClassScore

Sort = Literal["best_value", "cheapest", "premium"]
SORTS: tuple[str, ...] = ("best_value", "cheapest", "premium")

# A requirement key also matches these spec names (the catalog is not consistent across categories).
SPEC_ALIASES = {"connection": ("connection", "connection_type"), "connection_type": ("connection_type", "connection")}


@dataclass(frozen=True)
class ProductRow:
    id: int
    category: str
    name: str
    brand: str
    price: float | None
    specs: Mapping[str, Any] = field(default_factory=dict)
    quality: float = 1.0
    value_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON: `specs` as the catalog has them, `readable_specs` as a person reads them."""
        return {**asdict(self), "specs": dict(self.specs), "readable_specs": readable_specs(self.category, self.specs)}


# --------------------------------------------------------------------------- preferences


class PreferenceError(ValueError):
    """A preference a person typed that cannot be understood; the message says how to fix it."""


@dataclass(frozen=True)
class SpecRequirement:
    """A required spec: `key=value` (bool, number or text contained), `key=lo..hi`, `key>=x`, `key<=x`."""

    key: str
    op: Literal["eq", "range"]
    value: Any = None
    low: float | None = None
    high: float | None = None

    @classmethod
    def parse(cls, text: str) -> SpecRequirement:
        match = re.fullmatch(r"\s*([A-Za-z_][\w ]*?)\s*(>=|<=|=)\s*(.+?)\s*", text)
        if not match:
            raise PreferenceError(
                f"cannot read requirement '{text}': write key=value, key=min..max, key>=x or key<=x "
                "(e.g. wireless=true, screen_size=24..27)"
            )
        key, op, raw = match.group(1).strip().lower().replace(" ", "_"), match.group(2), match.group(3)
        if op in (">=", "<="):
            number = _number(raw)
            if number is None:
                raise PreferenceError(f"requirement '{text}': '{raw}' is not a number")
            return cls(key, "range", low=number if op == ">=" else None, high=number if op == "<=" else None)
        if ".." in raw:
            low_text, high_text = (part.strip() for part in raw.split("..", 1))
            low, high = _number(low_text), _number(high_text)
            if (low_text and low is None) or (high_text and high is None) or (low is None and high is None):
                raise PreferenceError(f"requirement '{text}': a range needs numbers, e.g. {key}=24..27")
            return cls(key, "range", low=low, high=high)
        lowered = raw.lower()
        if lowered in ("true", "yes"):
            return cls(key, "eq", True)
        if lowered in ("false", "no"):
            return cls(key, "eq", False)
        number = _number(raw)
        return cls(key, "eq", number if number is not None else raw)

    def spec_value(self, specs: Mapping[str, Any]) -> tuple[str, Any] | None:
        for name in SPEC_ALIASES.get(self.key, (self.key,)):
            if name in specs and specs[name] is not None:
                return name, specs[name]
        return None

    def matches(self, specs: Mapping[str, Any]) -> bool:
        found = self.spec_value(specs)
        if found is None:
            return False
        value = found[1]
        if self.op == "range":
            number = value if isinstance(value, int | float) and not isinstance(value, bool) else _number(str(value))
            if number is None:
                return False
            return (self.low is None or number >= self.low) and (self.high is None or number <= self.high)
        if isinstance(self.value, bool):
            return isinstance(value, bool) and value == self.value
        if isinstance(self.value, int | float):
            number = value if isinstance(value, int | float) and not isinstance(value, bool) else _number(str(value))
            return number is not None and math.isclose(number, self.value, rel_tol=1e-9, abs_tol=1e-9)
        return str(self.value).lower() in str(value).lower()

    def describe(self, specs: Mapping[str, Any], category: str | None = None) -> str:
        """How a matching product meets this requirement, in words ("wireless", 'screen size 27"')."""
        found = self.spec_value(specs)
        name, value = found if found else (self.key, None)
        if isinstance(value, bool):
            return spec_label(name) if value else f"not {spec_label(name)}"
        return f"{spec_label(name)} {spec_text(category, name, value)}"


@dataclass(frozen=True)
class Preferences:
    budget_min: float | None = None
    budget_max: float | None = None
    preferred_brands: tuple[str, ...] = ()
    excluded_brands: tuple[str, ...] = ()
    requirements: tuple[SpecRequirement, ...] = ()
    sort: Sort = "best_value"

    def __post_init__(self) -> None:
        for name in ("budget_min", "budget_max"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise PreferenceError(f"{name} must be a number >= 0, got {value}")
        if self.budget_min is not None and self.budget_max is not None and self.budget_min > self.budget_max:
            raise PreferenceError(f"budget_min ({self.budget_min}) is above budget_max ({self.budget_max})")
        if self.sort not in SORTS:
            raise PreferenceError(f"sort must be one of {', '.join(SORTS)}, got '{self.sort}'")

    @classmethod
    def from_inputs(
        cls,
        budget_min: float | None = None,
        budget_max: float | None = None,
        brands: Iterable[str] = (),
        exclude_brands: Iterable[str] = (),
        require: Iterable[str] = (),
        sort: str = "best_value",
    ) -> Preferences:
        """Preferences from loosely typed inputs (form fields, CLI flags): comma-separated lists allowed."""
        return cls(
            budget_min=budget_min,
            budget_max=budget_max,
            preferred_brands=tuple(_split_list(brands)),
            excluded_brands=tuple(_split_list(exclude_brands)),
            requirements=tuple(SpecRequirement.parse(r) for r in _split_list(require, separators=r"[,;\n]")),
            sort=sort,  # type: ignore[arg-type]
        )

    @property
    def has_budget(self) -> bool:
        return self.budget_min is not None or self.budget_max is not None

    def within_budget(self, price: float | None) -> bool:
        """Whether a price is within the budget; a product without a price never is."""
        if price is None:
            return False
        return (self.budget_min is None or price >= self.budget_min) and (
            self.budget_max is None or price <= self.budget_max
        )

    def prefers(self, brand: str) -> bool:
        return brand.lower() in {b.lower() for b in self.preferred_brands}

    def excludes(self, brand: str) -> bool:
        return brand.lower() in {b.lower() for b in self.excluded_brands}

    def budget_text(self) -> str:
        if self.budget_min is not None and self.budget_max is not None:
            return f"{_money(self.budget_min)}–{_money(self.budget_max)} USD"
        if self.budget_max is not None:
            return f"{_money(self.budget_max)} USD"
        return f"at least {_money(self.budget_min)} USD"


def _split_list(values: Iterable[str] | str, separators: str = r"[,;\n]") -> list[str]:
    if isinstance(values, str):
        values = [values]
    items: list[str] = []
    for value in values:
        # A requirement range like screen_size=24..27 has no comma, so splitting on commas is safe
        # except inside a text value; those are written one per field/flag instead.
        items += [part.strip() for part in re.split(separators, value or "") if part.strip()]
    return items


# --------------------------------------------------------------------------- filtering and ranking


def eligible(row: ProductRow, preferences: Preferences) -> bool:
    """Whether a product passes every hard preference: budget, excluded brands, required specs."""
    if preferences.has_budget and not preferences.within_budget(row.price):
        return False
    if preferences.excludes(row.brand):
        return False
    return all(requirement.matches(row.specs) for requirement in preferences.requirements)


def sort_key(row: ProductRow, preferences: Preferences) -> tuple[Any, ...]:
    preferred = 0 if preferences.prefers(row.brand) else 1
    no_price = row.price is None
    price = row.price if row.price is not None else 0.0
    if preferences.sort == "cheapest":
        return (preferred, no_price, price, row.id)
    if preferences.sort == "premium":
        return (preferred, no_price, -price, -row.quality, row.id)
    value = row.value_score if row.value_score is not None else -math.inf
    return (preferred, no_price, -value, price, row.id)


@dataclass(frozen=True)
class Recommendation:
    product: ProductRow
    explanation: str
    label: str | None = None  # which candidate category this came from, when the prediction is uncertain

    def to_dict(self) -> dict[str, Any]:
        return {**self.product.to_dict(), "explanation": self.explanation, "label": self.label}


def explain(row: ProductRow, preferences: Preferences, rank_note: str | None = None) -> str:
    """One line saying why this product is recommended."""
    if row.price is None:
        parts = ["no current price"]
    elif preferences.has_budget and preferences.within_budget(row.price):
        parts = [f"{_money(row.price)} USD, within your {preferences.budget_text()} budget"]
    else:
        parts = [f"{_money(row.price)} USD"]
    if preferences.prefers(row.brand):
        parts.append(f"{row.brand}, a brand you prefer")
    parts += [requirement.describe(row.specs, row.category) for requirement in preferences.requirements]
    if rank_note:
        parts.append(rank_note)
    return "; ".join(parts)


def rank_note(row: ProductRow, preferences: Preferences, position: int) -> str | None:
    if row.price is None:
        return None
    if preferences.sort == "cheapest":
        return "the cheapest match" if position == 0 else None
    if preferences.sort == "premium":
        return "the most premium match" if position == 0 else None
    if row.value_score is None:
        return None
    typical = f"{'' if is_plural(row.category) else 'a '}typical {noun(row.category)}"
    if row.quality == 1.0:  # no value specs for this product: value for money is its price against the median
        return f"costs {1 / row.value_score:.0%} of {possessive(typical)} price"
    return f"{row.value_score:.1f}x the value for money of {typical}"


def rank_products(rows: Iterable[ProductRow], preferences: Preferences, limit: int) -> list[Recommendation]:
    """Products passing the preferences, preferred brands first, then by the requested sort.

    A name already listed is not listed again (the catalog has offers of one product under one name).
    """
    ranked = sorted((row for row in rows if eligible(row, preferences)), key=lambda r: sort_key(r, preferences))
    distinct: list[ProductRow] = []
    seen: set[str] = set()
    for row in ranked:
        if row.name.lower() not in seen:
            seen.add(row.name.lower())
            distinct.append(row)
        if len(distinct) == limit:
            break
    return [
        Recommendation(row, explain(row, preferences, rank_note(row, preferences, i))) for i, row in enumerate(distinct)
    ]


# --------------------------------------------------------------------------- predictions -> categories


@dataclass(frozen=True)
class CategoryChoice:
    """A predicted class and where to look for products of it."""

    class_name: str
    probability: float
    category: str | None  # None: no catalog for this class
    label: str


@dataclass(frozen=True)
class RecommendationResult:
    top_class: ClassScore
    uncertain: bool
    choices: list[CategoryChoice]
    products: list[Recommendation]
    messages: list[str]

    @property
    def category(self) -> str | None:
        """The category recommended from: the top class's, or None (uncertain or no catalog)."""
        return None if self.uncertain else self.choices[0].category


def choose_categories(
    top_k: Sequence[ClassScore],
    class_to_category: Mapping[str, str | None],
    not_sure_threshold: float,
    max_categories: int = 3,
    min_probability: float = 0.1,
) -> tuple[bool, list[CategoryChoice]]:
    """Which categories to recommend from: the top class's, or, when the top-1 probability is under
    `not_sure_threshold` (the served model's own), the top 2 classes plus up to `max_categories` in all
    with at least `min_probability`.
    """
    if not top_k:
        raise ValueError("a prediction needs at least one class")
    ordered = sorted(top_k, key=lambda c: c.probability, reverse=True)
    uncertain = ordered[0].probability < not_sure_threshold
    if uncertain:
        picked = ordered[:2] + [c for c in ordered[2 : max(2, max_categories)] if c.probability >= min_probability]
    else:
        picked = ordered[:1]
    choices = []
    for candidate in picked:
        # "a keyboard (85%)", "speakers (85%)", "possibly an HDD (40%)": what the page and the CLI show.
        label = f"{'possibly ' if uncertain else ''}{with_article(candidate.class_name)} ({candidate.probability:.0%})"
        choices.append(
            CategoryChoice(
                candidate.class_name, candidate.probability, class_to_category.get(candidate.class_name), label
            )
        )
    return uncertain, choices


def no_catalog_message(choice: CategoryChoice) -> str:
    name = choice.class_name
    return (
        f"This looks like {with_article(name)} ({choice.probability:.0%}), but the knowledge base has no "
        f"{noun(name)} catalog, so there is nothing to recommend for it."
    )


def recommend(
    top_k: Sequence[ClassScore],
    rows_by_category: Mapping[str, Sequence[ProductRow]],
    preferences: Preferences,
    class_to_category: Mapping[str, str | None],
    not_sure_threshold: float,
    max_products: int = 10,
    max_categories: int = 3,
    min_probability: float = 0.1,
) -> RecommendationResult:
    """Join a class distribution with catalog rows: ranked, explained and (when uncertain) labelled products.

    `not_sure_threshold` is the served model's: a top-1 probability under it means "uncertain".
    """
    uncertain, choices = choose_categories(
        top_k, class_to_category, not_sure_threshold, max_categories, min_probability
    )
    ordered = sorted(top_k, key=lambda c: c.probability, reverse=True)
    messages: list[str] = []
    if uncertain:
        messages.append(
            f"Not sure what this is: the best guess, {noun(ordered[0].class_name)}, has only "
            f"{ordered[0].probability:.0%} confidence, under this model's not-sure threshold of "
            f"{not_sure_threshold:.0%}. Showing candidates from the top {len(choices)} categories."
        )
    with_catalog = [c for c in choices if c.category is not None]
    messages += [no_catalog_message(c) for c in choices if c.category is None]
    per_choice = max(1, math.ceil(max_products / max(1, len(with_catalog))))
    lists = [
        [
            Recommendation(r.product, r.explanation, c.label if uncertain else None)
            for r in rank_products(rows_by_category.get(c.category or "", ()), preferences, per_choice)
        ]
        for c in with_catalog
    ]
    products = _interleave(lists)[:max_products]
    if with_catalog and not products:
        wanted = " or ".join(noun(c.category or "") for c in with_catalog)
        messages.append(f"No {wanted} product matches your preferences; try a wider budget or fewer requirements.")
    return RecommendationResult(ordered[0], uncertain, choices, products, messages)


def _interleave(lists: Sequence[Sequence[Recommendation]]) -> list[Recommendation]:
    merged: list[Recommendation] = []
    for i in range(max((len(x) for x in lists), default=0)):
        merged += [x[i] for x in lists if i < len(x)]
    return merged


# --------------------------------------------------------------------------- helpers


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except (ValueError, AttributeError):
        return None
    return value if math.isfinite(value) else None


def _money(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def _plain_number(value: float, thousands: str = ",") -> str:
    """12000 -> "12,000", 23.8 -> "23.8", 2.0 -> "2": no trailing zeros; `thousands=""` for model numbers."""
    text = f"{int(value):,}" if float(value).is_integer() else f"{value:,.3f}".rstrip("0").rstrip(".")
    return text.replace(",", thousands)


# --------------------------------------------------------------------------- English

# Model classes and catalog categories as words in a sentence (the rest read as they are written).
NOUNS = {
    "cpu": "CPU",
    "gpu": "GPU",
    "hdd": "HDD",
    "ram": "RAM module",
    "memory": "memory kit",
    "video-card": "video card",
    "internal-hard-drive": "internal hard drive",
}
PLURAL_NOUNS = frozenset({"cables", "headphones", "speakers"})  # one product, plural word: "a pair of headphones"
# Initialisms spoken letter by letter take "an" before a vowel sound: an HDD, an SSD, a CPU; RAM is a word.
VOWEL_SOUND_LETTERS = frozenset("AEFHILMNORSX")
SPOKEN_AS_WORDS = frozenset({"RAM"})


def noun(name: str) -> str:
    """A class or category name as words: "video-card" -> "video card", "hdd" -> "HDD"."""
    return NOUNS.get(name, name.replace("-", " ").replace("_", " "))


def is_plural(name: str) -> bool:
    return name in PLURAL_NOUNS


def _article(words: str) -> str:
    first = words.split(" ", 1)[0]
    if len(first) > 1 and first.isupper() and first not in SPOKEN_AS_WORDS:
        return "an" if first[0] in VOWEL_SOUND_LETTERS else "a"
    return "an" if first[:1].lower() in "aeiou" else "a"


def with_article(name: str) -> str:
    """A class or category as a noun phrase: "a keyboard", "an HDD", "speakers" (plural: no article)."""
    words = noun(name)
    return words if is_plural(name) else f"{_article(words)} {words}"


def possessive(phrase: str) -> str:
    """ "a typical mouse" -> "a typical mouse's", "typical headphones" -> "typical headphones'"."""
    last = phrase.rsplit(" ", 1)[-1]
    return f"{phrase}'" if last in PLURAL_NOUNS else f"{phrase}'s"


# --------------------------------------------------------------------------- readable specs

# Units of the catalog's numeric specs (PCPartPicker's conventions); (category, spec) first, then spec alone.
SPEC_UNITS: dict[tuple[str | None, str], str] = {
    ("cpu", "core_clock"): "GHz",
    ("cpu", "boost_clock"): "GHz",
    ("video-card", "core_clock"): "MHz",
    ("video-card", "boost_clock"): "MHz",
    ("video-card", "memory"): "GB",
    ("internal-hard-drive", "form_factor"): '"',
    (None, "screen_size"): '"',
    (None, "refresh_rate"): "Hz",
    (None, "response_time"): "ms",
    (None, "tdp"): "W",
    (None, "wattage"): "W",
    (None, "psu"): "W",
    (None, "length"): "mm",
    (None, "external_volume"): "L",
    (None, "cache"): "MB",
    (None, "capacity"): "GB",
    (None, "max_memory"): "GB",
    (None, "total_gb"): "GB",
    (None, "first_word_latency"): "ns",
    (None, "fov"): "°",
    (None, "price_per_gb"): "USD",
}
UNITS_WITHOUT_SPACE = frozenset({'"', "°"})
SPEC_LABELS = {
    "fov": "field of view",
    "max_dpi": "max DPI",
    "tdp": "TDP",
    "psu": "power supply",
    "price_per_gb": "price per GB",
    "internal_35_bays": 'internal 3.5" bays',
    "cas_latency": "CAS latency",
    "total_gb": "total capacity",
    "os": "OS",
}
# Specs the knowledge base derives from another one that `readable_specs` already shows (memory speed and
# modules, monitor resolution); they stay in `specs` for requirements such as total_gb>=32.
DERIVED_SPECS = frozenset({"ddr", "speed_mhz", "module_count", "module_gb", "pixels"})
_PAIR = re.compile(r"\s*(\d+(?:\.\d+)?)\s*[,x]\s*(\d+(?:\.\d+)?)\s*")


def spec_label(name: str) -> str:
    """A spec name as words: "frequency_response" -> "frequency response", "fov" -> "field of view"."""
    return SPEC_LABELS.get(name, name.replace("_", " "))


def spec_text(category: str | None, name: str, value: Any) -> str:
    """One spec value as a person reads it: "20,20" frequency response -> "20–20,000 Hz", "5,6000" memory speed
    -> "DDR5-6000", "2,16" modules -> "2 × 16 GB", True -> "yes", "4k,1080p" -> "4k, 1080p", 27 screen size
    -> '27"'."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    pair = _PAIR.fullmatch(value) if isinstance(value, str) else None
    if pair:
        low, high = float(pair.group(1)), float(pair.group(2))
        if name == "frequency_response":  # the catalog's low end is in Hz, its high end in kHz
            return f"{_plain_number(low)}–{_plain_number(high * 1000)} Hz"
        if name == "speed" and category == "memory":
            return f"DDR{_plain_number(low)}-{_plain_number(high, thousands='')}"
        if name == "modules" and category == "memory":
            return f"{_plain_number(low)} × {_plain_number(high)} GB"
        if name == "resolution":
            return f"{_plain_number(low, thousands='')} × {_plain_number(high, thousands='')}"
        return f"{_plain_number(low)}, {_plain_number(high)}"
    if isinstance(value, int | float):
        if name == "configuration" and category == "speakers":  # 2 -> 2.0, 5.1 -> 5.1 (channels)
            return f"{float(value):.1f}"
        if name == "cas_latency":
            return f"CL{_plain_number(value)}"
        if name == "type" and category == "internal-hard-drive":  # a spinning drive's type is its speed
            return f"{_plain_number(value)} RPM"
        unit = SPEC_UNITS.get((category, name)) or SPEC_UNITS.get((None, name))
        text = _plain_number(value)
        if unit is None:
            return text
        return f"{text}{unit}" if unit in UNITS_WITHOUT_SPACE else f"{text} {unit}"
    text = str(value).strip()
    if "," in text and ", " not in text:  # a list the catalog wrote without spaces: "Windows,OS X"
        return ", ".join(part.strip() for part in text.split(",") if part.strip())
    return text


def readable_specs(category: str | None, specs: Mapping[str, Any]) -> dict[str, str]:
    """Every spec of a product as label -> readable text, in the catalog's order (derived duplicates left out)."""
    return {
        spec_label(name): spec_text(category, name, value)
        for name, value in specs.items()
        if name not in DERIVED_SPECS and value is not None
    }
