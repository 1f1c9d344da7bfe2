"""Peak memory of the streaming stages against the size of a round: flat, or it is not streaming.

    .venv/bin/python bench/memory.py [--sizes 10000,100000,1000000] [--grader trivial] [--root PATH]

For each size a synthetic lake is built directly (no model): an ingest `problems` table (questions of
~200 characters, integer golds) and the `generate` stage's `rollouts` (8 per problem by default,
~300 characters of steps ending in a \\boxed{} answer: the gold about half the time, else one of a few
wrong answers or no box, so dedup shares gradings without collapsing them). Then each of these runs
in a fresh process, which reports its own peak resident memory (VmHWM):

- verify: the verify stage (`verify_flow.fn`: lock, input fingerprints, the sorted stream, chunks,
  grading, bounded parts, stage_runs, catalog refresh, the summary; Prefect's API calls stubbed)
- filter: the filter stage, the same way
- query: `evoforge sql`-style: `catalog.connect` over the run and the named query `verdict_counts`
- baseline: the same imports, nothing run: the floor every figure sits on

The grader is math-verify in its pool of processes (forkserver children, sampled apart: their memory
is per process and does not grow with the round). These golds are integers, which math-verify grades
fast (thousands of rollouts/s here with dedup: 1M in 3-4 minutes on 2 cores); MATH-style answers
grade ~35 pairs/s per core: `--grader trivial` grades in-process by comparing the last box with the
gold, measuring everything verify does around its grader at any size in seconds. The lakes go under
EVOFORGE_HOME/.tmp/bench-memory (or --root), removed at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evoforge.data import home  # noqa: E402

home.configure()

WORDS = ("we", "add", "the", "numbers", "then", "multiply", "by", "so", "each", "group", "has", "and", "subtract",
         "what", "remains", "gives", "total", "of", "apples", "boxes", "per", "day", "left", "after", "selling")


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    if pid != "self":
        return 0.0  # a process that has ended and not been waited for (a zombie) has no memory lines
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DescendantPeaks:
    """The peak RSS of every process below this one (the grader pool's forkserver and workers),
    sampled twice a second: they are not waited for, so RUSAGE_CHILDREN does not see them."""

    def __init__(self):
        import threading

        self.peaks: dict[int, float] = {}
        self.cpu: dict[int, float] = {}  # the CPU seconds each has used, as last seen
        self.io: dict[int, tuple[int, int]] = {}  # the bytes each has read and written (rchar, wchar), as last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _descendants(self, pid: int) -> list[int]:
        found = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                found += [child, *self._descendants(child)]
        return found

    def _run(self) -> None:
        import os

        own = Path("/proc/self/cmdline").read_bytes()
        while not self._stop.wait(0.5):
            for pid in self._descendants(os.getpid()):
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes() == own:
                        continue  # forked, not yet exec'd (a process being spawned): it still reads as this one
                    self.peaks[pid] = max(self.peaks.get(pid, 0.0), peak_rss_mb(pid))
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    self.cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
                    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
                    self.io[pid] = (int(io["rchar"]), int(io["wchar"]))
                except (OSError, ValueError, IndexError):
                    pass

    def stop(self) -> tuple[int, float]:
        self._stop.set()
        self._thread.join()
        return len(self.peaks), max(self.peaks.values(), default=0.0)


# -- the synthetic lake ---------------------------------------------------------------------------
def build(root: Path, run: str, rollouts: int, per_problem: int, seed: int = 0, radical_golds: float = 0.0) -> dict:
    """The pool and the generate stage's rollouts of a round. Golds are whole numbers (GSM8K's, AIME's, DAPO-Math's),
    but a `radical_golds` share of the problems, whose golds are radicals `a\\sqrt{c}` (MATH has such answers): an
    exact number is graded without math-verify (tasks/grading/answers.py `exact_gold_verdict`), a radical with it,
    and a correct answer to one is sometimes written another way (`\\sqrt{a^2 c}`)."""
    import pyarrow as pa

    from evoforge.data import schemas
    from evoforge.data.ids import problem_id, rollout_id
    from evoforge.data.lake import Lake

    rng = random.Random(seed)
    lake = Lake(root)
    n_problems = rollouts // per_problem
    problems, golds = [], []
    for i in range(n_problems):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        question = (f"Problem {i}: a shop packs {a} apples into each of {c} boxes in the morning and sells {b} apples "
                    f"before noon. In the afternoon it receives {a + b} more apples. How many apples does the shop "
                    f"have at the end of the day?")
        # no draw without radicals: the default round is the one the earlier figures were measured on
        radical = radical_golds > 0 and rng.random() < radical_golds
        pid = problem_id(question)
        gold = (a, rng.choice((2, 3, 5, 6, 7))) if radical else a * c + a
        answer = f"{gold[0]}\\sqrt{{{gold[1]}}}" if radical else str(gold)
        problems.append(dict(problem_id=pid, question=question, answer=answer, source="bench",
                             source_file="bench.jsonl", source_row=i, origin="seed", parent_problem_id=None,
                             task="math", expert_answer=None))
        golds.append((pid, gold))
    lake.publish_stage(run, 0, "ingest", {"problems": pa.Table.from_pylist(problems, schema=schemas.PROBLEMS),
                                          "quarantine": schemas.QUARANTINE.empty_table()}, key="bench")

    def text_of(gold: int | tuple[int, int]) -> str:
        steps = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 52)))
        roll = rng.random()
        if roll < 0.05:
            return f"{steps}. I am not sure of the answer."
        if isinstance(gold, tuple):
            factor, root = gold
            answer = (f"\\sqrt{{{factor * factor * root}}}" if roll < 0.15 else f"{factor}\\sqrt{{{root}}}" if roll < 0.55 else
                      f"{factor + rng.choice((-2, -1, 1, 10))}\\sqrt{{{root}}}")
        else:
            answer = gold if roll < 0.55 else gold + rng.choice((-2, -1, 1, 10))
        return f"Let me think step by step. {steps}. The answer is \\boxed{{{answer}}}"

    def produced():
        rows = []
        for pid, gold in golds:
            for k in range(per_problem):
                rows.append(dict(rollout_id=rollout_id(pid, "bench@0", 0, k), problem_id=pid, model_id="bench@0",
                                 seed=0, sample_index=k, text=text_of(gold), completion_tokens=rng.randint(40, 160),
                                 finish_reason="stop", mean_logprob=-rng.random()))
            if len(rows) >= 8192:
                yield pa.Table.from_pylist(rows, schema=schemas.ROLLOUTS)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=schemas.ROLLOUTS)

    lake.publish_stage(run, 0, "generate", {"rollouts": produced()})
    for stage, rows in (("ingest", n_problems), ("generate", n_problems * per_problem)):
        now = __import__("datetime").datetime.now(__import__("datetime").timezone.utc)
        lake.append_run_table(run, "stage_runs", pa.Table.from_pylist([dict(
            stage_run_id=f"bench-{stage}", run=run, round=0, stage=stage, config_hash="bench",
            model_id="bench@0" if stage == "generate" else None,  # the model of its rollouts, as the generate stage records it
            input_fingerprint="bench", output_fingerprint=lake.output_fingerprint(run, 0, stage), rows_in=rows,
            rows_out=rows, rows_quarantined=0, started_at=now, finished_at=now, status="completed")],
            schema=schemas.STAGE_RUNS))
    parts = lake.manifest(run, 0, "generate").parts
    return {"problems": n_problems, "rollouts": sum(p.rows for p in parts), "parts": len(parts),
            "bytes": sum(p.bytes for p in parts)}


# -- what each fresh process measures -------------------------------------------------------------
class TrivialPool:
    """Grades in-process: the last box equal to the gold (as text) is correct. What verify does
    around its grader is unchanged; the grader's own cost (math-verify) is not what is measured."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run(self, items, on_progress=None):
        from evoforge.tasks.grading.answers import last_boxed

        out = []
        for _, gold, text in items:
            boxed = last_boxed(text or "")
            out.append(("no_answer" if boxed is None else "correct" if boxed == gold else "wrong", boxed, None, 0.0))
        if on_progress:
            on_progress(len(items))
        return out


