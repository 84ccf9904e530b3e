"""The catalog expectations: what a catalog CSV row needs (a name, a price that is empty or > 0).

validate gates the catalog with them; the knowledge-base builder runs them per file to skip the rows
they flag, with the same reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

import great_expectations as gx
import pandas as pd

from common.expectations import Check, CheckOutcome, run_checks


def catalog_checks(table: str, frame: pd.DataFrame, required_columns: list[str]) -> list[Check]:
    """Expectations for one catalog CSV; column-value checks only for columns that exist."""
    E = gx.expectations
    checks = [
        Check(table, E.ExpectColumnToExist(column=column), f"required column '{column}' is missing")
        for column in required_columns
    ]
    if "name" in frame.columns:
        checks.append(
            Check(
                table,
                E.ExpectColumnValuesToBeInSet(column="name_is_blank", value_set=[False]),
                "product name is empty",
                "row",
            )
        )
    if "price" in frame.columns:
        checks += [
            Check(
                table,
                E.ExpectColumnValuesToBeInSet(column="price_parses", value_set=[True]),
                "price is neither empty nor a number",
                "row",
            ),
            Check(
                table,
                E.ExpectColumnValuesToBeBetween(column="price_value", min_value=0, strict_min=True),
                "price is not > 0",
                "row",
            ),
        ]
    return checks


def with_catalog_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the derived columns the catalog expectations read (blank names, parsed prices)."""
    frame = frame.copy()
    frame["row"] = [f"row {i + 2}" for i in range(len(frame))]  # +2: header line, 1-based
    if "name" in frame.columns:
        frame["name_is_blank"] = frame["name"].isna() | (frame["name"].astype(str).str.strip() == "")
    if "price" in frame.columns:
        numeric = pd.to_numeric(frame["price"], errors="coerce")
        frame["price_parses"] = frame["price"].isna() | numeric.notna()
        frame["price_value"] = numeric
    return frame


@dataclass
class CatalogReport:
    """Catalog validation for one frame: failed checks, and the reasons per offending row index."""

    outcomes: list[CheckOutcome]
    row_reasons: dict[int, list[str]]


def validate_catalog(frame: pd.DataFrame, required_columns: list[str], table: str = "catalog") -> CatalogReport:
    """Run the catalog expectations on one frame: every check's outcome, and each offending row's failed checks."""
    prepared = with_catalog_columns(frame)
    checks = catalog_checks(table, prepared, required_columns)
    report, indices = run_checks({table: prepared}, checks)
    row_reasons: dict[int, list[str]] = {}
    for outcome, unexpected in zip(report.outcomes, indices, strict=True):
        for index in unexpected:
            row_reasons.setdefault(int(index), []).append(outcome.description)
    return CatalogReport(report.outcomes, row_reasons)
