"""Gate step: bless the candidate model only when every check under `gate:` in params holds.

Checks: accuracy and macro F1 at least a floor; every class's recall at least a floor; accuracy
beats the majority-class baseline on the same split by a margin; and, when a champion exists
(the evaluation in the model card of the newest published version), the candidate's accuracy
and macro F1 are not worse than the champion's by more than the allowed regression.

Writes `{blessed, reasons, checks, candidate, champion, thresholds}`. Exits 0 either way: the
decision is data, and the export step refuses a model that is not blessed.
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.cli import require_file, run_main
from common.io import atomic_write_json, read_json
from common.params import load_section
from serving.contract import MODEL_CARD_FILE, ModelCard, versions

log = logging.getLogger("components.gate")


@dataclass(frozen=True)
class GateParams:
    min_accuracy: float
    min_macro_f1: float
    min_class_recall: float
    min_margin_over_majority: float  # accuracy - majority-class baseline accuracy, on the same split
    max_regression: float  # allowed drop of accuracy and of macro F1 below the champion's

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"gate.{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None  # None: skipped (e.g. no champion yet)
    sentence: str


def fmt_metric(value: float) -> str:
    """A metric as the reasons print it: three decimals."""
    return f"{value:.3f}"


def champion_metrics_from(document: dict[str, Any] | None) -> dict[str, Any] | None:
    """Evaluation metrics out of a champion record: a model card's `evaluation`, or the metrics themselves.

    Cards published before the serving contract held them under `metrics` (or `metrics.evaluate`): still read.
    """
    if document is None:
        return None
    if "evaluation" in document:
        found = [ModelCard.from_dict(document).evaluation]
    else:
        older = document.get("metrics") or {}
        found = [document, older, older.get("evaluate")]
    for candidate in found:
        if isinstance(candidate, dict) and "accuracy" in candidate and "macro_f1" in candidate:
            return candidate
    raise ValueError("champion record has no accuracy/macro_f1 (expected evaluate metrics or a model card)")


def champion_file(location: Path | None) -> Path | None:
    """The champion record at `location`: a JSON file itself, or, for a model folder holding integer
    versions (`models/productlens`), the model card of the newest version. None when there is none yet."""
    if location is None or not location.exists():
        return None
    if location.is_file():
        return location
    for version in reversed(versions(location)):
        if (location / str(version) / MODEL_CARD_FILE).is_file():
            return location / str(version) / MODEL_CARD_FILE
    return None


def run_checks(candidate: dict[str, Any], champion: dict[str, Any] | None, params: GateParams) -> list[Check]:
    """Every gate check on `candidate` (evaluate metrics), each with a sentence a person can read."""
    checks: list[Check] = []
    accuracy, macro_f1 = float(candidate["accuracy"]), float(candidate["macro_f1"])
    for name, value, floor in (
        ("accuracy", accuracy, params.min_accuracy),
        ("macro F1", macro_f1, params.min_macro_f1),
    ):
        passed = value >= floor
        checks.append(
            Check(
                f"min_{name.replace(' ', '_').lower()}",
                passed,
                f"{name} {fmt_metric(value)} {'>=' if passed else '<'} {fmt_metric(floor)}",
            )
        )
    per_class = candidate["per_class"]
    low = {c: float(m["recall"]) for c, m in per_class.items() if int(m.get("support", 1)) > 0}
    failing = sorted((r, c) for c, r in low.items() if r < params.min_class_recall)
    for recall, name in failing:
        checks.append(
            Check(
                "min_class_recall",
                False,
                f"recall of class {name} {fmt_metric(recall)} < {fmt_metric(params.min_class_recall)}",
            )
        )
    if not failing:
        worst_recall, worst = min((r, c) for c, r in low.items())
        checks.append(
            Check(
                "min_class_recall",
                True,
                f"every class has recall >= {fmt_metric(params.min_class_recall)} "
                f"(lowest: {worst} {fmt_metric(worst_recall)})",
            )
        )
    baseline = float(candidate["majority_baseline_accuracy"])
    margin = accuracy - baseline
    passed = margin >= params.min_margin_over_majority
    checks.append(
        Check(
            "min_margin_over_majority",
            passed,
            f"accuracy {fmt_metric(accuracy)} beats the majority-class baseline {fmt_metric(baseline)} "
            f"(always '{candidate.get('majority_class', '?')}') by {fmt_metric(margin)}, "
            f"{'at least' if passed else 'less than'} the required {fmt_metric(params.min_margin_over_majority)}",
        )
    )
    if champion is None:
        checks.append(
            Check("max_regression", None, "no champion yet (no blessed model exported): regression check skipped")
        )
    else:
        for key, name in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
            mine, theirs = float(candidate[key]), float(champion[key])
            passed = mine >= theirs - params.max_regression
            verdict = "within" if passed else "more than"
            checks.append(
                Check(
                    f"max_regression_{key}",
                    passed,
                    f"{name} {fmt_metric(mine)} vs champion {fmt_metric(theirs)}: a change of {mine - theirs:+.3f}, "
                    f"{verdict} the allowed regression of {fmt_metric(params.max_regression)}",
                )
            )
    return checks


def gate_decision(candidate: dict[str, Any], champion: dict[str, Any] | None, params: GateParams) -> dict[str, Any]:
    """The gate's record: blessed only if no check failed; `reasons` says why (failures first)."""
    checks = run_checks(candidate, champion, params)
    failed = [c for c in checks if c.passed is False]
    blessed = not failed
    reasons = [c.sentence for c in failed] if failed else [c.sentence for c in checks]
    summary_keys = (
        "accuracy",
        "macro_f1",
        "worst_class",
        "worst_class_recall",
        "majority_baseline_accuracy",
        "top_k_accuracy",
        "ece",
        "images",
    )
    return {
        "blessed": blessed,
        "reasons": reasons,
        "checks": [asdict(c) for c in checks],
        "candidate": {k: candidate[k] for k in summary_keys if k in candidate},
        "champion": None if champion is None else {k: champion[k] for k in summary_keys if k in champion},
        "thresholds": asdict(params),
    }


