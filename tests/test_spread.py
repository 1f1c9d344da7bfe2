"""filter and pairs spread over worker processes (`cluster.range_workers`, data/spread.py): the same rows in
the same order as one process, the same input fingerprints (each input read once, by the workers), one
commit of every worker's parts; a worker's failure commits nothing and leaves nothing behind."""
from __future__ import annotations

import pyarrow as pa
import pytest

from evoforge.data import lake as lake_module
from evoforge.data import schemas
from evoforge.data import spread as spread_module
from evoforge.data.ids import stable_hash
from evoforge.data.lake import DamagedPart, Lake
from tests.test_streaming import in_batches, random_graded_round
from tests.waiting import wait_until


@pytest.fixture()
def no_prefect_api(monkeypatch):
    import prefect.artifacts

    for name in ("create_table_artifact", "create_markdown_artifact"):  # no Prefect API in these tests
        monkeypatch.setattr(prefect.artifacts, name, lambda **kw: None)


def config(workers: int):
    from evoforge.flows.config import ClusterConfig, RoundConfig

    return RoundConfig(cluster=ClusterConfig(range_workers=workers))


def graded_round_with_variants_and_a_search(store) -> tuple[str, str]:
    """A round in the lake, over several parts per input: the pool, its rollouts and verdicts, three
    kept variants of this round among five that synthesize solved, and a search tree of one problem.
    Returns the searched problem and its question."""
    from tests.test_mcts import crafted_tree

    problems, _, table, verdicts = random_graded_round(seed=3)
    store.publish_stage("r", 0, "ingest", {"problems": schemas.conform(problems, schemas.PROBLEMS, where="problems",
                                                                       missing_as_null=True)}, key="source")
    store.publish_stage("r", 0, "generate", {"rollouts": in_batches(table, 64)})
    store.publish_stage("r", 0, "verify", {"verdicts": in_batches(schemas.conform(
        verdicts, schemas.VERDICTS, where="verdicts", missing_as_null=True), 50)})
    variant_ids = [stable_hash("variant", i) for i in range(5)]
    store.publish_stage("r", 0, "synthesize", {
        "problems": schemas.conform(pa.table({
            "problem_id": variant_ids[:3], "question": [f"variant {i}" for i in range(3)],
            "origin": ["variant"] * 3}), schemas.PROBLEMS, where="variants", missing_as_null=True),
        "rollouts": schemas.conform(pa.table({
            "rollout_id": [stable_hash("variant rollout", v, i) for v in variant_ids for i in range(4)],
            "problem_id": [v for v in variant_ids for _ in range(4)],
            "text": [f"so \\boxed{{{i % 2}}}" for _ in variant_ids for i in range(4)],
            "completion_tokens": pa.array([10 + i for _ in variant_ids for i in range(4)], pa.int32()),
            "mean_logprob": [-0.5] * 20}), schemas.ROLLOUTS, where="variant rollouts", missing_as_null=True),
        "verdicts": schemas.conform(pa.table({
            "rollout_id": [stable_hash("variant rollout", v, i) for v in variant_ids for i in range(4)],
            "problem_id": [v for v in variant_ids for _ in range(4)],
            "verdict": ["correct", "wrong"] * 10}), schemas.VERDICTS, where="variant verdicts", missing_as_null=True)})
    searched, question = problems["problem_id"][5].as_py(), problems["question"][5].as_py()
    tree = crafted_tree()
    store.publish_stage("r", 0, "mcts", {"mcts_nodes": tree.set_column(
        tree.schema.get_field_index("problem_id"), "problem_id", pa.array([searched] * tree.num_rows))})
    return searched, question


