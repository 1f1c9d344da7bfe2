"""What the factory costs besides generating and training, per million rollouts, against the generation
the same round would take: the issue-30 question "is evoforge's own work under 1% of generation, in
bounded memory, at 10M rollouts?".

    .venv/bin/python bench/factory_scale.py [--sizes 1000000,10000000] [--lake disk|s3] [--gpus 64]
                                            [--tokens-per-second 20000] [--grader math-verify|trivial]
                                            [--radical-golds 0.0] [--range-workers N]

For each size a synthetic round is built without a model (bench/memory.py `build`: the pool and the
generate stage's rollouts written as the stage writes them, 8 per problem, ~300-character texts whose
final answers agree as a small model's do: the gold about half the time, else one of a few wrong
answers or none; golds whole numbers, decided without math-verify, or with `--radical-golds` that share
of them radicals, which math-verify grades). Then each step runs in a fresh process that reports its own figures:

- verify, filter, pairs: the stage flows (`<stage>_flow.fn`: lock, fingerprints, chunks, bounded parts,
  stage_runs, catalog; Prefect's API calls stubbed), spread over `--range-workers` processes
  (`cluster.range_workers`; by default one per core from a million rows: data/spread.py);
- export: `evoforge export` of rollouts, verdicts and the sft rows, Parquet layout (flows/export.py);
- queries: every named query of sql/queries/ over the run (`evoforge sql`).

Per step: seconds (and seconds per million rollouts, with the modules a round's process imports once
already imported), CPU seconds (the process's, its ended children's, its live ones' as last sampled:
a grader pool's; and the process's own apart: the work a spread stage does not spread), the process's peak RSS (VmHWM) and the largest of its children's (a spread stage's
workers, graders), bytes read and written (/proc/<pid>/io: rchar / wchar, what the processes asked the
kernel for, page cache included; the children's as last sampled, twice a second), and with `--lake s3`
the HTTP requests the local S3 server (moto) answered. The generation the round would take: the
rollouts' completion tokens at `--tokens-per-second` per GPU on `--gpus` GPUs (`--tokens-per-rollout`
each, default 300: issue 30's 80M rollouts in 330 H100-hours); the share is the steps' seconds on this
machine over that. Targets (issue 30): each step's peak RSS within 2x from the smallest to the largest
size, and the sum under 1% of generation on 64 GPUs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evoforge.data import home  # noqa: E402

home.configure()

from bench.memory import DescendantPeaks, TrivialPool, build, peak_rss_mb, quiet_prefect  # noqa: E402

STEPS = ("verify", "filter", "pairs", "export", "queries")
RUN = "factory"


def use_trivial_grader() -> None:
    """The stand-in grader for `--grader trivial`, in this process and in the workers of a spread stage: they are
    spawned, and a spawned process imports this module anew, which calls this again (FACTORY_SCALE_GRADER)."""
    from evoforge.tasks import verify as verify_task

    os.environ["FACTORY_SCALE_GRADER"] = "trivial"
    verify_task.VerifyConfig.pool = lambda self: TrivialPool()


if os.environ.get("FACTORY_SCALE_GRADER") == "trivial":
    use_trivial_grader()


def io_counters() -> dict[str, int]:
    counters = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, value = line.split(":")
        counters[key] = int(value)
    return counters


def cpu_seconds() -> tuple[float, float]:
    """User and system CPU of this process, and of its children that have ended (a spread stage's workers)."""
    times = os.times()
    return times.user + times.system, times.children_user + times.children_system


def run_step(step: str, lake_root: str, grader: str, out: Path, range_workers: int = 0) -> dict:
    """One step in this (fresh) process: its seconds, memory and bytes."""
    from evoforge.data.lake import use_lake
    from evoforge.flows.config import ClusterConfig, RoundConfig

    use_lake(lake_root)
    quiet_prefect()
    from evoforge.data import catalog
    from evoforge.data.lake import lake

    # imported before the clock starts: a round's process imports them once for all its stages
    from evoforge.flows.export import export_run
    from evoforge.flows.filter import filter_flow
    from evoforge.flows.pairs import pairs_flow
    from evoforge.flows.verify import verify_flow

    config = RoundConfig(cluster=ClusterConfig(range_workers=range_workers))
    if step == "pairs":
        lake().publish_stage(RUN, 0, "synthesize", {"problems": lake().read_schema("problems").empty_table()
                                                    .drop_columns(["round", "stage"])})  # no variants this round
    before, cpu_before = io_counters(), cpu_seconds()
    below = DescendantPeaks()
    started = time.perf_counter()
    if step == "verify":
        if grader == "trivial":
            use_trivial_grader()
        rows = verify_flow.fn(RUN, 0, config, force=True).rows_out
    elif step == "filter":
        rows = filter_flow.fn(RUN, 0, config, force=True).rows_in
    elif step == "pairs":
        rows = pairs_flow.fn(RUN, 0, config, force=True).rows_in
    elif step == "export":
        shutil.rmtree(out, ignore_errors=True)
        rows = sum(export_run(RUN, ["rollouts", "verdicts", "sft"], str(out), format="parquet", config=config).rows.values())
    elif step == "queries":
        con = catalog.connect(lake().run_dir(RUN), read_only=True)
        rows = 0
        for name, path in catalog.named_queries().items():
            try:
                rows += len(con.execute(path.read_text()).fetchall())
            except Exception as err:  # a query needing a table this round has no rows of still answers (empty)
                raise RuntimeError(f"sql/queries/{name}.sql: {err}") from err
    else:
        raise SystemExit(f"unknown step {step}")
    seconds = time.perf_counter() - started
    processes, largest = below.stop()
    after = io_counters()
    own, ended = (after - before for after, before in zip(cpu_seconds(), cpu_before))
    # the children's: exact for those that ended; for those still alive (the grader pool's), as last sampled
    children = max(ended, sum(below.cpu.values()))
    # the children's bytes as last sampled: a spread stage's workers read and write most of it
    children_read, children_written = (sum(io[i] for io in below.io.values()) for i in (0, 1))
    return {"seconds": seconds, "cpu_s": own + children, "own_cpu_s": own, "rows": rows, "peak_mb": peak_rss_mb(),
            "children": processes, "largest_child_mb": largest,
            "read_bytes": after["rchar"] - before["rchar"] + children_read,
            "written_bytes": after["wchar"] - before["wchar"] + children_written}


def fresh(*options: str, env: dict | None = None) -> dict:
    done = subprocess.run([sys.executable, __file__, *options], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"bench/factory_scale.py {' '.join(options)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def completion_tokens(lake_root: str) -> int:
    from evoforge.data import catalog
    from evoforge.data.lake import Lake

    con = catalog.connect(Lake(lake_root).run_dir(RUN))
    return int(con.execute("SELECT sum(completion_tokens) FROM rollouts").fetchone()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="rollouts per round, comma-separated")
    parser.add_argument("--lake", choices=("disk", "s3"), default="disk")
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--tokens-per-second", type=float, default=20_000, help="generation per GPU")
    parser.add_argument("--tokens-per-rollout", type=float, default=300,
                        help="completion tokens per rollout of the round generation is priced for (issue 30: 80M rollouts "
                             "in 330 H100-hours at 20k tok/s is ~300); 0: the synthetic rollouts' own (~100)")
    parser.add_argument("--grader", choices=("math-verify", "trivial"), default="math-verify")
    parser.add_argument("--range-workers", type=int, default=0,
                        help="processes verify, filter and pairs spread their ranges over (cluster.range_workers; "
                             "0, the default: one per core from a million rows)")
    parser.add_argument("--radical-golds", type=float, default=0.0,
                        help="share of problems whose gold is a radical (a\\sqrt{c}), graded by math-verify; the rest are "
                             "whole numbers (GSM8K-, AIME-, DAPO-Math-like), decided without it")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--lake-root", help=argparse.SUPPRESS)
    parser.add_argument("--rollouts", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    scratch = home.home() / ".tmp" / "bench-factory"
    if args.step == "build":
        print(json.dumps(build(args.lake_root, RUN, args.rollouts, 8, radical_golds=args.radical_golds)))
        return
    if args.step:
        print(json.dumps(run_step(args.step, args.lake_root, args.grader, scratch / "export", args.range_workers)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    s3 = requests = None
    if args.lake == "s3":
        from bench.s3_requests import RequestLog
        from evoforge.data.local_s3 import LocalS3

        s3 = LocalS3().start()
        os.environ.update(s3.environment())
        requests = RequestLog(s3.log_path)
    results = {}
    try:
        for size in sizes:
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            lake_root = (f"s3://{s3.create_bucket(f'factory-{size}-{time.time_ns()}')}/runs" if s3
                         else str(scratch / "runs"))
            started = time.perf_counter()
            built = fresh("--step", "build", "--lake-root", lake_root, "--rollouts", str(size),
                          "--radical-golds", str(args.radical_golds))
            built["seconds"] = time.perf_counter() - started
            tokens = int(args.tokens_per_rollout * built["rollouts"]) if args.tokens_per_rollout else completion_tokens(lake_root)
            generation_s = tokens / (args.tokens_per_second * args.gpus)
            steps = {}
            for step in STEPS:
                mark = requests.mark() if requests else 0
                steps[step] = fresh("--step", step, "--lake-root", lake_root, "--grader", args.grader,
                                    "--range-workers", str(args.range_workers))
                steps[step]["requests"] = sum(requests.since(mark).values()) if requests else None
                print(f"  {size:>11,} rollouts  {step:<8} {steps[step]['seconds']:8.1f} s  "
                      f"cpu {steps[step]['cpu_s']:8.1f} s (own {steps[step]['own_cpu_s']:6.1f})  "
                      f"peak {steps[step]['peak_mb']:6.0f} MB  read {steps[step]['read_bytes'] / 2**30:6.2f} GiB  "
                      f"written {steps[step]['written_bytes'] / 2**30:6.2f} GiB"
                      + (f"  {steps[step]['requests']} requests" if requests else ""), flush=True)
            results[size] = {"built": built, "tokens": tokens, "generation_s": generation_s, "steps": steps}
            if not args.keep:
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if s3:
            s3.stop()
    report(results, sizes, args)


def report(results: dict, sizes: list[int], args) -> None:
    print()
    print(f"lake: {args.lake}; grader: {args.grader}; radical golds: {args.radical_golds:.0%}; generation at {args.tokens_per_second:,.0f} tok/s per GPU "
          f"on {args.gpus} GPUs; this machine: {os.cpu_count()} cores; verify, filter and pairs on "
          f"{args.range_workers or 'one process per core (from a million rows)'}"
          f"{' process(es)' if args.range_workers else ''}")
    print("| rollouts | step | s | s per 1M | CPU s | of which the step's process | peak RSS MB | largest child MB | "
          "read GiB | written GiB | requests |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        r = results[size]
        for step in STEPS:
            s = r["steps"][step]
            print(f"| {size:,} | {step} | {s['seconds']:.1f} | {s['seconds'] / size * 1e6:.1f} | {s['cpu_s']:.1f} | {s['own_cpu_s']:.1f} | "
                  f"{s['peak_mb']:.0f} | "
                  f"{s['largest_child_mb']:.0f} | {s['read_bytes'] / 2**30:.2f} | {s['written_bytes'] / 2**30:.2f} | "
                  f"{s['requests'] if s['requests'] is not None else '–'} |")
        total = sum(s["seconds"] for s in r["steps"].values())
        cpu = sum(s["cpu_s"] for s in r["steps"].values())
        print(f"| {size:,} | **sum** | {total:.1f} | {total / size * 1e6:.1f} | {cpu:.1f} | | | | | | |")
    print()
    for size in sizes:
        r = results[size]
        total = sum(s["seconds"] for s in r["steps"].values())
        print(f"{size:,} rollouts: {r['tokens']:,} completion tokens -> generation {r['generation_s']:.0f} s on {args.gpus} "
              f"GPUs; evoforge's steps {total:.0f} s here = {100 * total / r['generation_s']:.2f}% of it "
              f"(target < 1%); without verify {100 * (total - r['steps']['verify']['seconds']) / r['generation_s']:.2f}%")
    for size in sizes:
        # Projected, not measured: the steps' own processes share their CPU with no worker (counted whole for the
        # named queries, though DuckDB runs them on every core: a floor that errs high); the rest spreads over
        # cores, perfectly at best, each as fast as one of this machine's
        steps, budget = results[size]["steps"].values(), results[size]["generation_s"] / 100
        own = sum(s["own_cpu_s"] for s in steps)
        spread = sum(s["cpu_s"] - s["own_cpu_s"] for s in steps)
        cores = f"on at least {math.ceil(spread / (budget - own))} such cores" if budget > own else "on no number of cores"
        print(f"{size:,} rollouts, projected: the steps' own processes take {own:.1f} CPU-s no worker shares, the other "
              f"{spread:.1f} CPU-s spread over cores would fit the 1% budget ({budget:.1f} s) {cores}")
    if len(sizes) > 1:
        small, large = results[sizes[0]]["steps"], results[sizes[-1]]["steps"]
        print("peak RSS, largest size / smallest (target: within 2x): "
              + ", ".join(f"{step} {large[step]['peak_mb'] / small[step]['peak_mb']:.2f}x" for step in STEPS))


if __name__ == "__main__":
    main()
