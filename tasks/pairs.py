"""pairs: solution-level preference pairs (DPO) and the SFT selection (rejection-sampling fine-tuning).

- A problem with both correct and wrong rollouts gives up to `pairs_per_problem` pairs: chosen runs
  through its correct rollouts shortest first, rejected through its wrong ones most confident first
  (highest mean log-probability: the mistakes the policy is surest of are the ones worth unlearning).
- SFT: correct rollouts of learnable and under-performing problems (solved ones teach nothing new,
  unsolved ones have none), at most `sft_per_problem` each, shortest first, duplicates collapsed.
Both export to `datasets.Dataset` in TRL's conversational format.
"""
from __future__ import annotations

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from data import schemas
from data.ingest import normalize_question
from tasks.generate import stable_hash

REJECTABLE = ("wrong", "no_answer")


class PairsConfig(BaseModel):
    pairs_per_problem: int = Field(2, ge=0)
    sft_per_problem: int = Field(2, ge=0)
    sft_buckets: list[str] = Field(default_factory=lambda: ["learnable", "underperforming"])


def _joined(problems: pa.Table, rollouts: pa.Table, verdicts: pa.Table) -> dict[str, list[dict]]:
    verdict_of = dict(zip(verdicts["rollout_id"].to_pylist(), verdicts["verdict"].to_pylist()))
    by_problem: dict[str, list[dict]] = {}
    for row in rollouts.select(["rollout_id", "problem_id", "text", "completion_tokens", "mean_logprob"]).to_pylist():
        row["verdict"] = verdict_of.get(row["rollout_id"])
        by_problem.setdefault(row["problem_id"], []).append(row)
    return by_problem


@task(name="pairs", cache_policy=NO_CACHE, persist_result=False)
def build_pairs(
    problems: pa.Table, stats: pa.Table, rollouts: pa.Table, verdicts: pa.Table, config: PairsConfig,
    variant_problem_ids: frozenset[str] = frozenset(),
) -> dict[str, pa.Table]:
    """`variant_problem_ids`: kept SvS variants among `problems`; their correct rollouts join the SFT set."""
    question = dict(zip(problems["problem_id"].to_pylist(), problems["question"].to_pylist()))
    origin = dict(zip(problems["problem_id"].to_pylist(), problems["origin"].to_pylist()))
    bucket = dict(zip(stats["problem_id"].to_pylist(), stats["bucket"].to_pylist()))
    bucket.update({pid: "variant" for pid in variant_problem_ids})
    pairs, sft = [], []
    for pid, rows in sorted(_joined(problems, rollouts, verdicts).items()):
        if pid not in question:
            continue
        correct = sorted((r for r in rows if r["verdict"] == "correct"),
                         key=lambda r: (r["completion_tokens"], r["rollout_id"]))
        wrong = sorted((r for r in rows if r["verdict"] in REJECTABLE),
                       key=lambda r: (r["verdict"] != "wrong", -r["mean_logprob"], r["rollout_id"]))
        for i in range(min(config.pairs_per_problem, len(wrong)) if correct else 0):
            chosen, rejected = correct[i % len(correct)], wrong[i]
            pairs.append(dict(
                pair_id=stable_hash("pair", chosen["rollout_id"], rejected["rollout_id"]), kind="solution",
                problem_id=pid, prompt=question[pid], prefix=None, chosen=chosen["text"], rejected=rejected["text"],
                chosen_rollout_id=chosen["rollout_id"], rejected_rollout_id=rejected["rollout_id"],
                chosen_score=-float(chosen["completion_tokens"]), rejected_score=rejected["mean_logprob"],
            ))
        if bucket.get(pid) in (*config.sft_buckets, "variant"):
            seen: set[str] = set()
            for r in correct:
                key = normalize_question(r["text"])
                if key in seen or len(seen) >= config.sft_per_problem:
                    continue
                seen.add(key)
                sft.append(dict(
                    example_id=stable_hash("sft", pid, key), problem_id=pid, rollout_id=r["rollout_id"],
                    prompt=question[pid], completion=r["text"], bucket=bucket[pid], origin=origin.get(pid, "seed"),
                ))
    return {
        "pairs": pa.Table.from_pylist(pairs, schema=schemas.PAIRS),
        "sft_examples": pa.Table.from_pylist(sft, schema=schemas.SFT_EXAMPLES),
    }


def to_dpo_dataset(pairs: pa.Table, few_shot: bool = True):
    """TRL conversational preference format: prompt messages, chosen and rejected assistant turns."""
    import datasets

    from models.prompts import solve_messages

    rows = pairs.filter(pa.compute.equal(pairs["kind"], "solution")).to_pylist()
    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["prompt"], few_shot),
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        for r in rows
    ])


def to_sft_dataset(examples: pa.Table, few_shot: bool = True):
    """TRL conversational prompt/completion format, so the loss covers the completion only."""
    import datasets

    from models.prompts import solve_messages

    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["prompt"], few_shot), "completion": [{"role": "assistant", "content": r["completion"]}]}
        for r in examples.to_pylist()
    ])


def to_grpo_dataset(prompts: pa.Table, few_shot: bool = True):
    """TRL conversational prompt format; `answer` travels along to the verifier reward."""
    import datasets

    from models.prompts import solve_messages

    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["question"], few_shot), "answer": r["answer"]}
        for r in prompts.select(["question", "answer"]).to_pylist()
    ])
