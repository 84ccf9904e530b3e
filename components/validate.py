"""Validate step: inspect every image file and catalog row, then gate them with Great Expectations.

This is the first wall against the paper's mistake (split folders used as classes): the
layout, the class list, every file's decodability and label conflicts are checked before
anything is trained. Outputs a manifest (input of preprocess), the DVC metrics (a few counts), and
a report folder: GX Data Docs, GX's raw results and `validate.json` (images per class, catalog rows,
duplicates and every expectation's outcome). The catalog expectations (common.catalog) are the
knowledge-base builder's too.
"""

from __future__ import annotations

import common.quiet_tf  # noqa: F401  (first: TensorFlow reads its log level when it loads)

# isort: split
import argparse
import base64
import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
from PIL import Image, UnidentifiedImageError

import common
from common.catalog import catalog_checks, with_catalog_columns
from common.cli import run_main
from common.expectations import MAX_EXAMPLES, Check, ValidationReport, run_checks
from common.io import atomic_directory, atomic_write_json, atomic_write_text
from common.params import load_section
from common.reviews import allowed_decisions, read_reviews

log = logging.getLogger("components.validate")

SUMMARY_FILE = "validate.json"  # in the report folder: the whole summary (the DVC metrics hold a few counts)

MANIFEST_COLUMNS = [
    "path", "class_name", "in_class_folder", "bytes", "sha256", "format",
    "width", "height", "mode", "decodes", "error",
]  # fmt: skip


@dataclass(frozen=True)
class ValidateParams:
    expected_classes: list[str]
    image_formats: list[str]
    min_width: int
    min_height: int
    max_pixels: int  # decompression-bomb limit; export builds the same one into the served model
    min_images_per_class: int
    max_class_ratio: float
    split_folder_names: list[str]
    catalog_required_columns: list[str]


# --------------------------------------------------------------------------- images


