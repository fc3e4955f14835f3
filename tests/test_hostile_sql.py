"""Issue 30, items 4 and 9 (index part): `mlipops query` is bounded and the index survives a failed rebuild.

A query is one read-only SELECT (DuckDB's own parser says what each statement is), runs on a connection
whose configuration is locked (no file access, a memory limit, no spilling, 2 threads), is interrupted
after --timeout seconds and fetches at most --limit rows. The index is built beside the old one and
renamed over it; dvc.yaml keeps the old one in place while the stage runs (``persist: true``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mlipops.errors import MlipopsError
from mlipops.frames import write_extxyz
from mlipops.index.build import build_index, connect_read_only, query
from mlipops.params import DescriptorParams, IndexParams
from mlipops.quarantine import rejected_frame
from test_bad_input import error_line, mlipops
from test_index import _frames

REPO = Path(__file__).resolve().parents[1]
ENDLESS = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT max(n) FROM r"
BIG = "SELECT * FROM range(20000000)"  # 20M rows


def _curated(root: Path) -> None:
    """validate's outs: accepted frames, the quarantine, and (none) saved training descriptors."""
    from mlipops.descriptor_store import write_no_saved_descriptors

    (root / "data/curated").mkdir(parents=True, exist_ok=True)
    write_extxyz(root / "data/curated/accepted.extxyz", _frames())
    rejected_frame([]).to_parquet(root / "data/curated/quarantine.parquet", index=False)
    write_no_saved_descriptors(root / "data/curated/training_descriptors", "written by the test")


@pytest.fixture(scope="module")
def sql_db(tmp_path_factory) -> Path:
    """A small real index (4 frames) in a project layout: data/index.duckdb."""
    root = tmp_path_factory.mktemp("sql")
    _curated(root)
    build_index(IndexParams(coordination_cutoff=3.0), DescriptorParams(), root / "data/curated/accepted.extxyz",
                root / "data/curated/quarantine.parquet", root / "data/index.duckdb")
    return root / "data/index.duckdb"


def _spill_dir(db: Path) -> Path:
    return db.with_name(db.name + ".tmp")


# ------------------------------------------------------------------ one read-only SELECT statement
@pytest.mark.parametrize("sql, kind", [
    ("SELECT 1; SELECT 2", "2 statements (SELECT, SELECT)"),
    ("SELECT count(*) FROM frames; SET threads = 64", "2 statements (SELECT, SET)"),
    ("CREATE TEMP TABLE t AS SELECT * FROM atoms", "CREATE statement"),
    ("CREATE TEMP VIEW v AS SELECT 1", "CREATE statement"),
    ("CREATE MACRO twice(a) AS 2 * a", "CREATE statement"),
    ("SET memory_limit = '100TB'", "SET statement"),
    ("SET threads = 64", "SET statement"),
    ("RESET memory_limit", "SET statement"),
    ("PRAGMA threads = 64", "SET statement"),  # DuckDB parses it as SET
    ("PRAGMA version", "PRAGMA statement"),
    ("ATTACH ':memory:' AS other", "ATTACH statement"),
    ("INSTALL httpfs", "LOAD statement"),
    ("LOAD httpfs", "LOAD statement"),
    ("COPY frames TO '{tmp}/dump.csv'", "COPY statement"),
    ("EXPORT DATABASE '{tmp}/dump'", "EXPORT statement"),
    ("CALL enable_profiling()", "CALL statement"),
    ("  -- only a comment\n", "no SQL statement"),
])
def test_only_one_select_statement_runs(sql_db, tmp_path, sql, kind):
    with pytest.raises(MlipopsError, match="query refused: ") as exc:
        query(sql.format(tmp=tmp_path), sql_db)
    assert kind in str(exc.value) and "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def test_selects_of_every_form_still_run(sql_db):
    n = query("WITH f AS (SELECT * FROM frames) SELECT count(*) AS n FROM f", sql_db).loc[0, "n"]
    assert n == 4
    assert query("FROM frames SELECT count(*) AS n", sql_db).loc[0, "n"] == 4
    assert "frame_id" in set(query("DESCRIBE frames", sql_db)["column_name"])
    assert query("SELECT * FROM query('SELECT 42 AS x')", sql_db).loc[0, "x"] == 42
    with pytest.raises(MlipopsError, match="query failed: Parser Error"):  # query() takes a SELECT only
        query("SELECT * FROM query('SET memory_limit = ''100TB''')", sql_db)


