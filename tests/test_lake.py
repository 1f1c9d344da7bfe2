"""The lake: atomic writes, crash safety, views that match the Arrow schemas, a catalog that never locks."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import duckdb
import pyarrow as pa
import pytest

from evoforge.data import catalog, schemas
from evoforge.data.ids import fingerprint_files
from evoforge.data.lake import Lake, LakeError

pytestmark = pytest.mark.unit


def problems(n: int, prefix: str = "p") -> pa.Table:
    return pa.Table.from_pylist(
        [dict(problem_id=f"{prefix}{i}", question=f"q{i}", answer=str(i), source="s", source_file="f",
              source_row=i, origin="seed", parent_problem_id=None) for i in range(n)],
        schema=schemas.PROBLEMS,
    )


def test_views_match_the_arrow_schemas_before_any_stage_ran(scratch):
    con = catalog.connect(Lake(scratch).ensure_run("r"))
    arrow_types = duckdb.connect()
    for name, schema in {**schemas.ROUND_TABLES, **schemas.RUN_TABLES}.items():
        view = con.execute(f"DESCRIBE {name}").fetchall()
        expected = [(f.name, t) for f, t in zip(schema, _duck_types(arrow_types, schema))]
        if name in schemas.ROUND_TABLES:
            expected += [("round", "BIGINT"), ("stage", "VARCHAR")]
        assert [(c[0], c[1]) for c in view] == expected, name
        assert con.execute(f"SELECT count(*) FROM {name}").fetchone()[0] == 0


def _duck_types(con, schema: pa.Schema) -> list[str]:
    empty = schema.empty_table()  # noqa: F841 - read by DuckDB's replacement scan
    return [row[1] for row in con.execute("DESCRIBE SELECT * FROM empty").fetchall()]


def test_publish_replaces_a_stage_output_and_reads_carry_the_round(scratch):
    lake = Lake(scratch)
    first = lake.publish_stage("r", 1, "ingest", {"problems": problems(3)})
    second = lake.publish_stage("r", 1, "ingest", {"problems": problems(2, "x")})
    assert first != second
    table = lake.read("r", "problems")
    assert table["problem_id"].to_pylist() == ["x0", "x1"] and set(table["round"].to_pylist()) == {1}
    # the fingerprint is of the parts now in place (what the stage runner compares to skip a stage)
    assert fingerprint_files(sorted(lake.stage_dir("r", 1, "ingest").glob("*/part-*.parquet"))) == second


def test_a_crash_during_publish_leaves_the_previous_output_whole(scratch, monkeypatch):
    lake = Lake(scratch)
    lake.publish_stage("r", 0, "ingest", {"problems": problems(3)})
    with pytest.raises(ValueError):  # the second table does not fit its schema: fails mid-publish
        lake.publish_stage("r", 0, "ingest", {"problems": problems(5), "quarantine": pa.table({"x": [1]})})
    assert lake.read("r", "problems").num_rows == 3
    assert not [p for p in (scratch / "r" / "round=0").iterdir() if p.name.startswith(".")]


def test_a_process_killed_in_the_middle_of_a_write_leaves_no_visible_part(scratch):
    """SIGKILL a writer while it writes a large part; the lake must show no part, and the debris
    (a hidden temporary) must be swept."""
    script = f"""
import sys, pyarrow as pa
from evoforge.data.lake import write_parquet
from pathlib import Path
import pyarrow.parquet as pq
real = pq.write_table
def slow(table, where, **kw):
    print("writing", flush=True)
    with pq.ParquetWriter(where, table.schema) as w:
        for batch in table.to_batches(max_chunksize=1000):
            w.write_batch(batch)
            import time; time.sleep(0.05)
pq.write_table = slow
t = pa.table({{"a": list(range(200_000))}})
write_parquet(t, Path({str(scratch)!r}) / "r" / "round=0" / "generate" / "rollouts" / "part-00000.parquet")
print("finished", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = scratch / "r" / "round=0" / "generate" / "rollouts"
    assert list(folder.glob("part-*.parquet")) == []
    assert [p.name for p in folder.iterdir() if p.name.startswith(".part-00000.parquet.tmp-")]
    lake = Lake(scratch)
    lake.ensure_run("r")
    assert catalog.connect(lake.run_dir("r")).execute("SELECT count(*) FROM rollouts").fetchone()[0] == 0
    assert lake.sweep("r") == 1 and list(folder.iterdir()) == []


def test_catalog_refresh_never_waits_for_a_reader_holding_the_old_file(scratch):
    lake = Lake(scratch)
    run_dir = lake.ensure_run("r")
    catalog.refresh_catalog(run_dir)
    reader = duckdb.connect(str(run_dir / "catalog.duckdb"), read_only=True)
    lake.publish_stage("r", 0, "ingest", {"problems": problems(4)})
    catalog.refresh_catalog(run_dir)  # would fail with 'Could not set lock' if it opened the held file
    fresh = duckdb.connect(str(run_dir / "catalog.duckdb"), read_only=True)
    assert fresh.execute("SELECT count(*) FROM problems").fetchone()[0] == 4
    assert reader.execute("SELECT count(*) FROM problems").fetchone()[0] == 4  # views read the lake live
    reader.close(), fresh.close()


def test_run_names_are_checked(scratch):
    with pytest.raises(LakeError, match="not valid"):
        Lake(scratch).run_dir("../escape")


def test_parts_written_before_a_column_was_added_read_it_as_nulls(scratch):
    import pyarrow.parquet as pq

    lake = Lake(scratch)
    lake.publish_stage("r", 0, "ingest", {"problems": problems(2)})
    (part,) = (scratch / "r" / "round=0" / "ingest" / "problems").glob("part-*.parquet")
    pq.write_table(pq.read_table(part).drop_columns(["task", "expert_answer"]), part)  # as an older version wrote it
    table = lake.read("r", "problems")
    assert table["problem_id"].to_pylist() == ["p0", "p1"] and table["expert_answer"].null_count == 2
    assert catalog.connect(lake.ensure_run("r")).execute("SELECT count(*) FROM problems WHERE task IS NULL").fetchone()[0] == 2
