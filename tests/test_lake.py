"""The lake: atomic writes, crash safety, views that match the Arrow schemas, a catalog that never locks."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evoforge.data import catalog, schemas
from evoforge.data.lake import DamagedPart, Lake, LakeError
from evoforge.data.manifest import MANIFEST_NAME, describe_part, read_history, read_manifest, write_manifest

pytestmark = pytest.mark.unit


def problems(n: int, prefix: str = "p") -> pa.Table:
    return pa.Table.from_pylist(
        [dict(problem_id=f"{prefix}{i}", question=f"q{i}", answer=str(i), source="s", source_file="f",
              source_row=i, origin="seed", parent_problem_id=None) for i in range(n)],
        schema=schemas.PROBLEMS,
    )


# columns a view joins in from another table: checkpoints shows the promotion decision in force on each
JOINED_COLUMNS = {"checkpoints": [("decision", "VARCHAR"), ("why", "VARCHAR"), ("decided_by", "VARCHAR")]}


def test_views_match_the_arrow_schemas_before_any_stage_ran(scratch):
    con = catalog.connect(Lake(scratch).ensure_run("r"))
    arrow_types = duckdb.connect()
    for name, schema in {**schemas.ROUND_TABLES, **schemas.RUN_TABLES}.items():
        view = con.execute(f"DESCRIBE {name}").fetchall()
        expected = [(f.name, t) for f, t in zip(schema, _duck_types(arrow_types, schema))] + JOINED_COLUMNS.get(name, [])
        if name in schemas.ROUND_TABLES:
            expected += [("round", "BIGINT"), ("stage", "VARCHAR"), ("run", "VARCHAR")]
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
    # the manifest lists only the new parts; the superseded one stays, listed by version 1, and is not swept
    folder = lake.stage_dir("r", 1, "ingest")
    manifest = read_manifest(folder)
    assert [p.rows for p in manifest.parts] == [2] and manifest.fingerprint() == second and manifest.version == 2
    (old,) = [v for v in read_history(folder) if v.version == 1]
    assert sorted(folder.glob("*/part-*.parquet")) == sorted(folder / p.file for p in old.parts + manifest.parts)
    health = lake.inspect("r")
    assert health.superseded == [folder / p.file for p in old.parts] and health.leftovers == []
    assert lake.sweep("r") == 0 and (folder / old.parts[0].file).exists()


def test_a_commit_for_one_input_keeps_the_parts_of_the_others(scratch):
    lake = Lake(scratch)
    lake.publish_stage("r", 0, "ingest", {"problems": problems(2, "a")}, key="source-a")
    # one source's problems and quarantine are one commit: one manifest names both
    lake.publish_stage("r", 0, "ingest", {"problems": problems(3, "b"), "quarantine": schemas.QUARANTINE.empty_table()},
                       key="source-b")
    assert {(p.table, p.key) for p in read_manifest(lake.stage_dir("r", 0, "ingest")).parts} == {
        ("problems", "source-a"), ("problems", "source-b"), ("quarantine", "source-b")}
    lake.publish_stage("r", 0, "ingest", {"problems": problems(1, "a")}, key="source-a")  # a re-ingest of a
    assert sorted(lake.read("r", "problems")["problem_id"].to_pylist()) == ["a0", "b0", "b1", "b2"]
    assert lake.read("r", "problems", exclude_key="source-b")["problem_id"].to_pylist() == ["a0"]


def test_a_crash_during_publish_leaves_the_previous_output_whole(scratch, monkeypatch):
    lake = Lake(scratch)
    lake.publish_stage("r", 0, "ingest", {"problems": problems(3)})
    with pytest.raises(ValueError):  # the second table does not fit its schema: fails mid-publish
        lake.publish_stage("r", 0, "ingest", {"problems": problems(5), "quarantine": pa.table({"x": [1]})})
    assert lake.read("r", "problems").num_rows == 3
    assert not [p for p in (scratch / "r" / "round=0").iterdir() if p.name.startswith(".")]


def test_a_process_killed_in_the_middle_of_a_publish_leaves_the_old_output_and_debris_that_is_swept(scratch):
    """SIGKILL a writer while it writes a large new part: readers still see the old output (no
    manifest names the half-written part), and the next sweep removes the debris."""
    lake = Lake(scratch)
    lake.publish_stage("r", 0, "generate", {"rollouts": schemas.ROLLOUTS.empty_table()})
    before = read_manifest(lake.stage_dir("r", 0, "generate"))
    script = f"""