def test_configuration_is_locked(sql_db):
    """Even a statement that got past the one-SELECT rule could not change a setting."""
    con = connect_read_only(sql_db)
    try:
        s = dict(con.execute("SELECT name, value FROM duckdb_settings() WHERE name IN ('memory_limit', 'threads', "
                             "'temp_directory', 'max_temp_directory_size', 'enable_external_access', "
                             "'lock_configuration')").fetchall())
        assert s["lock_configuration"] == "true" and s["enable_external_access"] == "false"
        assert s["temp_directory"] == "" and s["max_temp_directory_size"] == "0 bytes"  # nothing spills
        assert s["memory_limit"] == "953.6 MiB" and int(s["threads"]) <= 2  # 1GB = 10^9 bytes
        for sql in ("SET memory_limit = '100TB'", "SET threads = 64", "RESET memory_limit",
                    "SET enable_external_access = true", "SET temp_directory = 'spill'",
                    "SET lock_configuration = false"):
            with pytest.raises(Exception, match="configuration has been locked"):
                con.execute(sql)
    finally:
        con.close()


def test_files_stay_out_of_reach(sql_db, tmp_path):
    """Regression: file access was refused before issue 30 and still is."""
    csv = tmp_path / "secret.csv"
    csv.write_text("a,b\n1,2\n")
    for sql in (f"SELECT * FROM read_csv('{csv}')", f"SELECT * FROM '{csv}'",
                f"SELECT * FROM read_text('{csv}')"):
        with pytest.raises(MlipopsError, match="query failed: Permission Error"):
            query(sql, sql_db)
    out = tmp_path / "dump.csv"
    with pytest.raises(MlipopsError, match="query refused: COPY statement"):
        query(f"COPY frames TO '{out}'", sql_db)
    with pytest.raises(MlipopsError, match="query refused: ATTACH statement"):
        query(f"ATTACH '{tmp_path / 'other.duckdb'}' AS o", sql_db)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv"]


def test_cli_refusal_is_one_line(sql_db):
    line = error_line(mlipops(sql_db.parents[1], "query", "SELECT 1; SET memory_limit = '100TB'"))
    assert line == ("mlipops: error: data/index.duckdb: field 'sql': query refused: 2 statements (SELECT, SET); "
                    "give exactly one SELECT statement")


def test_cli_query_file_is_bounded(sql_db):
    """--file reads at most 1 MB of UTF-8 text from a regular file: not /dev/zero, nothing echoed."""
    root = sql_db.parents[1]
    (root / "binary.sql").write_bytes(b"\xff\xfe secret \x00" * 10)
    (root / "huge.sql").write_text("SELECT 1 " + " " * 2**20)
    for name, why in (("binary.sql", "cannot read the query: not UTF-8 text"),
                      ("huge.sql", "the query file is larger than 1 MB"),
                      ("/dev/zero", "the query file is not a regular file")):
        r = subprocess.run([sys.executable, "-m", "mlipops.cli", "query", "--file", name], cwd=root,
                           capture_output=True, text=True, timeout=60)
        assert error_line(r) == f"mlipops: error: {name}: {why}"


# ------------------------------------------------------------------------------ time, memory, rows
def test_endless_query_is_interrupted(sql_db):
    t = time.perf_counter()
    with pytest.raises(MlipopsError, match=r"query interrupted after 2 s \(--timeout\)"):
        query(ENDLESS, sql_db, timeout_s=2)
    assert time.perf_counter() - t < 30
    assert query("SELECT 1 AS x", sql_db, timeout_s=2).loc[0, "x"] == 1  # the timer of a fast query is cancelled


def test_cli_endless_query_is_interrupted(sql_db):
    r = subprocess.run([sys.executable, "-m", "mlipops.cli", "query", ENDLESS, "--timeout", "2"],
                       cwd=sql_db.parents[1], capture_output=True, text=True, timeout=90)
    assert error_line(r) == ("mlipops: error: data/index.duckdb: field 'sql': "
                             "query interrupted after 2 s (--timeout)")


def test_memory_limit_is_one_line_and_spills_nothing(sql_db):
    sort = "SELECT range AS i, repeat('x', 100) AS s FROM range(5000000) ORDER BY i DESC"  # ~600 MB to sort
    with pytest.raises(MlipopsError, match=r"query needs more memory than its limit of 64MB \(--memory-limit"):
        query(sort, sql_db, limit=10, memory_limit="64MB")
    assert not _spill_dir(sql_db).exists()
    with pytest.raises(MlipopsError, match="memory limit 'lots' is not a size"):
        query("SELECT 1", sql_db, memory_limit="lots")