def quiet_prefect() -> None:
    """A stage called with `.fn` runs no flow run; its Prefect artifacts would start an API: stubbed
    (the summaries they show are still computed)."""
    import prefect.artifacts

    prefect.artifacts.create_table_artifact = lambda **kw: None
    prefect.artifacts.create_markdown_artifact = lambda **kw: None


def measure(side: str, root: Path, run: str, grader: str) -> dict:
    from evoforge.data.lake import use_lake
    from evoforge.flows.config import RoundConfig

    use_lake(root)
    quiet_prefect()
    import duckdb  # noqa: F401  (the baseline has every library the sides import)

    from evoforge.data import catalog
    from evoforge.flows.filter import filter_flow
    from evoforge.flows.verify import verify_flow
    from evoforge.tasks import verify as verify_task

    if side == "baseline":
        return {"peak_mb": peak_rss_mb(), "seconds": 0.0}
    started = time.perf_counter()
    below = DescendantPeaks()
    if side == "verify":
        if grader == "trivial":
            verify_task.VerifyConfig.pool = lambda self: TrivialPool()
        result = verify_flow.fn(run, 0, RoundConfig(), force=True)
        rows = result.rows_out
    elif side == "filter":
        rows = filter_flow.fn(run, 0, RoundConfig(), force=True).rows_in
    elif side == "query":
        con = catalog.connect(root / run)
        rows = sum(r["rollouts"] for r in catalog.query(con, "verdict_counts"))
    else:
        raise SystemExit(f"unknown side {side}")
    seconds = time.perf_counter() - started
    processes, largest = below.stop()
    return {"peak_mb": peak_rss_mb(), "seconds": seconds, "rows": rows, "processes_below": processes,
            "largest_below_mb": largest}