@contextlib.contextmanager
def own_pixel_limit() -> Iterator[None]:
    """Pillow's own decompression-bomb check off (a warning past 89 MP, an error past 179 MP, no file named):
    inspect_image applies validate.max_pixels to the header itself, before decoding anything."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def inspect_image(path: Path, max_pixels: int | None = None) -> dict[str, Any]:
    """Read one file: size, sha256, header (format, size), and whether Pillow decodes every pixel.

    With `max_pixels`, an image whose header says more pixels is not decoded (decodes False, the
    error says why): that decode is the memory bomb the limit is there to refuse. Without it,
    Pillow's own bomb check applies.
    """
    data = path.read_bytes()
    row: dict[str, Any] = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "format": None,
        "width": None,
        "height": None,
        "mode": None,
        "decodes": False,
        "error": "",
    }
    if not data:
        row["error"] = "empty file (0 bytes)"
        return row
    try:
        pillow_check = own_pixel_limit() if max_pixels is not None else contextlib.nullcontext()
        with pillow_check, Image.open(path) as image:
            row.update(format=image.format, width=image.width, height=image.height, mode=image.mode)
            if max_pixels is not None and image.width * image.height > max_pixels:
                row["error"] = (
                    f"not decoded: {image.width}x{image.height} = {image.width * image.height:,} pixels "
                    f"is over validate.max_pixels ({max_pixels:,})"
                )
                return row
            image.load()  # full decode: catches truncated files that a header read accepts
        row["decodes"] = True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        row["error"] = f"{type(error).__name__}: {error}"
    return row


def build_manifest(images_root: Path, max_pixels: int | None = None) -> pd.DataFrame:
    """One row per file under `images_root`; class = the first folder, '' for files outside one.

    Images over `max_pixels` are inspected from their header only (see inspect_image).
    """
    rows = []
    for path in sorted(p for p in images_root.rglob("*") if p.is_file()):
        relative = path.relative_to(images_root)
        in_class_folder = len(relative.parts) == 2
        rows.append(
            {
                "path": relative.as_posix(),
                "class_name": relative.parts[0] if len(relative.parts) > 1 else "",
                "in_class_folder": in_class_folder,
                **inspect_image(path, max_pixels),
            }
        )
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def normalise_folder_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def folder_table(images_root: Path, manifest: pd.DataFrame, split_names: Iterable[str]) -> pd.DataFrame:
    """One row per top-level folder: how many valid images it directly holds, and if it looks like a split."""
    split_keys = {normalise_folder_name(n) for n in split_names}
    folders = sorted(p.name for p in images_root.iterdir() if p.is_dir())
    usable = manifest[manifest["in_class_folder"] & manifest["decodes"]]
    counts = usable.groupby("class_name").size()
    table = pd.DataFrame(
        {
            "folder": folders,
            "n_images": [int(counts.get(name, 0)) for name in folders],
            "looks_like_split": [normalise_folder_name(name) in split_keys for name in folders],
        }
    )
    smallest = table["n_images"].min() if len(table) else 0
    table["ratio_to_smallest"] = table["n_images"] / smallest if smallest else float("inf")
    return table


def extension_matches_format(manifest: pd.DataFrame) -> pd.Series:
    """For each file, whether its extension is one Pillow registers for its real format (a PNG named .jpg: False).

    None where the file is not an image at all: the decode check names those.
    """
    registered = Image.registered_extensions()  # ".jpg" -> "JPEG", ".png" -> "PNG", ...
    return pd.Series(
        [
            None if pd.isna(real) else registered.get(Path(path).suffix.lower()) == real
            for path, real in zip(manifest["path"], manifest["format"], strict=True)
        ],
        index=manifest.index,
        dtype=object,
    )


def label_conflict_column(manifest: pd.DataFrame) -> pd.Series:
    """For each file, how many distinct classes hold a byte-identical file (>1 = label conflict)."""
    if manifest.empty:
        return pd.Series(dtype="int64")
    return manifest.groupby("sha256")["class_name"].transform("nunique").astype("int64")


def image_checks(params: ValidateParams) -> list[Check]:
    expected = sorted(params.expected_classes)
    layout_hint = (
        f"Expected layout: images/<class>/<file> with one folder per class {expected}; "
        "train/validation/test splits are made by the preprocess step, never by folders"
    )
    E = gx.expectations
    return [
        Check(
            "folders",
            E.ExpectColumnValuesToBeInSet(column="looks_like_split", value_set=[False]),
            "folder names look like a train/test/validation split, not product classes",
            "folder",
            layout_hint,
        ),
        Check(
            "folders",
            E.ExpectColumnDistinctValuesToEqualSet(column="folder", value_set=expected),
            "class folders are not exactly the expected classes",
            None,
            layout_hint,
        ),
        Check(
            "folders",
            E.ExpectColumnValuesToBeBetween(column="n_images", min_value=params.min_images_per_class),
            f"class has fewer than {params.min_images_per_class} valid images",
            "folder",
        ),
        Check(
            "folders",
            E.ExpectColumnMaxToBeBetween(column="ratio_to_smallest", max_value=params.max_class_ratio),
            f"largest/smallest class ratio exceeds {params.max_class_ratio}",
        ),
        Check(
            "files",
            E.ExpectColumnValuesToBeInSet(column="in_class_folder", value_set=[True]),
            "stray file outside a class folder",
            "path",
            layout_hint,
        ),
        Check(
            "files",
            E.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]),
            "file does not decode fully as an image",
            "path_and_error",
        ),
        Check(
            "files",
            E.ExpectColumnValuesToBeInSet(column="format", value_set=list(params.image_formats)),
            f"image format is not one of {list(params.image_formats)}",
            "path",
        ),
        Check(
            "files",
            E.ExpectColumnValuesToBeInSet(column="extension_matches_format", value_set=[True]),
            "file extension does not match the image's real format",
            "path_and_format",
            "Rename the file to its real format's extension, or convert it",
        ),
        Check(
            "files",
            E.ExpectColumnValuesToBeBetween(column="pixels", max_value=params.max_pixels),
            f"image has more than validate.max_pixels ({params.max_pixels:,}) pixels: a decompression bomb "
            "or far larger than a photo needs",
            "path_and_size",
            "Downscale it; the served model refuses images over the same limit",
        ),
        Check(
            "files",
            E.ExpectColumnValuesToBeBetween(column="width", min_value=params.min_width),
            f"image narrower than {params.min_width} px",
            "path",
        ),
        Check(
            "files",
            E.ExpectColumnValuesToBeBetween(column="height", min_value=params.min_height),
            f"image shorter than {params.min_height} px",
            "path",
        ),
        Check(
            "files",
            E.ExpectColumnValuesToBeBetween(column="classes_with_same_bytes", max_value=1),
            "the same image (sha256) is filed under two or more classes (label conflict)",
            "path",
        ),
    ]


# --------------------------------------------------------------------------- reviewed labels


def review_table(reviews: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """labels/reviews.csv with the derived columns its expectations read, and each row's line for messages."""
    usable = manifest[manifest["decodes"] & manifest["in_class_folder"]]
    table = reviews.copy()
    table["row"] = [f"labels/reviews.csv line {i + 2} ({f or 'no file'})" for i, f in enumerate(table["file"])]
    table["image_in_dataset"] = table["sha256"].isin(set(usable["sha256"]))
    table["reviewer_named"] = table["reviewer"].astype(str).str.strip() != ""
    return table


