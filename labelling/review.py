"""Blind label review: contact sheets that show images only, and decisions recorded in labels/reviews.csv.

A reviewer never sees an image's folder class or a model's guess. `sheets` picks the images to
review (a whole split, or the train/val images the label audit flags), leaves out those already
reviewed, shuffles them across classes by a salted content hash (a sheet of one class would give
the label away), and draws numbered tiles. The sheet's JSON names each tile by sha256 only, so
even it does not reveal the class. `record` takes the reviewer's decisions by tile number and
appends one row per image to labels/reviews.csv, filling the file and given label from the
dataset manifest without printing them.

    productlens review sheets --split test                       # every unreviewed test image
    productlens review sheets --issues reports/label_issues.csv  # flagged train/val images
    productlens review sheets --candidates reports/feedback/candidates.csv  # a list of sha256 (users' feedback)
    productlens review zoom reports/review/test-001.json 7       # one tile, large
    productlens review record reports/review/test-001.json --reviewer alice 1=keyboard 2-4=mouse \\
        "5=exclude_ambiguous:desk setup, keyboard and monitor" 6=np:advert
    productlens review status
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from common.params import build, load_params, section
from common.reviews import (
    EXCLUDE_AMBIGUOUS,
    EXCLUDE_NOT_PRODUCT,
    REVIEW_COLUMNS,
    allowed_decisions,
    read_reviews,
)
from components.preprocess import SPLITS, PreprocessParams, split_of, usable_images

ALIASES = {
    "ambiguous": EXCLUDE_AMBIGUOUS,
    "amb": EXCLUDE_AMBIGUOUS,
    "not_product": EXCLUDE_NOT_PRODUCT,
    "np": EXCLUDE_NOT_PRODUCT,
}
ORDER_SALT = "productlens-blind-review"
TILE_GAP = 6


class ReviewToolError(ValueError):
    """A command the reviewer can correct: bad tile number, unknown decision, missing sheet."""


@dataclass(frozen=True)
class Decision:
    tile: int
    decision: str
    note: str


def dataset_images(manifest: pd.DataFrame, params: PreprocessParams) -> pd.DataFrame:
    """Usable images (path, class_name, sha256) with the split each one falls in, one row per content hash."""
    images = usable_images(manifest).drop_duplicates("sha256", keep="first")
    return images.assign(split=[split_of(sha, params) for sha in images["sha256"]])[
        ["path", "class_name", "sha256", "split"]
    ].reset_index(drop=True)


REVIEWABLE_ISSUES = ("label", "outlier")  # a near-duplicate is a leakage question, not a label question


def flagged_sha256(issues: pd.DataFrame, splits: Sequence[str] = ("train", "val")) -> set[str]:
    """Images the audit flags with a label or outlier issue in the given splits."""
    flagged = issues["split"].isin(splits) & issues["issue_type"].isin(REVIEWABLE_ISSUES)
    return set(issues.loc[flagged, "sha256"])


def candidate_sha256(path: Path, images: pd.DataFrame, manifest: Path) -> set[str]:
    """The sha256 a candidate list names (a CSV with a sha256 column); every one must be a dataset image."""
    candidates = pd.read_csv(path, dtype="string", keep_default_na=False)
    if "sha256" not in candidates.columns:
        raise ReviewToolError(f"{path} has no sha256 column (columns: {list(candidates.columns)})")
    wanted = set(candidates["sha256"].str.strip().str.lower())
    unknown = sorted(wanted - set(images["sha256"]))
    if unknown:
        raise ReviewToolError(
            f"{len(unknown)} of the {len(wanted)} candidates in {path} are not in {manifest} (e.g. {unknown[0]}): "
            "copy them into the dataset and run validate first"
        )
    return wanted


def review_queue(
    images: pd.DataFrame, reviews: pd.DataFrame, split: str | None = None, only: set[str] | None = None
) -> list[str]:
    """sha256 of the images still to review, in a blind order that mixes classes."""
    pending = images[~images["sha256"].isin(set(reviews["sha256"]))]
    if split is not None:
        pending = pending[pending["split"] == split]
    if only is not None:
        pending = pending[pending["sha256"].isin(only)]
    return sorted(pending["sha256"], key=lambda sha: hashlib.sha256(f"{ORDER_SALT}:{sha}".encode()).hexdigest())


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _picture(path: Path, size: int) -> Image.Image:
    """The image upright (EXIF orientation applied), in RGB, fitted into a `size` px square."""
    with Image.open(path) as source:
        picture = ImageOps.exif_transpose(source).convert("RGB")
    picture.thumbnail((size, size))
    return picture


def contact_sheet(image_paths: Sequence[Path], tile: int, columns: int, first_number: int = 1) -> Image.Image:
    """Numbered tiles, each one image fitted into a `tile` px square; nothing but the number is drawn."""
    rows = max(1, math.ceil(len(image_paths) / columns))
    sheet = Image.new("RGB", (columns * (tile + TILE_GAP) + TILE_GAP, rows * (tile + TILE_GAP) + TILE_GAP), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(max(14, tile // 10))
    for index, path in enumerate(image_paths):
        x = TILE_GAP + (index % columns) * (tile + TILE_GAP)
        y = TILE_GAP + (index // columns) * (tile + TILE_GAP)
        picture = _picture(path, tile)
        sheet.paste(picture, (x + (tile - picture.width) // 2, y + (tile - picture.height) // 2))
        label = str(first_number + index)
        box = draw.textbbox((x, y), label, font=font)
        draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 4, box[3] + 4), fill="black")
        draw.text((x + 1, y + 1), label, fill="yellow", font=font)
    return sheet


def write_sheets(
    queue: Sequence[str],
    images: pd.DataFrame,
    images_root: Path,
    out_dir: Path,
    prefix: str,
    per_sheet: int,
    tile: int,
    columns: int,
) -> list[Path]:
    """One PNG + JSON (tile number -> sha256) per `per_sheet` images; returns the JSON paths."""
    path_of = dict(zip(images["sha256"], images["path"], strict=True))
    written = []
    for number, start in enumerate(range(0, len(queue), per_sheet), start=1):
        chunk = list(queue[start : start + per_sheet])
        name = f"{prefix}-{number:03d}"
        sheet = contact_sheet([images_root / path_of[sha] for sha in chunk], tile, min(columns, len(chunk)))
        png = out_dir / f"{name}.png"
        atomic_write_bytes(png, _png_bytes(sheet))
        atomic_write_json(
            out_dir / f"{name}.json", {"sheet": png.name, "tiles": {str(i + 1): s for i, s in enumerate(chunk)}}
        )
        written.append(out_dir / f"{name}.json")
    return written


def _png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


TOKEN = re.compile(r"^(?P<first>\d+)(?:-(?P<last>\d+))?=(?P<decision>[A-Za-z_]+)(?::(?P<note>.*))?$", re.DOTALL)


def parse_decisions(tokens: Sequence[str], class_names: Sequence[str], tiles: int) -> list[Decision]:
    """`N=decision[:note]` or `N-M=decision[:note]` tokens -> one Decision per tile; errors name the token."""
    allowed = set(allowed_decisions(class_names))
    decisions: dict[int, Decision] = {}
    for token in tokens:
        match = TOKEN.match(token.strip())
        if not match:
            raise ReviewToolError(f"{token!r}: expected N=decision[:note] or N-M=decision[:note]")
        decision = ALIASES.get(match["decision"].lower(), match["decision"].lower())
        if decision not in allowed:
            raise ReviewToolError(f"{token!r}: {decision!r} is not one of {sorted(allowed)} (or {sorted(ALIASES)})")
        note = (match["note"] or "").strip()
        if decision in (EXCLUDE_AMBIGUOUS, EXCLUDE_NOT_PRODUCT) and not note:
            raise ReviewToolError(f"{token!r}: an exclusion needs a note saying what the image shows")
        first, last = int(match["first"]), int(match["last"] or match["first"])
        if not 1 <= first <= last <= tiles:
            raise ReviewToolError(f"{token!r}: tiles are numbered 1..{tiles}")
        for tile in range(first, last + 1):
            if tile in decisions:
                raise ReviewToolError(f"{token!r}: tile {tile} already has a decision in this command")
            decisions[tile] = Decision(tile, decision, note)
    return [decisions[t] for t in sorted(decisions)]


def record_decisions(
    reviews: pd.DataFrame,
    tiles: dict[str, str],
    decisions: Sequence[Decision],
    images: pd.DataFrame,
    reviewer: str,
    reviewed_at: str,
) -> pd.DataFrame:
    """The review table with one row per decided tile added (a re-review of an image replaces its row)."""
    if not reviewer.strip():
        raise ReviewToolError("--reviewer must name the person who looked at the images")
    by_sha = images.set_index("sha256")
    rows = []
    for decision in decisions:
        sha = tiles[str(decision.tile)]
        rows.append(
            {
                "sha256": sha,
                "file": by_sha.at[sha, "path"],
                "given_label": by_sha.at[sha, "class_name"],
                "decision": decision.decision,
                "reviewer": reviewer.strip(),
                "reviewed_at": reviewed_at,
                "note": decision.note,
            }
        )
    added = pd.DataFrame(rows, columns=REVIEW_COLUMNS, dtype="string")
    kept = reviews[~reviews["sha256"].isin(set(added["sha256"]))]
    return pd.concat([kept, added], ignore_index=True)


def _load(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    params = load_params(args.params)
    preprocess = build(PreprocessParams, section(params, "preprocess"), f"{args.params}:preprocess")
    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    classes = list(section(params, "validate")["expected_classes"])
    return dataset_images(manifest, preprocess), read_reviews(args.reviews), classes


def cmd_sheets(args: argparse.Namespace) -> int:
    images, reviews, _ = _load(args)
    only = None
    if args.issues is not None and args.candidates is not None:
        raise ReviewToolError("give --issues or --candidates, not both")
    if args.issues is not None:
        only = flagged_sha256(pd.read_csv(args.issues, keep_default_na=False), args.issue_splits.split(","))
    if args.candidates is not None:
        only = candidate_sha256(args.candidates, images, args.manifest)
    queue = review_queue(images, reviews, args.split, only)
    if args.limit:
        queue = queue[: args.limit]
    prefix = args.prefix or args.split or (args.candidates.stem if args.candidates is not None else "flagged")
    written = write_sheets(queue, images, args.images, args.out, prefix, args.per_sheet, args.tile, args.columns)
    print(f"{len(queue)} images to review on {len(written)} sheets in {args.out} ({prefix}-NNN.png)")
    return 0


def cmd_zoom(args: argparse.Namespace) -> int:
    images, _, _ = _load(args)
    tiles = read_json(args.sheet)["tiles"]
    if str(args.tile) not in tiles:
        raise ReviewToolError(f"{args.sheet} has tiles 1..{len(tiles)}")
    picture = _picture(args.images / images.set_index("sha256").at[tiles[str(args.tile)], "path"], args.size)
    out = args.out / f"{args.sheet.stem}-tile{args.tile}.png"
    atomic_write_bytes(out, _png_bytes(picture))
    print(out)
    return 0


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside `path`, so reviewers recording at once never lose each other's rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def cmd_record(args: argparse.Namespace) -> int:
    tiles = read_json(args.sheet)["tiles"]
    with _locked(args.reviews):
        images, reviews, classes = _load(args)
        decisions = parse_decisions(args.decisions, classes, len(tiles))
        undecided = sorted(set(range(1, len(tiles) + 1)) - {d.tile for d in decisions})
        if undecided and not args.partial:
            raise ReviewToolError(f"no decision for tile(s) {undecided}: decide every tile, or pass --partial")
        reviewed_at = datetime.now(UTC).replace(microsecond=0).isoformat()
        updated = record_decisions(reviews, tiles, decisions, images, args.reviewer, reviewed_at)
        atomic_write_text(args.reviews, updated.to_csv(index=False))
    print(f"recorded {len(decisions)} decision(s) from {args.sheet.name} by {args.reviewer} -> {args.reviews}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    images, reviews, _ = _load(args)
    reviewed = images["sha256"].isin(set(reviews["sha256"]))
    for split in SPLITS:
        in_split = images["split"] == split
        print(f"{split:<6} {int((reviewed & in_split).sum()):>5} reviewed of {int(in_split.sum()):>5}")
    if args.issues is not None:
        flagged = images["sha256"].isin(flagged_sha256(pd.read_csv(args.issues, keep_default_na=False)))
        print(f"flagged train/val: {int((reviewed & flagged).sum())} reviewed of {int(flagged.sum())}")
    return 0


def parser(root: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    root = root or argparse.ArgumentParser(prog="productlens review", description=__doc__.splitlines()[0])
    root.add_argument("--manifest", type=Path, default=Path("artifacts/validate/manifest.csv"))
    root.add_argument("--images", type=Path, default=Path("data/images"))
    root.add_argument("--params", type=Path, default=Path("params.yaml"))
    root.add_argument("--reviews", type=Path, default=Path("labels/reviews.csv"))
    commands = root.add_subparsers(dest="review_command", required=True)

    sheets = commands.add_parser("sheets", help="write numbered contact sheets of images still to review")
    sheets.add_argument("--split", choices=SPLITS, help="review every image of this split")
    sheets.add_argument("--issues", type=Path, help="label_issues.csv from audit_labels: review the flagged images")
    sheets.add_argument("--issue-splits", default="train,val", help="splits whose flagged images to review")
    sheets.add_argument(
        "--candidates", type=Path, help="a CSV with a sha256 column (productlens feedback export): review those images"
    )
    sheets.add_argument("--out", type=Path, default=Path("reports/review"))
    sheets.add_argument("--prefix", help="sheet name prefix (default: the split, or 'flagged')")
    sheets.add_argument("--per-sheet", type=int, default=16, help="images per sheet (1 = each image alone)")
    sheets.add_argument("--columns", type=int, default=4)
    sheets.add_argument("--tile", type=int, default=300, help="tile size in pixels")
    sheets.add_argument("--limit", type=int, default=0, help="at most this many images (0 = all)")
    sheets.set_defaults(review_func=cmd_sheets)

    zoom = commands.add_parser("zoom", help="one tile of a sheet, large")
    zoom.add_argument("sheet", type=Path)
    zoom.add_argument("tile", type=int)
    zoom.add_argument("--size", type=int, default=900)
    zoom.add_argument("--out", type=Path, default=Path("reports/review"))
    zoom.set_defaults(review_func=cmd_zoom)

    record = commands.add_parser("record", help="record decisions for a sheet's tiles in labels/reviews.csv")
    record.add_argument("sheet", type=Path, help="the sheet's JSON")
    record.add_argument("decisions", nargs="+", help="N=class | N-M=class | N=exclude_ambiguous:note | N=np:note")
    record.add_argument("--reviewer", required=True, help="who looked at the images")
    record.add_argument("--partial", action="store_true", help="allow tiles without a decision")
    record.set_defaults(review_func=cmd_record)

    status = commands.add_parser("status", help="how many images are reviewed per split (no labels shown)")
    status.add_argument("--issues", type=Path)
    status.set_defaults(review_func=cmd_status)
    return root


def run(args: argparse.Namespace) -> int:
    """Run the parsed review command; a mistake the reviewer can fix is one line on stderr and exit 2."""
    try:
        return args.review_func(args)
    except (ReviewToolError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
