"""The finetune section of the round config, the methods it may chain, and the stage's summary."""
from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, Field, field_validator

# policy methods, each a module of this package; `ppm` (the process preference model) is trained
# beside the policy when `train_ppm` is set, never chained
METHODS = ("sft", "dpo", "grpo", "traces", "raro")


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


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    rows = tables["checkpoints"].to_pylist() if "checkpoints" in tables else []
    if not rows:
        return ["- no checkpoint: nothing to train on; the policy carries over"]
    return [f"- **{c['checkpoint_id']}** ({c['method']}): {c['train_rows']} rows, {c['steps']} steps, "
            f"final loss {c['final_loss']:.4f}, {c['wall_seconds']:.0f} s" for c in rows]


def common_arguments(config: FinetuneConfig, output_dir) -> dict:
    """The TRL training arguments every method shares; each method's module adds its own."""
    import torch

    gpu = torch.cuda.is_available()
    return dict(
        bf16=gpu, use_cpu=not gpu,  # TRL defaults to bf16, which CPUs here only emulate
        output_dir=str(output_dir), max_steps=config.max_steps, learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        logging_steps=1, save_strategy="steps", save_steps=config.checkpoint_steps, save_total_limit=1,
        report_to="none", seed=config.seed,
        disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant",
    )
