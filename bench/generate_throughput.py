"""Tokens/s of the generate stage against raw `vllm.LLM.generate` on the same prompts and sampling.

    .venv/bin/python bench/generate_throughput.py [--model tiny|default|PATH] [--problems 64] [--n 8] [--max-tokens 128]

Both sides use the same loaded LLM, the same rendered chat prompts and the same per-problem seeds,
so they generate the same tokens; the difference is the stage's own work (prompt building, batching,
progress, log-probability bookkeeping, the Arrow table). Runs alternate; medians are printed.
Target: stage overhead <= 10%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evoforge.data import home  # noqa: E402

home.configure()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", help="tiny (random 6.6M Llama), default (SmolLM2-135M) or a folder")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import pyarrow as pa
    from vllm import SamplingParams

    from evoforge.data.ids import problem_id, problem_seed
    from evoforge.models.engine import EngineConfig, SamplingConfig, render
    from evoforge.models.loader import load_engine
    from evoforge.models.prompts import solve_messages
    from evoforge.tasks.generate import GenerateConfig, generate

    if args.model == "tiny":
        from evoforge.models.tiny import tiny_model_folder

        model = str(tiny_model_folder())
    else:
        model = args.model
    engine = load_engine(EngineConfig(model=model))
    questions = [json.loads(line)["question"] for line in (ROOT / "data/sets/easy_arithmetic/test.jsonl").open()]
    questions = (questions * (args.problems // len(questions) + 1))[: args.problems]
    questions = [f"{q} (#{i})" for i, q in enumerate(questions)]  # distinct problems, distinct seeds
    problems = pa.table({"problem_id": [problem_id(q) for q in questions], "question": questions})
    sampling = SamplingConfig(n=args.n, temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    config = GenerateConfig(sampling=sampling)

    prompts = [render(engine.tokenizer, solve_messages(q)) for q in questions]
    params = [SamplingParams(n=args.n, temperature=0.8, top_p=0.95, max_tokens=args.max_tokens,
                             seed=problem_seed(0, pid), logprobs=0) for pid in problems["problem_id"].to_pylist()]

    def raw() -> tuple[float, int]:
        started = time.perf_counter()
        outputs = engine.llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - started, sum(len(c.token_ids) for o in outputs for c in o.outputs)

    def stage() -> tuple[float, int]:
        started = time.perf_counter()
        table = generate(problems, engine, config)
        return time.perf_counter() - started, sum(table["completion_tokens"].to_pylist())

    print("warm-up", raw(), stage(), flush=True)  # first batches pay one-time allocations
    runs = {"raw": [], "stage": []}
    for _ in range(args.repeat):
        runs["raw"].append(raw())
        runs["stage"].append(stage())
    raw_s, stage_s = (statistics.median(t for t, _ in runs[k]) for k in ("raw", "stage"))
    raw_tokens, stage_tokens = runs["raw"][0][1], runs["stage"][0][1]
    print(f"model {engine.model_id}: {args.problems} problems x n={args.n}, max_tokens={args.max_tokens}, "
          f"median of {args.repeat}")
    print(f"raw vllm.LLM.generate: {raw_tokens} tokens in {raw_s:6.2f} s = {raw_tokens / raw_s:8.1f} tokens/s")
    print(f"generate stage:        {stage_tokens} tokens in {stage_s:6.2f} s = {stage_tokens / stage_s:8.1f} tokens/s")
    overhead = (raw_tokens / raw_s) / (stage_tokens / stage_s) - 1
    print(f"stage overhead: {overhead:+.1%} tokens/s (target <= 10%); same token count: {raw_tokens == stage_tokens}")


if __name__ == "__main__":
    main()
