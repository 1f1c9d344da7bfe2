"""The finetune section of the round config: the settings every method shares, one section per method
that has settings of its own (`dpo`, `grpo`, `svs`, `raro`, each declared in its method's module, as TRL
has one config per trainer), the methods it may chain, and the stage's summary."""
from __future__ import annotations

import importlib.util
import logging
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from evoforge.data.section import Section
from evoforge.tasks.finetune.dpo import DpoConfig
from evoforge.tasks.finetune.grpo import GrpoConfig
from evoforge.tasks.finetune.raro import RaroConfig
from evoforge.tasks.finetune.svs import SvsConfig

# the keys of the flat section before each method had its own: read as their new place (see _read_old_keys)
RENAMED = {"dpo_beta": ("dpo", "beta"), "grpo_generations": ("grpo", "generations"),
           "grpo_max_completion_tokens": ("grpo", "max_completion_tokens"), "grpo_temperature": ("grpo", "temperature"),
           "grpo_beta": ("grpo", "beta"), "grpo_problems": ("grpo", "problems")}
_said: set[str] = set()


def say_once(line: str) -> None:
    """A warning the `evoforge` logger gives once per process (a config is read many times in a round)."""
    if line not in _said:
        _said.add(line)
        logging.getLogger("evoforge").warning(line)


# policy methods, each a module of this package; `ppm` (the process preference model) is trained
# beside the policy when `train_ppm` is set, never chained
METHODS = ("sft", "dpo", "grpo", "traces", "raro", "svs")


class CollapseGuardConfig(Section):
    """Stop a method early when its policy collapses, judged on rows held out of its training data
    (tasks/finetune/guard.py): every `eval_steps` optimizer steps, and once before the first."""
    eval_steps: int = Field(10, ge=1, description="measure every N optimizer steps (and once before the first, as the baseline)")
    held_out_rows: int = Field(
        8, ge=0, description="rows of each method's training data held out of training and measured (0: guard off)")
    held_out_share: float = Field(
        0.25, gt=0, le=0.5, description="at most this share of a method's rows is held out; a method too small to spare "
                                        "one row trains on all of them, unguarded")
    entropy_floor: float | None = Field(
        None, gt=0, description="stop when the held-out entropy (mean negative log-probability of sampled tokens, "
                                "nats/token, as the evaluate stage defines it) falls below it; None: not measured")
    max_loss_rise: float | None = Field(
        0.5, gt=0, description="stop when the held-out loss (token NLL of the reference completion: sft/traces their "
                               "completion, dpo the chosen answer; grpo/raro have none) exceeds (1 + this) x its "
                               "lowest value so far; None: not measured")
    samples: int = Field(1, ge=1, le=64, description="entropy: completions sampled per held-out prompt")
    max_tokens: int = Field(48, ge=1, le=4096, description="entropy: new tokens per sampled completion")
    temperature: float = Field(1.0, gt=0, le=10, description="entropy: sampling temperature (the log-probabilities "
                                                              "are the model's own, at temperature 1)")

    @property
    def enabled(self) -> bool:
        return self.held_out_rows > 0 and (self.entropy_floor is not None or self.max_loss_rise is not None)


class LoraConfig(Section):
    """A LoRA adapter trained instead of every weight (PEFT's `LoraConfig`, handed to the TRL trainer)."""
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: int = Field(32, ge=1, description="scaling: the update is alpha / r x B A")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = Field(
        "all-linear", description="the layers that get an adapter: 'all-linear' (every linear layer but the output "
                                  "head, as QLoRA and open-r1 do) or module names such as [q_proj, v_proj]")
    merge: bool = Field(
        True, description="publish merged full weights (every engine loads them as any model); false: publish the "
                          "adapter alone, loaded on its base model (vLLM's LoRA support), and continued by later rounds")