def in_fresh_process(*options: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *options], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench/memory.py {' '.join(options)} exited with {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="rollouts per round, comma-separated")
    parser.add_argument("--per-problem", type=int, default=8)
    parser.add_argument("--grader", choices=("math-verify", "trivial"), default="math-verify")
    parser.add_argument("--root", help="where the lakes go (default EVOFORGE_HOME/.tmp/bench-memory)")
    parser.add_argument("--keep", action="store_true", help="keep the lakes")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--rollouts", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.root).resolve() if args.root else home.home() / ".tmp" / "bench-memory"
    if args.side == "build":
        print(json.dumps(build(root, args.run, args.rollouts, args.per_problem)))
        return
    if args.side:
        print(json.dumps(measure(args.side, root, args.run, args.grader)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    baseline = in_fresh_process("--side", "baseline", "--root", str(root), "--run", "none")
    print(f"lakes under {root}; grader: {args.grader}; {args.per_problem} rollouts per problem; "
          f"peak RSS of each fresh process (VmHWM); imports alone: {baseline['peak_mb']:.0f} MB", flush=True)
    results = {}
    for size in sizes:
        run = f"mem-{size}"
        started = time.perf_counter()
        built = in_fresh_process("--side", "build", "--root", str(root), "--run", run, "--rollouts", str(size),
                                 "--per-problem", str(args.per_problem))
        built["build_s"] = time.perf_counter() - started
        results[size] = {"built": built}
        for side in ("verify", "filter", "query"):
            results[size][side] = in_fresh_process("--side", side, "--root", str(root), "--run", run, "--grader", args.grader)
        r = results[size]
        print(f"  {size:>9,} rollouts ({built['problems']:,} problems, {built['parts']} part(s), "
              f"{built['bytes'] / 2**20:.0f} MB; built in {built['build_s']:.0f} s): "
              + ", ".join(f"{side} {r[side]['peak_mb']:.0f} MB in {r[side]['seconds']:.1f} s"
                          for side in ("verify", "filter", "query")), flush=True)

    print()
    print(f"{'rollouts':>10} | {'verify MB':>9} | {'filter MB':>9} | {'query MB':>8} | {'verify s':>8} | {'filter s':>8} | "
          f"{'query s':>7} | grader processes")
    print("-" * 100)
    for size in sizes:
        r = results[size]
        below = (f"{r['verify']['processes_below']}, largest {r['verify']['largest_below_mb']:.0f} MB"
                 if r["verify"]["processes_below"] else "none (in-process)")
        print(f"{size:>10,} | {r['verify']['peak_mb']:>9.0f} | {r['filter']['peak_mb']:>9.0f} | {r['query']['peak_mb']:>8.0f} | "
              f"{r['verify']['seconds']:>8.1f} | {r['filter']['seconds']:>8.1f} | {r['query']['seconds']:>7.1f} | {below}")
    if len(sizes) > 1:
        small, large = results[sizes[0]], results[sizes[-1]]
        ratios = {side: large[side]["peak_mb"] / small[side]["peak_mb"] for side in ("verify", "filter", "query")}
        label = f"{sizes[-1] // sizes[0]:,}x rows"
        print(f"{label:>10} | {ratios['verify']:>8.2f}x | {ratios['filter']:>8.2f}x | {ratios['query']:>7.2f}x | "
              f"peak at {sizes[-1]:,} / peak at {sizes[0]:,} (target: within 2x)")
    print(f"(imports alone: {baseline['peak_mb']:.0f} MB; verify graded by {args.grader}"
          + (": in-process, so math-verify's own cost is left out, not verify's work" if args.grader == "trivial"
             else " in its pool of processes, whose memory is per process (the last column)") + ")")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
