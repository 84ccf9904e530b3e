"""`productlens`: the project's commands in one place (the top layer: it imports the recommender, labelling and
components; none of them imports it)."""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import sys
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.exc import OperationalError

from common.cli import run_main
from common.io import atomic_write_json
from labelling import review
from recommender import cli as recommender_cli
from recommender.settings import Settings, settings_problems

DESCRIPTION = """ProductLens from the terminal.

  productlens recommend PHOTO [--budget-max 100] ...     recommend products for a photo
  productlens kb search "rtx 4070" | kb info             query the knowledge base
  productlens review sheets|zoom|record|status ...       blind label review
  productlens feedback export                            users' answers -> new dataset images + review candidates
  productlens publish --candidate ... --output models    publish the validated model for serving
  productlens promote | rollback                         canary rollout: stable -> the canary, or back

An error is one line (exit 1); add --debug anywhere, or set PRODUCTLENS_DEBUG=1, for its traceback.
"""


class KnowledgeBaseUnavailable(RuntimeError):
    """The knowledge base's database cannot be opened or read (not built yet, wrong URL, server down)."""


def publish(args: argparse.Namespace) -> int:
    """`python -m components.publish` with the arguments after `publish` (its own parser reads them)."""
    from components.publish import main as publish_main  # imported when used: other commands never load it

    return publish_main(args.publish_args)


def feedback_export(args: argparse.Namespace) -> int:
    """Users' answers -> their photos in the dataset under the users' class, and the list to review blind."""
    from common.reviews import read_reviews
    from recommender.feedback import FeedbackBook, export_feedback, summary, write_candidates

    overrides = {"db_url": args.db_url, "feedback_dir": args.feedback_dir, "feedback_db_url": args.feedback_db_url}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as error:
        print(f"error: the settings cannot be used: {settings_problems(error)}", file=sys.stderr)
        return 2
    book = FeedbackBook.open(settings.feedback_database_url(), settings.feedback_dir, args.params)
    try:
        answers = book.answers()
    finally:
        book.close()
    reviewed = read_reviews(args.reviews)["sha256"]  # an absent file: no reviews yet
    result = export_feedback(answers, book.store, args.dataset, book.rules.classes, reviewed, args.corrected_only)
    write_candidates(args.candidates, result.candidates)
    atomic_write_json(args.report, result.to_dict())
    print(summary(result, book.where(), args.dataset, args.candidates))
    return 0


def add_feedback_commands(commands: argparse._SubParsersAction) -> None:
    feedback = commands.add_parser("feedback", help='users\' answers to "Is this a <class>?": export them for review')
    feedback_commands = feedback.add_subparsers(dest="feedback_command", required=True)
    export = feedback_commands.add_parser(
        "export",
        help="copy answered photos the dataset lacks into it (under the users' class); list them for blind review",
        description="Copy each answered photo the dataset lacks to DATASET/<class>/feedback-<sha256[:16]>.<ext> under "
        "the class the users gave (a given label, like a folder's), and write the review candidates (the sha256 of "
        "the answered photos in the dataset without a decision in --reviews) "
        "for `productlens review sheets --candidates`. The answers are not labels: review the candidates blind, "
        "then validate and `dvc add data`.",
    )
    export.add_argument("--dataset", type=Path, default=Path("data/images"), help="the dataset's class folders")
    export.add_argument("--candidates", type=Path, default=Path("reports/feedback/candidates.csv"))
    export.add_argument(
        "--reviews",
        type=Path,
        default=Path("labels/reviews.csv"),
        help="photos with a decision here are not candidates",
    )
    export.add_argument("--report", type=Path, default=Path("reports/feedback/export.json"), help="the counts, as JSON")
    export.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="its validate: section has the classes"
    )
    export.add_argument("--feedback-dir", type=Path, help="the feedback store (default: $PRODUCTLENS_FEEDBACK_DIR)")
    export.add_argument(
        "--feedback-db-url", help="the feedback table's database (default: $PRODUCTLENS_FEEDBACK_DB_URL)"
    )
    export.add_argument("--corrected-only", action="store_true", help="only photos some user said were misrecognised")
    export.set_defaults(func=feedback_export)


