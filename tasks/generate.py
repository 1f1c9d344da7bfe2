"""generate: G samples per problem from the engine -> `rollouts`."""
from __future__ import annotations

import pyarrow as pa
from pydantic import Field

from evoforge.data import schemas
from evoforge.data.chunks import NO_CHUNKS, Chunks
from evoforge.data.ids import problem_seed, rollout_id, stable_hash
from evoforge.data.section import Section
from evoforge.models.engine import Engine, GenerationRequest, SamplingConfig
from evoforge.models.prompts import solve_messages
from evoforge.tasks import summary
from evoforge.tasks.progress import Progress


class GenerateConfig(Section):
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    few_shot: bool = Field(True, description="worked examples in the prompt (see models/prompts.py)")
    batch_problems: int = Field(64, ge=1, description="problems per engine call; progress is reported per call")


def transient(task, task_run, state) -> bool:
    """Prefect retry condition: retry what a second try can fix (an engine that lost its worker, an
    I/O hiccup), not a wrong input or config, which fails the same way every time."""
    try:
        state.result()
    except (ValueError, TypeError, KeyError, MemoryError):
        return False
    except Exception:
        return True
    return False


def _generate_batch(batch: list[dict], engine: Engine, config: GenerateConfig) -> pa.Table:
    sampling = config.sampling
    requests = [
        GenerationRequest(solve_messages(r["question"], config.few_shot), problem_seed(sampling.seed, r["problem_id"]))
        for r in batch
    ]
    out = []
    for row, request, completions in zip(batch, requests, engine.generate(requests, sampling)):
        for index, c in enumerate(completions):
            out.append(dict(
                rollout_id=rollout_id(row["problem_id"], engine.model_id, request.seed, index),
                problem_id=row["problem_id"], model_id=engine.model_id, seed=request.seed, sample_index=index,
                text=c.text, completion_tokens=c.token_count, finish_reason=c.finish_reason, mean_logprob=c.mean_logprob,
            ))
    return pa.Table.from_pylist(out, schema=schemas.ROLLOUTS)


def generate(problems: pa.Table, engine: Engine, config: GenerateConfig, chunks: Chunks = NO_CHUNKS) -> pa.Table:
    """G samples per problem, `batch_problems` problems per engine call; each call's rollouts are one
    chunk, so a crashed or retried run does not generate them again."""
    rows = problems.select(["problem_id", "question"]).to_pylist()
    parts: list[pa.Table] = []
    tokens = 0
    with Progress("generate", len(rows), "problems") as progress:
        for start in range(0, len(rows), config.batch_problems):
            batch = rows[start : start + config.batch_problems]
            key = stable_hash("generate", engine.model_id, *(r["problem_id"] for r in batch))
            part = chunks.get_or_compute(key, lambda: _generate_batch(batch, engine, config))
            parts.append(part)
            tokens += sum(part["completion_tokens"].to_pylist())
            progress.update(start + len(batch), f", {tokens} tokens")
    return pa.concat_tables(parts) if parts else schemas.ROLLOUTS.empty_table()


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    tokens = summary.column(tables, "rollouts", "completion_tokens")
    return [f"- **rollouts**: {summary.rows(tables, 'rollouts')}, **tokens**: {sum(tokens.to_pylist()) if tokens else 0}",
            summary.line("finish reasons", summary.counts(summary.column(tables, "rollouts", "finish_reason")))]
