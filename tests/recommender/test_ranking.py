"""Ranking: what a shopper sees for a prediction and their preferences (pure functions; the last tests read real
products from the knowledge base built from the real catalog)."""

from __future__ import annotations

import pytest

from recommender import kb
from recommender.ranking import (
    PreferenceError,
    Preferences,
    ProductRow,
    SpecRequirement,
    rank_products,
    recommend,
)
from serving.contract import ClassScore
from tests.fixtures.knowledge_base import BuiltKb

MAPPING = {"mouse": "mouse", "keyboard": "keyboard", "monitor": "monitor", "microphone": None, "cables": None}


def mouse(id: int, name: str, brand: str, price: float | None, wireless: bool, value: float | None = 1.0) -> ProductRow:
    specs = {"wireless": wireless, "connection_type": "Wired, Wireless" if wireless else "Wired", "max_dpi": 16000}
    return ProductRow(id, "mouse", name, brand, price, specs, 1.0, value if price is not None else None)


MICE = [
    mouse(1, "Logitech G305", "Logitech", 29.99, True, value=1.6),
    mouse(2, "Logitech G502", "Logitech", 44.77, False, value=1.2),
    mouse(3, "Razer Viper Ultimate", "Razer", 89.99, True, value=0.9),
    mouse(4, "Logitech MX Master 3S", "Logitech", 99.99, True, value=0.8),
    mouse(5, "Razer Basilisk V3 Pro", "Razer", 159.99, True, value=0.5),
    mouse(6, "Cooler Master MM711", "Cooler Master", None, False),
]
MONITORS = [
    ProductRow(10, "monitor", "KOORUI 24E3", "KOORUI", 109.99, {"screen_size": 24, "refresh_rate": 165}, 1.0, 1.0),
    ProductRow(11, "monitor", "Asus VG27AQ", "Asus", 129.0, {"screen_size": 27, "refresh_rate": 165}, 1.1, 0.9),
    ProductRow(12, "monitor", "LG 32GN600", "LG", 149.0, {"screen_size": 31.5, "refresh_rate": 165}, 1.2, 0.8),
]
KEYBOARDS = [ProductRow(20, "keyboard", "Keychron K2", "Keychron", 79.0, {"wireless": True}, 1.0, 1.0)]
ROWS = {"mouse": MICE, "monitor": MONITORS, "keyboard": KEYBOARDS}


def names(recommendations) -> list[str]:
    return [r.product.name for r in recommendations]


def test_budget_keeps_products_priced_within_it_and_never_unpriced_ones() -> None:
    ranked = rank_products(MICE, Preferences(budget_min=30, budget_max=100), limit=10)
    assert names(ranked) == ["Logitech G502", "Razer Viper Ultimate", "Logitech MX Master 3S"]
    assert "Cooler Master MM711" not in names(rank_products(MICE, Preferences(budget_max=1e9), limit=10))


def test_without_budget_unpriced_products_come_last_and_say_so() -> None:
    ranked = rank_products(MICE, Preferences(sort="cheapest"), limit=10)
    assert ranked[-1].product.name == "Cooler Master MM711"
    assert ranked[-1].explanation == "no current price"
    assert ranked[0].explanation == "29.99 USD; the cheapest match"


def test_explanation_names_budget_preferred_brand_and_required_spec() -> None:
    preferences = Preferences.from_inputs(budget_max=100, brands=["logitech"], require=["wireless=true"])
    ranked = rank_products(MICE, preferences, limit=10)
    assert names(ranked) == ["Logitech G305", "Logitech MX Master 3S", "Razer Viper Ultimate"]
    assert ranked[2].explanation.startswith("89.99 USD, within your 100 USD budget; wireless")
    assert ranked[1].explanation.startswith(
        "99.99 USD, within your 100 USD budget; Logitech, a brand you prefer; wireless"
    )


