"""Training benchmark: the paper's CNN (its 4 epochs, 224 px) vs the default model, same data, same run.

Each model is trained and evaluated by the real CLIs (`python -m components.train` then
`python -m components.evaluate`) in their own processes, so peak RSS is each training's own.
Reported per model: test accuracy, macro F1, worst-class recall, ECE, training wall time (the train
CLI end to end: imports, decoding, every phase, saving) and peak RSS, then the default's ratios
against the paper CNN, each model's per-class recall, most confused pairs, and the gate's decision
on it (`python -m components.gate`, params.yaml thresholds, no champion) with its reasons.

    python -m bench.train [--params params.yaml] [--output reports/bench/train.json] [--only default]

`make bench-train` runs it on dataset v1 (artifacts/splits from `dvc repro preprocess`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

# The paper's recipe: plain CNN, 224 px, 4 epochs, Adam 1e-3, no augmentation, class weights or calibration.
PAPER_CNN = {
    "architecture": "paper_cnn",
    "image_size": 224,
    "epochs": 4,
    "batch_size": 32,
    "learning_rate": 0.001,
    "label_smoothing": 0.0,
    "class_weights": False,
    "calibrate": False,
    "early_stopping_patience": 4,  # >= epochs: all 4 epochs run, as in the paper
    "augment": {"flip": False, "rotation": 0.0, "zoom": 0.0, "translation": 0.0, "contrast": 0.0},
}


def run_model(name: str, params: dict[str, Any], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Train then evaluate one model through the CLIs; returns its row of the table."""
    params_path = workdir / f"{name}.params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    model, train_metrics = workdir / f"{name}.keras", workdir / f"{name}.train.json"
    evaluation = workdir / f"{name}.evaluate.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}  # no PYTHONHASHSEED: training does not depend on it
    print(f"[{name}] training ({params['train']['architecture']}) ...", flush=True)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "components.train", "--splits", str(args.splits), "--images", str(args.images),
         "--params", str(params_path), "--model", str(model), "--metrics", str(train_metrics)],
        cwd=REPO_ROOT, env=env, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - started
    subprocess.run(
        [sys.executable, "-m", "components.evaluate", "--model", str(model), "--splits", str(args.splits),
         "--images", str(args.images), "--params", str(params_path),
         "--metrics", str(workdir / f"{name}.evaluate.metrics.json"), "--report", str(evaluation),
         "--confusion-csv", str(workdir / f"{name}.confusion.csv"),
         "--confusion-png", str(workdir / f"{name}.confusion.png")],
        cwd=REPO_ROOT, env=env, check=True,
    )  # fmt: skip
    decision = workdir / f"{name}.gate.json"
    # The gate with this run's thresholds and no champion: would this model be blessed on its own?
    subprocess.run(
        [sys.executable, "-m", "components.gate", "--candidate", str(evaluation), "--params", str(params_path),
         "--output", str(decision)],
        cwd=REPO_ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    trained = json.loads(train_metrics.read_text())
    metrics = json.loads(evaluation.read_text())
    gate = json.loads(decision.read_text())
    return {
        "name": name,
        "recipe": describe(params["train"]),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "worst_class": metrics["worst_class"],
        "worst_class_recall": metrics["worst_class_recall"],
        "ece": metrics["ece"],
        "top_k_accuracy": metrics["top_k_accuracy"],
        "majority_baseline_accuracy": metrics["majority_baseline_accuracy"],
        "train_wall_s": round(wall, 1),
        "train_fit_s": trained["train_seconds"],
        "peak_rss_mb": trained["peak_rss_mb"],
        "per_class_recall": {c: m["recall"] for c, m in metrics["per_class"].items()},
        "most_confused": metrics["most_confused"],
        "gate_blessed": gate["blessed"],
        "gate_reasons": gate["reasons"],
    }


def describe(train: dict[str, Any]) -> str:
    if train["architecture"] == "paper_cnn":
        return f"paper CNN, {train['image_size']} px, {train['epochs']} epochs"
    members = train.get("ensemble_members", 1)
    text = (
        f"MobileNetV2 a={train['mobilenet_v2']['alpha']}, {train['image_size']} px, head <= {train['epochs']} ep + "
        f"top {train['fine_tune_layers']} layers <= {train['fine_tune_epochs']} ep"
    )
    return f"{members} x ({text})" if members > 1 else text


def ratio(new: float, base: float) -> str:
    """new / base as '2.47x'; a dash where the baseline is 0 (the paper CNN's worst class is often 0)."""
    return f"{new / base:.2f}x" if base else "-"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | test accuracy | macro F1 | worst-class recall | ECE | training wall time | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']}: {row['recipe']} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | "
            f"{row['worst_class_recall']:.3f} ({row['worst_class']}) | {row['ece']:.3f} | "
            f"{row['train_wall_s'] / 60:.1f} min | {row['peak_rss_mb'] / 1024:.2f} GiB |"
        )
    if len(rows) == 2:
        base, new = rows
        ratios = [ratio(new[key], base[key]) for key in ("accuracy", "macro_f1", "worst_class_recall", "ece")]
        ratios += [ratio(new["train_wall_s"], base["train_wall_s"]), ratio(new["peak_rss_mb"], base["peak_rss_mb"])]
        lines.append("| ratio default / paper | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def details(row: dict[str, Any]) -> str:
    recalls = ", ".join(f"{c} {r:.2f}" for c, r in sorted(row["per_class_recall"].items(), key=lambda kv: kv[1]))
    confused = ", ".join(f"{p['actual']} -> {p['predicted']} ({p['count']})" for p in row["most_confused"][:6])
    verdict = "BLESSED" if row["gate_blessed"] else "REFUSED"
    reasons = "".join(f"\n  - {reason}" for reason in row["gate_reasons"])
    return (
        f"{row['name']} per-class recall (lowest first): {recalls}\n{row['name']} most confused: {confused}\n"
        f"{row['name']} gate (no champion): {verdict}{reasons}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--splits", type=Path, default=REPO_ROOT / "artifacts" / "splits")
    parser.add_argument("--images", type=Path, default=REPO_ROOT / "data" / "images")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "reports" / "bench" / "train.json")
    parser.add_argument("--only", choices=["paper_cnn", "default"], default=None, help="run one model only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.splits / "train.csv").is_file():
        raise SystemExit(f"{args.splits}/train.csv not found: run `dvc repro preprocess` (or make repro) first")
    base = yaml.safe_load(args.params.read_text(encoding="utf-8"))
    paper = {**base, "train": {**base["train"], **PAPER_CNN}}
    runs = [("paper_cnn", paper), ("default", base)]
    if args.only:
        runs = [run for run in runs if run[0] == args.only]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        rows = [run_model(name, params, args, Path(scratch)) for name, params in runs]
    cores = len(os.sched_getaffinity(0))
    report = {
        "cores": cores,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print()
    print(f"Training benchmark on {cores} CPU cores (load average before {load_before[0]:.2f}), test split:")
    print(table(rows))
    for row in rows:
        print(details(row))
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
