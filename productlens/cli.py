"""`productlens`: the project's commands in one place (the top layer: it imports the recommender, labelling and
components; none of them imports it)."""

from __future__ import annotations

import argparse
import sys

from labelling import review
from recommender import cli as recommender_cli

DESCRIPTION = """ProductLens from the terminal.

  productlens recommend PHOTO [--budget-max 100] ...     recommend products for a photo
  productlens kb search "rtx 4070" | kb info             query the knowledge base
  productlens review sheets|zoom|record|status ...       blind label review
  productlens publish --candidate ... --output models    publish the validated model for serving
"""


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


def main(argv: list[str] | None = None) -> int:
    root = parser()
    args, rest = root.parse_known_args(argv)
    if args.command == "publish":
        args.publish_args = rest
    elif rest:
        root.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
