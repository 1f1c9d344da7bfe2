"""Requests to object storage per stage start, per commit and per `status`, and how many times a
stage reads each of its inputs, on a run with many chunk parts and several versions of every stage.

    .venv/bin/python bench/stage_requests.py [--rounds 3] [--versions 4] [--chunks 20000] [--rollouts 200000]

A run is written to a local S3 server (moto, data/local_s3.py): `--rounds` rounds of generate, verify,
filter and pairs (and one ingest), each stage folder committed `--versions` times, `--events` stage_runs
events, and `--chunks` chunk parts of a generate in progress under `_chunks/` (what a stage holds
while it works on a large round: at 10M rollouts, tens of thousands). The last round's generate and
verify hold `--rollouts` rows. The HTTP requests the server answered are counted from its request
log, by kind (LIST is a GET with a prefix):

- stage folders: `Lake.stage_dirs`, the listing every stage start, status and query begins with
- schema files: `Lake.ensure_run`'s check of the run's 18 zero-row schema files (since issue 30 once per
  process and run; before it, at every commit and stage start, where the figures below include it)
- stage start: what `run_guard` does before a stage's own work (the run's lease, the sweep of dead
  writers' leftovers, the run's schema files, the stage_runs compaction check, open attempts), in a
  process that has checked the schema files (the first stage start of a process adds that row once)
- status: `Lake.inspect` (what `evoforge status`, `sql` and the catalog refresh read)
- commit: one `Lake.publish` of 1,000 rows, the run's lease held (as a stage holds it)
- filter, pairs: the stage computed (`--force`), then rerun on unchanged inputs (skipped), each with
  how many times it read each input part's rows (rollouts, verdicts)

The server is moto, in memory, on this machine: the counts are what a client sends to any S3; real
S3 adds ~10-30 ms per sequential request, so a request count is the latency a stage start pays.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ beside evoforge: bench.s3_requests

from evoforge.data import home  # noqa: E402

home.configure()

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from evoforge.data import schemas  # noqa: E402
from evoforge.data.lake import Lake, use_lake  # noqa: E402
from evoforge.data.local_s3 import LocalS3  # noqa: E402

from bench.s3_requests import RequestLog as ServerLog  # noqa: E402

RUN = "bench"
BUCKET = "stage-requests"
SAMPLES = 8
STAGES = ("generate", "verify", "filter", "pairs")


class RequestLog(ServerLog):
    """bench/s3_requests.py's log of the requests the moto server answered, read as (kind, target) per
    request, kind LIST for a listing; it waits 0.2 s around every mark, since the server logs right after
    answering."""

    def mark(self) -> int:
        time.sleep(0.2)
        return super().mark()

    def since(self, mark: int) -> list[tuple[str, str]]:
        time.sleep(0.15)  # with the 0.05 s `entries` waits
        return [("LIST" if method == "GET" and ("list-type" in target or "prefix=" in target) else method, target)
                for method, target, _status in self.entries(mark)]


def cell(requests: list[tuple[str, str]]) -> str:
    kinds = Counter(kind for kind, _ in requests)
    return f"{len(requests):>6}  ({', '.join(f'{n} {k}' for k, n in kinds.most_common())})"


def rows_of(table: str, n: int, tag: str) -> pa.Table:
    """`n` rows of a round table, its key columns distinct per `tag`, the rest null."""
    schema = schemas.ROUND_TABLES[table]
    index = pa.array(range(n), pa.int64())
    ids = pc.binary_join_element_wise(pa.scalar(tag), pc.cast(index, pa.string()), "")
    columns = {}
    for field in schema:
        if field.name.endswith("_id") and pa.types.is_string(field.type):
            columns[field.name] = ids
        else:
            columns[field.name] = pa.nulls(n, field.type)
    return pa.table(columns, schema=schema)


def graded_round(rollouts: int) -> dict[str, dict[str, pa.Table]]:
    """The last round's large tables: rollouts (8 per problem), their verdicts (a quarter correct),
    and problem stats (every problem under-performing, so each takes pairs and SFT examples)."""
    problems = rollouts // SAMPLES
    pid = pc.binary_join_element_wise(pa.scalar("p"), pc.cast(pa.array(range(problems)), pa.string()), "")
    index = pa.array(range(rollouts), pa.int64())
    of_problem = pc.take(pid, pc.divide(index, SAMPLES))
    rid = pc.binary_join_element_wise(pa.scalar("r"), pc.cast(index, pa.string()), "")
    correct = pc.equal(pc.bit_wise_and(index, 3), 0)
    return {
        "ingest": {"problems": pa.table({
            "problem_id": pid, "question": pc.binary_join_element_wise("What is ", pid, " plus one?", ""),
            "answer": pc.cast(pa.array(range(problems)), pa.string()), "source": pa.array(["bench"] * problems),
            "origin": pa.array(["seed"] * problems)})},
        "generate": {"rollouts": pa.table({
            "rollout_id": rid, "problem_id": of_problem, "model_id": pa.array(["bench@0"] * rollouts),
            "seed": index, "sample_index": pc.bit_wise_and(index, SAMPLES - 1),
            "text": pc.binary_join_element_wise("Let me add one step by step. The answer is \\boxed{", rid, "}.", ""),
            "completion_tokens": pc.add(pc.bit_wise_and(index, 127), 20), "finish_reason": pa.array(["stop"] * rollouts),
            "mean_logprob": pc.divide(pc.cast(pc.bit_wise_and(index, 15), pa.float64()), -16.0)})},
        "verify": {"verdicts": pa.table({
            "rollout_id": rid, "problem_id": of_problem, "verdict": pc.if_else(correct, "correct", "wrong"),
            "extracted_answer": rid, "gold": pa.array(["1"] * rollouts)})},
        "filter": {"problem_stats": pa.table({
            "problem_id": pid, "n": pa.array([SAMPLES] * problems, pa.int32()),
            "correct": pa.array([2] * problems, pa.int32()), "accuracy": pa.array([0.25] * problems),
            "bucket": pa.array(["underperforming"] * problems)})},
    }


def conformed(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    return {name: schemas.conform(rows, schemas.ROUND_TABLES[name], where=name, missing_as_null=True)
            for name, rows in tables.items()}


def build(lake: Lake, s3: LocalS3, rounds: int, versions: int, chunks: int, events: int, rollouts: int) -> None:
    last = rounds - 1
    large = graded_round(rollouts)
    for version in range(versions):
        lake.publish_stage(RUN, 0, "ingest", conformed(large["ingest"]) if version == versions - 1 else
                           {"problems": rows_of("problems", 10, f"v{version}-p")}, key="bench")
    for round in range(rounds):
        for stage in STAGES:
            for version in range(versions):
                if round == last and version == versions - 1 and stage in large:
                    tables = conformed(large[stage])
                else:
                    tables = {table: rows_of(table, 10, f"r{round}v{version}-") for table in
                              {"generate": ["rollouts"], "verify": ["verdicts"], "filter": ["problem_stats"],
                               "pairs": ["pairs", "sft_examples"]}[stage]}
                lake.publish_stage(RUN, round, stage, tables)
    now = __import__("datetime").datetime.now(__import__("datetime").timezone.utc)
    for i in range(events):
        lake.append_run_table(RUN, "stage_runs", pa.Table.from_pylist([dict(
            stage_run_id=f"bench-{i}", run=RUN, round=i % rounds, stage=STAGES[i % len(STAGES)], config_hash="bench",
            input_fingerprint="bench", rows_in=0, rows_out=0, rows_quarantined=0, started_at=now, finished_at=now,
            status="completed")], schema=schemas.STAGE_RUNS))
    client = s3.client()
    body = pa.BufferOutputStream()
    chunk = rows_of("rollouts", 8, "chunk")
    with pa.ipc.new_file(body, chunk.schema) as out:  # a chunk as data/chunks.py stores it
        out.write_table(chunk)
    data = body.getvalue().to_pybytes()
    prefix = f"runs/{RUN}/_chunks/round={last + 1}/generate/{'0' * 16}"

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/batch-{i:06d}.arrow", Body=data)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(chunks)))


def quiet_prefect() -> None:
    """A stage called with `.fn` runs no flow run; its Prefect artifacts would start an API: stubbed."""
    import prefect.artifacts

    prefect.artifacts.create_table_artifact = lambda **kw: None
    prefect.artifacts.create_markdown_artifact = lambda **kw: None


class PartReads:
    """How many times each committed part's rows were read (`Lake._part_batches` is where every read of
    a part's rows goes through, checked against its manifest): passes over a stage's inputs."""

    def __init__(self):
        self.counts: Counter = Counter()
        original = Lake._part_batches

        def counted(lake, run, round, stage, folder, part, schema):
            self.counts[(round, stage, part.table)] += 1
            return original(lake, run, round, stage, folder, part, schema)

        Lake._part_batches = counted

    def mark(self) -> Counter:
        return Counter(self.counts)

    def passes(self, mark: Counter, lake: Lake, round: int, stage: str, table: str) -> str:
        parts = sum(1 for p in lake.manifest(RUN, round, stage).parts if p.table == table)
        return f"{table} {(self.counts[(round, stage, table)] - mark[(round, stage, table)]) / parts:.0f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--versions", type=int, default=4, help="commits of every stage folder")
    parser.add_argument("--chunks", type=int, default=20_000, help="chunk parts of a stage in progress")
    parser.add_argument("--events", type=int, default=12, help="stage_runs event files (merged past 16; before, 64)")
    parser.add_argument("--rollouts", type=int, default=200_000, help="rows of the last round's rollouts and verdicts")
    args = parser.parse_args()
    work = home.home() / ".tmp" / "bench-stage-requests"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "moto.log"
    with LocalS3(log_path=log) as s3:
        os.environ.update(s3.environment())
        s3.create_bucket(BUCKET)
        lake = use_lake(f"s3://{BUCKET}/runs")
        started = time.perf_counter()
        build(lake, s3, args.rounds, args.versions, args.chunks, args.events, args.rollouts)
        objects = sum(1 for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                      for _ in page.get("Contents", []))
        print(f"run: {args.rounds} rounds x {len(STAGES)} stages (+ ingest), {args.versions} versions each, "
              f"{args.events} stage_runs events, {args.chunks:,} chunk parts, {args.rollouts:,} rollouts in the last "
              f"round; {objects:,} objects; built in {time.perf_counter() - started:.0f} s", flush=True)
        from evoforge.flows.stage_runner import run_guard

        requests = RequestLog(log)
        results = {}

        def measure(name: str, action) -> list[tuple[str, str]]:
            mark = requests.mark()
            started = time.perf_counter()
            action()
            seconds = time.perf_counter() - started
            seen = requests.since(mark)
            results[name] = seen
            print(f"{name:<42} {cell(seen)}  {seconds:.2f} s", flush=True)
            return seen

        def stage_start() -> None:
            with run_guard(RUN, "bench"):
                pass

        def schema_files() -> None:
            try:
                lake.ensure_run(RUN, check=True)
            except TypeError:  # an evoforge that checked them at every commit and stage start
                lake.ensure_run(RUN)

        print(f"\n{'what':<42} {'requests':>6}")
        measure("stage folders (Lake.stage_dirs)", lambda: lake.stage_dirs(RUN))
        measure("the run's 18 schema files checked", schema_files)
        measure("stage start", stage_start)
        measure("status (Lake.inspect)", lambda: lake.inspect(RUN))

        def commit() -> None:
            from evoforge.data.runlock import run_lock

            with run_lock(lake.run_dir(RUN), "bench"):
                mark = requests.mark()
                lake.publish_stage(RUN, 0, "pairs", {"pairs": rows_of("pairs", 1000, "commit-"),
                                                     "sft_examples": rows_of("sft_examples", 1000, "commit-")})
                results["commit proper"] = requests.since(mark)

        measure("commit, lease taken and released", commit)
        print(f"{'commit (Lake.publish, the lease held)':<42} {cell(results['commit proper'])}")

        quiet_prefect()
        from evoforge.flows.config import RoundConfig
        from evoforge.flows.filter import filter_flow
        from evoforge.flows.pairs import pairs_flow

        last = args.rounds - 1
        reads = PartReads()
        for name, stage_flow in (("filter", filter_flow), ("pairs", pairs_flow)):
            for force in (True, False):
                before = reads.mark()
                measure(f"{name} {'(--force)' if force else 'rerun, inputs unchanged'}",
                        lambda: stage_flow.fn(RUN, last, RoundConfig(), force=force))
                print(f"{'':<42} read each part of: {reads.passes(before, lake, last, 'verify', 'verdicts')}, "
                      f"{reads.passes(before, lake, last, 'generate', 'rollouts')}", flush=True)
        use_lake(None)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