def review_checks(params: ValidateParams) -> list[Check]:
    E = gx.expectations
    decisions = allowed_decisions(params.expected_classes)
    return [
        Check(
            "reviews",
            E.ExpectColumnValuesToBeInSet(column="image_in_dataset", value_set=[True]),
            "review names an image (sha256) that is not in the dataset",
            "row",
            "Remove the row, or restore the image it reviews",
        ),
        Check(
            "reviews",
            E.ExpectColumnValuesToBeInSet(column="decision", value_set=decisions),
            f"review decision is not one of {decisions}",
            "row",
        ),
        Check(
            "reviews",
            E.ExpectColumnValuesToBeInSet(column="reviewer_named", value_set=[True]),
            "review has no reviewer",
            "row",
        ),
        Check(
            "reviews",
            E.ExpectColumnValuesToBeUnique(column="sha256"),
            "the same image is reviewed on more than one row",
            "row",
        ),
    ]


# --------------------------------------------------------------------------- Data Docs that render offline

# GX 1.x writes Data Docs pages that load their scripts and stylesheets from CDNs: offline, the index is an empty
# table (bootstrap-table builds it) and the status icons are blank. These are the same files, pinned, with their
# licences, in common/report_assets (README.md there); make_data_docs_offline copies them into the site.
REPORT_ASSETS = Path(common.__file__).resolve().parent / "report_assets"
VENDOR_DIR = "static/vendor"  # the copies' folder inside a Data Docs site
DATA_DOCS_CDN_FILES: dict[str, str] = {
    "https://cdn.jsdelivr.net/npm/vega@5": "vega@5.33.1/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega-lite@5.23.0/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega-embed@6.29.0/vega-embed.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery@3.7.1/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper.js@1.12.9/popper.min.js",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap@4.3.1/bootstrap.min.js",
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap@4.3.1/bootstrap.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js":
        "bootstrap-table@1.19.1/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css":
        "bootstrap-table@1.19.1/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table@1.19.1/bootstrap-table-filter-control.min.js",
    # GX names 1.19.0's filter-control stylesheet (minified on the index, not on the other pages): 1.19.1's serves both.
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table@1.19.1/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table@1.19.1/bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker@1.9.0/bootstrap-datepicker.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker@1.9.0/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css":
        "fontawesome-free@6.6.0/css/all.min.css",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "bootstrap-dark@1.1.0/bootstrap-prefers-dark.min.css",
}  # fmt: skip
# GX's logos come from its S3 bucket; the site has its own copy in static/images (no dark variant: the light one).
GX_LOGOS = re.compile(r"https://great-expectations-web-assets\.s3\.us-east-2\.amazonaws\.com/"
                      r"(logo-long\.png|full_logo_dark\.png)(\?[^\"')\s]*)?")  # fmt: skip