def test_excluded_brands_are_left_out_whatever_their_case() -> None:
    ranked = rank_products(MICE, Preferences.from_inputs(exclude_brands="RAZER, cooler master"), limit=10)
    assert {r.product.brand for r in ranked} == {"Logitech"}


@pytest.mark.parametrize(
    ("requirement", "expected"),
    [
        ("wireless=false", ["Logitech G502"]),
        ("screen_size=24..28", ["KOORUI 24E3", "Asus VG27AQ"]),
        ("screen_size>=27", ["Asus VG27AQ", "LG 32GN600"]),
        ("connection=wireless", ["Logitech G305", "Razer Viper Ultimate", "Logitech MX Master 3S"]),
        ("max_dpi<=16000", ["Logitech G305", "Logitech G502", "Razer Viper Ultimate", "Logitech MX Master 3S"]),
    ],
)
def test_required_specs_filter_by_bool_range_and_text(requirement: str, expected: list[str]) -> None:
    rows = MONITORS if requirement.startswith("screen") else MICE
    ranked = rank_products(rows, Preferences.from_inputs(budget_max=150, require=[requirement]), limit=10)
    assert sorted(names(ranked)) == sorted(expected)


def test_a_product_without_the_required_spec_does_not_match() -> None:
    assert not SpecRequirement.parse("refresh_rate>=144").matches({"screen_size": 27})
    assert rank_products(KEYBOARDS, Preferences.from_inputs(require=["max_dpi>=100"]), limit=5) == []


def test_sorts_best_value_cheapest_and_premium() -> None:
    budget = {"budget_max": 200.0}
    assert names(rank_products(MICE, Preferences(**budget), 2)) == ["Logitech G305", "Logitech G502"]
    assert names(rank_products(MICE, Preferences(**budget, sort="cheapest"), 2)) == ["Logitech G305", "Logitech G502"]
    premium = rank_products(MICE, Preferences(**budget, sort="premium"), 2)
    assert names(premium) == ["Razer Basilisk V3 Pro", "Logitech MX Master 3S"]
    assert premium[0].explanation == "159.99 USD, within your 200 USD budget; the most premium match"


def test_unreadable_preferences_are_refused_with_a_message() -> None:
    with pytest.raises(PreferenceError, match="write key=value"):
        Preferences.from_inputs(require=["wireless"])
    with pytest.raises(PreferenceError, match="is not a number"):
        Preferences.from_inputs(require=["screen_size>=big"])
    with pytest.raises(PreferenceError, match="above budget_max"):
        Preferences(budget_min=100, budget_max=50)
    with pytest.raises(PreferenceError, match="sort must be one of"):
        Preferences(sort="random")  # type: ignore[arg-type]


def test_confident_prediction_recommends_from_its_category_only() -> None:
    top_k = [ClassScore("mouse", 0.91), ClassScore("keyboard", 0.05)]
    result = recommend(top_k, ROWS, Preferences(budget_max=100), MAPPING, not_sure_threshold=0.6, max_products=3)
    assert not result.uncertain and result.category == "mouse"
    assert {r.product.category for r in result.products} == {"mouse"}
    assert all(r.label is None for r in result.products)
    assert result.messages == []


def test_low_confidence_is_uncertain_with_labelled_candidates_from_the_top_categories() -> None:
    top_k = [ClassScore("mouse", 0.45), ClassScore("keyboard", 0.35), ClassScore("monitor", 0.15)]
    result = recommend(top_k, ROWS, Preferences(), MAPPING, not_sure_threshold=0.6, max_products=6)
    assert result.uncertain and result.category is None
    assert [c.class_name for c in result.choices] == ["mouse", "keyboard", "monitor"]
    assert {r.product.category for r in result.products} == {"mouse", "keyboard", "monitor"}
    labels = {r.product.category: r.label for r in result.products}
    assert labels == {
        "mouse": "possibly a mouse (45%)",
        "keyboard": "possibly a keyboard (35%)",
        "monitor": "possibly a monitor (15%)",
    }
    assert "only 45% confidence, under this model's not-sure threshold of 60%" in result.messages[0]


