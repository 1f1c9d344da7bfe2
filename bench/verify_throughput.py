"""Verify stage (grader pool) against a plain sequential math-verify loop on the same pairs.

    .venv/bin/python bench/verify_throughput.py [--workers 2] [--pairs 2400] [--repeat 3]

Pairs: golds of GSM8K test (integers) and MATH-500 (fractions, expressions, intervals, tuples),
8 responses per gold as in a round (correct, equivalent forms, wrong, repeated boxes, no box).
Each measurement runs in a fresh process with math-verify already imported and every cache cold
(sympy's cache made in-process repeats 2x faster), alternating sides; medians are printed. Both
sides must give identical verdicts. A last part feeds adversarial answers (power towers, huge
factorials) to the pool alone and checks no item outlives its deadline (the sequential loop would
hang on them: math-verify's signal timeouts cannot interrupt C code).

Then, on real rollouts (`--runs`, default: the demo run and `verify-bench`, if they exist: the
rollouts their `generate` wrote, with their problems' golds), the verify stage grading each distinct
(gold, boxed answers) once against grading every rollout: the distinct-answer ratio, rollouts/s of
both, and whether every verdict is identical.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fresh_process import in_fresh_process  # noqa: E402
from evoforge.data import home  # noqa: E402

home.configure()

from evoforge.tasks.ingest import SourceConfig, extract_answer  # noqa: E402


def golds() -> list[str]:
    out = []
    for path, preset in (("data/sets/gsm8k/test.jsonl", "gsm8k"), ("data/sets/math500/test.jsonl", "math")):
        config = SourceConfig(path=path, preset=preset)
        for line in (ROOT / path).open():
            out.append(extract_answer(json.loads(line), config))
    return out


def make_pairs(count: int, seed: int = 0, samples: int = 8) -> list[tuple[str, str]]:
    """Shaped like a round: `samples` responses per problem, grouped by problem as the stage grades
    them: correct boxes, an equivalent form, wrong answers, repeated boxes and missing boxes."""
    rng = random.Random(seed)
    answers = golds()
    rng.shuffle(answers)
    pairs: list[tuple[str, str]] = []
    for gold in answers:
        for _ in range(samples):
            kind = rng.random()
            other = rng.choice(answers)
            if kind < 0.35:
                response = f"Working step by step, the answer is \\boxed{{{gold}}}."
            elif kind < 0.45 and gold.lstrip("-").isdigit():
                response = f"So \\boxed{{{gold}.0}}"
            elif kind < 0.55:
                response = f"First \\boxed{{{other}}}, then correcting: \\boxed{{{gold}}}"
            elif kind < 0.85:
                response = f"I get \\boxed{{{other}}}"
            else:
                response = f"The answer is {gold}."
            pairs.append((gold, response))
            if len(pairs) == count:
                return pairs
    return pairs


def measure(side: str, pairs_count: int, workers: int, deadline: float) -> dict:
    """One side, in this (fresh) process."""
    from evoforge.tasks.grader_pool import GraderPool
    from evoforge.tasks.grading import grade

    pairs = make_pairs(pairs_count)
    if side == "sequential":
        started = time.perf_counter()
        verdicts = [grade(gold, response)[0] for gold, response in pairs]
        return {"total": time.perf_counter() - started, "startup": 0.0, "verdicts": verdicts}
    started = time.perf_counter()
    with GraderPool(workers, deadline) as pool:
        ready = time.perf_counter()
        results = pool.run([("grade", g, r) for g, r in pairs])
        finished = time.perf_counter()
    return {"total": finished - started, "startup": ready - started, "verdicts": [r[0] for r in results],
            "slowest": max(r[3] for r in results)}


def real_rollouts(run: str) -> tuple:
    from evoforge.data.lake import lake

    store = lake()
    rollouts = store.read(run, "rollouts", 0, "generate").select(["rollout_id", "problem_id", "text"])
    problems = store.read(run, "problems").select(["problem_id", "answer"])
    return rollouts, problems


def measure_real(side: str, run: str, workers: int, deadline: float) -> dict:
    """'each': every rollout graded (grade_pairs); 'distinct': the verify stage, each distinct answer once."""
    from evoforge.tasks.verify import VerifyConfig, grade_pairs, verify

    rollouts, problems = real_rollouts(run)
    gold_of = dict(zip(problems["problem_id"].to_pylist(), problems["answer"].to_pylist()))
    config = VerifyConfig(workers=workers, deadline_seconds=deadline)
    ordered = sorted(rollouts.to_pylist(), key=lambda r: (r["problem_id"], r["rollout_id"]))
    started = time.perf_counter()
    if side == "each":
        results = grade_pairs([(gold_of[r["problem_id"]], r["text"]) for r in ordered], config)
        verdicts = {r["rollout_id"]: list(v[:3]) for r, v in zip(ordered, results)}
        graded = len(ordered)
    else:
        table = verify.fn(rollouts, problems, config)
        verdicts = {r["rollout_id"]: [r["verdict"], r["extracted_answer"], r["detail"]] for r in table.to_pylist()}
        graded = len(set(table["graded_with"].to_pylist()))
    return {"total": time.perf_counter() - started, "graded": graded, "verdicts": verdicts}


def compare_on_real_rollouts(args) -> bool:
    """True when both sides gave identical verdicts on every run measured."""
    from evoforge.data.lake import lake

    identical = True
    for run in [r for r in args.runs.split(",") if r]:
        if not (lake().run_dir(run) / "round=0" / "generate").is_dir():
            print(f"real rollouts: run {run!r} has no round 0 generate output; skipped")
            continue
        sides = {"each": [], "distinct": []}
        for _ in range(args.repeat):
            for side in sides:
                sides[side].append(in_fresh_process(__file__, f"{side}:{run}", args))
        each = statistics.median(r["total"] for r in sides["each"])
        distinct = statistics.median(r["total"] for r in sides["distinct"])
        rollouts = len(sides["each"][0]["verdicts"])
        graded = sides["distinct"][0]["graded"]
        same = sides["each"][0]["verdicts"] == sides["distinct"][0]["verdicts"]
        identical &= same
        print(f"real rollouts of run {run}: {rollouts} rollouts, {graded} distinct (gold, boxed answers): "
              f"ratio {graded / rollouts:.3f}")
        print(f"  every rollout graded:        {each:7.2f} s  {rollouts / each:7.1f} rollouts/s")
        print(f"  each distinct answer once:   {distinct:7.2f} s  {rollouts / distinct:7.1f} rollouts/s  "
              f"({graded / distinct:.1f} gradings/s); {each / distinct:.2f}x; identical verdicts: {same}")
    return identical


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=2400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runs", default="demo,verify-bench", help="runs whose real rollouts to grade (comma-separated)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side in ("sequential", "pool"):
        print(json.dumps(measure(args.side, args.pairs, args.workers, args.deadline)))
        return
    if args.side:
        side, run = args.side.split(":", 1)
        print(json.dumps(measure_real(side, run, args.workers, args.deadline)))
        return

    pairs = make_pairs(args.pairs)
    print(f"{len(pairs)} pairs ({len(set(g for g, _ in pairs))} distinct golds), workers={args.workers}, "
          f"median of {args.repeat} fresh-process runs per side")
    runs = {"sequential": [], "pool": []}
    for _ in range(args.repeat):
        for side in runs:
            runs[side].append(in_fresh_process(__file__, side, args))
    seq_s = statistics.median(r["total"] for r in runs["sequential"])
    cold_s = statistics.median(r["total"] for r in runs["pool"])
    warm_s = statistics.median(r["total"] - r["startup"] for r in runs["pool"])
    print(f"sequential math-verify loop: {seq_s:7.2f} s  {len(pairs) / seq_s:7.1f} pairs/s")
    print(f"verify stage (grader pool):  {cold_s:7.2f} s  {len(pairs) / cold_s:7.1f} pairs/s  "
          f"(including {cold_s - warm_s:.2f} s to start {args.workers} workers)")
    print(f"  once started:              {warm_s:7.2f} s  {len(pairs) / warm_s:7.1f} pairs/s")
    sequential, pooled = runs["sequential"][0]["verdicts"], runs["pool"][0]["verdicts"]
    mismatches = [(p, a, b) for p, a, b in zip(pairs, sequential, pooled) if a != b]
    counts = {v: pooled.count(v) for v in sorted(set(pooled))}
    print(f"verdicts: {counts}; identical: {not mismatches} ({len(mismatches)} differ)")
    for pair, a, b in mismatches[:5]:
        print(f"  differs: {pair!r}: sequential {a}, pool {b}")
    slowest = max(r["slowest"] for r in runs["pool"])
    print(f"ratio: {seq_s / cold_s:.2f}x including start-up, {seq_s / warm_s:.2f}x once started "
          f"(target >= 1.8x on 2 cores); slowest item {slowest:.3f} s")

    from evoforge.tasks.verify import VerifyConfig, grade_pairs

    adversarial = [("5", "\\boxed{123456789^{123456789}}"), ("5", "\\boxed{2^{10^{10}}}"),
                   ("5", "\\boxed{(10^{7})!}"), ("5", "\\boxed{9^{9^{9^{9}}}}")] + pairs[:200]
    config = VerifyConfig(workers=args.workers, deadline_seconds=3.0)
    started = time.perf_counter()
    results = grade_pairs(adversarial, config)
    took = time.perf_counter() - started
    late = [r for r in results if r[3] > config.deadline_seconds + 1.0]
    print(f"adversarial: {len(adversarial)} pairs in {took:.1f} s with a {config.deadline_seconds:g} s deadline; "
          f"timeouts {sum(r[0] == 'timeout' for r in results)}, items past the deadline (+1 s slack): {len(late)}")
    identical_on_real = compare_on_real_rollouts(args)
    if mismatches or late or not identical_on_real:
        sys.exit(1)


if __name__ == "__main__":
    main()
