"""finetune: TRL trainers on the round's data -> a new checkpoint folder and its training metrics.

No hand-written training loop: `SFTTrainer` on the SFT selection (rejection-sampling fine-tuning,
loss on the completion only), `DPOTrainer` on solution pairs, and `GRPOTrainer` on the learnable
pool plus kept variants with the verify stage's grader as the reward. A round may chain methods
(`method: sft+grpo`): each starts from the previous one's weights. The prompt format is the one the
generate stage uses, so the policy is trained on exactly what it is later asked.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, field_validator

from tasks.progress import run_logger
from tasks.verify import VerifyConfig

METHODS = ("sft", "dpo", "grpo", "traces")
# which lake table each method trains on; traces: SFT on the MCTS stage's best step-by-step solutions
METHOD_DATA = {"sft": "sft_examples", "dpo": "pairs", "grpo": "prompts", "traces": "traces"}


class FinetuneConfig(BaseModel):
    method: str = Field("sft", description="sft, dpo, grpo or traces, or a chain such as sft+grpo run in that order")
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
    if method == "grpo":
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


def _dataset(method: str, data: pa.Table, few_shot: bool):
    from tasks.pairs import to_dpo_dataset, to_grpo_dataset, to_sft_dataset, to_trace_dataset

    if method == "traces":
        return to_trace_dataset(data)
    return {"sft": to_sft_dataset, "dpo": to_dpo_dataset, "grpo": to_grpo_dataset}[method](data, few_shot)


@task(name="finetune", cache_policy=NO_CACHE, persist_result=False)
def finetune(model_path: str, data: dict[str, pa.Table], config: FinetuneConfig, output_dir: Path,
             verify: VerifyConfig | None = None, resume: bool = True) -> dict:
    """Train from `model_path` with each method of `config.method` in turn and save the result in `output_dir`.

    `data` maps each method to its rows: sft -> sft_examples, dpo -> pairs, grpo -> prompts
    (problem_id, question, answer). Returns {"steps", "final_loss", "wall_seconds", "metrics":
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
        dataset = _dataset(method, data[method], config.few_shot)
        kwargs = dict(model=model, args=_training_args(method, config, trainer_dir),
                      train_dataset=dataset, processing_class=tokenizer, callbacks=[Log()])
        if method == "grpo":
            with (verify or VerifyConfig()).pool() as pool:
                trainer = GRPOTrainer(reward_funcs=[VerifierReward(pool)], **kwargs)
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
