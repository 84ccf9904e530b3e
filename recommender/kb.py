"""The product knowledge base's queries: products by id, category facts, full-text search and candidates.

A SQLite file is the embedded default (FTS5 on product names); PostgreSQL is used when
PRODUCTLENS_DB_URL points at one (a GIN index on to_tsvector('simple', name)). Everything here
is read-only; the schema and the engine live in recommender.kb_schema (what build_kb writes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    case,
    func,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from recommender.kb_schema import (  # noqa: F401  (re-exported: callers open the KB through recommender.kb)
    DB_URL_ENV,
    DEFAULT_DB_PATH,
    PG_DOCUMENT,
    Category,
    ClassCategory,
    KbInfo,
    Product,
    create_name_search,
    create_schema,
    default_db_url,
    make_engine,
    sqlite_url,
)
from recommender.ranking import SPEC_ALIASES, Preferences, ProductRow, Sort, SpecRequirement

# --------------------------------------------------------------------------- reads

PRODUCT_COLUMNS = (
    Product.id,
    Product.category,
    Product.name,
    Product.brand,
    Product.price,
    Product.specs,
    Product.quality,
    Product.value_score,
)


def _row(mapping: Any) -> ProductRow:
    return ProductRow(
        id=mapping.id,
        category=mapping.category,
        name=mapping.name,
        brand=mapping.brand,
        price=mapping.price,
        specs=mapping.specs or {},
        quality=mapping.quality,
        value_score=mapping.value_score,
    )


# products.id is SQL INTEGER (32-bit on PostgreSQL) and build_kb numbers products from 1.
MAX_PRODUCT_ID = 2**31 - 1


def get_product(conn: Connection, product_id: int) -> ProductRow | None:
    """The product with this id, or None; an id no product can have (under 1, over MAX_PRODUCT_ID) is not
    sent to the database, whose driver would fail on it (SQLite: OverflowError, PostgreSQL: out of range)."""
    if not 1 <= product_id <= MAX_PRODUCT_ID:
        return None
    found = conn.execute(select(*PRODUCT_COLUMNS).where(Product.id == product_id)).first()
    return _row(found) if found else None


@dataclass(frozen=True)
class CategoryFacts:
    name: str
    products: int
    priced: int
    min_price: float | None
    median_price: float | None
    max_price: float | None
    top_brands: list[str]
    spec_names: list[str]


def category_facts(conn: Connection, names: Iterable[str] | None = None) -> dict[str, CategoryFacts]:
    query = select(Category.__table__)
    if names is not None:
        query = query.where(Category.__table__.c.name.in_(list(names)))
    return {
        row.name: CategoryFacts(
            row.name,
            row.products,
            row.priced,
            row.min_price,
            row.median_price,
            row.max_price,
            list(row.top_brands or []),
            list(row.spec_names or []),
        )
        for row in conn.execute(query)
    }


def class_categories(conn: Connection) -> dict[str, str | None]:
    return {row.class_name: row.category for row in conn.execute(select(ClassCategory.__table__))}


def kb_info(conn: Connection) -> dict[str, Any]:
    return {row.key: row.value for row in conn.execute(select(KbInfo.__table__))}


def _sort_order(sort: Sort, priced_only: bool) -> list[Any]:
    """ORDER BY for a sort; with a budget every row has a price, so plain ASC/DESC can follow an index."""
    if sort == "cheapest":
        return [Product.price.asc()] if priced_only else [Product.price.asc().nulls_last()]
    if sort == "premium":
        return [Product.price.desc()] if priced_only else [Product.price.desc().nulls_last()]
    if priced_only:  # value_score is NULL exactly when price is
        return [Product.value_score.desc(), Product.price.asc()]
    return [Product.value_score.desc().nulls_last(), Product.price.asc().nulls_last()]


def _requirement_clause(requirement: SpecRequirement, dialect: str, tag: str) -> Any:
    """SQL for one required spec with the ranking's meaning (`SpecRequirement.matches`), type-guarded so a
    text value never meets a numeric comparison. Aliased keys: the first one a product has is checked."""
    binds: dict[str, Any] = {}

    def one(key: str, n: int) -> str:
        if dialect == "sqlite":
            path = f"'$.{key}'"  # key is a \w+ word (SpecRequirement.parse)
            kind, value = f"json_type(specs, {path})", f"json_extract(specs, {path})"
            number_kinds, text_kind = "('integer', 'real')", "'text'"
            as_number, as_text = value, value
        elif dialect == "postgresql":
            binds[f"{tag}k{n}"] = key
            kind = f"json_typeof(specs -> :{tag}k{n})"
            value = f"(specs ->> :{tag}k{n})"
            number_kinds, text_kind = "('number')", "'string'"
            as_number, as_text = f"CAST({value} AS DOUBLE PRECISION)", value
        else:
            raise NotImplementedError(f"required specs are not supported on '{dialect}'")
        if requirement.op == "range":
            bounds = []
            if requirement.low is not None:
                binds[f"{tag}lo"] = requirement.low
                bounds.append(f"{as_number} >= :{tag}lo")
            if requirement.high is not None:
                binds[f"{tag}hi"] = requirement.high
                bounds.append(f"{as_number} <= :{tag}hi")
            return f"(CASE WHEN {kind} IN {number_kinds} THEN ({' AND '.join(bounds)}) ELSE FALSE END)"
        if isinstance(requirement.value, bool):
            wanted = "'true'" if requirement.value else "'false'"
            if dialect == "sqlite":
                return f"({kind} = {wanted})"
            return f"({kind} = 'boolean' AND {value} = {wanted})"
        if isinstance(requirement.value, int | float):
            binds[f"{tag}v"] = float(requirement.value)
            return f"(CASE WHEN {kind} IN {number_kinds} THEN abs({as_number} - :{tag}v) < 1e-9 ELSE FALSE END)"
        escaped = str(requirement.value).lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        binds[f"{tag}t"] = f"%{escaped}%"
        return f"({kind} = {text_kind} AND lower({as_text}) LIKE :{tag}t ESCAPE '\\')"

    keys = SPEC_ALIASES.get(requirement.key, (requirement.key,))
    clause = one(keys[-1], len(keys) - 1)
    for n in range(len(keys) - 2, -1, -1):  # the first key a product has decides, as in the ranking
        if dialect == "sqlite":
            present = f"json_type(specs, '$.{keys[n]}') IS NOT NULL AND json_type(specs, '$.{keys[n]}') != 'null'"
        else:
            binds[f"{tag}p{n}"] = keys[n]
            present = f"COALESCE(json_typeof(specs -> :{tag}p{n}), 'null') != 'null'"
        clause = f"(CASE WHEN {present} THEN {one(keys[n], n)} ELSE {clause} END)"
    return text(clause).bindparams(**binds)


def candidate_rows(conn: Connection, category: str, preferences: Preferences, pool: int) -> list[ProductRow]:
    """Rows of `category` the ranking will choose from: budget, excluded brands and required specs applied
    in SQL, preferred brands first, then the requested sort, at most `pool` rows."""
    return [_row(r) for r in conn.execute(_candidates(PRODUCT_COLUMNS, conn.dialect.name, category, preferences, pool))]


def candidate_ids(conn: Connection, category: str, preferences: Preferences, pool: int) -> list[int]:
    """The ids of `candidate_rows`, in its order: the app reads only these and takes the rows it already holds
    from memory (a row's specs JSON is then decoded once per KB build, not once per request)."""
    return list(conn.execute(_candidates((Product.id,), conn.dialect.name, category, preferences, pool)).scalars())


def products_by_id(conn: Connection, ids: Iterable[int]) -> dict[int, ProductRow]:
    """The products with these ids (ids no product has are left out), in one query."""
    wanted = [i for i in dict.fromkeys(ids) if 1 <= i <= MAX_PRODUCT_ID]
    if not wanted:
        return {}
    return {r.id: _row(r) for r in conn.execute(select(*PRODUCT_COLUMNS).where(Product.id.in_(wanted)))}


def _candidates(columns: Iterable[Any], dialect: str, category: str, preferences: Preferences, pool: int) -> Any:
    query = select(*columns).where(Product.category == category)
    if preferences.has_budget:
        # price + 0 keeps SQLite from picking the price index for the range and sorting every match afterwards.
        by_value_on_sqlite = preferences.sort == "best_value" and dialect == "sqlite"
        price = Product.price + 0 if by_value_on_sqlite else Product.price
        query = query.where(price.is_not(None))
        if preferences.budget_min is not None:
            query = query.where(price >= preferences.budget_min)
        if preferences.budget_max is not None:
            query = query.where(price <= preferences.budget_max)
    if preferences.excluded_brands:
        query = query.where(func.lower(Product.brand).not_in([b.lower() for b in preferences.excluded_brands]))
    for n, requirement in enumerate(preferences.requirements):
        query = query.where(_requirement_clause(requirement, dialect, f"r{n}"))
    order: list[Any] = []
    if preferences.preferred_brands:
        preferred = func.lower(Product.brand).in_([b.lower() for b in preferences.preferred_brands])
        order.append(case((preferred, 0), else_=1))
    return query.order_by(*order, *_sort_order(preferences.sort, preferences.has_budget), Product.id).limit(pool)


def list_products(
    conn: Connection, category: str | None = None, max_price: float | None = None, limit: int = 20, offset: int = 0
) -> list[ProductRow]:
    """Products by category and price ceiling, cheapest first (rows without a price last)."""
    query = select(*PRODUCT_COLUMNS)
    if category:
        query = query.where(Product.category == category)
    if max_price is not None:
        query = query.where(Product.price.is_not(None), Product.price <= max_price)
    query = query.order_by(Product.price.asc().nulls_last(), Product.id).limit(limit).offset(offset)
    return [_row(r) for r in conn.execute(query)]


_TOKEN = re.compile(r"\w+", re.UNICODE)


def search_terms(query: str) -> list[str]:
    """Lower-cased word tokens of a search box string (punctuation is a separator, as in the index)."""
    return [t.lower() for t in _TOKEN.findall(query)]


def search_products(
    conn: Connection,
    query: str,
    category: str | None = None,
    max_price: float | None = None,
    limit: int = 20,
) -> list[ProductRow]:
    """Full-text search on product names (and their keywords: category, chipset, socket, ...).

    Every word must match as a prefix; best matches first, then cheapest.
    """
    terms = search_terms(query)
    if not terms:
        return list_products(conn, category, max_price, limit)
    filters = []
    params: dict[str, Any] = {"limit": limit}
    if category:
        filters.append("p.category = :category")
        params["category"] = category
    if max_price is not None:
        filters.append("p.price IS NOT NULL AND p.price <= :max_price")
        params["max_price"] = max_price
    where = "".join(f" AND {f}" for f in filters)
    columns = "p.id, p.category, p.name, p.brand, p.price, p.specs, p.quality, p.value_score"
    if conn.dialect.name == "sqlite":
        params["match"] = " ".join(f'"{t}"*' for t in terms)
        sql = (
            f"SELECT {columns} FROM products_fts f JOIN products p ON p.id = f.rowid "
            f"WHERE products_fts MATCH :match{where} "
            "ORDER BY bm25(products_fts, 1.0, 0.5), p.price IS NULL, p.price, p.id LIMIT :limit"
        )
    elif conn.dialect.name == "postgresql":
        params["match"] = " & ".join(f"{t}:*" for t in terms)
        sql = (
            f"SELECT {columns} FROM products p "
            f"WHERE {PG_DOCUMENT} @@ to_tsquery('simple', :match){where} "
            f"ORDER BY ts_rank({PG_DOCUMENT}, to_tsquery('simple', :match)) DESC, "
            "p.price ASC NULLS LAST, p.id LIMIT :limit"
        )
    else:
        raise NotImplementedError(f"no full-text search for database '{conn.dialect.name}'")
    stmt = text(sql).columns(*PRODUCT_COLUMNS)
    try:
        return [_row(r) for r in conn.execute(stmt, params)]
    except OperationalError as error:
        if "fts5" in str(error):
            raise RuntimeError(
                "this process's SQLite has no FTS5: TensorFlow was imported before sqlite3 and its bundled "
                "SQLite took over; import recommender (or sqlite3) before tensorflow"
            ) from error
        raise


def matched_fields(row: ProductRow, query: str) -> list[str]:
    """Which fields a search matched on, for each word the first that has it: "name", "category" or a spec
    ("chipset", "socket", ...): what the full-text index holds (name and keywords)."""
    fields = {"name": row.name, "category": row.category.replace("-", " ")} | {
        key: str(value) for key, value in row.specs.items() if not isinstance(value, bool)
    }
    words = {field: search_terms(text) for field, text in fields.items()}

    def first_field_with(term: str) -> str | None:
        return next((field for field, tokens in words.items() if any(t.startswith(term) for t in tokens)), None)

    matched = {first_field_with(term) for term in search_terms(query)}
    return [field for field in fields if field in matched]


class UnknownCategory(ValueError):
    """A category the knowledge base does not have; the message lists those it has."""


def check_category(conn: Connection, category: str) -> None:
    """Raise UnknownCategory naming the valid categories (and the category of a model class given instead)."""
    known = sorted(category_facts(conn))
    if category in known:
        return
    hint = ""
    mapped = class_categories(conn).get(category)
    if mapped is not None:
        hint = f" (the model's class {category} is the category {mapped})"
    raise UnknownCategory(f"Unknown category '{category}'{hint}; the categories are: {', '.join(known)}.")


def count_products(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(Product)).scalar_one())
