"""Knowledge-base reads of one answer, the app's own cost after the model call: a ranking the cache lacks (a budget
not asked before) against reading and ranking every candidate row, in the same run.

    python -m bench.kb_reads [--db-url sqlite:///artifacts/kb/productlens.db] [--answers 300] [--rounds 5]

Each round answers `--answers` predictions, each with a `budget_max` not asked before, three ways on the same
KB, the order alternating between rounds: "full read" (what the app did before: every candidate row read, its
specs JSON decoded and ranked), "miss" (`Recommender.answer` now: the candidates' ids, then only the products
not read before in this KB build) and "hit" (the same preferences again: from the ranking cache). Predictions
are certain (one category) or unsure (three categories, as the stand-in model answers). Milliseconds per answer
are the median of the rounds; no model server is called.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common.io import atomic_write_json
from recommender import kb
from recommender.client import Prediction, PredictionClient
from recommender.params import load_recommender_params
from recommender.ranking import Preferences, ProductRow, rank_products
from recommender.service import Recommender, Timings
from serving.contract import ClassScore

REPO_ROOT = Path(__file__).resolve().parent.parent
PREDICTIONS = {
    "certain": [("keyboard", 0.95), ("mouse", 0.03), ("headset", 0.01)],
    "unsure": [("keyboard", 0.45), ("mouse", 0.35), ("headset", 0.10)],
}


def prediction(scores: list[tuple[str, float]]) -> Prediction:
    top_k = [ClassScore(class_name=c, probability=p) for c, p in scores]
    return Prediction(top_k=top_k, model_name="productlens", model_version=1, not_sure_threshold=0.7)


class FullReadRecommender(Recommender):
    """The app's use case as it read the KB before ids came first: every candidate row read, decoded and ranked,
    nothing kept (its answers are otherwise built as the app builds them)."""

    def ranked_rows(
        self, categories: list[str], preferences: Preferences, timings: Timings
    ) -> dict[str, list[ProductRow]]:
        pool, limit = self.params.candidate_pool, self.params.max_products
        with self.engine.connect() as conn:
            rows = {c: kb.candidate_rows(conn, c, preferences, pool) for c in categories}
        return {c: [r.product for r in rank_products(found, preferences, limit)] for c, found in rows.items()}


def timed_ms(answers: int, one: Callable[[], Any]) -> float:
    start = time.perf_counter()
    for _ in range(answers):
        one()
    return (time.perf_counter() - start) / answers * 1000


def new_budgets() -> Iterator[Preferences]:
    """A budget_max not asked before each time, spread over $50-$1,000 (rankings share some products, as users'
    budgets would)."""
    for n in itertools.count():
        yield Preferences(budget_max=round(50 + (n * 7.31) % 950 + n * 1e-4, 4))


def answer_times(
    service: Recommender, before: Recommender, asked: Prediction, answers: int, rounds: int
) -> dict[str, float]:
    """Median ms per answer of each way over `rounds` rounds (full read and miss in alternating order)."""
    budgets = new_budgets()
    ways: dict[str, Callable[[], Any]] = {
        "full read": lambda: before.answer(asked, next(budgets), Timings()),
        "miss": lambda: service.answer(asked, next(budgets), Timings()),
        "hit": lambda: service.answer(asked, Preferences(budget_max=300), Timings()),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_number in range(rounds):
        order = ["full read", "miss"] if round_number % 2 == 0 else ["miss", "full read"]
        for name in [*order, "hit"]:
            times[name].append(timed_ms(answers, ways[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def run(db_url: str, answers: int, rounds: int) -> dict[str, dict[str, float]]:
    params = load_recommender_params(REPO_ROOT / "params.yaml")
    engine = kb.make_engine(db_url)
    service = Recommender(engine, PredictionClient("127.0.0.1:9"), params)
    before = FullReadRecommender(engine, PredictionClient("127.0.0.1:9"), params)
    try:
        for warm in (service, before):  # the class mapping and category facts are read once
            warm.answer(prediction(PREDICTIONS["certain"]), Preferences(), Timings())
        return {
            kind: answer_times(service, before, prediction(scores), answers, rounds)
            for kind, scores in PREDICTIONS.items()
        }
    finally:
        before.client.close()
        service.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-url", default=kb.sqlite_url(REPO_ROOT / kb.DEFAULT_DB_PATH))
    parser.add_argument("--answers", type=int, default=300, help="answers per way and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = run(args.db_url, args.answers, args.rounds)
    print("| prediction | full read ms | miss ms | hit ms | miss / full read |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, row in figures.items():
        ratio = row["miss"] / row["full read"]
        print(f"| {kind} | {row['full read']:.2f} | {row['miss']:.2f} | {row['hit']:.2f} | {ratio:.2f} |")
    if args.json:
        atomic_write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
