"""The recommender's reads of the knowledge base: a ranking the cache lacks (a new budget) gives the products a
full read would, and reads each product's row once per knowledge-base build (the real catalog's KB)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from recommender import kb
from recommender.client import PredictionClient
from recommender.params import load_recommender_params
from recommender.ranking import Preferences, ProductRow, rank_products
from recommender.service import Recommender, Timings
from tests.conftest import REPO_ROOT
from tests.fixtures.knowledge_base import BuiltKb

PREFERENCES = [
    Preferences(),
    Preferences(budget_max=300),
    Preferences(budget_min=50, budget_max=120, sort="cheapest"),
    Preferences.from_inputs(budget_max=400, brands="Logitech", exclude_brands="Razer", sort="premium"),
]
REQUIRED = {"mouse": "wireless=true", "keyboard": "wireless=true", "monitor": "screen_size=25..32"}


@pytest.fixture()
def recommender(real_kb: BuiltKb) -> Iterator[Recommender]:
    """The app's use case on the real KB; no model call is made (the address is never dialled)."""
    params = load_recommender_params(REPO_ROOT / "params.yaml")
    service = Recommender(kb.make_engine(real_kb.url), PredictionClient("127.0.0.1:9"), params)
    yield service
    service.close()


def full_read(service: Recommender, category: str, preferences: Preferences) -> list[ProductRow]:
    """What ranking every candidate row read from the KB gives (no cache)."""
    with service.engine.connect() as conn:
        rows = kb.candidate_rows(conn, category, preferences, service.params.candidate_pool)
    return [r.product for r in rank_products(rows, preferences, service.params.max_products)]


@pytest.mark.parametrize("category", ["mouse", "keyboard", "monitor"])
def test_a_ranking_read_through_the_cache_gives_the_products_of_a_full_read(
    recommender: Recommender, category: str
) -> None:
    for preferences in [*PREFERENCES, Preferences.from_inputs(require=[REQUIRED[category]])]:
        ranked = recommender.ranked_rows([category], preferences, Timings())[category]
        assert ranked == full_read(recommender, category, preferences), preferences
        assert ranked, f"no {category} for {preferences}: the comparison shows nothing"


def test_a_new_budget_fetches_only_products_not_read_before_until_the_kb_is_rebuilt(
    recommender: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched: list[list[int]] = []
    fetch = kb.products_by_id

    def counting(conn: object, ids: list[int]) -> dict[int, ProductRow]:
        fetched.append(list(ids))
        return fetch(conn, ids)

    monkeypatch.setattr(kb, "products_by_id", counting)
    first = recommender.ranked_rows(["keyboard"], Preferences(budget_max=300), Timings())["keyboard"]
    assert len(fetched) == 1 and len(fetched[0]) >= len(first)

    # A budget one cent lower ranks mostly the same keyboards: none of them is fetched again.
    second = recommender.ranked_rows(["keyboard"], Preferences(budget_max=299.99), Timings())["keyboard"]
    again = [i for ids in fetched[1:] for i in ids]
    assert not set(again) & set(fetched[0])
    assert {r.id for r in second} & {r.id for r in first}
    assert second == full_read(recommender, "keyboard", Preferences(budget_max=299.99))

    _, cache = recommender._kb()
    cache.clear()  # what refresh_kb does when the KB was rebuilt
    fetched.clear()
    recommender.ranked_rows(["keyboard"], Preferences(budget_max=300), Timings())
    assert len(fetched) == 1 and {r.id for r in first} <= set(fetched[0])


def test_products_by_id_leaves_out_ids_no_product_has(recommender: Recommender) -> None:
    with recommender.engine.connect() as conn:
        some = kb.candidate_ids(conn, "mouse", Preferences(), 3)
        found = kb.products_by_id(conn, [*some, 0, -1, 2**40])
    assert sorted(found) == sorted(some)
    assert all(found[i].category == "mouse" for i in some)