class FinetuneConfig(Section):
    method: str = Field("sft", description="sft, dpo, grpo, traces or raro, or a chain such as sft+grpo run in that order")
    train_ppm: bool = Field(False, description="also train a process preference model on the round's step pairs")
    max_steps: int = Field(30, ge=1, description="optimizer steps per method")
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(4, ge=1, description="per device; for grpo, completions per step (a multiple of grpo.generations)")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=64)
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="method dpo's own settings")
    grpo: GrpoConfig = Field(default_factory=GrpoConfig, description="GRPO's own settings: grpo, and svs and raro, which train with it")
    svs: SvsConfig = Field(default_factory=SvsConfig, description="method svs: SvS's self-play inside GRPO training")
    raro: RaroConfig = Field(default_factory=RaroConfig, description="method raro: how its rows mix the two roles")
    checkpoint_steps: int = Field(10, ge=1, description="save trainer state every N steps, so a killed run resumes there")
    seed: int = 0
    few_shot: bool = Field(True, description="train with the same few-shot prompt the generate stage uses")
    guard: CollapseGuardConfig = Field(
        default_factory=CollapseGuardConfig,
        description="collapse guard: stop a method early on a held-out entropy floor or a rise of held-out loss")
    processes: int = Field(
        1, ge=1, description="training processes on this machine (one per GPU; on a CPU, DDP over gloo, one core "
                             "each), started with `accelerate launch`")
    launcher: Literal["accelerate", "ray"] = Field(
        "accelerate", description="accelerate: the processes on this machine (accelerate launch); ray: Ray Train's "
                                  "workers on the Ray cluster, across machines (tasks/finetune/ray_train.py)")
    ray_address: str | None = Field(
        None, description="launcher ray: the cluster ('auto', 'host:6379', 'ray://host:10001'); none: a local one")
    accelerate_config: str = Field(
        "ddp", description="the accelerate recipe: ddp, fsdp, zero2 or zero3 (deploy/accelerate/<name>.yaml), or the "
                           "path of an accelerate config file of your own")
    lora: LoraConfig | None = Field(None, description="train a LoRA adapter (absent: a full fine-tune)")
    trainer_args: dict[str, Any] = Field(
        default_factory=dict, description="any field of the method's TRL config (SFTConfig, DPOConfig, GRPOConfig, "
                                          "RewardConfig): lr_scheduler_type, warmup_ratio, gradient_checkpointing, bf16, "
                                          "optim, deepspeed, ...; a field no method of the chain has is an error")
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers (TRL's report_to): tensorboard (local event files under the run, the "
                    "default), mlflow, wandb, trackio (configured by their own environment variables), or [] for none")
    generation: Literal["hf", "vllm"] = Field(
        default_factory=lambda: "vllm" if importlib.util.find_spec("vllm") is not None else "hf",
        description="grpo and raro: sample completions with vLLM (the default where it is installed) or HF generate")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="generation vllm: an engine inside each training process (one machine), or a "
                                "`trl vllm-serve` server on GPUs apart from the trainer's (vllm_server_url)")
    vllm_server_url: str | None = Field(None, description="vllm_mode server: the server's base URL (http://host:8000)")
    sync_steps: int = Field(
        1, ge=1, description="generation vllm on a CPU: the engine takes the trained weights every N optimizer steps "
                             "(1: on-policy; N > 1 samples from weights up to N - 1 steps old, recorded as "
                             "vllm/staleness_steps)")

    @model_validator(mode="before")
    @classmethod
    def _read_old_keys(cls, data: Any) -> Any:
        """A config written before the methods had sections of their own (a run's saved config.yaml among
        them) reads as it always did: `dpo_beta` is `dpo.beta`, `grpo_generations` is `grpo.generations`, ..."""
        if not isinstance(data, dict) or not RENAMED.keys() & data.keys():
            return data
        data = dict(data)
        for old, (section, key) in RENAMED.items():
            if old in data:
                data[section] = {**(data.get(section) or {}), key: data.pop(old)}
                say_once(f"config: finetune.{old} is finetune.{section}.{key} now; read as that")
        return data

    @field_validator("method")
    @classmethod
    def _known_methods(cls, value: str) -> str:
        parts = value.split("+")
        unknown = [p for p in parts if p not in METHODS]
        if unknown or not value:
            raise ValueError(f"unknown finetune method {unknown or value!r}: use {', '.join(METHODS)} or a chain like sft+grpo")
        return value

    @model_validator(mode="after")
    def _server_has_an_address(self) -> "FinetuneConfig":
        if self.vllm_mode == "server" and self.generation == "vllm" and not self.vllm_server_url:
            raise ValueError("vllm_mode server needs vllm_server_url (the `trl vllm-serve` server, http://host:port)")
        return self

    @model_validator(mode="after")
    def _trainer_args_known(self) -> "FinetuneConfig":
        if self.trainer_args:  # the TRL configs are imported only when there is something to check
            from evoforge.tasks.finetune.trainer_args import check_trainer_args

            check_trainer_args(self, self.methods + (["ppm"] if self.train_ppm else []))
        return self

    @property
    def methods(self) -> list[str]:
        return self.method.split("+")


def summarize(tables: dict[str, pa.Table]) -> list[str]:
    rows = tables["checkpoints"].to_pylist() if "checkpoints" in tables else []
    if not rows:
        return ["- no checkpoint: nothing to train on; the policy carries over"]
    return [f"- **{c['checkpoint_id']}** ({c['method']}): {c['train_rows']} rows, {c['steps']} steps, "
            f"final loss {c['final_loss']:.4f}, {c['wall_seconds']:.0f} s"
            + (f" in {c['processes']} processes" if (c.get("processes") or 1) > 1 else "")
            + (f"; a LoRA adapter on {c['base_model_id']}" if c.get("adapter") else "")
            + (f"; stopped early by the collapse guard: {c['stopped_early']}" if c.get("stopped_early") else "")
            + (f"; dashboard: `tensorboard --logdir {c['tracking']}`" if c.get("tracking") else "")
            for c in rows]