def test_the_same_probabilities_are_uncertain_only_under_a_higher_threshold() -> None:
    top_k = [ClassScore("mouse", 0.72), ClassScore("keyboard", 0.2)]
    lenient = recommend(top_k, ROWS, Preferences(), MAPPING, not_sure_threshold=0.7)
    strict = recommend(top_k, ROWS, Preferences(), MAPPING, not_sure_threshold=0.8)
    assert not lenient.uncertain and lenient.category == "mouse"
    assert strict.uncertain and [c.class_name for c in strict.choices] == ["mouse", "keyboard"]
    assert not recommend(top_k, ROWS, Preferences(), MAPPING, not_sure_threshold=0.72).uncertain  # at it: sure


def test_a_third_candidate_needs_the_minimum_probability() -> None:
    top_k = [ClassScore("mouse", 0.5), ClassScore("keyboard", 0.45), ClassScore("monitor", 0.05)]
    result = recommend(top_k, ROWS, Preferences(), MAPPING, not_sure_threshold=0.6, min_probability=0.1)
    assert [c.class_name for c in result.choices] == ["mouse", "keyboard"]


def test_class_without_catalog_gets_a_clear_message_not_an_error() -> None:
    top_k = [ClassScore("microphone", 0.93), ClassScore("headset", 0.04)]
    result = recommend(top_k, ROWS, Preferences(), MAPPING, not_sure_threshold=0.6)
    assert result.products == [] and result.category is None and not result.uncertain
    assert result.messages == [
        "This looks like a microphone (93%), but the knowledge base has no microphone catalog, "
        "so there is nothing to recommend for it."
    ]


def test_nothing_matching_the_preferences_says_what_to_relax() -> None:
    top_k = [ClassScore("mouse", 0.9)]
    result = recommend(top_k, ROWS, Preferences(budget_max=5), MAPPING, not_sure_threshold=0.6)
    assert result.products == []
    assert result.messages == ["No mouse product matches your preferences; try a wider budget or fewer requirements."]


def test_offers_of_the_same_product_name_are_listed_once() -> None:
    offers = [mouse(30 + i, "Logitech K120", "Logitech", 11.49 + i, False, value=2.0 - i / 10) for i in range(3)]
    ranked = rank_products(offers + MICE, Preferences(budget_max=50), limit=10)
    assert names(ranked).count("Logitech K120") == 1
    assert ranked[0].product.price == 11.49


def test_best_value_without_value_specs_is_explained_by_price_against_the_median() -> None:
    plain = ProductRow(40, "keyboard", "Logitech K120", "Logitech", 11.49, {}, quality=1.0, value_score=8.0)
    assert rank_products([plain], Preferences(), 1)[0].explanation == (
        "11.49 USD; costs 12% of a typical keyboard's price"
    )


# --------------------------------------------------------------------------- what a shopper reads (real KB rows)


def real_row(real_kb: BuiltKb, category: str, name: str) -> ProductRow:
    """The cheapest product of the real knowledge base with exactly this name."""
    engine = kb.make_engine(real_kb.url)
    try:
        with engine.connect() as conn:
            rows = [r for r in kb.search_products(conn, name, category, limit=50) if r.name == name]
    finally:
        engine.dispose()
    assert rows, f"no {category} named {name!r} in the real knowledge base"
    return min(rows, key=lambda r: (r.price is None, r.price or 0.0, r.id))


