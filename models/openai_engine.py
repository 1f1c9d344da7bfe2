"""Generation through OpenAI-compatible servers: `vllm serve` replicas evoforge launched
(models/vllm_servers.py) or servers a team runs itself.

Requests go to the `/completions` API with the prompt rendered here by the model's chat template,
exactly as the in-process engine renders it (assistant prefix appended: MCTS continues a reply), so
a served model and an in-process one see the same tokens. Sampling is sent whole: per-request seed,
`n`, temperature, top-p, stop strings, the sampled tokens' log-probabilities (`logprobs: 0`), and
the neutral values of the server-side extras a server might otherwise take from the model's
generation config.

Routing (no scheduler of our own, the servers batch): each request, which carries all `n` samples
of one prompt, goes to one endpoint, so they share its prompt-prefix cache; a prompt seen before goes
back to the endpoint that served it while that one has room (an MCTS tree's expansions), otherwise to
the endpoint with the fewest requests outstanding, under a per-endpoint concurrency limit. A request
that fails on a dead or failing endpoint moves to another; the dead one is probed with growing
back-off and used again once it answers with the right model. A request the server refuses as wrong
(4xx) is not retried: it raises EngineRequestError.

The model id on every row is evoforge's (`name@weights-hash`), checked against what each endpoint
says it serves (`/models`): launched replicas serve under that id; a server of one's own must serve
the model under that id or from the same path, else the engine refuses it in one line.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import httpx

from evoforge.models.engine import (NEUTRAL_SAMPLING, Completion, EngineConfig, EngineRequestError, GenerationRequest,
                                    SamplingConfig, prompt_text)
from evoforge.models.registry import ResolvedModel

log = logging.getLogger(__name__)


class EndpointsUnavailable(RuntimeError):
    """Every endpoint has been down past `unavailable_timeout_s` (transient: Prefect retries the stage task)."""


class WrongServedModel(ValueError):
    """An endpoint serves another model than the config's: a stale server (see README, new checkpoints)."""


class KeyRefused(ValueError):
    """An endpoint answered 401/403: no key, or another key than the server's. Never retried: every request
    would get the same answer."""


@dataclass
class Endpoint:
    url: str  # base URL, ending in /v1
    served_name: str | None = None  # the name this server knows the model by (None: not checked yet)
    outstanding: int = 0
    down_until: float = 0.0  # monotonic time; 0 while up
    failures: int = 0
    probing: bool = False
    completed: int = 0  # requests answered (for tests and the stage summary)

    @property
    def up(self) -> bool:
        return self.down_until == 0.0


def served_name_for(models: list[dict], model: ResolvedModel, reference: str) -> str | None:
    """The name under which a `/models` listing serves `model`: evoforge's id (launched replicas),
    the reference the config gives, or the same folder (an adapter's: the LoRA module loaded from its
    folder, never its base)."""
    folder = model.adapter or (model.path if model.is_local else None)
    for entry in models:
        if entry.get("id") in (model.model_id, reference):
            return entry["id"]
        root = entry.get("root") or entry.get("id") or ""
        if folder and root and Path(root).expanduser().is_dir() \
                and Path(root).expanduser().resolve() == Path(folder).resolve():
            return entry["id"]
    return None


