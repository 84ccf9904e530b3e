"""Reproducibility check: do the metrics of a fresh `dvc repro` match the committed ones?

    make retrain-check      # dvc pull, dvc repro with the committed params, then this module

Runs `dvc metrics diff --json <rev>` (committed metrics vs the workspace after the repro) and
fails when a metric listed under `retrain_check.metrics` in params.yaml moved by more than
`retrain_check.tolerance`, or is missing on either side. The full diff is written as Markdown
(for CI to publish) and printed. Figures within a tolerance, not bytes: a retrain on another machine
gives slightly different weights, so a few predictions, and the figures, can differ.
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.cli import run_main
from common.io import atomic_write_text
from common.params import load_section

log = logging.getLogger("pipelines.retrain_check")


class DvcFailed(RuntimeError):
    """A dvc command this check runs exited non-zero; the message holds its stderr."""


@dataclass(frozen=True)
class RetrainCheckParams:
    tolerance: float  # largest allowed absolute change of each compared metric
    metrics: list[str]  # "<metrics file>:<dotted key>", as `dvc metrics diff` names them


@dataclass(frozen=True)
class MetricChange:
    name: str
    old: Any
    new: Any

    @property
    def difference(self) -> float | None:
        if isinstance(self.old, int | float) and isinstance(self.new, int | float):
            return float(self.new) - float(self.old)
        return None


def dvc_metrics_diff(revision: str, markdown: bool = False) -> str:
    command = [sys.executable, "-m", "dvc", "metrics", "diff", revision, "--all", "--md" if markdown else "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise DvcFailed(f"{' '.join(command)} failed: {completed.stderr.strip()}")
    return completed.stdout


def changes_of(diff: dict[str, dict[str, dict[str, Any]]], names: list[str]) -> list[MetricChange]:
    """Pick the listed metrics out of `dvc metrics diff --json --all` output."""
    changes = []
    for name in names:
        path, _, key = name.partition(":")
        entry = diff.get(path, {}).get(key)
        changes.append(MetricChange(name, entry.get("old") if entry else None, entry.get("new") if entry else None))
    return changes


def problems_of(changes: list[MetricChange], tolerance: float) -> list[str]:
    """One sentence per metric that is missing or moved by more than `tolerance`."""
    problems = []
    for change in changes:
        if change.old is None or change.new is None:
            side = "committed metrics" if change.old is None else "reproduced metrics"
            problems.append(f"{change.name} is missing from the {side}")
        elif change.difference is None:
            if change.old != change.new:
                problems.append(f"{change.name} changed from {change.old!r} to {change.new!r}")
        elif abs(change.difference) > tolerance:
            problems.append(
                f"{change.name} moved {change.difference:+.4f} ({change.old} -> {change.new}), "
                f"more than the tolerance {tolerance}"
            )
    return problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.retrain_check", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--rev", default="HEAD", help="revision holding the committed metrics (default HEAD)")
    parser.add_argument("--report", type=Path, default=Path("reports/retrain_check.md"), help="Markdown output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    params = load_section(RetrainCheckParams, "retrain_check", args.params)
    changes = changes_of(json.loads(dvc_metrics_diff(args.rev) or "{}"), params.metrics)
    problems = problems_of(changes, params.tolerance)
    lines = [
        f"# Retrain check against {args.rev}: {'FAILED' if problems else 'passed'}",
        "",
        f"Tolerance {params.tolerance} (absolute) on {len(params.metrics)} metrics.",
        "",
        *[f"- {problem}" for problem in problems],
        "",
        "| metric | committed | reproduced | change |",
        "|---|---|---|---|",
        *[
            f"| {c.name} | {c.old} | {c.new} | {'' if c.difference is None else f'{c.difference:+.4f}'} |"
            for c in changes
        ],
        "",
        "## dvc metrics diff",
        "",
        dvc_metrics_diff(args.rev, markdown=True),
    ]
    report = "\n".join(lines)
    atomic_write_text(args.report, report)
    print(report)
    if problems:
        log.error("metrics not reproduced (%d problems); see %s", len(problems), args.report)
        return 1
    log.info("retraining reproduced the committed metrics within %s", params.tolerance)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main, expected=(DvcFailed,)))
