"""RARO (arXiv 2511.21667): GRPO on both roles of one model in one batch, the policy answering and
the critic judging, rewarded by the model's own critic (`RaroReward`); no verifier.

Rows (`training_rows`): every problem with an expert answer asks the policy; the critic role gets this
round's judged comparisons (the critic stage's `judgments`, fresh) and, from the replay buffer, the
latest `replay_size` of earlier rounds', half and half. The critic's prompt, label parsing and rewards
are the critic stage's own (tasks/critic.py), so training judges exactly as the stage does.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from evoforge.data.section import Section
from evoforge.tasks.arrow_datasets import arrow_dataset, messages_column
from evoforge.tasks.critic import CriticConfig, critic_prompt, order_for, parse_label, rewards, winner
from evoforge.tasks.finetune import grpo

if TYPE_CHECKING:
    from evoforge.tasks.finetune.config import FinetuneConfig
    from evoforge.tasks.finetune.rows import RoundInputs

TABLE = "judgments"


class RaroConfig(Section):
    """`finetune.raro`: how RARO's rows mix the two roles. The critic's sampling and tie rewards are the
    critic stage's (`critic:`), which judges the same way."""
    replay_size: int = Field(512, ge=0, description="past policy answers kept for the critic role")
    critic_share: float = Field(0.5, ge=0, le=1, description="share of the rows that train the critic role")


def compared_answers(judgments: pa.Table, rollouts: pa.Table, problems: pa.Table) -> pa.Table:
    """The comparisons the critic judged: problem_id, question, expert_answer, policy_answer, order, round,
    newest round first. `judgments` and `rollouts` of the same rounds; `problems`: a pool holding them."""
    judgments = judgments.select(["problem_id", "rollout_id", "order", "round"])
    # a policy that did not change between rounds writes the same rollout ids again: join within a round
    joined = judgments.join(rollouts.select(["rollout_id", "round", "text"]), ["rollout_id", "round"]).join(
        problems.select(["problem_id", "question", "expert_answer"]), "problem_id")
    joined = joined.rename_columns(["policy_answer" if name == "text" else name for name in joined.column_names])
    return joined.sort_by([("round", "descending"), ("rollout_id", "ascending")])


def training_rows(inputs: RoundInputs, config: FinetuneConfig) -> pa.Table:
    """Both roles' rows of this round (see the module's docstring), shuffled with `seed + round`."""
    problems = inputs.problems_with_experts()
    fresh_judgments = inputs.round_table("judgments", "critic")
    if fresh_judgments.num_rows == 0:
        raise ValueError(f"finetune (raro): round {inputs.round} has no judgments: the critic stage labelled nothing, "
                         f"so the critic role has no rows")
    judgments, rollouts = inputs.every_round("judgments", "critic"), inputs.every_round("rollouts", "generate")
    in_rounds = lambda table, rounds: table.filter(pc.is_in(table["round"], pa.array(rounds, pa.int32())))  # noqa: E731
    fresh = compared_answers(in_rounds(judgments, [inputs.round]), in_rounds(rollouts, [inputs.round]), problems)
    earlier = list(range(inputs.round))
    replay = compared_answers(in_rounds(judgments, earlier), in_rounds(rollouts, earlier), problems)
    return build_rows(problems, fresh, replay.slice(0, config.raro.replay_size), config.raro,
                      seed=config.seed + inputs.round)


RARO_ROWS = pa.schema([
    ("role", pa.string()),            # 'policy' (answer the question) or 'critic' (judge two answers)
    ("problem_id", pa.string()),
    ("question", pa.string()),
    ("expert_answer", pa.string()),
    ("policy_answer", pa.string()),   # critic rows: the policy answer it is shown
    ("order", pa.string()),           # critic rows: which answer comes first
    ("replayed", pa.bool_()),         # critic rows: taken from the replay buffer of earlier rounds
])


def build_rows(problems: pa.Table, fresh: pa.Table, replay: pa.Table, config: RaroConfig, seed: int = 0) -> pa.Table:
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


def arguments(config: FinetuneConfig, output_dir, run_name: str | None = None):
    """GRPO's arguments (RARO trains both roles with GRPO), checked against RARO's own trainer_args."""
    return grpo.arguments(config, output_dir, run_name, method="raro")


def dataset(rows: pa.Table, config: FinetuneConfig, context):
    """TRL conversational prompts for both roles: a policy row is asked the question exactly as the
    generate stage asks it; a critic row is shown its two answers in the recorded order. `role`,
    `question`, `expert_answer` and `order` travel along to the reward.

    Built in Arrow (tasks/arrow_datasets.py `messages_column`): both roles' prompts for every row, one picked
    by `role`. The critic's is tasks/critic.py `critic_prompt` column-wise: each answer cut to
    `max_answer_chars` characters, put first or second by `order` (`arrange`), in `critic_messages`."""
    from evoforge.models.prompts import critic_messages, solve_messages

    limit = context.critic.max_answer_chars  # in characters, as critic_prompt's answer[:limit]
    policy_answer = pc.utf8_slice_codeunits(rows["policy_answer"], 0, limit)
    expert_answer = pc.utf8_slice_codeunits(rows["expert_answer"], 0, limit)
    policy_first = pc.fill_null(pc.equal(rows["order"], "policy_first"), False)
    critic = messages_column(critic_messages, question=rows["question"],
                             answer_1=pc.if_else(policy_first, policy_answer, expert_answer),
                             answer_2=pc.if_else(policy_first, expert_answer, policy_answer))
    policy = messages_column(lambda question: solve_messages(question, config.few_shot), question=rows["question"])
    return arrow_dataset(pa.table({
        "prompt": pc.if_else(pc.fill_null(pc.equal(rows["role"], "policy"), False), policy, critic),
        "role": rows["role"], "question": rows["question"], "expert_answer": rows["expert_answer"],
        "order": pc.fill_null(rows["order"], ""),
    }))


@contextmanager
def trainer(trainer_kwargs: dict, context, config: FinetuneConfig):
    from evoforge.tasks.finetune.vllm_colocate import build_grpo_trainer

    reward = RaroReward(trainer_kwargs["processing_class"], context.critic, trainer_kwargs["args"].seed)
    trained = build_grpo_trainer(trainer_kwargs, config.sync_steps, reward_funcs=[reward])
    reward.trainer = trained  # the critic is the model being trained, and judges on its engine
    yield trained
