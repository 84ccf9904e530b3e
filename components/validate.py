"""Validate step: inspect every image file and catalog row, then gate them with Great Expectations.

This is the first wall against the paper's mistake (split folders used as classes): the
layout, the class list, every file's decodability and label conflicts are checked before
anything is trained. Outputs a manifest (input of preprocess), metrics and GX Data Docs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig
from PIL import Image, UnidentifiedImageError

from common.io import atomic_directory, atomic_write_json, atomic_write_text
from common.params import load_section
from common.reviews import allowed_decisions, read_reviews

log = logging.getLogger("components.validate")

MANIFEST_COLUMNS = [
    "path", "class_name", "in_class_folder", "bytes", "sha256", "format",
    "width", "height", "mode", "decodes", "error",
]  # fmt: skip
MAX_EXAMPLES = 5


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


@dataclass(frozen=True)
class Check:
    """One expectation with the sentence a person reads when it fails."""

    table: str
    expectation: Any
    description: str
    example_column: str | None = None
    hint: str = ""


@dataclass
class CheckOutcome:
    table: str
    description: str
    success: bool
    unexpected_count: int
    examples: list[str]
    observed: Any = None
    hint: str = ""

    def sentence(self) -> str:
        text = f"[{self.table}] {self.description}"
        if self.unexpected_count:
            text += f": {self.unexpected_count} offending"
        if self.examples:
            text += f", e.g. {', '.join(self.examples)}"
        if self.observed is not None:
            text += f" (observed: {self.observed})"
        if self.hint:
            text += f". {self.hint}"
        return text


@dataclass
class ValidationReport:
    outcomes: list[CheckOutcome]
    raw_results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    @property
    def failures(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if not o.success]


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


# --------------------------------------------------------------------------- catalog


def catalog_checks(table: str, frame: pd.DataFrame, required_columns: list[str]) -> list[Check]:
    """Expectations for one catalog CSV; column-value checks only for columns that exist."""
    E = gx.expectations
    checks = [
        Check(table, E.ExpectColumnToExist(column=column), f"required column '{column}' is missing")
        for column in required_columns
    ]
    if "name" in frame.columns:
        checks.append(
            Check(
                table,
                E.ExpectColumnValuesToBeInSet(column="name_is_blank", value_set=[False]),
                "product name is empty",
                "row",
            )
        )
    if "price" in frame.columns:
        checks += [
            Check(
                table,
                E.ExpectColumnValuesToBeInSet(column="price_parses", value_set=[True]),
                "price is neither empty nor a number",
                "row",
            ),
            Check(
                table,
                E.ExpectColumnValuesToBeBetween(column="price_value", min_value=0, strict_min=True),
                "price is not > 0",
                "row",
            ),
        ]
    return checks


def with_catalog_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the derived columns the catalog expectations read (blank names, parsed prices)."""
    frame = frame.copy()
    frame["row"] = [f"row {i + 2}" for i in range(len(frame))]  # +2: header line, 1-based
    if "name" in frame.columns:
        frame["name_is_blank"] = frame["name"].isna() | (frame["name"].astype(str).str.strip() == "")
    if "price" in frame.columns:
        numeric = pd.to_numeric(frame["price"], errors="coerce")
        frame["price_parses"] = frame["price"].isna() | numeric.notna()
        frame["price_value"] = numeric
    return frame


@dataclass
class CatalogReport:
    """Catalog validation for one frame: failed checks, and the reasons per offending row index."""

    outcomes: list[CheckOutcome]
    row_reasons: dict[int, list[str]]

    @property
    def failures(self) -> list[str]:
        return [o.sentence() for o in self.outcomes if not o.success]


def validate_catalog(frame: pd.DataFrame, required_columns: list[str], table: str = "catalog") -> CatalogReport:
    """Run the catalog expectations on one frame (used by validate and by build_kb to skip bad rows)."""
    prepared = with_catalog_columns(frame)
    checks = catalog_checks(table, prepared, required_columns)
    report, indices = run_checks({table: prepared}, checks)
    row_reasons: dict[int, list[str]] = {}
    for outcome, unexpected in zip(report.outcomes, indices, strict=True):
        for index in unexpected:
            row_reasons.setdefault(int(index), []).append(outcome.description)
    return CatalogReport(report.outcomes, row_reasons)


def catalog_failures(frame: pd.DataFrame, required_columns: list[str]) -> list[str]:
    """Sentences for every catalog expectation that fails on `frame` (empty list = valid)."""
    return validate_catalog(frame, required_columns).failures


# --------------------------------------------------------------------------- GX runner