def test_row_cap_fetches_limit_rows_only(sql_db):
    df = query(BIG, sql_db, limit=10)
    assert df["range"].tolist() == list(range(10)) and df.attrs["truncated"]
    df = query("SELECT * FROM range(10) ORDER BY range DESC", sql_db, limit=3)  # ORDER BY holds
    assert df["range"].tolist() == [9, 8, 7] and df.attrs["truncated"]
    df = query("SELECT * FROM range(5000)", sql_db, limit=5000)  # exactly the limit, over several chunks
    assert len(df) == 5000 and not df.attrs["truncated"]
    df = query("SELECT frame_id FROM frames WHERE false", sql_db, limit=5)
    assert list(df.columns) == ["frame_id"] and len(df) == 0 and not df.attrs["truncated"]
    assert len(query("SELECT * FROM range(3000)", sql_db)) == 3000  # no limit: the library call gets all rows


def _peak_rss_mb(root: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the CLI from a fresh parent that reports its one child's peak RSS (MB)."""
    probe = ("import resource, subprocess, sys; "
             "r = subprocess.run([sys.executable, '-m', 'mlipops.cli', *sys.argv[1:]], capture_output=True, "
             "text=True); "
             "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, file=sys.stderr); "
             "sys.exit(r.returncode)")
    r = subprocess.run([sys.executable, "-c", probe, *args], cwd=root, capture_output=True, text=True, timeout=120)
    *err, rss = r.stderr.splitlines()
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout, "\n".join(err) + "\n" * bool(err)), float(rss)


def test_cli_big_result_prints_the_limit_in_bounded_memory(sql_db):
    root = sql_db.parents[1]
    base, base_rss = _peak_rss_mb(root, "query", "SELECT 1 AS x", "--json")
    assert base.returncode == 0, base.stderr
    t = time.perf_counter()
    r, rss = _peak_rss_mb(root, "query", BIG, "--limit", "200")  # a table: CSV/JSON of old versions printed all
    wall = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    rows = [line.strip("│ ") for line in r.stdout.splitlines() if line.startswith("│")]
    assert rows == [str(i) for i in range(200)]
    assert rss - base_rss < 150, f"20M-row query peaked at {rss:.0f} MB, SELECT 1 at {base_rss:.0f} MB"
    assert r.stderr == "showing 200 of more than 200 rows (raise --limit to see more)\n"
    assert wall < 60
    assert not _spill_dir(sql_db).exists()


# --------------------------------------------------------------------------- the index build
def test_build_clears_what_a_killed_build_left(tmp_path):
    """kill -9 during a build leaves the half-built file, its WAL and spill directory (and queries of
    earlier versions left data/index.duckdb.tmp/): the next build starts clean and leaves none of them."""
    _curated(tmp_path)
    db = tmp_path / "data/index.duckdb"
    half = tmp_path / "data/index.tmp.duckdb"
    half.write_bytes(b"half a database")
    Path(f"{half}.wal").write_bytes(b"\x00garbage wal of a killed build" * 100)
    for d in (Path(f"{half}.tmp"), _spill_dir(db)):
        d.mkdir()
        (d / "duckdb_temp_storage-0.tmp").write_bytes(b"\x00" * 4096)
    build_index(IndexParams(), DescriptorParams(), tmp_path / "data/curated/accepted.extxyz",
                tmp_path / "data/curated/quarantine.parquet", db)
    assert sorted(p.name for p in db.parent.iterdir()) == ["curated", "index.duckdb"]
    assert query("SELECT count(*) AS n FROM frames", db).loc[0, "n"] == 4


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_index_survives_a_failed_dvc_repro(tmp_path):
    """`dvc repro index` with the repository's stage: a rebuild on broken input fails, the old index stays."""
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _curated(root)
    env = {k: v for k, v in os.environ.items() if k != "MLIPOPS_DEBUG"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # `mlipops` of this venv
    env.update(DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp_path / "site_cache"))

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=300)

    assert dvc("init", "--no-scm", "-q").returncode == 0
    r = dvc("repro", "--single-item", "index")
    assert r.returncode == 0, r.stdout + r.stderr
    db = root / "data/index.duckdb"
    first = db.read_bytes()
    (root / "data/curated/accepted.extxyz").write_text("2\nnot an extxyz comment line\nCu 0 0 0\n")
    r = dvc("repro", "--single-item", "index")
    assert r.returncode != 0 and "accepted.extxyz" in r.stderr + r.stdout
    assert db.read_bytes() == first, "the failed rebuild removed or changed the index"
    assert sorted(p.name for p in db.parent.iterdir()) == ["curated", "index.duckdb"]
    assert query("SELECT count(*) AS n FROM frames", db).loc[0, "n"] == 4
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["index"]
    assert {"data/index.duckdb": {"persist": True}} in stage["outs"]
