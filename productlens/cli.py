"""`productlens`: the project's commands in one place (the top layer: it imports the recommender, labelling and
components; none of them imports it)."""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import sys

from sqlalchemy.exc import OperationalError

from common.cli import run_main
from labelling import review
from recommender import cli as recommender_cli

DESCRIPTION = """ProductLens from the terminal.

  productlens recommend PHOTO [--budget-max 100] ...     recommend products for a photo
  productlens kb search "rtx 4070" | kb info             query the knowledge base
  productlens review sheets|zoom|record|status ...       blind label review
  productlens publish --candidate ... --output models    publish the validated model for serving

An error is one line (exit 1); add --debug anywhere, or set PRODUCTLENS_DEBUG=1, for its traceback.
"""


class KnowledgeBaseUnavailable(RuntimeError):
    """The knowledge base's database cannot be opened or read (not built yet, wrong URL, server down)."""


def publish(args: argparse.Namespace) -> int:
    """`python -m components.publish` with the arguments after `publish` (its own parser reads them)."""
    from components.publish import main as publish_main  # imported when used: other commands never load it

    return publish_main(args.publish_args)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="productlens", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    recommender_cli.add_commands(root, commands)

    review_parser = commands.add_parser("review", help="blind label review: contact sheets and decisions")
    review.parser(review_parser)
    review_parser.set_defaults(func=review.run)

    # components.publish parses its own flags (`productlens publish --help` shows them).
    publish_parser = commands.add_parser(
        "publish", help="publish the blessed, infra-validated model to the serving base path", add_help=False
    )
    publish_parser.set_defaults(func=publish)
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
