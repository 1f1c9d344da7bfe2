"""verify: extract each rollout's final answer and grade it against the gold with math-verify -> `verdicts`."""
from __future__ import annotations

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from evoforge.data import schemas
from evoforge.data.chunks import NO_CHUNKS, Chunks
from evoforge.data.ids import stable_hash
from evoforge.tasks import summary
from evoforge.tasks.grader_pool import GraderPool
from evoforge.tasks.progress import Progress


class VerifyConfig(BaseModel):
    workers: int = Field(2, ge=1, description="grader processes")
    deadline_seconds: float = Field(10.0, gt=0, description="hard limit per item; the worker is killed past it")
    memory_mb: int = Field(2048, ge=256, description="address-space limit of each grader process")
    chunk_size: int = Field(32, ge=1, description="items sent to a worker at once")

    def grading_settings(self) -> dict:
        """The settings that can change a verdict (which items time out); workers and chunking cannot."""
        return self.model_dump(mode="json", include={"deadline_seconds", "memory_mb"})

    def pool(self) -> GraderPool:
        return GraderPool(self.workers, self.deadline_seconds, self.memory_mb, self.chunk_size)


def grade_pairs(pairs: list[tuple[str, str]], config: VerifyConfig, label: str = "verify") -> list[tuple]:
    """(gold, response) pairs -> (verdict, extracted, detail, seconds), exactly as the verify stage grades."""
    with config.pool() as pool, Progress(label, len(pairs), "answers") as progress:
        return pool.run([("grade", gold, response) for gold, response in pairs], progress.update)


def check_golds(answers: list[str], config: VerifyConfig) -> list[bool]:
    """Which gold answers math-verify can parse (ingest quarantines the rest)."""
    with config.pool() as pool, Progress("check answers", len(answers), "answers") as progress:
        return [r[0] == "ok" for r in pool.run([("gold", a, "") for a in answers], progress.update)]


CHUNK_ROLLOUTS = 1024  # verdicts per resumable chunk


@task(name="verify", cache_policy=NO_CACHE, persist_result=False)
def verify(rollouts: pa.Table, problems: pa.Table, config: VerifyConfig, chunks: Chunks = NO_CHUNKS) -> pa.Table:
    gold_of = dict(zip(problems["problem_id"].to_pylist(), problems["answer"].to_pylist()))
    rows = rollouts.select(["rollout_id", "problem_id", "text"]).to_pylist()
    missing = sorted({r["problem_id"] for r in rows if r["problem_id"] not in gold_of})
    if missing:
        raise ValueError(f"verify: {len(missing)} rollouts' problems are not in the pool (e.g. {missing[:3]})")
    # grouped by problem so a worker's gold-parse cache hits for the G samples of a problem
    rows.sort(key=lambda r: (r["problem_id"], r["rollout_id"]))
    batches = [rows[i : i + CHUNK_ROLLOUTS] for i in range(0, len(rows), CHUNK_ROLLOUTS)]
    parts: list[pa.Table] = []
    with config.pool() as pool, Progress("verify", len(rows), "answers") as progress:
        for batch in batches:
            key = stable_hash("verify", *(r["rollout_id"] for r in batch))
            done = sum(p.num_rows for p in parts)

            def grade(batch=batch, done=done) -> pa.Table:
                # a demonstration without a reference answer has nothing to grade against
                graded = [r for r in batch if gold_of[r["problem_id"]] is not None]
                results = iter(pool.run([("grade", gold_of[r["problem_id"]], r["text"]) for r in graded],
                                        lambda n: progress.update(done + n)))
                ungraded = ("no_reference", None, "the problem has no reference answer (demonstrations only)", 0.0)
                rows = []
                for r in batch:
                    gold = gold_of[r["problem_id"]]
                    verdict, extracted, detail, seconds = next(results) if gold is not None else ungraded
                    rows.append(dict(rollout_id=r["rollout_id"], problem_id=r["problem_id"], verdict=verdict,
                                     extracted_answer=extracted, gold=gold, detail=detail, seconds=seconds))
                return pa.Table.from_pylist(rows, schema=schemas.VERDICTS)

            parts.append(chunks.get_or_compute(key, grade))
            progress.update(done + len(batch))
    return pa.concat_tables(parts) if parts else schemas.VERDICTS.empty_table()


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    verdicts = summary.counts(summary.column(tables, "verdicts", "verdict"))
    return [summary.line("verdicts", verdicts), f"- **timeouts**: {verdicts.get('timeout', 0)}"]