@pytest.mark.slow
def test_verify_over_two_workers_grades_what_one_process_grades(runs_root, no_prefect_api, monkeypatch):
    from evoforge.data.lake import lake
    from evoforge.flows.verify import verify_flow
    from tests.test_streaming import golds, rollouts

    monkeypatch.setattr(lake_module, "PART_MAX_ROWS", 150)  # 480 rollouts in 4 parts
    monkeypatch.setattr(lake_module, "KEY_RANGE_ROWS", 100)  # 5 ranges, 2 workers with 2 graders each
    table = rollouts(60)
    problems = golds(table).append_column("question", pa.array(["q"] * 60))
    store = lake()
    store.publish_stage("r", 0, "ingest", {"problems": schemas.conform(problems, schemas.PROBLEMS, where="problems",
                                                                       missing_as_null=True)}, key="source")
    store.publish_stage("r", 0, "generate", {"rollouts": in_batches(table, 64)})
    graded = {}
    for workers in (1, 2):
        assert verify_flow.fn("r", 0, config(workers), force=True).status == "completed"
        verdicts = store.read("r", "verdicts", 0, "verify")
        # `seconds` is how long grading took, `graded_with` which of a chunk's equal answers was graded
        graded[workers] = verdicts.drop_columns(["seconds", "graded_with"]).to_pylist()
    assert graded[2] == graded[1] and len(graded[1]) == table.num_rows
    assert {v["verdict"] for v in graded[2]} >= {"correct", "wrong", "no_answer"}
    one, two = executions(store, "verify")
    assert one["input_fingerprint"] == two["input_fingerprint"]
    assert verify_flow.fn("r", 0, config(1)).status == "skipped"


def executions(store, stage: str) -> list[dict]:
    return [e for e in store.read("r", "stage_runs").to_pylist() if e["stage"] == stage and e["status"] == "completed"]


def test_filter_and_pairs_over_two_workers_write_what_one_process_writes(lake_on_with_processes, no_prefect_api,
                                                                         monkeypatch):
    from evoforge.data.lake import lake
    from evoforge.flows.filter import filter_flow
    from evoforge.flows.pairs import pairs_flow

    monkeypatch.setattr(lake_module, "PART_MAX_ROWS", 300)  # every input in several parts,
    monkeypatch.setattr(lake_module, "ROW_GROUP_ROWS", 50)  # of six row groups,
    monkeypatch.setattr(spread_module, "READ_TASK_ROWS", 100)  # read in three slices by the workers
    monkeypatch.setattr(lake_module, "KEY_RANGE_ROWS", 100)  # pairs: 10 ranges, filter: 2
    monkeypatch.setattr(spread_module, "BLOCK_ROWS", 100)  # pairs: 8 blocks of ranges, each writing its parts
    store = lake()
    searched, question = graded_round_with_variants_and_a_search(store)
    # the parts of the streamed inputs this process reads (filter holds the pool's ids; pairs streams the pool):
    # with workers, none: they read them, and hash them for the stage's input fingerprint
    read_here, streamed = [], set()
    part_batches = Lake._part_batches

    def counted(store, run, round, stage, folder, part, schema):
        if (stage, part.table) in streamed:
            read_here.append((stage, part.table))
        return part_batches(store, run, round, stage, folder, part, schema)

    monkeypatch.setattr(Lake, "_part_batches", counted)
    written = {}
    for workers in (1, 2):
        for flow, tables in ((filter_flow, ("problem_stats",)), (pairs_flow, ("pairs", "sft_examples"))):
            streamed = {("generate", "rollouts"), ("verify", "verdicts")} | (
                {("ingest", "problems"), ("synthesize", "rollouts"), ("synthesize", "verdicts")} if flow is pairs_flow else set())
            read_here.clear()
            assert flow.fn("r", 0, config(workers), force=True).status == "completed"
            assert bool(read_here) == (workers == 1), (workers, flow.name, read_here)
            for table in tables:
                written[workers, table] = store.read("r", table, 0, flow.name).to_pylist()
    for table in ("problem_stats", "pairs", "sft_examples"):
        assert written[2, table] == written[1, table], table  # the same rows, in the same order
    assert len(written[1, "pairs"]) > 20 and len(written[1, "sft_examples"]) > 20
    kinds = {(p["kind"], p["prompt"]) for p in written[2, "pairs"] if p["problem_id"] == searched}
    assert ("step", question) in kinds  # the step pairs got their question from the pool the workers read
    assert {e["bucket"] for e in written[2, "sft_examples"] if e["origin"] == "variant"} == {"variant"}
    assert len({e["problem_id"] for e in written[2, "sft_examples"] if e["origin"] == "variant"}) == 3  # kept only
    for stage in ("filter", "pairs"):
        one, two = executions(store, stage)
        assert one["input_fingerprint"] == two["input_fingerprint"]  # the workers hashed what one pass hashes
        assert (one["rows_in"], one["rows_out"]) == (two["rows_in"], two["rows_out"])
    # a rerun on one process finds the spread execution's output unchanged
    assert filter_flow.fn("r", 0, config(1)).status == "skipped"
    assert store.inspect("r").leftovers == [] and not list((lake_module.home.home() / ".tmp" / "spill").glob(
        f"*-{__import__('os').getpid()}-*"))