ASSET_TAG = re.compile(r"<(?:script|link)\b[^>]*>")
SITE_TAG = re.compile(r"<(?:script|link|img)\b[^>]*>")  # what may name one of the site's static files
ASSET_URL = re.compile(r'\b(src|href)="([^"]+)"')
# What a browser would fetch from the web on its own: scripts, stylesheets, images, frames and CSS url()s.
WEB_LOAD = re.compile(
    r"""<(?:script|link|img|iframe|source|embed)\b[^>]*?\b(?:src|href)\s*=\s*["']?((?:https?:)?//[^"'\s>]+)"""
    r"""|url\(\s*["']?((?:https?:)?//[^"')\s]+)""",
    re.IGNORECASE,
)
MEDIA_TYPES = {
    ".js": "text/javascript", ".css": "text/css", ".woff2": "font/woff2", ".png": "image/png", ".ico": "image/x-icon",
}  # fmt: skip


def page_url(target: Path, page: Path) -> str:
    """The relative URL of `target` from the HTML file `page` (both in one site)."""
    return Path(os.path.relpath(target, page.parent)).as_posix()


def offline_page(page_html: str, page: Path, docs_dir: Path) -> str:
    """`page_html` with each CDN script and stylesheet pointing at its copy under VENDOR_DIR and GX's logo at
    static/images. Their integrity attributes go: a file:// page cannot make the CORS fetch SRI needs, and the
    copies are the files those hashes name (tests/reports checks it)."""

    def local(tag_match: re.Match[str]) -> str:
        tag = tag_match.group(0)
        url = ASSET_URL.search(tag)
        if url is None or url.group(2) not in DATA_DOCS_CDN_FILES:
            return tag
        copy = page_url(docs_dir / VENDOR_DIR / DATA_DOCS_CDN_FILES[url.group(2)], page)
        tag = tag.replace(url.group(0), f'{url.group(1)}="{copy}"')
        return re.sub(r'\s(?:integrity|crossorigin)="[^"]*"', "", tag)

    page_html = ASSET_TAG.sub(local, page_html)
    page_html = GX_LOGOS.sub(lambda m: page_url(docs_dir / "static" / "images" / "logo-long.png", page), page_html)
    # GX links the validation pages' favicon one folder too shallow.
    favicon = page_url(docs_dir / "static" / "images" / "favicon.ico", page)
    return re.sub(r'href="(?:\.\.?/)*static/images/favicon\.ico"', f'href="{favicon}"', page_html)


def make_data_docs_offline(docs_dir: Path) -> None:
    """Make the Data Docs site under `docs_dir` render from disk with no network: the pinned scripts,
    stylesheets and fonts are copied into VENDOR_DIR and every page points at them.

    Raises ValueError naming the page and the URL when a page would still fetch something from the web
    (a GX upgrade added an asset: vendor it in common/report_assets and map it in DATA_DOCS_CDN_FILES).
    """
    for package in sorted({name.split("/")[0] for name in DATA_DOCS_CDN_FILES.values()}):
        shutil.copytree(REPORT_ASSETS / package, docs_dir / VENDOR_DIR / package, dirs_exist_ok=True)
    for page in sorted(docs_dir.rglob("*.html")):
        page_html = offline_page(page.read_text(encoding="utf-8"), page, docs_dir)
        left = [a or b for a, b in WEB_LOAD.findall(page_html)]
        if left:
            raise ValueError(
                f"Data Docs page {page.relative_to(docs_dir)} still loads {left[0]} from the web: "
                "vendor it in common/report_assets and map it in components.validate.DATA_DOCS_CDN_FILES"
            )
        page.write_text(page_html, encoding="utf-8")


