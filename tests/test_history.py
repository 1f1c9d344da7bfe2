"""The lake's history (data/history.py): every commit a version, the run as it was at one of them, vacuum
removing only what nothing refers to, a checkpoint's exact training parts, queries across runs. Each on
local disk (unit) and on the local S3 server (server), through the command line a user types."""
from __future__ import annotations

import csv
import io
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from evoforge.app.cli import main
from evoforge.data import history, schemas
from evoforge.data.lake import lake
from evoforge.data.manifest import MANIFEST_NAME, history_names, new_part_name, read_history, read_manifest


def problems(n: int, prefix: str) -> pa.Table:
    return pa.Table.from_pylist([
        dict(problem_id=f"{prefix}{i}", question=f"q{i}", answer=str(i), source="t", source_file="f", source_row=i,
             origin="seed", parent_problem_id=None) for i in range(n)], schema=schemas.PROBLEMS)


def sql(capsys, *arguments: str) -> list[dict]:
    capsys.readouterr()
    assert main(["sql", "--csv", *arguments]) == 0
    return list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def stage_run(run: str, round: int, stage: str, started: datetime, output_fingerprint: str | None = None) -> None:
    """A completed stage run as the stage runner records it (flows/stage_runner.py)."""
    event = {name: None for name in schemas.STAGE_RUNS.names} | dict(
        stage_run_id=uuid.uuid4().hex, run=run, round=round, stage=stage, started_at=started, finished_at=started,
        status="completed", output_fingerprint=output_fingerprint)
    lake().append_run_table(run, "stage_runs", pa.Table.from_pylist([event], schema=schemas.STAGE_RUNS))


def checkpoint(round: int, model_id: str) -> pa.Table:
    row = {name: None for name in schemas.CHECKPOINTS.names} | dict(
        checkpoint_id=f"ck-{round}", model_id=model_id, method="sft", path=f"/ckpt/{round}", train_rows=3)
    return pa.Table.from_pylist([row], schema=schemas.CHECKPOINTS)


# -- --force twice, then --as-of the first version --------------------------------------------------------
def test_force_twice_then_as_of_the_first_version_returns_its_rows(lake_on, capsys):
    store = lake()
    for prefix, n in (("first", 3), ("second", 2), ("third", 4)):  # a stage committed, then rerun with --force twice
        store.publish_stage("r", 0, "ingest", {"problems": problems(n, prefix)}, config_hash=f"hash-{prefix}")
    capsys.readouterr()
    assert main(["history", "--run", "r"]) == 0
    listed = capsys.readouterr().out
    assert "superseded" in listed and "current" in listed and "hash-first"[:12] in listed

    assert [r["problem_id"] for r in sql(capsys, "--run", "r", "SELECT problem_id FROM problems ORDER BY 1")] == \
        ["third0", "third1", "third2", "third3"]
    first = sql(capsys, "--run", "r", "--as-of", "1", "SELECT problem_id, run FROM problems ORDER BY 1")
    assert first == [{"problem_id": f"first{i}", "run": "r"} for i in range(3)]
    assert len(sql(capsys, "--run", "r", "--as-of", "2", "SELECT * FROM problems")) == 2
    # by time: the moment of version 2's commit reads version 2
    versions = history.run_history(store, "r")
    assert [(v.number, v.manifest.version, v.manifest.config_hash, v.current) for v in versions] == [
        (1, 1, "hash-first", False), (2, 2, "hash-second", False), (3, 3, "hash-third", True)]
    moment = versions[1].committed_at.isoformat()
    assert len(sql(capsys, "--run", "r", "--as-of", moment, "SELECT * FROM problems")) == 2
    assert main(["sql", "--run", "r", "--as-of", "9", "SELECT 1"]) == 2
    assert "the run has versions 1 to 3" in capsys.readouterr().err