@pytest.mark.slow
def test_a_worker_that_fails_commits_nothing_and_leaves_no_part(runs_root, no_prefect_api, monkeypatch):
    import os

    from evoforge.data.lake import lake
    from evoforge.flows.filter import filter_flow

    monkeypatch.setattr(lake_module, "PART_MAX_ROWS", 300)
    monkeypatch.setattr(lake_module, "ROW_GROUP_ROWS", 50)
    monkeypatch.setattr(spread_module, "READ_TASK_ROWS", 100)  # a part's row groups in three slices
    monkeypatch.setattr(lake_module, "KEY_RANGE_ROWS", 40)
    store = lake()
    graded_round_with_variants_and_a_search(store)
    assert filter_flow.fn("r", 0, config(2)).status == "completed"
    before = store.read("r", "problem_stats", 0, "filter")
    manifest = store.manifest("r", 0, "filter")
    # the last part of the verdicts is damaged: the worker that reads it fails, naming it
    last = [p for p in store.manifest("r", 0, "verify").parts if p.table == "verdicts"][-1]
    path = store.stage_dir("r", 0, "verify") / last.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedPart, match=last.file.split("/")[-1]):
        filter_flow.fn("r", 0, config(2), force=True)
    assert store.manifest("r", 0, "filter").commit == manifest.commit  # nothing committed
    assert store.read("r", "problem_stats", 0, "filter").equals(before)
    listed = {p.file for p in manifest.parts}
    on_disk = {f"problem_stats/{p.name}" for p in (store.stage_dir("r", 0, "filter") / "problem_stats").iterdir()}
    assert on_disk == listed  # no worker's part is left
    failed = [e for e in store.read("r", "stage_runs").to_pylist() if e["stage"] == "filter" and e["status"] == "failed"]
    assert len(failed) == 1 and last.file.split("/")[-1] in failed[0]["error"]
    assert not list((lake_module.home.home() / ".tmp" / "spill").glob(f"*-{os.getpid()}-*"))  # the split files too


def stats_or_fail(fail_at: str, ranged: dict[str, pa.Table]):
    """A range function for the test below: the range's problems as `problem_stats` rows, or an error in the
    range that holds `fail_at` (sent to the workers: defined at module level)."""
    ids = sorted(ranged["problems"]["problem_id"].to_pylist())
    if fail_at in ids:
        raise ValueError(f"range of {fail_at} failed")
    yield "problem_stats", pa.Table.from_pylist([dict(problem_id=p, n=1, correct=1, accuracy=1.0, pass_at_k=[],
                                                      mean_tokens=1.0, bucket="solved") for p in ids],
                                                schema=schemas.PROBLEM_STATS)


