"""Monitor step: does the traffic the model server logged still look like the training data and the evaluation?

Reads the server's prediction logs (TF Serving `PredictionLog` records, serving/prediction_log_format.py) in
`--logs` and compares each Predict request's images and answers with a baseline:

- predicted classes: the top-1 class of each image vs the evaluation's predictions on its split (test);
- confidence: the top-1 probability vs the evaluation's;
- "not sure" answers: the share under the answering model's own `not_sure_threshold` vs the evaluation's share
  under the same threshold;
- image statistics: width, height, brightness (mean luma 0..255) and contrast (its standard deviation) vs the
  training images.

A distribution has drifted only when it moved far (its population stability index over a `monitor:` limit in
params.yaml) and the move is unlikely to be chance (chi-square test of homogeneity, p < `monitor.alpha`): PSI
alone flags small samples (its noise alone is about (bins - 1) / n) and a test alone flags trivial moves in large
ones. The not-sure share has drifted when it rose by more than `monitor.max_not_sure_increase` and a one-sided
binomial test agrees. Under `monitor.min_images` logged images nothing is judged (the figures are still shown).

The baseline is built from the training split and the evaluation's outputs (`--baseline-out`: the dvc stage and
the KFP step) or read from such a build (`--baseline`: `make monitor LOGS=<folder>`). Writes the KPIs
(`--metrics`) and a Markdown report (`--report`); exits 1 with one line per drifted check.
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import io
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from common.cli import require_file, run_main
from common.io import atomic_write_json, atomic_write_text, read_json
from common.params import load_section
from serving.contract import CLASS_NAMES, IMAGE_BYTES, NOT_SURE_THRESHOLD, PROBABILITIES

log = logging.getLogger("components.monitor")

DRIFT_EXIT_CODE = 1
IMAGE_STATISTICS = ("width", "height", "brightness", "contrast")
# Brightness and contrast are measured on every image scaled to this square, whatever its size or source, so a
# photo's figures do not depend on its resolution.
STATISTICS_SIDE = 64
SMOOTHING = 0.5  # pseudo-count added to every bin: a bin empty on one side gives a large PSI, not an infinite one
BASELINE_FORMAT = 1


@dataclass(frozen=True)
class MonitorParams:
    min_images: int  # fewer logged images than this: nothing is judged
    alpha: float  # a move counts only when a test says it is this unlikely by chance
    max_class_psi: float  # predicted classes vs the evaluation's predictions
    max_confidence_psi: float  # top-1 probabilities vs the evaluation's
    max_not_sure_increase: float  # not-sure share of the traffic minus the evaluation's, at the same threshold
    max_image_psi: float  # each image statistic vs the training images
    bins: int  # quantile bins of the baseline's numeric distributions

    def __post_init__(self) -> None:
        if self.min_images < 1:
            raise ValueError(f"monitor.min_images must be at least 1, got {self.min_images}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"monitor.alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 < self.max_not_sure_increase <= 1.0:
            raise ValueError(f"monitor.max_not_sure_increase must be in (0, 1], got {self.max_not_sure_increase}")
        for name in ("max_class_psi", "max_confidence_psi", "max_image_psi"):
            if getattr(self, name) <= 0:
                raise ValueError(f"monitor.{name} must be positive, got {getattr(self, name)}")
        if self.bins < 2:
            raise ValueError(f"monitor.bins must be at least 2, got {self.bins}")


# ----- distributions ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Distribution:
    """A numeric quantity of the baseline in bins: bin i holds the values in (edges[i-1], edges[i]], the first and
    last bins are open-ended. The inner edges are the quantiles, plus the smallest and largest value, so values
    beyond the baseline's range have bins of their own (empty in the baseline). Repeated values give fewer edges:
    dataset v1's photos are all 256 x 256, so width has three bins: under 256, 256, over 256."""

    edges: list[float]
    counts: list[int]
    median: float

    @classmethod
    def of(cls, values: Sequence[float], bins: int) -> Distribution:
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            raise ValueError("a baseline distribution needs at least one value")
        quantiles = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])
        below = np.nextafter(values.min(), -np.inf)  # (below, ...] starts at the smallest value itself
        edges = sorted({float(edge) for edge in (below, *quantiles, values.max())})
        return cls(edges, bin_counts(values, edges).tolist(), float(np.median(values)))