def rollout(args: argparse.Namespace) -> int:
    """`promote` / `rollback`: move the version labels in the models.config files (components/labels.py)."""
    from components import labels  # imported when used: TensorFlow Serving's protos load TensorFlow

    for report in args.check:
        drifted = monitor_drift(report)
        if drifted:
            print(f"error: not promoting: {report} {drifted}", file=sys.stderr)
            return 1
        print(f"{report}: no drift")
    configs = args.models_config or list(labels.SHIPPED_CONFIGS)
    step = labels.promote if args.command == "promote" else labels.rollback
    if args.server is None:
        print(step(configs, args.model, None, args.wait_s))
        return 0
    with labels.ModelServerWatch(args.server, args.model) as watch:
        print(step(configs, args.model, watch, args.wait_s))
    return 0


def monitor_drift(report: Path) -> str | None:
    """What a drift check's metrics (components.monitor --metrics) say against a promote; None when nothing."""
    import json

    metrics = json.loads(report.read_text(encoding="utf-8"))
    if metrics.get("drift"):
        return f"says the traffic drifted ({metrics.get('drifted_checks')} check(s); its report names them)"
    if not metrics.get("judged", True):
        return f"judged nothing: {metrics.get('n_images')} logged image(s) are under monitor.min_images"
    return None


def add_rollout_commands(commands: argparse._SubParsersAction) -> None:
    promote = commands.add_parser(
        "promote",
        help="canary rollout: stable -> the canary's version (the old stable stays loaded as `previous`)",
        description="Point the stable label at the canary's version in each models.config, keeping the old stable "
        "version loaded as `previous` for a rollback. The deliberate human step once the canary's metrics (the "
        "dashboard: errors and latency by label) and the drift check show no regression; --check refuses to "
        "promote on a drift check that found drift.",
    )
    rollback = commands.add_parser(
        "rollback",
        help="stable -> the previous stable version (after a promote), or drop the canary (during a rollout)",
    )
    for sub in (promote, rollback):
        sub.add_argument(
            "--models-config",
            type=Path,
            action="append",
            default=[],
            help="a models.config to edit (repeatable; default serving/models.config and serving/k8s/models.config)",
        )
        sub.add_argument("--model", default="productlens", help="the model name in the config (default %(default)s)")
        sub.add_argument(
            "--server", metavar="HOST:PORT", help="wait until the model server at this gRPC address applied it"
        )
        sub.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for it (default %(default)g)")
        sub.set_defaults(func=rollout, check=[])
    promote.add_argument(
        "--check",
        type=Path,
        action="append",
        default=[],
        metavar="MONITOR_JSON",
        help="the drift check's metrics (make monitor: metrics/monitor.json): refuse when it found drift (repeatable)",
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="productlens", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    recommender_cli.add_commands(root, commands)

    review_parser = commands.add_parser("review", help="blind label review: contact sheets and decisions")
    review.parser(review_parser)
    review_parser.set_defaults(func=review.run)
    add_feedback_commands(commands)

    # components.publish parses its own flags (`productlens publish --help` shows them).
    publish_parser = commands.add_parser(
        "publish", help="publish the blessed, infra-validated model to the serving base path", add_help=False
    )
    publish_parser.set_defaults(func=publish)
    add_rollout_commands(commands)
    return root


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the command it names; returns the exit code."""
    root = parser()
    args, rest = root.parse_known_args(argv)
    if args.command == "publish":
        args.publish_args = rest
    elif rest:
        root.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except OperationalError as error:
        raise KnowledgeBaseUnavailable(
            f"the knowledge base cannot be opened: {error.orig} (build it with `make kb`, or point --db-url or "
            "PRODUCTLENS_DB_URL at it)"
        ) from error


def main(argv: list[str] | None = None) -> int:
    """The console script: `run`, with one line `error: ...` (exit 1) for an expected error; `--debug` anywhere on the
    command line, or PRODUCTLENS_DEBUG=1, shows the traceback instead."""
    return run_main(run, argv, expected=(KnowledgeBaseUnavailable,))


if __name__ == "__main__":
    sys.exit(main())
