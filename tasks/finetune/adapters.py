"""Full weights or a LoRA adapter: loading the model a phase trains, and writing the checkpoint.

`finetune.lora` hands PEFT's LoraConfig to the TRL trainer (TRL wraps the model itself). What a round
publishes:
- `merge: true` (the default): the adapter merged into full weights. Every engine (in-process vLLM,
  served replicas, Ray) loads the checkpoint as any model folder, and the next round trains a fresh
  adapter on those merged weights: each round's update stays low-rank relative to its own start.
- `merge: false`: the adapter alone (adapter_config.json, adapter_model.safetensors), the tokenizer and
  `evoforge_base.json` naming the base model it loads on and that model's id. Engines load the base and
  apply the adapter (vLLM's LoRA support). The next round CONTINUES this adapter rather than stacking a
  second one: every round's checkpoint stays one adapter on one base, which is what lets a server keep
  one base in memory and switch adapters, and keeps the checkpoint a few MB.
A method trained with `lora` unset starting from an adapter checkpoint trains every weight: the adapter
is merged first.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from evoforge.models.registry import ADAPTER_CONFIG, BASE_RECORD, base_record, resolve_base
from evoforge.tasks.finetune.config import LoraConfig


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base_path(folder: str | Path) -> str:
    """The local folder (or hub id) of the base model an adapter loads on: from its evoforge record (a
    published checkpoint, resolved and checked like any model reference), else PEFT's own record (an
    adapter staged on this machine)."""
    record = base_record(folder)
    if record is not None:
        return resolve_base(record, folder).path
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_base_path(path) if is_adapter(path) and not
                                              (Path(path) / "tokenizer_config.json").exists() else path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def causal_lm(path, dtype, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def load_for_training(module, path: str, dtype, tokenizer, lora: LoraConfig | None):
    """The model a phase of `module` (a method) trains, from a model folder or an adapter: an adapter is
    continued (trainable) when LoRA is on, merged into full weights when it is off or the method's model
    has another head (the PPM)."""
    load = getattr(module, "load_model", causal_lm)
    if not is_adapter(path):
        return load(path, dtype, tokenizer)
    from peft import PeftModel

    base = load(adapter_base_path(path), dtype, tokenizer)
    if lora is not None and not hasattr(module, "load_model"):
        return PeftModel.from_pretrained(base, path, is_trainable=True)
    return PeftModel.from_pretrained(base, path).merge_and_unload()


def peft_config(lora: LoraConfig | None, method: str, model):
    """PEFT's LoraConfig for the trainer, or None: no LoRA, or the model already carries the adapter it continues."""
    if lora is None or hasattr(model, "peft_config"):
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules,
                          task_type="SEQ_CLS" if method == "ppm" else "CAUSAL_LM")


def write_checkpoint(module, weights: Path, folder: Path, lora: LoraConfig | None, tokenizer, base_model: dict | None,
                     dtype, merged=None) -> None:
    """The checkpoint at `folder` (created) from the last phase's saved weights: full weights as they are, an
    adapter merged into its base (`lora.merge`; `merged`: already merged in memory), or the adapter with the
    record of its base."""
    if not is_adapter(weights):
        shutil.copytree(weights, folder)
    elif merged is not None and (lora is None or lora.merge):
        merged.save_pretrained(folder, safe_serialization=True)
    elif lora is None or lora.merge:
        model = load_for_training(module, str(weights), dtype, tokenizer, lora=None)  # merged
        model.save_pretrained(folder, safe_serialization=True)
    else:
        if base_model is None:
            raise ValueError("finetune: an adapter checkpoint needs the record of its base model")
        folder.mkdir(parents=True)
        for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):
            shutil.copy2(weights / name, folder / name)
        (folder / BASE_RECORD).write_text(json.dumps(base_model, indent=1) + "\n")
    tokenizer.save_pretrained(folder)