def bin_counts(values: Sequence[float], edges: Sequence[float]) -> np.ndarray:
    """How many of `values` fall in each bin of `edges` (see Distribution)."""
    where = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(values, dtype=np.float64), side="left")
    return np.bincount(where, minlength=len(edges) + 1)


def population_stability_index(expected: Sequence[int], observed: Sequence[int]) -> float:
    """PSI = sum((o - e) * ln(o / e)) over the bins' shares, each count smoothed by SMOOTHING.
    Rule of thumb: under 0.1 stable, 0.1-0.25 a notable shift, over 0.25 a major one."""
    e = np.asarray(expected, dtype=np.float64) + SMOOTHING
    o = np.asarray(observed, dtype=np.float64) + SMOOTHING
    e, o = e / e.sum(), o / o.sum()
    return float(np.sum((o - e) * np.log(o / e)))


def homogeneity_p_value(expected: Sequence[int], observed: Sequence[int]) -> float:
    """p-value of the chi-square test that both count vectors come from one distribution (bins empty on both
    sides left out); 1.0 when fewer than two bins hold anything."""
    from scipy.stats import chi2_contingency

    table = np.asarray([expected, observed], dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 1.0
    return float(chi2_contingency(table).pvalue)


# ----- image statistics ------------------------------------------------------------------------------------------
def image_statistics(data: bytes) -> dict[str, float]:
    """Width and height in pixels, brightness (mean luma, 0..255) and contrast (the luma's standard deviation) of
    an encoded image. Raises OSError (PIL's UnidentifiedImageError among them) for bytes that are no image."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        image.draft("L", (STATISTICS_SIDE, STATISTICS_SIDE))  # a JPEG decodes at 1/2..1/8 scale: ~10x faster
        square = image.convert("L").resize((STATISTICS_SIDE, STATISTICS_SIDE), Image.Resampling.BILINEAR)
        luma = np.asarray(square, dtype=np.float32)
    return {
        "width": float(width),
        "height": float(height),
        "brightness": float(luma.mean()),
        "contrast": float(luma.std()),
    }


# ----- the baseline ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Baseline:
    """What the traffic is compared with: the training images and the evaluation's predictions."""

    class_names: list[str]
    training_images: int
    training_class_counts: dict[str, int]  # the training labels, for the report
    image_statistics: dict[str, Distribution]  # of the training images, IMAGE_STATISTICS
    evaluation_images: int
    predicted_counts: dict[str, int]  # the evaluation's top-1 classes
    confidences: list[float]  # the evaluation's top-1 probability of every image, ascending
    confidence: Distribution
    not_sure_threshold: float  # the evaluation's: for answers that carry none (exports from before the threshold)

    def to_dict(self) -> dict[str, Any]:
        return {"format": BASELINE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, document: dict[str, Any], where: str = "baseline") -> Baseline:
        if document.get("format") != BASELINE_FORMAT:
            raise ValueError(
                f"{where}: baseline format {document.get('format')!r}, expected {BASELINE_FORMAT}: rebuild it"
            )
        values = {key: value for key, value in document.items() if key != "format"}
        values["image_statistics"] = {name: Distribution(**d) for name, d in values["image_statistics"].items()}
        values["confidence"] = Distribution(**values["confidence"])
        return cls(**values)

    def not_sure_share(self, thresholds: np.ndarray) -> np.ndarray:
        """For each threshold, the share of the evaluated images whose top-1 probability is under it."""
        ranked = np.asarray(self.confidences, dtype=np.float64)
        return np.searchsorted(ranked, np.asarray(thresholds, dtype=np.float64), side="left") / len(ranked)


def evaluated_confidences(curve: pd.DataFrame, images: int) -> np.ndarray:
    """Every evaluated image's top-1 probability, ascending, from evaluate's risk-coverage curve: one row per
    distinct probability (`threshold`) with the share of images at or above it (`coverage`), highest first."""
    coverage = curve["coverage"].to_numpy(dtype=np.float64)
    counts = np.rint(np.diff(np.r_[0.0, coverage]) * images).astype(np.int64)
    if counts.sum() != images or (counts < 1).any():
        raise ValueError(f"the risk-coverage curve does not describe the {images} evaluated images: rerun evaluate")
    return np.sort(np.repeat(curve["threshold"].to_numpy(dtype=np.float64), counts))


def build_baseline(
    class_names: list[str],
    training: pd.DataFrame,
    images: Path,
    evaluation: dict[str, Any],
    confusion: pd.DataFrame,
    curve: pd.DataFrame,
    bins: int,
) -> Baseline:
    """The baseline of a training split (rows `path`, `class_name`; paths relative to `images`) and an evaluation
    (evaluate's metrics with `not_sure_threshold`, its per-image `actual,predicted` rows and risk-coverage curve)."""
    unknown = sorted(set(training["class_name"]) - set(class_names)) + sorted(
        set(confusion["predicted"]) - set(class_names)
    )
    if unknown:
        raise ValueError(f"classes {sorted(set(unknown))} are not in class_names.json")
    statistics: dict[str, list[float]] = {name: [] for name in IMAGE_STATISTICS}
    for relative in training["path"]:
        for name, value in image_statistics((images / relative).read_bytes()).items():
            statistics[name].append(value)
    confidences = evaluated_confidences(curve, len(confusion))
    return Baseline(
        class_names=list(class_names),
        training_images=len(training),
        training_class_counts=class_counts(training["class_name"], class_names),
        image_statistics={name: Distribution.of(values, bins) for name, values in statistics.items()},
        evaluation_images=len(confusion),
        predicted_counts=class_counts(confusion["predicted"], class_names),
        confidences=[round(float(c), 6) for c in confidences],
        confidence=Distribution.of(confidences, bins),
        not_sure_threshold=float(evaluation[NOT_SURE_THRESHOLD]),
    )


def class_counts(names: Iterable[str], class_names: list[str]) -> dict[str, int]:
    counted = Counter(names)
    return {name: int(counted.get(name, 0)) for name in class_names}


# ----- the traffic -----------------------------------------------------------------------------------------------
@dataclass
class Traffic:
    """The answered images of the Predict requests in a set of prediction logs, and what was left out."""

    requests: int = 0
    predicted: list[str] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    thresholds: list[float | None] = field(default_factory=list)  # the answer's not_sure_threshold, if it had one
    image_statistics: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in IMAGE_STATISTICS})
    answered_by: Counter[str] = field(default_factory=Counter)  # "productlens v3" -> images
    skipped: Counter[str] = field(default_factory=Counter)  # why -> records
    undecodable_images: int = 0

    @property
    def images(self) -> int:
        return len(self.predicted)

    def add(self, entry: Any) -> None:
        """Add one PredictionLog: a Predict request of image bytes and its answer; other records are counted."""
        import tensorflow as tf

        kind = entry.WhichOneof("log_type")
        if kind != "predict_log":
            self.skipped[f"{kind or 'empty'} records (only Predict requests are checked)"] += 1
            return
        request, response = entry.predict_log.request, entry.predict_log.response
        if IMAGE_BYTES not in request.inputs:
            self.skipped[f"Predict requests without {IMAGE_BYTES} (pixel signatures)"] += 1
            return
        if PROBABILITIES not in response.outputs or CLASS_NAMES not in response.outputs:
            self.skipped[f"Predict answers without {PROBABILITIES} and {CLASS_NAMES} (not serving_default)"] += 1
            return
        images = tf.make_ndarray(request.inputs[IMAGE_BYTES]).reshape(-1)
        probabilities = tf.make_ndarray(response.outputs[PROBABILITIES])
        if probabilities.ndim != 2 or probabilities.shape[0] != images.size:
            self.skipped["Predict records whose answer does not have one row per image"] += 1
            return
        self.requests += 1
        names = tf.make_ndarray(response.outputs[CLASS_NAMES])[:, 0]
        self.predicted.extend(name.decode("utf-8") if isinstance(name, bytes) else str(name) for name in names)
        self.confidences.extend(float(p) for p in probabilities.max(axis=1))
        if NOT_SURE_THRESHOLD in response.outputs:
            self.thresholds.extend(float(t) for t in tf.make_ndarray(response.outputs[NOT_SURE_THRESHOLD]).reshape(-1))
        else:
            self.thresholds.extend([None] * images.size)
        model = response.model_spec if response.model_spec.name else request.model_spec
        self.answered_by[f"{model.name} v{model.version.value}"] += images.size
        for data in images:
            try:
                statistics = image_statistics(bytes(data))
            except (OSError, Image.DecompressionBombError) as error:
                log.debug("undecodable logged image: %s", error)
                self.undecodable_images += 1
                continue
            for name, value in statistics.items():
                self.image_statistics[name].append(value)


