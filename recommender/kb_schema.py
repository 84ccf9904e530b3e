"""The product knowledge base's schema and engine: tables, the database URL, and the full-text index.

What the KB builder (recommender.build_kb) writes and the queries in recommender.kb read. It knows nothing of
ranking, so a change to how products are ranked does not rebuild the knowledge base.

The `feedback` table (users' answers to "Is this a <class>?", recommender/feedback.py) has a metadata of its
own, `FeedbackBase`: it is data the app collects, not something the build derives from the catalog, so
`create_schema`'s drop_all never touches it and a KB rebuild in the same database keeps every answer.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    inspect,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The PostgreSQL document searched; the GIN index is on exactly this expression so queries use it.
PG_DOCUMENT = "to_tsvector('simple', name || ' ' || keywords)"

DEFAULT_DB_PATH = Path("artifacts/kb/productlens.db")
DB_URL_ENV = "PRODUCTLENS_DB_URL"


class Base(DeclarativeBase):
    pass


class Category(Base):
    """One catalog category with the facts the upload page shows (count, price range, top brands)."""

    __tablename__ = "categories"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    products: Mapped[int] = mapped_column(Integer)
    priced: Mapped[int] = mapped_column(Integer)
    min_price: Mapped[float | None] = mapped_column(Float)
    median_price: Mapped[float | None] = mapped_column(Float)
    max_price: Mapped[float | None] = mapped_column(Float)
    top_brands: Mapped[list[str]] = mapped_column(JSON)
    spec_names: Mapped[list[str]] = mapped_column(JSON)


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    category: Mapped[str] = mapped_column(String(64), ForeignKey("categories.name"))
    name: Mapped[str] = mapped_column(Text)
    brand: Mapped[str] = mapped_column(String(128))
    price: Mapped[float | None] = mapped_column(Float)  # None: no current offer
    specs: Mapped[dict[str, Any]] = mapped_column(JSON)
    quality: Mapped[float] = mapped_column(Float)  # geometric mean of value specs / category median (1 = typical)
    value_score: Mapped[float | None] = mapped_column(Float)  # quality per dollar vs. the median; None without price
    keywords: Mapped[str] = mapped_column(Text)  # searched with the name: category and key specs (GPU chipset, ...)
    source: Mapped[str] = mapped_column(String(128))  # "<file>.csv:<line>"

    __table_args__ = (
        Index("ix_products_category_price", "category", "price"),
        # Best value (the default sort) reads this index in order and stops at the pool size.
        Index("ix_products_category_value", "category", text("value_score DESC"), "price", "id"),
        Index("ix_products_brand", "brand"),
    )


class ClassCategory(Base):
    """Model class -> catalog category; category is NULL for classes without a catalog (cables, microphone)."""

    __tablename__ = "class_categories"

    class_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    category: Mapped[str | None] = mapped_column(String(64))


class KbInfo(Base):
    """Build metadata: key -> JSON value (build time, row counts, skipped rows by reason)."""

    __tablename__ = "kb_info"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)


class FeedbackBase(DeclarativeBase):
    """Tables the app writes while it serves: out of `Base.metadata`, so a KB rebuild neither drops nor empties them."""


class Feedback(FeedbackBase):
    """One user's answer to "Is this a <predicted_class>?": `user_class` (= predicted_class when confirmed).

    The photo is in the feedback store under its sha256 (`image_file`, relative to the store's root). An answer
    nominates the photo for blind review; it is not a label decision.
    """

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_file: Mapped[str] = mapped_column(String(128))  # "<sha256[:2]>/<sha256>.<ext>" in the feedback store
    predicted_class: Mapped[str] = mapped_column(String(64))
    user_class: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# --------------------------------------------------------------------------- engine


def default_db_url() -> str:
    return os.environ.get(DB_URL_ENV) or f"sqlite:///{DEFAULT_DB_PATH}"


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path)}"


def make_engine(url: str | None = None) -> Engine:
    """An engine for `url` (default: PRODUCTLENS_DB_URL, else the SQLite file under artifacts/kb/)."""
    url = url or default_db_url()
    if url.startswith("sqlite"):
        # Requests are served from a thread pool; the file is read-only at serving time.
        return create_engine(url, connect_args={"check_same_thread": False})
    return create_engine(url, pool_pre_ping=True)


def create_schema(engine: Engine) -> None:
    """(Re)create the knowledge base's tables, empty. The feedback table is not one of them (FeedbackBase)."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)


def create_feedback_schema(engine: Engine) -> None:
    """Create the feedback table where it is missing; an existing one, and its rows, stay as they are."""
    try:
        FeedbackBase.metadata.create_all(engine)
    except SQLAlchemyError:
        # Another worker may have created it between the check and the CREATE: that is the state we want.
        if not inspect(engine).has_table(Feedback.__tablename__):
            raise


def create_name_search(conn: Connection) -> None:
    """Build the full-text index on product names (after the products are inserted)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("DROP TABLE IF EXISTS products_fts")
        conn.exec_driver_sql(
            "CREATE VIRTUAL TABLE products_fts USING fts5("
            "name, keywords, content='products', content_rowid='id', tokenize='unicode61 remove_diacritics 2')"
        )
        conn.exec_driver_sql("INSERT INTO products_fts(products_fts) VALUES ('rebuild')")
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql("DROP INDEX IF EXISTS ix_products_name_fts")
        conn.exec_driver_sql(f"CREATE INDEX ix_products_name_fts ON products USING gin ({PG_DOCUMENT})")
        conn.exec_driver_sql("ANALYZE products")
    else:
        raise NotImplementedError(f"no full-text search for database '{conn.dialect.name}' (use SQLite or PostgreSQL)")