@pytest.mark.slow
def test_a_range_that_fails_in_a_worker_removes_the_parts_the_other_workers_wrote(runs_root, monkeypatch):
    import functools
    import os

    from evoforge.data.lake import lake
    from evoforge.data.spread import RangedPass, spread_ranges

    monkeypatch.setattr(spread_module, "BLOCK_ROWS", 50)
    ids = sorted(stable_hash("p", i) for i in range(400))
    boundaries = tuple(ids[i] for i in range(20, 400, 20))  # 20 ranges, 8 blocks of 50 rows on two workers
    store = lake()
    store.ensure_run("r")
    ok = spread_ranges(RangedPass("r", 0, "filter", "problem_id", boundaries, {"problems": [pa.table({"problem_id": ids})]},
                                  functools.partial(stats_or_fail, "none"), ("problem_stats",)), workers=2)
    parts = ok.parts["problem_stats"].parts
    assert len(parts) == 8 and sum(p.rows for p in parts) == 400  # a part per block, in block order:
    assert [p.file for p in parts] == sorted(p.file for p in parts)
    store.publish("r", 0, "filter", {"problem_stats": ok.parts["problem_stats"]})
    assert store.read("r", "problem_stats", 0, "filter")["problem_id"].to_pylist() == ids  # range order
    folder = store.stage_dir("r", 0, "filter") / "problem_stats"
    committed = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError, match=f"range of {ids[-1]} failed"):  # the last block fails
        spread_ranges(RangedPass("r", 0, "filter", "problem_id", boundaries, {"problems": [pa.table({"problem_id": ids})]},
                                 functools.partial(stats_or_fail, ids[-1]), ("problem_stats",)), workers=2)
    # the parts of the blocks that finished are removed; a block the failure cut short (the other worker's, at
    # most one) may leave a part no manifest lists, which the next stage start on the run sweeps
    left = sorted(p.name for p in folder.iterdir() if p.name not in committed)
    assert len(left) <= 1 and store.inspect("r").leftovers == [folder / name for name in left]
    store.sweep("r")
    assert sorted(p.name for p in folder.iterdir()) == committed
    assert not list((lake_module.home.home() / ".tmp" / "spill").glob(f"*-{os.getpid()}-*"))