def read_traffic(logs: Path) -> tuple[Traffic, int]:
    """The traffic in the prediction logs of folder (or filename prefix) `logs`, and how many log files held it."""
    from serving.prediction_log_format import log_files, read_prediction_logs

    if not logs.is_dir() and not log_files(logs):
        raise FileNotFoundError(f"prediction logs not found: {logs} (a folder of log files, or their filename prefix)")
    traffic = Traffic()
    for entry in read_prediction_logs(logs):
        traffic.add(entry)
    return traffic, len(log_files(logs))


# ----- the checks ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One comparison of the traffic with the baseline."""

    name: str  # what is compared: "class distribution", "confidence", "not-sure share", "image brightness", ...
    statistic: str  # "PSI" or "increase"
    value: float | None  # None: no traffic to compare
    limit: float
    p_value: float | None
    judged: bool  # enough traffic to call it drift
    drifted: bool
    detail: str  # the traffic against the baseline, in words

    def reason(self) -> str:
        """One line: what drifted and by how much."""
        test = "binomial" if self.statistic == "increase" else "chi-square"
        return (
            f"{self.name} drifted: {self.statistic} {self.value:.3f} > {self.limit:g} "
            f"({test} p {self.p_value:.2g} < alpha); {self.detail}"
        )


def distribution_check(
    name: str, expected: Sequence[int], observed: Sequence[int], limit: float, judged: bool, alpha: float, detail: str
) -> Check:
    if sum(observed) == 0:
        return Check(name, "PSI", None, limit, None, False, False, "no traffic")
    psi = population_stability_index(expected, observed)
    p_value = homogeneity_p_value(expected, observed)
    return Check(name, "PSI", psi, limit, p_value, judged, judged and psi > limit and p_value < alpha, detail)


