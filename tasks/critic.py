"""critic (RARO): where no verifier exists, the policy model itself, as a relativistic critic, compares
each policy answer with the expert's answer -> `judgments`.

The two answers are shown in a seeded random order (recorded per judgment), the critic's LAST label
(`Answer 1`, `Answer 2` or `Tie`) is mapped back to who wrote that answer, and the rewards follow
RARO (arXiv 2511.21667):

    critic reward = 1[label = expert] + tau_critic * 1[tie]
    policy reward = 1[label = policy] + tau_policy * 1[tie]

An output with no label is recorded (`parsed_ok = false`) and gets no reward (NULL in the table).
The same helpers give the rewards when RARO trains both roles with GRPO (`RaroReward` below,
tasks/finetune/raro.py).
"""
from __future__ import annotations

import random
import re

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from evoforge.data import schemas
from evoforge.data.chunks import NO_CHUNKS, Chunks
from evoforge.data.ids import problem_seed, stable_hash
from evoforge.models.engine import Engine, GenerationRequest, SamplingConfig
from evoforge.models.prompts import critic_messages
from evoforge.tasks import summary
from evoforge.tasks.progress import Progress

ORDERS = ("policy_first", "expert_first")
LABELS = ("expert", "policy", "tie")


class CriticConfig(BaseModel):
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(n=1, temperature=0.7, max_tokens=160, seed=0))
    tau_critic: float = Field(0.55, ge=0, le=1, description="critic reward for a tie (RARO's community implementation: 0.55)")
    tau_policy: float = Field(0.6, ge=0, le=1, description="policy reward for a tie (RARO's community implementation: 0.6)")
    max_answer_chars: int = Field(2000, ge=100, description="each answer is cut to this many characters in the critic prompt")
    batch_rollouts: int = Field(128, ge=1, description="judgments per engine call and per resumable chunk")
    replay_size: int = Field(512, ge=0, description="RARO training: past policy answers kept for the critic role")
    critic_share: float = Field(0.5, ge=0, le=1, description="RARO training: share of the rows that train the critic role")


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


@task(name="critic", cache_policy=NO_CACHE, persist_result=False)
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


RARO_ROWS = pa.schema([
    ("role", pa.string()),            # 'policy' (answer the question) or 'critic' (judge two answers)
    ("problem_id", pa.string()),
    ("question", pa.string()),
    ("expert_answer", pa.string()),
    ("policy_answer", pa.string()),   # critic rows: the policy answer it is shown
    ("order", pa.string()),           # critic rows: which answer comes first
    ("replayed", pa.bool_()),         # critic rows: taken from the replay buffer of earlier rounds
])