def quiet_context(docs_dir: Path | None = None) -> Any:
    """An ephemeral (in-memory, no cloud) GX context, optionally building Data Docs into `docs_dir`."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name="productlens",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return context


def examples_for(frame: pd.DataFrame, indices: list[Any], column: str | None) -> list[str]:
    if column is None:
        return []
    picked = [i for i in indices if i in frame.index][:MAX_EXAMPLES]
    if column == "path_and_error":
        return [f"{frame.at[i, 'path']} ({frame.at[i, 'error']})" for i in picked]
    return [str(frame.at[i, column]) for i in picked]


def run_checks(
    tables: dict[str, pd.DataFrame], checks: list[Check], docs_dir: Path | None = None
) -> tuple[ValidationReport, list[list[Any]]]:
    """Run each table's expectations as one GX suite; return outcomes and each check's offending indices."""
    context = quiet_context(docs_dir)
    source = context.data_sources.add_pandas("productlens")
    raw_results: list[dict[str, Any]] = []
    results_by_check: dict[int, Any] = {}
    for table, frame in tables.items():
        table_checks = [(i, c) for i, c in enumerate(checks) if c.table == table]
        if not table_checks:
            continue
        suite_name = re.sub(r"[^A-Za-z0-9_]+", "_", table)
        batch = source.add_dataframe_asset(suite_name).add_batch_definition_whole_dataframe("all")
        suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
        for _, check in table_checks:
            suite.add_expectation(check.expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
        )
        actions = [gx.checkpoint.UpdateDataDocsAction(name="data_docs")] if docs_dir is not None else []
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{suite_name}_checkpoint",
                validation_definitions=[definition],
                actions=actions,
                result_format={"result_format": "COMPLETE"},
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": frame})
        suite_result = next(iter(run.run_results.values()))
        raw_results.append(suite_result.to_json_dict())
        # Results come back in suite order, which is the order the checks were added.
        for (index, _), result in zip(table_checks, suite_result.results, strict=True):
            results_by_check[index] = result

    outcomes, indices = [], []
    for index, check in enumerate(checks):
        result = results_by_check[index]
        details = result.result or {}
        unexpected = list(details.get("unexpected_index_list") or [])
        if result.exception_info and result.exception_info.get("raised_exception"):
            details = {"observed_value": result.exception_info.get("exception_message")}
        observed = details.get("observed_value")
        if isinstance(observed, float):
            observed = round(observed, 3)
        if "partial_missing_list" in details:  # set expectations report both sides of the difference
            observed = (
                f"missing {sorted(details['partial_missing_list'])}, "
                f"unexpected {sorted(details.get('partial_unexpected_list') or [])}"
            )
        outcomes.append(
            CheckOutcome(
                table=check.table,
                description=check.description,
                success=bool(result.success),
                unexpected_count=int(details.get("unexpected_count") or 0),
                examples=examples_for(tables[check.table], unexpected, check.example_column),
                observed=None if result.success else observed,
                hint="" if result.success else check.hint,
            )
        )
        indices.append(unexpected)
    return ValidationReport(outcomes, raw_results), indices


# --------------------------------------------------------------------------- step


def validate_dataset(
    images_root: Path,
    catalog_root: Path,
    params: ValidateParams,
    docs_dir: Path | None = None,
    reviews: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, ValidationReport, dict[str, Any]]:
    """Build the manifest and run every image, review and catalog expectation; returns manifest, report, metrics."""
    if not images_root.is_dir():
        raise FileNotFoundError(f"images folder {images_root} does not exist (did you run `dvc pull`?)")
    manifest = build_manifest(images_root, params.max_pixels)
    files = manifest.copy()
    files["classes_with_same_bytes"] = label_conflict_column(files)
    files["path_and_error"] = files["path"]
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
    usable = manifest[manifest["decodes"] & manifest["in_class_folder"]]
    within_class_duplicates = usable[usable.duplicated(["class_name", "sha256"], keep="first")]
    metrics = {
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
    return manifest, report, metrics


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
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--report-dir", type=Path, required=True, help="GX results and Data Docs")
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
        manifest, report, metrics = validate_dataset(args.images, args.catalog, params, staging / "data_docs", reviews)
        atomic_write_json(staging / "validation_results.json", report.raw_results)
    atomic_write_json(args.metrics, metrics)
    log.info(
        "%d files, %d valid images in %d classes; Data Docs: %s",
        metrics["n_files"], metrics["n_images"], metrics["n_classes"], args.report_dir / "data_docs" / "index.html",
    )  # fmt: skip
    if metrics["duplicates_within_class"]:
        log.warning("%d duplicate image(s) within a class, e.g. %s",
                    metrics["duplicates_within_class"], metrics["duplicate_examples"])  # fmt: skip
    if not report.success:
        print(failure_summary(report), file=sys.stderr)
        args.manifest.unlink(missing_ok=True)  # a stale manifest must not feed preprocess
        return 1
    atomic_write_text(args.manifest, manifest.to_csv(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