def class_check(traffic: Traffic, baseline: Baseline, params: MonitorParams, judged: bool) -> Check:
    unknown = sorted(set(traffic.predicted) - set(baseline.class_names))
    if unknown:
        raise ValueError(
            f"the logged answers name classes {unknown} that the baseline's model does not have: the logs come from "
            "a model with other classes than the evaluated one"
        )
    expected = [baseline.predicted_counts[name] for name in baseline.class_names]
    observed = list(class_counts(traffic.predicted, baseline.class_names).values())
    detail = ""
    if traffic.images:
        traffic_share = np.asarray(observed) / traffic.images
        baseline_share = np.asarray(expected) / baseline.evaluation_images
        moved = int(np.argmax(np.abs(traffic_share - baseline_share)))
        detail = (
            f"{baseline.class_names[moved]} is {traffic_share[moved]:.0%} of the traffic's predictions, "
            f"{baseline_share[moved]:.0%} of the evaluation's"
        )
    return distribution_check(
        "class distribution", expected, observed, params.max_class_psi, judged, params.alpha, detail
    )


def confidence_check(traffic: Traffic, baseline: Baseline, params: MonitorParams, judged: bool) -> Check:
    observed = bin_counts(traffic.confidences, baseline.confidence.edges).tolist()
    detail = ""
    if traffic.images:
        detail = (
            f"median top-1 probability {np.median(traffic.confidences):.2f} in the traffic, "
            f"{baseline.confidence.median:.2f} in the evaluation"
        )
    return distribution_check(
        "confidence", baseline.confidence.counts, observed, params.max_confidence_psi, judged, params.alpha, detail
    )