def raro_training_rows(problems: pa.Table, fresh: pa.Table, replay: pa.Table, config: CriticConfig,
                       seed: int = 0) -> pa.Table:
    """The rows RARO's GRPO trains on, both roles in one set.

    Policy rows: every problem with an expert answer (its reward comes from the critic, judging online).
    Critic rows: `critic_share` of the set, compared answers of this round's judgments (`fresh`) and of
    earlier rounds (`replay`, the replay buffer), half and half when both have enough; each keeps the
    order it was judged in. `fresh`/`replay`: problem_id, question, expert_answer, policy_answer, order.
    """
    rng = random.Random(seed)
    policy = [dict(role="policy", problem_id=p["problem_id"], question=p["question"], expert_answer=p["expert_answer"],
                   policy_answer=None, order=None, replayed=None)
              for p in problems.select(["problem_id", "question", "expert_answer"]).to_pylist() if p["expert_answer"]]
    share = config.critic_share
    wanted = round(len(policy) * share / (1 - share)) if share < 1 else fresh.num_rows + replay.num_rows
    fresh_rows, replay_rows = fresh.to_pylist(), replay.to_pylist()
    take_replay = min(len(replay_rows), wanted // 2)
    take_fresh = min(len(fresh_rows), wanted - take_replay)
    take_replay = min(len(replay_rows), wanted - take_fresh)  # fresh ran short: fill from the buffer
    chosen = [(r, False) for r in rng.sample(fresh_rows, take_fresh)] + [(r, True) for r in rng.sample(replay_rows, take_replay)]
    critic = [dict(role="critic", problem_id=r["problem_id"], question=r["question"], expert_answer=r["expert_answer"],
                   policy_answer=r["policy_answer"], order=r["order"], replayed=replayed) for r, replayed in chosen]
    rows = policy + critic
    rng.shuffle(rows)
    return pa.Table.from_pylist(rows, schema=RARO_ROWS)


class RaroReward:
    """RARO's reward for both roles of one model (arXiv 2511.21667), computed online.

    A policy completion is judged by the model being trained, in its critic role, against the
    expert's answer in a fresh random order: policy reward = 1[critic picks it] + tau_policy*1[tie].
    A critic completion is parsed for its last label: critic reward = 1[it picks the expert] +
    tau_critic*1[tie]. A judgment with no label rewards neither role (0). Per-step rates go to the
    trainer's log as raro/*.
    """

    __name__ = "raro"

    def __init__(self, tokenizer, critic: CriticConfig, seed: int = 0):
        import copy

        self.tokenizer = copy.copy(tokenizer)
        self.tokenizer.padding_side = "left"  # generation continues each prompt from its end
        self.critic, self.seed = critic, seed
        self.trainer = None  # set once the trainer exists: the critic is the model being trained

    def judge(self, prompts: list) -> list[str]:
        """The critic's outputs for `prompts`, from the model being trained: on the trainer's colocated vLLM
        engine when it samples through one (it holds the weights of this step: GRPO synced them before
        generating), else with HF generate on the trainer's model."""
        import torch

        texts = [self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        sampling = self.critic.sampling
        generation = getattr(self.trainer, "vllm_generation", None) if getattr(self.trainer, "use_vllm", False) else None
        llm = getattr(generation, "llm", None)  # colocate mode; a server's engine is the main process's alone
        if llm is not None and not getattr(generation, "_llm_weights_sleeping", False):
            from vllm import SamplingParams

            ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
            params = SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens)
            outputs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
            return [o.outputs[0].text for o in outputs]
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model.generate(**batch, do_sample=sampling.temperature > 0, temperature=sampling.temperature or None,
                                 top_p=sampling.top_p, max_new_tokens=sampling.max_tokens,
                                 pad_token_id=self.tokenizer.pad_token_id)
        model.train(was_training)
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def __call__(self, prompts, completions, role, question, expert_answer, order, trainer_state=None,
                 log_metric=None, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        step = trainer_state.global_step if trainer_state is not None else 0
        labels: dict[str, list] = {"policy": [], "critic": []}
        out = [0.0] * len(texts)
        asked = [i for i, r in enumerate(role) if r == "policy"]
        orders = {i: order_for(self.seed, f"train-{step}-{i}") for i in asked}
        verdicts = self.judge([critic_prompt(question[i], orders[i], texts[i], expert_answer[i], self.critic.max_answer_chars)
                               for i in asked]) if asked else []
        for i, output in zip(asked, verdicts):
            label = winner(parse_label(output), orders[i])
            labels["policy"].append(label)
            out[i] = rewards(label, self.critic.tau_critic, self.critic.tau_policy)[1] or 0.0
        for i, r in enumerate(role):
            if r == "critic":
                label = winner(parse_label(texts[i]), order[i])
                labels["critic"].append(label)
                out[i] = rewards(label, self.critic.tau_critic, self.critic.tau_policy)[0] or 0.0
        if log_metric is not None:
            for name, got in labels.items():
                if got:
                    log_metric(f"raro/{name}_rows_expert_won", sum(g == "expert" for g in got) / len(got))
                    log_metric(f"raro/{name}_rows_policy_won", sum(g == "policy" for g in got) / len(got))
                    log_metric(f"raro/{name}_rows_tie", sum(g == "tie" for g in got) / len(got))
                    log_metric(f"raro/{name}_rows_unparseable", sum(g is None for g in got) / len(got))
        return out


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
