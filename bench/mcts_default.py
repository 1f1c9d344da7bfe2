"""The rStar-Math search on the default model and the easy-arithmetic pool: what it yields.

    .venv/bin/python bench/mcts_default.py [--problems 16] [--rollouts 4] [--children 3] [--depth 4]

Prints nodes, the status of the steps, the terminal-correct ratio, traces and step pairs per problem.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evoforge.data import home  # noqa: E402

home.configure()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--children", type=int, default=3)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    from evoforge.models.engine import EngineConfig
    from evoforge.models.loader import load_engine
    from evoforge.tasks.ingest import EvalSetConfig, load_eval_set
    from evoforge.tasks.mcts import MCTSConfig, search
    from evoforge.tasks.pairs import PairsConfig, build_step_pairs
    from evoforge.tasks.verify import VerifyConfig

    pool = load_eval_set(EvalSetConfig(name="easy", path="data/sets/easy_arithmetic/train.jsonl", preset="plain"),
                         ROOT, args.problems)
    engine = load_engine(EngineConfig(model="default"))
    config = MCTSConfig(rollouts=args.rollouts, max_depth=args.depth, children=args.children)
    config.step.max_tokens = args.max_tokens
    started = time.monotonic()
    out = search(pool, engine, config, VerifyConfig())
    seconds = time.monotonic() - started
    nodes = out["mcts_nodes"].to_pylist()
    steps = [n for n in nodes if n["depth"] > 0]
    terminal = [n for n in nodes if n["is_terminal"]]
    correct = sum(1 for n in terminal if n["correct"])
    pairs = build_step_pairs(out["mcts_nodes"], dict(zip(pool["problem_id"].to_pylist(), pool["question"].to_pylist())),
                             PairsConfig())
    print(f"default model, {args.problems} easy-arithmetic problems, N={args.rollouts} rollouts, k={args.children}, "
          f"D={args.depth}: {seconds:.0f} s")
    print(f"  nodes {len(nodes)} ({len(steps)} steps, {len(steps) / seconds:.2f} steps/s); "
          f"steps by status: {dict(Counter(n['exec_status'] for n in steps))}")
    print(f"  terminal leaves {len(terminal)}, correct {correct} ({correct / max(1, len(terminal)):.1%})")
    print(f"  traces {out['traces'].num_rows} ({len({t for t in out['traces']['problem_id'].to_pylist()})} problems); "
          f"step pairs {pairs.num_rows} ({pairs.num_rows / args.problems:.2f} per problem)")


if __name__ == "__main__":
    main()
