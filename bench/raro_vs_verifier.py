"""One round trained on RARO's critic rewards against one round trained on verifier rewards, on the same
GSM8K-derived problems with the same training compute, from the same start; held-out pass@1 for both.

    .venv/bin/python bench/raro_vs_verifier.py [--pool 32] [--n 4] [--steps 10] [--eval-problems 32] [--eval-n 4]

Arm (a), RARO: generate -> verify -> critic -> finetune (method raro) -> evaluate. `verify` only feeds
the report (the critic's accuracy where GSM8K's number can grade the answer); RARO's training never
reads a verdict. Arm (b), verifier: generate -> verify -> finetune (method grpo on every problem,
reward = the verify stage's grader) -> evaluate. Both arms: GRPO with the same steps, batch, group
size and completion length; the problems are the shipped demonstrations (data/sets/gsm8k_demonstrations).
Prints held-out pass@1/pass@n per arm and model, the critic's rates, the mean rewards during training
and each arm's wall time. Runs are written under runs/<tag>-{raro,verifier}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evoforge.data import home  # noqa: E402

home.configure()


def arm_config(args, arm: str):
    from evoforge.flows.config import RoundConfig

    held_out = [{"name": "gsm8k-test", "path": "data/sets/gsm8k/test.jsonl", "preset": "gsm8k", "limit": args.eval_problems},
                {"name": "easy-arithmetic-test", "path": "data/sets/easy_arithmetic/test.jsonl", "preset": "plain",
                 "limit": args.eval_problems}]
    grpo = {"max_steps": args.steps, "learning_rate": args.lr, "batch_size": args.batch, "grpo": {"generations": args.generations,
            "max_completion_tokens": args.max_tokens}}
    return RoundConfig.model_validate({
        "engine": {"model": args.model},
        "sources": [{"path": "data/sets/gsm8k_demonstrations/train.jsonl", "preset": "demonstrations",
                     "reference_field": "reference", "name": "gsm8k_demonstrations", "limit": args.pool}],
        "eval_sets": held_out,
        "generate": {"sampling": {"n": args.n, "max_tokens": args.max_tokens, "seed": 0}},
        "critic": {"sampling": {"n": 1, "temperature": 0.7, "max_tokens": args.critic_tokens, "seed": 0}},
        "finetune": {**grpo, "method": "raro"} if arm == "raro" else {**grpo, "method": "grpo", "grpo": {**grpo["grpo"], "problems": "all"}},
        "evaluate": {"sets": held_out, "sampling": {"n": args.eval_n, "max_tokens": args.max_tokens, "seed": 1234},
                     "pass_k": [1, args.eval_n]},
        "stages": (["generate", "verify", "critic", "finetune", "evaluate"] if arm == "raro"
                   else ["generate", "verify", "finetune", "evaluate"]),
    })


def training_means(run: str) -> dict[str, float]:
    from evoforge.data import catalog
    from evoforge.data.lake import lake

    con = catalog.connect(lake().run_dir(run))
    rows = con.execute("SELECT metric, avg(value) FROM train_metrics WHERE metric LIKE 'reward%' OR metric LIKE 'raro/%' "
                       "GROUP BY metric ORDER BY metric").fetchall()
    return dict(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--pool", type=int, default=32)
    parser.add_argument("--n", type=int, default=4, help="policy samples per problem in generate (critic: one judgment each)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--critic-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="GRPO completions per step")
    parser.add_argument("--generations", type=int, default=4, help="GRPO group size")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--eval-problems", type=int, default=32)
    parser.add_argument("--eval-n", type=int, default=4)
    parser.add_argument("--tag", default="bench-raro")
    args = parser.parse_args()

    from evoforge.data import catalog
    from evoforge.data.lake import lake
    from evoforge.flows.report import collect
    from evoforge.flows.round import round_flow

    timings = {}
    for arm in ("raro", "verifier"):
        started = time.monotonic()
        round_flow(f"{args.tag}-{arm}", arm_config(args, arm), round=0, force=True)
        timings[arm] = time.monotonic() - started

    print(f"\nRARO vs verifier rewards: one round, {args.pool} GSM8K-derived problems, model {args.model}; "
          f"GRPO {args.steps} steps x {args.batch} completions (groups of {args.generations}), lr {args.lr}")
    for arm in ("raro", "verifier"):
        run = f"{args.tag}-{arm}"
        print(f"\narm {arm} ({timings[arm]:.0f} s)")
        for e in collect(run)["evals"]:
            ks = ", ".join(f"pass@{k} {v:.3f}" for k, v in sorted(e["pass_at_k"].items()))
            print(f"  model {e['model_round']} {e['set']:<22} {ks}  entropy {e['entropy']:.3f}  "
                  f"({e['problems']} problems x {e['n']} samples)")
        print("  training means: " + ", ".join(f"{k} {v:.3f}" for k, v in training_means(run).items()))
        if arm == "raro":
            con = catalog.connect(lake().run_dir(run))
            cursor = con.execute(catalog.resolve_query("critic_report"))
            names = [d[0] for d in cursor.description]
            for row in cursor.fetchall():
                print("  critic: " + ", ".join(f"{k} {v}" for k, v in zip(names, row)))
            (pool_acc,) = con.execute("SELECT avg((verdict = 'correct')::INT) FROM verdicts WHERE stage = 'verify'").fetchone()
            print(f"  the policy's own pool answers graded correct by the verifier: {pool_acc:.3f}")


if __name__ == "__main__":
    main()
