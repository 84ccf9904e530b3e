"""build_kb: every catalog row becomes a product or is counted as skipped, with the reason; value for money."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from recommender import build_kb, kb
from recommender.build_kb import quality_scores, value_scores
from recommender.ranking import Preferences, eligible, rank_products
from tests.conftest import REPO_ROOT
from tests.fixtures.catalog import SMALL_CATALOG_SKIPPED, write_catalog, write_params
from tests.fixtures.knowledge_base import BuiltKb

# Dataset v1 (data.dvc md5 fab84bd3...): rows per catalog file, and the exact duplicates among them.
V1_ROWS = {
    "case": 6626, "cpu": 1413, "headphones": 2946, "internal-hard-drive": 6461, "keyboard": 4310,
    "memory": 13553, "monitor": 5074, "motherboard": 4973, "mouse": 2806, "speakers": 302,
    "video-card": 6636, "webcam": 78,
}  # fmt: skip
V1_DUPLICATES = {
    "case": 179, "cpu": 233, "headphones": 37, "internal-hard-drive": 499, "keyboard": 489, "memory": 957,
    "monitor": 107, "motherboard": 0, "mouse": 40, "speakers": 0, "video-card": 73, "webcam": 4,
}  # fmt: skip


def test_real_catalog_loads_every_row_or_counts_it_skipped_with_reason(real_kb: BuiltKb) -> None:
    db = real_kb.path
    engine = kb.make_engine(kb.sqlite_url(db))
    with engine.connect() as conn:
        record = kb.kb_info(conn)  # the build record `productlens kb info` reads
    engine.dispose()
    categories = record["categories"]
    assert {name: c["rows"] for name, c in categories.items()} == V1_ROWS
    for name, counts in categories.items():
        assert counts["loaded"] + counts["skipped"] == counts["rows"], name
        assert counts["skipped_by_reason"] == (
            {build_kb.DUPLICATE_REASON: V1_DUPLICATES[name]} if V1_DUPLICATES[name] else {}
        )
    assert record["products"] == sum(V1_ROWS.values()) - sum(V1_DUPLICATES.values()) == 52560
    # The DVC metrics: three totals.
    assert real_kb.metrics == {"products": 52560, "skipped": sum(V1_DUPLICATES.values()), "rows_read": 55178}
    with sqlite3.connect(db) as conn:
        per_category = dict(conn.execute("SELECT category, count(*) FROM products GROUP BY category"))
        unpriced_within = conn.execute(
            "SELECT count(*) FROM products WHERE price IS NOT NULL AND price <= 0"
        ).fetchone()
    assert per_category == {name: c["loaded"] for name, c in categories.items()}
    assert unpriced_within == (0,)


def test_real_catalog_search_brands_and_class_mapping(real_kb: BuiltKb) -> None:
    db = real_kb.path
    engine = kb.make_engine(kb.sqlite_url(db))
    with engine.connect() as conn:
        cards = kb.search_products(conn, "rtx 4070", limit=20)
        drives = kb.search_products(conn, "western digital", category="internal-hard-drive", limit=5)
        mapping = kb.class_categories(conn)
        facts = kb.category_facts(conn)
    engine.dispose()
    assert cards and all(c.category == "video-card" for c in cards)
    assert all("4070" in c.name or "4070" in str(c.specs.get("chipset")) for c in cards)
    assert drives and {d.brand for d in drives} == {"Western Digital"}
    assert mapping["gpu"] == "video-card" and mapping["ram"] == "memory" and mapping["headset"] == "headphones"
    assert mapping["cables"] is None and mapping["microphone"] is None
    assert facts["mouse"].products == V1_ROWS["mouse"] - V1_DUPLICATES["mouse"]
    assert "Logitech" in facts["mouse"].top_brands
    assert facts["mouse"].min_price is not None and facts["mouse"].min_price > 0


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog")
    params = write_params(tmp_path / "params.yaml", REPO_ROOT / "params.yaml")
    db, report_path = tmp_path / "kb" / "productlens.db", tmp_path / "report" / "build_kb.json"
    assert build_kb.main(["--catalog", str(catalog), "--params", str(params), "--output", str(db),
                          "--metrics", str(tmp_path / "metrics.json"), "--report", str(report_path)]) == 0  # fmt: skip
    report = json.loads(report_path.read_text())
    mouse = report["categories"]["mouse"]
    assert {name: c["skipped"] for name, c in report["categories"].items()} == SMALL_CATALOG_SKIPPED
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "products": report["products"], "skipped": sum(SMALL_CATALOG_SKIPPED.values()), "rows_read": report["rows_read"]
    }  # fmt: skip
    assert mouse["skipped_by_reason"] == {
        build_kb.DUPLICATE_REASON: 1,
        "product name is empty": 1,
        "price is not > 0": 1,
        "price is neither empty nor a number": 1,
    }
    assert mouse["skipped_examples"]["price is not > 0"] == ["mouse.csv:10"]
    engine = kb.make_engine(kb.sqlite_url(db))
    with engine.connect() as conn:
        mice = {p.name: p for p in kb.list_products(conn, "mouse", limit=50)}
        monitors = {p.name: p for p in kb.list_products(conn, "monitor", limit=50)}
    engine.dispose()
    assert mice["Cooler Master MM711"].brand == "Cooler Master"
    assert mice["Cooler Master MM711"].price is None
    assert mice["Logitech G305 LIGHTSPEED"].specs["wireless"] is True
    assert mice["Logitech G502 Hero"].specs["wireless"] is False
    assert mice["Logitech MX Master 3S"].specs["wireless"] is True  # Bluetooth counts as wireless
    assert monitors["Asus TUF Gaming VG27AQ"].specs["resolution"] == "2560x1440"
    assert monitors["Asus TUF Gaming VG27AQ"].specs["pixels"] == 2560 * 1440


def test_the_build_record_has_a_digest_of_its_rows_that_changes_with_them_and_only_with_them(tmp_path: Path) -> None:
    """On a database server a rebuild is noticed by its kb_info (the app's ranking cache is dropped when it changes):
    params that change the rows of the same catalog must change the record, and a rebuild of the same must not."""
    catalog = write_catalog(tmp_path / "catalog")
    params = write_params(tmp_path / "params.yaml", REPO_ROOT / "params.yaml")
    remapped = write_params(tmp_path / "remapped.yaml", REPO_ROOT / "params.yaml", {"mouse": "mouse", "gpu": None})

    def record(params_path: Path, name: str) -> dict:
        db = tmp_path / name / "productlens.db"
        assert build_kb.main(["--catalog", str(catalog), "--params", str(params_path), "--output", str(db),
                              "--metrics", str(tmp_path / name / "metrics.json")]) == 0  # fmt: skip
        engine = kb.make_engine(kb.sqlite_url(db))
        with engine.connect() as conn:
            info = kb.kb_info(conn)
        engine.dispose()
        return info

    first, again, other = record(params, "first"), record(params, "again"), record(remapped, "other")
    assert len(first["content_sha256"]) == 64 and first == again
    assert other["catalog_sha256"] == first["catalog_sha256"]
    assert other["content_sha256"] != first["content_sha256"]


def test_missing_required_column_fails_the_build(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog", {"mouse.csv": "name,max_dpi\nLogitech G305,12000\n"})
    params = write_params(tmp_path / "params.yaml", REPO_ROOT / "params.yaml", {"mouse": "mouse"})
    db = tmp_path / "kb.db"
    with pytest.raises(ValueError, match="required column 'price' is missing"):
        build_kb.main(["--catalog", str(catalog), "--params", str(params), "--output", str(db),
                       "--metrics", str(tmp_path / "m.json")])  # fmt: skip
    assert not db.exists()
    assert not list(tmp_path.glob(".kb.db.*"))  # no half-built file left behind


def test_value_for_money_is_spec_quality_per_dollar_against_the_category_median() -> None:
    specs = [{"memory": 8, "boost_clock": 2000}, {"memory": 16, "boost_clock": 2000}, {"memory": 12}, {}]
    quality = quality_scores(specs, ["memory", "boost_clock"])
    assert quality[0] < quality[2] < quality[1]
    assert quality[3] == 1.0  # no value specs at all: typical
    values = value_scores([100.0, 200.0, None, 150.0], [1.0, 1.0, 1.0, 1.0])
    assert values == [1.5, 0.75, None, 1.0]


def test_mapping_to_a_category_without_catalog_fails_the_build(tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog")
    params = write_params(tmp_path / "params.yaml", REPO_ROOT / "params.yaml", {"mouse": "mouse", "cpu": "cpu"})
    with pytest.raises(ValueError, match="no catalog file: \\['cpu'\\]"):
        build_kb.main(["--catalog", str(catalog), "--params", str(params), "--output", str(tmp_path / "kb.db"),
                       "--metrics", str(tmp_path / "m.json")])  # fmt: skip


@pytest.mark.parametrize(
    ("category", "preferences"),
    [
        ("mouse", Preferences.from_inputs(budget_max=100, brands=["Logitech"], require=["wireless=true"])),
        ("mouse", Preferences.from_inputs(require=["wireless=false", "max_dpi>=16000"], sort="cheapest")),
        ("keyboard", Preferences.from_inputs(require=["connection=bluetooth"], exclude_brands=["Logitech"])),
        ("monitor", Preferences.from_inputs(budget_min=150, budget_max=400, require=["screen_size=27..32"])),
        ("memory", Preferences.from_inputs(require=["total_gb=32", "ddr=5"], sort="premium")),
        ("headphones", Preferences.from_inputs(require=["wireless=true", "microphone=true"])),
    ],
)
def test_database_candidates_agree_with_the_ranking_rules(
    real_kb: BuiltKb, category: str, preferences: Preferences
) -> None:
    """The SQL pre-filter (budget, brands, required specs) keeps exactly the rows the ranking accepts."""
    db = real_kb.path
    engine = kb.make_engine(kb.sqlite_url(db))
    with engine.connect() as conn:
        everything = kb.candidate_rows(conn, category, Preferences(), pool=100_000)
        filtered = kb.candidate_rows(conn, category, preferences, pool=100_000)
        pool = kb.candidate_rows(conn, category, preferences, pool=60)
    engine.dispose()
    expected = [row for row in everything if eligible(row, preferences)]
    assert expected, "the case should match some products"
    assert sorted(r.id for r in filtered) == sorted(r.id for r in expected)
    # The database's first rows are the ranking's first rows: ranking the pool or everything gives the same top 10.
    assert [r.product.id for r in rank_products(pool, preferences, limit=10)] == [
        r.product.id for r in rank_products(filtered, preferences, limit=10)
    ]
