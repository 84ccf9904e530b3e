"""Suite-wide settings and fixture plugins (each concern keeps its fixtures in tests/fixtures/)."""

from __future__ import annotations

import os
import sqlite3  # noqa: F401  - before any TensorFlow import: TF's bundled SQLite has no FTS5 (recommender/__init__.py)
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]

pytest_plugins: list[str] = ["tests.fixtures.model_server", "tests.fixtures.knowledge_base", "tests.fixtures.training"]
