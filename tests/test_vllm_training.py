"""GRPO and RARO sample through vLLM in the training process (`finetune.generation: vllm`) on this CPU: the
engine takes the trained weights through vLLM's reload path (models/vllm_sync.py), and after a sync its greedy
completions are HF generate's from the trainer's own weights, token for token: the sync really reached it."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest

from evoforge.tasks.finetune.config import FinetuneConfig

pytestmark = pytest.mark.model


def _problems(n: int = 4) -> pa.Table:
    return pa.Table.from_pylist([dict(problem_id=f"p{i}", question=f"What is {i} + 4?", answer=str(i + 4)) for i in range(n)])


def distinct_characters(completions, **_) -> list[float]:
    """A reward that varies within a group even for a random model (the verifier's is 0 for all its answers, and
    GRPO then has no gradient)."""
    return [float(len(set(c[-1]["content"]))) for c in completions]


def _grpo_trainer(tiny_model, scratch, config):
    from evoforge.tasks.finetune import adapters, grpo
    from evoforge.tasks.finetune.vllm_colocate import build_grpo_trainer

    tokenizer = adapters.load_tokenizer(str(tiny_model))
    model = adapters.causal_lm(str(tiny_model), None, tokenizer)
    kwargs = dict(model=model, args=grpo.arguments(config, scratch / "trainer"), train_dataset=grpo.dataset(_problems(), config, None),
                  processing_class=tokenizer)
    return build_grpo_trainer(kwargs, config.sync_steps, reward_funcs=[distinct_characters]), tokenizer


def _greedy(trainer, tokenizer, prompts: list[str], max_tokens: int = 16) -> tuple[list[list[int]], list[list[int]]]:
    """(vLLM's, HF generate's) greedy token ids for the chat prompts, from the trainer's engine and its model."""
    import torch
    from vllm import SamplingParams

    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"] for p in prompts]
    outputs = trainer.vllm_generation.llm.generate([{"prompt_token_ids": list(i)} for i in ids],
                                                   SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    engine = [list(o.outputs[0].token_ids) for o in outputs]
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    local = []
    with torch.no_grad():
        for prompt in ids:
            out = model.generate(torch.tensor([list(prompt)]), do_sample=False, max_new_tokens=max_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            generated = out[0, len(prompt):].tolist()
            eos = tokenizer.eos_token_id
            local.append(generated[:generated.index(eos) + 1] if eos in generated else generated)
    return engine, local


def test_after_a_sync_the_engine_completes_exactly_as_the_trained_weights_do(tiny_model, scratch):
    prompts = ["What is 2 + 2?", "Name a colour.", "Count to five, then say something about the sea and the sky " * 8]
    config = FinetuneConfig(method="grpo", max_steps=3, batch_size=8, grpo={"generations": 4, "max_completion_tokens": 16},
                            learning_rate=3e-2, few_shot=False, generation="vllm", report_to=[], guard={"held_out_rows": 0})
    trainer, tokenizer = _grpo_trainer(tiny_model, scratch, config)
    assert trainer.use_vllm and type(trainer.vllm_generation).__name__ == "CpuVLLMGeneration"
    trainer.vllm_generation.sync_weights(force=True)
    before, hf_before = _greedy(trainer, tokenizer, prompts)
    assert before == hf_before  # the engine starts from the checkpoint's weights
    trainer.train()
    trainer.vllm_generation.sync_weights(force=True)
    after, hf_after = _greedy(trainer, tokenizer, prompts)
    assert after == hf_after  # token for token, the long prompt too (no stale prefix cache)
    assert after != before  # training changed the weights, and the engine has the new ones
    # RARO's critic judges on the same engine: greedy, its judgments are the trained weights' own
    from evoforge.tasks.critic import CriticConfig
    from evoforge.tasks.finetune.raro import RaroReward

    reward = RaroReward(tokenizer, CriticConfig(sampling={"n": 1, "temperature": 0.0, "max_tokens": 12}))
    reward.trainer = trainer
    judged = [[{"role": "user", "content": p}] for p in prompts]
    on_engine = reward.judge(judged)
    trainer.use_vllm = False  # the fallback: HF generate on the trainer's model
    assert reward.judge(judged) == on_engine
    trainer.use_vllm = True
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(entry["vllm/staleness_steps"] == 0 for entry in logged)
    assert all(entry["vllm/sync_seconds"] > 0 for entry in logged)


def test_sync_steps_samples_from_weights_at_most_that_many_steps_old(tiny_model, scratch):
    config = FinetuneConfig(method="grpo", max_steps=4, batch_size=8, grpo={"generations": 4, "max_completion_tokens": 8},
                            learning_rate=1e-3, few_shot=False, generation="vllm", sync_steps=2, report_to=[],
                            guard={"held_out_rows": 0})
    trainer, _ = _grpo_trainer(tiny_model, scratch, config)
    trainer.train()
    staleness = [entry["vllm/staleness_steps"] for entry in trainer.state.log_history if "loss" in entry]
    assert staleness == [0.0, 1.0, 0.0, 1.0]  # pushed at steps 0 and 2, sampled one step stale at 1 and 3


def test_grpo_and_raro_train_through_vllm_in_the_finetune_processes(tiny_model, scratch):
    from evoforge.tasks.critic import CriticConfig
    from evoforge.tasks.finetune.raro import RaroConfig, build_rows
    from evoforge.tasks.finetune.launch import train_policy
    from evoforge.tasks.finetune.training import TrainingContext

    solution = lambda i: f"{i} + 4 = {i + 4}. The answer is \\boxed{{{i + 4}}}."  # noqa: E731
    problems = pa.Table.from_pylist([dict(problem_id=f"p{i}", question=f"What is {i} + 4?", answer=str(i + 4),
                                          expert_answer=solution(i)) for i in range(4)])
    compared = pa.Table.from_pylist([dict(problem_id=f"p{i}", question=f"What is {i} + 4?", expert_answer=solution(i),
                                          policy_answer="\\boxed{1}", order="policy_first") for i in range(4)])
    critic = CriticConfig(sampling={"n": 1, "max_tokens": 8, "temperature": 1.0})
    config = FinetuneConfig(method="grpo+raro", max_steps=2, batch_size=8, grpo={"generations": 4, "max_completion_tokens": 8},
                            learning_rate=1e-3, few_shot=False, generation="vllm", report_to=[], guard={"held_out_rows": 0})
    data = {"grpo": problems.select(["problem_id", "question", "answer"]),
            "raro": build_rows(problems, compared, compared.slice(0, 0), RaroConfig())}
    result = train_policy(str(tiny_model), data, config, scratch / "ckpt", TrainingContext(critic=critic))
    assert result["steps"] == 4 and all(math.isfinite(m["loss"]) for m in result["metrics"] if "loss" in m)
    for step in result["metrics"]:
        assert step["vllm/staleness_steps"] == 0 and step["vllm/sync_seconds"] > 0  # sampled on-policy through vLLM
    raro = [m for m in result["metrics"] if m["method"] == "raro"]
    assert len(raro) == 2 and all("rewards/raro/mean" in m for m in raro)
    assert {"raro/policy_rows_unparseable", "raro/critic_rows_unparseable"} <= set().union(*raro)  # both roles judged
    assert (scratch / "ckpt" / "model.safetensors").exists()
