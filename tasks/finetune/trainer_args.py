"""Each method's TRL training arguments: what evoforge sets, what the user passes through
`finetune.trainer_args`, and the check that a key means something before any work starts.

evoforge owns the fields that decide where things go and what it records (the staging folder, the
seed, the steps in `train_metrics`, the tracker's run name): those are set by a config field of their
own and refused in `trainer_args` with one line naming it. Every other field of the method's TRL
config passes through as the user wrote it (`lr_scheduler_type`, `warmup_ratio`,
`gradient_checkpointing`, `bf16`, `optim`, `deepspeed`, `vllm_gpu_memory_utilization`, ...).
"""
from __future__ import annotations

import difflib
import importlib
import os
import typing

# the TRL config class of each method; raro trains with GRPO, traces with SFT, the PPM is a reward model
CONFIG_CLASSES = {"sft": "SFTConfig", "traces": "SFTConfig", "dpo": "DPOConfig", "grpo": "GRPOConfig",
                  "raro": "GRPOConfig", "svs": "GRPOConfig", "ppm": "RewardConfig"}

# fields evoforge sets, and where a user sets them instead
OWNED = {
    "output_dir": "evoforge (the checkpoint's staging folder)",
    "overwrite_output_dir": "evoforge (the checkpoint's staging folder)",
    "resume_from_checkpoint": "evoforge (a rerun resumes from the trainer's last saved state)",
    "run_name": "evoforge (the tracker run is named by the checkpoint id)",
    "logging_dir": "evoforge (tracker files go under the run: runs/<run>/tracking/<checkpoint>)",
    "report_to": "finetune.report_to",
    "logging_steps": "evoforge (every step is recorded in train_metrics)",
    "logging_strategy": "evoforge (every step is recorded in train_metrics)",
    "disable_tqdm": "evoforge (the terminal shows evoforge's progress)",
    "max_steps": "finetune.max_steps",
    "num_train_epochs": "finetune.max_steps",
    "learning_rate": "finetune.learning_rate",
    "per_device_train_batch_size": "finetune.batch_size",
    "gradient_accumulation_steps": "finetune.gradient_accumulation_steps",
    "seed": "finetune.seed",
    "save_steps": "finetune.checkpoint_steps",
    "save_strategy": "finetune.checkpoint_steps",
    "save_total_limit": "finetune.checkpoint_steps",
    "max_length": "finetune.max_length",
    "beta": "finetune.dpo.beta (dpo) or finetune.grpo.beta (grpo, raro, svs)",
    "num_generations": "finetune.grpo.generations",
    "max_completion_length": "finetune.grpo.max_completion_tokens",
    "temperature": "finetune.grpo.temperature",
    "use_vllm": "finetune.generation",
    "vllm_mode": "finetune.vllm_mode",
    "vllm_server_base_url": "finetune.vllm_server_url",
    "use_cpu": "evoforge (from the machine: CPU where no GPU answers)",
    "ddp_backend": "finetune.processes (gloo on a CPU, NCCL on GPUs)",
}


def config_class(method: str):
    import trl

    return getattr(trl, CONFIG_CLASSES[method])


def _field_types(cls) -> dict[str, object]:
    import dataclasses

    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, typing.Any) for f in dataclasses.fields(cls) if f.init}


def check_trainer_args(config, methods: list[str]) -> None:
    """`config`: the finetune section (config.py's FinetuneConfig, which calls this as it validates).
    Raise ValueError (one line) for a key evoforge owns, a key no method of the chain knows (naming the
    closest valid fields), a value of the wrong type, or one the method's TRL config refuses when built."""
    from pydantic import TypeAdapter, ValidationError

    trainer_args = config.trainer_args
    classes = {method: config_class(method) for method in dict.fromkeys(methods)}
    fields = {method: _field_types(cls) for method, cls in classes.items()}
    known = sorted(set().union(*fields.values()) - set(OWNED))
    for key, value in trainer_args.items():
        if key in OWNED:
            raise ValueError(f"finetune.trainer_args.{key}: evoforge sets it; set it with {OWNED[key]}")
        owners = [m for m in fields if key in fields[m]]
        if not owners:
            names = ", ".join(sorted({cls.__name__ for cls in classes.values()}))
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else "see the TRL docs for its fields"
            raise ValueError(f"finetune.trainer_args.{key}: not a field of {names}; {hint}")
        wanted = fields[owners[0]][key]
        try:
            TypeAdapter(wanted).validate_python(value)
        except ValidationError as err:
            problem = err.errors()[0]["msg"]
            raise ValueError(f"finetune.trainer_args.{key}: {value!r} does not fit {_type_name(wanted)} ({problem})") from None
        except Exception:  # a type pydantic cannot check (a callable, a class): TRL checks it when it builds the config
            pass
    for method, cls in classes.items():  # the values themselves, as TRL checks them (a scheduler's name, an optimizer's)
        try:
            importlib.import_module(f"evoforge.tasks.finetune.{method}").arguments(config, "unused-output-dir")
        except (ValueError, TypeError) as err:
            raise ValueError(f"finetune.trainer_args: {cls.__name__} refuses them: {str(err).splitlines()[0]}") from None


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def build_arguments(method: str, config, output_dir, run_name: str | None = None, **method_args):
    """The method's TRL config: evoforge's settings, the method's own (`method_args`), then the user's
    `trainer_args` that this method's config has (a chain's fields go to the methods that know them)."""
    import torch

    cls = config_class(method)
    gpu = torch.cuda.is_available()
    args = dict(
        bf16=gpu, use_cpu=not gpu,  # TRL defaults to bf16, which CPUs here only emulate
        output_dir=str(output_dir), max_steps=config.max_steps, learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        logging_steps=1, save_strategy="steps", save_steps=config.checkpoint_steps, save_total_limit=1,
        report_to=list(config.report_to) or "none", run_name=run_name, seed=config.seed,
        disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant",
    )
    if distributed() and not gpu:
        args["ddp_backend"] = "gloo"  # only with WORLD_SIZE set: one process with gloo fails to start
    args.update(method_args)
    own = _field_types(cls)
    args.update({key: value for key, value in config.trainer_args.items() if key in own})
    return cls(**args)