# -- vacuum ---------------------------------------------------------------------------------------------------
def test_vacuum_removes_only_superseded_parts_that_nothing_refers_to(lake_on, capsys):
    store = lake()
    store.publish_stage("r", 0, "ingest", {"problems": problems(3, "a")})  # version 1: a checkpoint trains on it
    time.sleep(0.01)
    stage_run("r", 0, "finetune", datetime.now(timezone.utc))
    store.publish_stage("r", 0, "finetune", {"checkpoints": checkpoint(0, "m@1")})
    store.publish_stage("r", 0, "ingest", {"problems": problems(2, "b")})  # version 3: superseded, referred to by nothing
    store.publish_stage("r", 0, "ingest", {"problems": problems(4, "c")})  # version 4: current
    folder = store.stage_dir("r", 0, "ingest")
    parts = {v.manifest.version: folder / v.manifest.parts[0].file for v in history.run_history(store, "r")
             if v.stage == "ingest"}

    capsys.readouterr()
    assert main(["vacuum", "--run", "r", "--older-than", "0"]) == 0  # a dry run by default
    out = capsys.readouterr().out
    assert "would remove" in out and parts[2].name in out and parts[1].name not in out
    assert all(path.exists() for path in parts.values())
    assert main(["vacuum", "--run", "r", "--older-than", "30d", "--apply"]) == 0  # superseded just now: too recent
    assert all(path.exists() for path in parts.values())

    assert main(["vacuum", "--run", "r", "--older-than", "0", "--apply"]) == 0
    assert "removed 1 part(s)" in capsys.readouterr().out
    assert parts[1].exists() and not parts[2].exists() and parts[3].exists()
    assert [r["problem_id"] for r in sql(capsys, "--run", "r", "--as-of", "1", "SELECT problem_id FROM problems ORDER BY 1")] \
        == ["a0", "a1", "a2"]  # what the checkpoint trained on still reads
    assert main(["sql", "--run", "r", "--as-of", "3", "SELECT * FROM problems"]) == 2
    assert "lost parts to `evoforge vacuum`" in capsys.readouterr().err
    assert main(["history", "--run", "r"]) == 0 and "vacuumed" in capsys.readouterr().out
    assert store.sweep("r") == 0 and store.read("r", "problems").num_rows == 4



def test_status_and_a_stage_start_keep_superseded_parts_without_reading_the_history(lake_on, capsys):
    """A manifest names the parts of earlier versions still kept: `status` and the sweep of a stage start
    tell them from a dead writer's leftovers without `_history/` (here every copy is unreadable, and
    nothing is lost or reported), while `doctor`, which reads every version, names a damaged copy."""
    store = lake()
    for prefix, n in (("a", 3), ("b", 2), ("c", 4)):
        store.publish_stage("r", 0, "ingest", {"problems": problems(n, prefix)})
    folder = store.stage_dir("r", 0, "ingest")
    earlier = sorted(folder / p.file for version in read_history(folder)[:2] for p in version.parts)
    copies = history_names(folder)
    for path in copies.values():
        path.write_text("not a manifest")
    health = store.inspect("r")
    assert sorted(health.superseded) == earlier and not health.damaged and not health.leftovers
    assert store.sweep("r") == 0 and all(path.exists() for path in earlier)
    assert store.read("r", "problems").num_rows == 4
    capsys.readouterr()
    assert main(["doctor", "--run", "r"]) == 1
    assert any(f"damaged: {path} (unreadable manifest" in capsys.readouterr().out for path in copies.values())


def test_a_folder_committed_before_manifests_named_superseded_parts_keeps_them_and_its_next_commit_names_them(lake_on):
    import json

    store = lake()
    for prefix, n in (("a", 3), ("b", 2)):
        store.publish_stage("r", 0, "ingest", {"problems": problems(n, prefix)})
    folder = store.stage_dir("r", 0, "ingest")
    body = json.loads((folder / MANIFEST_NAME).read_text())
    del body["superseded"]  # as an evoforge before the list wrote it
    (folder / MANIFEST_NAME).write_text(json.dumps(body))
    (old,) = [folder / p.file for p in read_history(folder)[0].parts]
    leftover = folder / "problems" / new_part_name()
    leftover.write_bytes(b"PAR1 the part of a writer that died")
    assert store.sweep("r") == 1 and old.exists() and not leftover.exists()  # the history tells them apart
    store.publish_stage("r", 0, "ingest", {"problems": problems(1, "c")})
    assert sorted(read_manifest(folder).superseded) == sorted(p.file for v in read_history(folder)[:2] for p in v.parts)


