"""The lake on object storage vs on local disk: the named queries over a large synthetic round, and
(with --demo) a whole demo round.

    .venv/bin/python bench/object_store.py [--rollouts 1000000] [--demo]

Queries: a round of N rollouts (8 per problem) with its verdicts, problem stats and stage events is
written once to a local folder and once to a local S3 server (moto, data/local_s3.py), then every
named query of sql/queries/ runs through `data/catalog.py connect` as `evoforge sql` runs it. Printed:
the time to build the views (listing and checking every committed part, as each `evoforge sql` does)
and each query's time, on disk and on S3, and their ratio. Target: each query under 3 s on S3.

Demo (--demo): `evoforge demo`'s round (the default model, deploy/configs/demo.yaml) once with the lake
on disk and once on the S3 server, in fresh processes; printed: both wall times and the overhead.

The S3 server is moto, in memory, on this machine: the figures measure the client side of the object
store (requests, no rename, listing, fsspec reads through DuckDB) without a network's latency.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from evoforge.data import home

home.configure()

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from evoforge.data import catalog, schemas  # noqa: E402
from evoforge.data.lake import Lake  # noqa: E402
from evoforge.data.local_s3 import LocalS3  # noqa: E402

RUN = "bench"
SAMPLES = 8


def synthetic_round(rollouts: int) -> dict[str, dict[str, pa.Table]]:
    """stage -> table -> rows of one round 0, built column-wise (no Python loop over a million rows)."""
    problems = rollouts // SAMPLES
    pid = pc.binary_join_element_wise(pa.scalar("p"), pc.cast(pa.array(range(problems)), pa.string()), "")
    problem_rows = pa.table({
        "problem_id": pid, "question": pc.binary_join_element_wise("What is ", pid, " plus one?", ""),
        "answer": pc.cast(pa.array(range(problems)), pa.string()), "source": pa.array(["bench"] * problems),
        "source_file": pa.array(["bench.jsonl"] * problems), "source_row": pa.array(range(problems), pa.int64()),
        "origin": pa.array(["seed"] * problems), "parent_problem_id": pa.nulls(problems, pa.string()),
    })
    index = pa.array(range(rollouts), pa.int64())
    of_problem = pc.take(pid, pc.divide(index, SAMPLES))
    rid = pc.binary_join_element_wise(pa.scalar("r"), pc.cast(index, pa.string()), "")
    correct = pc.equal(pc.bit_wise_and(index, 3), 0)  # a quarter correct, spread over every problem
    rollout_rows = pa.table({
        "rollout_id": rid, "problem_id": of_problem, "model_id": pa.array(["bench@0"] * rollouts),
        "seed": index, "sample_index": pc.bit_wise_and(index, SAMPLES - 1),
        "text": pc.binary_join_element_wise("Let me add one step by step. The answer is \\boxed{", rid, "}.", ""),
        "completion_tokens": pc.add(pc.bit_wise_and(index, 127), 20), "finish_reason": pa.array(["stop"] * rollouts),
        "mean_logprob": pa.array([-0.5] * rollouts),
    })
    verdict_rows = pa.table({
        "rollout_id": rid, "problem_id": of_problem, "verdict": pc.if_else(correct, "correct", "wrong"),
        "extracted_answer": rid, "gold": pa.array(["1"] * rollouts), "detail": pa.nulls(rollouts, pa.string()),
        "seconds": pa.array([0.004] * rollouts), "graded_with": rid,
    })
    accuracy = pa.array([0.25] * problems)
    stats = pa.table({
        "problem_id": pid, "n": pa.array([SAMPLES] * problems, pa.int32()), "correct": pa.array([2] * problems, pa.int32()),
        "accuracy": accuracy, "bucket": pa.array(["underperforming"] * problems),
    })
    return {"ingest": {"problems": problem_rows}, "generate": {"rollouts": rollout_rows},
            "verify": {"verdicts": verdict_rows}, "filter": {"problem_stats": stats}}


def write_round(lake: Lake, tables: dict[str, dict[str, pa.Table]]) -> float:
    started = time.perf_counter()
    for stage, outputs in tables.items():
        conformed = {name: schemas.conform(rows, schemas.ROUND_TABLES[name], where=name, missing_as_null=True)
                     for name, rows in outputs.items()}
        lake.publish_stage(RUN, 0, stage, conformed, key="bench" if stage == "ingest" else None)
    return time.perf_counter() - started


def time_queries(lake: Lake) -> tuple[float, dict[str, float]]:
    started = time.perf_counter()
    con = catalog.connect(lake.run_dir(RUN))
    views = time.perf_counter() - started
    times = {}
    for name in catalog.named_queries():
        started = time.perf_counter()
        catalog.query(con, name)
        times[name] = time.perf_counter() - started
    return views, times


def demo_round(env: dict[str, str], run: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "evoforge.app.cli", "demo", "--run", run], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def time_named_queries(root: Path, s3: LocalS3, rollouts: int) -> None:
    print(f"building a round of {rollouts:,} rollouts ({rollouts // SAMPLES:,} problems)", flush=True)
    tables = synthetic_round(rollouts)
    s3.create_bucket("bench")
    lakes = {"disk": Lake(root / "runs"), "s3": Lake("s3://bench/runs")}
    written = {where: write_round(lake, tables) for where, lake in lakes.items()}
    print(f"written: disk {written['disk']:.1f} s, S3 {written['s3']:.1f} s")
    results = {where: time_queries(lake) for where, lake in lakes.items()}
    print(f"\n{'query':<20} {'disk s':>8} {'S3 s':>8} {'S3/disk':>8}")
    print(f"{'(build the views)':<20} {results['disk'][0]:>8.2f} {results['s3'][0]:>8.2f} "
          f"{results['s3'][0] / results['disk'][0]:>8.1f}")
    for name in results["disk"][1]:
        disk, s3_time = results["disk"][1][name], results["s3"][1][name]
        print(f"{name:<20} {disk:>8.2f} {s3_time:>8.2f} {s3_time / max(disk, 1e-3):>8.1f}")
    slowest = max(results["s3"][1].items(), key=lambda item: item[1])
    print(f"\nslowest query on S3: {slowest[0]} {slowest[1]:.2f} s (target < 3 s); "
          f"views {results['s3'][0]:.2f} s before the first")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=int, default=1_000_000, help="0: skip the queries")
    parser.add_argument("--demo", action="store_true", help="also time a demo round on disk and on S3")
    parser.add_argument("--root", default=str(home.home() / ".tmp" / "bench-object-store"))
    args = parser.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    with LocalS3() as s3:
        os.environ.update(s3.environment())
        if args.rollouts:
            time_named_queries(root, s3, args.rollouts)
        if args.demo:
            s3.create_bucket("demo")
            base = {**os.environ, "EVOFORGE_RUNS": str(root / "demo-runs")}
            disk = demo_round(base, "demo-disk")
            on_s3 = demo_round({**base, "EVOFORGE_RUNS": "s3://demo/runs"}, "demo-s3")
            print(f"\ndemo round: disk {disk:.0f} s, S3 {on_s3:.0f} s, overhead {on_s3 - disk:+.0f} s "
                  f"({(on_s3 / disk - 1) * 100:+.1f}%)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
