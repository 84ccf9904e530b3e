"""The recommender from the terminal: recommendations for a photo and knowledge-base search.

    productlens recommend PHOTO [--budget-max 100] [--brand Logitech] [--require wireless=true]
    productlens kb search "rtx 4070" [--category video-card] [--max-price 600]
    productlens kb info

(`productlens` is productlens/cli.py, which adds the review and publish commands; `python -m recommender.cli`
runs these alone.) The model server, database and params come from the same settings as the app
(recommender/settings.py: PRODUCTLENS_MODEL_GRPC, PRODUCTLENS_DB_URL, ...) unless the flags below say otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from recommender import kb
from recommender.ranking import SORTS, PreferenceError, Preferences, ProductRow
from recommender.settings import Settings, env_name, settings_problems


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], max_width: int = 60) -> str:
    """A plain-text table; cells longer than `max_width` are cut with an ellipsis."""

    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    cells = [[cell(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _price(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def product_table(products: Sequence[ProductRow], matched: Sequence[Sequence[str]] | None = None) -> str:
    """Products as a table; with `matched`, a last column says which fields each search result matched on."""
    headers = ["id", "category", "name", "brand", "price USD"]
    rows = [[p.id, p.category, p.name, p.brand, _price(p.price)] for p in products]
    if matched is not None:
        headers.append("matched")
        rows = [
            [*row, ", ".join(f if f in ("name", "category") else f"{f} {p.specs[f]}" for f in fields)]
            for row, p, fields in zip(rows, products, matched, strict=True)
        ]
    return table(headers, rows)


def cmd_recommend(args: argparse.Namespace, settings: Settings) -> int:
    from recommender.client import ModelServerError
    from recommender.service import ImageRejected, Recommender, Timings, check_image

    try:
        preferences = Preferences.from_inputs(
            args.budget_min, args.budget_max, args.brand, args.exclude_brand, args.require, args.sort
        )
    except PreferenceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    photo: Path = args.photo
    if not photo.is_file():
        print(f"error: {photo} is not a file", file=sys.stderr)
        return 2
    data = photo.read_bytes()
    try:
        check_image(data, max_bytes=settings.max_upload_bytes)
    except ImageRejected as error:
        print(f"error: {photo}: {error.message}", file=sys.stderr)
        return 2
    recommender = Recommender.from_settings(settings)
    try:
        answer = recommender.recommend_image(data, preferences, Timings())
    except ModelServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    finally:
        recommender.close()
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    prediction = answer["prediction"]
    ranked = ", ".join(f"{c['class']} {c['probability']:.0%}" for c in prediction["top_k"])
    print(f"{photo.name}: {prediction['class']} ({prediction['confidence']:.0%}); top classes: {ranked}")
    for message in answer["messages"]:
        print(f"note: {message}")
    for facts in answer["category_facts"]:
        span = (
            f", {_price(facts['min_price'])}-{_price(facts['max_price'])} USD (median {_price(facts['median_price'])})"
            if facts["min_price"] is not None
            else ""
        )
        print(f"{facts['category']}: {facts['products']:,} products, {facts['priced']:,} priced{span}")
    if answer["products"]:
        rows = [
            [
                i + 1,
                p["name"],
                p["brand"],
                _price(p["price"]),
                (f"[{p['label']}] " if p["label"] else "") + p["explanation"],
            ]
            for i, p in enumerate(answer["products"])
        ]
        print(table(["#", "name", "brand", "price USD", "why"], rows, max_width=90))
    return 0


def cmd_kb_search(args: argparse.Namespace, settings: Settings) -> int:
    engine = kb.make_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            if args.category is not None:
                kb.check_category(conn, args.category)
            rows = kb.search_products(conn, args.query, args.category, args.max_price, args.limit)
    except kb.UnknownCategory as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    matched = [kb.matched_fields(r, args.query) for r in rows]
    if args.json:
        print(json.dumps([{**r.to_dict(), "matched": m} for r, m in zip(rows, matched, strict=True)], indent=2))
    elif rows:
        print(product_table(rows, matched))
    else:
        where = f" in {args.category}" if args.category else ""
        print(f"no product{where} matches '{args.query}'")
    return 0


def cmd_kb_info(args: argparse.Namespace, settings: Settings) -> int:
    engine = kb.make_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            facts = kb.category_facts(conn)
            info = kb.kb_info(conn)
    finally:
        engine.dispose()
    rows = [
        [f.name, f.products, f.priced, _price(f.min_price), _price(f.median_price), _price(f.max_price)]
        for f in facts.values()
    ]
    print(table(["category", "products", "priced", "min USD", "median USD", "max USD"], rows))
    skipped = info.get("skipped_by_reason") or {}
    print(f"skipped at build: {sum(skipped.values())} rows" + "".join(f"; {n} {r}" for r, n in skipped.items()))
    return 0


# Flags that override a setting: flag dest -> Settings field.
SETTING_FLAGS = {
    "db_url": "db_url",
    "model_grpc": "model_grpc",
    "model_name": "model_name",
    "timeout": "model_timeout_s",
    "params": "params_path",
    "max_bytes": "max_upload_bytes",
}


def _setting_help(what: str, field: str) -> str:
    return f"{what} (default: ${env_name(field)}, else {Settings.model_fields[field].default})"


def settings_for(args: argparse.Namespace) -> Settings:
    """The settings, with the flags given on the command line in place of the environment's."""
    flags = {field: getattr(args, dest, None) for dest, field in SETTING_FLAGS.items()}
    return Settings(**{field: value for field, value in flags.items() if value is not None})