# -- lineage ----------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_checkpoints_lineage_is_the_exact_parts_it_trained_on_even_after_a_rerun(runs_root, capsys):
    store = lake()
    store.publish_stage("r", 0, "ingest", {"problems": problems(3, "a")})
    store.publish_stage("r", 0, "pairs", {"sft_examples": schemas.SFT_EXAMPLES.empty_table()})
    time.sleep(0.01)
    started = datetime.now(timezone.utc)
    fingerprint = store.publish_stage("r", 0, "finetune", {"checkpoints": checkpoint(0, "m@1")})
    stage_run("r", 0, "finetune", started, fingerprint)
    trained_on = {store.stage_dir("r", 0, s) / p.file for s in ("ingest", "pairs")
                  for p in read_manifest(store.stage_dir("r", 0, s)).parts}
    store.publish_stage("r", 0, "ingest", {"problems": problems(5, "b")})  # rerun with --force after training

    found = history.checkpoint_lineage(store, "ck-0")
    assert found.run == "r" and found.stage_run["output_fingerprint"] == fingerprint
    assert {v.folder / p.file for v, p in found.parts()} == trained_on
    assert history.checkpoint_lineage(store, "m@1").checkpoint["checkpoint_id"] == "ck-0"
    capsys.readouterr()
    assert main(["lineage", "ck-0"]) == 0
    out = capsys.readouterr().out
    assert "round 0 ingest v1 (superseded) problems" in out and all(p.name in out for p in trained_on)
    assert main(["vacuum", "--run", "r", "--older-than", "0", "--apply"]) == 0
    assert all(path.exists() for path in trained_on)  # kept: the checkpoint refers to them
    assert main(["lineage", "nope"]) == 2 and "no run under" in capsys.readouterr().err


# -- a commit killed part way ------------------------------------------------------------------------------
KILLED_COMMIT = """
import sys, time
from evoforge.data import manifest, schemas
from evoforge.data.lake import lake
import pyarrow as pa
write = manifest.write_text
def announced(path, text, *args):
    print("write " + str(path).rsplit("/", 1)[-1], flush=True)
    time.sleep(30 if str(path).rsplit("/", 1)[-1] == sys.argv[1] or (sys.argv[1] == "copy" and "_history" in str(path)) else 0)
    return write(path, text, *args)
manifest.write_text = announced
rows = pa.Table.from_pylist([dict(problem_id=f"new{i}", question="q", answer="1", source="t", source_file="f", source_row=i,
                                  origin="seed", parent_problem_id=None) for i in range(5)], schema=schemas.PROBLEMS)
lake().publish_stage("r", 0, "ingest", {"problems": rows})
"""


def kill_during_commit(when: str) -> None:
    """SIGKILL a writer as it is about to write `when` (the manifest, or its history copy)."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_COMMIT, when], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("write ") and (line.split()[1] == when or (when == "copy" and line.split()[1].startswith("v"))):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_a_commit_killed_part_way_leaves_the_previous_version_readable(lake_on_with_processes, capsys):
    store = lake()
    store.publish_stage("r", 0, "ingest", {"problems": problems(3, "a")})
    store.publish_stage("r", 0, "ingest", {"problems": problems(2, "b")})
    folder = store.stage_dir("r", 0, "ingest")

    kill_during_commit(MANIFEST_NAME)  # killed before the commit: version 2 is the output, the new parts are debris
    assert read_manifest(folder).version == 2 and store.read("r", "problems")["problem_id"].to_pylist() == ["b0", "b1"]
    assert len(sql(capsys, "--run", "r", "--as-of", "1", "SELECT * FROM problems")) == 3
    assert store.sweep("r") == 1 and len(store.inspect("r").superseded) == 1

    kill_during_commit("copy")  # killed after the commit, before its copy: version 3 is current and in the history
    assert read_manifest(folder).version == 3 and 3 not in history_names(folder)
    assert [m.version for m in read_history(folder)] == [1, 2, 3]
    store.publish_stage("r", 0, "ingest", {"problems": problems(1, "c")})  # the next commit writes the missing copy
    assert sorted(history_names(folder)) == [1, 2, 3, 4]
    assert [len(sql(capsys, "--run", "r", "--as-of", str(v), "SELECT * FROM problems")) for v in (1, 2, 3, 4)] == [3, 2, 5, 1]



# -- across runs ------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_all_runs_queries_every_run_with_a_run_column(runs_root, capsys):
    store = lake()
    store.publish_stage("one", 0, "ingest", {"problems": problems(3, "a")})
    store.publish_stage("two", 0, "ingest", {"problems": problems(2, "b")})
    store.publish_stage("two", 1, "synthesize", {"problems": problems(1, "v")})
    rows = sql(capsys, "--all-runs", "SELECT run, round, count(*) AS n FROM problems GROUP BY ALL ORDER BY ALL")
    assert rows == [{"run": "one", "round": "0", "n": "3"}, {"run": "two", "round": "0", "n": "2"},
                    {"run": "two", "round": "1", "n": "1"}]
    assert main(["sql", "--all-runs", "--run", "one", "SELECT 1"]) == 2
    assert main(["sql", "SELECT 1"]) == 2 and "--all-runs" in capsys.readouterr().err