def gate_metrics(decision: dict[str, Any]) -> dict[str, Any]:
    """The decision as DVC metrics: blessed or not, how many checks ran and failed (the reasons are in the record)."""
    checks = decision["checks"]
    return {
        "blessed": bool(decision["blessed"]),
        "checks": len(checks),
        "failed_checks": sum(1 for check in checks if check["passed"] is False),
        "champion": decision["champion"] is not None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.gate", description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", type=Path, required=True, help="metrics JSON written by evaluate")
    parser.add_argument(
        "--champion",
        type=Path,
        default=None,
        help="the exported, blessed champion: its model card or evaluate metrics JSON, or the model folder "
        "(e.g. models/productlens) whose newest version's model_card.json is read; missing means no champion yet",
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--output", type=Path, required=True, help="gate decision JSON")
    parser.add_argument("--metrics", type=Path, default=None, help="the decision as DVC metrics (metrics/gate.json)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    params = load_section(GateParams, "gate", args.params)
    candidate = read_json(require_file(args.candidate, "candidate metrics", "run the evaluate stage first"))
    record = champion_file(args.champion)
    champion = champion_metrics_from(read_json(record)) if record is not None else None
    log.info("champion: %s", record if record is not None else "none yet")
    decision = gate_decision(candidate, champion, params)
    atomic_write_json(args.output, decision)
    if args.metrics is not None:
        atomic_write_json(args.metrics, gate_metrics(decision))
    verdict = "BLESSED" if decision["blessed"] else "REFUSED"
    print(f"Gate: {verdict}")
    for reason in decision["reasons"]:
        print(f"  - {reason}")
    log.info("gate decision -> %s", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
