"""The lake on S3-compatible object storage: a real S3 server (moto's, data/local_s3.py), real pyarrow
and s3fs clients, real Prefect, vLLM (the tiny model) and math-verify."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pyarrow as pa
import pytest

from evoforge.data import catalog, home, schemas
from evoforge.data.lake import Lake, lake, write_parquet
from evoforge.data.manifest import MANIFEST_NAME
from evoforge.data.manifest import read_manifest
from evoforge.data.storage import ObjectPath, location, unfinished_uploads
from evoforge.flows.config import RoundConfig


def problems(n: int) -> pa.Table:
    return pa.Table.from_pylist([
        dict(problem_id=f"p{i}", question=f"q{i}", answer=str(i), source="t", source_file="f", source_row=i,
             origin="seed", parent_problem_id=None) for i in range(n)], schema=schemas.PROBLEMS)


def objects(root: ObjectPath) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.server
def test_a_commit_on_object_storage_is_its_manifest_and_a_damaged_object_is_named_and_healed(s3_runs):
    store = lake()
    assert isinstance(store.run_dir("r"), ObjectPath) and str(store.run_dir("r")) == f"{s3_runs}/r"
    store.publish_stage("r", 0, "ingest", {"problems": problems(5)}, key="a")
    store.publish_stage("r", 0, "ingest", {"problems": problems(3)}, key="b")
    assert store.read("r", "problems").num_rows == 8

    # parts without a manifest naming them are not data: a writer that died before its commit
    stage = store.stage_dir("r", 0, "ingest")
    committed = json.loads((stage / MANIFEST_NAME).read_text())
    (stage / "problems" / "part-0123456789abcdef0123456789abcdef.parquet").write_bytes(b"half a part")
    assert store.read("r", "problems").num_rows == 8
    assert [p.name for p in store.inspect("r").leftovers] == ["part-0123456789abcdef0123456789abcdef.parquet"]
    assert store.sweep("r") == 1

    # a replaced input's old parts stay, listed by the earlier version (kept until vacuum)
    store.publish_stage("r", 0, "ingest", {"problems": problems(2)}, key="a")
    after = json.loads((stage / MANIFEST_NAME).read_text())
    assert after["commit"] != committed["commit"] and store.read("r", "problems").num_rows == 5
    assert after["version"] == committed["version"] + 1
    earlier = {p["file"].split("/")[1] for p in committed["parts"]}
    assert sorted(p.name for p in (stage / "problems").iterdir()) == sorted(
        earlier | {p["file"].split("/")[1] for p in after["parts"]})
    assert len(store.inspect("r").superseded) == 1 and store.sweep("r") == 0

    # the catalog reads the objects through DuckDB with the S3 filesystem registered
    assert catalog.connect(store.run_dir("r")).execute("SELECT count(*) FROM problems").fetchone()[0] == 5
    (damaged,) = [p for p in store.inspect("r").files["problems"] if p.name.startswith("part-") and
                  p.name != "part-schema.parquet"][:1]
    damaged.write_bytes(damaged.read_bytes()[:100])
    lines = []
    con = catalog.connect(store.run_dir("r"), report=lines.append)
    assert lines == [store.inspect("r").damaged[0].line()] and str(damaged) in lines[0]
    assert con.execute("SELECT count(*) FROM problems").fetchone()[0] in (2, 3)  # the other input still answers
    repaired = store.repair("r", store.inspect("r", checksum=True).damaged)
    assert len(repaired) == 1 and "uncommitted the parts of input" in repaired[0]
    assert store.inspect("r", checksum=True).damaged == []
    assert any("_damaged/" in name for name in objects(store.run_dir("r")))


@pytest.mark.server
def test_the_lake_location_is_a_uri_and_credentials_never_reach_the_lake(s3_runs, monkeypatch):
    assert location("file:///srv/lake") == location("/srv/lake")
    assert isinstance(location("s3://bucket/prefix"), ObjectPath)
    store = Lake(s3_runs)
    store.publish_stage("c", 0, "ingest", {"problems": problems(1)}, key="a")
    catalog.refresh_catalog(store.run_dir("c"))
    secret = home.os.environ["AWS_SECRET_ACCESS_KEY"]
    for name in objects(store.run_dir("c")):
        assert secret.encode() not in (store.run_dir("c") / name).read_bytes(), name


@pytest.mark.server
def test_listings_go_one_level_at_a_time_and_never_into_the_chunks_of_a_stage_at_work(s3_runs, scratch, monkeypatch):
    """A pattern over several segments finds on S3 what it finds on disk, listed a level at a time by
    prefix: the stage folders, a stage start's sweep and `status` list nothing under `_chunks/` (where a
    stage at work keeps its chunk parts: tens of thousands at 10M rollouts) and never the run whole."""
    on_s3, on_disk = lake(), Lake(scratch / "runs")
    for store in (on_s3, on_disk):
        for round in (0, 1):
            for _version in range(2):
                store.publish_stage("r", round, "generate", {"rollouts": schemas.ROLLOUTS.empty_table()})
        store.publish_stage("r", 0, "ingest", {"problems": problems(3)}, key="a")
        for i in range(30):
            write_parquet(schemas.ROLLOUTS.empty_table(),
                          store.run_dir("r") / "_chunks" / "round=2" / "generate" / "0123" / f"batch-{i}.parquet")
    for pattern in ("round=*/*", "round=*/generate", "round=0/*", "*/*", "round=1/generate/*/part-*.parquet",
                    "round=*/nothing/*", "_chunks/*/*/*", "nothing"):
        found = [sorted(re.sub("part-[0-9a-f]{32}", "part-X", p.relative_to(store.run_dir("r")).as_posix())
                        for p in store.run_dir("r").glob(pattern)) for store in (on_s3, on_disk)]  # names are random
        assert found[0] == found[1] and (found[0] or "nothing" in pattern), pattern

    listed = []
    listing = ObjectPath._listing
    monkeypatch.setattr(ObjectPath, "_listing", lambda path, recursive: listed.append((str(path), recursive))
                        or listing(path, recursive))
    assert [(r, s) for r, s, _ in on_s3.stage_dirs("r")] == [(0, "generate"), (0, "ingest"), (1, "generate")]
    assert on_s3.sweep("r") == 0 and len(on_s3.inspect("r").superseded) == 2
    run_dir = str(on_s3.run_dir("r"))
    assert listed and not [path for path, _ in listed if "/_chunks" in path]
    assert not [path for path, recursive in listed if recursive and not path.startswith(f"{run_dir}/round=")]


SLOW_WRITER = """
import sys, time
import pyarrow as pa, pyarrow.parquet as pq
from evoforge.data import schemas
from evoforge.data.lake import lake
write = pq.ParquetWriter.write
def slow(self, table, *args, **kw):
    print("writing", flush=True)
    for batch in table.to_batches(max_chunksize=100):
        write(self, batch)
        time.sleep(0.05)
