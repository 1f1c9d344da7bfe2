"""`RayDataEngine`: the Engine interface (models/engine.py) on a Ray cluster, through Ray Data's vLLM
processor (`ray.data.llm.build_processor`): each replica is one vLLM engine in a Ray actor.

Same outputs as the in-process `VLLMEngine`, by construction:
- the prompt is rendered here exactly as VLLMEngine renders it (`prompt_text`) and sent as text;
  Ray's chat-template, tokenize and detokenize stages are off, so nothing re-renders or re-decodes it;
- the same sampling values, with vLLM's neutral ones spelled out (they cross Arrow as a struct);
- Ray's vLLM stage keeps only `outputs[0]` of a request (Ray 2.60,
  ray/llm/_internal/batch/stages/vllm_engine_stage.py), so `n` samples are n rows with n=1 and seeds
  `seed + i`: exactly the child requests vLLM makes of a seeded n-sample request
  (vllm/v1/engine/parallel_sampling.py: `child_sampling_params.seed = seed + index`);
- the same engine settings as VLLMEngine (`vllm_engine_args`: on CPU float32, eager, whole prefills, one process).

Ray's rows carry no finish reason, so it is read the way vLLM decides it (vllm/v1/core/sched/utils.py
`check_stop`): the last token an end-of-sequence token, or a stop string (asked for with
`include_stop_str_in_output`, then cut off here, so the text is the one vLLM returns without it) ->
"stop"; otherwise max_tokens or the context reached -> "length".

Rows come back in any order and carry their request and sample index. A prompt the engine would
refuse (longer than the context) is refused before any engine starts, by vLLM's own rule; what the
engine refuses anyway (bad sampling values) comes back as an error row (`should_continue_on_error`)
and is raised as one EngineRequestError line instead of a Ray traceback.

Cost: every `generate` call is one Ray Data job, whose actors start their vLLM engines afresh (tens
of seconds each on a CPU): hand it whole stages, not single requests.
"""
from __future__ import annotations

from typing import Sequence

from evoforge.models import ray_cluster
from evoforge.models.engine import (
    NEUTRAL_SAMPLING,
    Completion,
    EngineConfig,
    EngineRequestError,
    GenerationRequest,
    SamplingConfig,
    prompt_text,
    vllm_engine_args,
)
from evoforge.models.registry import ModelError, ResolvedModel


class RayDataEngine:
    def __init__(self, model: ResolvedModel, config: EngineConfig):
        if model.adapter is not None:
            raise ModelError(f"{model.model_id} is a LoRA adapter: engine.backend ray loads full weights; publish the "
                             "checkpoint merged (finetune.lora.merge: true) or use the vllm or openai backend")
        ray_cluster.connect(config.ray.address)  # first: it quiets the loggers Ray's LLM modules make at import
        import ray
        from ray.data.llm import build_processor
        from transformers import AutoTokenizer

        self.model_id = model.model_id
        self.max_model_len = config.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.end_token_ids = _end_of_sequence_ids(model.path, self.tokenizer)
        gpu = ray.cluster_resources().get("GPU", 0) > 0
        self.processor = build_processor(_processor_config(model, config, gpu))
        ray_cluster.quiet_driver()  # build_processor imports vLLM and Ray's LLM stages, whose loggers are new

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[list[Completion]]:
        import ray

        if not requests:
            return []
        prompts = [prompt_text(self.tokenizer, r) for r in requests]
        self._refuse_too_long(prompts)
        rows = [
            {"request_index": i, "sample_index": k, "prompt": prompt, "sampling_params": _sampling_params(sampling, request.seed + k)}
            for i, (request, prompt) in enumerate(zip(requests, prompts))
            for k in range(sampling.n)
        ]
        outputs = self.processor(ray.data.from_items(rows)).take_all()
        errors = [row for row in outputs if row.get("__inference_error__")]
        if errors:
            first, more = errors[0], (f" (and {len(errors) - 1} more samples)" if len(errors) > 1 else "")
            message = f"{self.model_id}: request {first['request_index']}: {first['__inference_error__']}{more}"
            raise (EngineRequestError if _is_refusal(first["__inference_error__"]) else RuntimeError)(message)
        results: list[list[Completion | None]] = [[None] * sampling.n for _ in requests]
        for row in outputs:
            results[row["request_index"]][row["sample_index"]] = self._completion(row, sampling)
        return results  # type: ignore[return-value]

    def _refuse_too_long(self, prompts: list[str]) -> None:
        """vLLM refuses a prompt of max_model_len tokens or more (vllm/v1/engine/input_processor.py)."""
        for i, prompt in enumerate(prompts):
            length = len(self.tokenizer(prompt)["input_ids"])
            if length >= self.max_model_len:
                raise EngineRequestError(
                    f"{self.model_id}: request {i}: the prompt ({length} tokens) leaves no room to generate "
                    f"within max_model_len {self.max_model_len}")

    def _completion(self, row: dict, sampling: SamplingConfig) -> Completion:
        text = row["generated_text"]
        tokens = list(row["generated_tokens"])
        stop_string = next((s for s in sampling.stop if text.endswith(s)), None)
        if stop_string is not None:
            text, finish = text[: len(text) - len(stop_string)], "stop"
        elif tokens and tokens[-1] in self.end_token_ids:
            finish = "stop"
        elif len(tokens) >= sampling.max_tokens or row["num_input_tokens"] + len(tokens) >= self.max_model_len:
            finish = "length"
        else:
            finish = "stop"
        logprob_sum = sum(_sampled_logprob(step, token) for step, token in zip(row.get("logprobs") or [], tokens))
        return Completion(text=text, token_count=len(tokens), finish_reason=finish,
                          mean_logprob=logprob_sum / len(tokens) if tokens else 0.0)