def run(args: argparse.Namespace) -> int:
    """Run a parsed recommender command; unusable settings are a message on stderr and exit 2."""
    try:
        settings = settings_for(args)
    except ValidationError as error:
        print(f"error: the settings cannot be used: {settings_problems(error)}", file=sys.stderr)
        return 2
    return args.command_func(args, settings)


def add_commands(root: argparse.ArgumentParser, commands: argparse._SubParsersAction) -> None:
    """The recommender's commands (recommend, kb) under `commands`, and their `--db-url` option on `root`."""
    root.add_argument("--db-url", help=_setting_help("knowledge base URL", "db_url"))

    rec = commands.add_parser("recommend", help="recognise a product photo and recommend products")
    rec.add_argument("photo", type=Path)
    rec.add_argument("--budget-min", type=float)
    rec.add_argument("--budget-max", type=float)
    rec.add_argument("--brand", action="append", default=[], help="preferred brand (repeatable)")
    rec.add_argument("--exclude-brand", action="append", default=[], help="brand to leave out (repeatable)")
    rec.add_argument("--require", action="append", default=[], help="required spec, e.g. wireless=true (repeatable)")
    rec.add_argument("--sort", choices=SORTS, default="best_value")
    rec.add_argument("--model-grpc", help=_setting_help("model server gRPC address", "model_grpc"))
    rec.add_argument("--model-name", help=_setting_help("served model name", "model_name"))
    rec.add_argument("--timeout", type=float, help=_setting_help("deadline of the model call, s", "model_timeout_s"))
    rec.add_argument("--params", type=Path, help=_setting_help("params.yaml with `recommender:`", "params_path"))
    rec.add_argument("--max-bytes", type=int, help=_setting_help("largest photo, bytes", "max_upload_bytes"))
    rec.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")
    rec.set_defaults(func=run, command_func=cmd_recommend)

    kb_parser = commands.add_parser("kb", help="query the knowledge base")
    kb_commands = kb_parser.add_subparsers(dest="kb_command", required=True)
    search = kb_commands.add_parser(
        "search", help="full-text search on product names and key specs; says which field each result matched"
    )
    search.add_argument("query")
    search.add_argument("--category", help="catalog category, e.g. video-card (`kb info` lists them)")
    search.add_argument("--max-price", type=float)
    search.add_argument("--limit", type=int, default=20)
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=run, command_func=cmd_kb_search)
    info = kb_commands.add_parser("info", help="products per category and what the build skipped")
    info.set_defaults(func=run, command_func=cmd_kb_info)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m recommender.cli", description=__doc__.splitlines()[0])
    add_commands(root, root.add_subparsers(dest="command", required=True))
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