@dataclass
class Router:
    """Least-outstanding-requests routing with prompt affinity, per-endpoint limits, failover and probing."""

    endpoints: list[Endpoint]
    limit: int
    probe: callable
    unavailable_timeout_s: float = 300.0
    affinity: dict[str, Endpoint] = field(default_factory=dict)
    all_down_since: float | None = None

    def __post_init__(self):
        self.cond = threading.Condition()

    def acquire(self, prompt_key: str) -> Endpoint:
        with self.cond:
            while True:
                now = time.monotonic()
                due = [e for e in self.endpoints if not e.up and not e.probing and e.down_until <= now]
                if due:  # a down endpoint's back-off is over: see whether it answers again
                    self._probe(due[0])
                    continue
                open_ = [e for e in self.endpoints if e.up and e.outstanding < self.limit]
                if open_:
                    preferred = self.affinity.get(prompt_key)
                    chosen = preferred if preferred in open_ else min(open_, key=lambda e: e.outstanding)
                    chosen.outstanding += 1
                    self.affinity[prompt_key] = chosen
                    return chosen
                if any(e.up for e in self.endpoints):
                    self.all_down_since = None
                    self.cond.wait(1.0)  # all busy: a finishing request notifies
                    continue
                self.all_down_since = self.all_down_since or now
                if now - self.all_down_since > self.unavailable_timeout_s:
                    raise EndpointsUnavailable(
                        f"no endpoint has answered for {self.unavailable_timeout_s:.0f} s: "
                        + ", ".join(e.url for e in self.endpoints))
                waiting = [e.down_until for e in self.endpoints if not e.probing] or [now + 1.0]
                self.cond.wait(max(0.05, min(waiting) - now))

    def _probe(self, endpoint: Endpoint) -> None:
        """With the lock held; released while the endpoint is asked."""
        endpoint.probing = True
        self.cond.release()
        try:
            healthy = self.probe(endpoint)
        finally:
            self.cond.acquire()
            endpoint.probing = False
        if healthy:
            self._mark_up(endpoint)
        else:
            self._mark_down(endpoint)
        self.cond.notify_all()

    def release(self, endpoint: Endpoint, failed: bool = False) -> None:
        with self.cond:
            endpoint.outstanding -= 1
            if failed and endpoint.up:  # the other requests that die with it do not lengthen its back-off
                self._mark_down(endpoint)
            else:
                endpoint.completed += 1
            self.cond.notify_all()

    def _mark_down(self, endpoint: Endpoint) -> None:
        endpoint.failures += 1
        backoff = min(30.0, 0.5 * 2 ** min(endpoint.failures, 6))
        if endpoint.up:
            log.warning("endpoint %s stopped answering: its requests go to the others; probing it again in %.1f s",
                        endpoint.url, backoff)
        endpoint.down_until = time.monotonic() + backoff
        for key in [k for k, e in self.affinity.items() if e is endpoint]:
            del self.affinity[key]

    def _mark_up(self, endpoint: Endpoint) -> None:
        if not endpoint.up:
            log.info("endpoint %s answers again: back in rotation", endpoint.url)
        endpoint.down_until, endpoint.failures = 0.0, 0
        self.cond.notify_all()


MAX_ATTEMPTS = 8  # per request; waits for endpoints to come back do not count


class _Transient(Exception):
    """This attempt failed for a reason another endpoint or a later try may not have."""


