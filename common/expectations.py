"""Great Expectations as a checker: expectations with the sentence a person reads when they fail, run on frames.

The validate step gates images, reviews and the catalog with it; the knowledge-base builder runs the
catalog expectations through it to skip the rows they flag. GX runs ephemeral (in memory, no cloud),
optionally building Data Docs into a folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Check:
    """One expectation with the sentence a person reads when it fails."""

    table: str
    expectation: Any
    description: str
    example_column: str | None = None
    hint: str = ""


@dataclass
class CheckOutcome:
    table: str
    description: str
    success: bool
    unexpected_count: int
    examples: list[str]
    observed: Any = None
    hint: str = ""

    def sentence(self) -> str:
        text = f"[{self.table}] {self.description}"
        if self.unexpected_count:
            text += f": {self.unexpected_count} offending"
        if self.examples:
            text += f", e.g. {', '.join(self.examples)}"
        if self.observed is not None:
            text += f" (observed: {self.observed})"
        if self.hint:
            text += f". {self.hint}"
        return text


@dataclass
class ValidationReport:
    outcomes: list[CheckOutcome]
    raw_results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    @property
    def failures(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if not o.success]


def quiet_context(docs_dir: Path | None = None) -> Any:
    """An ephemeral (in-memory, no cloud) GX context, optionally building Data Docs into `docs_dir`."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name="productlens",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return context


def examples_for(frame: pd.DataFrame, indices: list[Any], column: str | None) -> list[str]:
    """The first MAX_EXAMPLES values of `column` at the offending `indices` (none without a column)."""
    if column is None:
        return []
    picked = [i for i in indices if i in frame.index][:MAX_EXAMPLES]
    return [str(frame.at[i, column]) for i in picked]


def run_checks(
    tables: dict[str, pd.DataFrame], checks: list[Check], docs_dir: Path | None = None
) -> tuple[ValidationReport, list[list[Any]]]:
    """Run each table's expectations as one GX suite; return outcomes and each check's offending indices."""
    context = quiet_context(docs_dir)
    source = context.data_sources.add_pandas("productlens")
    raw_results: list[dict[str, Any]] = []
    results_by_check: dict[int, Any] = {}
    for table, frame in tables.items():
        table_checks = [(i, c) for i, c in enumerate(checks) if c.table == table]
        if not table_checks:
            continue
        suite_name = re.sub(r"[^A-Za-z0-9_]+", "_", table)
        batch = source.add_dataframe_asset(suite_name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
        for _, check in table_checks:
            suite.add_expectation(check.expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
        )
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if docs_dir is not None else []
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{suite_name}_checkpoint",
                validation_definitions=[definition],
                actions=actions,
                result_format={"result_format": "COMPLETE"},
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": frame})
        suite_result = next(iter(run.run_results.values()))
        raw_results.append(suite_result.to_json_dict())
        # Results come back in suite order, which is the order the checks were added.
        for (index, _), result in zip(table_checks, suite_result.results, strict=True):
            results_by_check[index] = result

    outcomes, indices = [], []
    for index, check in enumerate(checks):
        result = results_by_check[index]
        details = result.result or {}
        unexpected = list(details.get("unexpected_index_list") or [])
        if result.exception_info and result.exception_info.get("raised_exception"):
            details = {"observed_value": result.exception_info.get("exception_message")}
        observed = details.get("observed_value")
        if isinstance(observed, float):
            observed = round(observed, 3)
        if "partial_missing_list" in details:  # set expectations report both sides of the difference
            observed = (
                f"missing {sorted(details['partial_missing_list'])}, "
                f"unexpected {sorted(details.get('partial_unexpected_list') or [])}"
            )
        outcomes.append(
            CheckOutcome(
                table=check.table,
                description=check.description,
                success=bool(result.success),
                unexpected_count=int(details.get("unexpected_count") or 0),
                examples=examples_for(tables[check.table], unexpected, check.example_column),
                observed=None if result.success else observed,
                hint="" if result.success else check.hint,
            )
        )
        indices.append(unexpected)
    return ValidationReport(outcomes, raw_results), indices
