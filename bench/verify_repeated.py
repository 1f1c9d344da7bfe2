"""Verification that amortizes: answers that repeat (G samples that agree), graded by the verify
stage and by GRPO's reward on the process's shared grader pool, against a plain sequential
math-verify loop, side by side in one run.

    .venv/bin/python bench/verify_repeated.py [--distinct 600] [--repeats 8] [--calls 50] [--workers 2] [--repeat 3]
                                              [--before DIR]

Two sets of `--distinct` (gold, answer) pairs, distinct by (gold, boxed answers) (what the stage
grades once), golds of GSM8K test and MATH-500 with the responses of bench/verify_throughput.py
(correct, equivalent forms, wrong, repeated boxes, no box; several per gold), the second set's
golds disjoint from the first's; each pair repeated `--repeats` times, as G samples that agree:
4,800 rollouts per set with the defaults, one problem per gold.

Each side runs in a fresh process (code imported, caches cold), sides alternating, `--repeat`
times; medians are printed. The sequential loop (plain math-verify: exact numbers and differing constants
too, which the stage and the reward decide without it or its simplify) warms math-verify's parsers first
(answers.warm_up, timed apart), then calls `grade` on every rollout of one set, in one of two orders:

    passes    the distinct pairs, then all of them again, `--repeats` times over (pairs x 8): a
              repeat comes 600 pairs after its first, past math-verify's and sympy's small caches
    adjacent  round order, a pair's repeats one after another: those caches make a repeat ~0.3 ms
              against ~2 ms for a new pair, so this loop costs little more than the distinct pairs

    stages        the verify stage's batch path (`verify`, each distinct answer graded once) on set 1
                  as the process's first stage, from the call: the pool's start counted (b); then on
                  set 2 as its second stage, on the same, warm, shared pool (c)
    reward-before GRPO's reward as it was: a pool started for the trainer (counted), then `--calls`
                  calls of 96 rollouts of set 1 in round order (12 pairs x 8), every completion graded (d0)
    reward-cold   today's reward (`VerifierReward` on `VerifyConfig.pool()`, each distinct answer of a
                  call graded once) as the first user of the process's pool: its start counted (d1)
    reward-warm   the same after a verify stage on set 2 ran in the process (untimed): the pool is
                  warm (d2)

With `--before DIR` (a PYTHONPATH entry whose `evoforge` is the code before the shared pool, e.g.
an export of commit 17daafd and a link `DIR/evoforge` to it), the stages side runs once more per
repeat on that code (b-before, c-before: a pool per stage), and d0 runs on it (the old pool).

Every verdict (verdict, extracted answer, detail) of the stage and every reward must equal the
sequential loop's; the bench exits 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fresh_process import in_fresh_process  # noqa: E402
from bench.verify_throughput import golds, respond  # noqa: E402


def distinct_pairs(count: int, seed: int, exclude: frozenset = frozenset(), per_gold: int = 8) -> list[tuple[str, str]]:
    """`count` (gold, response) pairs, no two with the same gold and boxed answers; golds in `exclude`
    are left out."""
    from evoforge.tasks.grading.answers import all_boxes

    rng = random.Random(seed)
    answers = golds()
    candidates = sorted(set(answers) - exclude)
    rng.shuffle(candidates)
    pairs, seen = [], set()
    for gold in candidates:
        for _ in range(per_gold):
            response = respond(rng, gold, answers)
            if (gold, all_boxes(response)) not in seen:
                seen.add((gold, all_boxes(response)))
                pairs.append((gold, response))
                if len(pairs) == count:
                    return pairs
    raise SystemExit(f"only {len(pairs)} distinct pairs can be made; ask for fewer (--distinct)")


def round_set(args, which: int) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]]]:
    """Set `which` (1 or 2): its rollouts in round order, (rollout_id, problem_id, gold, text), each
    pair's `repeats` one after another; and its problems (problem_id, gold)."""
    first = distinct_pairs(args.distinct, seed=0)
    pairs = first if which == 1 else distinct_pairs(args.distinct, seed=1, exclude=frozenset(g for g, _ in first))
    problem_of = {gold: f"s{which}-p{index:04d}" for index, gold in enumerate(dict.fromkeys(g for g, _ in pairs))}
    rollouts = [(f"{problem_of[gold]}-a{index:04d}-{k}", problem_of[gold], gold, response)
                for index, (gold, response) in enumerate(pairs) for k in range(args.repeats)]
    return rollouts, [(p, gold) for gold, p in problem_of.items()]