def traffic_thresholds(traffic: Traffic, baseline: Baseline) -> np.ndarray:
    """Each image's not-sure threshold: its answer's, or the evaluation's for an answer without one."""
    return np.asarray([baseline.not_sure_threshold if t is None else t for t in traffic.thresholds], dtype=np.float64)


def not_sure_check(traffic: Traffic, baseline: Baseline, params: MonitorParams, judged: bool) -> Check:
    limit = params.max_not_sure_increase
    if not traffic.images:
        return Check("not-sure share", "increase", None, limit, None, False, False, "no traffic")
    from scipy.stats import binomtest

    thresholds = traffic_thresholds(traffic, baseline)
    not_sure = int(np.sum(np.asarray(traffic.confidences) < thresholds))
    share = not_sure / traffic.images
    expected = float(np.mean(baseline.not_sure_share(thresholds)))
    p_value = float(binomtest(not_sure, traffic.images, expected, alternative="greater").pvalue)
    detail = (
        f"{share:.0%} of the traffic's answers are not sure, {expected:.0%} of the evaluation's at the same threshold"
    )
    drifted = judged and share - expected > limit and p_value < params.alpha
    return Check("not-sure share", "increase", share - expected, limit, p_value, judged, drifted, detail)


def image_checks(traffic: Traffic, baseline: Baseline, params: MonitorParams) -> list[Check]:
    judged = len(traffic.image_statistics[IMAGE_STATISTICS[0]]) >= params.min_images
    checks = []
    for name in IMAGE_STATISTICS:
        values = traffic.image_statistics[name]
        trained = baseline.image_statistics[name]
        detail = f"median {np.median(values):.0f} in the traffic, {trained.median:.0f} in training" if values else ""
        checks.append(
            distribution_check(
                f"image {name}",
                trained.counts,
                bin_counts(values, trained.edges).tolist(),
                params.max_image_psi,
                judged,
                params.alpha,
                detail,
            )
        )
    return checks


@dataclass(frozen=True)
class MonitorResult:
    traffic: Traffic
    log_files: int
    baseline: Baseline
    params: MonitorParams
    checks: list[Check]

    @property
    def judged(self) -> bool:
        return self.traffic.images >= self.params.min_images

    @property
    def drifted(self) -> list[Check]:
        return [check for check in self.checks if check.drifted]

    def check(self, name: str) -> Check:
        (found,) = [check for check in self.checks if check.name == name]
        return found

    def metrics(self) -> dict[str, Any]:
        """The KPIs (DVC metrics / KFP Metrics): drift, volume, and each check's statistic (None without traffic)."""
        traffic, not_sure = self.traffic, self.check("not-sure share")
        thresholds = traffic_thresholds(traffic, self.baseline) if traffic.images else np.asarray([])
        return {
            "drift": bool(self.drifted),
            "drifted_checks": len(self.drifted),
            "judged": self.judged,
            "n_requests": traffic.requests,
            "n_images": traffic.images,
            "class_psi": rounded(self.check("class distribution").value),
            "confidence_psi": rounded(self.check("confidence").value),
            "mean_confidence": rounded(float(np.mean(traffic.confidences))) if traffic.images else None,
            "not_sure_share": rounded(float(np.mean(np.asarray(traffic.confidences) < thresholds)))
            if traffic.images
            else None,
            "not_sure_increase": rounded(not_sure.value),
            **{f"{name}_psi": rounded(self.check(f"image {name}").value) for name in IMAGE_STATISTICS},
        }


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def check_traffic(traffic: Traffic, log_files: int, baseline: Baseline, params: MonitorParams) -> MonitorResult:
    """Every check of the traffic against the baseline (see the module docstring)."""
    judged = traffic.images >= params.min_images
    checks = [
        class_check(traffic, baseline, params, judged),
        confidence_check(traffic, baseline, params, judged),
        not_sure_check(traffic, baseline, params, judged),
        *image_checks(traffic, baseline, params),
    ]
    return MonitorResult(traffic, log_files, baseline, params, checks)