class OpenAIEngine:
    def __init__(self, model: ResolvedModel, config: EngineConfig):
        from transformers import AutoTokenizer

        self.model = model
        self.model_id = model.model_id
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.fleet = None
        if config.launch is None and not config.endpoints:
            raise ValueError("engine.backend openai needs engine.endpoints (server URLs) or engine.launch")
        self.api_key = config.api_key()  # from the variable engine.api_key_env names; one line if it is unset
        timeout = httpx.Timeout(config.request_timeout_s, connect=5.0)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers,
                                   limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._connect()

    def _connect(self) -> None:
        if self.config.launch is not None:
            from evoforge.models.vllm_servers import ServerFleet

            self.fleet = ServerFleet(self.model, self.config, self.config.launch, api_key=self.api_key).start()
            urls = self.fleet.endpoints
        else:
            urls = [u.rstrip("/") for u in self.config.endpoints]
        self.router = Router([Endpoint(u) for u in urls], self.config.max_concurrency, self._probe,
                             self.config.unavailable_timeout_s)
        wrong = []
        for endpoint in self.router.endpoints:
            try:
                self._check_model(endpoint)
            except WrongServedModel as err:
                wrong.append(str(err))
            except _Transient:
                self.router._mark_down(endpoint)  # it may come up later: probed like a failed one
        if wrong:
            raise WrongServedModel(wrong[0])
        if not any(e.up for e in self.router.endpoints):
            log.warning("no endpoint answers yet (%s): requests wait up to %.0f s for one",
                        ", ".join(urls), self.config.unavailable_timeout_s)

    def _check_model(self, endpoint: Endpoint) -> None:
        try:
            response = self.client.get(f"{endpoint.url}/models", timeout=5.0)
        except httpx.HTTPError as err:
            raise _Transient(str(err)) from err
        self._check_key(endpoint, response)
        try:
            response.raise_for_status()
            models = response.json().get("data", [])
        except (httpx.HTTPError, ValueError) as err:
            raise _Transient(str(err)) from err
        name = served_name_for(models, self.model, self.config.model)
        if name is None:
            served = ", ".join(str(m.get("id")) for m in models) or "nothing"
            raise WrongServedModel(
                f"endpoint {endpoint.url} serves {served}, not {self.model_id} ({self.model.adapter or self.model.path}): "
                f"restart it with `vllm serve {self.model.path} " + (
                    f"--enable-lora --lora-modules {self.model_id}={self.model.adapter}`" if self.model.adapter else
                    f"--served-model-name {self.model_id}`"))
        endpoint.served_name = name

    def _check_key(self, endpoint: Endpoint, response: httpx.Response) -> None:
        if response.status_code in (401, 403):
            held = (f"the key in ${self.config.api_key_env}" if self.config.api_key_env else
                    "no key (engine.api_key_env names the variable that holds one)")
            raise KeyRefused(f"endpoint {endpoint.url} refused {held} (HTTP {response.status_code}): use the key the "
                             f"server was started with (`evoforge engine serve` says where it keeps it)")

    def _probe(self, endpoint: Endpoint) -> bool:
        try:
            self._check_model(endpoint)
            return True
        except _Transient:
            return False
        except (WrongServedModel, KeyRefused) as err:  # up, but not usable for this model or with this key
            log.warning("%s", err)
            return False

    def sleep(self) -> None:
        """Launched replicas stop (memory back for training); they start again on the next generate."""
        if self.fleet is not None:
            self.fleet.stop()

    def wake(self) -> None:
        if self.fleet is not None and not self.fleet.running:  # stopped by sleep() or at a command's end
            self._connect()

    @property
    def requests_per_endpoint(self) -> dict[str, int]:
        return {e.url: e.completed for e in self.router.endpoints}

    def generate(self, requests: Sequence[GenerationRequest], sampling: SamplingConfig) -> list[list[Completion]]:
        if not requests:
            return []
        self.wake()
        prompts = [prompt_text(self.tokenizer, r) for r in requests]
        workers = max(1, min(len(requests), self.config.max_concurrency * len(self.router.endpoints)))
        with ThreadPoolExecutor(workers, thread_name_prefix="openai-engine") as pool:
            futures = [pool.submit(self._complete, prompt, request.seed, sampling)
                       for prompt, request in zip(prompts, requests)]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _complete(self, prompt: str, seed: int, sampling: SamplingConfig) -> list[Completion]:
        body = dict(
            prompt=prompt, n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_tokens, stop=sampling.stop or None, seed=seed, logprobs=0, **NEUTRAL_SAMPLING,
        )
        key = hashlib.sha1(prompt.encode()).hexdigest()
        failures: list[str] = []
        while True:
            endpoint = self.router.acquire(key)
            try:
                choices = self._post(endpoint, body)
            except _Transient as err:
                self.router.release(endpoint, failed=True)
                failures.append(f"{endpoint.url}: {err}")
                if len(failures) >= MAX_ATTEMPTS:  # not a dead server: this request fails wherever it goes
                    raise EndpointsUnavailable(f"a request failed {len(failures)} times, last {failures[-1]}") from err
                log.debug("request on %s failed (%s): moving it to another endpoint", endpoint.url, err)
                continue
            except BaseException:
                self.router.release(endpoint)
                raise
            self.router.release(endpoint)
            return choices

    def _post(self, endpoint: Endpoint, body: dict) -> list[Completion]:
        try:
            response = self.client.post(f"{endpoint.url}/completions", json={**body, "model": endpoint.served_name})
        except httpx.TransportError as err:  # refused, reset, timed out: the server is gone or stuck
            raise _Transient(f"{type(err).__name__}: {err}") from err
        self._check_key(endpoint, response)  # a restarted server with another key: one line, no retries
        if response.status_code == 404 or response.status_code >= 500 or response.status_code == 429:
            raise _Transient(f"HTTP {response.status_code}")  # 404: restarted with another model
        if response.status_code >= 400:
            raise EngineRequestError(f"{self.model_id} at {endpoint.url}: {_error_message(response)}")
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        if len(choices) != body["n"]:
            raise _Transient(f"{len(choices)} choices for n={body['n']}")
        return [_completion(c) for c in choices]


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
        error = data.get("error", data)
        return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:200]}"


def _completion(choice: dict) -> Completion:
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
    sampled = [lp for lp in logprobs if lp is not None]
    tokens = len(logprobs)
    return Completion(
        text=choice.get("text") or "",
        token_count=tokens,
        finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
        mean_logprob=sum(sampled) / tokens if tokens else 0.0,
    )
