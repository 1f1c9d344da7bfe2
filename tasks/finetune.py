"""finetune: TRL trainers on the round's data -> a new checkpoint folder and its training metrics.

No hand-written training loop: `SFTTrainer` on the SFT selection (rejection-sampling fine-tuning,
loss on the completion only), `DPOTrainer` on solution pairs, `GRPOTrainer` on the learnable
pool plus kept variants with the verify stage's grader as the reward, and `GRPOTrainer` for RARO:
policy and critic roles of one model in one batch, rewarded by the model's own critic judgments
(no verifier). A round may chain methods
(`method: sft+grpo`): each starts from the previous one's weights. The prompt format is the one the
generate stage uses, so the policy is trained on exactly what it is later asked.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, field_validator

from tasks.progress import run_logger
from tasks.verify import VerifyConfig

if TYPE_CHECKING:
    from tasks.critic import CriticConfig

METHODS = ("sft", "dpo", "grpo", "traces", "raro")
# which lake table each method trains on; traces: SFT on the MCTS stage's best step-by-step solutions;
# raro: problems with expert answers (policy role) and judged comparisons (critic role)
METHOD_DATA = {"sft": "sft_examples", "dpo": "pairs", "grpo": "prompts", "traces": "traces", "raro": "judgments"}


class FinetuneConfig(BaseModel):
    method: str = Field("sft", description="sft, dpo, grpo, traces or raro, or a chain such as sft+grpo run in that order")
    train_ppm: bool = Field(False, description="also train a process preference model on the round's step pairs")
    max_steps: int = Field(30, ge=1, description="optimizer steps per method")
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(4, ge=1, description="per device; for grpo, completions per step (a multiple of grpo_generations)")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=64)
    dpo_beta: float = Field(0.1, gt=0)
    grpo_generations: int = Field(4, ge=2, description="completions per prompt whose rewards form one GRPO group")
    grpo_max_completion_tokens: int = Field(256, ge=8)
    grpo_temperature: float = Field(1.0, gt=0)
    grpo_beta: float = Field(0.0, ge=0, description="KL weight against the starting policy (0: no reference model)")
    grpo_problems: Literal["learnable", "all"] = Field(
        "learnable", description="grpo: the round's learnable problems (SvS) or every problem with a reference answer")
    checkpoint_steps: int = Field(10, ge=1, description="save trainer state every N steps, so a killed run resumes there")
    seed: int = 0
    few_shot: bool = Field(True, description="train with the same few-shot prompt the generate stage uses")

    @field_validator("method")
    @classmethod
    def _known_methods(cls, value: str) -> str:
        parts = value.split("+")
        unknown = [p for p in parts if p not in METHODS]
        if unknown or not value:
            raise ValueError(f"unknown finetune method {unknown or value!r}: use {', '.join(METHODS)} or a chain like sft+grpo")
        return value

    @property
    def methods(self) -> list[str]:
        return self.method.split("+")


def _training_args(method: str, config: FinetuneConfig, output_dir: Path):
    import torch
    from trl import DPOConfig, GRPOConfig, SFTConfig

    gpu = torch.cuda.is_available()
    common = dict(
        bf16=gpu, use_cpu=not gpu,  # TRL defaults to bf16, which CPUs here only emulate
        output_dir=str(output_dir), max_steps=config.max_steps, learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        logging_steps=1, save_strategy="steps", save_steps=config.checkpoint_steps, save_total_limit=1,
        report_to="none", seed=config.seed,
        disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant",
    )
    if method == "dpo":
        return DPOConfig(beta=config.dpo_beta, max_length=config.max_length, **common)
    if method == "ppm":
        from trl import RewardConfig

        return RewardConfig(max_length=config.max_length, **common)
    if method in ("grpo", "raro"):
        if (config.batch_size * config.gradient_accumulation_steps) % config.grpo_generations:
            raise ValueError(f"finetune grpo: batch_size x gradient_accumulation_steps "
                             f"({config.batch_size} x {config.gradient_accumulation_steps}) must be a multiple of "
                             f"grpo_generations ({config.grpo_generations})")
        return GRPOConfig(num_generations=config.grpo_generations, max_completion_length=config.grpo_max_completion_tokens,
                          temperature=config.grpo_temperature, beta=config.grpo_beta, **common)
    return SFTConfig(completion_only_loss=True, max_length=config.max_length, **common)


class VerifierReward:
    """GRPO reward: 1.0 when the completion's last boxed answer matches the problem's answer, else 0.0.

    Graded by the verify stage's own process pool, so a reward means exactly what a `correct`
    verdict means, and a pathological answer cannot hang training (the pool kills it at its deadline).
    """

    __name__ = "verifier_correct"  # TRL logs each reward function under its name

    def __init__(self, pool):
        self.pool = pool

    def __call__(self, prompts, completions, answer, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        results = self.pool.run([("grade", gold, text) for gold, text in zip(answer, texts)])
        return [1.0 if r[0] == "correct" else 0.0 for r in results]


class RaroReward:
    """RARO's reward for both roles of one model (arXiv 2511.21667), computed online.

    A policy completion is judged by the model being trained, in its critic role, against the
    expert's answer in a fresh random order: policy reward = 1[critic picks it] + tau_policy*1[tie].
    A critic completion is parsed for its last label: critic reward = 1[it picks the expert] +
    tau_critic*1[tie]. A judgment with no label rewards neither role (0). Per-step rates go to the
    trainer's log as raro/*.
    """

    __name__ = "raro"

    def __init__(self, tokenizer, critic: "CriticConfig", seed: int = 0):
        import copy

        self.tokenizer = copy.copy(tokenizer)
        self.tokenizer.padding_side = "left"  # generation continues each prompt from its end
        self.critic, self.seed = critic, seed
        self.trainer = None  # set once the trainer exists: the critic is the model being trained

    def judge(self, prompts: list) -> list[str]:
        import torch

        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        texts = [self.tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sampling = self.critic.sampling
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
        from tasks.critic import critic_prompt, order_for, parse_label, rewards, winner

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


def _dataset(method: str, data: pa.Table, config: FinetuneConfig, critic: "CriticConfig | None"):
    from tasks.critic import CriticConfig, to_raro_dataset
    from tasks.pairs import to_dpo_dataset, to_grpo_dataset, to_sft_dataset, to_trace_dataset

    few_shot = config.few_shot
    if method == "raro":
        return to_raro_dataset(data, critic or CriticConfig(), few_shot)
    if method == "traces":
        return to_trace_dataset(data)
    return {"sft": to_sft_dataset, "dpo": to_dpo_dataset, "grpo": to_grpo_dataset}[method](data, few_shot)


@task(name="finetune", cache_policy=NO_CACHE, persist_result=False)
def finetune(model_path: str, data: dict[str, pa.Table], config: FinetuneConfig, output_dir: Path,
             verify: VerifyConfig | None = None, resume: bool = True, critic: "CriticConfig | None" = None) -> dict:
    """Train from `model_path` with each method of `config.method` in turn and save the result in `output_dir`.

    `data` maps each method to its rows: sft -> sft_examples, dpo -> pairs, grpo -> prompts
    (problem_id, question, answer), raro -> tasks.critic.RARO_ROWS (`critic` holds its taus and the
    critic's sampling). Returns {"steps", "final_loss", "wall_seconds", "metrics":
    [{"step", "method", "loss", ...}]}; steps count across the chain. The folder is written under
    a staging name and renamed, so a crash leaves no half checkpoint. With `resume`, a run killed
    mid-training continues from the staging folder: finished methods are not trained again, and
    the running one restarts from its last saved trainer state (every `checkpoint_steps`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer

    for method in config.methods:
        rows = data.get(method)
        if rows is None or rows.num_rows == 0:
            raise ValueError(f"finetune ({method}): no training rows in {METHOD_DATA[method]}")
    log = run_logger()
    output_dir = Path(output_dir)
    staging = output_dir.parent / f".{output_dir.name}.staging"
    if not resume:
        shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    metrics: list[dict] = []
    steps_before = 0
    started = time.monotonic()
    for index, method in enumerate(config.methods):
        phase = f"{index}-{method}"
        finished = staging / f"finished-{phase}"
        if (finished / "metrics.json").exists():  # trained before a crash: take its weights, do not train again
            model = AutoModelForCausalLM.from_pretrained(finished, dtype=dtype)
            phase_metrics = json.loads((finished / "metrics.json").read_text())
            metrics += phase_metrics
            steps_before = max([steps_before, *(m["step"] for m in phase_metrics)])
            log.info(f"finetune {method}: finished before an interruption; resuming after it")
            continue

        class Log(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    extra = f" reward {logs['reward']:.3f}" if "reward" in logs else ""
                    log.info(f"finetune {method}: step {state.global_step}/{config.max_steps} loss {logs['loss']:.4f}{extra}")

        trainer_dir = staging / f"trainer-{phase}"
        saved = sorted(trainer_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if saved:
            log.info(f"finetune {method}: resuming from the trainer state saved at {saved[-1].name}")
        dataset = _dataset(method, data[method], config, critic)
        kwargs = dict(model=model, args=_training_args(method, config, trainer_dir),
                      train_dataset=dataset, processing_class=tokenizer, callbacks=[Log()])
        if method == "grpo":
            with (verify or VerifyConfig()).pool() as pool:
                trainer = GRPOTrainer(reward_funcs=[VerifierReward(pool)], **kwargs)
                result = trainer.train(resume_from_checkpoint=str(saved[-1]) if saved else None)
        elif method == "raro":
            from tasks.critic import CriticConfig

            reward = RaroReward(tokenizer, critic or CriticConfig(), config.seed)
            trainer = GRPOTrainer(reward_funcs=[reward], **kwargs)
            reward.trainer = trainer
            result = trainer.train(resume_from_checkpoint=str(saved[-1]) if saved else None)
        else:
            trainer = (DPOTrainer if method == "dpo" else SFTTrainer)(**kwargs)  # traces: SFT too
            result = trainer.train(resume_from_checkpoint=str(saved[-1]) if saved else None)
        model = trainer.model
        # from the trainer's own history, which a resumed trainer restores, so no step's log is lost
        phase_metrics = [
            {"step": steps_before + int(entry["step"]), "method": method,
             **{k: float(v) for k, v in entry.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}}
            for entry in trainer.state.log_history if "loss" in entry
        ]
        model.save_pretrained(finished / "weights-staging", safe_serialization=True)
        for path in (finished / "weights-staging").iterdir():
            path.replace(finished / path.name)
        (finished / "metrics.json").write_text(json.dumps(phase_metrics))  # written last: marks the phase done
        metrics += phase_metrics
        steps_before += int(result.global_step)
        shutil.rmtree(trainer_dir, ignore_errors=True)
    wall = time.monotonic() - started
    for path in staging.glob("*"):  # only the final weights and tokenizer go into the checkpoint
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.replace(output_dir)
    return {
        "steps": steps_before,
        "final_loss": metrics[-1]["loss"] if metrics else float("nan"),
        "wall_seconds": wall,
        "metrics": metrics,
    }


@task(name="train_ppm", cache_policy=NO_CACHE, persist_result=False)
def train_ppm(model_path: str, step_pairs: pa.Table, config: FinetuneConfig, output_dir: Path) -> dict:
    """The process preference model (rStar-Math): the policy with a scalar head, trained by TRL's
    RewardTrainer on step pairs with the pairwise loss -log sigmoid(r_chosen - r_rejected).
    Returns {"steps", "final_loss", "wall_seconds", "metrics"}; the folder is written atomically."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardTrainer

    from tasks.pairs import to_ppm_dataset

    if step_pairs.num_rows == 0:
        raise ValueError("train_ppm: no step pairs")
    output_dir = Path(output_dir)
    staging = output_dir.parent / f".{output_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = _training_args("ppm", config, staging / "trainer")
    trainer = RewardTrainer(model=model, args=args, train_dataset=to_ppm_dataset(step_pairs), processing_class=tokenizer)
    started = time.monotonic()
    result = trainer.train()
    wall = time.monotonic() - started
    metrics = [{"step": int(e["step"]), "method": "ppm",
                **{k: float(v) for k, v in e.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}}
               for e in trainer.state.log_history if "loss" in e]
    shutil.rmtree(staging / "trainer", ignore_errors=True)
    trainer.model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.replace(output_dir)
    return {"steps": int(result.global_step), "final_loss": metrics[-1]["loss"] if metrics else float("nan"),
            "wall_seconds": wall, "metrics": metrics}