# ----- the report ------------------------------------------------------------------------------------------------
def verdict(result: MonitorResult) -> str:
    if result.drifted:
        return "DRIFT"
    if not result.traffic.images:
        return "no checkable traffic (see Left out)" if result.traffic.skipped else "no traffic logged"
    return "no drift" if result.judged else "not judged (too little traffic)"


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report_markdown(result: MonitorResult, logs: Path) -> str:
    """The readable report: verdict, reasons, every check, the class shares and the image statistics."""
    traffic, baseline, params = result.traffic, result.baseline, result.params
    models = ", ".join(f"{model} ({images})" for model, images in sorted(traffic.answered_by.items())) or "none"
    lines = [
        f"# Drift check: {verdict(result)}",
        "",
        f"Traffic: {traffic.images} images in {traffic.requests} Predict requests from `{logs}` "
        f"({result.log_files} log file{'' if result.log_files == 1 else 's'}); answered by {models}.",
        f"Baseline: {baseline.training_images} training images; the evaluation's {baseline.evaluation_images} "
        f"predictions (not-sure threshold {baseline.not_sure_threshold:.3f}).",
        "",
    ]
    if not traffic.images:
        lines += ["Nothing to compare: no Predict request of image bytes is logged.", ""]
    elif not result.judged:
        lines += [
            f"Only {traffic.images} images (monitor.min_images is {params.min_images}): the figures are shown, "
            "nothing is judged.",
            "",
        ]
    if result.drifted:
        lines += ["## Reasons", "", *[f"- {check.reason()}" for check in result.drifted], ""]
    lines += [
        "## Checks",
        "",
        f"A distribution drifts when its PSI is over the limit and p < alpha ({params.alpha:g}); the not-sure "
        "share when its increase is over the limit and p < alpha.",
        "",
        "| check | statistic | value | limit | p-value | result | traffic vs baseline |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for check in result.checks:
        outcome = "DRIFT" if check.drifted else ("ok" if check.judged else "not judged")
        p_value = "-" if check.p_value is None else f"{check.p_value:.2g}"
        lines.append(
            f"| {check.name} | {check.statistic} | {fmt(check.value)} | {check.limit:g} | {p_value} | {outcome} "
            f"| {check.detail} |"
        )
    predicted = class_counts(traffic.predicted, baseline.class_names)
    lines += [
        "",
        "## Predicted classes",
        "",
        "| class | training labels | evaluation predictions | traffic predictions |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in baseline.class_names:
        lines.append(
            f"| {name} | {share(baseline.training_class_counts[name], baseline.training_images)} "
            f"| {share(baseline.predicted_counts[name], baseline.evaluation_images)} "
            f"| {share(predicted[name], traffic.images)} |"
        )
    lines += ["", "## Image statistics (medians)", "", "| statistic | training | traffic |", "| --- | ---: | ---: |"]
    for name in IMAGE_STATISTICS:
        values = traffic.image_statistics[name]
        median = fmt(float(np.median(values)) if values else None, 1)
        lines.append(f"| {name} | {baseline.image_statistics[name].median:.1f} | {median} |")
    left_out = [f"- {count} {why}" for why, count in sorted(traffic.skipped.items())]
    if traffic.undecodable_images:
        left_out.append(f"- {traffic.undecodable_images} logged images that do not decode (left out of the statistics)")
    if left_out:
        lines += ["", "## Left out", "", *left_out]
    return "\n".join(lines) + "\n"


def share(count: int, total: int) -> str:
    return f"{count / total:.1%}" if total else "-"


# ----- CLI -------------------------------------------------------------------------------------------------------
BASELINE_INPUTS = ("splits", "images", "evaluation", "confusion_csv", "risk_coverage_csv")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.monitor", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--logs", type=Path, required=True, help="folder of prediction log files (or their filename prefix)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--baseline", type=Path, help="input: a baseline built earlier with --baseline-out")
    source.add_argument(
        "--baseline-out", type=Path, help="output: build the baseline from the inputs below and write it here"
    )
    building = parser.add_argument_group("baseline inputs (with --baseline-out)")
    building.add_argument("--splits", type=Path, help="folder with class_names.json and train.csv")
    building.add_argument("--images", type=Path, help="root the split paths are relative to")
    building.add_argument("--evaluation", type=Path, help="evaluate's metrics JSON (its not_sure_threshold)")
    building.add_argument("--confusion-csv", type=Path, help="evaluate's actual,predicted rows, one per image")
    building.add_argument("--risk-coverage-csv", type=Path, help="evaluate's coverage,selective_accuracy,threshold")
    parser.add_argument("--metrics", type=Path, required=True, help="output: the KPIs (JSON)")
    parser.add_argument("--report", type=Path, required=True, help="output: the readable report (Markdown)")
    args = parser.parse_args(argv)
    missing = [f"--{name.replace('_', '-')}" for name in BASELINE_INPUTS if getattr(args, name) is None]
    if args.baseline_out is not None and missing:
        parser.error(f"--baseline-out builds the baseline from {', '.join(missing)}: give them")
    given = [f"--{name.replace('_', '-')}" for name in BASELINE_INPUTS if getattr(args, name) is not None]
    if args.baseline is not None and given:
        parser.error(f"{', '.join(given)} build a baseline: use them with --baseline-out, not --baseline")
    return args


def baseline_from_files(args: argparse.Namespace, bins: int) -> Baseline:
    remedy = "run the evaluate stage first"
    class_names = json.loads((args.splits / "class_names.json").read_text(encoding="utf-8"))
    training = pd.read_csv(args.splits / "train.csv", dtype={"path": "string", "class_name": "string"})
    return build_baseline(
        class_names,
        training,
        args.images,
        read_json(require_file(args.evaluation, "evaluation metrics", remedy)),
        pd.read_csv(require_file(args.confusion_csv, "confusion CSV", remedy), dtype="string"),
        pd.read_csv(require_file(args.risk_coverage_csv, "risk-coverage CSV", remedy)),
        bins,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    params = load_section(MonitorParams, "monitor", args.params)
    traffic, files = read_traffic(args.logs)  # first: a wrong folder fails before the baseline is built
    if args.baseline_out is not None:
        baseline = baseline_from_files(args, params.bins)
        atomic_write_json(args.baseline_out, baseline.to_dict())
        log.info("baseline of %d training images -> %s", baseline.training_images, args.baseline_out)
    else:
        remedy = "make repro builds it: the monitor stage's --baseline-out"
        baseline = Baseline.from_dict(
            read_json(require_file(args.baseline, "monitor baseline", remedy)), str(args.baseline)
        )
    result = check_traffic(traffic, files, baseline, params)
    atomic_write_json(args.metrics, result.metrics())
    atomic_write_text(args.report, report_markdown(result, args.logs))
    print(f"Monitor: {verdict(result)} ({traffic.images} images in {traffic.requests} requests) -> {args.report}")
    for check in result.drifted:
        print(f"drift: {check.reason()}", file=sys.stderr)
    return DRIFT_EXIT_CODE if result.drifted else 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
