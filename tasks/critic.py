"""critic (RARO): where no verifier exists, the policy model itself, as a relativistic critic, compares
each policy answer with the expert's answer -> `judgments`.

The two answers are shown in a seeded random order (recorded per judgment), the critic's LAST label
(`Answer 1`, `Answer 2` or `Tie`) is mapped back to who wrote that answer, and the rewards follow
RARO (arXiv 2511.21667):

    critic reward = 1[label = expert] + tau_critic * 1[tie]
    policy reward = 1[label = policy] + tau_policy * 1[tie]

An output with no label is recorded (`parsed_ok = false`) and gets no reward (NULL in the table).
The same helpers give the rewards when RARO trains both roles with GRPO (tasks/finetune/raro.py:
its rows, its reward `RaroReward` and its section `finetune.raro`).
"""
from __future__ import annotations

import re

import pyarrow as pa
from pydantic import Field

from evoforge.data import schemas
from evoforge.data.chunks import NO_CHUNKS, Chunks
from evoforge.data.ids import problem_seed, stable_hash
from evoforge.data.section import Section
from evoforge.models.engine import Engine, GenerationRequest, SamplingConfig
from evoforge.models.prompts import critic_messages
from evoforge.tasks import summary
from evoforge.tasks.progress import Progress

ORDERS = ("policy_first", "expert_first")
LABELS = ("expert", "policy", "tie")


class CriticConfig(Section):
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(n=1, temperature=0.7, max_tokens=160, seed=0))
    tau_critic: float = Field(0.55, ge=0, le=1, description="critic reward for a tie (RARO's community implementation: 0.55)")
    tau_policy: float = Field(0.6, ge=0, le=1, description="policy reward for a tie (RARO's community implementation: 0.6)")
    max_answer_chars: int = Field(2000, ge=100, description="each answer is cut to this many characters in the critic prompt")
    batch_rollouts: int = Field(128, ge=1, description="judgments per engine call and per resumable chunk")


_LABEL = re.compile(r"\banswer\s*#?\s*([12])(?![\d.,]?\d)|\b(tie)\b", re.IGNORECASE)


def parse_label(output: str | None) -> str | None:
    """'1', '2' or 'tie': the LAST label in the critic's output (the verdict follows its reasoning, which
    may name both answers first), or None when it names neither answer nor a tie."""
    matches = list(_LABEL.finditer(output or ""))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) or "tie"


def order_for(seed: int, key: str) -> str:
    """Which answer the critic sees first: a fair coin per judgment, reproducible from (seed, key)."""
    return ORDERS[int(stable_hash("critic-order", seed, key, length=8), 16) % 2]


def arrange(order: str, policy_answer: str, expert_answer: str) -> tuple[str, str]:
    """(Answer 1, Answer 2) as the critic sees them."""
    return (policy_answer, expert_answer) if order == "policy_first" else (expert_answer, policy_answer)


def winner(said: str | None, order: str) -> str | None:
    """Undo the shuffle: the critic's '1' / '2' / 'tie' -> 'policy' / 'expert' / 'tie' (None stays None)."""
    if said is None or said == "tie":
        return said
    first, second = ("policy", "expert") if order == "policy_first" else ("expert", "policy")
    return first if said == "1" else second


def rewards(label: str | None, tau_critic: float, tau_policy: float) -> tuple[float | None, float | None]:
    """(critic reward, policy reward) for a judgment's label; (None, None) when the critic gave none."""
    if label is None:
        return None, None
    tie = label == "tie"
    return float(label == "expert") + tau_critic * tie, float(label == "policy") + tau_policy * tie


def critic_prompt(question: str, order: str, policy_answer: str, expert_answer: str, max_chars: int):
    answer_1, answer_2 = arrange(order, policy_answer[:max_chars], expert_answer[:max_chars])
    return critic_messages(question, answer_1, answer_2)


def _judge_batch(batch: list[dict], engine: Engine, config: CriticConfig) -> pa.Table:
    seed = config.sampling.seed
    orders = [order_for(seed, r["rollout_id"]) for r in batch]
    requests = [
        GenerationRequest(critic_prompt(r["question"], order, r["text"], r["expert_answer"], config.max_answer_chars),
                          problem_seed(seed, r["rollout_id"]))
        for r, order in zip(batch, orders)
    ]
    out = []
    for row, order, completions in zip(batch, orders, engine.generate(requests, config.sampling.model_copy(update={"n": 1}))):
        output = completions[0].text
        said = parse_label(output)
        label = winner(said, order)
        critic_reward, policy_reward = rewards(label, config.tau_critic, config.tau_policy)
        out.append(dict(
            judgment_id=stable_hash("judgment", row["rollout_id"], engine.model_id, seed), problem_id=row["problem_id"],
            rollout_id=row["rollout_id"], order=order, critic_output=output, said=said, label=label,
            parsed_ok=said is not None, critic_reward=critic_reward, policy_reward=policy_reward,
            critic_model_id=engine.model_id,
        ))
    return pa.Table.from_pylist(out, schema=schemas.JUDGMENTS)


def judge(problems: pa.Table, rollouts: pa.Table, engine: Engine, config: CriticConfig,
          chunks: Chunks = NO_CHUNKS) -> pa.Table:
    """One judgment per rollout whose problem has an expert answer. `problems`: problem_id, question,
    expert_answer; `rollouts`: rollout_id, problem_id, text. Each engine call is a resumable chunk."""
    by_id = {p["problem_id"]: p for p in problems.select(["problem_id", "question", "expert_answer"]).to_pylist()}
    rows = []
    for r in rollouts.select(["rollout_id", "problem_id", "text"]).to_pylist():
        problem = by_id.get(r["problem_id"])
        if problem is None or not problem["expert_answer"]:
            raise ValueError(f"critic: rollout {r['rollout_id']} belongs to problem {r['problem_id']}, "
                             "which has no expert answer")
        rows.append({**r, "question": problem["question"], "expert_answer": problem["expert_answer"]})
    rows.sort(key=lambda r: (r["problem_id"], r["rollout_id"]))
    parts: list[pa.Table] = []
    with Progress("critic", len(rows), "judgments") as progress:
        for start in range(0, len(rows), config.batch_rollouts):
            batch = rows[start : start + config.batch_rollouts]
            key = stable_hash("critic", engine.model_id, *(r["rollout_id"] for r in batch))
            parts.append(chunks.get_or_compute(key, lambda batch=batch: _judge_batch(batch, engine, config)))
            parsed = sum(sum(p["parsed_ok"].to_pylist()) for p in parts)
            progress.update(start + len(batch), f", {parsed} with a label")
    return pa.concat_tables(parts) if parts else schemas.JUDGMENTS.empty_table()


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    n = summary.rows(tables, "judgments")
    labels = summary.counts(summary.column(tables, "judgments", "label"))
    parsed = n - labels.get(None, 0)
    lines = [f"- **judgments** {n}, with a label {parsed}" + (f" ({parsed / n:.1%})" if n else ""),
             summary.line("winner", {k: v for k, v in labels.items() if k is not None})]
    if parsed:
        lines.append(f"- **tie rate** {labels.get('tie', 0) / parsed:.3f}, **policy win rate** "
                     f"{labels.get('policy', 0) / parsed:.3f} (of judgments with a label)")
    return lines
