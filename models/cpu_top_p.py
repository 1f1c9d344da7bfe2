"""Top-p on vLLM's CPU path without sorting the whole vocabulary.

Without Triton (every CPU build), vLLM applies top-p by sorting each row of logits over the full
vocabulary, every decoding step. With SmolLM2's 49k tokens that sort is a large share of a step on a
CPU core: `bench/mcts_batching.py` runs 5x faster with top-p off. A language model's mass sits in
few tokens, so this keeps the top `CANDIDATES` logits (`topk`, no full sort) and applies the same
rule as vLLM to them, counting the mass outside as the bottom of the ascending sum. Where those
candidates hold at least p of the mass, every token outside them is masked by vLLM's rule as well,
so the kept set is the same (up to float rounding at the cut); rows where they do not (a flat
distribution, such as a random test model's) go through vLLM's own sort, and rows whose top token
is too unlikely for the candidates to hold p go there without the topk.

`install()` swaps vLLM's function for this one (GPU builds use Triton and never reach it);
`EVOFORGE_VLLM_SORTED_TOP_P=1` keeps vLLM's. The in-process engine calls it; `vllm_plugin` does it in
the processes vLLM starts on its own (`vllm serve` replicas, Ray Data's engines) through vLLM's
general-plugin entry point (pyproject.toml), which every vLLM process loads.
"""
from __future__ import annotations

import logging
import os

import torch

CANDIDATES = 1024
log = logging.getLogger(__name__)


def truncated_top_p(sorted_top_p):
    """vLLM's `apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync)` with the top-p-only case
    done on the top CANDIDATES logits; `sorted_top_p` is vLLM's function, used for everything else."""

    def apply(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None, allow_cpu_sync: bool = False):
        if p is None or k is not None or logits.shape[1] <= CANDIDATES:
            return sorted_top_p(logits, k, p, allow_cpu_sync)
        log_total = logits.logsumexp(dim=-1, keepdim=True)
        # CANDIDATES tokens hold at most CANDIDATES x the top token's mass: a row below p cannot be covered
        hopeful = (logits.amax(dim=-1, keepdim=True) - log_total).exp().squeeze(1) * CANDIDATES >= p
        rows = hopeful.nonzero().squeeze(1)
        covered = torch.zeros_like(hopeful)  # rows whose candidates hold p: done here
        kept = torch.full_like(logits, float("-inf"))
        if rows.numel():
            top, index = logits[rows].topk(CANDIDATES, dim=-1)  # descending
            probs = (top - log_total[rows]).exp()
            outside = (1.0 - probs.sum(dim=-1)).clamp_min(0.0)
            # vLLM masks a token when the ascending cumulative mass up to it is <= 1 - p; outside the
            # candidates that mass is at most `outside`, so all of them are masked when outside <= 1 - p
            cut = (1.0 - p[rows]).unsqueeze(1)
            mask = outside.unsqueeze(1) + probs.flip(-1).cumsum(dim=-1) <= cut
            mask[:, -1] = False  # the most likely token always stays
            kept[rows] = kept[rows].scatter(1, index.flip(-1), top.flip(-1).masked_fill(mask, float("-inf")))
            covered[rows] = outside <= cut.squeeze(1)
        flat = (~covered).nonzero().squeeze(1)
        if flat.numel():
            kept[flat] = sorted_top_p(logits[flat], None, p[flat], allow_cpu_sync)
        return kept

    apply.sorted_top_p = sorted_top_p
    return apply


def install() -> bool:
    """Use truncated top-p in vLLM's PyTorch sampler path; True when it is in place."""
    if os.environ.get("EVOFORGE_VLLM_SORTED_TOP_P") == "1":
        return False
    try:
        from vllm.v1.sample.ops import topk_topp_sampler as sampler
    except ImportError:
        return False
    current = getattr(sampler, "apply_top_k_top_p_pytorch", None)
    if current is None:
        log.warning("vLLM has no apply_top_k_top_p_pytorch any more: top-p sorts the whole vocabulary")
        return False
    if not hasattr(current, "sorted_top_p"):
        sampler.apply_top_k_top_p_pytorch = truncated_top_p(current)
    return True


def vllm_plugin() -> None:
    """vLLM general plugin: truncated top-p in every vLLM process on a CPU."""
    if not torch.cuda.is_available():
        install()