def tables(args, which: int):
    """Set `which` as the verify stage reads it: rollouts (rollout_id, problem_id, text), problems (problem_id, answer)."""
    import pyarrow as pa

    rollouts, problems = round_set(args, which)
    return (pa.table({"rollout_id": [r[0] for r in rollouts], "problem_id": [r[1] for r in rollouts],
                      "text": [r[3] for r in rollouts]}),
            pa.table({"problem_id": [p for p, _ in problems], "answer": [g for _, g in problems]}))


def reward_calls(args) -> list[list[tuple[str, str]]]:
    """Set 1's rollouts in round order as GRPO's reward sees them: `calls` calls of (answer, completion)."""
    pairs = [(gold, text) for _, _, gold, text in round_set(args, 1)[0]]
    size = -(-len(pairs) // args.calls)
    return [pairs[start:start + size] for start in range(0, len(pairs), size)]


def measure(side: str, args) -> dict:
    """One side, in this (fresh) process."""
    from evoforge.tasks.verify import VerifyConfig, verify

    config = VerifyConfig(workers=args.workers, deadline_seconds=args.deadline)
    if side.startswith("sequential:"):
        from evoforge.tasks.grading import answers
        from evoforge.tasks.grading.answers import grade, warm_up

        # the baseline is a plain math-verify loop: every pair through all of math-verify, exact numbers
        # too (`exact_gold_verdict` decides those without it) and constants that differ (`_constants_that_differ`
        # spares them its simplify): both off here, on in the stages and the reward
        answers._EXACT_NUMBER = re.compile(r"(?!)")
        answers._constants_that_differ = lambda gold_parsed, pred_parsed: False
        # a rename in answers.py would leave these names unused and the loop not plain: check the rules are off
        if answers.exact_gold_verdict("1", ("1",)) is not None:
            raise SystemExit("bench/verify_repeated.py: the plain loop still decides exact numbers without math-verify")

        _, which, order = side.split(":")
        rollouts = round_set(args, int(which))[0]
        if order == "passes":  # rollout k of every pair, for k = 0 .. repeats - 1
            rollouts = [r for k in range(args.repeats) for r in rollouts[k::args.repeats]]
        started = time.perf_counter()
        warm_up()
        warmed = time.perf_counter()
        verdicts = {rollout_id: list(grade(gold, text)) for rollout_id, _, gold, text in rollouts}
        return {"total": time.perf_counter() - warmed, "warm_up": warmed - started, "verdicts": verdicts}
    if side == "stages":
        out = {}
        for name, which in (("b", 1), ("c", 2)):
            rollouts, problems = tables(args, which)
            started = time.perf_counter()
            table = verify(rollouts, problems, config)
            out[name] = time.perf_counter() - started
            out[f"{name}_verdicts"] = {r["rollout_id"]: [r["verdict"], r["extracted_answer"], r["detail"]]
                                       for r in table.to_pylist()}
            out[f"{name}_graded"] = len(set(table["graded_with"].to_pylist()))
        return out
    calls = reward_calls(args)
    if side == "reward-before":
        from evoforge.tasks.grading.pool import GraderPool

        started = time.perf_counter()
        rewards = []
        with GraderPool(config.workers, config.deadline_seconds, config.memory_mb, config.chunk_size) as pool:
            for call in calls:  # the reward as it was: every completion graded
                results = pool.run([("grade", gold, text) for gold, text in call])
                rewards += [1.0 if r[0] == "correct" else 0.0 for r in results]
        return {"d": time.perf_counter() - started, "rewards": rewards}
    from evoforge.tasks.finetune.grpo import VerifierReward

    if side == "reward-warm":
        verify(*tables(args, 2), config)  # the round's verify stage, earlier in this process: it started the pool
    started = time.perf_counter()
    rewards = []
    with config.pool() as pool:  # as GRPO's trainer holds it
        reward = VerifierReward(pool)
        for call in calls:
            rewards += reward(prompts=[None] * len(call), completions=[text for _, text in call],
                              answer=[gold for gold, _ in call])
    return {"d": time.perf_counter() - started, "rewards": rewards}


SEQUENTIAL = ("sequential:1:passes", "sequential:1:adjacent", "sequential:2:passes", "sequential:2:adjacent")
SIDES = (*SEQUENTIAL, "stages", "reward-before", "reward-cold", "reward-warm")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--distinct", type=int, default=600, help="distinct (gold, answer) pairs per set")
    parser.add_argument("--repeats", type=int, default=8, help="rollouts per pair (G samples that agree)")
    parser.add_argument("--calls", type=int, default=50, help="GRPO reward calls the rollouts of set 1 are cut into")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", default="", help="a PYTHONPATH entry holding the code before the shared pool")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(measure(args.side, args)))
        return

    sides = SIDES + (("stages-before",) if args.before else ())
    before_env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.before, os.environ.get("PYTHONPATH", "")])}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.repeat):
        for side in sides:
            on_old_code = bool(args.before) and side in ("stages-before", "reward-before")
            runs[side].append(in_fresh_process(__file__, side.replace("stages-before", "stages"), args,
                                               env=before_env if on_old_code else None))

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    rollouts = args.distinct * args.repeats
    truth = {which: runs[f"sequential:{which}:adjacent"][0]["verdicts"] for which in (1, 2)}
    rewards = [1.0 if truth[1][rollout_id][0] == "correct" else 0.0 for rollout_id, *_ in round_set(args, 1)[0]]
    identical = {side: all(r["verdicts"] == truth[int(side.split(":")[1])] for r in runs[side]) for side in SEQUENTIAL}
    for side in [s for s in sides if s.startswith("stages")]:
        identical[side] = all(r["b_verdicts"] == truth[1] and r["c_verdicts"] == truth[2] for r in runs[side])
    for side in ("reward-before", "reward-cold", "reward-warm"):
        identical[side] = all(r["rewards"] == rewards for r in runs[side])

    seq = {side: median(side, "total") for side in SEQUENTIAL}
    set_up = statistics.median(r["warm_up"] for side in SEQUENTIAL for r in runs[side])
    print(f"{args.distinct} distinct (gold, answer) pairs x {args.repeats} repeats = {rollouts} rollouts per set "
          f"(2 sets, golds disjoint), workers={args.workers}, median of {args.repeat} fresh-process runs per side; "
          f"ratios: the sequential loop's seconds / these, passes order | adjacent order")

    def line(label: str, seconds: float, which: int | None = None, note: str = "") -> None:
        ratios = (f"{seq[f'sequential:{which}:passes'] / seconds:5.2f}x | {seq[f'sequential:{which}:adjacent'] / seconds:5.2f}x"
                  if which else " " * 16)
        print(f"{label:<66} {seconds:7.2f} s {rollouts / seconds:7.0f} rollouts/s  {ratios}  {note}".rstrip())

    for which in (1, 2):
        line(f"a{which}) sequential math-verify loop, set {which}, passes (pairs x {args.repeats})",
             seq[f"sequential:{which}:passes"])
        line(f"a{which}') the same, adjacent (a pair's repeats in a row)", seq[f"sequential:{which}:adjacent"])
    print(f"    (each loop's process first spent {set_up:.2f} s on math-verify's first-use set-up, not counted)")
    graded = runs["stages"][0]
    line("b)  verify stage, first in a fresh process (pool start), set 1", median("stages", "b"), 1,
         f"{graded['b_graded']} gradings")
    line("c)  verify stage, second in that process (warm pool), set 2", median("stages", "c"), 2,
         f"{graded['c_graded']} gradings")
    if args.before:
        line("b-before) the same on the code before (a pool per stage), set 1", median("stages-before", "b"), 1)
        line("c-before) the same on the code before (a pool per stage), set 2", median("stages-before", "c"), 2)
    calls = reward_calls(args)
    print(f"GRPO-like reward, {len(calls)} calls of {len(calls[0])} completions of set 1 (ratios against a1 | a1'):")
    line("d0) before: a pool per trainer, every completion graded" + (", code before" if args.before else ""),
         median("reward-before", "d"), 1)
    line("d1) now, first in its process: pool started, each answer once", median("reward-cold", "d"), 1)
    line("d2) now, after a verify stage in the process: warm pool", median("reward-warm", "d"), 1)
    print("identical verdicts: " + ", ".join(f"{side} {same}" for side, same in identical.items()))
    print("each run, seconds: " + "; ".join(
        f"{side}/{key} " + " ".join(f"{r[key]:.2f}" for r in runs[side])
        for side, key in [(s, "total") for s in SEQUENTIAL] + [("stages", "b"), ("stages", "c")]
        + ([("stages-before", "b"), ("stages-before", "c")] if args.before else [])
        + [("reward-before", "d"), ("reward-cold", "d"), ("reward-warm", "d")]))
    if not all(identical.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
