"""`productlens`: recommendations for a photo and knowledge-base search from the terminal.

    productlens recommend PHOTO [--budget-max 100] [--brand Logitech] [--require wireless=true]
    productlens kb search "rtx 4070" [--category video-card] [--max-price 600]
    productlens kb info
    productlens review sheets|zoom|record|status ...   (blind label review: labelling/review.py)

The model server and database come from the same environment variables as the app
(PRODUCTLENS_MODEL_GRPC, PRODUCTLENS_MODEL_NAME, PRODUCTLENS_DB_URL) or the flags below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recommender import kb
from recommender.ranking import SORTS, PreferenceError, Preferences, ProductRow


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


def product_table(products: Sequence[ProductRow]) -> str:
    return table(
        ["id", "category", "name", "brand", "price USD"],
        [[p.id, p.category, p.name, p.brand, _price(p.price)] for p in products],
    )


def cmd_recommend(args: argparse.Namespace) -> int:
    from recommender.client import ModelServerError, PredictionClient
    from recommender.params import load_recommender_params
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
        check_image(data, max_bytes=args.max_bytes)
    except ImageRejected as error:
        print(f"error: {photo}: {error.message}", file=sys.stderr)
        return 2
    engine = kb.make_engine(args.db_url)
    client = PredictionClient(args.model_grpc, model_name=args.model_name, timeout_s=args.timeout)
    try:
        recommender = Recommender(engine, client, load_recommender_params(args.params))
        answer = recommender.recommend_image(data, preferences, Timings())
    except ModelServerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    finally:
        client.close()
        engine.dispose()
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


def cmd_kb_search(args: argparse.Namespace) -> int:
    engine = kb.make_engine(args.db_url)
    try:
        with engine.connect() as conn:
            rows = kb.search_products(conn, args.query, args.category, args.max_price, args.limit)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    elif rows:
        print(product_table(rows))
    else:
        print(f"no product matches '{args.query}'")
    return 0


def cmd_kb_info(args: argparse.Namespace) -> int:
    engine = kb.make_engine(args.db_url)
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


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="productlens", description="ProductLens recommender from the terminal.")
    root.add_argument(
        "--db-url", default=None, help="knowledge base URL (default: PRODUCTLENS_DB_URL or the SQLite file)"
    )
    commands = root.add_subparsers(dest="command", required=True)

    rec = commands.add_parser("recommend", help="recognise a product photo and recommend products")
    rec.add_argument("photo", type=Path)
    rec.add_argument("--budget-min", type=float)
    rec.add_argument("--budget-max", type=float)
    rec.add_argument("--brand", action="append", default=[], help="preferred brand (repeatable)")
    rec.add_argument("--exclude-brand", action="append", default=[], help="brand to leave out (repeatable)")
    rec.add_argument("--require", action="append", default=[], help="required spec, e.g. wireless=true (repeatable)")
    rec.add_argument("--sort", choices=SORTS, default="best_value")
    rec.add_argument("--model-grpc", default=os.environ.get("PRODUCTLENS_MODEL_GRPC", "localhost:8500"))
    rec.add_argument("--model-name", default=os.environ.get("PRODUCTLENS_MODEL_NAME", "productlens"))
    rec.add_argument("--timeout", type=float, default=10.0, help="deadline of the model call in seconds")
    rec.add_argument("--params", type=Path, default=Path(os.environ.get("PRODUCTLENS_PARAMS", "params.yaml")))
    rec.add_argument("--max-bytes", type=int, default=10 * 1024 * 1024)
    rec.add_argument("--json", action="store_true", help="print the API's JSON answer instead of a table")
    rec.set_defaults(func=cmd_recommend)

    kb_parser = commands.add_parser("kb", help="query the knowledge base")
    kb_commands = kb_parser.add_subparsers(dest="kb_command", required=True)
    search = kb_commands.add_parser("search", help="full-text search on product names")
    search.add_argument("query")
    search.add_argument("--category")
    search.add_argument("--max-price", type=float)
    search.add_argument("--limit", type=int, default=20)
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=cmd_kb_search)
    info = kb_commands.add_parser("info", help="products per category and what the build skipped")
    info.set_defaults(func=cmd_kb_info)

    from labelling import review

    review_parser = commands.add_parser("review", help="blind label review: contact sheets and decisions")
    review.parser(review_parser)
    review_parser.set_defaults(func=review.run)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
