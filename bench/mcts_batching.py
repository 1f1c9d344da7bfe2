"""MCTS nodes per second: per-depth batching (all trees' expansions in one engine call) against one
engine call per node, same problems, seeds and config, on the tiny random model.

    .venv/bin/python bench/mcts_batching.py [--problems 16] [--rollouts 2] [--children 4] [--depth 3] [--top-p 0.95]

Each side runs in a fresh process (so neither inherits the other's warm caches) and prints nodes,
seconds and nodes/s; the last line gives the ratio. Target: >= 5x.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fresh_process import in_fresh_process  # noqa: E402
from evoforge.data import home  # noqa: E402

home.configure()


def one_side(args) -> dict:
    import pyarrow as pa

    from evoforge.models.engine import EngineConfig
    from evoforge.models.loader import load_engine
    from evoforge.models.tiny import tiny_model_folder
    from evoforge.tasks.mcts import MCTSConfig, search
    from evoforge.tasks.verify import VerifyConfig

    engine = load_engine(EngineConfig(model=str(tiny_model_folder()), backend="vllm", max_model_len=2048))
    problems = pa.table({"problem_id": [f"p{i}" for i in range(args.problems)],
                         "question": [f"What is {i} + {2 * i}?" for i in range(args.problems)],
                         "answer": [str(3 * i) for i in range(args.problems)]})
    config = MCTSConfig(rollouts=args.rollouts, max_depth=args.depth, children=args.children, batched=args.side == "batched")
    config.step.max_tokens = args.max_tokens
    config.step.top_p = args.top_p  # 1.0 skips the sampler's sort over the vocabulary
    search(problems.slice(0, 1), engine, config.model_copy(update={"rollouts": 1}), VerifyConfig(workers=1))  # warm-up
    started = time.monotonic()
    out = search(problems, engine, config, VerifyConfig(workers=1))
    seconds = time.monotonic() - started
    nodes = out["mcts_nodes"].num_rows - args.problems  # roots are not generated
    return {"side": args.side, "nodes": nodes, "seconds": seconds, "nodes_per_s": nodes / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--rollouts", type=int, default=2)
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--side", choices=["batched", "per-node"])
    args = parser.parse_args()
    if args.side:
        print(json.dumps(one_side(args)))
        return
    results = {}
    for side in ("batched", "per-node"):
        results[side] = r = in_fresh_process(__file__, side, args)
        print(f"{side:>9}: {r['nodes']} nodes in {r['seconds']:.1f} s = {r['nodes_per_s']:.1f} nodes/s")
    ratio = results["batched"]["nodes_per_s"] / results["per-node"]["nodes_per_s"]
    print(f"per-depth batching: {ratio:.2f}x the nodes/s of one engine call per node (target >= 5x)")


if __name__ == "__main__":
    main()
