"""evaluate: pass@1 (mean over n samples), unbiased pass@k, entropy estimate and length on held-out sets."""
from __future__ import annotations

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from evoforge.data import schemas
from evoforge.data.chunks import NO_CHUNKS, Chunks
from evoforge.models.engine import Engine, SamplingConfig
from evoforge.tasks.filter import correct_counts, pass_at_k
from evoforge.tasks.generate import GenerateConfig, generate
from evoforge.tasks.ingest import EvalSetConfig
from evoforge.tasks.verify import VerifyConfig, verify


class EvaluateConfig(BaseModel):
    sets: list[EvalSetConfig] = Field(default_factory=list, description="held-out sets; `limit` picks a fixed sample")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(n=4, max_tokens=200, seed=1234))
    pass_k: list[int] = Field(default_factory=lambda: [1, 4])
    few_shot: bool = True


@task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate(
    sets: dict[str, pa.Table], engine: Engine, config: EvaluateConfig, verify_config: VerifyConfig, model_round: int,
    chunks: Chunks = NO_CHUNKS,
) -> pa.Table:
    """`sets`: name -> (problem_id, question, answer). One `evals` row per set."""
    rows = []
    generate_config = GenerateConfig(sampling=config.sampling, few_shot=config.few_shot)
    for name, problems in sets.items():
        rollouts = generate.fn(problems.select(["problem_id", "question"]), engine, generate_config, chunks.sub(f"{name}-solve"))
        verdicts = verify.fn(rollouts, problems.select(["problem_id", "answer"]), verify_config, chunks.sub(f"{name}-grade"))
        correct = correct_counts(verdicts)
        pass_at = {}
        for k in config.pass_k:
            values = [pass_at_k(n, c, k) for n, c in correct.values()]
            if values and all(v is not None for v in values):
                pass_at[k] = sum(values) / len(values)
        verdict_list = verdicts["verdict"].to_pylist()
        logprobs = rollouts["mean_logprob"].to_pylist()
        rows.append(dict(
            model_id=engine.model_id, model_round=model_round, eval_set=name, problems=len(correct),
            n=config.sampling.n, pass_at_1=sum(c for _, c in correct.values()) / max(1, sum(n for n, _ in correct.values())),
            pass_at_k=list(pass_at.items()), entropy=-sum(logprobs) / max(1, len(logprobs)),
            mean_tokens=sum(rollouts["completion_tokens"].to_pylist()) / max(1, rollouts.num_rows),
            no_answer_rate=verdict_list.count("no_answer") / max(1, len(verdict_list)),
        ))
    return pa.Table.from_pylist(rows, schema=schemas.EVALS)


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    lines = ["| model | set | pass@1 | pass@k | entropy | problems x n |", "|---|---|---|---|---|---|"]
    for e in tables["evals"].to_pylist() if "evals" in tables else []:
        ks = ", ".join(f"@{k} {v:.3f}" for k, v in sorted(dict(e["pass_at_k"]).items()))
        lines.append(f"| {e['model_round']} | {e['eval_set']} | {e['pass_at_1']:.3f} | {ks} | {e['entropy']:.3f} "
                     f"| {e['problems']} x {e['n']} |")
    return lines
