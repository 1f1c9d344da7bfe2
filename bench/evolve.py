"""SvS rounds against plain rejection-sampling rounds, from the same start, on held-out sets.

    .venv/bin/python bench/evolve.py [--rounds 2] [--pool 32] [--n 8] [--eval-problems 24] [--eval-n 8] [--method sft]

Arm (a), SvS: generate -> verify -> filter -> synthesize -> pairs -> finetune -> evaluate.
Arm (b), rejection sampling (RFT): the same without synthesize. To give (b) the same sampling
budget, its n per problem is raised so that its generated samples match (a)'s generate +
synthesis + variant-solving samples of the same round (rounded up). Prints, per arm and model,
pass@1 and pass@n on each held-out set with the samples behind each figure, and each arm's budget.
Runs are written under runs/bench-evolve-{svs,rft}.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evoforge.data import home  # noqa: E402

home.configure()


def base_config(args):
    from evoforge.flows.config import RoundConfig

    return RoundConfig.model_validate({
        "engine": {"model": args.model},
        "sources": [{"path": "data/sets/easy_arithmetic/train.jsonl", "preset": "plain", "name": "easy_arithmetic",
                     "limit": args.pool}],
        "eval_sets": [{"name": "easy-arithmetic-test", "path": "data/sets/easy_arithmetic/test.jsonl", "preset": "plain"},
                      {"name": "gsm8k-test", "path": "data/sets/gsm8k/test.jsonl", "preset": "gsm8k"}],
        "generate": {"sampling": {"n": args.n, "max_tokens": args.max_tokens, "seed": 0}},
        "synthesize": {"samples_per_variant": args.n, "synthesis": {"n": 1, "max_tokens": args.max_tokens, "seed": 1}},
        "pairs": {"sft_per_problem": 4},
        "finetune": {"method": args.method, "max_steps": args.steps, "batch_size": 4},
        "evaluate": {
            "sets": [{"name": "easy-arithmetic-test", "path": "data/sets/easy_arithmetic/test.jsonl", "preset": "plain",
                      "limit": args.eval_problems},
                     {"name": "gsm8k-test", "path": "data/sets/gsm8k/test.jsonl", "preset": "gsm8k",
                      "limit": args.eval_problems // 2}],
            "sampling": {"n": args.eval_n, "max_tokens": args.max_tokens, "seed": 1234},
            "pass_k": [1, args.eval_n],
        },
    })


def samples(run: str, round: int) -> dict[str, int]:
    from evoforge.data.lake import lake

    store = lake()
    variants = store.read(run, "variants", round)
    return {
        "generate": store.read(run, "rollouts", round, "generate").num_rows,
        "synthesis": variants.num_rows,
        "variant_solving": store.read(run, "rollouts", round, "synthesize").num_rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pool", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--method", default="sft", help="finetune method or chain (sft, dpo, grpo, sft+grpo)")
    parser.add_argument("--eval-problems", type=int, default=24)
    parser.add_argument("--eval-n", type=int, default=8)
    parser.add_argument("--tag", default="bench-evolve")
    args = parser.parse_args()

    from evoforge.flows.report import collect
    from evoforge.flows.round import round_flow

    config = base_config(args)
    budgets: dict[str, list[dict]] = {"svs": [], "rft": []}
    timings = {}
    for arm in ("svs", "rft"):
        run = f"{args.tag}-{arm}"
        started = time.monotonic()
        for round in range(args.rounds):
            arm_config = config.model_copy(deep=True)
            if arm == "rft":
                arm_config.stages = [s for s in arm_config.stages if s != "synthesize"]
                svs = budgets["svs"][round]
                pool = svs["generate"] // args.n
                arm_config.generate.sampling.n = max(args.n, math.ceil(sum(svs.values()) / max(1, pool)))
            round_flow(run, arm_config, round=round)
            budgets[arm].append(samples(run, round))
        timings[arm] = time.monotonic() - started

    print(f"\nSvS vs rejection sampling: {args.rounds} rounds, pool {args.pool} easy-arithmetic problems, "
          f"model {args.model}, finetune {args.method} x {args.steps} steps")
    for arm in ("svs", "rft"):
        print(f"\narm {arm} ({timings[arm]:.0f} s)")
        for round, budget in enumerate(budgets[arm]):
            print(f"  round {round} samples: {budget} = {sum(budget.values())}")
        for e in collect(f"{args.tag}-{arm}")["evals"]:
            ks = ", ".join(f"pass@{k} {v:.3f}" for k, v in sorted(e["pass_at_k"].items()))
            print(f"  model {e['model_round']} {e['set']:<22} {ks}  ({e['problems']} problems x {e['n']} samples "
                  f"= {e['problems'] * e['n']})")


if __name__ == "__main__":
    main()
