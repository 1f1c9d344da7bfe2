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

from evoforge.data import schemas
from evoforge.data.ids import normalize_question, stable_hash
from evoforge.tasks import summary

REJECTABLE = ("wrong", "no_answer")


class PairsConfig(BaseModel):
    pairs_per_problem: int = Field(2, ge=0)
    sft_per_problem: int = Field(2, ge=0)
    sft_buckets: list[str] = Field(default_factory=lambda: ["learnable", "underperforming"])
    step_min_q_margin: float = Field(0.5, ge=0, description="step pairs: Q(chosen) - Q(rejected) at least this")
    step_min_edit_distance: float = Field(0.2, ge=0, le=1,
                                          description="step pairs: 1 - difflib ratio of the two steps at least this")


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


def _subtree_outcome(node_id: str, children: dict[str, list[dict]], nodes: dict[str, dict], memo: dict) -> str | None:
    """'correct' when a correct terminal lies below (or at) the node, 'wrong' when only wrong or failed
    leaves do, None when nothing below was evaluated."""
    if node_id in memo:
        return memo[node_id]
    node = nodes[node_id]
    kids = children.get(node_id, [])
    if not kids:
        outcome = ("correct" if node["correct"] else "wrong") if node["visits"] else None
    else:
        below = {_subtree_outcome(k["node_id"], children, nodes, memo) for k in kids}
        outcome = "correct" if "correct" in below else ("wrong" if "wrong" in below else None)
    memo[node_id] = outcome
    return outcome


def build_step_pairs(nodes: pa.Table, questions: dict[str, str], config: PairsConfig) -> pa.Table:
    """rStar-Math PPM pairs: at each node with children leading to a correct answer AND children leading
    only to wrong ones, the top-2 correct-leading children by Q against the bottom-2 wrong-leading ones,
    each pair kept only if its Q margin and the edit distance of its two steps pass the thresholds."""
    import difflib

    from evoforge.models.prompts import step_prefix

    rows = nodes.to_pylist()
    by_id = {n["node_id"]: n for n in rows}
    children: dict[str, list[dict]] = {}
    for n in rows:
        if n["parent_id"]:
            children.setdefault(n["parent_id"], []).append(n)
    memo: dict = {}
    out = []
    for parent_id, kids in sorted(children.items()):
        good = sorted((k for k in kids if _subtree_outcome(k["node_id"], children, by_id, memo) == "correct"),
                      key=lambda k: (-k["q_value"], k["node_id"]))[:2]
        bad = sorted((k for k in kids if _subtree_outcome(k["node_id"], children, by_id, memo) == "wrong"),
                     key=lambda k: (k["q_value"], k["node_id"]))[:2]
        if not good or not bad:
            continue
        path, node = [], by_id[parent_id]
        while node["parent_id"]:
            path.append((node["step_text"], node["exec_output"] or ""))
            node = by_id[node["parent_id"]]
        prefix = step_prefix(path[::-1])
        for chosen in good:
            for rejected in bad:
                margin = chosen["q_value"] - rejected["q_value"]
                distance = 1 - difflib.SequenceMatcher(None, chosen["step_text"], rejected["step_text"]).ratio()
                if margin < config.step_min_q_margin or distance < config.step_min_edit_distance:
                    continue
                out.append(dict(
                    pair_id=stable_hash("step-pair", chosen["node_id"], rejected["node_id"]), kind="step",
                    problem_id=chosen["problem_id"], prompt=questions.get(chosen["problem_id"], ""), prefix=prefix,
                    chosen=chosen["step_text"], rejected=rejected["step_text"], chosen_rollout_id=chosen["node_id"],
                    rejected_rollout_id=rejected["node_id"], chosen_score=chosen["q_value"],
                    rejected_score=rejected["q_value"],
                ))
    return pa.Table.from_pylist(out, schema=schemas.PAIRS)


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    return [summary.line("pairs by kind", summary.counts(summary.column(tables, "pairs", "kind"))),
            f"- **sft examples**: {summary.rows(tables, 'sft_examples')}"]