def test_specs_of_real_products_read_with_units_ranges_and_lists(real_kb: BuiltKb) -> None:
    headphones = real_row(real_kb, "headphones", "HP HyperX Cloud II")
    assert headphones.specs["frequency_response"] == "15,25"  # the catalog's: Hz, then kHz
    assert headphones.to_dict()["readable_specs"] == {
        "type": "Circumaural",
        "frequency response": "15–25,000 Hz",
        "microphone": "yes",
        "wireless": "no",
        "enclosure type": "Closed",
        "color": "Black / Red",
    }
    memory = real_row(real_kb, "memory", "Corsair Vengeance RGB 32 GB").to_dict()
    assert (memory["specs"]["speed"], memory["specs"]["ddr"]) == ("5,6000", 5)  # raw specs stay for requirements
    readable = memory["readable_specs"]
    assert (readable["speed"], readable["modules"], readable["CAS latency"]) == ("DDR5-6000", "2 × 16 GB", "CL36")
    assert readable["total capacity"] == "32 GB" and not {"ddr", "speed mhz", "module gb"} & set(readable)
    monitor = real_row(real_kb, "monitor", "KOORUI 24E3").to_dict()["readable_specs"]
    assert (monitor["screen size"], monitor["resolution"], monitor["refresh rate"]) == ('24"', "1920 × 1080", "165 Hz")
    webcam = real_row(real_kb, "webcam", "Razer Kiyo Pro Ultra").to_dict()["readable_specs"]
    assert (webcam["resolutions"], webcam["field of view"]) == ("4k, 2k, 1080p, 720p", "82°")
    speakers = real_row(real_kb, "speakers", "Creative Labs Pebble 2.0").to_dict()["readable_specs"]
    assert speakers == {"configuration": "2.0", "wattage": "4.4 W", "frequency response": "100–17,000 Hz",
                        "color": "Black"}  # fmt: skip
    drive = real_row(real_kb, "internal-hard-drive", "Western Digital Blue").to_dict()["readable_specs"]
    assert drive["capacity"].endswith(" GB") and drive["cache"].endswith(" MB")


def test_explanations_of_real_products_use_english_possessives_and_units(real_kb: BuiltKb) -> None:
    headphones = real_row(real_kb, "headphones", "HP HyperX Cloud II")
    assert headphones.quality == 1.0  # no value specs: explained by its price against the category's median
    why = rank_products([headphones], Preferences.from_inputs(require=["microphone=true"]), 1)
    assert why[0].explanation.startswith("70.98 USD; microphone; costs ")
    assert why[0].explanation.endswith("of typical headphones' price") and "headphones's" not in why[0].explanation
    monitor = real_row(real_kb, "monitor", "KOORUI 24E3")
    explained = rank_products([monitor], Preferences.from_inputs(require=["screen_size>=24"]), 1)[0].explanation
    assert '; screen size 24"; ' in explained and "the value for money of a typical monitor" in explained
    speakers = real_row(real_kb, "speakers", "Creative Labs Pebble 2.0")
    assert rank_products([speakers], Preferences(), 1)[0].explanation.endswith(
        "the value for money of typical speakers"
    )


def test_labels_and_messages_use_articles_and_plurals_a_person_would() -> None:
    mapping = {"hdd": "internal-hard-drive", "speakers": "speakers", "ram": "memory", "cables": None}
    uncertain = recommend(
        [ClassScore("hdd", 0.4), ClassScore("speakers", 0.3), ClassScore("ram", 0.2)], {}, Preferences(), mapping, 0.6
    )
    assert [c.label for c in uncertain.choices] == [
        "possibly an HDD (40%)",
        "possibly speakers (30%)",
        "possibly a RAM module (20%)",
    ]
    assert uncertain.messages[0].startswith("Not sure what this is: the best guess, HDD, has only 40% confidence")
    assert uncertain.messages[-1] == (
        "No internal hard drive or speakers or memory kit product matches your preferences; "
        "try a wider budget or fewer requirements."
    )
    sure = recommend([ClassScore("speakers", 0.9)], {}, Preferences(), mapping, 0.6)
    assert sure.choices[0].label == "speakers (90%)"
    cables = recommend([ClassScore("cables", 0.93)], {}, Preferences(), mapping, 0.6)
    assert cables.messages == [
        "This looks like cables (93%), but the knowledge base has no cables catalog, so there is nothing to "
        "recommend for it."
    ]
