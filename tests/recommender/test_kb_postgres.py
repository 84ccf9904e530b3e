"""The knowledge base on PostgreSQL (PRODUCTLENS_DB_URL): build, full-text search and SQL pre-filters.

Runs a throwaway server (initdb + pg_ctl on a Unix socket in tmp) when PostgreSQL's binaries and the
psycopg driver are installed; skips, saying which is missing, otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from recommender import build_kb, kb
from recommender.ranking import Preferences, eligible
from tests.conftest import REPO_ROOT
from tests.fixtures.catalog import write_catalog, write_params

pytestmark = pytest.mark.e2e

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres_user() -> list[str]:
    # initdb refuses to run as root; the Debian package's 'postgres' account runs the server.
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed (pip install psycopg)")
    initdb = shutil.which("initdb") or str(PG_BIN / "initdb")
    pg_ctl = shutil.which("pg_ctl") or str(PG_BIN / "pg_ctl")
    if not (Path(initdb).exists() and Path(pg_ctl).exists()):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    # Not under pytest's tmp dir: the postgres account cannot enter root's 0700 pytest-of-root folder.
    root = Path(tempfile.mkdtemp(prefix="productlens-pg-"))
    root.chmod(0o777)
    data, socket_dir = root / "data", root
    run = _as_postgres_user()
    subprocess.run([*run, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    options = f"-p 55433 -k {socket_dir} -c listen_addresses='' -c fsync=off"
    subprocess.run([*run, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"], check=True,
                   capture_output=True)  # fmt: skip
    try:
        yield f"postgresql+psycopg://postgres@/postgres?host={socket_dir}&port=55433"
    finally:
        subprocess.run([*run, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def built_knowledge_base(postgres_url: str, tmp_path: Path):  # noqa: ANN201
    """Build the test catalog into the throwaway server with the real CLI; return an engine on it."""
    catalog = write_catalog(tmp_path / "catalog")
    params = write_params(tmp_path / "params.yaml", REPO_ROOT / "params.yaml")
    assert build_kb.main(["--catalog", str(catalog), "--params", str(params), "--db-url", postgres_url,
                          "--metrics", str(tmp_path / "m.json")]) == 0  # fmt: skip
    return kb.make_engine(postgres_url)


def test_postgres_knowledge_base_searches_and_filters_like_sqlite(postgres_url: str, tmp_path: Path) -> None:
    engine = built_knowledge_base(postgres_url, tmp_path)
    with engine.connect() as conn:
        cards = kb.search_products(conn, "rtx 4070", limit=5)
        wd = kb.search_products(conn, "western digital", limit=5)
        wireless = Preferences.from_inputs(budget_max=100, require=["wireless=true", "max_dpi>=10000"])
        mice = kb.candidate_rows(conn, "mouse", wireless, pool=50)
        everything = kb.candidate_rows(conn, "mouse", Preferences(), pool=50)
        monitors = kb.candidate_rows(conn, "monitor", Preferences.from_inputs(require=["screen_size=25..32"]), pool=50)
    engine.dispose()
    assert [c.name for c in cards] == ["MSI GeForce RTX 4070 VENTUS 2X"]
    assert [c.brand for c in wd] == ["Western Digital"]
    assert sorted(m.id for m in mice) == sorted(m.id for m in everything if eligible(m, wireless))
    assert {m.name for m in mice} == {"Logitech G305 LIGHTSPEED", "Razer Viper Ultimate"}
    assert {m.name for m in monitors} == {"Asus TUF Gaming VG27AQ", "LG 32GN600-B"}


def test_postgres_lookup_of_an_id_no_product_can_have_finds_nothing(postgres_url: str, tmp_path: Path) -> None:
    """Ids past PostgreSQL's 32-bit INTEGER (and past 64 bits) are "no such product", not a database error."""
    engine = built_knowledge_base(postgres_url, tmp_path)
    with engine.connect() as conn:
        first = kb.get_product(conn, 1)
        missing = {pid: kb.get_product(conn, pid) for pid in (0, -1, 2**31, 2**63, 10**20, -(10**20))}
    engine.dispose()
    assert first is not None and first.id == 1
    assert missing == dict.fromkeys(missing)
