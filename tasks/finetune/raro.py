"""RARO (arXiv 2511.21667): GRPO on both roles of one model in one batch, the policy answering and
the critic judging, rewarded by the model's own critic (tasks/critic.py: `RaroReward`); no verifier.
Rows: tasks/critic.py `RARO_ROWS` (problems with expert answers, and judged comparisons)."""
from __future__ import annotations

from contextlib import contextmanager

import pyarrow as pa

from evoforge.tasks.finetune import grpo
from evoforge.tasks.finetune.config import FinetuneConfig

TABLE = "judgments"


def arguments(config: FinetuneConfig, output_dir, run_name: str | None = None):
    """GRPO's arguments (RARO trains both roles with GRPO), checked against RARO's own trainer_args."""
    return grpo.arguments(config, output_dir, run_name, method="raro")


def dataset(rows: pa.Table, config: FinetuneConfig, context):
    """TRL conversational prompts for both roles: a policy row is asked the question exactly as the
    generate stage asks it; a critic row is shown its two answers in the recorded order. `role`,
    `question`, `expert_answer` and `order` travel along to the reward."""
    import datasets

    from evoforge.models.prompts import solve_messages
    from evoforge.tasks.critic import critic_prompt

    critic = context.critic
    return datasets.Dataset.from_list([
        {"prompt": solve_messages(r["question"], config.few_shot) if r["role"] == "policy" else
         critic_prompt(r["question"], r["order"], r["policy_answer"], r["expert_answer"], critic.max_answer_chars),
         "role": r["role"], "question": r["question"], "expert_answer": r["expert_answer"], "order": r["order"] or ""}
        for r in rows.to_pylist()
    ])


@contextmanager
def trainer(trainer_kwargs: dict, context, config: FinetuneConfig):
    from evoforge.tasks.critic import RaroReward
    from evoforge.tasks.finetune.vllm_colocate import build_grpo_trainer

    reward = RaroReward(trainer_kwargs["processing_class"], context.critic, trainer_kwargs["args"].seed)
    trained = build_grpo_trainer(trainer_kwargs, config.sync_steps, reward_funcs=[reward])
    reward.trainer = trained  # the critic is the model being trained, and judges on its engine
    yield trained
