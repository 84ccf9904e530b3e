"""build_kb step: load the product catalog CSVs into the knowledge base (SQLite file by default).

Every catalog row either becomes a product or is counted as skipped with its reason: the
validate step's catalog expectations (common.catalog: empty name, price not a number or not > 0)
and exact duplicate rows. Brands come from product names; specs are typed (bool, number, text) and
a few are derived so that preferences work across categories (wireless, total_gb, pixels, ...).
Each product gets its value for money against its category here, once, for the ranking to sort by.

    python -m recommender.build_kb --catalog data/catalog --output artifacts/kb/productlens.db --metrics ... \
        --report ...

The build record (rows, products and skips per category, skip reasons with examples) is stored in the
KB's kb_info table, where `productlens kb info` reads it, and written to `--report`; `--metrics` gets
three totals for DVC.
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import hashlib
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine, insert
from sqlalchemy.exc import OperationalError

from common.catalog import validate_catalog
from common.cli import run_main
from common.io import atomic_write_json
from common.params import build, load_params, section
from recommender.brands import BrandExtractor, clean_name
from recommender.kb_schema import (
    Category,
    ClassCategory,
    KbInfo,
    Product,
    create_name_search,
    create_schema,
    make_engine,
    sqlite_url,
)
from recommender.params import RecommenderParams

log = logging.getLogger("recommender.build_kb")

DUPLICATE_REASON = "exact duplicate of an earlier row"
# Specs whose text is searched with the product name ("rtx 4070" finds cards named "Sapphire PULSE").
KEYWORD_SPECS = ("chipset", "microarchitecture", "socket", "type", "interface", "form_factor", "panel_type")
TOP_BRANDS = 5
INSERT_BATCH = 5000
# Value specs are compared with the category median; clipping keeps one absurd spec from dominating.
QUALITY_CLIP = (0.25, 4.0)
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")
_PAIR = re.compile(r"\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*")


@dataclass
class TableReport:
    """What happened to one catalog file."""

    category: str
    rows: int
    loaded: int = 0
    priced: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "loaded": self.loaded,
            "priced": self.priced,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "skipped_examples": self.skipped_examples,
        }


@dataclass
class BuildReport:
    tables: dict[str, TableReport]
    catalog_sha256: str
    # A digest of every row written (products with their ids, categories, the class mapping): what the app
    # compares to notice a rebuild on a database server, where params or build code can change the rows of the
    # same catalog.
    content_sha256: str = ""

    @property
    def loaded(self) -> int:
        return sum(t.loaded for t in self.tables.values())

    @property
    def skipped(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for table in self.tables.values():
            total.update(table.skipped)
        return total

    @property
    def rows_read(self) -> int:
        return sum(t.rows for t in self.tables.values())

    def headline_metrics(self) -> dict[str, Any]:
        """The DVC metrics of a build: products loaded, rows skipped, rows read."""
        return {"products": self.loaded, "skipped": sum(self.skipped.values()), "rows_read": self.rows_read}

    def to_dict(self) -> dict[str, Any]:
        """The whole build record: totals, skips by reason, the catalog's digest and each category's counts."""
        return {
            "rows_read": self.rows_read,
            "products": self.loaded,
            "skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "catalog_sha256": self.catalog_sha256,
            "content_sha256": self.content_sha256,
            "categories": {name: t.to_dict() for name, t in sorted(self.tables.items())},
        }


# --------------------------------------------------------------------------- specs


def typed_value(text: str) -> bool | int | float | str:
    """A catalog cell as bool, int, float or (stripped) text."""
    value = text.strip()
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    return value


def _pair(value: Any) -> tuple[float, float] | None:
    match = _PAIR.fullmatch(str(value)) if isinstance(value, str) else None
    return (float(match.group(1)), float(match.group(2))) if match else None


def _whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def product_specs(category: str, cells: dict[str, Any]) -> dict[str, Any]:
    """Typed specs of one row plus derived ones that make preferences comparable across categories."""
    specs = {key: typed_value(str(value)) for key, value in cells.items() if value is not None and not pd.isna(value)}
    specs = {key: value for key, value in specs.items() if value != ""}
    connection = specs.get("connection_type")
    if category in ("mouse", "keyboard") and isinstance(connection, str):
        specs["wireless"] = "wireless" in connection.lower() or "bluetooth" in connection.lower()
    if category == "memory":
        if speed := _pair(specs.get("speed")):  # "5,6000" = DDR5-6000
            specs["ddr"], specs["speed_mhz"] = _whole(speed[0]), _whole(speed[1])
        if modules := _pair(specs.get("modules")):  # "2,16" = 2 x 16 GB
            specs["module_count"], specs["module_gb"] = _whole(modules[0]), _whole(modules[1])
            specs["total_gb"] = _whole(modules[0] * modules[1])
    if category == "monitor" and (resolution := _pair(specs.get("resolution"))):  # "1920,1080"
        specs["resolution"] = f"{_whole(resolution[0])}x{_whole(resolution[1])}"
        specs["pixels"] = _whole(resolution[0] * resolution[1])
    return specs


# --------------------------------------------------------------------------- value for money


def quality_scores(specs: Sequence[Mapping[str, Any]], value_specs: Sequence[str]) -> list[float]:
    """Per product: geometric mean over `value_specs` of spec / category median, clipped (1.0 = typical).

    A spec a product lacks counts as typical, so missing data neither helps nor hurts.
    """
    medians: dict[str, float] = {}
    for name in value_specs:
        values = [float(s[name]) for s in specs if _positive_number(s.get(name))]
        if values:
            medians[name] = statistics.median(values)
    scores = []
    for spec in specs:
        logs = [
            math.log(min(max(float(spec[name]) / median, QUALITY_CLIP[0]), QUALITY_CLIP[1]))
            for name, median in medians.items()
            if _positive_number(spec.get(name))
        ]
        scores.append(math.exp(sum(logs) / len(medians)) if medians and logs else 1.0)
    return scores


def value_scores(prices: Sequence[float | None], qualities: Sequence[float]) -> list[float | None]:
    """Quality per dollar relative to the category median price (1.0 = a typical product at a typical price)."""
    priced = [p for p in prices if p is not None and p > 0]
    if not priced:
        return [None] * len(prices)
    median = statistics.median(priced)
    return [None if p is None or p <= 0 else q * median / p for p, q in zip(prices, qualities, strict=True)]


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# --------------------------------------------------------------------------- build


def read_catalog(path: Path) -> pd.DataFrame:
    # Strings everywhere, as validate reads them: typing happens per cell, after validation.
    return pd.read_csv(path, dtype="string", keep_default_na=True)


def content_digest(
    categories: list[dict[str, Any]], rows_by_category: dict[str, list[dict[str, Any]]], class_rows: list[dict]
) -> str:
    """sha256 of the rows a build writes, in order: the same catalog, params and build code give the same digest."""
    digest = hashlib.sha256()
    for part in (categories, *rows_by_category.values(), class_rows):
        for row in part:
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
            digest.update(b"\n")
    return digest.hexdigest()


def catalog_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_rows(
    frame: pd.DataFrame, category: str, file_name: str, required_columns: list[str], report: TableReport
) -> list[dict[str, Any]]:
    """Rows of one catalog file that pass the catalog expectations and are not duplicates."""
    validation = validate_catalog(frame, required_columns, table=f"catalog/{file_name}")
    table_failures = [o.sentence() for o in validation.outcomes if not o.success and o.unexpected_count == 0]
    if table_failures:
        # A missing required column is not a row problem: the validate step must have failed on it.
        raise ValueError(f"catalog/{file_name} cannot be loaded: {'; '.join(table_failures)}")
    duplicates = frame.duplicated(keep="first")
    spec_columns = [c for c in frame.columns if c not in ("name", "price")]
    rows = []
    for index, record in enumerate(frame.to_dict("records")):
        reasons = validation.row_reasons.get(index) or ([DUPLICATE_REASON] if duplicates.iat[index] else [])
        source = f"{file_name}:{index + 2}"  # +2: header line, 1-based
        if reasons:
            reason = "; ".join(reasons)
            report.skipped[reason] += 1
            examples = report.skipped_examples.setdefault(reason, [])
            if len(examples) < 3:
                examples.append(source)
            continue
        price = record["price"]
        specs = product_specs(category, {c: record[c] for c in spec_columns})
        keywords = [category.replace("-", " ")] + [str(specs[k]) for k in KEYWORD_SPECS if k in specs]
        rows.append(
            {
                "category": category,
                "name": clean_name(str(record["name"])),
                "price": None if price is None or pd.isna(price) else float(price),
                "specs": specs,
                "keywords": " ".join(keywords),
                "source": source,
            }
        )
    return rows


def category_record(category: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    prices = sorted(r["price"] for r in rows if r["price"] is not None)
    brands = Counter(r["brand"] for r in rows)
    return {
        "name": category,
        "products": len(rows),
        "priced": len(prices),
        "min_price": prices[0] if prices else None,
        "median_price": statistics.median(prices) if prices else None,
        "max_price": prices[-1] if prices else None,
        "top_brands": [brand for brand, _ in brands.most_common(TOP_BRANDS)],
        "spec_names": sorted({key for r in rows for key in r["specs"]}),
    }


def build_kb(catalog_dir: Path, params: RecommenderParams, required_columns: list[str], engine: Engine) -> BuildReport:
    """Load every `<category>.csv` under `catalog_dir` into the database behind `engine` (replacing it)."""
    paths = sorted(Path(catalog_dir).glob("*.csv"))
    if not paths:
        raise FileNotFoundError(f"no catalog CSVs under {catalog_dir}")
    tables: dict[str, TableReport] = {}
    rows_by_category: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        category = path.stem
        frame = read_catalog(path)
        report = tables[category] = TableReport(category, rows=len(frame))
        rows_by_category[category] = load_rows(frame, category, path.name, required_columns, report)
        log.info("%s: %d rows, %d kept", path.name, len(frame), len(rows_by_category[category]))

    extractor = BrandExtractor.fitted(
        params.multi_word_brands, (r["name"] for rows in rows_by_category.values() for r in rows)
    )
    categories = []
    for category, rows in rows_by_category.items():
        qualities = quality_scores([r["specs"] for r in rows], params.value_specs.get(category, []))
        values = value_scores([r["price"] for r in rows], qualities)
        for row, quality, value in zip(rows, qualities, values, strict=True):
            row.update(brand=extractor.brand(row["name"]), quality=quality, value_score=value)
        categories.append(category_record(category, rows))
        tables[category].loaded = len(rows)
        tables[category].priced = sum(r["price"] is not None for r in rows)

    unknown = sorted({c for c in params.class_to_category.values() if c} - set(rows_by_category))
    if unknown:
        raise ValueError(f"params recommender.class_to_category names categories with no catalog file: {unknown}")

    next_id = 1
    for rows in rows_by_category.values():
        for row in rows:
            row["id"] = next_id
            next_id += 1
    class_rows = [{"class_name": k, "category": v} for k, v in sorted(params.class_to_category.items())]
    report = BuildReport(tables, catalog_digest(paths), content_digest(categories, rows_by_category, class_rows))
    create_schema(engine)
    with engine.begin() as conn:
        conn.execute(insert(Category), categories)
        for rows in rows_by_category.values():
            for start in range(0, len(rows), INSERT_BATCH):
                conn.execute(insert(Product), rows[start : start + INSERT_BATCH])
        conn.execute(insert(ClassCategory), class_rows)
        conn.execute(insert(KbInfo), [{"key": k, "value": v} for k, v in report.to_dict().items()])
        create_name_search(conn)
    return report


def build_sqlite(
    catalog_dir: Path, params: RecommenderParams, required_columns: list[str], output: Path
) -> BuildReport:
    """Build into a temp file beside `output` and rename it over `output` only when complete."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    engine = make_engine(sqlite_url(Path(tmp_name)))
    try:
        report = build_kb(catalog_dir, params, required_columns, engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
        engine.dispose()
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the app may run as another user
        os.replace(tmp_name, output)
    except BaseException:
        engine.dispose()
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return report


def load_params_for_kb(params_path: Path) -> tuple[RecommenderParams, list[str]]:
    raw = load_params(params_path)
    params = build(RecommenderParams, section(raw, "recommender"), f"{params_path}:recommender")
    required = list(section(raw, "validate")["catalog_required_columns"])
    return params, required


def summary(report: BuildReport) -> str:
    lines = [f"Knowledge base: {report.loaded} products from {len(report.tables)} categories"]
    for name, table in sorted(report.tables.items()):
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(table.skipped.items())) or "none"
        lines.append(f"  {name:<22} {table.loaded:>6} products ({table.priced} priced); skipped: {skipped}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recommender.build_kb", description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, required=True, help="folder with <category>.csv files")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--output", type=Path, help="SQLite file to (re)build, e.g. artifacts/kb/productlens.db")
    parser.add_argument("--db-url", help="load into this database instead (e.g. postgresql+psycopg://...)")
    parser.add_argument("--metrics", type=Path, required=True, help="output: products, skipped and read rows (DVC)")
    parser.add_argument(
        "--report", type=Path, default=None, help="output: the build record (per category, skip reasons, examples)"
    )
    args = parser.parse_args(argv)
    if bool(args.output) == bool(args.db_url):
        parser.error("give exactly one of --output (SQLite file) and --db-url")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    args = parse_args(argv)
    params, required = load_params_for_kb(args.params)
    if args.output:
        report = build_sqlite(args.catalog, params, required, args.output)
    else:
        engine = make_engine(args.db_url)
        try:
            report = build_kb(args.catalog, params, required, engine)
        finally:
            engine.dispose()
    if args.report is not None:
        atomic_write_json(args.report, report.to_dict())
    atomic_write_json(args.metrics, report.headline_metrics())
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, expected=(OperationalError,)))