import pyarrow as pa, pyarrow.parquet as pq, time
from pathlib import Path
from evoforge.data import schemas
from evoforge.data.lake import Lake
write = pq.ParquetWriter.write
def slow(self, table, *args, **kw):
    print("writing", flush=True)
    for batch in table.to_batches(max_chunksize=100):
        write(self, batch)
        self.where.flush() if hasattr(self.where, "flush") else None
        time.sleep(0.05)
pq.ParquetWriter.write = slow
rows = [dict(rollout_id=str(i), problem_id="p", model_id="m", seed=i, sample_index=0, text="x" * 100,
             completion_tokens=1, finish_reason="stop", mean_logprob=0.0) for i in range(20_000)]
rows = pa.Table.from_pylist(rows, schema=schemas.ROLLOUTS)
Lake(Path({str(scratch)!r})).publish_stage("r", 0, "generate", {{"rollouts": rows}})
print("finished", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = lake.stage_dir("r", 0, "generate") / "rollouts"
    assert read_manifest(lake.stage_dir("r", 0, "generate")) == before
    assert len(list(folder.glob("part-*.parquet"))) == 2  # the committed part and the half-written one
    assert catalog.connect(lake.run_dir("r")).execute("SELECT count(*) FROM rollouts").fetchone()[0] == 0
    assert lake.read("r", "rollouts").num_rows == 0
    assert len(lake.inspect("r").leftovers) == 1
    assert lake.sweep("r") == 1 and [folder / p.file.split("/")[1] for p in before.parts] == list(folder.iterdir())


def test_a_file_no_manifest_lists_is_not_data_and_is_reported(scratch):
    lake = Lake(scratch)
    lake.publish_stage("r", 0, "ingest", {"problems": problems(3)})
    folder = lake.stage_dir("r", 0, "ingest") / "problems"
    (part,) = folder.glob("part-*.parquet")
    shutil.copy(part, folder / "part-backup.parquet")  # a user's backup copy beside the data
    duckdb.execute(f"COPY (SELECT 1 AS x) TO '{folder}/part-0.parquet'")
    assert lake.read("r", "problems").num_rows == 3
    assert catalog.connect(lake.run_dir("r")).execute("SELECT count(*) FROM problems").fetchone()[0] == 3
    assert sorted(p.name for p in lake.inspect("r").unnamed) == ["part-0.parquet", "part-backup.parquet"]
    assert lake.sweep("r") == 0 and (folder / "part-backup.parquet").exists()  # the user's files are kept


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one byte changed in the middle: same size, a valid footer
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_part_is_named_by_reads_found_by_doctor_and_repair_uncommits_its_stage(scratch, how):
    lake = Lake(scratch)
    lake.publish_stage("r", 0, "ingest", {"problems": problems(30)})
    lake.publish_stage("r", 0, "generate", {"rollouts": schemas.ROLLOUTS.empty_table()})
    (part,) = (lake.stage_dir("r", 0, "ingest") / "problems").glob("part-*.parquet")
    _damage(part, how)
    with pytest.raises(DamagedPart, match=f"damaged: {part} .*ingest its source again with --force"):
        lake.read("r", "problems")
    assert lake.read("r", "rollouts").num_rows == 0  # the rest of the run still reads
    (damage,) = lake.inspect("r", checksum=True).damaged
    assert damage.path == part and damage.stage == "ingest"
    if how == "truncated":  # what every query checks: sizes and footers; checksums are doctor's
        lines = []
        con = catalog.connect(lake.run_dir("r"), report=lines.append)
        assert con.execute("SELECT count(*) FROM problems").fetchone()[0] == 0 and lines == [damage.line()]
    (line,) = lake.repair("r", [damage])
    assert "uncommitted its output (30 rows)" in line
    assert not lake.has_output("r", 0, "ingest") and lake.read("r", "problems").num_rows == 0
    assert list((scratch / "r" / "_damaged").rglob(part.name))
    assert lake.inspect("r", checksum=True).damaged == []


def test_an_unreadable_manifest_is_named_and_the_rest_of_the_run_reads(scratch):
    lake = Lake(scratch)
    lake.publish_stage("r", 0, "ingest", {"problems": problems(3)})
    lake.publish_stage("r", 0, "generate", {"rollouts": schemas.ROLLOUTS.empty_table()})
    (lake.stage_dir("r", 0, "ingest") / MANIFEST_NAME).write_text('{"format": 1, "parts": [')
    with pytest.raises(DamagedPart, match="_manifest.json .*unreadable manifest"):
        lake.read("r", "problems")
    lines = []
    assert catalog.connect(lake.run_dir("r"), report=lines.append).execute(
        "SELECT count(*) FROM rollouts").fetchone()[0] == 0 and len(lines) == 1
    with pytest.raises(DamagedPart):  # one input's commit cannot know the other inputs' parts
        lake.publish_stage("r", 0, "ingest", {"problems": problems(1)}, key="source-a")
    lake.publish_stage("r", 0, "ingest", {"problems": problems(2)})  # a whole new output replaces it
    # the old part is version 1's (its copy under _history/ was written at its commit): kept, not swept
    assert lake.read("r", "problems").num_rows == 2 and lake.sweep("r") == 0
    assert len(lake.inspect("r").superseded) == 1 and read_manifest(lake.stage_dir("r", 0, "ingest")).version == 2


def test_a_tampered_manifest_cannot_point_a_part_or_a_sweep_outside_its_stage(scratch):
    """A manifest whose table is a path (`../../..`) is unreadable, named in one line: nothing outside the lake
    is read as data, and no later sweep or repair deletes what it names."""
    import json

    lake = Lake(scratch / "lake")
    lake.publish_stage("r", 0, "ingest", {"problems": problems(3)})
    victim_dir = scratch / "outside"
    victim = victim_dir / "part-0123456789abcdef0123456789abcdef.parquet"
    victim_dir.mkdir()
    pq.write_table(problems(1), victim)
    path = lake.stage_dir("r", 0, "ingest") / MANIFEST_NAME
    body = json.loads(path.read_text())
    escape = "../../../../outside"
    body["parts"][0].update(table=escape, file=f"{escape}/{victim.name}")
    path.write_text(json.dumps(body))
    with pytest.raises(DamagedPart, match="table '../../../../outside' is not one of evoforge's tables"):
        lake.read("r", "problems")
    lake.sweep("r")
    lake.inspect("r", checksum=True)
    assert victim.exists()
    with pytest.raises(LakeError, match="is not valid"):  # a name is matched whole: no trailing newline
        lake.run_dir("r\n")


def test_catalog_refresh_never_waits_for_a_reader_holding_the_old_file(scratch):
    lake = Lake(scratch)
    run_dir = lake.ensure_run("r")
    catalog.refresh_catalog(run_dir)
    reader = duckdb.connect(str(run_dir / "catalog.duckdb"), read_only=True)
    lake.publish_stage("r", 0, "ingest", {"problems": problems(4)})
    catalog.refresh_catalog(run_dir)  # would fail with 'Could not set lock' if it opened the held file
    # a catalog file is a snapshot of the parts committed when it was written
    assert reader.execute("SELECT count(*) FROM problems").fetchone()[0] == 0
    reader.close()  # (DuckDB shares one open database per path within a process)
    fresh = duckdb.connect(str(run_dir / "catalog.duckdb"), read_only=True)
    assert fresh.execute("SELECT count(*) FROM problems").fetchone()[0] == 4
    fresh.close()


def test_schema_files_are_checked_once_a_process_and_doctor_repair_renews_a_removed_one(runs_root, capsys):
    """A commit does not ask the store again for the run's 18 schema files (on S3, 36 requests of a
    commit's 53); a file removed meanwhile is renewed by the next command's first check, or by
    `doctor --repair`, and the view it types keeps its columns."""
    from evoforge.app.cli import main
    from evoforge.data.lake import SCHEMA_FOLDER, SCHEMA_PART, lake

    store = lake()
    store.publish_stage("r", 0, "ingest", {"problems": problems(2)})
    schema_file = store.run_dir("r") / "round=0" / SCHEMA_FOLDER / "rollouts" / SCHEMA_PART
    schema_file.unlink()
    store.publish_stage("r", 0, "ingest", {"problems": problems(3)})
    assert not schema_file.exists()  # checked once in this process, not at every commit
    assert main(["doctor", "--run", "r", "--repair"]) == 0
    assert pq.read_schema(schema_file) == schemas.ROLLOUTS
    assert catalog.connect(store.run_dir("r")).execute("SELECT count(*), max(text) FROM rollouts").fetchone() == (0, None)


def test_run_names_are_checked(scratch):
    with pytest.raises(LakeError, match="not valid"):
        Lake(scratch).run_dir("../escape")


def test_parts_written_before_a_column_was_added_read_it_as_nulls(scratch):
    lake = Lake(scratch)
    lake.publish_stage("r", 0, "ingest", {"problems": problems(2)})
    folder = lake.stage_dir("r", 0, "ingest")
    (part,) = (folder / "problems").glob("part-*.parquet")
    pq.write_table(pq.read_table(part).drop_columns(["task", "expert_answer"]), part)  # as an older version wrote it
    write_manifest(folder, [describe_part(folder, "problems", part, None)])
    table = lake.read("r", "problems")
    assert table["problem_id"].to_pylist() == ["p0", "p1"] and table["expert_answer"].null_count == 2
    assert catalog.connect(lake.ensure_run("r")).execute("SELECT count(*) FROM problems WHERE task IS NULL").fetchone()[0] == 2


def test_parts_written_before_manifests_are_reported_and_doctor_commits_them_as_they_are(scratch):
    lake = Lake(scratch)
    run_dir = lake.ensure_run("r")
    old_ingest = run_dir / "round=0" / "ingest" / "problems" / "part-0123456789abcdef.parquet"  # one source's part
    old_filter = run_dir / "round=0" / "generate" / "rollouts" / "part-00000.parquet"  # a whole stage's
    for path, rows in ((old_ingest, problems(3)), (old_filter, schemas.ROLLOUTS.empty_table())):
        path.parent.mkdir(parents=True)
        pq.write_table(rows, path)
    health = lake.inspect("r")
    assert sorted(health.legacy) == sorted([old_ingest, old_filter]) and lake.read("r", "problems").num_rows == 0
    assert lake.sweep("r") == 0 and old_ingest.exists()  # never removed as a leftover
    lines = lake.adopt_legacy("r", health.legacy)
    assert len(lines) == 2 and "committed 1 part(s) written before manifests (3 rows)" in " ".join(lines)
    assert lake.read("r", "problems").num_rows == 3
    assert [p.key for p in read_manifest(lake.stage_dir("r", 0, "ingest")).parts] == ["0123456789abcdef"]
    assert lake.inspect("r", checksum=True).legacy == [] and lake.has_output("r", 0, "generate")


def test_an_unreadable_manifest_stops_only_the_reads_of_the_tables_its_stage_wrote(scratch):
    lake = Lake(scratch)
    lake.publish_stage("r", 0, "ingest", {"problems": problems(3)})
    lake.publish_stage("r", 0, "generate", {"rollouts": schemas.ROLLOUTS.empty_table()})
    (lake.stage_dir("r", 0, "generate") / MANIFEST_NAME).write_text("not json")
    assert lake.read("r", "problems").num_rows == 3
    with pytest.raises(DamagedPart):
        lake.read("r", "rollouts")


@pytest.mark.unit
def test_a_tables_fingerprint_is_the_hash_of_its_sorted_rows_arrow_stream_taken_without_holding_it():
    """`fingerprint_table` hashes the stream as it is written: the value is the one the bytes held in
    memory give (so a stage run before finds its inputs unchanged), in any row order and chunking."""
    import hashlib

    import pyarrow.compute as pc

    from evoforge.data.ids import fingerprint_table

    table = pa.table({"problem_id": [f"p{i % 97}" for i in range(5_000)], "n": list(range(5_000)),
                      "tags": [[i, i + 1] for i in range(5_000)]})
    ordered = table.take(pc.sort_indices(table, sort_keys=[("problem_id", "ascending"), ("n", "ascending")]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, ordered.schema) as writer:
        writer.write_table(ordered)
    held = hashlib.sha256(str(table.schema.names).encode() + sink.getvalue().to_pybytes()).hexdigest()[:16]
    shuffled = pa.concat_tables([table.slice(2_500), table.slice(0, 2_500)])
    assert fingerprint_table(table) == fingerprint_table(shuffled) == held
    assert fingerprint_table(table.slice(1)) != held


@pytest.mark.unit
def test_a_columns_hash_is_the_hash_of_its_strings_whatever_the_arrays_shape():
    """`stable_hash_of_column(head, column)` (a verify chunk's key: a rerun finds the chunks an interrupted attempt
    stored by it) is `stable_hash(head, *strings)` for sliced, chunked, large, non-ASCII, separator-holding,
    null-holding and empty columns."""
    from evoforge.data.ids import stable_hash, stable_hash_of_column

    ids = [stable_hash("rollout", i) for i in range(3000)]
    cases = [pa.array(ids), pa.array(ids).slice(17, 2000), pa.chunked_array([ids[:5], ids[5:9], []], pa.string()),
             pa.array(ids, pa.large_string()).slice(3), pa.array(["é", "日本", "a\x1fb", "", "a", "\x1f"]),
             pa.array(["a", None, "None"]), pa.array([], pa.string())]
    for column in cases:
        assert stable_hash_of_column("verify", column) == stable_hash("verify", *column.to_pylist()), column.type
    assert stable_hash_of_column("verify", pa.array(["a\x1fb"])) == stable_hash("verify", "a", "b")  # as the strings join
    assert stable_hash_of_column("verify", pa.array(ids[:10]), length=32) == stable_hash("verify", *ids[:10], length=32)
