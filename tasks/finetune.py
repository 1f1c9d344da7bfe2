"""finetune: TRL trainers on the round's data -> a new checkpoint folder and its training metrics.

No hand-written training loop: `SFTTrainer` on the SFT selection (rejection-sampling fine-tuning,
loss on the completion only) and `DPOTrainer` on solution pairs. The prompt format is the one the
generate stage uses, so the policy is trained on exactly what it is later asked.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.progress import run_logger


class FinetuneConfig(BaseModel):
    method: Literal["sft", "dpo"] = Field("sft", description="sft on sft_examples, dpo on solution pairs")
    max_steps: int = Field(30, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=64)
    dpo_beta: float = Field(0.1, gt=0)
    seed: int = 0
    few_shot: bool = Field(True, description="train with the same few-shot prompt the generate stage uses")


def _training_args(method: str, config: FinetuneConfig, output_dir: Path):
    import torch
    from trl import DPOConfig, SFTConfig

    gpu = torch.cuda.is_available()
    common = dict(
        bf16=gpu, use_cpu=not gpu,  # TRL defaults to bf16, which CPUs here only emulate
        output_dir=str(output_dir), max_steps=config.max_steps, learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        logging_steps=1, save_strategy="no", report_to="none", seed=config.seed, max_length=config.max_length,
        disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant",
    )
    if method == "dpo":
        return DPOConfig(beta=config.dpo_beta, **common)
    return SFTConfig(completion_only_loss=True, **common)


@task(name="finetune", cache_policy=NO_CACHE, persist_result=False)
def finetune(model_path: str, data: pa.Table, config: FinetuneConfig, output_dir: Path) -> dict:
    """Train from `model_path` on `data` (sft_examples or pairs) and save the result in `output_dir`.

    Returns {"steps", "final_loss", "wall_seconds", "metrics": [{"step", "loss", "learning_rate", ...}]}.
    The folder is written under a staging name and renamed, so a crash leaves no half checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer, SFTTrainer

    from tasks.pairs import to_dpo_dataset, to_sft_dataset

    if data.num_rows == 0:
        raise ValueError(f"finetune ({config.method}): no training rows")
    log = run_logger()
    output_dir = Path(output_dir)
    staging = output_dir.parent / f".{output_dir.name}.staging"
    dataset = to_dpo_dataset(data, config.few_shot) if config.method == "dpo" else to_sft_dataset(data, config.few_shot)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    metrics: list[dict] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                metrics.append({"step": state.global_step, **{k: float(v) for k, v in logs.items()
                                                             if isinstance(v, (int, float))}})
                log.info(f"finetune {config.method}: step {state.global_step}/{config.max_steps} loss {logs['loss']:.4f}")

    trainer_cls = DPOTrainer if config.method == "dpo" else SFTTrainer
    trainer = trainer_cls(model=model, args=_training_args(config.method, config, staging / "trainer"),
                          train_dataset=dataset, processing_class=tokenizer, callbacks=[Record()])
    started = time.monotonic()
    result = trainer.train()
    wall = time.monotonic() - started
    trainer.model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    import shutil

    shutil.rmtree(staging / "trainer", ignore_errors=True)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.replace(output_dir)
    return {
        "steps": int(result.global_step),
        "final_loss": metrics[-1]["loss"] if metrics else float(result.training_loss),
        "wall_seconds": wall,
        "metrics": metrics,
    }