def _processor_config(model: ResolvedModel, config: EngineConfig, gpu: bool):
    from ray.data.llm import vLLMEngineProcessorConfig

    # disable_log_stats: otherwise every batch ends with a stats log in the worker
    engine_kwargs = dict(vllm_engine_args(config, gpu), disable_log_stats=True)
    return vLLMEngineProcessorConfig(
        model_source=model.path,
        engine_kwargs=engine_kwargs,
        batch_size=config.ray.batch_size,
        concurrency=config.ray.replicas,
        # on a GPU Ray's default (one GPU per engine) is right; on CPU the engine reserves cores
        placement_group_config=None if gpu else {"bundles": [{"CPU": config.ray.cpus_per_replica}]},
        log_engine_metrics=False,  # True imports ray.serve, which ray[data] lacks
        runtime_env=ray_cluster.runtime_env(),
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
    )


def _sampling_params(sampling: SamplingConfig, seed: int) -> dict:
    return dict(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        **NEUTRAL_SAMPLING,
        max_tokens=sampling.max_tokens,
        stop=list(sampling.stop) or None,
        include_stop_str_in_output=bool(sampling.stop),  # so the finish reason can be read (module docstring)
        seed=seed,
        logprobs=0,  # the sampled token's own log-probability
    )


def _is_refusal(error: str) -> bool:
    """Ray's error rows read "<exception type>: <message>": a request error (bad values, too long) is
    the request's fault and retrying cannot help; anything else may be the engine's."""
    from vllm.exceptions import VLLMClientError

    refusals, pending = {"ValueError"}, [VLLMClientError]
    while pending:
        kind = pending.pop()
        refusals.add(kind.__name__)
        pending += kind.__subclasses__()
    return error.split(":", 1)[0] in refusals


def _sampled_logprob(step: dict | None, token: int) -> float:
    """One step of Ray's logprobs: {token id: {"logprob", "rank", "decoded_token"}}; with logprobs=0 it
    holds the sampled token alone."""
    entry = (step or {}).get(token)
    return float(entry["logprob"]) if entry else 0.0


def _end_of_sequence_ids(path: str, tokenizer) -> set[int]:
    """The tokens vLLM stops at: the tokenizer's end of sequence and the generation config's."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        configured = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # the folder has no generation_config.json
        configured = None
    if configured is not None:
        ids |= {configured} if isinstance(configured, int) else set(configured)
    return ids