def asset_slots(page: Path, docs_dir: Path) -> tuple[str, set[str]]:
    """The text of an offline Data Docs page with each reference to the site's static files (scripts, stylesheets,
    images) turned into a slot, `data-asset-src="static/vendor/jquery@3.7.1/jquery.min.js"` (or data-asset-href),
    and the files it names: for a one-file report that carries each file once and fills the slots in the browser
    (pipelines.steps.data_docs_page)."""
    static = (docs_dir / "static").resolve()
    names: set[str] = set()

    def slot(tag_match: re.Match[str]) -> str:
        tag = tag_match.group(0)
        url = ASSET_URL.search(tag)
        target = (page.parent / url.group(2)).resolve() if url and "://" not in url.group(2) else None
        if target is None or not target.is_relative_to(static) or not target.is_file():
            return tag
        name = target.relative_to(docs_dir.resolve()).as_posix()
        names.add(name)
        return tag.replace(url.group(0), f'data-asset-{url.group(1)}="{name}"')

    return SITE_TAG.sub(slot, page.read_text(encoding="utf-8")), names


def site_asset(docs_dir: Path, name: str) -> dict[str, str]:
    """A static file of the site (`name` relative to `docs_dir`) to carry inside one page: `type` (media type)
    and `text` for scripts and stylesheets, `base64` for images. The files a stylesheet's url()s name (Font
    Awesome's fonts) become data: URLs, since a carried stylesheet has no folder to resolve them in."""
    path = docs_dir / name
    if path.suffix not in (".js", ".css"):
        return {"type": MEDIA_TYPES[path.suffix], "base64": base64.b64encode(path.read_bytes()).decode("ascii")}
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".css":

        def data_url(url_match: re.Match[str]) -> str:
            target = path.parent / url_match.group(1)
            if "://" in url_match.group(1) or not target.is_file():
                return url_match.group(0)  # a fallback format not vendored (.ttf): browsers take the woff2 first
            encoded = base64.b64encode(target.read_bytes()).decode("ascii")
            return f"url(data:{MEDIA_TYPES[target.suffix]};base64,{encoded})"

        text = re.sub(r"url\(\s*[\"']?([^\"')]+)[\"']?\s*\)", data_url, text)
    return {"type": MEDIA_TYPES[path.suffix], "text": text}


# --------------------------------------------------------------------------- step


def validate_dataset(
    images_root: Path,
    catalog_root: Path,
    params: ValidateParams,
    docs_dir: Path | None = None,
    reviews: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, ValidationReport, dict[str, Any]]:
    """Build the manifest and run every image, review and catalog expectation; returns the manifest, GX's report
    and the summary (counts, per-class images, catalog rows, every expectation's outcome)."""
    if not images_root.is_dir():
        raise FileNotFoundError(f"images folder {images_root} does not exist (did you run `dvc pull`?)")
    manifest = build_manifest(images_root, params.max_pixels)
    files = manifest.copy()
    files["classes_with_same_bytes"] = label_conflict_column(files)
    files["path_and_error"] = [f"{path} ({error})" for path, error in zip(files["path"], files["error"], strict=True)]
    files["extension_matches_format"] = extension_matches_format(files)
    files["path_and_format"] = files["path"] + " (a " + files["format"].astype(str) + " file)"
    files["pixels"] = files["width"] * files["height"]  # NaN where the header could not be read
    files["path_and_size"] = [
        f"{row.path} ({row.width:.0f}x{row.height:.0f} = {row.pixels:,.0f} pixels)" for row in files.itertuples()
    ]
    folders = folder_table(images_root, manifest, params.split_folder_names)
    tables: dict[str, pd.DataFrame] = {"files": files, "folders": folders}
    checks = image_checks(params)
    if reviews is not None and len(reviews):
        tables["reviews"] = review_table(reviews, manifest)
        checks += review_checks(params)

    catalog_files = sorted(catalog_root.glob("*.csv")) if catalog_root.is_dir() else []
    for csv_path in catalog_files:
        frame = with_catalog_columns(pd.read_csv(csv_path, dtype={"name": "string", "price": "string"}))
        table = f"catalog/{csv_path.name}"
        tables[table] = frame
        checks += catalog_checks(table, frame, params.catalog_required_columns)

    report, _ = run_checks(tables, checks, docs_dir)
    if docs_dir is not None:
        make_data_docs_offline(docs_dir)
    usable = manifest[manifest["decodes"] & manifest["in_class_folder"]]
    within_class_duplicates = usable[usable.duplicated(["class_name", "sha256"], keep="first")]
    summary = {
        "success": report.success,
        "n_files": int(len(manifest)),
        "n_images": int(len(usable)),
        "n_classes": int(usable["class_name"].nunique()),
        "per_class": {k: int(v) for k, v in usable.groupby("class_name").size().items()},
        "duplicates_within_class": int(len(within_class_duplicates)),
        "duplicate_examples": within_class_duplicates["path"].head(MAX_EXAMPLES).tolist(),
        "review_rows": 0 if reviews is None else int(len(reviews)),
        "catalog_rows": {
            name.removeprefix("catalog/"): int(len(frame))
            for name, frame in tables.items()
            if name.startswith("catalog/")
        },
        "expectations": [
            {
                "table": o.table,
                "fails_when": o.description,
                "success": o.success,
                "unexpected_count": o.unexpected_count,
                "examples": o.examples,
            }
            for o in report.outcomes
        ],
    }
    return manifest, report, summary


