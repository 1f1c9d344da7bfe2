"""GRPO's log-probabilities on a CPU scored at the completion tokens only, as TRL scores them on a GPU.

TRL 1.16 computes GRPO's per-token log-probabilities through a fused LM head (trl/trainer/utils.py
`add_fused_lm_head`) that, on Triton devices, projects only the positions with a label (the completion);
everywhere else it projects every position, prompt included, so that Neuron's compiled tile shapes stay
fixed. A CPU runs eagerly and compiles nothing, so that choice only costs: for RARO's critic rows (about
430 prompt tokens, 8 completion tokens, batch 8) it projected 3,408 positions through the 49,152-word
vocabulary instead of 64, and the backward pass peaked at 5.0 GB against 1.7 GB (measured on the tiny model
in one finetune process; it was the memory that stopped CI). The projection itself (the kernel's CPU path)
is unchanged: only which rows reach it.
"""
from __future__ import annotations


def score_completions_only() -> None:
    """Make TRL take its compact path (valid positions only) on a CPU; idempotent, and a no-op where this TRL
    has no such switch (a later release may decide it by itself)."""
    from trl.trainer import utils

    decide = getattr(utils, "_use_triton", None)
    if decide is None or getattr(decide, "evoforge_cpu_compact", False):
        return

    def compact_on_cpu(device) -> bool:
        return device.type == "cpu" or decide(device)

    compact_on_cpu.evoforge_cpu_compact = True
    utils._use_triton = compact_on_cpu
