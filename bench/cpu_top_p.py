"""Decoding speed on CPU with vLLM's top-p (a sort over the whole vocabulary each step) against the
truncated top-p of models/cpu_top_p.py, same prompts, seeds and sampling; the texts must match.

    .venv/bin/python bench/cpu_top_p.py [--model default|tiny|PATH] [--problems 32] [--n 8] [--max-tokens 128] [--top-p 0.95]

Each side runs in a fresh process (`EVOFORGE_VLLM_SORTED_TOP_P=1` for vLLM's own), after a warm-up
call; prints tokens/s per side, the ratio, and how many completions differ (0 expected: the kept
tokens are the same, so seeded sampling draws the same ones).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fresh_process import in_fresh_process  # noqa: E402
from evoforge.data import home  # noqa: E402

home.configure()


def one_side(args) -> dict:
    from evoforge.models.engine import EngineConfig, GenerationRequest, SamplingConfig
    from evoforge.models.loader import load_engine
    from evoforge.models.prompts import solve_messages
    from evoforge.tasks.ingest import read_records

    model = args.model
    if model == "tiny":
        from evoforge.models.tiny import tiny_model_folder

        model = str(tiny_model_folder())
    engine = load_engine(EngineConfig(model=model, backend="vllm"))
    questions = [r.value["question"] for r in read_records(ROOT / "data/sets/easy_arithmetic/test.jsonl", args.problems)]
    requests = [GenerationRequest(solve_messages(q), seed=i) for i, q in enumerate(questions)]
    sampling = SamplingConfig(n=args.n, temperature=0.8, top_p=args.top_p, max_tokens=args.max_tokens, seed=0)
    engine.generate(requests[:2], sampling.model_copy(update={"n": 1, "max_tokens": 8}))  # warm-up
    started = time.monotonic()
    outputs = engine.generate(requests, sampling)
    seconds = time.monotonic() - started
    texts = [c.text for completions in outputs for c in completions]
    tokens = sum(c.token_count for completions in outputs for c in completions)
    return {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds,
            "texts": [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--side", choices=["sorted", "truncated"])
    args = parser.parse_args()
    if args.side:
        print(json.dumps(one_side(args)))
        return
    results = {}
    for side in ("sorted", "truncated"):
        env = {**os.environ, "EVOFORGE_VLLM_SORTED_TOP_P": "1" if side == "sorted" else "0"}
        results[side] = r = in_fresh_process(__file__, side, args, env)
        print(f"{side:>9} top-p: {r['tokens']} tokens in {r['seconds']:.1f} s = {r['tok_per_s']:.1f} tok/s")
    differ = sum(a != b for a, b in zip(results["sorted"]["texts"], results["truncated"]["texts"]))
    ratio = results["truncated"]["tok_per_s"] / results["sorted"]["tok_per_s"]
    print(f"truncated top-p: {ratio:.2f}x vLLM's sorted top-p; {differ} of {len(results['sorted']['texts'])} completions differ")


if __name__ == "__main__":
    main()