@pytest.mark.unit
def test_a_parts_row_groups_read_in_slices_give_the_part_and_a_damaged_slice_is_named(runs_root, monkeypatch):
    import pyarrow.parquet as pq

    from evoforge.data.lake import lake
    from tests.test_streaming import rollouts

    monkeypatch.setattr(lake_module, "ROW_GROUP_ROWS", 50)
    store = lake()
    table = rollouts(40)  # 320 rows: seven row groups
    store.publish_stage("r", 0, "generate", {"rollouts": table})
    (part,) = store.manifest("r", 0, "generate").parts
    columns = ["rollout_id", "problem_id", "text"]
    slices = [pa.Table.from_batches(list(store.part_batches("r", 0, "generate", part, columns, (k, 3))))
              for k in range(3)]
    assert [s.num_rows for s in slices] == [100, 100, 120]  # row groups 0-1, 2-3, 4-6
    assert pa.concat_tables(slices).equals(table.select(columns))
    path = store.stage_dir("r", 0, "generate") / part.file
    text = pq.ParquetFile(path).metadata.row_group(5).column(table.schema.get_field_index("text"))
    offset = text.dictionary_page_offset or text.data_page_offset  # the first page of a column the last slice reads
    data = bytearray(path.read_bytes())
    data[offset:offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    for k in (0, 2):  # the first slice checks the checksum; the last finds its pages unreadable, then checks it
        with pytest.raises(DamagedPart, match="checksum differs"):
            list(store.part_batches("r", 0, "generate", part, columns, (k, 3)))


def slow_range(ranged: dict[str, pa.Table]):
    """A range that takes a minute (sent to the workers of the test below), once it has said it started."""
    import os
    import time
    from pathlib import Path

    Path(os.environ["SLOW_RANGE_STARTED"], str(os.getpid())).touch()
    time.sleep(60)
    yield from ()


SPREAD_THAT_SLEEPS = """
import functools, sys
import pyarrow as pa
from evoforge.data.lake import lake
from evoforge.data.spread import RangedPass, spread_ranges
from tests.test_spread import slow_range
lake().ensure_run("r")
print("started", flush=True)
spread_ranges(RangedPass("r", 0, "filter", "problem_id", ("b",), {"problems": [pa.table({"problem_id": ["a", "c"]})]},
                         slow_range, ("problem_stats",)), workers=2)
"""


@pytest.mark.slow
def test_a_stage_process_killed_outright_takes_its_workers_with_it(runs_root, scratch, monkeypatch):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    started = scratch / "ranges started"
    started.mkdir()
    monkeypatch.setenv("SLOW_RANGE_STARTED", str(started))
    stage = subprocess.Popen([sys.executable, "-c", SPREAD_THAT_SLEEPS], stdout=subprocess.PIPE, text=True,
                             cwd=str(Path(__file__).resolve().parent.parent))
    assert stage.stdout.readline().strip() == "started"

    def children(pid: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                found += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return found

    wait_until("both workers in a range", lambda: len(list(started.iterdir())) == 2, 60, every=0.2)
    workers = [int(p.name) for p in started.iterdir()]
    assert set(workers) <= set(children(stage.pid))
    os.kill(stage.pid, signal.SIGKILL)
    stage.wait()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # not a zombie
        except OSError:
            return False

    wait_until("the workers to end with the stage process", lambda: not any(alive(w) for w in workers), 10, every=0.1)


@pytest.mark.slow
def test_an_export_spread_over_two_workers_writes_each_parts_shards_and_reads_back_equal(runs_root, scratch,
                                                                                      no_prefect_api, monkeypatch):
    import datasets
    import pyarrow.parquet as pq

    from evoforge.data.lake import lake
    from evoforge.flows.export import export_run
    from evoforge.tasks.arrow_datasets import hub_compatible

    from evoforge.flows.filter import filter_flow
    from evoforge.flows.pairs import pairs_flow

    monkeypatch.setattr(lake_module, "PART_MAX_ROWS", 300)  # rollouts and verdicts in four parts each
    monkeypatch.setattr(lake_module, "ROW_GROUP_ROWS", 50)
    store = lake()
    graded_round_with_variants_and_a_search(store)
    assert filter_flow.fn("r", 0, config(1)).status == "completed"
    monkeypatch.setattr(lake_module, "PART_MAX_ROWS", 60)  # the sft examples in several parts too
    assert pairs_flow.fn("r", 0, config(1)).status == "completed"
    assert len([p for p in store.manifest("r", 0, "pairs").parts if p.table == "sft_examples"]) > 2
    tables = ("rollouts", "verdicts", "sft")  # two lake tables and a row-wise method's rows
    monkeypatch.setattr(spread_module, "READ_TASK_ROWS", 150)  # a lake table's part of 300 rows is two pieces
    for format in ("parquet", "arrow"):
        for workers in (1, 2):
            export_run("r", list(tables), str(scratch / f"{format}-{workers}"), format=format, config=config(workers))
        for table in tables:
            expected = None if table == "sft" else hub_compatible(store.read("r", table))
            # the shards in name order, as the card's `train-*.parquet` gives them (not through `datasets`' cache)
            one, two = (pa.concat_tables(pq.read_table(p) for p in sorted((scratch / f"{format}-{workers}" / table).iterdir()))
                        if format == "parquet" else datasets.load_from_disk(str(scratch / f"{format}-{workers}" / table)).data.table
                        for workers in (1, 2))
            assert two.num_rows == one.num_rows > 20 and two.equals(one), (format, table)  # rows and order
            if expected is not None:
                assert two.select(expected.column_names).cast(expected.schema).equals(expected), (format, table)
    shards = sorted(p.name for p in (scratch / "parquet-2" / "rollouts").iterdir())
    slices = [-(-p.rows // 150) for stage in ("generate", "synthesize") for p in store.manifest("r", 0, stage).parts
              if p.table == "rollouts"]
    assert len(slices) == 5 and sum(slices) > 5  # a shard per slice of each part of the rollouts
    assert shards == [f"train-{i:05d}-of-{sum(slices):05d}.parquet" for i in range(sum(slices))]


VERIFY_ON_TWO_WORKERS = """
from evoforge.data import lake as lake_module
from evoforge.flows.config import ClusterConfig, RoundConfig
from evoforge.flows.verify import verify_flow
from tests.test_spread import no_prefect_artifacts

if __name__ == "__main__":
    no_prefect_artifacts()
    lake_module.KEY_RANGE_ROWS = 8_192  # five ranges of two resumable chunks each
    verify_flow.fn("r", 0, RoundConfig(cluster=ClusterConfig(range_workers=2)), force={force})
"""


def no_prefect_artifacts() -> None:
    import prefect.artifacts

    for name in ("create_table_artifact", "create_markdown_artifact"):  # no Prefect API here
        setattr(prefect.artifacts, name, lambda **kw: None)


@pytest.mark.slow
def test_a_spread_verify_killed_midway_resumes_from_its_workers_chunks(runs_root, scratch):
    """kill -9 of the stage process while its two workers grade: the rerun reuses the chunks they stored, and the
    verdicts are those of a run that was never killed: none lost, none twice."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from evoforge.data.chunks import chunk_root
    from evoforge.data.lake import lake
    from tests.test_cluster import SLOW_VERIFY
    from tests.test_streaming import golds, rollouts

    table = rollouts(500, per_problem=80)  # 40,000 rollouts, a few distinct answers per problem
    problems = golds(table).append_column("question", pa.array(["q"] * 500))
    store = lake()
    store.publish_stage("r", 0, "ingest", {"problems": schemas.conform(problems, schemas.PROBLEMS, where="problems",
                                                                       missing_as_null=True)}, key="source")
    store.publish_stage("r", 0, "generate", {"rollouts": table})
    root = Path(__file__).resolve().parent.parent

    def stage(force: bool, **options) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", VERIFY_ON_TWO_WORKERS.format(force=force)], cwd=str(root),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **options)

    # its workers grade a chunk in ~5 ms: the first attempt's take 0.3 s a chunk (a sitecustomize every process of
    # it imports, spawned workers included), so that the kill lands with chunks left to do
    slow = scratch / "slow-site"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_VERIFY.format(chunk=4096, delay=0.3))
    first = stage(False, env={**os.environ, "PYTHONPATH": str(slow)})
    chunks = chunk_root(store.run_dir("r"), 0, "verify")

    def three_chunks_stored() -> bool:
        assert first.poll() is None, f"verify ended before it could be killed:\n{first.stdout.read()[-3000:]}"
        return len(list(chunks.glob("*/*.arrow"))) >= 3

    wait_until("three verify chunks", three_chunks_stored, 300, every=0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    stored = len(list(chunks.glob("*/*.arrow")))
    assert 3 <= stored < 10 and store.manifest("r", 0, "verify") is None  # nothing committed

    second = stage(False)
    log = second.communicate(timeout=600)[0]
    assert second.returncode == 0, log[-3000:]
    reused = int(log.split(" chunk(s) reused")[0].rsplit(" ", 1)[-1])
    assert stored <= reused < 10 and "was interrupted" in log  # what the killed workers stored, and any finishing
    resumed = store.read("r", "verdicts", 0, "verify")
    ids = resumed["rollout_id"].to_pylist()
    assert len(ids) == table.num_rows and len(set(ids)) == len(ids)

    never_killed = stage(True)
    assert never_killed.wait(timeout=600) == 0
    again = store.read("r", "verdicts", 0, "verify")
    columns = ["rollout_id", "problem_id", "verdict", "extracted_answer", "gold"]
    assert resumed.select(columns).equals(again.select(columns))


@pytest.mark.unit
def test_a_stage_spreads_by_default_only_from_a_million_rows_and_over_no_more_workers_than_reading_tasks(monkeypatch):
    import os

    from evoforge.flows.config import ClusterConfig
    from evoforge.flows.spread import range_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a 64-core machine
    default = ClusterConfig()
    assert range_workers(default, 999_999) == 1  # the demo's rounds, the tests': the stage's own process
    assert range_workers(default, 1_000_000) == 3  # three reading tasks' worth: no worker would idle
    assert range_workers(default, 10_000_000) == 38 and range_workers(default, 80_000_000) == 64
    assert range_workers(ClusterConfig(range_workers=5), 100) == 5  # as the user sets it