pq.ParquetWriter.write = slow
rows = [dict(rollout_id=str(i), problem_id="p", model_id="m", seed=i, sample_index=0, text="x" * 100,
             completion_tokens=1, finish_reason="stop", mean_logprob=0.0) for i in range(20_000)]
lake().publish_stage(sys.argv[1], 0, "generate", {"rollouts": pa.Table.from_pylist(rows, schema=schemas.ROLLOUTS)})
print("finished", flush=True)
"""


def kill_while_uploading(run: str) -> None:
    """SIGKILL a writer (the lake from the environment: this test's bucket) while it uploads a new part of `run`."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, run], stdout=subprocess.PIPE, text=True, env=os.environ)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.server
def test_an_upload_a_killed_writer_left_unfinished_is_aborted_when_the_next_stage_of_its_run_starts(s3_runs):
    """On S3 a part killed mid-upload never becomes an object, but the store keeps (and bills) the parts
    of its multipart upload until someone aborts it: the next stage start of the run does, under the
    run's lock, and leaves another run's alone (a run whose name starts the same included)."""
    from evoforge.flows.stage_runner import run_guard

    store = lake()
    store.publish_stage("r", 0, "generate", {"rollouts": schemas.ROLLOUTS.empty_table()})
    before = read_manifest(store.stage_dir("r", 0, "generate"))
    kill_while_uploading("r")
    kill_while_uploading("r2")
    folder = store.stage_dir("r", 0, "generate") / "rollouts"
    assert read_manifest(store.stage_dir("r", 0, "generate")) == before and store.read("r", "rollouts").num_rows == 0
    assert [p.name for p in folder.iterdir()] == [p.file.split("/")[1] for p in before.parts]  # no new object
    ((key, _),) = unfinished_uploads(store.run_dir("r"))  # what the store still holds of the killed part
    assert key.startswith(f"{folder.key}/part-") and len(unfinished_uploads(store.run_dir("r2"))) == 1

    with run_guard("r", "round 0 / verify"):  # the next stage of the run starts
        assert unfinished_uploads(store.run_dir("r")) == []
    assert len(unfinished_uploads(store.run_dir("r2"))) == 1  # another run's writer is not this run's debris
    assert read_manifest(store.stage_dir("r", 0, "generate")) == before and store.read("r", "rollouts").num_rows == 0
    with run_guard("r2", "round 0 / generate"):
        assert unfinished_uploads(store.run_dir("r2")) == []


@pytest.fixture()
def config(apples_round) -> RoundConfig:
    return apples_round


@pytest.mark.model
@pytest.mark.server
def test_a_round_on_an_s3_lake_is_queried_reported_and_healed_like_one_on_disk(prefect_server, s3_runs, config, capsys):
    """ingest -> generate -> verify -> filter with the lake on the S3 server: nothing of the run on the
    local disk, `evoforge sql` / `report` / `doctor` work unchanged, a rerun skips, and a damaged
    object is found by doctor and recomputed by the stage that wrote it."""
    from evoforge.app.cli import main
    from evoforge.flows.round import round_flow

    results = round_flow("s3run", config)
    assert [(r.stage, r.status) for r in results] == [
        ("ingest", "completed"), ("generate", "completed"), ("verify", "completed"), ("filter", "completed")]
    store = lake()
    rollouts, verdicts = store.read("s3run", "rollouts"), store.read("s3run", "verdicts")
    assert rollouts.num_rows == 20 and sorted(verdicts["rollout_id"].to_pylist()) == sorted(rollouts["rollout_id"].to_pylist())
    names = objects(store.run_dir("s3run"))
    assert "config.yaml" in names and "catalog.duckdb" in names and not [n for n in names if "_chunks" in n]
    assert not (home.home() / "runs" / "s3run").exists()  # the default local lake was never touched

    capsys.readouterr()
    assert main(["sql", "--run", "s3run", "SELECT count(*) AS n FROM verdicts", "--csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", "20"]
    assert main(["sql", "--run", "s3run", "buckets"]) == 0
    assert "bucket" in capsys.readouterr().out
    assert main(["report", "--run", "s3run"]) == 0
    assert "run s3run" in capsys.readouterr().out

    assert [r.status for r in round_flow("s3run", config, round=0)] == ["skipped"] * 4

    (part,) = [p for p in store.inspect("s3run").files["verdicts"] if p.name != "part-schema.parquet"]
    part.write_bytes(b"PAR1" + bytes(part.stat().st_size - 4))
    assert main(["doctor", "--run", "s3run"]) == 1
    assert f"damaged: {part} (checksum differs" in capsys.readouterr().out
    again = round_flow("s3run", config, round=0)
    assert [r.status for r in again] == ["skipped", "skipped", "completed", "skipped"]  # filter's input is unchanged
    assert main(["doctor", "--run", "s3run"]) == 0
    assert sorted(store.read("s3run", "verdicts")["rollout_id"].to_pylist()) == sorted(rollouts["rollout_id"].to_pylist())



@pytest.mark.server
def test_a_checkpoint_is_uploaded_with_its_checksums_and_another_home_downloads_and_verifies_it_once(
        s3_runs, scratch, monkeypatch):
    from evoforge.models import checkpoint_store
    from evoforge.models.registry import folder_hash, resolve

    trained = scratch / "trained"
    (trained / "sub").mkdir(parents=True)
    (trained / "config.json").write_text('{"model_type": "llama"}')
    (trained / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
    (trained / "sub" / "metrics.json").write_text("{}")
    target = lake().run_dir("ck") / "models" / "r0-sft-0123abcd"
    assert checkpoint_store.training_folder(target) != trained and not checkpoint_store.is_published(target)
    checkpoint_store.publish(trained, target)
    assert checkpoint_store.is_published(target)

    monkeypatch.setenv("EVOFORGE_HOME", str(scratch / "other-machine"))  # no shared disk
    copy = checkpoint_store.local_copy(str(target))
    assert copy.is_relative_to(scratch / "other-machine" / ".cache")
    assert (copy / "model.safetensors").read_bytes() == (trained / "model.safetensors").read_bytes()
    resolved = resolve(str(target))  # what an engine given the registry's path loads
    assert resolved.path == str(copy) and resolved.model_id == f"r0-sft-0123abcd@{folder_hash(trained)}"
    (target / "model.safetensors").write_bytes(b"changed on the store")
    assert checkpoint_store.local_copy(str(target)) == copy  # verified once; later uses take the local copy

    monkeypatch.setenv("EVOFORGE_HOME", str(scratch / "third-machine"))
    with pytest.raises(checkpoint_store.CheckpointError, match="model.safetensors does not match"):
        checkpoint_store.local_copy(str(target))
    assert not (scratch / "third-machine" / ".cache" / "checkpoints" / target.bucket / target.key).exists()
    (target / checkpoint_store.CHECKPOINT_MANIFEST).unlink()
    with pytest.raises(checkpoint_store.CheckpointError, match="upload never finished"):
        checkpoint_store.local_copy(str(target))


@pytest.mark.server
def test_the_readme_lines_give_a_notebook_the_catalog_of_an_s3_run(s3_runs, scratch, monkeypatch):
    """README, "The lake on object storage": a data engineer's own DuckDB session over an S3 run."""
    store = lake()
    store.publish_stage("nb", 0, "ingest", {"problems": problems(7)}, key="a")
    catalog.refresh_catalog(store.run_dir("nb"))
    monkeypatch.chdir(scratch)
    bucket = store.run_dir("nb").bucket

    import duckdb
    import s3fs
    fs = s3fs.S3FileSystem()                                          # AWS_ENDPOINT_URL, credentials: the environment
    fs.get(f"s3://{bucket}/runs/nb/catalog.duckdb", "catalog.duckdb")  # the views (they name s3:// parts)
    con = duckdb.connect("catalog.duckdb", read_only=True)
    con.register_filesystem(fs)                                       # DuckDB reads s3:// through s3fs
    assert con.sql("SELECT count(*) FROM problems").fetchall() == [(7,)]


@pytest.mark.server
def test_a_stage_chunk_on_object_storage_is_stored_whole_and_read_back_by_the_next_attempt(s3_runs):
    """A resumable chunk (data/chunks.py, an Arrow IPC object) is uploaded once whole: the next attempt of the
    stage reads the same rows instead of computing them; a batch whose computing fails leaves no object."""
    from evoforge.data.chunks import Chunks, chunk_root

    folder = chunk_root(lake().run_dir("r"), 0, "verify") / "0123"
    rows = pa.table({"rollout_id": ["a", "b", None], "text": ["x" * 5000, "é", None]})
    first = Chunks(folder)
    assert first.get_or_compute("k1", lambda: rows).equals(rows) and first.counts() == (0, 1)
    with pytest.raises(RuntimeError):
        first.get_or_compute("k2", lambda: (_ for _ in ()).throw(RuntimeError("grader died")))
    assert [p.name for p in folder.glob("*")] == ["k1.arrow"] and unfinished_uploads(folder.parent) == []
    again = Chunks(folder)
    assert again.get_or_compute("k1", lambda: pytest.fail("computed again")).equals(rows) and again.counts() == (1, 0)
    again.clear()
    assert list(folder.glob("*")) == []