def headline_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics of a validation summary: whether it passed and a few counts."""
    return {
        "success": summary["success"],
        "failed_expectations": sum(not e["success"] for e in summary["expectations"]),
        "n_images": summary["n_images"],
        "n_classes": summary["n_classes"],
        "duplicates_within_class": summary["duplicates_within_class"],
    }


def failure_summary(report: ValidationReport) -> str:
    lines = [f"Data validation FAILED: {len(report.failures)} expectation(s) not met."]
    lines += [f"  - {outcome.sentence()}" for outcome in report.failures]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.validate", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="folder with one sub-folder per class")
    parser.add_argument("--catalog", type=Path, required=True, help="folder with the catalog CSVs")
    parser.add_argument("--reviews", type=Path, default=None, help="labels/reviews.csv: reviewed labels to check")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--manifest", type=Path, required=True, help="manifest CSV to write (on success)")
    parser.add_argument("--metrics", type=Path, required=True, help="output: pass/fail and a few counts (DVC)")
    parser.add_argument(
        "--report-dir", type=Path, required=True, help=f"output: {SUMMARY_FILE}, GX results and Data Docs"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # GX's Data Docs renderer logs a KeyError for aggregate expectations; the page still renders.
    logging.getLogger("great_expectations.render").setLevel(logging.CRITICAL)
    args = parse_args(argv)
    params = load_section(ValidateParams, "validate", args.params)
    with atomic_directory(args.report_dir) as staging:
        reviews = read_reviews(args.reviews) if args.reviews is not None else None
        manifest, report, summary = validate_dataset(args.images, args.catalog, params, staging / "data_docs", reviews)
        atomic_write_json(staging / "validation_results.json", report.raw_results)
        atomic_write_json(staging / SUMMARY_FILE, summary)
    atomic_write_json(args.metrics, headline_metrics(summary))
    log.info(
        "%d files, %d valid images in %d classes; Data Docs: %s",
        summary["n_files"], summary["n_images"], summary["n_classes"], args.report_dir / "data_docs" / "index.html",
    )  # fmt: skip
    if summary["duplicates_within_class"]:
        log.warning("%d duplicate image(s) within a class, e.g. %s",
                    summary["duplicates_within_class"], summary["duplicate_examples"])  # fmt: skip
    if not report.success:
        print(failure_summary(report), file=sys.stderr)
        args.manifest.unlink(missing_ok=True)  # a stale manifest must not feed preprocess
        return 1
    atomic_write_text(args.manifest, manifest.to_csv(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
