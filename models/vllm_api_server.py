"""`vllm serve` as evoforge launches it: vLLM's OpenAI server with its API key guarding EVERY path.

vLLM's key check (vllm/entrypoints/serve/middleware/authenticate.py) guards only the paths under /v1, /v2,
/inference and /cohere: `/invocations` (SageMaker's route, which runs completions), `/tokenize`,
`/pooling`, `/score` and `/metrics` answer anyone. Launched through this module, a replica with a key
(the environment's VLLM_API_KEY, never argv) asks for it on every path, /health included; evoforge's
own probes send it.

    python -m evoforge.models.vllm_api_server <the arguments of vllm.entrypoints.openai.api_server>
"""
from __future__ import annotations

import runpy


def guard_every_path() -> None:
    from vllm.entrypoints.serve.middleware import authenticate

    authenticate.GUARDED_PREFIX = ("/",)


if __name__ == "__main__":
    guard_every_path()
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
